"""The distributed engine: Apache Cassandra (4.1 / 5.0) through the DataStax Python driver.

Layout (one keyspace per APDB):

``DiaSource_<N>``, ``DiaForcedSource_<N>``
    One table per time partition ``N = floor(midpointMjdTai / time_partition_days)``, partition
    key ``apdb_part`` (the HEALPix nested pixel of the row at ``pixel_order``), clustered by
    ``(_healpix_29, midpointMjdTai, primary key)``. So a (coarse pixel, time partition) pair is
    one Cassandra partition, a visit's read is one slice query per covering pair, all issued
    concurrently as prepared statements routed to a replica (token-aware), and dropping history
    beyond the window is ``DROP TABLE`` (no tombstones). A storage-attached index (SAI) on
    ``diaObjectId`` serves reads by object id.
``diadb_DiaObjectLatest``
    The latest version of each object, partitioned by ``apdb_part``, clustered by
    ``(_healpix_29, diaObjectId)``.
``DiaObject``
    Every version (``validityEndMjdTai`` of the previous one is set when a new one arrives),
    partitioned by ``diaObjectId >> id_bucket_bits``.
``diadb_<table>_keys``
    Primary-key registries of DiaSource / DiaForcedSource (which store call wrote each key:
    keys stored by another visit are refused, as a unique constraint would) and of DiaObject
    (where the latest version of each object lives).
``diadb_visit``, ``diadb_metadata``
    The visit registry and the frozen metadata (schema, config, this layout's parameters).
``apdb_packed``
    In keyspaces made with ``packed=1`` (the default), the fixed-width columns of the source and
    object tables that no query filters on and no update changes live in one blob per row (see
    :mod:`diadb.backends.common.packing`): Cassandra's cost is per cell, and this makes a
    DiaSource row ~20 cells instead of 103. The packed list is frozen in the metadata; older
    keyspaces have none.

Writes are grouped by partition into unlogged batches (one partition each, so each batch is
applied atomically on its replicas) and sent concurrently. A store writes the key claims, then
the rows, then the object key registry, then its change-log chunk (one lightweight transaction,
see ``diadb.backends.cassandra_changes``) and finally the visit registry entry: a store that
failed half-way is completed by storing the same visit again (every write is an idempotent
upsert, and the retry reuses the chunk the failed attempt may have taken). There are no
multi-partition transactions: readers can see a visit's rows before the visit is registered,
and a store that is never retried leaves its partial rows in place.

Reads: the driver's Cython row parser builds the tuples, the columns are assembled into Arrow
arrays with one ``pyarrow.array`` call each and the packed blobs with one ``numpy.frombuffer``
(no Python loop over rows in diadb).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array, ReadTable, TableStats, TimeWindow, VisitBatch
from diadb.backends.cassandra_changes import CassandraChanges, change_log_ddl
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.common.packing import PACKED, RowPacker, packed_columns
from diadb.config import ApdbConfig
from diadb.errors import ConfigError, StorageError
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, TableSpec
from diadb.sky.healpix import coarsen_ranges

HISTORY_TABLE = "DiaObject"
SOURCE_TABLES = ("DiaSource", "DiaForcedSource")
TIME_COLUMN = "midpointMjdTai"
PART = "apdb_part"
BUCKET = "apdb_bucket"
STORED_VISIT = "apdb_stored_visit"
STORED_DETECTOR = "apdb_stored_detector"
DEFAULT_PORT = 9042

_CQL_TYPES: dict[str, str] = {
    "boolean": "boolean",
    "byte": "tinyint",
    "short": "smallint",
    "int": "int",
    "long": "bigint",
    "float": "float",
    "double": "double",
    "char": "text",
    "string": "text",
    "unicode": "text",
    "text": "text",
    "binary": "blob",
    "timestamp": "bigint",  # microseconds since the Unix epoch, UTC (lossless; CQL timestamp is ms)
}
_KEYSPACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
_CONSISTENCY = ("ONE", "TWO", "THREE", "QUORUM", "LOCAL_QUORUM", "LOCAL_ONE", "EACH_QUORUM", "ALL")
# Layout parameters frozen into diadb_metadata at creation (URL values are ignored on open).
_LAYOUT_KEYS = ("pixel_order", "time_partition_days", "id_bucket_bits")


def q(name: str) -> str:
    """Quote a CQL identifier (case-sensitive)."""
    return '"' + name.replace('"', '""') + '"'


def cql_type(datatype: str) -> str:
    try:
        return _CQL_TYPES[datatype]
    except KeyError:
        raise StorageError(f"Felis datatype {datatype!r} has no Cassandra mapping") from None


def storage_arrow_type(datatype: str) -> pa.DataType:
    """The Arrow type of a column as this backend reads it back (the facade casts to the schema)."""
    from diadb.schema.types import arrow_type

    return pa.int64() if datatype == "timestamp" else arrow_type(datatype)


@dataclass(frozen=True)
class CassandraUrl:
    hosts: tuple[str, ...]
    port: int
    keyspace: str
    params: dict[str, str]


def parse_url(url: str) -> CassandraUrl:
    """``cassandra://host1,host2:9042/keyspace?rf=3&consistency=QUORUM``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.split("+", 1)[0].lower() != "cassandra":
        raise ConfigError(f"not a Cassandra URL: {url!r}")
    netloc = parts.netloc
    port = DEFAULT_PORT
    if ":" in netloc.rsplit(",", 1)[-1]:
        netloc, port_text = netloc.rsplit(":", 1)
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"bad port {port_text!r} in {url!r}") from None
    hosts = tuple(h for h in netloc.split(",") if h)
    keyspace = parts.path.lstrip("/")
    if not hosts or not keyspace:
        raise ConfigError(
            f"Cassandra URL {url!r} needs hosts and a keyspace: cassandra://host1,host2:9042/ks"
        )
    if not _KEYSPACE_RE.match(keyspace):
        raise ConfigError(f"bad keyspace name {keyspace!r}: letters, digits and _, at most 48, letter first")
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return CassandraUrl(hosts, port, keyspace, params)


@dataclass(frozen=True)
class _Options:
    rf: int | None
    read_consistency: str | None
    write_consistency: str | None
    pixel_order: int
    time_partition_days: float
    id_bucket_bits: int
    auto_partitions: bool
    concurrency: int
    batch_bytes: int
    timeout: float
    max_slices: int
    scan_pixels: int
    scan_splits: int
    speculative_retry: str
    compression: bool
    packed: bool


