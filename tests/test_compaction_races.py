"""A store or a daytime call that commits while a compaction runs is neither lost nor shown
stale, on the server engines (issue "Never a wrong answer").

Other clients keep storing and correcting while ``diadb compact --follow`` runs. The
compaction's fault hook lets another client act at a chosen step: a store of a visit older than
the new boundary, or a daytime change to a row the compaction has read. Afterwards every read
must equal a database without the tier that was given the same calls (or, on Cassandra, the
store is refused before it writes anything: it would be hidden by the boundary there).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import diadb
from diadb.backends.cassandra import store_guard
from diadb.errors import CatalogError, StorageError
from tests.helpers import make_visit, random_positions
from tests.test_cassandra_visibility import _broken_half_way
from tests.test_history import EVERYWHERE
from tests.test_history_server import ENGINES, fresh_url

pytestmark = pytest.mark.slow
N = 60
TIER = {"history_tier": True, "history_auto_compact": False, "history_tile_order": 5}


def _visit(db: diadb.Apdb, v: int) -> Any:
    """Visit ``v`` of one of three revisited object populations, 2.5 days apart."""
    ra, dec = random_positions(N, 3)
    ids = np.arange(1, N + 1) + (v % 3) * 10_000
    return make_visit(db.schema, v, 60000.0 + v * 2.5, ids, ra + (v % 3) * 0.1, dec, seed=v)


def _store(db: diadb.Apdb, v: int) -> bool:
    visit = _visit(db, v)
    return db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)


def _sorted(t: pa.Table, keys: list[str]) -> pa.Table:
    return t.take(pc.sort_indices(t, sort_keys=[(k, "ascending") for k in keys]))


def _same_reads(tiered: diadb.Apdb, plain: diadb.Apdb) -> None:
    for method, keys in (
        ("get_objects", ["diaObjectId"]),
        ("get_sources", ["diaSourceId"]),
        ("get_forced_sources", ["diaObjectId", "visit"]),
    ):
        args: tuple[Any, ...] = (EVERYWHERE,) if method == "get_objects" else (EVERYWHERE, 70000.0)
        kwargs = {} if method == "get_objects" else {"months": 1000}
        got, want = (_sorted(getattr(db, method)(*args, **kwargs), keys) for db in (tiered, plain))
        assert got.num_rows == want.num_rows, method
        assert got.equals(want.select(got.column_names)), method


def _two(
    request: pytest.FixtureRequest, schema: Any, engine: str, visits: int
) -> tuple[diadb.Apdb, diadb.Apdb, str]:
    """A tiered database (compacted after visit 2, so a DiaObject snapshot exists and later
    visits' objects are noted as changed) and one without the tier, given the same visits."""
    url = fresh_url(request, engine)
    tiered = diadb.Apdb.create(url, schema=schema, **TIER)
    plain = diadb.Apdb.create(fresh_url(request, engine), schema=schema, history_tier=False)
    for v in range(1, visits + 1):
        assert _store(tiered, v) and _store(plain, v)
        if v == 2:
            tiered.compact(boundary=60000.0 + 2.6 * 2.5)  # visits 1-2 into segments, a snapshot
    return tiered, plain, url


def _at_step(step: str, act: Callable[[], None]) -> Callable[[str], None]:
    """A fault hook that runs ``act`` the first time the compaction reaches ``step``."""
    done: list[bool] = []

    def hook(name: str) -> None:
        if name == step and not done:
            done.append(True)
            act()

    return hook


@pytest.mark.parametrize(
    ("engine", "step"),
    # "read": after the compaction read a piece of sources; "objects": after it read which
    # objects changed (Cassandra has no DiaObject snapshot yet, so no such step).
    [("postgresql", "read"), ("postgresql", "objects"), ("cassandra", "read")],
)
def test_a_store_during_a_compaction_is_neither_lost_nor_stale(request, official_schema, engine, step):
    tiered, plain, url = _two(request, official_schema, engine, 4)
    other = diadb.Apdb.open(url)  # another client
    outcome: list[bool | str] = []

    def store_visit_5() -> None:
        # Visit 5 gives population 2 new versions (not changed since the last compaction) and
        # adds sources older than the compaction's boundary.
        try:
            outcome.append(_store(other, 5))
        except CatalogError as e:
            outcome.append(str(e))

    try:
        tiered.compact(boundary=1e9, fault=_at_step(step, store_visit_5))
        if engine == "cassandra":
            # Refused before writing anything: its rows would lie below the new boundary.
            assert isinstance(outcome[0], str) and "compaction" in outcome[0], outcome
        else:
            assert outcome == [True]
            assert _store(plain, 5)
        _same_reads(tiered, plain)
        tiered.compact(boundary=1e9)  # and the next compaction moves them, still exact
        _same_reads(tiered, plain)
    finally:
        other.close()
        tiered.close()
        plain.close()


@ENGINES
def test_a_daytime_change_during_a_compaction_is_not_lost(request, official_schema, engine):
    tiered, plain, url = _two(request, official_schema, engine, 4)
    other = diadb.Apdb.open(url)
    # Visit 4's sources are still in the engine: the compaction reads them, then another client
    # reassigns some. It waits for the compaction (PostgreSQL's lock, Cassandra's lease).
    ids = _sorted(tiered.get_sources(EVERYWHERE, 70000.0, months=1000), ["diaSourceId"])
    late = ids.filter(pc.equal(ids.column("visit"), 4)).column("diaSourceId").to_pylist()[:5]
    mapping = {int(s): 900_000 + i for i, s in enumerate(late)}
    errors: list[BaseException] = []

    def reassign() -> None:
        try:
            other.reassign_to_ssobjects(mapping, time=61000.0)
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=reassign)
    try:
        tiered.compact(boundary=1e9, fault=_at_step("read", worker.start))
        worker.join(timeout=120)
        assert not worker.is_alive() and errors == []
        plain.reassign_to_ssobjects(mapping, time=61000.0)
        _same_reads(tiered, plain)
    finally:
        other.close()
        tiered.close()
        plain.close()


