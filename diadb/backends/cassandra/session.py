"""One connection to the cluster: the driver's session, prepared statements, concurrent
execution at the keyspace's consistency levels, and writes grouped into batches.

Every statement diadb sends is a read or an upsert/delete of fixed values, so every one is
marked idempotent: the driver (and :meth:`CassandraSession.run`) may send it again after a
node failure.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Sequence
from itertools import count, repeat
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.cassandra.codec import q, serialize
from diadb.backends.cassandra.url import CassandraUrl, Options
from diadb.errors import StorageError

#: Statements for :meth:`CassandraSession.run`: (prepared statement or batch, bound values).
Statements = list[tuple[Any, Sequence[Any]]]


def _columnar_factory(colnames: list[str], rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Keep the driver's (Cython-parsed) tuples as they are; columns are built per result."""
    return rows


def retry_policy() -> Any:
    """Retry timeouts and unavailable errors on the next host, up to 3 times: every statement
    diadb sends is idempotent, and a node that just died is not yet known as down. A retry
    keeps the statement's own consistency (``None``): the level an error reports is SERIAL
    for a lightweight transaction's Paxos phase, which a node refuses as a commit level."""
    from cassandra.policies import RetryPolicy  # type: ignore[import-untyped]

    class RetryIdempotent(RetryPolicy):  # type: ignore[misc]
        def on_read_timeout(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, None) if retry_num < 3 else (self.RETHROW, None)

        def on_write_timeout(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, None) if retry_num < 3 else (self.RETHROW, None)

        def on_unavailable(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, None) if retry_num < 3 else (self.RETHROW, None)

        def on_request_error(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, None) if retry_num < 3 else (self.RETHROW, None)

    return RetryIdempotent()


