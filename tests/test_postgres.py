"""PostgreSQL-only behaviour: many writer processes, a read-only role, secrets, partitions,
and the server restarted in the middle of a store. The shared suite (test_store_read.py,
test_validation.py) also runs on PostgreSQL through the ``backend_url`` fixture."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import diadb
from diadb.errors import ConfigError, StorageError
from tests.helpers import make_visit, random_positions, with_nulls
from tests.service_postgres import PostgresServer, postgres_server

ROOT = Path(__file__).resolve().parents[1]
EVERYWHERE = diadb.Box(0, 360, -90, 90)
N = 200  # objects per visit/detector


@pytest.fixture
def server(request: pytest.FixtureRequest) -> PostgresServer:
    return postgres_server(request)


def _ids(visit: int, detector: int) -> np.ndarray:
    return np.arange(1, N + 1) + visit * 1_000_000 + detector * 10_000


def _visit(schema, visit: int, detector: int, mjd: float):
    ra, dec = random_positions(N, 1000 + detector)
    return make_visit(schema, visit, mjd, _ids(visit, detector), ra, dec, detector=detector)


def _sorted(t: pa.Table, keys: list[str]) -> pa.Table:
    return t.take(pc.sort_indices(t, sort_keys=[(k, "ascending") for k in keys]))


def _assert_same(got: pa.Table, sent: pa.Table, key: list[str]) -> None:
    assert got.num_rows == sent.num_rows
    got = _sorted(got.drop_columns(["_healpix_29"]), key)
    sent = _sorted(sent, key).cast(got.schema)
    for name in sent.column_names:
        assert got.column(name).equals(sent.column(name)), name


def _assert_exact(url: str, schema, stored: list[tuple[int, int, float]]) -> None:
    """The database holds exactly the rows of ``stored`` (visit, detector, mjd), each once."""
    visits = [_visit(schema, v, d, mjd) for v, d, mjd in stored]
    with diadb.Apdb.open(url) as db:
        _assert_same(
            db.get_objects(EVERYWHERE), pa.concat_tables([v.objects for v in visits]), ["diaObjectId"]
        )
        _assert_same(
            db.get_sources(EVERYWHERE, 61000.0, months=120),
            pa.concat_tables([v.sources for v in visits]),
            ["diaSourceId"],
        )
        _assert_same(
            db.get_forced_sources(EVERYWHERE, 61000.0, months=120),
            pa.concat_tables([v.forced for v in visits]),
            ["diaObjectId", "visit"],
        )
        stats = db.stats()
        assert stats["diadb_visit"]["rows"] == len({(v, d) for v, d, _ in stored})
        assert stats["DiaSource"]["rows"] == N * len(stored)


# ---- URLs and secrets ------------------------------------------------------------------
def test_url_with_password_is_refused_without_echoing_it(official_schema):
    for url in (
        "postgresql://alice:hunter2-secret@db.example:5432/apdb?schema=x",
        "postgresql://alice@db.example/apdb?schema=x&password=hunter2-secret",
    ):
        with pytest.raises(ConfigError, match="PGPASSWORD") as info:
            diadb.Apdb.create(url, schema=official_schema)
        assert "hunter2" not in str(info.value)


def test_url_secrets_are_refused_and_never_echoed(official_schema):
    """A client key's passphrase (``sslpassword=``) is a secret too, and no error about a URL
    (a secret in it, a bad option beside one, another scheme) shows the secret."""
    secret = "hunter2-secret"
    # retry_seconds=0: a URL that is (wrongly) let through fails at once on the closed port.
    base = "postgresql://alice@127.0.0.1:1/apdb?schema=x&retry_seconds=0"
    for url in (
        f"{base}&sslpassword={secret}",
        f"{base}&SSLPASSWORD={secret}",
        f"{base}&sslpassword={secret}&pool_size=many",
        f"{base}&password={secret}&sslpassword={secret}",
    ):
        with pytest.raises(ConfigError, match="sslpassword") as info:
            diadb.Apdb.create(url, schema=official_schema)
        assert secret not in str(info.value)
        with pytest.raises(ConfigError) as info:
            diadb.backends.locate(url)
        assert secret not in str(info.value)
    from diadb.backends.postgres.url import parse_url

    for url in (f"mysql://alice:{secret}@db.example/apdb", f"postgresql+psycopg://alice:{secret}@db/apdb"):
        with pytest.raises(ConfigError) as info:
            parse_url(url)
        assert secret not in str(info.value) and "***" in str(info.value)


def test_locate_names_the_server_and_schema_without_diadb_options():
    where = diadb.backends.locate(
        "postgresql://alice@h1:5433,h2/apdb?schema=s1&sslmode=require&pool_size=2&partition_days=10"
    )
    assert (where.scheme, where.hosts, where.port, where.database) == (
        "postgresql",
        ("h1", "h2"),
        5433,
        "apdb",
    )
    assert where.namespace == "s1" and where.files == ()
    assert where.uri == "postgresql://alice@h1:5433,h2/apdb?sslmode=require&application_name=diadb"
    assert dict(where.options) == {"schema": "s1", "pool_size": "2", "partition_days": "10"}
    local = diadb.backends.locate("postgresql:///apdb?host=/tmp")
    assert local.namespace == "public" and local.hosts == ("/tmp",) and local.port is None
    assert local.uri is not None and local.uri.startswith("postgresql:///apdb?")


def test_schema_names_the_server_would_change_are_refused(server, official_schema):
    """PostgreSQL truncates a name to 63 bytes (with a NOTICE only), so two long names would open
    the same APDB: refused. So are names it cannot hold as given; any other name is quoted."""
    from urllib.parse import quote

    base = server.url + ("&" if "?" in server.url else "?")
    tag = uuid.uuid4().hex[:12]
    for name in ("s" * 64 + tag, "é" * 32, "é" * 26 + tag):  # 64+, 64 and 64 bytes in UTF-8
        for open_ in (diadb.Apdb.create, diadb.Apdb.open):
            with pytest.raises(ConfigError, match="63 bytes"):
                open_(
                    base + "schema=" + quote(name),
                    **({"schema": official_schema} if open_ is diadb.Apdb.create else {}),
                )
    for name in (f"a\nb{tag}", f"a\x00{tag}", f"pg_{tag}"):
        with pytest.raises(ConfigError, match="schema name"):
            diadb.Apdb.create(base + "schema=" + quote(name), schema=official_schema)
    # The longest name kept whole, and one that needs quoting, work and are what the server holds.
    import psycopg

    for name in ("é" * 25 + "x" + tag, f'a "quoted", name; {tag}'):
        assert len(name.encode()) <= 63
        url = base + "schema=" + quote(name)
        with diadb.Apdb.create(url, schema=official_schema) as db:
            v = _visit(official_schema, 1, 0, 60000.0)
            assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=1, detector=0)
        with diadb.Apdb.open(url) as db:
            assert db.get_sources(EVERYWHERE, 60000.0).num_rows == N
        with psycopg.connect(server.url) as conn:
            row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,)).fetchone()
        assert row == (1,)


def test_password_from_environment_never_reaches_metadata(server, official_schema, monkeypatch):
    password = "pw-" + uuid.uuid4().hex
    server.sql(
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'diadb_password_user') "
        "THEN CREATE ROLE diadb_password_user LOGIN; END IF; END$$"
    )
    server.sql(f"ALTER ROLE diadb_password_user PASSWORD '{password}'")
    server.sql("GRANT CREATE ON DATABASE postgres TO diadb_password_user")
    url = server.fresh_url().replace("postgres@", "diadb_password_user@", 1) + "&retry_seconds=2"
    monkeypatch.setenv("PGPASSWORD", password)
    db = diadb.Apdb.create(url, schema=official_schema)
    v = _visit(official_schema, 1, 0, 60000.0)
    assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=1, detector=0)
    meta = db._backend.read_metadata()
    assert meta and all(password not in k and password not in val for k, val in meta.items())
    assert not any("password" in k.lower() for k in meta)
    assert password not in repr(db.config) and password not in db.url
    db.close()
    # The password really is what let us in: without it (or with a wrong one) the server refuses,
    # at once (no retry loop) and without echoing anything secret.
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    with pytest.raises(StorageError, match="password") as info:
        diadb.Apdb.open(url)
    monkeypatch.setenv("PGPASSWORD", "wrong-" + password)
    with pytest.raises(StorageError, match="password authentication failed") as info:
        diadb.Apdb.open(url)
    assert password not in str(info.value)


# ---- the read-only role ----------------------------------------------------------------
def test_read_only_role_reads_and_cannot_write(server, official_schema):
    server.sql(
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'diadb_reader') "
        "THEN CREATE ROLE diadb_reader LOGIN; END IF; END$$"
    )
    url = server.fresh_url() + "&partition_days=10"
    with diadb.Apdb.create(url, schema=official_schema) as db:
        v = _visit(official_schema, 1, 0, 60000.0)
        assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=1, detector=0)
        db._backend.grant_read_only("diadb_reader")
    reader_url = url.replace("postgres@", "diadb_reader@", 1) + "&retry_seconds=2"
    with diadb.Apdb.open(reader_url) as reader:
        assert reader.get_sources(EVERYWHERE, 60000.0).num_rows == N
        assert reader.get_objects(EVERYWHERE).num_rows == N
        assert reader.contains_visit_detector(1, 0)
        for visit, mjd in ((2, 60001.0), (3, 60100.0)):  # an existing partition, then a new one
            w = _visit(official_schema, visit, 0, mjd)
            with pytest.raises(StorageError, match="permission denied"):
                reader.store(w.mjd, w.objects, w.sources, w.forced, visit=visit, detector=0)
            assert not reader.contains_visit_detector(visit)
    _assert_exact(url, official_schema, [(1, 0, 60000.0)])


# ---- the packed layout ----------------------------------------------------------------
def test_packed_layout_reads_and_updates_like_the_plain_layout(server, official_schema):
    """The packed layout (the default) and the plain one (``packed=0``, the layout of schemas
    made before it) read back the same rows, nulls included, through stores, every kind of
    daytime update, the change log and the deduplication read."""
    dbs = {
        packed: diadb.Apdb.create(server.fresh_url() + f"&packed={packed}", schema=official_schema)
        for packed in (0, 1)
    }
    try:
        assert not dbs[0]._backend._packer.packed  # type: ignore[attr-defined]
        assert dbs[1]._backend._packer.packed["DiaSource"]  # type: ignore[attr-defined]
        for k in range(1, 4):
            v = _visit(official_schema, k, 0, 60000.0 + k)
            objects = with_nulls(v.objects, official_schema.table("DiaObject"), 3)
            sources = with_nulls(v.sources, official_schema.table("DiaSource"), 4)
            forced = with_nulls(v.forced, official_schema.table("DiaForcedSource"), 2)
            for db in dbs.values():
                assert db.store(v.mjd, objects, sources, forced, visit=k, detector=0)
        first = _visit(official_schema, 1, 0, 60001.0)
        moved = first.sources.column("diaSourceId").to_pylist()
        for db in dbs.values():
            db.reassign_to_ssobjects({moved[0]: 77, moved[1]: 78}, time=61000.0)
            db.reassign_sources({moved[2]: int(first.objects.column("diaObjectId")[5].as_py())}, time=61000.0)
            keys = first.forced.select(["diaObjectId", "visit", "detector"]).slice(0, 3).to_pylist()
            db.withdraw_forced_sources([tuple(k.values()) for k in keys], time=61000.0)
            db.set_validity_end(first.objects.column("diaObjectId").to_pylist()[10:12], 61000.0)

        def contents(db: diadb.Apdb) -> list[pa.Table]:
            chunks = db.replica_chunks().column("chunk_id").to_pylist()
            log = db.read_chunks(chunks)
            return [
                _sorted(db.get_objects(EVERYWHERE), ["diaObjectId"]),
                _sorted(db.get_sources(EVERYWHERE, 60004.0), ["diaSourceId"]),
                _sorted(db.get_forced_sources(EVERYWHERE, 60004.0), ["diaObjectId", "visit"]),
                _sorted(db.get_objects_for_dedup(60000.0), ["diaObjectId"]),
                _sorted(log["DiaSource"], ["diaSourceId"]),
                _sorted(log["DiaObject"], ["diaObjectId", "validityStartMjdTai"]),
                _sorted(log["DiaForcedSource"], ["diaObjectId", "visit"]),
                log["updates"].select(["chunk_id", "kind", "payload"]),
            ]

        plain, packed = contents(dbs[0]), contents(dbs[1])
        for a, b in zip(plain, packed, strict=True):
            assert a.num_rows and a.column_names == b.column_names
            assert a.equals(b)
        sources = packed[1]
        assert sources.column("psfFlux").null_count > 0
        assert sources.column("ssObjectId").drop_null().to_pylist() == [77, 78]
        assert 61000.0 in packed[2].column("timeWithdrawnMjdTai").to_pylist()
        assert packed[0].num_rows == 3 * N - 2  # two closed (the moved-from objects keep sources)
    finally:
        for db in dbs.values():
            db.close()


# ---- time partitions ---------------------------------------------------------------------
def test_reads_touch_only_the_window_and_old_partitions_drop(server, official_schema):
    url = server.fresh_url() + "&partition_days=10"
    db = diadb.Apdb.create(url, schema=official_schema)
    other = diadb.Apdb.open(url)  # a second client whose partition cache goes stale
    stored = [(1, 0, 60000.0), (2, 0, 60015.0), (3, 0, 60025.0), (4, 0, 60045.0)]
    for visit, det, mjd in stored:
        v = _visit(official_schema, visit, det, mjd)
        assert (db if visit % 2 else other).store(
            mjd, v.objects, v.sources, v.forced, visit=visit, detector=det
        )
    backend = db._backend
    names = [p.name for p in backend.time_partitions() if p.table == "DiaSource"]
    assert names == ["DiaSource_p6000", "DiaSource_p6001", "DiaSource_p6002", "DiaSource_p6004"]
    # The plan of a history read names only the partitions of its window.
    sql, settings = backend.select_sql(
        "DiaSource",
        diadb.Circle(55, -30, 3).pixel_ranges(4),
        ["diaSourceId"],
        window=diadb.backends.TimeWindow(60020.0, 60029.0),
    )

    import psycopg

    with psycopg.connect(server.url) as conn:  # EXPLAIN cannot go through ADBC's COPY path
        for name, value in settings.items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql).fetchall())
    assert "DiaSource_p6002" in plan
    assert not any(n in plan for n in ("DiaSource_p6000", "DiaSource_p6001", "DiaSource_p6004"))
    # Dropping old history removes whole partitions.
    assert backend.delete_before("DiaSource", 60020.0) == 2 * N
    assert backend.delete_before("DiaForcedSource", 60020.0) == 2 * N
    names = [p.name for p in backend.time_partitions() if p.table == "DiaSource"]
    assert names == ["DiaSource_p6002", "DiaSource_p6004"]
    assert db.get_sources(EVERYWHERE, 60050.0, months=12).num_rows == 2 * N
    # The other client still believes p6000 exists: its store recreates it and succeeds.
    v = _visit(official_schema, 5, 0, 60005.0)
    assert other.store(v.mjd, v.objects, v.sources, v.forced, visit=5, detector=0)
    assert db.get_sources(EVERYWHERE, 60005.0, months=1).num_rows == N
    other.close()
    db.close()


def test_time_partitions_are_created_ahead_listed_and_dropped(server, official_schema):
    from diadb.backends.base import TimePartition, TimePartitioned

    with diadb.Apdb.create(server.fresh_url() + "&partition_days=10", schema=official_schema) as db:
        backend = db._backend
        assert isinstance(backend, TimePartitioned)
        assert backend.time_partitions() == []
        assert backend.create_time_partitions(60000.0, 60000.0) == []
        made = backend.create_time_partitions(60005.0, 60030.0)  # [60005, 60030): 3 partitions each
        assert made == [f"{t}_p{k}" for t in ("DiaSource", "DiaForcedSource") for k in (6000, 6001, 6002)]
        assert backend.create_time_partitions(60000.0, 60030.0) == []  # all there: none made
        assert backend.time_partitions() == [
            TimePartition(t, f"{t}_p{k}", k * 10.0, (k + 1) * 10.0)
            for t in ("DiaForcedSource", "DiaSource")  # ordered by table, then start
            for k in (6000, 6001, 6002)
        ]
        v = _visit(official_schema, 1, 0, 60005.0)
        assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=1, detector=0)
        assert len(backend.time_partitions()) == 6  # the store needed no new partition
        assert backend.drop_time_partitions(60019.0) == ["DiaSource_p6000", "DiaForcedSource_p6000"]
        assert [p.name for p in backend.time_partitions()] == [
            "DiaForcedSource_p6001",
            "DiaForcedSource_p6002",
            "DiaSource_p6001",
            "DiaSource_p6002",
        ]
        assert db.get_sources(EVERYWHERE, 60010.0, months=1).num_rows == 0
        # The dropped partition is made again by the store that needs it.
        w = _visit(official_schema, 2, 0, 60006.0)
        assert db.store(w.mjd, w.objects, w.sources, w.forced, visit=2, detector=0)
        assert db.get_sources(EVERYWHERE, 60010.0, months=1).num_rows == N
        assert backend.counters() == {"retries": backend.retries}


# ---- many writer processes ----------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    import diadb
    from tests.test_postgres import _visit, N
    det = {detector}
    db = diadb.Apdb.open({url!r})
    region = diadb.Circle(55.0, -30.0, 3.0)
    bad = 0
    for visit in range(1, {visits} + 1):
        v = _visit(db.schema, visit, det, 60000.0 + 5 * visit)
        assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=visit, detector=det)
        if det % 4 == 0:  # some writers read too: every visit/detector they see is whole
            s = db.get_sources(region, 60100.0, columns=["visit", "detector"])
            key = s.column("visit").to_numpy() * 1000 + s.column("detector").to_numpy()
            counts = np.unique(key, return_counts=True)[1]
            bad += int((counts > N).sum())
    # Everyone races for the same visit/detector, then for one whole visit: one store each wins.
    c = _visit(db.schema, 100, 0, 60500.0)
    won = int(db.store(c.mjd, c.objects, c.sources, c.forced, visit=100, detector=0))
    w = _visit(db.schema, 101, 99, 60501.0)
    won_whole = int(db.store(w.mjd, w.objects, w.sources, w.forced, visit=101))
    again = int(db.store(60005.0, v.objects, visit=1, detector=det))  # already stored: a no-op
    print("result", won, won_whole, again, bad, flush=True)
    """
)