def test_a_cassandra_compaction_holds_back_for_a_store_in_progress(request, official_schema, monkeypatch):
    tiered, plain, _ = _two(request, official_schema, "cassandra", 4)
    try:
        # Visit 5's store breaks after its pending record (with its visit time) and its key
        # claims, half-way through its rows: a store in progress, to a compactor.
        with _broken_half_way(tiered, monkeypatch), pytest.raises(StorageError, match="injected"):
            _store(tiered, 5)
        visit_5 = 60000.0 + 5 * 2.5
        tiered.compact(boundary=1e9)
        assert max(s.t_max for s in tiered.segments() if s.table == "DiaSource") < visit_5
        assert tiered._backend.history.boundary() == visit_5  # type: ignore[attr-defined]
        assert _store(tiered, 5)  # the retry completes it, all of it shown
        assert _store(plain, 5)
        _same_reads(tiered, plain)
        # A store whose record is older than STALE_STORE_S is taken for dead: not waited for.
        with _broken_half_way(tiered, monkeypatch), pytest.raises(StorageError, match="injected"):
            _store(tiered, 6)
        monkeypatch.setattr(store_guard, "STALE_STORE_S", -1.0)
        tiered.compact(boundary=1e9)
        assert tiered._backend.history.boundary() == 1e9  # type: ignore[attr-defined]
        with pytest.raises(CatalogError, match="older than the compacted history"):
            _store(tiered, 6)
        _same_reads(tiered, plain)  # visit 6 was never shown
    finally:
        tiered.close()
        plain.close()


def test_a_cassandra_store_taken_for_dead_is_refused_not_lost(request, official_schema, monkeypatch):
    """A store still running when its record is older than STALE_STORE_S (1 h; 1 s here) is
    passed by a compaction, which cannot see its hidden rows. Before its chunk the store rewrites
    its record and checks the boundary again: it fails rather than be acknowledged with rows the
    boundary hides (before this check it returned True and visit 5 was missing from every read)."""
    tiered, plain, url = _two(request, official_schema, "cassandra", 4)
    other = diadb.Apdb.open(url)  # the compactor
    monkeypatch.setattr(store_guard, "STALE_STORE_S", 1.0)
    session = tiered._backend.session  # type: ignore[attr-defined]
    real_run = session.run
    big_writes: list[int] = []

    def slow(statements: Any, *, write: bool) -> Any:
        out = real_run(statements, write=write)
        if write and len(statements) > 4:
            big_writes.append(len(statements))
            if len(big_writes) == 2:  # its rows written: the store is slow, then a compaction runs
                time.sleep(1.5)
                other.compact(boundary=1e9)
        return out

    try:
        with monkeypatch.context() as m:
            m.setattr(session, "run", slow)
            with pytest.raises(StorageError, match="taken for a dead one and passed by a compaction"):
                _store(tiered, 5)
        assert other._backend.history.boundary() == 1e9  # type: ignore[attr-defined]
        _same_reads(tiered, plain)  # visit 5 is not shown, in part or whole
        with pytest.raises(CatalogError, match="older than the compacted history"):
            _store(tiered, 5)  # its retry is refused
        report = tiered.repair(min_age_s=0.0)
        assert report.removed_stores, report
        _same_reads(tiered, plain)
    finally:
        other.close()
        tiered.close()
        plain.close()
