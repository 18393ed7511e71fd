"""Cassandra on a real 3-node cluster: RF=3, QUORUM, one node SIGKILLed during a run; and the
time partitions on the session's single node.

The cluster (127.0.0.1/.2/.3, CQL port 9043) is started by ``scripts/cassandra.sh up --nodes 3``
for this module and stopped afterwards. Checks: stores and reads go on while a node is down,
every acknowledged store is there, the node restarts and rejoins, and after ``nodetool repair``
the restarted node alone holds every row and the whole content read at QUORUM is exact.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import diadb
from tests.helpers import Visit, make_visit, random_positions, with_nulls
from tests.service_cassandra import ROOT, fresh_url, script
from tests.services import unavailable

pytestmark = pytest.mark.slow

EVERYWHERE = diadb.Box(0, 360, -90, 90)
CLUSTER_DIR = Path(os.environ.get("DIADB_CASSANDRA_DIR", ROOT / "build" / "cassandra")) / "n3"
N_OBJECTS = 300
VISITS = 10
KILL_AFTER = 4  # node 3 is killed after this many visits ...
RESTART_AFTER = 8  # ... and restarted after this many


@pytest.fixture(scope="module")
def cluster3() -> Iterator[str]:
    try:
        import cassandra  # noqa: F401
    except ImportError as e:
        unavailable("cassandra", f"driver missing ({e.name})")
    try:
        script("install")
        script("reset", "--nodes", "3")  # a fresh cluster: no state from an earlier run
        script("up", "--nodes", "3")
        contact = script("contact", "--nodes", "3")
    except Exception as e:
        unavailable("cassandra (3 nodes)", str(e))
        raise
    try:
        yield contact
    finally:
        script("down", "--nodes", "3")


def _kill_node(i: int) -> int:
    pid = int((CLUSTER_DIR / f"node{i}" / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return pid


def _sorted(t: pa.Table, keys: list[str]) -> pa.Table:
    return t.take(pc.sort_indices(t, sort_keys=[(k, "ascending") for k in keys]))


def _assert_same(got: pa.Table, sent: pa.Table, keys: list[str]) -> None:
    assert got.num_rows == sent.num_rows
    got_cmp = _sorted(got.drop_columns(["_healpix_29"]), keys)
    sent_cmp = _sorted(sent, keys).cast(got_cmp.schema)
    for name in sent_cmp.column_names:
        assert got_cmp.column(name).equals(sent_cmp.column(name)), name


def _node_counts(host: str, port: int, keyspace: str) -> dict[str, int]:
    """Row counts of every table as stored on ``host`` alone (consistency ONE, whitelisted)."""
    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy
    from cassandra.query import SimpleStatement

    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([host]),
        consistency_level=ConsistencyLevel.ONE,
        request_timeout=60,
    )
    cluster = Cluster(
        [host], port=port, protocol_version=5, execution_profiles={EXEC_PROFILE_DEFAULT: profile}
    )
    try:
        session = cluster.connect()
        tables = [
            r.table_name
            for r in session.execute(
                "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", [keyspace]
            )
        ]
        counts = {}
        for t in tables:
            stmt = SimpleStatement(
                f'SELECT count(*) FROM "{keyspace}"."{t}"', consistency_level=ConsistencyLevel.ONE
            )
            counts[t] = int(session.execute(stmt).one()[0])
        return counts
    finally:
        cluster.shutdown()


def test_quorum_survives_a_killed_node_and_repair_restores_it(cluster3, official_schema):
    hosts, port = cluster3.rsplit(":", 1)
    keyspace = f"f_{uuid.uuid4().hex[:12]}"
    url = f"cassandra://{hosts}:{port}/{keyspace}?rf=3&consistency=QUORUM"
    db = diadb.Apdb.create(url, schema=official_schema)
    try:
        assert db._backend.rf == 3 and db._backend.write_consistency == "QUORUM"  # type: ignore[attr-defined]
        ids = np.arange(1, N_OBJECTS + 1)
        ra, dec = random_positions(N_OBJECTS, 21)
        visits: list[Visit] = []
        acknowledged: list[Visit] = []
        killed = None
        for k in range(1, VISITS + 1):
            # Every visit updates every object (a new version) and moves it a little.
            v = make_visit(official_schema, k, 60000.0 + 0.5 * k, ids, ra + 1e-5 * k, dec, seed=k)
            visits.append(v)
            if db.store(v.mjd, v.objects, v.sources, v.forced, visit=k):
                acknowledged.append(v)
            # Reads go on at QUORUM, with or without the third node.
            n = db.get_sources(EVERYWHERE, v.mjd, columns=["diaSourceId"]).num_rows
            assert n == N_OBJECTS * len(acknowledged)
            assert db.get_objects(EVERYWHERE, columns=["diaObjectId"]).num_rows == N_OBJECTS
            if k == KILL_AFTER:
                killed = _kill_node(3)
            if k == RESTART_AFTER:
                script("up", "--nodes", "3")  # restarts the node that is not running
        assert killed is not None
        assert len(acknowledged) == VISITS
        status = script("status", "--nodes", "3")
        assert status.count("CQL port 9043 open") == 3, status
        script("nodetool", "--nodes", "3", "--node", "3", "repair", "--full", keyspace, timeout=900)

        # The restarted node alone now holds every row (it is a full replica at RF=3).
        on_node3 = _node_counts("127.0.0.3", int(port), keyspace)
        assert on_node3["diadb_visit"] == VISITS
        assert on_node3["diadb_DiaObjectLatest"] == N_OBJECTS
        assert on_node3["DiaObject"] == N_OBJECTS * VISITS
        src_rows = sum(n for t, n in on_node3.items() if t.startswith("DiaSource_"))
        forced_rows = sum(n for t, n in on_node3.items() if t.startswith("DiaForcedSource_"))
        assert src_rows == forced_rows == N_OBJECTS * VISITS

        # The whole content, read at QUORUM, is exact.
        last = visits[-1]
        _assert_same(db.get_objects(EVERYWHERE), last.objects, ["diaObjectId"])
        all_sources = pa.concat_tables([v.sources for v in visits])
        all_forced = pa.concat_tables([v.forced for v in visits])
        _assert_same(db.get_sources(EVERYWHERE, last.mjd), all_sources, ["diaSourceId"])
        _assert_same(db.get_forced_sources(EVERYWHERE, last.mjd), all_forced, ["diaForcedSourceId"])
        for k in range(1, VISITS + 1):
            assert db.contains_visit_detector(k)
        # Closed versions: every version but the last has its end set to the next one's start.
        hist = db._backend.select(  # type: ignore[attr-defined]
            "DiaSource", np.zeros((0, 2), np.int64), ["visit"], object_ids=np.array([1])
        )
        assert sorted(hist.column("visit").to_pylist()) == list(range(1, VISITS + 1))
    finally:
        try:
            db._backend.drop()  # type: ignore[attr-defined]
        finally:
            db.close()


def test_packed_layout_reads_what_the_plain_layout_reads(cluster3, official_schema):
    """Rows stored with the packed layout (the default) and without it (``packed=0``, the
    layout of older keyspaces) read back the same, nulls included; keyed stores list their rows."""
    hosts, port = cluster3.rsplit(":", 1)
    dbs = {
        packed: diadb.Apdb.create(
            f"cassandra://{hosts}:{port}/p{packed}_{uuid.uuid4().hex[:10]}?rf=3&packed={packed}",
            schema=official_schema,
        )
        for packed in (0, 1)
    }
    try:
        packers = [dbs[p]._backend.layout.packer for p in (0, 1)]  # type: ignore[attr-defined]
        assert not packers[0].packed and packers[1].packed
        ids = np.arange(1, 41)
        ra, dec = random_positions(len(ids), 5)
        for k in range(1, 4):
            v = make_visit(official_schema, k, 60000.0 + k, ids, ra, dec, seed=k)
            objects = with_nulls(v.objects, official_schema.table("DiaObject"), 3)
            sources = with_nulls(v.sources, official_schema.table("DiaSource"), 4)
            for db in dbs.values():
                assert db.store(v.mjd, objects, sources, v.forced, visit=k, key=f"v{k}")
                assert not db.store(v.mjd, objects, sources, v.forced, visit=k, key=f"v{k}")
        reads = {
            packed: (
                _sorted(db.get_objects(EVERYWHERE), ["diaObjectId"]),
                _sorted(db.get_sources(EVERYWHERE, 60004.0), ["diaSourceId"]),
                _sorted(db.get_forced_sources(EVERYWHERE, 60004.0), ["diaForcedSourceId"]),
            )
            for packed, db in dbs.items()
        }
        for plain, packed in zip(reads[0], reads[1], strict=True):
            assert plain.num_rows and plain.equals(packed)
        assert reads[1][1].column("psfFlux").null_count > 0
        for db in dbs.values():
            chunks = db.replica_chunks().column("chunk_id").to_pylist()
            assert len(chunks) == 3
            got = db.read_chunks(chunks[1:2])
            assert sorted(got["DiaSource"].column("visit").to_pylist()) == [2] * len(ids)
            assert got["DiaObject"].num_rows == len(ids)
    finally:
        for db in dbs.values():
            try:
                db._backend.drop()  # type: ignore[attr-defined]
            finally:
                db.close()


#: Lines added to ``tests.test_processes.WRITER`` (after it opens the APDB): the ``stall``-th
#: store writes every other batch of its rows, prints "mid" and waits to be killed.
STALL = """
import time
store, session = db._backend.store, db._backend.session
marks, real_writes, real_run, stores = set(), store._source_writes, session.run, [0]
def source_writes(*args):
    out = real_writes(*args)
    if out:
        marks.add(id(out[0][0]))
    return out
