"""PPDB publication as HATS catalogs: export, LSDB compatibility, region extracts, verify, restore,
incremental export (issue 6)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import diadb
from diadb.cli import app
from diadb.errors import BackendUnavailable, StorageError
from diadb.ppdb.hats_export import ExportOptions, export_hats
from diadb.ppdb.layout import TABLES, Manifest, PublicationError, catalog_dir, checksum, index_dir, margin_dir
from diadb.ppdb.partition import Pixel, histogram, plan_partitions
from diadb.ppdb.restore import restore_export
from diadb.ppdb.verify import verify_export
from diadb.schema import ApdbSchema
from diadb.sky.healpix import NPIX_29
from tests.helpers import make_visit, random_positions, sliding_visits
from tests.test_history import SEGMENTS

pytest.importorskip("lsdb")
# LSDB and nested-pandas call pandas APIs that pandas 3.1 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
    pytest.mark.filterwarnings("ignore::FutureWarning:lsdb.*"),
]

FULL_SKY = np.array([[0, NPIX_29]], dtype=np.int64)
SMALL = ExportOptions(max_rows={"DiaObject": 60, "DiaSource": 150, "DiaForcedSource": 150})
PK = {"DiaObject": ["diaObjectId"], "DiaSource": ["diaSourceId"], "DiaForcedSource": ["diaObjectId", "visit"]}


def _store_visits(db: diadb.Apdb, schema: ApdbSchema, visits: range) -> None:
    """Objects 1..300 around (55, -30), each visit re-observing a sliding subset (new versions)."""
    for visit in sliding_visits(schema, visits):
        db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=visit.visit)


def _all_rows(db: diadb.Apdb, table: str) -> pa.Table:
    rows = db.read_pixels(table, FULL_SKY)  # type: ignore[arg-type]
    return rows.sort_by([(c, "ascending") for c in PK[table]])


def _export_rows(root: Path, table: str) -> pa.Table:
    files = sorted(str(p) for p in (catalog_dir(root, table) / "dataset").rglob("Npix=*.parquet"))
    import pyarrow.dataset as pds

    return pds.dataset(files, format="parquet").to_table().sort_by([(c, "ascending") for c in PK[table]])


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory, official_schema: ApdbSchema) -> Iterator[diadb.Apdb]:
    path = tmp_path_factory.mktemp("ppdb") / "apdb.db"
    # 1-day history segments: the export reads both the engine and the segments.
    db = diadb.Apdb.create(path, schema=official_schema, **SEGMENTS)
    _store_visits(db, official_schema, range(1, 6))
    yield db
    db.close()


@pytest.fixture(scope="module")
def exported(source_db: diadb.Apdb, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "ppdb"
    export_hats(source_db, out, options=SMALL, mark_published=False)
    return out


def test_plan_partitions_is_adaptive() -> None:
    rng = np.random.default_rng(1)
    dense = rng.integers(0, 4**25, 5000)  # all inside order-2 pixel 0
    sparse = rng.integers(0, NPIX_29, 200)
    pixels, counts = histogram(np.concatenate([dense, sparse]))
    plan = plan_partitions(pixels, counts, max_rows=500)
    assert sum(n for _, n in plan) == 5200
    assert all(n <= 500 for _, n in plan)
    assert len({p.order for p, _ in plan}) > 1  # deep where dense, shallow where sparse
    ranges = np.array([p.range29() for p, _ in plan])
    assert np.all(ranges[1:, 0] >= ranges[:-1, 1])  # disjoint
    assert Pixel(2, 5).relative_path() == "Norder=2/Dir=0/Npix=5.parquet"
    assert Pixel(8, 123456).dir == 120000


def test_export_is_a_valid_hats_catalog(source_db: diadb.Apdb, exported: Path) -> None:
    from hats.io.validation import is_valid_catalog

    for table in TABLES:
        for directory in (
            catalog_dir(exported, table),
            margin_dir(exported, table),
            index_dir(exported, table),
        ):
            assert is_valid_catalog(directory, strict=True, fail_fast=False), directory
        rows = _export_rows(exported, table)
        assert rows.equals(_all_rows(source_db, table).cast(rows.schema)), table
        files = sorted((catalog_dir(exported, table) / "dataset").rglob("Npix=*.parquet"))
        assert len(files) > 1
        for f in files:
            hp = pq.read_table(f, columns=["_healpix_29"]).column(0).to_numpy()
            assert np.all(hp[1:] >= hp[:-1])
    orders = {p.parent.parent.name for p in (catalog_dir(exported, "DiaSource") / "dataset").rglob("Npix=*")}
    assert len(orders) > 1, "partition orders follow the row counts"
    common = pq.read_schema(catalog_dir(exported, "DiaSource") / "dataset" / "_common_metadata")
    felis = source_db.schema.table("DiaSource").arrow_schema()
    assert common.names == felis.names
    assert common.field("psfFlux").metadata[b"unit"] == felis.field("psfFlux").metadata[b"unit"]
    assert b"ucd" in common.field("ra").metadata
    assert not common.field("diaSourceId").nullable
    assert (exported / "DiaSource" / "collection.properties").is_file()
    assert (catalog_dir(exported, "DiaSource") / "skymap.fits").is_file()


def test_lsdb_cone_search_and_crossmatch(source_db: diadb.Apdb, exported: Path) -> None:
    import lsdb

    objects = lsdb.open_catalog(exported / "DiaObject")
    sources = lsdb.open_catalog(exported / "DiaSource")
    assert objects.margin is not None
    found = objects.cone_search(55.3, -30.2, 0.6 * 3600.0).compute()
    expected = source_db.get_objects("circle 55.3 -30.2 0.6")
    assert sorted(found["diaObjectId"].tolist()) == sorted(expected.column("diaObjectId").to_pylist())
    assert len(found) > 10
    matched = sources.crossmatch(
        objects, radius_arcsec=0.5, n_neighbors=1, suffixes=("_src", "_obj"), suffix_method="all_columns"
    ).compute()
    db_sources = _all_rows(source_db, "DiaSource")
    # Every DiaSource sits on its object's position here: the crossmatch finds exactly that object.
    assert len(matched) == db_sources.num_rows
    assert (matched["diaObjectId_src"] == matched["diaObjectId_obj"]).all()
    light_curve = sources.id_search(values={"diaObjectId": 150}).compute()
    assert sorted(light_curve["diaSourceId"].tolist()) == sorted(
        db_sources.filter(pc.equal(db_sources["diaObjectId"], 150)).column("diaSourceId").to_pylist()
    )


def test_region_extract(source_db: diadb.Apdb, tmp_path: Path) -> None:
    from hats.io.validation import is_valid_catalog

    out = tmp_path / "extract"
    text = "circle 55 -30 0.5"
    export_hats(source_db, out, region=text, options=SMALL)
    region = diadb.sky.regions.parse_region(text)
    for table in TABLES:
        assert is_valid_catalog(catalog_dir(out, table), strict=True)
        everything = _all_rows(source_db, table)
        inside = region.contains(everything["ra"].to_numpy(), everything["dec"].to_numpy())
        got = _export_rows(out, table)
        assert got.num_rows == int(inside.sum()) > 0
        assert got.equals(everything.filter(pa.array(inside)).cast(got.schema))
    assert verify_export(out).ok
    # An extract is not updated with another region.
    with pytest.raises(PublicationError, match="region"):
        export_hats(source_db, out, region="circle 56 -30 0.5")


def test_verify_reports_damage(exported: Path, tmp_path: Path) -> None:
    report = verify_export(exported)
    assert report.ok, report.problems
    assert report.rows["DiaObject"] > 0
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    victim = sorted((catalog_dir(damaged, "DiaSource") / "dataset").rglob("Npix=*.parquet"))[0]
    # Rewrite one file with a column of the wrong type and a null in a non-nullable column.
    data = pq.read_table(victim)
    i = data.schema.get_field_index("visit")
    data = data.set_column(i, pa.field("visit", pa.int32()), pa.array([None] * data.num_rows, pa.int32()))
    pq.write_table(data, victim)
    (catalog_dir(damaged, "DiaObject") / "partition_info.csv").unlink()
    report = verify_export(damaged)
    text = "\n".join(report.problems)
    assert not report.ok
    assert "checksum" in text or "bytes" in text
    assert "column visit: type int32" in text
    assert "null" in text
    assert "partition_info.csv: missing" in text


def test_cli_export_verify_restore(source_db: diadb.Apdb, exported: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(exported)])
    assert ok.exit_code == 0, ok.output
    assert "ok:" in ok.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    for args in (["verify", str(foreign)], ["restore", str(foreign), str(tmp_path / "new.db")]):
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2
        assert bad.output.count("\n") == 1 and "not a diadb PPDB export" in bad.output
    assert not (tmp_path / "new.db").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    next((catalog_dir(damaged, "DiaObject") / "dataset").rglob("Npix=*.parquet")).write_bytes(b"junk")
    assert runner.invoke(app, ["verify", str(damaged)]).exit_code == 1
    bad = runner.invoke(app, ["restore", str(damaged), str(tmp_path / "new.db")])
    assert bad.exit_code == 2 and "damaged" in bad.output
    assert not (tmp_path / "new.db").exists()
    out = tmp_path / "cli-export"
    result = runner.invoke(
        app, ["export", source_db.url, str(out), "--region", "circle 55 -30 0.7", "--max-rows", "100"]
    )
    assert result.exit_code == 0, result.output
    assert "full export" in result.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


def test_restore_gives_every_row_back(source_db: diadb.Apdb, exported: Path, tmp_path: Path) -> None:
    url = str(tmp_path / "restored.db")
    result = restore_export(exported, url)
    assert result.visits == 5
    with diadb.Apdb.open(url) as db:
        for table in TABLES:
            assert _all_rows(db, table).equals(_all_rows(source_db, table)), table
        assert db.contains_visit_detector(3)
        region = "circle 55 -30 0.8"
        assert db.get_sources(region, 60010.0).equals(source_db.get_sources(region, 60010.0))


@pytest.mark.parametrize("runner", ["serial", "dask"])
def test_incremental_export_equals_full(official_schema: ApdbSchema, tmp_path: Path, runner: str) -> None:
    db = diadb.Apdb.create(tmp_path / "apdb.db", schema=official_schema)
    _store_visits(db, official_schema, range(1, 4))
    inc = tmp_path / "incremental"
    first = export_hats(db, inc, options=SMALL)
    assert not first.incremental and first.last_chunk_id is not None
    assert not len(db.replica_chunks(published=False))
    # New visits (new objects, new versions), a far-away field, and daytime updates.
    _store_visits(db, official_schema, range(4, 7))
    far = make_visit(
        official_schema,
        50,
        60030.0,
        np.arange(900, 940),
        *random_positions(40, 3, ra0=120.0),
        n_dia_sources=np.ones(40),
    )
    db.store(far.mjd, far.objects, far.sources, far.forced, visit=50)
    db.reassign_sources({50 * 100_000 + 1: 60}, time=60031.0)
    db.set_validity_end([270], 60031.5)
    with contextlib.ExitStack() as stack:
        update = SMALL
        if runner == "dask":
            # The update's partitions and margins on Dask workers (threads of an in-process cluster).
            distributed = pytest.importorskip("dask.distributed")
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
                )
            )
            update = dataclasses.replace(SMALL, scheduler=cluster.scheduler_address)
        second = export_hats(db, inc, options=update)
    assert second.incremental and second.chunks_applied == 6
    assert second.rewritten_partitions > 0
    full = tmp_path / "full"
    export_hats(db, full, options=SMALL, mark_published=False)
    for table in TABLES:
        a, b = _export_rows(inc, table), _export_rows(full, table)
        assert a.equals(b), table
        assert a.equals(_all_rows(db, table).cast(a.schema)), table
    assert 270 not in _export_rows(inc, "DiaObject").column("diaObjectId").to_pylist()
    assert verify_export(inc).ok, verify_export(inc).problems
    # Nothing new: nothing rewritten.
    third = export_hats(db, inc, options=SMALL)
    assert third.chunks_applied == 0 and third.rewritten_partitions == 0
    import lsdb

    cone = lsdb.open_catalog(inc / "DiaObject").cone_search(120.0, -30.0, 3600.0).compute()
    expected = db.get_objects("circle 120 -30 1").column("diaObjectId").to_pylist()
    assert sorted(cone["diaObjectId"].tolist()) == sorted(expected)
    assert len(expected) > 20
    db.close()


def test_an_export_of_an_empty_database_is_updated_incrementally(
    official_schema: ApdbSchema, tmp_path: Path
) -> None:
    """An export made before any change-log chunk existed takes every chunk on its update."""
    db = diadb.Apdb.create(tmp_path / "apdb.db", schema=official_schema)
    out = tmp_path / "ppdb"
    first = export_hats(db, out, options=SMALL)
    assert not first.incremental and first.last_chunk_id is None
    assert all(s["rows"] == 0 for s in first.tables.values())
    _store_visits(db, official_schema, range(1, 3))
    second = export_hats(db, out, options=SMALL)
    assert second.incremental and second.chunks_applied == 2
    for table in TABLES:
        assert _export_rows(out, table).equals(_all_rows(db, table).cast(_export_rows(out, table).schema))
    assert verify_export(out).ok, verify_export(out).problems
    db.close()


def test_restore_streams_in_time_batches(
    source_db: diadb.Apdb, exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tiny budget: every visit its own batch, read back from the scratch files; every row back.
    scratch = tmp_path / "scratch"
    url = str(tmp_path / "batched.db")
    result = restore_export(exported, url, batch_bytes=1, scratch=scratch)
    assert result.visits == 5 and result.batches == 5
    assert not any(scratch.iterdir()), "scratch files are removed"
    with diadb.Apdb.open(url) as db:
        for table in TABLES:
            assert _all_rows(db, table).equals(_all_rows(source_db, table)), table
    # A store failing part way (a full disk, say): nothing of the new database is kept.
    calls = {"n": 0}
    real_store = diadb.Apdb.store

    def failing_store(self: diadb.Apdb, *args: object, **kwargs: object) -> bool:
        calls["n"] += 1
        if calls["n"] == 3:
            raise StorageError("disk full")
        return real_store(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(diadb.Apdb, "store", failing_store)
    target = tmp_path / "new" / "dir" / "failed.db"
    with pytest.raises(PublicationError, match="nothing kept: disk full"):
        restore_export(exported, str(target), batch_bytes=1)
    assert calls["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["scratch", "batched.db", "batched.db.history", *(p.name for p in tmp_path.glob("batched.db-*"))]
    )


def _damage(kind: str, root: Path) -> None:
    """One kind of damage to the export at ``root``."""
    manifest = Manifest.read(root)
    first = sorted((catalog_dir(root, "DiaSource") / "dataset").rglob("Npix=*.parquet"))[0]
    if kind == "truncated":
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    elif kind == "no-properties":
        (catalog_dir(root, "DiaSource") / "hats.properties").unlink()
    elif kind == "checksum":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte changed
        first.write_bytes(bytes(data))
    elif kind == "other-schema":
        # A DiaForcedSource file in DiaSource's place, with a matching manifest entry: only the
        # schema tells.
        other = sorted((catalog_dir(root, "DiaForcedSource") / "dataset").rglob("Npix=*.parquet"))[0]
        shutil.copyfile(other, first)
        rel = str(first.relative_to(root))
        manifest.files[rel] = {"bytes": first.stat().st_size, "blake2b": checksum(first)}
        manifest.write(root)
    elif kind == "bad-manifest":
        (root / "diadb_export.json").write_text('{"format": "diadb-ppdb-hats", "files": [')
    elif kind == "foreign":
        shutil.rmtree(root)
        (root / "data" / "x").mkdir(parents=True)
        (root / "data" / "x" / "part.parquet").write_bytes(b"PAR1")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "no-properties", "checksum", "other-schema", "bad-manifest", "foreign"]
)
def test_damaged_export_is_a_clear_error(exported: Path, tmp_path: Path, kind: str) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    _damage(kind, damaged)
    runner = CliRunner()
    checked = runner.invoke(app, ["verify", str(damaged)])
    assert checked.exit_code in (1, 2), checked.output
    assert checked.exception is None or isinstance(checked.exception, SystemExit), checked.exception
    assert "Traceback" not in checked.output
    if kind == "other-schema":
        assert "columns differ from the Felis schema" in checked.output
    target = tmp_path / "restored.db"
    restored = runner.invoke(app, ["restore", str(damaged), str(target)])
    assert restored.exit_code == 2, restored.output
    assert restored.output.count("\n") == 1 and restored.output.startswith("error: "), restored.output
    assert not list(tmp_path.glob("restored.db*")), "restore wrote nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"], "no scratch left behind"


def test_verify_a_stray_file_is_one_line(tmp_path: Path) -> None:
    stray = tmp_path / "notes.parquet"
    stray.write_bytes(b"PAR1 not really")
    result = CliRunner().invoke(app, ["verify", str(stray)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "neither a PPDB export directory nor a SQLite database" in result.output


def test_dask_export_equals_serial(source_db: diadb.Apdb, exported: Path, tmp_path: Path) -> None:
    pytest.importorskip("dask")
    out = tmp_path / "dask"
    result = export_hats(source_db, out, options=dataclasses.replace(SMALL, workers=2), mark_published=False)
    assert not result.incremental
    serial, parallel = Manifest.read(exported), Manifest.read(out)
    assert parallel.tables == serial.tables

    def data_files(m: Manifest) -> dict[str, str]:
        return {k: v["blake2b"] for k, v in m.files.items() if k.endswith((".parquet", "_metadata"))}

    # Byte for byte the same data, margin, index and metadata files.
    assert data_files(parallel) == data_files(serial)
    assert len(data_files(serial)) > 20
    assert verify_export(out).ok


def test_parallel_export_without_dask(
    source_db: diadb.Apdb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "dask", None)  # "import dask" now fails
    with pytest.raises(BackendUnavailable, match=r"diadb\[dask\]"):
        export_hats(source_db, tmp_path / "out", options=dataclasses.replace(SMALL, workers=2))
    assert not (tmp_path / "out").exists(), "a failed export leaves no partial directory"
    # Serially, without Dask, as before.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_hats(source_db, empty, options=SMALL, mark_published=False).tables["DiaSource"]["rows"] > 0


def test_dask_distributed_export_equals_serial(source_db: diadb.Apdb, exported: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("dask.distributed")
    out = tmp_path / "distributed"
    # An in-process cluster (threads): the workers open the database by URL, as remote ones would.
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        opts = dataclasses.replace(SMALL, scheduler=cluster.scheduler_address)
        export_hats(source_db, out, options=opts, mark_published=False)
    serial, parallel = Manifest.read(exported), Manifest.read(out)
    assert {k: v["blake2b"] for k, v in parallel.files.items() if k.endswith(".parquet")} == {
        k: v["blake2b"] for k, v in serial.files.items() if k.endswith(".parquet")
    }