class CassandraSession:
    """The cluster connection of one backend and the keyspace it works in."""

    def __init__(self, url: CassandraUrl, opts: Options) -> None:
        # The driver ships no type information (mypy's missing-stubs check is silenced here).
        from cassandra import ConsistencyLevel  # type: ignore[import-untyped]
        from cassandra.cluster import (  # type: ignore[import-untyped]
            EXEC_PROFILE_DEFAULT,
            Cluster,
            ExecutionProfile,
        )
        from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

        self.keyspace = url.keyspace
        self.opts = opts
        #: The driver's ConsistencyLevel (SERIAL for the change log's lightweight transactions).
        self.levels = ConsistencyLevel
        self.read_consistency = self.write_consistency = "ONE"  # set by use_consistency
        self.read_cl = self.write_cl = ConsistencyLevel.ONE
        self._prepared: dict[str, Any] = {}
        self._lock = threading.Lock()

        def make_cluster() -> Any:
            return Cluster(
                list(url.hosts),
                port=url.port,
                protocol_version=5,
                # Off by default: on a LAN (or loopback) LZ4 frames cost CPU on both ends, which
                # is the scarce resource, for little saved bandwidth.
                compression="lz4" if opts.compression else False,
                execution_profiles={
                    EXEC_PROFILE_DEFAULT: ExecutionProfile(
                        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
                        row_factory=_columnar_factory,
                        request_timeout=opts.timeout,
                        retry_policy=retry_policy(),
                    )
                },
                # A node busy applying schema changes (another client's keyspace being made or
                # dropped) can take over the driver's default 5-10 s to accept a connection and
                # answer the control connection's metadata queries.
                connect_timeout=min(30.0, opts.timeout),
                control_connection_timeout=min(30.0, opts.timeout),
                max_schema_agreement_wait=60,
            )

        # Connection attempts until the URL's timeout: one failed attempt (a node that just
        # started, or is busy) is not yet an unreachable cluster.
        # At least 3 attempts: a pause of the whole machine (a VM suspended) expires the
        # deadline and every timer at once.
        deadline = time.monotonic() + opts.timeout
        for attempt in count():
            self._cluster = make_cluster()
            try:
                self._session = self._cluster.connect()
                break
            except Exception as e:
                self._cluster.shutdown()
                if time.monotonic() >= deadline and attempt >= 2:
                    raise StorageError(f"cannot connect to Cassandra at {url.hosts}:{url.port}: {e}") from e
                time.sleep(1.0)
        # A client that drops its Apdb without close() (the reference's interface has no close)
        # would otherwise leave the driver's threads, connections and heartbeats running for
        # the life of the process; the finaliser shuts the cluster down when this is collected
        # (in a thread of its own, see _shutdown_in_background); close() shuts it down at once.
        self._shutdown = weakref.finalize(self, _shutdown_in_background, self._cluster)
        self._session.default_fetch_size = 20_000

    def n_hosts(self) -> int:
        return max(1, len(self._cluster.metadata.all_hosts()))

    def use_consistency(self, rf: int) -> None:
        """Read and write at the URL's levels, by default ONE at RF 1 and QUORUM above."""
        default = "ONE" if rf == 1 else "QUORUM"
        self.read_consistency = self.opts.read_consistency or default
        self.write_consistency = self.opts.write_consistency or default
        self.read_cl = getattr(self.levels, self.read_consistency)
        self.write_cl = getattr(self.levels, self.write_consistency)

    def t(self, table: str) -> str:
        """``table`` qualified by the keyspace, quoted."""
        return f"{q(self.keyspace)}.{q(table)}"

    # ---- plain statements ----------------------------------------------------------
    def execute(self, statement: Any, params: Any = None, timeout: float | None = None) -> Any:
        """One statement as the driver runs it (schema queries, lightweight transactions)."""
        if timeout is None:
            return self._session.execute(statement, params)
        return self._session.execute(statement, params, timeout=timeout)

    def keyspace_exists(self) -> bool:
        rows = self.execute(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s", [self.keyspace]
        )
        return bool(list(rows))

    def table_names(self) -> set[str]:
        rows = self.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", [self.keyspace]
        )
        return {r[0] for r in rows}

    def ddl(self, cql: str) -> None:
        if cql.startswith("CREATE TABLE"):
            # A read waits for a replica that just died only this long before asking another.
            cql += f" WITH speculative_retry = '{self.opts.speculative_retry}'"
            # The operator's table options (validated in url.py: an integer, a known class).
            if self.opts.gc_grace_seconds is not None:
                cql += f" AND gc_grace_seconds = {int(self.opts.gc_grace_seconds)}"
            if self.opts.compaction is not None:
                cql += f" AND compaction = {{'class': '{self.opts.compaction}'}}"
        from cassandra.cluster import NoHostAvailable

        for attempt in range(3):
            try:
                self._session.execute(cql, timeout=120)
                return
            except NoHostAvailable as e:
                # No connection answered (a node, or the whole machine, stalled): the statement
                # (CREATE/DROP ... IF [NOT] EXISTS, ALTER) is sent again; an ALTER that had been
                # applied reports its column as existing, which its callers accept.
                if attempt == 2:
                    raise StorageError(f"Cassandra schema change failed ({cql[:120]}...): {e}") from e
                time.sleep(2.0)
            except Exception as e:
                raise StorageError(f"Cassandra schema change failed ({cql[:120]}...): {e}") from e

    def await_schema_agreement(self) -> None:
        """Wait (up to 10 s) until every node has the same schema: another client's new table
        may not have reached every node yet."""
        self._session.cluster.control_connection.wait_for_schema_agreement(wait_time=10)
        time.sleep(0.2)

    def prepare(self, cql: str, *, table_may_be_new: bool = False) -> Any:
        """A prepared statement (cached). ``table_may_be_new``: the table was just listed in the
        schema and may have been made by another client moments ago (a time partition), so a
        node that does not know it yet is waited for (schema agreement), up to the timeout."""
        stmt = self._prepared.get(cql)
        if stmt is None:
            with self._lock:
                stmt = self._prepared.get(cql)
                if stmt is None:
                    stmt = self._prepare_within_timeout(cql, table_may_be_new)
                    stmt.is_idempotent = True  # see the module docstring
                    self._prepared[cql] = stmt
        return stmt

    def _prepare_within_timeout(self, cql: str, table_may_be_new: bool = False) -> Any:
        """The driver's prepare() waits only its fixed 10 s (the profile's request timeout does
        not apply, and cannot be set with profiles); on a node busy with schema changes (another
        client's keyspace being made or dropped) a first prepare can take longer. Preparing is
        idempotent, so it is retried up to the URL's timeout."""
        from cassandra import OperationTimedOut

        deadline = time.monotonic() + self.opts.timeout
        while True:
            try:
                return self._session.prepare(cql)
            except OperationTimedOut as e:
                if time.monotonic() >= deadline:
                    raise StorageError(f"Cassandra cannot prepare {cql[:200]!r}: {e}") from e
            except Exception as e:
                if not (table_may_be_new and "does not exist" in str(e)) or time.monotonic() >= deadline:
                    raise StorageError(f"Cassandra cannot prepare {cql[:200]!r}: {e}") from e
                self.await_schema_agreement()

    # ---- concurrent execution ------------------------------------------------------
    def run(self, statements: Sequence[tuple[Any, Sequence[Any]]], *, write: bool) -> list[list[Any]]:
        """Execute concurrently; every statement's rows (all pages), in statement order."""
        from cassandra.cluster import NoHostAvailable
        from cassandra.concurrent import execute_concurrent  # type: ignore[import-untyped]

        if not statements:
            return []
        level = self.write_cl if write else self.read_cl
        for stmt, _ in statements:
            stmt.consistency_level = level
        for attempt in range(4):
            try:
                results = execute_concurrent(
                    self._session,
                    statements,
                    concurrency=self.opts.concurrency,
                    raise_on_first_error=True,
                    results_generator=False,
                )
                return [list(r.result_or_exc) if not write else [] for r in results]
            except NoHostAvailable as e:
                # Every connection busy (client-side back-pressure) or every host just marked
                # down: all statements are idempotent, so the whole set is sent again.
                if attempt == 3:
                    raise StorageError(f"Cassandra unavailable for keyspace {self.keyspace}: {e}") from e
                time.sleep(0.5 * 2**attempt)
            except Exception as e:
                what = "write" if write else "read"
                raise StorageError(f"Cassandra {what} failed in keyspace {self.keyspace}: {e}") from e
        raise AssertionError("unreachable")

    # ---- batched writes ------------------------------------------------------------
    def writes(
        self, table: str, data: pa.Table, partition: Sequence[str], *, unset_nulls: bool
    ) -> Statements:
        """Upserts of ``data``'s rows into ``table`` as unlogged batches, one partition each."""
        if not data.num_rows:
            return []
        cols = data.column_names
        stmt = self.prepare(
            f"INSERT INTO {self.t(table)} ({', '.join(map(q, cols))}) VALUES ({', '.join('?' * len(cols))})"
        )
        return self.batches(stmt, data, partition, unset_nulls=unset_nulls)

    def batches(
        self, stmt: Any, data: pa.Table, partition: Sequence[str], *, unset_nulls: bool
    ) -> Statements:
        """``stmt`` (prepared; its bind markers are ``data``'s columns, in order) once per row of
        ``data``, as unlogged batches of one Cassandra partition (``partition`` columns) each
        (so each batch is applied atomically on its replicas).

        The rows are sorted by partition once (Arrow), so each batch is a contiguous slice; the
        values are serialized column by column with NumPy (``codec.serialize``) and the batches
        are filled with those bytes directly: the driver's per-value Python binding and any
        per-row Python loop are skipped."""
        from cassandra.query import BatchStatement, BatchType  # type: ignore[import-untyped]

        n = data.num_rows
        if not n:
            return []
        keys = [np.asarray(data.column(c).to_numpy(), dtype=np.int64) for c in partition]
        order = np.lexsort(keys[::-1])
        data = data.take(pa.array(order))
        keys = [k[order] for k in keys]
        change = np.zeros(n, dtype=bool)
        change[0] = True
        for k in keys:
            change[1:] |= k[1:] != k[:-1]
        starts = np.flatnonzero(change)
        ends = np.append(starts[1:], n)
        kinds = [m.type.typename for m in stmt.column_metadata]
        values = [serialize(data.column(i), k, unset_nulls) for i, k in enumerate(kinds)]
        rows = list(zip(*values, strict=True))
        per_batch = max(1, min(0xFFFF, self.opts.batch_bytes // max(1, data.nbytes // n)))
        routing = list(stmt.routing_key_indexes or [])
        query_id = stmt.query_id
        out: Statements = []
        for s0, e0 in zip(starts.tolist(), ends.tolist(), strict=True):  # one pass per batch
            for a in range(s0, e0, per_batch):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                batch.is_idempotent = True
                part = rows[a : min(a + per_batch, e0)]
                if routing:
                    batch.routing_key = [part[0][i] for i in routing]
                    batch.keyspace = self.keyspace
                # What BatchStatement.add(prepared, bytes) would append for each row, built at C level.
                batch._statements_and_parameters = list(zip(repeat(True), repeat(query_id), part))
                out.append((batch, ()))
        return out

    def close(self) -> None:
        if self._shutdown.detach() is not None:  # not yet shut down
            _shutdown_quietly(self._cluster)


def _shutdown_quietly(cluster: Any) -> None:
    with contextlib.suppress(Exception):
        cluster.shutdown()


def _shutdown_in_background(cluster: Any) -> None:
    """The finaliser of a session dropped without ``close``. It runs in whichever thread the
    garbage collector interrupts, possibly a driver thread inside ``ThreadPoolExecutor.submit``,
    which holds ``concurrent.futures``' global lock; a shutdown there joins threads that wait for
    that lock, a deadlock (it hung a CI run). So the shutdown runs in a thread of its own."""
    worker = threading.Thread(target=_shutdown_quietly, args=(cluster,), name="diadb-shutdown", daemon=True)
    try:
        worker.start()
    except RuntimeError:  # the interpreter is exiting (no new threads): no driver call runs then
        _shutdown_quietly(cluster)
