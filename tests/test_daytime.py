"""Daytime operations and the change log, on every backend (and on rows already in history segments)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import diadb
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)
N = 20


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
        apdb.store(visit.mjd, objects, _unwithdrawn(visit.sources), _unwithdrawn(visit.forced), visit=v)


def _unwithdrawn(rows: pa.Table) -> pa.Table:
    """``rows`` not withdrawn (the filler draws random withdrawal times)."""
    i = rows.schema.get_field_index("timeWithdrawnMjdTai")
    return rows.set_column(i, rows.schema.field(i), pa.nulls(rows.num_rows, pa.float64()))


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


def _updates(apdb: diadb.Apdb) -> list[dict[str, object]]:
    """The update records of the newest chunk."""
    import json

    last = apdb.replica_chunks().column("chunk_id").to_pylist()[-1]
    records = apdb.read_chunks([last])["updates"]
    return [json.loads(p) for p in records.column("payload").to_pylist()]


def test_user_metadata_set_delete_and_protected_keys(apdb):
    assert apdb.user_metadata() == {}  # diadb's (and the engine's) own keys are not shown
    apdb.set_user_metadata({"a": "1", "b": "2"})
    apdb.set_user_metadata({"a": None, "b": "3", "c": "4"})
    assert apdb.user_metadata() == {"b": "3", "c": "4"}
    for key in ("diadb.config", "felis.schema_yaml"):
        with pytest.raises(diadb.ConfigError, match="diadb's own"):
            apdb.set_user_metadata({key: None, "d": "5"})
    assert apdb.user_metadata() == {"b": "3", "c": "4"}  # a refused call changes nothing
    reopened = diadb.Apdb.open(apdb.url)
    try:
        assert reopened.user_metadata() == {"b": "3", "c": "4"}
    finally:
        reopened.close()


def _forced(apdb: diadb.Apdb) -> dict[tuple[int, int, int], dict[str, object]]:
    t = apdb.get_forced_sources(EVERYWHERE, 60010.0)
    return {(r["diaObjectId"], r["visit"], r["detector"]): r for r in t.to_pylist()}


def test_withdraw_forced_sources_keeps_the_first_time(apdb):
    _night(apdb)
    apdb.withdraw_forced_sources([(1, 1, 0), (2, 3, 0)], time=60006.0, update_time=60007.0)
    rows = _updates(apdb)[0]
    assert rows["when_mjd_tai"] == 60007.0
    logged = {(r["diaObjectId"], r["visit"]): r for r in rows["rows"]}
    assert set(logged) == {(1, 1), (2, 3)}
    assert logged[(1, 1)]["midpointMjdTai"] == 60000.0 and logged[(1, 1)]["timeWithdrawnMjdTai"] == 60006.0
    assert np.isfinite(logged[(1, 1)]["ra"]) and np.isfinite(logged[(1, 1)]["dec"])
    apdb.withdraw_forced_sources([(1, 1, 0), (3, 2, 0)], time=60008.0)  # (1, 1, 0) again: unchanged
    assert [(r["diaObjectId"], r["visit"]) for r in _updates(apdb)[0]["rows"]] == [(3, 2)]
    forced = _forced(apdb)
    assert forced[(1, 1, 0)]["timeWithdrawnMjdTai"] == 60006.0
    assert forced[(2, 3, 0)]["timeWithdrawnMjdTai"] == 60006.0
    assert forced[(3, 2, 0)]["timeWithdrawnMjdTai"] == 60008.0
    assert forced[(3, 1, 0)]["timeWithdrawnMjdTai"] is None
    chunks = apdb.replica_chunks().num_rows
    with pytest.raises(LookupError, match="unknown DiaForcedSource keys"):
        apdb.withdraw_forced_sources([(4, 1, 0), (4, 1, 99)], time=60009.0)
    assert (
        _forced(apdb)[(4, 1, 0)]["timeWithdrawnMjdTai"] is None and apdb.replica_chunks().num_rows == chunks
    )


def test_withdraw_sources_keeps_the_first_time_and_logs_positions(apdb):
    _night(apdb)
    apdb.withdraw_sources([_source_id(7, 1)], time=60006.0)
    apdb.withdraw_sources([_source_id(7, 1), _source_id(8, 1)], time=60007.0)
    src = _sources(apdb)
    assert src[_source_id(7, 1)]["timeWithdrawnMjdTai"] == 60006.0
    assert src[_source_id(8, 1)]["timeWithdrawnMjdTai"] == 60007.0
    (record,) = _updates(apdb)
    (row,) = record["rows"]
    assert row["diaSourceId"] == _source_id(8, 1) and row["midpointMjdTai"] == 60000.0
    assert row["ra"] == src[_source_id(8, 1)]["ra"] and row["dec"] == src[_source_id(8, 1)]["dec"]


def test_reassign_sources_increment_decrement_switches(apdb):
    _night(apdb)
    apdb.reassign_sources({_source_id(3, 1): 4}, time=60005.0, increment=False, decrement=False)
    objects = _objects(apdb)
    assert objects[3]["nDiaSources"] == 3 and objects[4]["nDiaSources"] == 3
    assert "objects" not in _updates(apdb)[0]
    apdb.reassign_sources({_source_id(3, 2): 4}, time=60005.0, increment=True, decrement=False)
    assert _objects(apdb)[3]["nDiaSources"] == 3 and _objects(apdb)[4]["nDiaSources"] == 4
    apdb.reassign_sources({_source_id(3, 3): 4}, time=60005.0)
    objects = _objects(apdb)
    assert objects[3]["nDiaSources"] == 2 and objects[4]["nDiaSources"] == 5
    counts = {o["diaObjectId"]: o for o in _updates(apdb)[0]["objects"]}
    assert {k: v["nDiaSources"] for k, v in counts.items()} == {3: 2, 4: 5}
    assert counts[4]["ra"] == objects[4]["ra"] and counts[4]["dec"] == objects[4]["dec"]


def test_set_validity_end_missing_ok_and_positions(apdb):
    _night(apdb)
    with pytest.raises(LookupError):
        apdb.set_validity_end([5, 424242], 60005.0)
    assert apdb.set_validity_end([5, 424242], 60005.0, missing_ok=True) == 1
    (record,) = _updates(apdb)
    (closed,) = record["objects"]
    assert closed["diaObjectId"] == 5 and np.isfinite(closed["ra"]) and np.isfinite(closed["dec"])


def test_log_updates_records_foreign_records(apdb):
    _night(apdb)
    payloads = [{"update_order": 0, "record": "x"}, {"update_order": 1, "record": "y"}]
    chunk = apdb.log_updates("elsewhere", payloads, 60005.0)
    assert apdb.replica_chunks().column("chunk_id").to_pylist()[-1] == chunk
    updates = apdb.read_chunks([chunk])["updates"]
    assert updates.column("kind").to_pylist() == ["elsewhere", "elsewhere"]
    assert _updates(apdb) == payloads
    with pytest.raises(diadb.ConfigError):
        apdb.log_updates("withdraw_sources", payloads, 60005.0)


def test_explicit_read_window(apdb):
    _night(apdb)  # sources at 60000, 60002, 60004

    def visits(**kw: object) -> list[int]:
        t = apdb.get_sources(EVERYWHERE, 60010.0, columns=["visit"], **kw)
        return sorted(set(t.column(0).to_pylist()))

    assert visits(start=60002.0) == [3]
    assert visits(start=60002.0, start_inclusive=True) == [2, 3]
    assert visits(start=float("-inf"), end=60002.0) == [1, 2]
    assert visits(start=60000.0, start_inclusive=True, end=float("inf")) == [1, 2, 3]
    forced = apdb.get_forced_sources(None, 0.0, object_ids=[1], start=60001.0, end=float("inf"))
    assert sorted(forced.column("visit").to_pylist()) == [2, 3]


def test_keyed_stores_append_and_chunks_list_their_rows(apdb):
    """Stores of one visit/detector under different keys all append; the same key is a no-op."""
    ra, dec = random_positions(6, 7)
    parts = [
        make_visit(apdb.schema, 9, 60000.0 + day, np.arange(1, 4) + 10 * i, ra[3 * (i % 2) :][:3], dec[:3])
        for i, day in enumerate((0.0, 2.0, 4.0))
    ]
    for i, part in enumerate(parts):
        # Same visit and detector each time; distinct rows (ids differ).
        assert apdb.store(part.mjd, part.objects, part.sources, part.forced, visit=9, detector=0, key=f"k{i}")
    assert not apdb.store(parts[0].mjd, parts[0].objects, parts[0].sources, visit=9, detector=0, key="k0")
    assert not apdb.store(parts[0].mjd, parts[0].objects, parts[0].sources, visit=9, detector=0)
    assert apdb.contains_visit_detector(9, 0)
    assert apdb.get_sources(EVERYWHERE, 60010.0).num_rows == 9
    chunks = apdb.replica_chunks().column("chunk_id").to_pylist()
    assert len(chunks) == 3
    for chunk, part in zip(chunks, parts, strict=True):
        got = apdb.read_chunks([chunk])
        ids = sorted(got["DiaSource"].column("diaSourceId").to_pylist())
        assert ids == sorted(part.sources.column("diaSourceId").to_pylist())
        assert got["DiaForcedSource"].num_rows == 3 and got["DiaObject"].num_rows == 3
