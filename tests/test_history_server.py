"""The history tier on the server engines (segments as blobs in PostgreSQL and in Cassandra): the
same answers as the engine alone, damaged blobs found and named, compaction crash-safe at every
step and never run by two compactors at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import diadb
from diadb.history.segment import CorruptSegmentError
from tests import service_cassandra, service_postgres
from tests.test_history import EVERYWHERE, TILED, _rows_per_visit, _stream, compact_and_die

ROOT = Path(__file__).resolve().parents[1]
ENGINES = pytest.mark.parametrize("engine", ["postgresql", "cassandra"])


def fresh_url(request: pytest.FixtureRequest, engine: str) -> str:
    if engine == "postgresql":
        return service_postgres.fresh_url(request)
    return service_cassandra.fresh_url(request)


def _damage(request: pytest.FixtureRequest, url: str, name: str, offset: int) -> None:
    """Flip one byte of segment ``name``'s blob, keeping its size."""
    if "schema=" in url:
        schema = url.rsplit("schema=", 1)[1].split("&", 1)[0]
        service_postgres.postgres_server(request).sql(
            f'UPDATE "{schema}".diadb_segment_blob SET data = overlay(data placing '
            f"'\\xff'::bytea from {offset} for 1) WHERE name = '{name}'"
        )
        return
    keyspace = url.rsplit("/", 1)[1].split("?", 1)[0]
    session = service_cassandra.cassandra_node(request).session()
    part, at = divmod(offset, 1 << 20)
    row = session.execute(
        f'SELECT data FROM "{keyspace}".diadb_segment_blob WHERE name = %s AND part = %s', [name, part]
    ).one()
    data = bytearray(row[0])
    data[at] ^= 0xFF
    session.execute(
        f'INSERT INTO "{keyspace}".diadb_segment_blob (name, part, data) VALUES (%s, %s, %s)',
        [name, part, bytes(data)],
    )


def _remove(request: pytest.FixtureRequest, url: str, name: str) -> None:
    if "schema=" in url:
        schema = url.rsplit("schema=", 1)[1].split("&", 1)[0]
        service_postgres.postgres_server(request).sql(
            f"DELETE FROM \"{schema}\".diadb_segment_blob WHERE name = '{name}'"
        )
        return
    keyspace = url.rsplit("/", 1)[1].split("?", 1)[0]
    session = service_cassandra.cassandra_node(request).session()
    session.execute(f'DELETE FROM "{keyspace}".diadb_segment_blob WHERE name = %s AND part = 0', [name])


@ENGINES
def test_blob_tier_returns_what_the_engine_alone_returns(request, official_schema, engine):
    plain = diadb.Apdb.create(fresh_url(request, engine), schema=official_schema, history_tier=False)
    tiered = diadb.Apdb.create(fresh_url(request, engine), schema=official_schema, **TILED)
    try:
        for db in (plain, tiered):
            _stream(db, 10)
        segments = tiered.segments()
        assert len([s for s in segments if s.table == "DiaSource"]) > 5 and plain.segments() == []
        if engine == "postgresql":  # Cassandra has no DiaObject snapshot yet
            assert len([s for s in segments if s.table == "DiaObject"]) > 1  # one per sky tile
        regions = [diadb.Circle(55, -30, 0.4), diadb.Box(54, 55.5, -31, -29.5), EVERYWHERE]

        def same() -> None:
            for region in regions:
                for t, months in [(60031.0, 12), (60020.0, 1), (60100.0, 1)]:
                    for method in ("get_sources", "get_forced_sources"):
                        a = getattr(plain, method)(region, t, months=months)
                        b = getattr(tiered, method)(region, t, months=months)
                        assert a.equals(b), (method, region, t)
                assert plain.get_objects(region).equals(tiered.get_objects(region)), region

        same()
        # 1-day spans, merged in levels once closed (history_merge_spans).
        assert any(s.span_end - s.span_start > 1.0 for s in tiered.segments() if s.table == "DiaSource")
        # Daytime changes of rows already in blobs go to the overlays, on this engine too.
        some = tiered.get_sources(EVERYWHERE, 60100.0, months=1000, columns=["diaSourceId", "visit"])
        old = some.filter(np.asarray(some.column("visit").to_numpy()) < 4).column("diaSourceId").to_pylist()
        forced = tiered.get_forced_sources(EVERYWHERE, 60100.0, months=1000)
        keys = list(
            zip(
                forced.column("diaObjectId").to_pylist()[:3],
                forced.column("visit").to_pylist()[:3],
                forced.column("detector").to_pylist()[:3],
                strict=True,
            )
        )
        for db in (plain, tiered):
            db.reassign_to_ssobjects({old[0]: 777}, time=60040.0)
            db.reassign_sources({old[1]: 10_001})
            db.withdraw_forced_sources(keys, time=60050.0)
            db.set_validity_end([2, 3], 60030.0)
            _stream(db, 2, first=11)
        same()
        assert tiered.verify() == []
        # The replica's chunks hold each stored row once, wherever it lives now.
        for db in (plain, tiered):
            ids = db.replica_chunks().column("chunk_id").to_pylist()
            rows = db.read_chunks(ids)
            sources = np.sort(rows["DiaSource"].column("diaSourceId").to_numpy())
            if db is plain:
                expected = sources
            else:
                assert np.array_equal(sources, expected)
    finally:
        plain.close()
        tiered.close()


