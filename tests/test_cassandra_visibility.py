"""Cassandra shows each store wholly or not at all (issue "Never a wrong answer", class 9).

A store's rows reach Cassandra one batch at a time, with no transaction around them. Reads take
a horizon (the newest change-log chunk id) first and show only the rows of stores registered
with a chunk at or below it (``diadb.backends.cassandra.visibility``). These tests break stores
at chosen points (before the chunk; half-way through the rows) and pin a read's horizon before
a store completes; the 3-node test with a writer killed by SIGKILL is in ``test_cassandra.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import diadb
from diadb.errors import StorageError
from tests.helpers import Visit, make_visit, random_positions
from tests.service_cassandra import fresh_url

pytestmark = pytest.mark.slow

EVERYWHERE = diadb.Box(0, 360, -90, 90)
N = 200


@pytest.fixture
def db(request: pytest.FixtureRequest, official_schema: Any) -> Iterator[diadb.Apdb]:
    apdb = diadb.Apdb.create(fresh_url(request), schema=official_schema)
    try:
        yield apdb
    finally:
        apdb.close()


def _visits(schema: Any) -> tuple[Visit, Visit]:
    """Visit 1 makes objects 1..N; visit 2 gives each a new version, moved (a new order-29
    pixel), plus N new objects; each visit has sources and forced sources."""
    ids = np.arange(1, N + 1)
    ra, dec = random_positions(N, 5)
    first = make_visit(schema, 1, 60000.0, ids, ra, dec)
    both = np.concatenate([ids, ids + 10_000])
    ra2, dec2 = random_positions(N, 6)
    second = make_visit(
        schema, 2, 60000.5, both, np.concatenate([ra + 1e-4, ra2]), np.concatenate([dec, dec2]), seed=3
    )
    return first, second


def _store(db: diadb.Apdb, v: Visit) -> bool:
    return db.store(v.mjd, v.objects, v.sources, v.forced, visit=v.visit, detector=0)


def _sorted(t: pa.Table, key: str) -> pa.Table:
    return t.take(pc.sort_indices(t, sort_keys=[(key, "ascending")]))


@contextlib.contextmanager
def _broken_half_way(db: diadb.Apdb, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Inside, a store breaks half-way through its rows: its big writes are its key claims,
    then its rows, of which every other batch is written before it fails. Yields the sizes
    of the big writes seen."""
    session = db._backend.session  # type: ignore[attr-defined]
    real_run = session.run
    big_writes: list[int] = []

    def half(statements: Any, *, write: bool) -> Any:
        if write and len(statements) > 4:
            big_writes.append(len(statements))
            if len(big_writes) == 2:
                real_run(statements[::2], write=True)
                raise StorageError("injected: the connection dropped mid-store")
        return real_run(statements, write=write)

    with monkeypatch.context() as m:
        m.setattr(session, "run", half)
        yield big_writes


def _assert_shows_only(db: diadb.Apdb, visible: list[Visit]) -> None:
    """Reads show exactly the rows of ``visible`` (the last one's object versions)."""
    mjd = 60001.0
    got = db.get_sources(EVERYWHERE, mjd, columns=["diaSourceId", "visit"])
    want = pa.concat_tables([v.sources for v in visible])
    assert sorted(got.column("diaSourceId").to_pylist()) == sorted(want.column("diaSourceId").to_pylist())
    forced = db.get_forced_sources(EVERYWHERE, mjd, columns=["diaObjectId", "visit"])
    assert forced.num_rows == sum(v.forced.num_rows for v in visible)
    assert set(forced.column("visit").to_pylist()) == {v.visit for v in visible}
    objects = _sorted(db.get_objects(EVERYWHERE), "diaObjectId")
    latest = _sorted(visible[-1].objects, "diaObjectId")
    if len(visible) > 1:  # objects the last visit did not touch keep their earlier version
        older = visible[0].objects.filter(
            pc.invert(pc.is_in(visible[0].objects.column("diaObjectId"), latest.column("diaObjectId")))
        )
        latest = _sorted(pa.concat_tables([latest, older.cast(latest.schema)]), "diaObjectId")
    assert objects.num_rows == latest.num_rows
    for name in ("diaObjectId", "ra", "dec", "validityStartMjdTai", "validityEndMjdTai", "nDiaSources"):
        want_values = latest.column(name).cast(objects.column(name).type).to_pylist()
        assert objects.column(name).to_pylist() == want_values, name


