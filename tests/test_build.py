"""The history builder (``diadb build``, ``Apdb.load_history``): a built database holds exactly
the rows that storing the same seed's visits one by one leaves, in diadb and in the reference."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import diadb
from diadb import Apdb
from diadb.sim.build import build_history, build_record, profile_config, visits_in_months
from diadb.sim.model import VisitSimulator

ALL_SKY = np.array([[0, 12 * 4**29]], dtype=np.int64)
MONTHS = 0.7  # 21 one-a-night visits: three 7-day spans, two of them compacted
PK = {
    "DiaObject": ["diaObjectId"],
    "DiaSource": ["diaSourceId"],
    "DiaForcedSource": ["diaObjectId", "visit", "detector"],
}


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys]).combine_chunks()


def _visit_by_visit(tmp_path: Path, *, reference: bool) -> tuple[Path, Path | None]:
    _, config = profile_config("ci", None)
    url = tmp_path / "stored.db"
    ref = None
    with Apdb.create(url) as db:
        simulator = VisitSimulator(config, db.schema)
        if reference:
            from diadb.sim.reference import ReferenceApdb

            ref = ReferenceApdb(tmp_path / "stored-ref.db", months=12)
        for visit in simulator.visits(visits_in_months(config, MONTHS)):
            assert db.store(
                visit.mjd_tai, visit.objects, visit.sources, visit.forced_sources, visit=visit.visit
            )
            if ref is not None:
                ref.store(visit.mjd_tai, visit.objects, visit.sources, visit.forced_sources)
        assert db.compaction_error is None
    return url, None if ref is None else tmp_path / "stored-ref.db"


def _assert_same_diadb(built: Apdb, stored: Apdb) -> None:
    for table, keys in PK.items():
        mine, theirs = built.read_pixels(table, ALL_SKY), stored.read_pixels(table, ALL_SKY)  # type: ignore[arg-type]
        assert mine.num_rows == theirs.num_rows > 0, table
        assert _sorted(mine, keys).equals(_sorted(theirs, keys)), table
    # Every object version, with its validity interval and the chunk that wrote it.
    chunks = stored.replica_chunks()
    assert built.replica_chunks().drop(["stored_at"]).equals(chunks.drop(["stored_at"]))
    ids = chunks.column("chunk_id").to_pylist()
    mine_chunks, their_chunks = built.read_chunks(ids), stored.read_chunks(ids)
    for table, keys in (
        ("DiaObject", ["diaObjectId", "validityStartMjdTai"]),
        ("DiaSource", ["diaSourceId"]),
        ("DiaForcedSource", PK["DiaForcedSource"]),
    ):
        mine, theirs = mine_chunks[table], their_chunks[table]
        assert mine.num_rows == theirs.num_rows > 0, table
        assert _sorted(mine, keys).equals(_sorted(theirs, keys)), table
    versions = _sorted(mine_chunks["DiaObject"], ["diaObjectId", "validityStartMjdTai"])
    assert versions.column("validityEndMjdTai").null_count == built.read_pixels("DiaObject", ALL_SKY).num_rows
    # The same split between the engine and the history tier, and the same visit registry.
    # (The DiaObject snapshot is a cache of the latest-object table, refreshed by each
    # compaction: the built one was made at the last batch, the stored one at the last span's
    # close, so it may hold more objects; reads are the same, checked below.)
    rows = {k: v["rows"] for k, v in built.stats().items()}
    their_rows = {k: v["rows"] for k, v in stored.stats().items()}
    assert rows.pop("DiaObject (history)") >= their_rows.pop("DiaObject (history)") > 0
    assert rows == their_rows
    assert rows["DiaSource (history)"] > 0 and rows["DiaSource"] > 0
    assert built.latest_visit_mjd() == stored.latest_visit_mjd()
    visits = chunks.column("visit").to_pylist()
    assert all(built.contains_visit_detector(v) for v in visits)
    # And a read of a field, through the tier, gives the same table.
    field = diadb.Circle(55.0, -30.0, 1.75)
    when = stored.latest_visit_mjd()
    assert built.get_sources(field, when).equals(stored.get_sources(field, when))
    assert built.get_forced_sources(field, when).equals(stored.get_forced_sources(field, when))
    assert built.get_objects(field).equals(stored.get_objects(field))


def test_built_database_holds_the_stored_rows(tmp_path: Path) -> None:
    stored_url, _ = _visit_by_visit(tmp_path, reference=False)
    # Small batches: some rows go straight into segments, others through the engine and compaction.
    result = build_history(str(tmp_path / "built.db"), "ci", months=MONTHS, batch_rows=1500)
    assert result.batches > 2 and result.segments > 0
    assert result.visits == 21 and result.total_rows == sum(result.rows.values())
    with Apdb.open(tmp_path / "built.db") as built, Apdb.open(stored_url) as stored:
        _assert_same_diadb(built, stored)
        assert build_record(built)["visits"] == 21
        assert built.verify() == []


def test_one_batch_build_is_the_same(tmp_path: Path) -> None:
    stored_url, _ = _visit_by_visit(tmp_path, reference=False)
    build_history(str(tmp_path / "built.db"), "ci", months=MONTHS, batch_rows=10**9)
    with Apdb.open(tmp_path / "built.db") as built, Apdb.open(stored_url) as stored:
        _assert_same_diadb(built, stored)


def _dump(path: Path, table: str) -> tuple[list[str], list[tuple[object, ...]]]:
    with sqlite3.connect(path) as conn:
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info('{table}')")]
        keys = {
            "DiaObject": '"diaObjectId", "validityStartMjdTai"',
            "DiaObjectLast": '"diaObjectId"',
            "DiaSource": '"diaSourceId"',
            "DiaForcedSource": '"diaObjectId", "visit", "detector"',
        }[table]
        rows = conn.execute(f'SELECT * FROM "{table}" ORDER BY {keys}').fetchall()
    return columns, rows


def test_built_reference_holds_the_stored_rows(tmp_path: Path) -> None:
    pytest.importorskip("lsst.dax.apdb")
    _, stored_ref = _visit_by_visit(tmp_path, reference=True)
    assert stored_ref is not None
    built_ref = tmp_path / "built-ref.db"
    build_history(str(tmp_path / "built.db"), "ci", months=MONTHS, reference=built_ref, batch_rows=1500)
    for table in ("DiaObject", "DiaObjectLast", "DiaSource", "DiaForcedSource"):
        columns, rows = _dump(built_ref, table)
        their_columns, their_rows = _dump(stored_ref, table)
        assert columns == their_columns
        assert len(rows) == len(their_rows) > 0, table
        assert rows == their_rows, table
    with sqlite3.connect(built_ref) as conn:  # analysed, as the builder promises
        assert conn.execute("SELECT count(*) FROM sqlite_stat1").fetchone()[0] > 0


def _visit_tables(n: int, tmp_path: Path) -> tuple[Apdb, list[diadb.sim.visit.Visit]]:  # type: ignore[name-defined]
    _, config = profile_config("ci", None)
    db = Apdb.create(tmp_path / "x.db")
    return db, list(VisitSimulator(config, db.schema).visits(n))


def test_load_history_refuses_bad_batches(tmp_path: Path) -> None:
    db, visits = _visit_tables(3, tmp_path)
    with db:
        listing = {"visit": [v.visit for v in visits], "visit_time": [v.mjd_tai for v in visits]}
        objects = pa.concat_tables([v.objects for v in visits])
        sources = pa.concat_tables([v.sources for v in visits])
        forced = pa.concat_tables([v.forced_sources for v in visits])
        with pytest.raises(diadb.ConfigError, match="increase strictly"):
            db.load_history({**listing, "visit_time": listing["visit_time"][::-1]}, objects, sources)
        with pytest.raises(diadb.CatalogError, match="not the time of one of the batch's visits"):
            db.load_history({"visit": listing["visit"][:2], "visit_time": listing["visit_time"][:2]}, objects)
        with pytest.raises(diadb.CatalogError, match="visit"):
            db.load_history(
                {"visit": listing["visit"][:2], "visit_time": listing["visit_time"][:2]},
                pa.concat_tables([v.objects for v in visits[:2]]),
                sources,
            )
        closed = objects.set_column(
            objects.schema.get_field_index("validityEndMjdTai"),
            "validityEndMjdTai",
            pa.array(np.full(objects.num_rows, 60000.5)),
        )
        with pytest.raises(diadb.CatalogError, match="validityEndMjdTai"):
            db.load_history(listing, closed, sources, forced)
        assert db.latest_visit_mjd() is None  # nothing written by any of them
        loaded = db.load_history(listing, objects, sources, forced)
        assert loaded["visits"] == 3 and loaded["DiaSource"] == sources.num_rows
        with pytest.raises(diadb.ConfigError, match="not after the newest stored visit"):
            db.load_history(listing, objects, sources, forced)
        # One by one afterwards is refused as already stored, like any repeated store.
        assert not db.store(visits[0].mjd_tai, visits[0].objects, visits[0].sources, visit=visits[0].visit)


def test_bench_goes_on_after_a_build(tmp_path: Path) -> None:
    pytest.importorskip("lsst.dax.apdb")
    from diadb.sim.bench import run_bench

    url = str(tmp_path / "built.db")
    build_history(url, "ci", months=MONTHS, reference=tmp_path / "built-ref.db", batch_rows=1500)
    with pytest.raises(diadb.ConfigError, match="was built with"):
        run_bench("ci", tmp_path / "wrong", after=url, scale=0.02, visits=1)
    result = run_bench("ci", tmp_path / "bench", after=url, compare=("dax_apdb",), visits=2)
    visits = sorted(set(result.metrics.column("visit").to_pylist()))
    assert visits == [22, 23]  # the visits after the 21 built ones
    check = result.summary["id_checks"]["dax_apdb"]
    assert check["visits"] == 2 and not any(check["missing"].values())  # the same stream in both
    # Both sides read history at depth: the built rows are there.
    depth = result.summary["rows_per_visit_at_depth"]
    assert depth["DiaSource"] > 300 and depth["DiaForcedSource"] > 100
    floor = result.summary["floor"]
    assert set(floor) == {"DiaObject", "DiaSource", "DiaForcedSource"}
    for f in floor.values():
        last = f["last"]
        assert last["ram_s"] > 0 and last["result_bytes"] > 0 and last["diadb_s"] > 0
        assert last["mapped_bytes"] > 0 and last["mapped_s"] > 0
        assert f["reads"] == 2
    assert "Distance to the floor" in result.summary_path.read_text()


@pytest.mark.parametrize("backend", ["sqlite-segments", "sqlite-engine-only", "postgresql"])
def test_load_history_matches_stores_on(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """1-day spans with no lag (most rows straight into segments), no tier, and an engine with no
    bulk path (PostgreSQL: the visits are stored one by one): the same rows as stores."""
    from tests.conftest import CREATE_OPTIONS, make_url

    _, config = profile_config("ci", None)
    options = CREATE_OPTIONS.get(backend, {})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    stored = Apdb.create(make_url(backend, tmp_path / "a", request), **options)
    loaded = Apdb.create(make_url(backend, tmp_path / "b", request), **options)
    with stored, loaded:
        visits = list(VisitSimulator(config, stored.schema).visits(6))
        for v in visits:
            stored.store(v.mjd_tai, v.objects, v.sources, v.forced_sources, visit=v.visit)
        for part in (visits[:4], visits[4:]):
            loaded.load_history(
                {"visit": [v.visit for v in part], "visit_time": [v.mjd_tai for v in part]},
                pa.concat_tables([v.objects for v in part]),
                pa.concat_tables([v.sources for v in part]),
                pa.concat_tables([v.forced_sources for v in part]),
            )
        for table, keys in PK.items():
            mine, theirs = loaded.read_pixels(table, ALL_SKY), stored.read_pixels(table, ALL_SKY)  # type: ignore[arg-type]
            assert mine.num_rows == theirs.num_rows > 0, table
            assert _sorted(mine, keys).equals(_sorted(theirs, keys)), table
        ids = stored.replica_chunks().column("chunk_id").to_pylist()
        assert loaded.replica_chunks().column("visit").to_pylist() == [v.visit for v in visits]
        keys = ["diaObjectId", "validityStartMjdTai"]
        mine_versions = _sorted(
            loaded.read_chunks(loaded.replica_chunks().column("chunk_id").to_pylist())["DiaObject"], keys
        )
        their_versions = _sorted(stored.read_chunks(ids)["DiaObject"], keys)
        assert mine_versions.drop(["_chunk_id"]).equals(their_versions.drop(["_chunk_id"]))
        if backend == "sqlite-segments":
            assert {k: v["rows"] for k, v in loaded.stats().items() if "DiaObject" not in k} == {
                k: v["rows"] for k, v in stored.stats().items() if "DiaObject" not in k
            }
