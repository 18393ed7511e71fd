"""Metrics: every public ``diadb.Apdb`` call measured (wall, CPU, rows) once a sink listens, and
nothing measured before; the Prometheus sink; the facade's records in the reference's format,
read back by the reference's own ``apdb-cli metrics log-to-infux``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import diadb
from diadb import metrics
from diadb.schema import ApdbSchema
from tests.conftest import make_url
from tests.helpers import make_visit, random_positions


@pytest.fixture
def sink() -> Iterator[metrics.MemorySink]:
    kept = metrics.MemorySink()
    metrics.add_sink(kept)
    yield kept
    metrics.remove_sink(kept)


@pytest.fixture(params=["sqlite", "postgresql", "cassandra"])
def db(request: pytest.FixtureRequest, tmp_path: Path, official_schema: ApdbSchema) -> Iterator[diadb.Apdb]:
    url = make_url(str(request.param), tmp_path, request)
    with diadb.Apdb.create(url, schema=official_schema) as made:
        if made.location().scheme != "sqlite":
            made.create_time_partitions(60000.0, 60003.0)
        yield made


def _store(db: diadb.Apdb, schema: ApdbSchema, visit: int, n: int = 6) -> diadb.Apdb:
    ra, dec = random_positions(n, seed=visit)
    v = make_visit(schema, visit, 60000.5 + visit, np.arange(1, n + 1) + 100 * visit, ra, dec)
    db.store(v.mjd, v.objects, v.sources, v.forced, visit=visit)
    return db


def test_every_call_is_measured_once_a_sink_listens(
    db: diadb.Apdb, official_schema: ApdbSchema, sink: metrics.MemorySink
) -> None:
    _store(db, official_schema, 1)
    (store,) = sink.calls("store")
    v = make_visit(official_schema, 1, 60001.5, np.arange(101, 107), *random_positions(6, seed=1))
    assert store.ok and store.rows == v.objects.num_rows + v.sources.num_rows + v.forced.num_rows
    assert store.wall_s > 0 and store.cpu_s >= 0
    objects = db.get_objects("circle 0 0 180")
    sources = db.get_sources("circle 0 0 180", 60001.5)
    forced = db.get_forced_sources("circle 0 0 180", 60001.5)
    got = {m.call: m for m in sink.measurements}
    assert (got["get_objects"].table, got["get_objects"].rows) == ("DiaObject", objects.num_rows)
    assert (got["get_sources"].table, got["get_sources"].rows) == ("DiaSource", sources.num_rows)
    assert got["get_forced_sources"].rows == forced.num_rows > 0
    # A streaming read is measured piece by piece, as it is consumed.
    stream = db.read_batches("DiaSource", "circle 0 0 180", 60001.5, rows_per_batch=2)
    assert not sink.calls("read_batches")
    assert stream.read_all().num_rows == sources.num_rows
    pieces = sink.calls("read_batches")
    assert pieces and sum(m.rows for m in pieces) == sources.num_rows
    assert all(m.table == "DiaSource" and m.ok for m in pieces)
    ids = sources.column("diaSourceId").to_pylist()[:2]
    db.withdraw_sources(ids, time=60002.0)
    assert sink.calls("withdraw_sources")[0].rows == 2
    assert db.contains_visit_detector(1, 0)
    assert sink.calls("contains_visit_detector")[0].ok
    chunks = db.replica_chunks()
    assert sink.calls("replica_chunks")[0].rows == chunks.num_rows >= 1
    db.mark_published(chunks.column("chunk_id").to_pylist())
    assert sink.calls("mark_published")[0].rows == chunks.num_rows
    # A call that raises is measured as failed, with no rows.
    with pytest.raises(diadb.UnknownIdError):
        db.set_validity_end([987654321], 60002.0)
    (failed,) = sink.calls("set_validity_end")
    assert not failed.ok and failed.rows == 0


def test_compaction_prune_and_export_are_measured(
    tmp_path: Path, official_schema: ApdbSchema, sink: metrics.MemorySink
) -> None:
    with diadb.Apdb.create(str(tmp_path / "a.db"), schema=official_schema, history_auto_compact=False) as db:
        for visit in range(1, 10):
            _store(db, official_schema, visit)
        segments = db.compact()
        (compact,) = sink.calls("compact")
        assert compact.rows == sum(s.rows for s in segments) > 0
        report = db.prune(now=62000.0, dry_run=True)
        assert sink.calls("prune")[0].rows == sum(r["rows"] for r in report.values()) > 0
        pytest.importorskip("hats")
        from diadb.ppdb.hats_export import export_hats

        result = export_hats(db, tmp_path / "hats")
    (export,) = sink.calls("export")
    assert export.rows == sum(t["rows"] for t in result.tables.values()) > 0
    # The export read through Apdb.read_pixels, measured too.
    assert sink.calls("read_pixels")


def test_nothing_is_measured_without_a_sink(tmp_path: Path, official_schema: ApdbSchema) -> None:
    kept = metrics.MemorySink()
    metrics.add_sink(kept)
    metrics.remove_sink(kept)
    assert not metrics.enabled()
    with diadb.Apdb.create(str(tmp_path / "a.db"), schema=official_schema) as db:
        _store(db, official_schema, 1)
        assert db.get_objects("circle 0 0 180").num_rows == 6
    assert kept.measurements == []


def test_prometheus_sink(tmp_path: Path, official_schema: ApdbSchema) -> None:
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    sink = metrics.prometheus_sink(registry)
    metrics.add_sink(sink)
    try:
        with diadb.Apdb.create(str(tmp_path / "a.db"), schema=official_schema) as db:
            _store(db, official_schema, 1)
            for _ in range(3):
                n = db.get_objects("circle 0 0 180").num_rows
            with pytest.raises(diadb.ConfigError):
                db.get_objects("circle 0 0 -1")
    finally:
        metrics.remove_sink(sink)
    labels = {"call": "get_objects", "table": "DiaObject"}
    assert registry.get_sample_value("diadb_call_seconds_count", labels) == 4
    assert registry.get_sample_value("diadb_call_seconds_sum", labels) > 0
    assert registry.get_sample_value("diadb_call_rows_total", labels) == 3 * n
    assert registry.get_sample_value("diadb_call_errors_total", labels) == 1
    assert registry.get_sample_value("diadb_call_cpu_seconds_total", {"call": "store", "table": ""}) >= 0
    text = prom.generate_latest(registry).decode()
    assert 'diadb_call_seconds_bucket{call="store",le="+Inf",table=""} 1.0' in text


FACADE_SCRIPT = """
import logging, sys
import astropy.time
from lsst.dax.apdb import Apdb
from lsst.dax.apdb.tests.data_factory import makeObjectCatalog, makeSourceCatalog
from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d
from diadb.compat.dax import DiadbApdb