def test_a_store_that_fails_before_its_chunk_is_not_shown_and_its_retry_shows_it_whole(
    db: diadb.Apdb, official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _visits(official_schema)
    assert _store(db, first)
    log = db._backend.log  # type: ignore[attr-defined]

    def fail(*args: Any, **kwargs: Any) -> int:
        raise StorageError("injected: the change-log write failed")

    with monkeypatch.context() as m:
        m.setattr(log, "take_chunk", fail)
        with pytest.raises(StorageError, match="injected"):
            _store(db, second)
    # Every row of visit 2 is written (new object versions, moved objects' deletes, sources),
    # but it has no chunk: nothing of it is shown, and each object shows its visit-1 version.
    _assert_shows_only(db, [first])
    assert not db.contains_visit_detector(2, 0)
    # The daytime dedup scan shows the same objects (visit 1's versions, none of visit 2's).
    dedup = db.get_objects_for_dedup(59999.0, columns=["diaObjectId", "validityStartMjdTai"])
    assert sorted(dedup.column("diaObjectId").to_pylist()) == list(range(1, N + 1))
    assert set(dedup.column("validityStartMjdTai").to_pylist()) == {60000.0}
    # Another process (no cache of this one's) sees the same.
    with diadb.Apdb.open(db.url) as other:
        _assert_shows_only(other, [first])
    assert _store(db, second)  # the retry completes the same store
    _assert_shows_only(db, [first, second])
    with diadb.Apdb.open(db.url) as other:
        _assert_shows_only(other, [first, second])


def test_a_store_broken_half_way_through_its_rows_is_not_shown(
    db: diadb.Apdb, official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _visits(official_schema)
    assert _store(db, first)
    with _broken_half_way(db, monkeypatch) as big_writes, pytest.raises(StorageError, match="injected"):
        _store(db, second)
    assert len(big_writes) == 2
    _assert_shows_only(db, [first])
    with diadb.Apdb.open(db.url) as other:
        _assert_shows_only(other, [first])
        assert _store(other, second)  # completed by another process
    _assert_shows_only(db, [first, second])


def test_a_store_completed_after_a_read_began_is_not_shown_to_that_read(
    db: diadb.Apdb, official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _visits(official_schema)
    assert _store(db, first)
    visibility = db._backend.visibility  # type: ignore[attr-defined]
    began = visibility.horizon()  # a read takes its horizon, then visit 2 is stored whole
    with diadb.Apdb.open(db.url) as writer:
        assert _store(writer, second)
    with monkeypatch.context() as m:
        m.setattr(visibility, "horizon", lambda: began)
        _assert_shows_only(db, [first])  # the read's rows come after the store: still hidden
    _assert_shows_only(db, [first, second])


def test_a_second_keyed_store_of_a_visit_is_not_shown_until_it_is_complete(
    db: diadb.Apdb, official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyed stores of one visit append (the lsst.dax.apdb facade's stores): the second one,
    broken half-way through its rows, is hidden although its visit is shown, until a retry."""
    first, second = _visits(official_schema)

    def keyed(apdb: diadb.Apdb, v: Visit, key: str) -> bool:
        return apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=1, key=key)

    assert keyed(db, first, "first")
    with _broken_half_way(db, monkeypatch) as big_writes, pytest.raises(StorageError, match="injected"):
        keyed(db, second, "second")
    assert len(big_writes) == 2
    assert db.contains_visit_detector(1)  # shown: its first store is complete
    _assert_shows_only(db, [first])
    with diadb.Apdb.open(db.url) as other:
        _assert_shows_only(other, [first])
        assert keyed(other, second, "second")  # the retry, by another process
    _assert_shows_only(db, [first, second])
    assert not keyed(db, second, "second")


def test_an_object_moved_away_by_a_store_not_complete_stays_at_its_old_place(
    db: diadb.Apdb, official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store moves every object 3 deg away: until it is complete a read of the old field
    shows each object's old version there (its old row is marked, not deleted); once complete,
    the old field is empty, even when the old rows were never deleted (a crash just after the
    store registered)."""
    ids = np.arange(1, N + 1)
    ra, dec = random_positions(N, 5)
    first = make_visit(official_schema, 1, 60000.0, ids, ra, dec)
    second = make_visit(official_schema, 2, 60000.5, ids, ra + 3.0, dec, seed=3)
    old_field, new_field = diadb.Box(53.9, 56.1, -31.1, -28.9), diadb.Box(56.9, 59.1, -31.1, -28.9)
    assert _store(db, first)
    log = db._backend.log  # type: ignore[attr-defined]

    def fail(*args: Any, **kwargs: Any) -> int:
        raise StorageError("injected: the change-log write failed")

    def objects(apdb: diadb.Apdb, region: diadb.Region) -> pa.Table:
        return _sorted(apdb.get_objects(region, columns=["diaObjectId", "ra", "dec"]), "diaObjectId")

    with monkeypatch.context() as m:
        m.setattr(log, "take_chunk", fail)
        with pytest.raises(StorageError, match="injected"):
            _store(db, second)

    def before(apdb: diadb.Apdb) -> None:
        got = objects(apdb, old_field)
        assert got.column("diaObjectId").to_pylist() == ids.tolist()
        assert np.allclose(got.column("ra").to_numpy(), first.objects.column("ra").to_numpy())
        assert objects(apdb, new_field).num_rows == 0

    def after(apdb: diadb.Apdb) -> None:
        assert objects(apdb, old_field).num_rows == 0
        assert objects(apdb, new_field).column("diaObjectId").to_pylist() == ids.tolist()
        everywhere = objects(apdb, EVERYWHERE)
        assert everywhere.column("diaObjectId").to_pylist() == ids.tolist()
        assert np.allclose(everywhere.column("ra").to_numpy(), ra + 3.0)

    before(db)
    with diadb.Apdb.open(db.url) as other:
        before(other)
    # The retry completes it, but "crashes" before deleting the old rows: they stay, marked.
    store = db._backend.store  # type: ignore[attr-defined]
    real = store._object_writes
    monkeypatch.setattr(store, "_object_writes", lambda *a: (*real(*a)[:3], []))
    assert _store(db, second)
    after(db)
    with diadb.Apdb.open(db.url) as other:
        after(other)


def test_repair_completes_failed_daytime_calls_and_removes_stores_never_registered(
    db: diadb.Apdb, official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Apdb.repair`` and ``diadb repair``: a daytime call that failed after recording its plan
    is applied from it; a store that took no chunk is removed and listed (exit 1); a store that
    registered but did not clear its record is finished; young records wait (the removal itself
    is checked row by row in ``test_cassandra_repair.py``)."""
    from typer.testing import CliRunner

    from diadb.cli import app

    first, second = _visits(official_schema)
    assert _store(db, first)
    log = db._backend.log  # type: ignore[attr-defined]

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("injected: the process died")

    with monkeypatch.context() as m:  # the plan is recorded, nothing of it applied
        m.setattr(log, "_apply_plan", fail)
        with pytest.raises(StorageError, match="injected"):
            db.set_validity_end([1, 2, 3], 60000.2)
    with monkeypatch.context() as m:  # no chunk: hidden
        m.setattr(log, "take_chunk", fail)
        with pytest.raises(StorageError, match="injected"):
            _store(db, second)
    assert db.get_objects(EVERYWHERE).num_rows == N
    young = db.repair()  # both records are seconds old: perhaps still running
    assert young.in_progress == 2 and not young.completed_updates and not young.removed_stores
    result = CliRunner().invoke(app, ["repair", db.url, "--min-age", "0"])
    assert result.exit_code == 1, result.output
    assert "completed 1 daytime update(s)" in result.output and "REMOVED store:2:0" in result.output
    ids = db.get_objects(EVERYWHERE, columns=["diaObjectId"]).column(0).to_pylist()
    # The update is complete: objects 1-3 are closed (visit 2, which had new versions of them,
    # is gone).
    assert sorted(ids) == list(range(4, N + 1))
    chunks = db.replica_chunks()
    assert chunks.num_rows == 2  # visit 1's store and the update (visit 2 has none)
    assert db.repair(min_age_s=0) == type(young)()
    with monkeypatch.context() as m:  # stored again: it registers, then dies before clearing its record
        m.setattr(log, "end", fail)
        with pytest.raises(StorageError, match="injected"):
            _store(db, second)
    assert db.contains_visit_detector(2, 0)
    done = db.repair(min_age_s=0)
    assert done.finished_stores == ["store:2:0"] and not done.removed_stores
    assert db.repair(min_age_s=0) == type(done)()
