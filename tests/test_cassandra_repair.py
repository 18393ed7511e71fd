"""``diadb repair`` settles a Cassandra store that never completed (issue "Never a wrong answer",
class 9: "a repair completes or removes them").

A store broken at a chosen point (after its listing, half-way through its rows, before its
chunk; a keyed store; a store followed by a complete one of the same objects) is removed by a
repair: every engine table then holds exactly the rows of a keyspace that was never given that
store, and the store can be made again. A store that took its chunk is registered instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import diadb
from diadb.errors import StorageError
from tests.helpers import Visit, make_visit, random_positions
from tests.service_cassandra import fresh_url
from tests.test_cassandra_visibility import N, _assert_shows_only, _broken_half_way, _store, _visits

pytestmark = pytest.mark.slow

#: Tables whose rows name chunks, operations or times that differ between two keyspaces given
#: the same stores (compared in the tests through the registries' own calls instead).
NOT_COMPARED = {
    "diadb_metadata",
    "diadb_visit",
    "diadb_chunk",
    "diadb_pending",
    "diadb_update",
    "diadb_store_key",
    "diadb_keyed_store",
    "diadb_compaction_intent",
}


@pytest.fixture
def make_db(request: pytest.FixtureRequest, official_schema: Any) -> Iterator[Callable[[], diadb.Apdb]]:
    opened: list[diadb.Apdb] = []

    def make() -> diadb.Apdb:
        opened.append(diadb.Apdb.create(fresh_url(request), schema=official_schema))
        return opened[-1]

    try:
        yield make
    finally:
        for apdb in opened:
            apdb.close()


def _engine_rows(db: diadb.Apdb) -> dict[str, list[str]]:
    """Every row of every engine table (but ``NOT_COMPARED``), as sorted reprs; the keyed
    stores' members without their operation ids; empty tables left out."""
    session = db._backend.session  # type: ignore[attr-defined]
    out: dict[str, list[str]] = {}
    for table in sorted(session.table_names() - NOT_COMPARED):
        cols = "visit, detector, tbl, k1, k2, k3, start" if table == "diadb_chunk_member" else "*"
        (rows,) = session.run([(session.prepare(f"SELECT {cols} FROM {session.t(table)}"), ())], write=False)
        if rows:
            out[table] = sorted(repr(tuple(r)) for r in rows)
    return out


def _assert_same_rows(db: diadb.Apdb, reference: diadb.Apdb) -> None:
    got, want = _engine_rows(db), _engine_rows(reference)
    assert sorted(got) == sorted(want)
    for table in want:
        assert got[table] == want[table], table


def _fail(*args: Any, **kwargs: Any) -> Any:
    raise StorageError("injected: the process died")


