"""Daytime operations and the change log, on every backend (and on rows already in history segments)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import diadb
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)
N = 20


@pytest.fixture(autouse=True)
def _backend_has_daytime_operations(apdb):
    # Backends gain the daytime protocol one at a time; a backend without it says so.
    if not hasattr(apdb._backend, "update_sources"):
        pytest.skip(f"{type(apdb._backend).__name__} does not implement the daytime operations yet")


def _night(apdb: diadb.Apdb) -> None:
    """Objects 1..20 seen in visits 1-3 (days 0, 2, 4); object 21 only in visit 3."""
    ra, dec = random_positions(N + 1, 5)
    for v, day in [(1, 0.0), (2, 2.0), (3, 4.0)]:
        ids = np.arange(1, N + 2) if v == 3 else np.arange(1, N + 1)
        visit = make_visit(apdb.schema, v, 60000.0 + day, ids, ra[: len(ids)], dec[: len(ids)])
        n_sources = np.where(ids == N + 1, 1, v).astype(np.int32)
        objects = visit.objects.set_column(
            visit.objects.schema.get_field_index("nDiaSources"), "nDiaSources", pa.array(n_sources)
        )
        apdb.store(visit.mjd, objects, visit.sources, visit.forced, visit=v)


def _source_id(obj: int, visit: int) -> int:
    return obj * 100_000 + visit  # as tests.helpers.make_visit numbers them


def _sources(apdb: diadb.Apdb, **kw: object) -> dict[int, dict[str, object]]:
    t = apdb.get_sources(EVERYWHERE, 60010.0, **kw)
    return {r["diaSourceId"]: r for r in t.to_pylist()}


def _objects(apdb: diadb.Apdb) -> dict[int, dict[str, object]]:
    return {r["diaObjectId"]: r for r in apdb.get_objects(EVERYWHERE).to_pylist()}


def test_reassign_to_ssobjects(apdb):
    _night(apdb)
    chunks_before = apdb.replica_chunks().num_rows
    apdb.reassign_to_ssobjects({_source_id(1, 1): 555, _source_id(N + 1, 3): 777}, time=60005.0)
    src = _sources(apdb)
    moved = src[_source_id(1, 1)]
    assert moved["diaObjectId"] is None and moved["ssObjectId"] == 555
    assert moved["ssObjectReassocTimeMjdTai"] == 60005.0
    assert src[_source_id(1, 2)]["diaObjectId"] == 1  # the others stay
    objects = _objects(apdb)
    assert objects[1]["nDiaSources"] == 2  # 3 - 1
    assert N + 1 not in objects  # its only source left: the object is removed
    assert objects[2]["nDiaSources"] == 3
    # The move shows in object-id reads too.
    of_1 = apdb.get_sources(None, 60010.0, object_ids=[1], columns=["diaSourceId"]).column(0).to_pylist()
    assert sorted(of_1) == [_source_id(1, 2), _source_id(1, 3)]
    chunks = apdb.replica_chunks()
    assert chunks.num_rows == chunks_before + 1 and chunks.column("kind").to_pylist()[-1] == "update"


def test_reassign_sources_moves_counts(apdb):
    _night(apdb)
    apdb.reassign_sources({_source_id(3, 1): 4, _source_id(3, 2): 4}, time=60005.0)
    objects = _objects(apdb)
    assert objects[3]["nDiaSources"] == 1 and objects[4]["nDiaSources"] == 5
    of_4 = apdb.get_sources(None, 60010.0, object_ids=[4], columns=["diaSourceId"]).column(0).to_pylist()
    assert sorted(of_4) == sorted(
        [_source_id(4, v) for v in (1, 2, 3)] + [_source_id(3, 1), _source_id(3, 2)]
    )
    region = diadb.Circle(55.0, -30.0, 3.0)
    in_region = (
        apdb.get_sources(region, 60010.0, object_ids=[3], columns=["diaSourceId"]).column(0).to_pylist()
    )
    assert in_region == [_source_id(3, 3)]


def test_unknown_ids_raise_lookup_error_and_change_nothing(apdb):
    _night(apdb)
    before = (
        apdb.get_sources(EVERYWHERE, 60010.0),
        apdb.get_objects(EVERYWHERE),
        apdb.replica_chunks().num_rows,
    )
    with pytest.raises(LookupError, match="unknown DiaSource ids: \\[424242\\]"):
        apdb.reassign_to_ssobjects({_source_id(1, 1): 5, 424242: 6})
    with pytest.raises(LookupError, match="unknown DiaObject ids: \\[999\\]"):
        apdb.reassign_sources({_source_id(1, 1): 999})
    with pytest.raises(LookupError, match="unknown DiaObject ids: \\[31337\\]"):
        apdb.set_validity_end([1, 31337], 60005.0)
    after = (
        apdb.get_sources(EVERYWHERE, 60010.0),
        apdb.get_objects(EVERYWHERE),
        apdb.replica_chunks().num_rows,
    )
    assert before[0].equals(after[0]) and before[1].equals(after[1]) and before[2] == after[2]


def test_set_validity_end_and_dedup_queries(apdb):
    _night(apdb)
    assert apdb.count_unassociated_objects() == 1  # object 21
    assert apdb.set_validity_end([5, 6], 60005.0) == 2
    assert apdb.set_validity_end([5], 60006.0) == 0  # already closed
    objects = _objects(apdb)
    assert 5 not in objects and 6 not in objects and len(objects) == N - 1
    recent = apdb.get_objects_for_dedup(60003.0, columns=["diaObjectId", "validityStartMjdTai"])
    assert sorted(recent.column("diaObjectId").to_pylist()) == sorted(set(range(1, N + 2)) - {5, 6})
    assert apdb.get_objects_for_dedup(60100.0).num_rows == 0


def test_withdraw_sources(apdb):
    _night(apdb)
    before = _sources(apdb)[_source_id(7, 2)]["timeWithdrawnMjdTai"]
    apdb.withdraw_sources([_source_id(7, 1)], time=60006.0)
    assert _sources(apdb)[_source_id(7, 1)]["timeWithdrawnMjdTai"] == 60006.0
    assert _sources(apdb)[_source_id(7, 2)]["timeWithdrawnMjdTai"] == before


def test_change_log_chunks_hold_what_each_store_wrote(apdb):
    _night(apdb)
    chunks = apdb.replica_chunks()
    assert chunks.column("kind").to_pylist() == ["store"] * 3
    assert chunks.column("visit").to_pylist() == [1, 2, 3]
    ids = chunks.column("chunk_id").to_pylist()
    assert ids == sorted(ids)
    got = apdb.read_chunks(ids[1:2])
    assert got["DiaSource"].num_rows == N and set(got["DiaSource"].column("visit").to_pylist()) == {2}
    assert got["DiaForcedSource"].num_rows == N
    assert got["DiaObject"].num_rows == N
    assert set(got["DiaObject"].column("validityStartMjdTai").to_pylist()) == {60002.0}
    assert got["DiaSource"].column_names[0] == "_chunk_id"
    assert got["DiaSource"].schema.field("psfFlux").type == pa.float32()
    apdb.reassign_sources({_source_id(3, 1): 4})
    update = apdb.replica_chunks(published=False).column("chunk_id").to_pylist()[-1]
    records = apdb.read_chunks([update])["updates"]
    assert records.num_rows == 1 and "reassign_sources" in records.column("kind").to_pylist()
    apdb.mark_published(ids[:2])
    assert apdb.replica_chunks(published=True).column("chunk_id").to_pylist() == ids[:2]
    assert apdb.replica_chunks(published=False).num_rows == 2
