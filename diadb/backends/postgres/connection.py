"""PostgreSQL connections: the pool, the transaction runner with its retries, and parameter binding.

Every other part of the engine talks to the server through one :class:`Connection`: it runs a
piece of work in one transaction (:meth:`Connection.run`), committed at the end and run again
after a transient failure (deadlock, serialization failure, a lost connection when the server
restarts) for up to ``retry_seconds``. Stores are idempotent through the visit registry, so a
retried store whose first try had committed writes nothing twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from diadb.backends.common.names import LATEST_TABLE
from diadb.errors import StorageError

T = TypeVar("T")

#: SQLSTATEs after which the whole transaction is simply run again.
RETRY_STATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
#: SQLSTATEs (and classes) meaning the connection is gone: reconnect, then run it again.
RECONNECT_STATES = {"57P01", "57P02", "57P03", "53300"}  # shutdown, crash, starting, too many conns
RECONNECT_CLASSES = ("08",)  # connection exceptions
#: How libpq words a server that is restarting, stopped or gone (these carry no SQLSTATE).
TRANSIENT_MARKERS = (
    "connection refused",
    "terminating connection",
    "server closed the connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "could not receive data",
    "could not send data",
    "connection to server was lost",
    "no connection to the server",
    "connection reset",
    "broken pipe",
    "ssl syscall",
    "no such file or directory",
)
#: "no partition of relation found for row": a check violation without a constraint name.
MISSING_PARTITION_STATE = "23514"


def q(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


# ---- parameter binding -----------------------------------------------------------------
PG_ARRAY_TYPE = {
    pa.int64(): "bigint",
    pa.int32(): "integer",
    pa.int16(): "smallint",
    pa.int8(): "smallint",
    pa.float64(): "double precision",
    pa.float32(): "real",
    pa.string(): "text",
    pa.bool_(): "boolean",
}


def list_param(values: np.ndarray | pa.Array, type_: pa.DataType) -> pa.Array:
    """One list-typed parameter value holding the whole array (bound as a PostgreSQL array)."""
    arr = pa.array(values, type=type_) if not isinstance(values, pa.Array) else values.cast(type_)
    return pa.ListArray.from_arrays(pa.array([0, len(arr)], pa.int32()), arr)


def params(*values: Any) -> pa.RecordBatch:
    """One row of bound parameters: ``(array, arrow type)`` pairs become PostgreSQL arrays."""
    arrays: list[pa.Array] = []
    for v in values:
        if isinstance(v, tuple):  # (array, arrow type)
            arrays.append(list_param(v[0], v[1]))
        elif isinstance(v, bool):
            arrays.append(pa.array([v], pa.bool_()))
        elif isinstance(v, int | np.integer):
            arrays.append(pa.array([int(v)], pa.int64()))
        elif isinstance(v, float | np.floating):
            arrays.append(pa.array([float(v)], pa.float64()))
        else:
            arrays.append(pa.array([str(v)], pa.string()))
    return pa.RecordBatch.from_arrays(arrays, names=[f"p{i}" for i in range(len(arrays))])


def ids(values: Any) -> tuple[pa.Array, pa.DataType]:
    """A bigint[] parameter (for :func:`params`)."""
    return pa.array(np.asarray(values, dtype=np.int64)), pa.int64()


def int_array_text(values: Sequence[int] | np.ndarray) -> str:
    """A bigint[] literal for a transaction-local setting (see :func:`apply_settings`)."""
    return "{" + ",".join(map(str, np.asarray(values, dtype=np.int64).tolist())) + "}"


def pg_type(t: pa.DataType) -> tuple[pa.DataType, str]:
    """The Arrow type to bind a key column as, and its PostgreSQL name."""
    if t == pa.int8():
        return pa.int16(), "smallint"
    if t == pa.large_string():
        return pa.string(), "text"
    if t not in PG_ARRAY_TYPE:
        raise StorageError(f"cannot bind a column of type {t} as a PostgreSQL array")
    return t, PG_ARRAY_TYPE[t]


def apply_settings(cur: Any, settings: Mapping[str, str]) -> None:
    """Bind a read's values as transaction-local settings (one parameterised statement): ADBC
    fetches a statement without bound parameters through binary ``COPY`` (see ``read``)."""
    if not settings:
        return
    calls = ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, true)" for i in range(len(settings)))
    flat = [x for kv in settings.items() for x in kv]
    cur.execute(f"SELECT {calls}", parameters=params(*flat))
    cur.fetchall()


def is_missing_partition(e: BaseException) -> bool:
    """Whether ``e`` (a StorageError from :meth:`Connection.run`) is a row that found no time
    partition: one dropped behind a client's partition cache."""
    cause = e.__cause__
    return getattr(cause, "sqlstate", "") == MISSING_PARTITION_STATE and not _constraint(cause)