@pytest.mark.slow
def test_sixteen_concurrent_writers_exact_contents(server, official_schema):
    url = server.fresh_url() + "&partition_days=4&pool_size=2"
    diadb.Apdb.create(url, schema=official_schema).close()
    writers, visits = 16, 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER.format(root=str(ROOT), url=url, detector=d, visits=visits)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in range(writers)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append([int(x) for x in out.split("result", 1)[1].split()])
    won, won_whole, again, bad = (np.array(col) for col in zip(*results, strict=True))
    assert won.sum() == 1 and won_whole.sum() == 1 and again.sum() == 0 and bad.sum() == 0
    stored = [(v, d, 60000.0 + 5 * v) for v in range(1, visits + 1) for d in range(writers)]
    stored += [(100, 0, 60500.0), (101, 99, 60501.0)]
    _assert_exact(url, official_schema, stored)


@pytest.mark.slow
def test_concurrent_detector_clients_store_what_field_mode_stores(server, official_schema, tmp_path):
    """diadb simulate --mode detector --clients N: N clients, each a thread with its own
    connection in one of two processes, store a visit's 189 detectors at once; the database
    then holds exactly what a single whole-field store gives (timings are not checked)."""
    from diadb.sim.model import SimConfig, VisitSimulator
    from diadb.sim.runner import run, summarize

    config = SimConfig(seed=7, scale=0.02, field_centres_deg=((55.0, -30.0),), dither_deg=0.3)

    def content(db: diadb.Apdb) -> dict[str, set[tuple[object, ...]]]:
        got = {
            "sources": db.get_sources(EVERYWHERE, 60001.0, columns=["diaSourceId", "detector"]),
            "forced": db.get_forced_sources(EVERYWHERE, 60001.0, columns=["diaForcedSourceId", "detector"]),
            "objects": db.get_objects(EVERYWHERE, columns=["diaObjectId", "nDiaSources"]),
        }
        return {
            k: set(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))
            for k, t in got.items()
        }

    with diadb.Apdb.create(str(tmp_path / "field.db"), schema=official_schema) as field:
        run(field, VisitSimulator(config, official_schema), 3)
        want = content(field)
        want_versions = field.stats()["DiaObject"]["rows"]
    url = server.fresh_url()
    with diadb.Apdb.create(url, schema=official_schema) as db:
        sim = VisitSimulator(config, official_schema)
        first = run(db, sim, 2)
        metrics = run(db, sim, 1, mode="detector", workers=2, clients=6)
        meta = metrics.schema.metadata
        assert (meta[b"clients"], meta[b"workers"], meta[b"errors"]) == (b"6", b"2", b"0")
        assert meta[b"first_error"] == b""
        assert sorted(set(metrics.column("detector").to_pylist())) == list(range(189))
        assert metrics.num_rows == 189 * 4
        assert summarize(metrics)["errors"] == 0 and summarize(metrics)["clients"] == 6
        assert all(db.contains_visit_detector(3, d) for d in (0, 94, 188))
        assert content(db) == want and len(want["forced"]) > 0
        stats = db.stats()
        for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
            given = sum(
                pc.sum(t.filter(pc.equal(t.column("table"), name)).column("rows_stored")).as_py()
                for t in (first, metrics)
            )
            assert stats[name]["rows"] == given, name
        assert stats["DiaObject"]["rows"] == want_versions
        assert all(s["bytes"] > 0 for s in stats.values())  # plain tables and partitioned ones