def _options(params: Mapping[str, Any]) -> _Options:
    known = {
        "rf",
        "consistency",
        "read_consistency",
        "write_consistency",
        "pixel_order",
        "time_partition_days",
        "id_bucket_bits",
        "auto_partitions",
        "concurrency",
        "batch_bytes",
        "timeout",
        "max_slices",
        "scan_pixels",
        "scan_splits",
        "speculative_retry",
        "compression",
        "packed",
    }
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"unknown Cassandra option(s) {unknown}; known: {sorted(known)}")

    def cl(name: str) -> str | None:
        value = params.get(name, params.get("consistency"))
        if value is None:
            return None
        text = str(value).upper()
        if text not in _CONSISTENCY:
            raise ConfigError(f"{name} must be one of {_CONSISTENCY}, got {value!r}")
        return text

    def number(name: str, default: float, lo: float, hi: float, kind: type = int) -> Any:
        try:
            value = kind(params.get(name, default))
        except (TypeError, ValueError):
            raise ConfigError(f"Cassandra option {name} must be a number, got {params[name]!r}") from None
        if not (lo <= value <= hi):
            raise ConfigError(f"Cassandra option {name} must be in [{lo}, {hi}], got {value}")
        return value

    compression = str(params.get("compression", "none")).lower()
    if compression not in ("none", "lz4"):
        raise ConfigError(f"compression must be none or lz4, got {compression!r}")
    auto = str(params.get("auto_partitions", "1")).lower()
    if auto not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"auto_partitions must be true or false, got {auto!r}")
    packed = str(params.get("packed", "1")).lower()
    if packed not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"packed must be true or false, got {packed!r}")
    return _Options(
        rf=None if params.get("rf") is None else number("rf", 1, 1, 20),
        read_consistency=cl("read_consistency"),
        write_consistency=cl("write_consistency"),
        pixel_order=number("pixel_order", 6, 0, 14),
        time_partition_days=number("time_partition_days", 30.0, 0.01, 3650.0, float),
        id_bucket_bits=number("id_bucket_bits", 16, 0, 40),
        auto_partitions=auto in ("1", "true", "yes"),
        concurrency=number("concurrency", 16, 1, 2048),
        batch_bytes=number("batch_bytes", 40_000, 1_000, 10_000_000),
        timeout=number("timeout", 60.0, 1.0, 3600.0, float),
        max_slices=number("max_slices", 8, 1, 1000),
        scan_pixels=number("scan_pixels", 2000, 1, 10_000_000),
        scan_splits=number("scan_splits", 32, 1, 100_000),
        speculative_retry=_speculative(str(params.get("speculative_retry", "MIN(99p,50ms)"))),
        compression=compression == "lz4",
        packed=packed in ("1", "true", "yes"),
    )


def _speculative(text: str) -> str:
    if not re.fullmatch(r"(?i)[A-Z0-9(),.\s]+", text):
        raise ConfigError(f"speculative_retry {text!r} is not a Cassandra speculative_retry value")
    return text