@ENGINES
def test_a_damaged_blob_is_named_and_never_read(request, official_schema, engine):
    url = fresh_url(request, engine)
    db = diadb.Apdb.create(url, schema=official_schema, **TILED)
    _stream(db, 6)
    victim = next(s for s in db.segments() if s.table == "DiaSource")
    db.close()
    # One flipped byte in the middle of the blob: same size, wrong content.
    _damage(request, url, victim.name, victim.bytes // 2)
    with diadb.Apdb.open(url) as again:
        problems = again.verify()
        assert len(problems) == 1 and victim.name in problems[0] and "checksum" in problems[0]
        with pytest.raises(CorruptSegmentError, match=victim.name):
            again.get_sources(EVERYWHERE, 60100.0, months=1000)
    _remove(request, url, victim.name)
    with diadb.Apdb.open(url) as again, pytest.raises(CorruptSegmentError, match="is missing"):
        again.get_sources(EVERYWHERE, 60100.0, months=1000)


STEPS = ["read", "write_tmp", "rename", "renamed", "objects", "commit", "committed"]


@pytest.mark.parametrize(
    ("engine", "step"),
    # Cassandra has no DiaObject snapshot yet, so its compaction has no "objects" step; it
    # announces its boundary to stores first (a dead compactor's announcement expires).
    [("postgresql", s) for s in STEPS] + [("cassandra", s) for s in ["announced", *STEPS] if s != "objects"],
)
def test_sigkill_at_every_compaction_step_keeps_every_row_once(request, official_schema, step, engine):
    url = fresh_url(request, engine)
    db = diadb.Apdb.create(
        url, schema=official_schema, history_tier=True, history_auto_compact=False, history_tile_order=5
    )
    _stream(db, 4, n=120)
    db.close()
    expected = {v: 120 for v in range(1, 5)}
    assert _rows_per_visit(url) == (expected, expected)
    compact_and_die(url, step)
    assert _rows_per_visit(url) == (expected, expected)
    with diadb.Apdb.open(url) as again:
        assert again.verify() == []
        moved = sum(s.rows for s in again.segments() if s.table != "DiaObject")
        assert moved == (960 if step == "committed" else 0)
        before = {s.name for s in again.segments()}
        again.compact(boundary=1e9)
        live = {s.name for s in again.segments()}
        store = again.tier.store if again.tier is not None else None
        # No orphan blob is left (blobs merged into larger ones wait in the trash).
        assert store is not None and set(store.names()) == live | (before - live)
    assert _rows_per_visit(url) == (expected, expected)


@ENGINES
def test_two_compactors_never_race(request, official_schema, engine):
    url = fresh_url(request, engine)
    db = diadb.Apdb.create(
        url, schema=official_schema, history_tier=True, history_auto_compact=False, history_tile_order=5
    )
    _stream(db, 6, n=120)
    db.close()
    expected = {v: 120 for v in range(1, 7)}
    errors: list[BaseException] = []

    def compact() -> None:
        try:
            with diadb.Apdb.open(url) as mine:
                mine.compact(boundary=1e9)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=compact) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert _rows_per_visit(url) == (expected, expected)
    with diadb.Apdb.open(url) as again:
        sources = [s for s in again.segments() if s.table == "DiaSource"]
        assert sum(s.rows for s in sources) == 720
        assert again.verify() == []


@ENGINES
def test_compact_follow_is_the_compaction_job(request, official_schema, engine):
    """``diadb compact URL --follow`` beside the writers: each span is compacted once it closes,
    the writers never compact, and SIGTERM (or Ctrl-C) stops the job cleanly."""
    url = fresh_url(request, engine)
    db = diadb.Apdb.create(url, schema=official_schema, history_auto_compact=False, **TILED)
    job = subprocess.Popen(
        [sys.executable, "-m", "diadb.cli", "compact", url, "--follow", "--every", "0.5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _stream(db, 5, n=60)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not [s for s in db.segments() if s.table == "DiaSource"]:
            time.sleep(0.5)
        moved = sum(s.rows for s in db.segments() if s.table == "DiaSource")
        assert moved > 0
        assert _rows_per_visit(url)[0] == {v: 60 for v in range(1, 6)}
    finally:
        job.send_signal(signal.SIGTERM)  # what a job supervisor sends
        out, err = job.communicate(timeout=120)
        db.close()
    assert job.returncode == 0, err
    assert "compacted" in out