def _constraint(e: BaseException | None) -> str:
    details = dict(getattr(e, "details", None) or [])
    return str(details.get(b"PG_DIAG_CONSTRAINT_NAME", b"").decode(errors="replace"))


# ---- the pool ----------------------------------------------------------------------------
class Retry(Exception):
    """Run the transaction again (after reconnecting when ``reconnect``); never leaves ``run``."""

    def __init__(self, reconnect: bool, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.reconnect = reconnect


class Pool:
    """A small thread-safe pool of ADBC connections, each with the schema on its search path.

    A connection that fails is closed rather than returned; after a lost connection every
    idle one is dropped too (a restarted server has closed them all).
    """

    def __init__(self, uri: str, schema: str, size: int) -> None:
        import adbc_driver_postgresql.dbapi as dbapi  # type: ignore[import-untyped]

        self._dbapi = dbapi
        self._uri = uri
        self._schema = schema
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def _connect(self) -> Any:
        conn = self._dbapi.connect(self._uri, autocommit=False)
        try:
            cur = conn.cursor()
            try:
                # JIT off for this session: the planner cannot know how few rows a read's ranges
                # select, estimates ~1M, and JIT-compiles every read (measured: 68 ms of
                # compilation for a detector read that executes in 10 ms).
                cur.execute(
                    "SELECT set_config('search_path', $1, false), set_config('jit', 'off', false)",
                    parameters=params(q(self._schema)),
                )
                cur.fetchall()
            finally:
                cur.close()
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        if self._closed:
            raise StorageError("the PostgreSQL backend is closed")
        self._slots.acquire()
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            except BaseException:
                try:
                    conn.rollback()
                except Exception:
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                raise
            finally:
                if conn is not None:
                    with self._lock:
                        if self._closed:
                            with contextlib.suppress(Exception):
                                conn.close()
                        else:
                            self._idle.append(conn)
        finally:
            self._slots.release()

    def discard(self, conn: Any) -> None:
        """Drop ``conn`` (called from inside ``connection()``) and every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
            if conn in idle:
                idle.remove(conn)
        for c in [*idle, conn]:
            with contextlib.suppress(Exception):
                c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            with contextlib.suppress(Exception):
                c.close()


# ---- the transaction runner --------------------------------------------------------------
class Connection:
    """The engine's way to the server: one schema, a pool, and transactions retried as needed."""

    def __init__(self, uri: str, namespace: str, pool_size: int, retry_seconds: float, where: str) -> None:
        import adbc_driver_manager

        self.errors: tuple[type[BaseException], ...] = (adbc_driver_manager.Error,)
        self.namespace = namespace
        self.retry_seconds = retry_seconds
        #: Names the database in error messages (never holds a secret: see ``url``).
        self.where = where
        #: Transactions run again after a transient failure (deadlock, serialization, lost
        #: connection), counted for the benchmarks.
        self.retries = 0
        # A lock key per namespace for the visit registry and partition DDL (collisions are harmless).
        digest = hashlib.blake2b(namespace.encode(), digest_size=4).digest()
        self.lock_space = int.from_bytes(digest, "big", signed=True)
        self._pool = Pool(uri, namespace, pool_size)
        # The transaction a thread has pinned (a read snapshot, a compaction): every call of
        # ``run`` from that thread joins it instead of starting its own.
        self._pinned = threading.local()

    @contextlib.contextmanager
    def pin(self, cur: Any) -> Iterator[None]:
        """Inside, this thread's ``run`` calls execute on ``cur``, in its transaction."""
        previous = getattr(self._pinned, "cur", None)
        self._pinned.cur = cur
        try:
            yield
        finally:
            self._pinned.cur = previous

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One REPEATABLE READ, read-only transaction that this thread's reads inside join:
        they all see the same committed state (a compaction commits wholly before or after)."""
        if getattr(self._pinned, "cur", None) is not None:
            yield  # already inside a transaction of this thread
            return
        try:
            with self._pool.connection() as conn:
                cur = conn.cursor()
                try:
                    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    with self.pin(cur):
                        yield
                finally:
                    with contextlib.suppress(Exception):
                        cur.close()
                    with contextlib.suppress(Exception):
                        conn.rollback()
        except self.errors as e:
            raise StorageError(f"PostgreSQL read snapshot failed on {self.where}: {e}") from e

    def t(self, name: str) -> str:
        """The schema-qualified, quoted name of a table."""
        return f"{q(self.namespace)}.{q(name)}"

    def classify(self, e: BaseException) -> Retry | None:
        """Whether (and how) the transaction that raised ``e`` is run again."""
        state = getattr(e, "sqlstate", None) or ""
        if state in RETRY_STATES:
            return Retry(False, e)
        # Two writers replacing the latest version of one object at once: run it again, the
        # retry sees the other's committed row and replaces it.
        if state == "23505" and _constraint(e).startswith(LATEST_TABLE):
            return Retry(False, e)
        if state in RECONNECT_STATES or state.startswith(RECONNECT_CLASSES):
            return Retry(True, e)
        if not state:
            # libpq reports lost or refused connections without a SQLSTATE; authentication and
            # naming errors (no such role or database, bad password) are not retried.
            text = str(e).lower()
            if any(marker in text for marker in TRANSIENT_MARKERS):
                return Retry(True, e)
        return None

    def run(self, what: str, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction, committed at the end; retried as needed.
        A failure that is not retried is a StorageError whose ``__cause__`` is the driver's."""
        pinned = getattr(self._pinned, "cur", None)
        if pinned is not None:  # inside a pinned transaction: its owner commits and retries
            try:
                return work(pinned)
            except self.errors as e:
                raise StorageError(f"PostgreSQL {what} failed on {self.where}: {e}") from e
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                with self._pool.connection() as conn:
                    cur = conn.cursor()
                    try:
                        result = work(cur)
                    except self.errors as e:
                        retry = self.classify(e)
                        if retry is None:
                            raise
                        if retry.reconnect:
                            with contextlib.suppress(Exception):
                                cur.close()
                            self._pool.discard(conn)
                        raise retry from e
                    finally:
                        with contextlib.suppress(Exception):
                            cur.close()
                    try:
                        conn.commit()
                    except self.errors as e:
                        retry = self.classify(e)
                        if retry is None:
                            raise
                        if retry.reconnect:
                            self._pool.discard(conn)
                        raise retry from e
                    return result
            except Retry as r:
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"PostgreSQL {what} failed on {self.where}: {r}") from r.__cause__
                self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except self.errors as e:
                retry = self.classify(e)  # connect() failed: the server may be restarting
                if retry is None or not retry.reconnect or time.monotonic() + delay > deadline:
                    raise StorageError(f"PostgreSQL {what} failed on {self.where}: {e}") from e
                self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def fetch(self, sql: str, values: Sequence[Any] = ()) -> pa.Table:
        """Run one read-only statement and return its rows as Arrow (search_path = the schema)."""

        def work(cur: Any) -> pa.Table:
            cur.execute(sql, parameters=params(*values) if values else None)
            result: pa.Table = cur.fetch_arrow_table()
            return result

        return self.run("read", work)

    def read(self, what: str, sql: str, settings: Mapping[str, str] | None = None) -> pa.Table:
        """One parameter-free read; its values are bound as transaction-local settings."""

        def work(cur: Any) -> pa.Table:
            apply_settings(cur, settings or {})
            cur.execute(sql)
            result: pa.Table = cur.fetch_arrow_table()
            return result

        return self.run(what, work)

    def lock_layout(self, cur: Any) -> None:
        """Take the schema's advisory lock that partition DDL, retention and layout upgrades
        hold to commit: no partition appears or goes meanwhile."""
        cur.execute("SELECT pg_advisory_xact_lock($1::integer, 0)", parameters=params(self.lock_space))
        cur.fetchall()

    def hold_off_compaction(self, cur: Any) -> None:
        """Take the compaction lock shared (a compaction holds it alone): a daytime change to
        source rows then never lands between a compaction's read of a row and its delete."""
        cur.execute("SELECT pg_advisory_xact_lock_shared($1::integer, 1)", parameters=params(self.lock_space))
        cur.fetchall()

    def exists(self) -> bool:
        """Whether the schema holds an APDB (its metadata table)."""
        t = self.fetch(
            "SELECT to_regclass(format('%I.%I', $1::text, 'diadb_metadata')) IS NOT NULL AS e",
            [self.namespace],
        )
        return bool(t.column(0)[0].as_py())

    def close(self) -> None:
        self._pool.close()