def _columnar_factory(colnames: list[str], rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Keep the driver's (Cython-parsed) tuples as they are; columns are built per result."""
    return rows


def _retry_policy() -> Any:
    """Retry timeouts and unavailable errors on the next host, up to 3 times: every statement
    diadb sends is idempotent, and a node that just died is not yet known as down."""
    from cassandra.policies import RetryPolicy  # type: ignore[import-untyped]

    class RetryIdempotent(RetryPolicy):  # type: ignore[misc]
        def on_read_timeout(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, consistency) if retry_num < 3 else (self.RETHROW, None)

        def on_write_timeout(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, consistency) if retry_num < 3 else (self.RETHROW, None)

        def on_unavailable(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, consistency) if retry_num < 3 else (self.RETHROW, None)

        def on_request_error(
            self, query: Any, consistency: Any, *args: Any, retry_num: int = 0, **kw: Any
        ) -> Any:
            return (self.RETRY_NEXT_HOST, consistency) if retry_num < 3 else (self.RETHROW, None)

    return RetryIdempotent()


class _AlreadyStored(Exception):
    """Internal: the visit/detector is in the registry."""


class CassandraBackend(CassandraChanges):
    """Cassandra through the DataStax driver. See the module docstring for the layout."""

    #: ``Apdb.store(key=...)`` is supported (a key registry and chunk membership).
    supports_store_key = True

    def __init__(self, url: str, *, create: bool, **options: Any) -> None:
        # The driver ships no type information (mypy's missing-stubs check is silenced here).
        from cassandra import ConsistencyLevel  # type: ignore[import-untyped]
        from cassandra.cluster import (  # type: ignore[import-untyped]
            EXEC_PROFILE_DEFAULT,
            Cluster,
            ExecutionProfile,
        )
        from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

        self.url = url
        parsed = parse_url(url)
        self.keyspace = parsed.keyspace
        self._opts = _options({**parsed.params, **options})
        self._schema: ApdbSchema | None = None
        self._prepared: dict[str, Any] = {}
        self._partitions: set[str] = set()
        self._storing: tuple[int, int] | None = None
        self._chunk_bucket: int | None = None
        #: Packed columns per logical table (frozen in the metadata; none in older keyspaces).
        self._packer = RowPacker(lambda: self.schema)
        self._lock = threading.Lock()
        self._cluster = Cluster(
            list(parsed.hosts),
            port=parsed.port,
            protocol_version=5,
            # Off by default: on a LAN (or loopback) LZ4 frames cost CPU on both ends, which is
            # the scarce resource, for little saved bandwidth.
            compression="lz4" if self._opts.compression else False,
            execution_profiles={
                EXEC_PROFILE_DEFAULT: ExecutionProfile(
                    load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
                    row_factory=_columnar_factory,
                    request_timeout=self._opts.timeout,
                    retry_policy=_retry_policy(),
                )
            },
            connect_timeout=10,
            control_connection_timeout=10,
            max_schema_agreement_wait=60,
        )
        try:
            self._session = self._cluster.connect()
        except Exception as e:
            self._cluster.shutdown()
            raise StorageError(f"cannot connect to Cassandra at {parsed.hosts}:{parsed.port}: {e}") from e
        self._session.default_fetch_size = 20_000
        self._cl = ConsistencyLevel
        n_hosts = max(1, len(self._cluster.metadata.all_hosts()))
        try:
            exists = self._keyspace_exists()
            meta = self._read_metadata_raw() if exists else {}
            if create:
                if meta:
                    raise ConfigError(
                        f"keyspace {self.keyspace} already exists and holds an APDB; use Apdb.open to use it"
                    )
                self.rf = self._opts.rf or min(3, n_hosts)
                self.pixel_order = self._opts.pixel_order
                self.time_partition_days = self._opts.time_partition_days
                self.id_bucket_bits = self._opts.id_bucket_bits
            else:
                if not meta:
                    raise ConfigError(
                        f"no APDB in keyspace {self.keyspace} at {url}; use Apdb.create to make one"
                    )
                self.rf = int(meta.get("cassandra.replication_factor", "1"))
                self.pixel_order = int(meta["cassandra.pixel_order"])
                self.time_partition_days = float(meta["cassandra.time_partition_days"])
                self.id_bucket_bits = int(meta["cassandra.id_bucket_bits"])
                self._packer.set(json.loads(meta.get("cassandra.packed_columns", "{}")))
        except BaseException:
            self._cluster.shutdown()
            raise
        default_cl = "ONE" if self.rf == 1 else "QUORUM"
        self.read_consistency = self._opts.read_consistency or default_cl
        self.write_consistency = self._opts.write_consistency or default_cl
        self._read_cl = getattr(ConsistencyLevel, self.read_consistency)
        self._write_cl = getattr(ConsistencyLevel, self.write_consistency)

    # ---- helpers -------------------------------------------------------------------
    @property
    def schema(self) -> ApdbSchema:
        if self._schema is None:
            raise StorageError("backend used before its schema was attached")
        return self._schema

    def _t(self, table: str) -> str:
        return f"{q(self.keyspace)}.{q(table)}"

    def _keyspace_exists(self) -> bool:
        rows = self._session.execute(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s", [self.keyspace]
        )
        return bool(list(rows))

    def _table_names(self) -> set[str]:
        rows = self._session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", [self.keyspace]
        )
        return {r[0] for r in rows}

    def _read_metadata_raw(self) -> dict[str, str]:
        if "diadb_metadata" not in self._table_names():
            return {}
        rows = self._session.execute(f"SELECT key, value FROM {self._t('diadb_metadata')}")
        return {str(k): str(v) for k, v in rows}

    def _prepare(self, cql: str) -> Any:
        stmt = self._prepared.get(cql)
        if stmt is None:
            with self._lock:
                stmt = self._prepared.get(cql)
                if stmt is None:
                    try:
                        stmt = self._session.prepare(cql)
                    except Exception as e:
                        raise StorageError(f"Cassandra cannot prepare {cql[:200]!r}: {e}") from e
                    # Every statement diadb sends is a read or an upsert/delete of fixed values:
                    # the driver may retry it on another replica after a node failure.
                    stmt.is_idempotent = True
                    self._prepared[cql] = stmt
        return stmt

    def _ddl(self, cql: str) -> None:
        if cql.startswith("CREATE TABLE"):
            # A read waits for a replica that just died only this long before asking another.
            cql += f" WITH speculative_retry = '{self._opts.speculative_retry}'"
        try:
            self._session.execute(cql, timeout=120)
        except Exception as e:
            raise StorageError(f"Cassandra schema change failed ({cql[:120]}...): {e}") from e

    def _run(self, statements: Sequence[tuple[Any, Sequence[Any]]], *, write: bool) -> list[list[Any]]:
        """Execute concurrently; every statement's rows (all pages), in statement order."""
        from cassandra.concurrent import execute_concurrent  # type: ignore[import-untyped]

        if not statements:
            return []
        level = self._write_cl if write else self._read_cl
        for stmt, _ in statements:
            stmt.consistency_level = level
        from cassandra.cluster import NoHostAvailable

        for attempt in range(4):
            try:
                results = execute_concurrent(
                    self._session,
                    statements,
                    concurrency=self._opts.concurrency,
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

    def _bucket(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64) >> self.id_bucket_bits

    def _pixel(self, h29: np.ndarray) -> np.ndarray:
        return (np.asarray(h29, dtype=np.int64) >> (2 * (29 - self.pixel_order))).astype(np.int32)

    def time_partition(self, mjd: float | np.ndarray) -> Any:
        """The time partition number(s) of MJD TAI value(s)."""
        return np.floor(np.asarray(mjd, dtype=np.float64) / self.time_partition_days).astype(np.int64)

    # ---- set-up --------------------------------------------------------------------
    def _columns_ddl(self, spec: TableSpec) -> list[str]:
        packed = set(self._packer.packed.get(spec.name, ()))
        cols = [f"{q(c.name)} {cql_type(c.datatype)}" for c in spec.columns if c.name not in packed]
        return cols + [f"{q(HEALPIX_COLUMN)} bigint"] + ([f"{PACKED} blob"] if packed else [])

    # ---- packed columns (see diadb.backends.common.packing) ------------------------------------
    def _decode(self, table: str, columns: Sequence[str], rows: list[Any]) -> pa.Table:
        """Rows selected with ``self._packer.physical(table, columns)`` -> an Arrow table of ``columns``."""
        types = {c.name: c.datatype for c in self.schema.table(table).columns}
        raw = self._to_arrow({**types, PACKED: "binary"}, self._packer.physical(table, columns), rows)
        return self._packer.expand(table, raw, columns)

    def _key_table_ddl(self, name: str, key: Sequence[str], spec: TableSpec) -> str:
        """Primary-key registry: one column key -> bucketed; (id, a, b) -> partition (a, b)."""
        types = {c: cql_type(spec.column(c).datatype) for c in key}
        cols = [f"{q(c)} {types[c]}" for c in key]
        if len(key) == 1:
            cols.insert(0, f"{BUCKET} bigint")
            pk = f"(({BUCKET}), {q(key[0])})"
        else:
            pk = f"(({', '.join(map(q, key[1:]))}), {q(key[0])})"
        cols += [f"{STORED_VISIT} bigint", f"{STORED_DETECTOR} int"]
        if name == "DiaObject":
            cols += [f"{PART} int", f"{q(HEALPIX_COLUMN)} bigint", f"{q('validityStartMjdTai')} double"]
        else:  # where the row lives (daytime updates find it by key)
            cols += [f"{q(HEALPIX_COLUMN)} bigint", f"{q(TIME_COLUMN)} double"]
        table = self._t(f"diadb_{name}_keys")
        return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)}, PRIMARY KEY {pk})"

    def initialize(self, schema: ApdbSchema, metadata: Mapping[str, str]) -> None:
        self._schema = schema
        if self._opts.packed:
            self._packer.set({t: packed_columns(schema.table(t)) for t in ("DiaObject", *SOURCE_TABLES)})
        self._ddl(
            f"CREATE KEYSPACE IF NOT EXISTS {q(self.keyspace)} WITH replication = "
            f"{{'class': 'NetworkTopologyStrategy', 'replication_factor': {self.rf}}}"
        )
        obj = schema.table("DiaObject")
        cols = self._columns_ddl(obj)
        ddl = [
            f"CREATE TABLE IF NOT EXISTS {self._t('diadb_metadata')} (key text PRIMARY KEY, value text)",
            f"CREATE TABLE IF NOT EXISTS {self._t('diadb_visit')} (visit bigint, detector int, "
            "visit_mjd_tai double, stored_at timestamp, n_objects int, n_sources int, n_forced_sources int, "
            "chunk_id bigint, PRIMARY KEY ((visit), detector))",
            f"CREATE TABLE IF NOT EXISTS {self._t(HISTORY_TABLE)} ({', '.join(cols)}, {BUCKET} bigint, "
            f"PRIMARY KEY (({BUCKET}), {q('diaObjectId')}, {q('validityStartMjdTai')}))",
            f"CREATE TABLE IF NOT EXISTS {self._t(LATEST_TABLE)} ({', '.join(cols)}, {PART} int, "
            f"PRIMARY KEY (({PART}), {q(HEALPIX_COLUMN)}, {q('diaObjectId')}))",
            self._key_table_ddl("DiaObject", ("diaObjectId",), obj),
            *change_log_ddl(self._t),
        ]
        for name in SOURCE_TABLES:
            spec = schema.table(name)
            ddl.append(self._key_table_ddl(name, spec.primary_key, spec))
        for stmt in ddl:
            self._ddl(stmt)
        layout = {
            "cassandra.replication_factor": str(self.rf),
            "cassandra.pixel_order": str(self.pixel_order),
            "cassandra.time_partition_days": repr(self.time_partition_days),
            "cassandra.id_bucket_bits": str(self.id_bucket_bits),
            "cassandra.packed_columns": json.dumps(self._packer.packed),
        }
        ins = self._prepare(f"INSERT INTO {self._t('diadb_metadata')} (key, value) VALUES (?, ?)")
        # The schema YAML is written last: its presence marks a complete APDB.
        items = [(k, v) for k, v in {**layout, **metadata}.items() if k != "felis.schema_yaml"]
        self._run([(ins, kv) for kv in items], write=True)
        if "felis.schema_yaml" in metadata:
            self._run([(ins, ("felis.schema_yaml", metadata["felis.schema_yaml"]))], write=True)

    def read_metadata(self) -> dict[str, str]:
        return self._read_metadata_raw()

    def configure(self, config: ApdbConfig) -> None:
        """Nothing in the frozen config concerns this engine (its options are in the URL)."""

    def counters(self) -> dict[str, int]:
        """Event counters since open."""
        return {}

    def attach_schema(self, schema: ApdbSchema) -> None:
        self._schema = schema

    # ---- time partitions -----------------------------------------------------------
    @staticmethod
    def _partition_table(table: str, part: int) -> str:
        return f"{table}_{int(part)}"

    def time_partitions(self) -> dict[str, list[int]]:
        """The existing time partitions of each source table (partition numbers)."""
        names = self._table_names()
        with self._lock:
            self._partitions = names
        found: dict[str, list[int]] = {t: [] for t in SOURCE_TABLES}
        for n in names:
            for t in SOURCE_TABLES:
                m = re.fullmatch(re.escape(t) + r"_(-?\d+)", n)
                if m:
                    found[t].append(int(m.group(1)))
        return {t: sorted(v) for t, v in found.items()}

    def time_partition_span(self, part: int) -> tuple[float, float]:
        """``[start, end)`` in MJD TAI of time partition ``part``."""
        return part * self.time_partition_days, (part + 1) * self.time_partition_days

    def create_time_partitions(self, start_mjd: float, end_mjd: float) -> list[str]:
        """Create (ahead of time) the partition tables covering ``[start_mjd, end_mjd]``;
        returns the tables created. Safe to repeat; run it from one process (schema changes
        from many concurrent clients can disagree)."""
        first, last = int(self.time_partition(start_mjd)), int(self.time_partition(end_mjd))
        return self._ensure_partitions(range(first, last + 1))

    def drop_time_partitions(self, before_mjd: float) -> list[str]:
        """Drop the partition tables whose whole span ends at or before ``before_mjd``
        (e.g. ``visit_time - 30 * history_months``); returns the tables dropped."""
        dropped = []
        for table, parts in self.time_partitions().items():
            for p in parts:
                if self.time_partition_span(p)[1] <= before_mjd:
                    name = self._partition_table(table, p)
                    self._ddl(f"DROP TABLE IF EXISTS {self._t(name)}")
                    dropped.append(name)
        with self._lock:
            self._partitions -= set(dropped)
        return dropped

    def _ensure_partitions(self, parts: Iterable[int]) -> list[str]:
        wanted = [self._partition_table(t, p) for p in sorted(set(parts)) for t in SOURCE_TABLES]
        if all(w in self._partitions for w in wanted):
            return []
        existing = self._table_names()
        created = []
        for name in wanted:
            if name in existing:
                continue
            table = name.rsplit("_", 1)[0]
            spec = self.schema.table(table)
            key = (q(HEALPIX_COLUMN), q(TIME_COLUMN), *(q(c) for c in spec.primary_key))
            self._ddl(
                f"CREATE TABLE IF NOT EXISTS {self._t(name)} ({', '.join(self._columns_ddl(spec))}, "
                f"{PART} int, PRIMARY KEY (({PART}), {', '.join(key)}))"
            )
            for index, column in (("_object", "diaObjectId"), ("_visit", "visit")):
                # visit: the change log finds a store's rows by it.
                self._ddl(
                    f"CREATE INDEX IF NOT EXISTS {q(name + index)} ON {self._t(name)} "
                    f"({q(column)}) USING 'sai'"
                )
            created.append(name)
        with self._lock:
            self._partitions = existing | set(created)
        return created

    # ---- reads ---------------------------------------------------------------------
    def _to_arrow(self, spec_columns: Mapping[str, str], columns: Sequence[str], rows: list[Any]) -> pa.Table:
        """Rows (tuples in ``columns`` order) -> an Arrow table, one C-level conversion per column."""
        types = [pa.int64() if c == HEALPIX_COLUMN else storage_arrow_type(spec_columns[c]) for c in columns]
        if not rows:
            return pa.table({c: pa.array([], type=t) for c, t in zip(columns, types, strict=True)})
        cols = list(zip(*rows, strict=True))
        return pa.table(
            {c: pa.array(v, type=t, from_pandas=False) for c, v, t in zip(columns, cols, types, strict=True)}
        )

    def _slices(self, ranges: Int64Array) -> list[tuple[int, int, int]] | None:
        """(coarse pixel, lo, hi) slices covering ``ranges``, at most ``max_slices`` per pixel;
        ``None`` when they touch more than ``scan_pixels`` pixels (a token-range scan is cheaper)."""
        shift = 2 * (29 - self.pixel_order)
        r = np.asarray(ranges, dtype=np.int64)
        first = r[:, 0] >> shift
        last = (r[:, 1] - 1) >> shift
        counts = last - first + 1
        if (
            int(counts.sum()) > 4 * self._opts.scan_pixels
            or len(np.unique(np.concatenate([first, last]))) > self._opts.scan_pixels
        ):
            return None
        # Split ranges at pixel boundaries: one row per (range, pixel) pair.
        idx = np.repeat(np.arange(len(r)), counts)
        offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        pix = first[idx] + offs
        if len(np.unique(pix)) > self._opts.scan_pixels:
            return None
        lo = np.maximum(r[idx, 0], pix << shift)
        hi = np.minimum(r[idx, 1], (pix + 1) << shift)
        out: list[tuple[int, int, int]] = []
        for (p,), members in _groups([pix]):
            merged = coarsen_ranges(np.stack([lo[members], hi[members]], axis=1), self._opts.max_slices)
            out.extend((p, int(a), int(b)) for a, b in merged)
        return out

    def _token_ranges(self) -> list[tuple[int, int]]:
        """``(lo, hi]`` Murmur3 token ranges splitting the ring into ``scan_splits`` pieces."""
        n = self._opts.scan_splits
        edges = [-(2**63) + (2**64 * i) // n for i in range(n + 1)]
        edges[-1] = 2**63 - 1
        # Murmur3 never yields -2**63 as a token, so (-2**63, 2**63 - 1] is the whole ring.
        return [(edges[i], edges[i + 1]) for i in range(n)]

    def select(
        self,
        table: ReadTable,
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None = None,
        object_ids: Int64Array | None = None,
    ) -> pa.Table:
        spec = self.schema.table(table)
        types = {c.name: c.datatype for c in spec.columns}
        want = list(columns)
        extra = [HEALPIX_COLUMN]
        if table != "DiaObject":
            extra.append(TIME_COLUMN)
        if object_ids is not None:
            extra.append("diaObjectId")
        fetch = list(dict.fromkeys([*want, *extra]))
        select_list = ", ".join(q(c) for c in self._packer.physical(table, fetch))
        ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        ids = None if object_ids is None else np.unique(np.asarray(object_ids, dtype=np.int64))
        physical = [LATEST_TABLE] if table == "DiaObject" else self._read_partitions(table, window)
        statements: list[tuple[Any, Sequence[Any]]] = []
        slices = self._slices(ranges) if len(ranges) else None
        if len(ranges) and slices is None:
            # Large regions: scan the tables by token range (concurrently), filter below.
            for name in physical:
                stmt = self._prepare(
                    f"SELECT {select_list} FROM {self._t(name)} "
                    f"WHERE token({PART}) > ? AND token({PART}) <= ?"
                )
                statements += [(stmt, tr) for tr in self._token_ranges()]
        elif slices is not None:
            for name in physical:
                stmt = self._prepare(
                    f"SELECT {select_list} FROM {self._t(name)} WHERE {PART} = ? "
                    f"AND {q(HEALPIX_COLUMN)} >= ? AND {q(HEALPIX_COLUMN)} < ?"
                )
                statements += [(stmt, s) for s in slices]
        elif ids is not None and len(ids):
            if table == "DiaObject":
                keys = self._lookup_keys("DiaObject", pa.table({"diaObjectId": ids}))
                h = np.unique(np.asarray(keys.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64))
                if not len(h):
                    return self._to_arrow(types, want, [])
                return self.select(table, np.stack([h, h + 1], axis=1), want, object_ids=ids)
            for name in physical:
                stmt = self._prepare(
                    f"SELECT {select_list} FROM {self._t(name)} WHERE {q('diaObjectId')} IN ? ALLOW FILTERING"
                )
                statements += [
                    (stmt, (chunk.tolist(),)) for chunk in np.array_split(ids, -(-len(ids) // 500))
                ]
        else:
            for name in physical:
                statements.append((self._prepare(f"SELECT {select_list} FROM {self._t(name)}"), ()))
        results = self._run(statements, write=False)
        rows = [row for rs in results for row in rs] if len(results) > 1 else (results[0] if results else [])
        data = self._decode(table, fetch, rows)
        mask = None
        if len(ranges) and data.num_rows:
            h = data.column(HEALPIX_COLUMN).to_numpy()
            pos = np.searchsorted(ranges[:, 0], h, side="right") - 1
            mask = (pos >= 0) & (h < ranges[np.clip(pos, 0, None), 1])
        if window is not None and data.num_rows:
            t = data.column(TIME_COLUMN).to_numpy()
            inside = (t > window.start) & (t <= window.end)
            mask = inside if mask is None else mask & inside
        if ids is not None and data.num_rows:
            inside = np.isin(data.column("diaObjectId").to_numpy(), ids)
            mask = inside if mask is None else mask & inside
        if mask is not None and not mask.all():
            data = data.filter(pa.array(mask))
        return data.select(want)

    def _read_partitions(self, table: str, window: TimeWindow | None) -> list[str]:
        parts = self.time_partitions()[table]
        if window is not None:
            lo = self.time_partition(window.start) if math.isfinite(window.start) else None
            hi = self.time_partition(window.end) if math.isfinite(window.end) else None
            parts = [p for p in parts if (lo is None or p >= lo) and (hi is None or p <= hi)]
        return [self._partition_table(table, p) for p in parts]

    def _lookup_keys(self, table: str, keys: pa.Table) -> pa.Table:
        """Rows of the ``table`` key registry matching ``keys`` (its primary-key columns)."""
        key = list(keys.column_names)
        reg = self._t(f"diadb_{table}_keys")
        extra = [STORED_VISIT, STORED_DETECTOR]
        if table == "DiaObject":
            extra += [PART, HEALPIX_COLUMN, "validityStartMjdTai"]
        else:
            extra += [HEALPIX_COLUMN, TIME_COLUMN]
        out_cols = [*key, *extra]
        sel = ", ".join(q(c) for c in out_cols)
        if not keys.num_rows:
            return self._to_arrow(self._key_types(table), out_cols, [])
        first = np.asarray(keys.column(key[0]).to_numpy(), dtype=np.int64)
        if len(key) == 1:
            stmt = self._prepare(f"SELECT {sel} FROM {reg} WHERE {BUCKET} = ? AND {q(key[0])} IN ?")
            group_cols = [self._bucket(first)]
        else:
            where = " AND ".join(f"{q(c)} = ?" for c in key[1:])
            stmt = self._prepare(f"SELECT {sel} FROM {reg} WHERE {where} AND {q(key[0])} IN ?")
            group_cols = [np.asarray(keys.column(c).to_numpy(), dtype=np.int64) for c in key[1:]]
        statements: list[tuple[Any, Sequence[Any]]] = []
        for group, members in _groups(group_cols):
            values = np.unique(first[members])
            for chunk in np.array_split(values, -(-len(values) // 500)):
                statements.append((stmt, (*group, chunk.tolist())))
        rows = [r for rs in self._run(statements, write=False) for r in rs]
        found = self._to_arrow(self._key_types(table), out_cols, rows)
        if len(key) > 1 and found.num_rows:
            found = found.join(keys, keys=key, join_type="left semi")
        return found

    def _key_types(self, table: str) -> dict[str, str]:
        types = {c.name: c.datatype for c in self.schema.table(table).columns}
        types.update({STORED_VISIT: "long", STORED_DETECTOR: "int", PART: "int", HEALPIX_COLUMN: "long"})
        return types

    def existing_keys(self, table: str, keys: pa.Table) -> pa.Table:
        """Keys already stored, except those claimed by the store in progress (or that last
        failed) in this process: a store that failed half-way owns its keys and may be retried."""
        name = "DiaObject" if table in ("DiaObjectLatest", "DiaObject") else table
        found = self._lookup_keys(name, keys)
        if self._storing is not None and found.num_rows:
            mine = pc.and_(
                pc.equal(found.column(STORED_VISIT), self._storing[0]),
                pc.equal(found.column(STORED_DETECTOR), self._storing[1]),
            )
            found = found.filter(pc.invert(mine))
        return found.select(keys.column_names)

    def known_object_ids(self, ids: Int64Array) -> Int64Array:
        found = self._lookup_keys("DiaObject", pa.table({"diaObjectId": np.unique(ids)}))
        return np.asarray(found.column("diaObjectId").to_numpy(), dtype=np.int64)

    def contains_visit_detector(self, visit: int, detector: int) -> bool:
        stmt = self._prepare(f"SELECT detector FROM {self._t('diadb_visit')} WHERE visit = ?")
        (rows,) = self._run([(stmt, (int(visit),))], write=False)
        dets = {r[0] for r in rows}
        return bool(dets) if detector == -1 else bool(dets & {int(detector), -1})

    # ---- writes --------------------------------------------------------------------
    def _writes(
        self, table: str, data: pa.Table, partition: Sequence[str], *, unset_nulls: bool
    ) -> list[tuple[Any, Sequence[Any]]]:
        """Upserts of ``data``'s rows into ``table`` as unlogged batches, one partition each."""
        if not data.num_rows:
            return []
        cols = data.column_names
        stmt = self._prepare(
            f"INSERT INTO {self._t(table)} ({', '.join(map(q, cols))}) VALUES ({', '.join('?' * len(cols))})"
        )
        return self._batches(stmt, data, partition, unset_nulls=unset_nulls)

    def _batches(
        self, stmt: Any, data: pa.Table, partition: Sequence[str], *, unset_nulls: bool
    ) -> list[tuple[Any, Sequence[Any]]]:
        """``stmt`` (prepared; its bind markers are ``data``'s columns, in order) once per row of
        ``data``, as unlogged batches of one Cassandra partition (``partition`` columns) each.

        The rows are sorted by partition once (Arrow), so each batch is a contiguous slice; the
        values are serialized column by column with NumPy (``_serialize``) and the batches are
        filled with those bytes directly: the driver's per-value Python binding (about 1.5 us a
        value, 3 s for a 10k-source visit) and any per-row Python loop are skipped."""
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
        values = [_serialize(data.column(i), k, unset_nulls) for i, k in enumerate(kinds)]
        rows = list(zip(*values, strict=True))
        per_batch = max(1, min(0xFFFF, self._opts.batch_bytes // max(1, data.nbytes // n)))
        routing = list(stmt.routing_key_indexes or [])
        query_id = stmt.query_id
        out: list[tuple[Any, Sequence[Any]]] = []
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

    def _check_registry(self, batch: VisitBatch) -> None:
        if batch.key is not None:
            stmt = self._prepare(f"SELECT chunk_id FROM {self._t('diadb_store_key')} WHERE key = ?")
            (rows,) = self._run([(stmt, (batch.key,))], write=False)
            if rows:
                raise _AlreadyStored
            return
        if batch.detector == -1:
            present = self.contains_visit_detector(batch.visit, -1)
        else:
            present = self.contains_visit_detector(batch.visit, batch.detector)
        if present:
            raise _AlreadyStored

    def _claims(self, batch: VisitBatch) -> list[tuple[Any, Sequence[Any]]]:
        """Key-registry rows for the batch's sources; StorageError if another store owns one."""
        out: list[tuple[Any, Sequence[Any]]] = []
        for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
            if not data.num_rows:
                continue
            pk = list(self.schema.table(name).primary_key)
            keys = data.select(pk)
            if len(pk) == 1:
                # One key column (DiaSource): looked up where the rows go (one query per
                # partition) rather than in the registry (one query per key bucket: sparse ids
                # made that one query per row, ~3 s for 10k sources).
                if self._taken_in_place(name, data, batch):
                    raise StorageError(
                        f"{name}: primary key already stored by another visit (visit {batch.visit})"
                    )
                found = keys.slice(0, 0)
            else:
                found = self._lookup_keys(name, keys)
            if found.num_rows:
                mine = pc.and_(
                    pc.equal(found.column(STORED_VISIT), batch.visit),
                    pc.equal(found.column(STORED_DETECTOR), batch.detector),
                )
                if not pc.all(mine).as_py():
                    raise StorageError(
                        f"{name}: primary key already stored by another visit (visit {batch.visit})"
                    )
            n = keys.num_rows
            claims = keys.append_column(STORED_VISIT, pa.array(np.full(n, batch.visit, np.int64)))
            claims = claims.append_column(STORED_DETECTOR, pa.array(np.full(n, batch.detector, np.int32)))
            claims = claims.append_column(HEALPIX_COLUMN, data.column(HEALPIX_COLUMN))
            claims = claims.append_column(TIME_COLUMN, data.column(TIME_COLUMN))
            if len(pk) == 1:
                bucket = self._bucket(keys.column(0).to_numpy())
                claims = claims.append_column(BUCKET, pa.array(bucket))
                part = [BUCKET]
            else:
                part = pk[1:]
            out += self._writes(f"diadb_{name}_keys", claims, part, unset_nulls=False)
        return out

    def _taken_in_place(self, name: str, data: pa.Table, batch: VisitBatch) -> bool:
        """Whether a row of ``data`` has a key already stored by another visit at the same place
        (time partition, order-29 pixel): one ``IN`` query per Cassandra partition written."""
        key = self.schema.table(name).primary_key[0]
        tparts = self.time_partition(data.column(TIME_COLUMN).to_numpy())
        h29 = np.asarray(data.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        pix = self._pixel(h29)
        known = self._partitions or self._table_names()
        statements: list[tuple[Any, Sequence[Any]]] = []
        for (tp, p), members in _groups([tparts, pix.astype(np.int64)]):
            table = self._partition_table(name, tp)
            if table not in known:  # the partition table is new: nothing stored there yet
                continue
            stmt = self._prepare(
                f"SELECT {q(key)}, visit, detector FROM {self._t(table)} WHERE {PART} = ? "
                f"AND {q(HEALPIX_COLUMN)} IN ?"
            )
            values = np.unique(h29[members])
            for chunk in np.array_split(values, -(-len(values) // 1000)):
                statements.append((stmt, (p, chunk.tolist())))
        ids = set(np.asarray(data.column(key).to_numpy(), dtype=np.int64).tolist())
        for rows in self._run(statements, write=False):
            for k, visit, detector in rows:
                if k in ids and (
                    visit != batch.visit or (batch.detector != -1 and detector != batch.detector)
                ):
                    return True
        return False

    def _source_writes(self, name: str, data: pa.Table) -> list[tuple[Any, Sequence[Any]]]:
        if not data.num_rows:
            return []
        tparts = self.time_partition(data.column(TIME_COLUMN).to_numpy())
        self._ensure_partitions_or_fail(name, np.unique(tparts))
        data = data.append_column(PART, pa.array(self._pixel(data.column(HEALPIX_COLUMN).to_numpy())))
        data = self._packer.pack(name, data)
        out: list[tuple[Any, Sequence[Any]]] = []
        for (tp,), members in _groups([tparts]):
            sub = data.take(pa.array(members))
            out += self._writes(self._partition_table(name, tp), sub, [PART], unset_nulls=True)
        return out

    def _ensure_partitions_or_fail(self, name: str, parts: np.ndarray) -> None:
        names = {self._partition_table(name, p) for p in parts}
        if names <= self._partitions:
            return
        if self._opts.auto_partitions:
            self._ensure_partitions(int(p) for p in parts)
            return
        missing = sorted(names - self._table_names())
        if missing:
            raise StorageError(
                f"time partition table(s) {missing} do not exist in {self.keyspace}: "
                "create them ahead with create_time_partitions (auto_partitions is off)"
            )
        with self._lock:
            self._partitions |= names

    def _object_writes(
        self, objs: pa.Table
    ) -> tuple[list[tuple[Any, Sequence[Any]]], list[tuple[Any, Sequence[Any]]]]:
        """(row writes, key-registry writes) of the new object versions."""
        if not objs.num_rows:
            return [], []
        ids = np.asarray(objs.column("diaObjectId").to_numpy(), dtype=np.int64)
        start = np.asarray(objs.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
        h29 = np.asarray(objs.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        part = self._pixel(h29)
        prev = self._lookup_keys("DiaObject", pa.table({"diaObjectId": ids}))
        out: list[tuple[Any, Sequence[Any]]] = []
        if prev.num_rows:
            prev_ids = np.asarray(prev.column("diaObjectId").to_numpy(), dtype=np.int64)
            order = np.argsort(ids)
            at = order[np.searchsorted(ids[order], prev_ids)]
            prev_start = np.asarray(prev.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
            prev_h = np.asarray(prev.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
            prev_part = np.asarray(prev.column(PART).to_numpy(), dtype=np.int32)
            # Close the previous version at the new one's start (same start: it is replaced).
            closing = prev_start != start[at]
            if closing.any():
                close = pa.table(
                    {
                        "end": start[at][closing],
                        BUCKET: self._bucket(prev_ids[closing]),
                        "diaObjectId": prev_ids[closing],
                        "validityStartMjdTai": prev_start[closing],
                    }
                )
                # Batched by bucket: one request per row cost ~1 ms of server CPU each.
                out += self._batches(
                    self._prepare(
                        f"UPDATE {self._t(HISTORY_TABLE)} SET {q('validityEndMjdTai')} = ? "
                        f"WHERE {BUCKET} = ? AND {q('diaObjectId')} = ? AND {q('validityStartMjdTai')} = ?"
                    ),
                    close,
                    [BUCKET],
                    unset_nulls=False,
                )
            moved = prev_h != h29[at]
            if moved.any():
                gone = pa.table(
                    {PART: prev_part[moved], HEALPIX_COLUMN: prev_h[moved], "diaObjectId": prev_ids[moved]}
                )
                out += self._batches(
                    self._prepare(
                        f"DELETE FROM {self._t(LATEST_TABLE)} WHERE {PART} = ? AND {q(HEALPIX_COLUMN)} = ? "
                        f"AND {q('diaObjectId')} = ?"
                    ),
                    gone,
                    [PART],
                    unset_nulls=False,
                )
        # Object tables are written with explicit nulls: a replaced row must lose old values.
        packed = self._packer.pack("DiaObject", objs)
        out += self._writes(
            HISTORY_TABLE,
            packed.append_column(BUCKET, pa.array(self._bucket(ids))),
            [BUCKET],
            unset_nulls=False,
        )
        out += self._writes(
            LATEST_TABLE, packed.append_column(PART, pa.array(part)), [PART], unset_nulls=False
        )
        keys = pa.table(
            {
                BUCKET: self._bucket(ids),
                "diaObjectId": ids,
                PART: part,
                HEALPIX_COLUMN: h29,
                "validityStartMjdTai": start,
            }
        )
        return out, self._writes("diadb_DiaObject_keys", keys, [BUCKET], unset_nulls=False)

    def store_visit(self, batch: VisitBatch) -> bool:
        """Validate, then write: key claims, rows, object key registry, the change-log chunk
        (one LWT, see ``diadb.backends.cassandra_changes``) and the visit registry, in that
        order; a retry after a failure completes the same store (one chunk, same rows)."""
        keyed = batch.key is not None
        if keyed:
            self._ensure_keyed_tables()
        try:
            self._check_registry(batch)
        except _AlreadyStored:
            return False
        self._storing = (batch.visit, batch.detector)
        # 0. every check (keys another store owns), and every statement built, before any write.
        claims = self._claims(batch)
        rows = self._source_writes("DiaSource", batch.sources)
        rows += self._source_writes("DiaForcedSource", batch.forced_sources)
        obj_rows, obj_keys = self._object_writes(batch.objects)
        op_key = f"store-key:{batch.key}" if keyed else f"store:{batch.visit}:{batch.detector}"
        op, after, _, retry = self._begin(op_key, None)
        if keyed:
            # Other keyed stores share this visit/detector: the chunk lists its own rows.
            rows += self._member_writes(batch, op)
        else:
            rows += self._chunk_object_writes(batch.visit, batch.detector, batch.objects)
        # 1. claim the source keys; 2. the rows; 3. where the latest object versions now live;
        # 4. the chunk (its id taken last, in commit order); 5. the visit registry (and the
        # store key, last: its presence means the keyed store is complete).
        self._run(claims, write=True)
        self._run(rows + obj_rows, write=True)
        self._run(obj_keys, write=True)
        chunk = self._take_chunk(
            op, after, "store", batch.visit, batch.detector, batch.visit_mjd_tai, retry=retry
        )
        counts = (batch.objects.num_rows, batch.sources.num_rows, batch.forced_sources.num_rows)
        mjd = batch.visit_mjd_tai
        if keyed:
            # Keyed stores of one visit/detector add up (read, then write: not atomic; a
            # crash between this and the key registry below counts a retried store twice).
            stmt = self._prepare(
                f"SELECT visit_mjd_tai, n_objects, n_sources, n_forced_sources FROM "
                f"{self._t('diadb_visit')} WHERE visit = ? AND detector = ?"
            )
            (prev,) = self._run([(stmt, (batch.visit, batch.detector))], write=False)
            if prev:
                mjd = max(mjd, float(prev[0][0]))
                counts = tuple(a + int(b or 0) for a, b in zip(counts, prev[0][1:], strict=True))
        reg = self._prepare(
            f"INSERT INTO {self._t('diadb_visit')} (visit, detector, visit_mjd_tai, stored_at, n_objects, "
            "n_sources, n_forced_sources, chunk_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        values = (batch.visit, batch.detector, mjd, _dt.datetime.now(_dt.UTC), *counts, chunk)
        self._run([(reg, values)], write=True)
        if keyed:
            key_reg = self._prepare(
                f"INSERT INTO {self._t('diadb_store_key')} (key, chunk_id, op) VALUES (?, ?, ?)"
            )
            self._run([(key_reg, (batch.key, chunk, op))], write=True)
        self._end(op_key)
        self._storing = None
        return True

    # ---- retention -----------------------------------------------------------------
    def latest_visit_mjd(self) -> float | None:
        """The newest registered visit time (an aggregate over the whole registry)."""
        (rows,) = self._run(
            [(self._prepare(f"SELECT max(visit_mjd_tai) FROM {self._t('diadb_visit')}"), ())], write=False
        )
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def _before(self, table: str, cutoff_mjd: float) -> tuple[list[str], str | None]:
        """(partition tables wholly before ``cutoff_mjd``, the one table straddling it or None)."""
        whole, straddling = [], None
        for p in self.time_partitions()[table]:
            lo, hi = self.time_partition_span(p)
            if hi <= cutoff_mjd:
                whole.append(self._partition_table(table, p))
            elif lo < cutoff_mjd:
                straddling = self._partition_table(table, p)
        return whole, straddling

    def count_before(self, table: str, cutoff_mjd: float) -> int:
        whole, straddling = self._before(table, cutoff_mjd)
        statements: list[tuple[Any, Sequence[Any]]] = [
            (self._prepare(f"SELECT count(*) FROM {self._t(n)}"), ()) for n in whole
        ]
        if straddling is not None:
            statements.append(
                (
                    self._prepare(
                        f"SELECT count(*) FROM {self._t(straddling)} "
                        f"WHERE {q(TIME_COLUMN)} < ? ALLOW FILTERING"
                    ),
                    (float(cutoff_mjd),),
                )
            )
        return sum(int(rs[0][0]) for rs in self._run(statements, write=False))

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        """Drop the partition tables wholly before ``cutoff_mjd`` (no tombstones) and delete the
        older rows of the one that straddles it (row deletes, batched by partition)."""
        n = self.count_before(table, cutoff_mjd)
        whole, straddling = self._before(table, cutoff_mjd)
        for name in whole:
            self._ddl(f"DROP TABLE IF EXISTS {self._t(name)}")
        with self._lock:
            self._partitions -= set(whole)
        if straddling is not None:
            spec = self.schema.table(table)
            key = [PART, HEALPIX_COLUMN, TIME_COLUMN, *spec.primary_key]
            stmt = self._prepare(
                f"SELECT {', '.join(map(q, key))} FROM {self._t(straddling)} WHERE {q(TIME_COLUMN)} < ? "
                "ALLOW FILTERING"
            )
            (rows,) = self._run([(stmt, (float(cutoff_mjd),))], write=False)
            types = {**{c.name: c.datatype for c in spec.columns}, PART: "int"}
            old = self._to_arrow(types, key, rows)
            where = " AND ".join(f"{q(c)} = ?" for c in key)
            self._run(self._deletes(straddling, old, where), write=True)
        return n

    def _deletes(self, table: str, keys: pa.Table, where: str) -> list[tuple[Any, Sequence[Any]]]:
        stmt = self._prepare(f"DELETE FROM {self._t(table)} WHERE {where}")
        return self._batches(stmt, keys, [PART], unset_nulls=False)

    # ---- bookkeeping ---------------------------------------------------------------
    def table_stats(self) -> dict[str, TableStats]:
        """Rows (``count(*)``: a full scan, meant for tests and small keyspaces) and bytes (the
        on-disk size that ``system_views.disk_usage`` reports, plus the not yet flushed rows at
        their Arrow width, since Cassandra exposes no memtable size through CQL)."""
        tables = self._table_names()
        groups: dict[str, list[str]] = {
            "DiaObject": [HISTORY_TABLE],
            LATEST_TABLE: [LATEST_TABLE],
            "diadb_visit": ["diadb_visit"],
        }
        for t in SOURCE_TABLES:
            groups[t] = sorted(n for n in tables if re.fullmatch(re.escape(t) + r"_-?\d+", n))
        disk: dict[str, int] = {}
        try:
            rows = self._session.execute(
                "SELECT table_name, mebibytes FROM system_views.disk_usage WHERE keyspace_name = %s "
                "ALLOW FILTERING",
                [self.keyspace],
            )
            disk = {str(n): int(m) << 20 for n, m in rows}
        except Exception:
            disk = {}
        stats: dict[str, TableStats] = {}
        for label, names in groups.items():
            n_rows = 0
            size = 0
            for name in names:
                (res,) = self._run(
                    [(self._prepare(f"SELECT count(*) FROM {self._t(name)}"), ())], write=False
                )
                n_rows += int(res[0][0])
                size += disk.get(name, 0)
            if size == 0 and n_rows:
                spec = self.schema.tables.get(label) or self.schema.table("DiaObject")
                width = sum(_width(c.datatype) for c in spec.columns) + 8
                size = n_rows * width
            stats[label] = TableStats(rows=n_rows, bytes=size)
        return stats

    def drop(self) -> None:
        """Drop this APDB's keyspace (tests and tear-down)."""
        self._ddl(f"DROP KEYSPACE IF EXISTS {q(self.keyspace)}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._cluster.shutdown()


_NUMPY_WIRE = {
    "double": ">f8",
    "float": ">f4",
    "bigint": ">i8",
    "int": ">i4",
    "smallint": ">i2",
    "tinyint": "i1",
    "boolean": "u1",
}


def _serialize(col: pa.ChunkedArray, cql: str, unset_nulls: bool) -> list[Any]:
    """A column's values in the native protocol's binary form (``bytes`` each; ``None`` for a
    null, or ``UNSET_VALUE`` with ``unset_nulls``), built with NumPy and Arrow: C-level passes."""
    from cassandra.query import UNSET_VALUE

    null = UNSET_VALUE if unset_nulls else None
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.int64())
    wire = _NUMPY_WIRE.get(cql)
    if wire is not None:
        if pa.types.is_boolean(col.type):
            col = col.cast(pa.uint8())
        arr = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False)).astype(wire)
        values: Any = arr.view(np.dtype(f"V{arr.dtype.itemsize}"))
        if not col.null_count:
            return list(values.tolist())
        values = np.array(values.tolist(), dtype=object)
    elif cql in ("text", "varchar", "ascii", "blob", "uuid"):
        # UTF-8 text is its own wire form: a cast to binary gives the bytes without encoding
        # (a uuid column is given as its 16 bytes).
        if pa.types.is_string(col.type):
            col = col.cast(pa.binary())
        elif pa.types.is_large_string(col.type):
            col = col.cast(pa.large_binary())
        values = np.array(col.to_pylist(), dtype=object)
        if not col.null_count:
            return list(values.tolist())
    else:
        raise StorageError(f"no serializer for CQL type {cql}")
    values[np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)] = null
    return list(values.tolist())


def _width(datatype: str) -> int:
    return {"boolean": 1, "byte": 1, "short": 2, "int": 4, "float": 4}.get(datatype, 8)


def _groups(columns: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Group row positions by the values of integer ``columns``: ``[(key, positions)]``."""
    if not columns or not len(columns[0]):
        return []
    order = np.lexsort(columns[::-1])
    sorted_cols = [c[order] for c in columns]
    change = np.zeros(len(order), dtype=bool)
    change[0] = True
    for c in sorted_cols:
        change[1:] |= c[1:] != c[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], len(order))
    return [(tuple(int(c[s]) for c in sorted_cols), order[s:e]) for s, e in zip(starts, ends, strict=True)]