logging.basicConfig(filename=sys.argv[2], level=logging.WARNING, format="%(message)s")
logging.getLogger("lsst.dax.apdb.monitor").setLevel(logging.INFO)
config = DiadbApdb.init_database(f"sqlite:///{sys.argv[1]}/apdb.db", schema_file=sys.argv[3])
apdb = Apdb.from_config(config)
region = Circle(UnitVector3d(LonLat.fromDegrees(45.0, -30.0)), Angle.fromDegrees(0.05))
when = astropy.time.Time("2025-01-01T00:00:00", format="isot", scale="tai")
objects = makeObjectCatalog(region, 20)
apdb.store(when, objects, makeSourceCatalog(objects, when, visit=7, detector=3))
print(len(apdb.getDiaObjects(region)), len(apdb.getDiaSources(region, None, when)))
assert apdb.containsVisitDetector(7, 3)
"""


def test_facade_records_are_read_by_the_reference_cli(tmp_path: Path) -> None:
    """The facade's monitoring log, as the reference's ``LoggingMonHandler`` writes it, turned
    into InfluxDB lines by the reference's own command."""
    pytest.importorskip("lsst.dax.apdb")
    from tests.test_compat_dax import TEST_SCHEMA

    schema = tmp_path / "schema.yaml"
    schema.write_text(TEST_SCHEMA)
    log = tmp_path / "metrics.log"
    env = {**os.environ, "DAX_APDB_MONITOR_CONFIG": "logging:lsst.dax.apdb.monitor"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FACADE_SCRIPT), str(tmp_path), str(log), str(schema)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    n_objects, n_sources = (int(x) for x in done.stdout.split())
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["source"] for r in records} == {"lsst.dax.apdb.diadb"}
    cli = Path(sys.executable).with_name("apdb-cli")
    influx = subprocess.run(
        [str(cli), "metrics", "log-to-infux", "-m", "json_line", "-H", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert influx.returncode == 0, influx.stderr
    lines = influx.stdout.strip().splitlines()
    assert len(lines) == len(records)

    def line_of(name: str, table: str) -> dict[str, float]:
        for line in lines:
            head, values, stamp = line.split(" ")
            tags = head.split(",")
            if tags[0] == name and f"table={table}" in tags:
                assert int(stamp) > 0
                return {k: float(v) for k, v in (kv.split("=") for kv in values.split(","))}
        raise AssertionError(f"no {name} {table} in {lines}")

    select = line_of("select_time", "DiaObject")
    assert select["row_count"] == n_objects == 20 and select["real"] > 0 and "user" in select
    assert line_of("select_time", "DiaSource")["row_count"] == n_sources
    assert line_of("insert_time", "DiaObject")["row_count"] == 20
    assert line_of("insert_time", "DiaSource")["row_count"] == n_sources
    assert line_of("contains_visit_detector_time", "diadb_visit")["real"] >= 0