def test_detector_clients_need_detector_mode(server, official_schema):
    from diadb.sim.model import SimConfig, VisitSimulator
    from diadb.sim.runner import run

    with diadb.Apdb.create(server.fresh_url(), schema=official_schema) as db:
        sim = VisitSimulator(SimConfig(seed=1, scale=0.01), official_schema)
        with pytest.raises(ConfigError, match="clients"):
            run(db, sim, 1, mode="field", clients=4)
        with pytest.raises(ConfigError, match="clients"):
            run(db, sim, 1, mode="detector", clients=0)


# ---- the server restarted in the middle of a store ---------------------------------------
RESTART_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import diadb
    from tests.test_postgres import _visit
    db = diadb.Apdb.open({url!r})
    for visit in range(1, {visits} + 1):
        v = _visit(db.schema, visit, 0, 60000.0 + visit)
        print("storing", visit, flush=True)
        done = db.store(v.mjd, v.objects, v.sources, v.forced, visit=visit, detector=0)
        print("stored", visit, done, flush=True)
    # A retry of a visit whose first store committed is a no-op.
    v = _visit(db.schema, 3, 0, 60003.0)
    print("retry", db.store(v.mjd, v.objects, v.sources, v.forced, visit=3, detector=0), flush=True)
    """
)


@pytest.mark.slow
def test_server_restart_mid_store_is_retried_idempotently(server, official_schema):
    import psycopg

    url = server.fresh_url() + "&partition_days=10"
    schema_name = url.rsplit("schema=", 1)[1].split("&", 1)[0]
    diadb.Apdb.create(url, schema=official_schema).close()
    # Hold a lock the writer's first store needs, so that store is in the middle of its
    # transaction (advisory lock taken, registry insert waiting) when the server goes down.
    blocker = psycopg.connect(server.url)
    blocker.execute(f'LOCK TABLE "{schema_name}".diadb_visit IN EXCLUSIVE MODE')
    visits = 6
    proc = subprocess.Popen(
        [sys.executable, "-c", RESTART_WRITER.format(root=str(ROOT), url=url, visits=visits)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The first store blocks on the lock: wait until the server says it is waiting.
        deadline = time.monotonic() + 120
        with psycopg.connect(server.url, autocommit=True) as watch:
            while True:
                row = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'diadb' "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()
                if row and row[0] > 0:
                    break
                assert time.monotonic() < deadline, "the writer never blocked"
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        server.script("restart")  # kills the blocked store's connection (and the blocker's)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        blocker.close()
    assert proc.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert [ln for ln in lines if ln.startswith("stored")] == [
        f"stored {v} True" for v in range(1, visits + 1)
    ]
    assert "retry False" in lines
    _assert_exact(url, official_schema, [(v, 0, 60000.0 + v) for v in range(1, visits + 1)])