@contextlib.contextmanager
def _broken_after_listing(db: diadb.Apdb, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside, a store dies after its first two writes: its pending record, then its object
    listing with its forced-source claims (the test checks the listing is there)."""
    session = db._backend.session  # type: ignore[attr-defined]
    real_run = session.run
    writes: list[int] = []

    def first_two(statements: Any, *, write: bool) -> Any:
        if write:
            writes.append(len(statements))
            if len(writes) == 3:
                raise StorageError("injected: the process died")
        return real_run(statements, write=write)

    with monkeypatch.context() as m:
        m.setattr(session, "run", first_two)
        yield


def _listed(db: diadb.Apdb, visit: int) -> int:
    """How many object versions the change log lists for a plain store of ``visit``."""
    session = db._backend.session  # type: ignore[attr-defined]
    stmt = session.prepare(
        f"SELECT * FROM {session.t('diadb_chunk_object')} WHERE visit = ? AND detector = 0"
    )
    (rows,) = session.run([(stmt, (visit,))], write=False)
    return len(rows)


@pytest.mark.parametrize("where", ["after its listing", "half-way through its rows", "before its chunk"])
def test_repair_removes_every_row_of_a_store_that_never_took_its_chunk(
    make_db: Callable[[], diadb.Apdb], official_schema: Any, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Visit 2 gives visit 1's objects new versions (closing theirs), moves them, makes new
    objects, sources and forced sources; it dies at ``where``. After the repair the keyspace
    holds exactly the rows of one given visit 1 alone; visit 2 stored again is shown whole."""
    db, reference = make_db(), make_db()
    first, second = _visits(official_schema)
    assert _store(db, first) and _store(reference, first)
    log = db._backend.log  # type: ignore[attr-defined]
    with contextlib.ExitStack() as stack:
        if where == "after its listing":
            stack.enter_context(_broken_after_listing(db, monkeypatch))
        elif where == "half-way through its rows":
            stack.enter_context(_broken_half_way(db, monkeypatch))
        else:
            stack.enter_context(monkeypatch.context()).setattr(log, "take_chunk", _fail)
        with pytest.raises(StorageError, match="injected"):
            _store(db, second)
    _assert_shows_only(db, [first])
    assert _listed(db, 2) == second.objects.num_rows
    report = db.repair(min_age_s=0)
    assert report.removed_stores == ["store:2:0"]
    assert not report.incomplete_stores and not report.finished_stores
    _assert_same_rows(db, reference)
    assert db.repair(min_age_s=0) == type(report)()  # nothing left to settle
    with diadb.Apdb.open(db.url) as other:
        _assert_shows_only(other, [first])
        assert _store(other, second)  # a new store of the same visit
    assert _store(reference, second)
    _assert_same_rows(db, reference)
    _assert_shows_only(db, [first, second])


def test_repair_closes_the_version_before_a_removed_one_where_the_next_version_starts(
    make_db: Callable[[], diadb.Apdb], official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Visit 2 dies before its chunk; visit 3 then stores new versions of the same objects
    (closing visit 2's, hidden). The repair removes visit 2: visit 1's versions end where visit
    3's start, as in a keyspace given visits 1 and 3 only."""
    db, reference = make_db(), make_db()
    first, second = _visits(official_schema)
    ids = np.arange(1, N + 1)
    ra, dec = random_positions(N, 7)
    third = make_visit(official_schema, 3, 60000.8, ids, ra, dec, seed=9)
    assert _store(db, first) and _store(reference, first)
    with monkeypatch.context() as m:
        m.setattr(db._backend.log, "take_chunk", _fail)  # type: ignore[attr-defined]
        with pytest.raises(StorageError, match="injected"):
            _store(db, second)
    assert _store(db, third) and _store(reference, third)
    assert db.repair(min_age_s=0).removed_stores == ["store:2:0"]
    _assert_same_rows(db, reference)
    _assert_shows_only(db, [first, third])


def test_repair_removes_a_second_keyed_store_of_a_visit_and_keeps_the_first(
    make_db: Callable[[], diadb.Apdb], official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyed stores (the lsst.dax.apdb facade's) share a visit: the second, broken half-way, is
    removed; the first stays shown; the second's key is free again, under the same key or another."""
    db, reference = make_db(), make_db()
    first, second = _visits(official_schema)

    def keyed(apdb: diadb.Apdb, v: Visit, key: str) -> bool:
        return apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=1, key=key)

    assert keyed(db, first, "first") and keyed(reference, first, "first")
    with _broken_half_way(db, monkeypatch), pytest.raises(StorageError, match="injected"):
        keyed(db, second, "second")
    report = db.repair(min_age_s=0)
    assert report.removed_stores == ["store-key:second"]
    _assert_same_rows(db, reference)
    assert db.contains_visit_detector(1)
    _assert_shows_only(db, [first])
    with diadb.Apdb.open(db.url) as other:
        assert keyed(other, second, "another key")
    assert keyed(reference, second, "another key")
    _assert_shows_only(db, [first, second])


def test_repair_registers_a_store_that_took_its_chunk(
    make_db: Callable[[], diadb.Apdb], official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that dies after taking its chunk had every row written: the repair registers it,
    and every process then shows it whole, with one chunk."""
    db = make_db()
    first, second = _visits(official_schema)
    assert _store(db, first)
    with monkeypatch.context() as m:
        m.setattr(db._backend.store, "register", _fail)  # type: ignore[attr-defined]
        with pytest.raises(StorageError, match="injected"):
            _store(db, second)
    assert not db.contains_visit_detector(2, 0)
    _assert_shows_only(db, [first])
    report = db.repair(min_age_s=0)
    assert report.finished_stores == ["store:2:0"] and not report.removed_stores
    assert db.contains_visit_detector(2, 0)
    _assert_shows_only(db, [first, second])
    with diadb.Apdb.open(db.url) as other:
        _assert_shows_only(other, [first, second])
        assert not _store(other, second)  # stored already
    assert db.replica_chunks().num_rows == 2


def test_a_store_whose_record_a_repair_removed_stops_before_its_chunk(
    make_db: Callable[[], diadb.Apdb], official_schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store slower than the repair's grace: the repair removes it while it runs; the store
    must then not complete with part of its rows gone. It raises, and can be stored again."""
    import diadb.backends.cassandra.store as store_module

    db = make_db()
    first, second = _visits(official_schema)
    assert _store(db, first)
    real_confirm = store_module.confirm_pending

    def repaired_meanwhile(session: Any, op_key: str, op: Any) -> None:
        assert db.repair(min_age_s=0).removed_stores == [op_key]
        real_confirm(session, op_key, op)

    with monkeypatch.context() as m:
        m.setattr(store_module, "confirm_pending", repaired_meanwhile)
        with pytest.raises(StorageError, match="removed by a repair"):
            _store(db, second)
    _assert_shows_only(db, [first])
    assert db.replica_chunks().num_rows == 1
    assert _store(db, second)
    _assert_shows_only(db, [first, second])