def run(statements, *, write):
    if write and statements and id(statements[0][0]) in marks:
        stores[0] += 1
        if stores[0] == {stall}:
            real_run(statements[::2], write=True)
            print("mid", flush=True)
            time.sleep(600)
    return real_run(statements, write=write)
store._source_writes, session.run = source_writes, run
"""


def test_a_writer_killed_mid_store_is_never_seen_in_part_on_three_nodes(cluster3, official_schema):
    """A writer killed with SIGKILL half-way through the rows of a store (twice, while this
    process and a reader process read at QUORUM), then at a random moment: no read shows part
    of a visit (sources, forced sources or objects), nothing acknowledged is lost, and the
    killed visit, stored again, is whole."""
    import subprocess

    from tests.test_processes import READER, WRITER, N, _script, _visit_counts

    opened = "db = diadb.Apdb.open({url!r})\n"
    assert opened in WRITER
    stalling = WRITER.replace(
        opened, opened + STALL.replace("{", "{{").replace("}", "}}").replace("{{stall}}", "{stall}")
    )
    hosts, port = cluster3.rsplit(":", 1)
    url = f"cassandra://{hosts}:{port}/k_{uuid.uuid4().hex[:12]}?rf=3&consistency=QUORUM"
    diadb.Apdb.create(url, schema=official_schema).close()
    rng = np.random.default_rng(7)
    acknowledged: set[int] = set()
    first = 1
    reader = subprocess.Popen(_script(READER, url=url, n=N), stdout=subprocess.PIPE, text=True)
    try:
        for attempt in range(3):
            stall = attempt < 2
            proc = subprocess.Popen(
                _script(stalling if stall else WRITER, url=url, n=N, first=first, count=200, stall=2),
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()  # one visit acknowledged, then a kill mid-store
            acknowledged.add(int(line))
            if stall:
                assert proc.stdout.readline().strip() == "mid"
                # Half of the next visit's rows are written and acknowledged: not shown.
                counts = _visit_counts(url)
                assert all(c == N for c in counts.values()), counts
                assert set(counts) == acknowledged
                time.sleep(2.0)  # the reader process reads meanwhile
            else:
                time.sleep(float(rng.uniform(0.05, 0.6)))
            os.kill(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate()
            acknowledged.update(int(x) for x in rest.split() if x != "mid")
            counts = _visit_counts(url)
            assert all(c == N for c in counts.values()), counts  # no partial visit
            assert acknowledged <= set(counts)  # nothing acknowledged is lost
            first = max(max(counts), max(acknowledged)) + 1
        out, _ = reader.communicate(timeout=900)
        assert reader.returncode == 0 and out.strip() == "bad 0", out
        # The store killed last, stored again (as a pipeline retrying it would), is whole.
        retry = subprocess.run(
            _script(WRITER, url=url, n=N, first=first, count=2), capture_output=True, text=True, timeout=300
        )
        assert retry.returncode == 0, retry.stderr
        counts = _visit_counts(url)
        assert all(c == N for c in counts.values()) and {first, first + 1} <= set(counts)
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.communicate()
        with diadb.Apdb.open(url) as db:
            db._backend.drop()  # type: ignore[attr-defined]


def test_the_history_tier_survives_a_node_killed_mid_compaction(cluster3, official_schema):
    """The tier on 3 nodes at QUORUM: a compaction whose third node is killed after it read the
    first span goes on and commits on two; stores and reads go on; after the node is back and
    repaired, the blobs check and every read is exact."""
    hosts, port = cluster3.rsplit(":", 1)
    url = f"cassandra://{hosts}:{port}/h_{uuid.uuid4().hex[:12]}?rf=3&consistency=QUORUM"
    db = diadb.Apdb.create(
        url, schema=official_schema, history_tier=True, history_auto_compact=False, history_tile_order=5
    )
    try:
        ids = np.arange(1, 101)
        ra, dec = random_positions(len(ids), 31)
        visits = [
            make_visit(official_schema, k, 60000.0 + 3.0 * k, ids, ra + 1e-5 * k, dec, seed=k)
            for k in range(1, 8)
        ]
        for v in visits[:6]:
            assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=v.visit)
        killed: list[int] = []

        def kill_at_first_read(step: str) -> None:
            if step == "read" and not killed:
                killed.append(_kill_node(3))

        created = db.compact(boundary=visits[5].mjd, fault=kill_at_first_read)
        assert killed and created  # the compaction committed with one node of three gone
        moved = sum(s.rows for s in db.segments() if s.table == "DiaSource")
        assert moved == 5 * len(ids)  # visits 1-5 (the boundary is visit 6's time)
        v = visits[6]
        assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=v.visit)  # node 3 still down

        def exact() -> None:
            assert db.verify() == []
            _assert_same(db.get_objects(EVERYWHERE), visits[-1].objects, ["diaObjectId"])
            sent = pa.concat_tables([v.sources for v in visits])
            _assert_same(db.get_sources(EVERYWHERE, visits[-1].mjd, months=1000), sent, ["diaSourceId"])
            forced = pa.concat_tables([v.forced for v in visits])
            got = db.get_forced_sources(EVERYWHERE, visits[-1].mjd, months=1000)
            _assert_same(got, forced, ["diaForcedSourceId"])

        exact()
        script("up", "--nodes", "3")  # restarts the node that is not running
        keyspace = url.rsplit("/", 1)[1].split("?", 1)[0]
        script("nodetool", "--nodes", "3", "--node", "3", "repair", "--full", keyspace, timeout=900)
        exact()
        assert db.compact(boundary=1e9)  # and the next compaction, on three nodes again
        exact()
    finally:
        try:
            db._backend.drop()  # type: ignore[attr-defined]
        finally:
            db.close()


def test_time_partitions_are_listed_made_ahead_and_dropped(request, official_schema):
    """``TimePartitioned`` on the session's node: the partitions of stored visits (by table, then
    start), more made ahead for ``[start, end)``, and the old ones dropped whole."""
    from diadb.backends.base import TimePartition, TimePartitioned

    db = diadb.Apdb.create(fresh_url(request) + "?time_partition_days=10", schema=official_schema)
    try:
        backend = db._backend
        assert isinstance(backend, TimePartitioned)
        ids = np.arange(1, 11)
        ra, dec = random_positions(len(ids), 3)
        v = make_visit(official_schema, 1, 60005.0, ids, ra, dec, seed=1)
        assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=1)
        assert backend.time_partitions() == [
            TimePartition("DiaForcedSource", "DiaForcedSource_6000", 60000.0, 60010.0),
            TimePartition("DiaSource", "DiaSource_6000", 60000.0, 60010.0),
        ]
        made = ["DiaForcedSource_6001", "DiaForcedSource_6002", "DiaSource_6001", "DiaSource_6002"]
        assert sorted(backend.create_time_partitions(60005.0, 60030.0)) == made  # 60030 is not in
        assert backend.create_time_partitions(60005.0, 60030.0) == []
        parts = backend.time_partitions()
        assert [p.name for p in parts if p.table == "DiaSource"] == [
            f"DiaSource_{n}" for n in (6000, 6001, 6002)
        ]
        assert parts == sorted(parts, key=lambda p: (p.table, p.start_mjd)) and len(parts) == 6
        dropped = ["DiaForcedSource_6000", "DiaForcedSource_6001", "DiaSource_6000", "DiaSource_6001"]
        assert sorted(backend.drop_time_partitions(60020.0)) == dropped
        assert [p.name for p in backend.time_partitions()] == ["DiaForcedSource_6002", "DiaSource_6002"]
        assert db.get_sources(EVERYWHERE, 60029.0, columns=["diaSourceId"]).num_rows == 0
    finally:
        db.close()


def test_operator_table_options_reach_every_table(request, official_schema):
    """``gc_grace_seconds`` and ``compaction`` in the URL are set on the tables this client
    creates; a strategy Cassandra does not have is refused before anything is created."""
    url = fresh_url(request)
    with pytest.raises(diadb.ConfigError, match="compaction must be one of"):
        diadb.Apdb.create(url + "?compaction=NoSuchStrategy", schema=official_schema)
    db = diadb.Apdb.create(
        url + "?gc_grace_seconds=3600&compaction=LeveledCompactionStrategy", schema=official_schema
    )
    try:
        from tests.service_cassandra import cassandra_node

        keyspace = url.rsplit("/", 1)[1]
        rows = list(
            cassandra_node(request)
            .session()
            .execute(
                "SELECT table_name, gc_grace_seconds, compaction FROM system_schema.tables "
                "WHERE keyspace_name = %s",
                [keyspace],
            )
        )
        assert rows and all(r.gc_grace_seconds == 3600 for r in rows)
        assert all("LeveledCompactionStrategy" in r.compaction["class"] for r in rows)
    finally:
        db.close()


def test_an_apdb_dropped_without_close_shuts_its_cluster_down(request, official_schema):
    """The reference's interface has no close(): a client that drops its Apdb must not leave the
    driver's threads, connections and heartbeats running for the rest of the process."""
    import gc

    db = diadb.Apdb.create(fresh_url(request), schema=official_schema)
    cluster = db._backend.session._cluster  # the driver's object: what this test watches
    assert not cluster.is_shutdown
    del db
    gc.collect()
    # The finaliser shuts it down in a thread of its own (never in the collecting thread).
    deadline = time.monotonic() + 60
    while not cluster.is_shutdown and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.is_shutdown
