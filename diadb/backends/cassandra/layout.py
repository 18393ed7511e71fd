"""The keyspace's tables: how rows are laid out, their DDL, the time partitions, retention,
sizes and schema evolution.

Layout (one keyspace per APDB):

``DiaSource_<N>``, ``DiaForcedSource_<N>``
    One table per time partition ``N = floor(midpointMjdTai / time_partition_days)``, partition
    key ``apdb_part`` (the HEALPix nested pixel of the row at ``pixel_order``), clustered by
    ``(_healpix_29, midpointMjdTai, primary key)``. So a (coarse pixel, time partition) pair is
    one Cassandra partition, a visit's read is one slice query per covering pair, and dropping
    history beyond the window is ``DROP TABLE`` (no tombstones). Storage-attached indexes (SAI)
    on ``diaObjectId`` and ``visit`` serve reads by object id and the change log.
``diadb_DiaObjectLatest``
    The latest version of each object, partitioned by ``apdb_part``, clustered by
    ``(_healpix_29, diaObjectId)``.
``DiaObject``
    Every version (``validityEndMjdTai`` of the previous one is set when a new one arrives),
    partitioned by ``diaObjectId >> id_bucket_bits``.
``diadb_<table>_keys``
    Primary-key registries of DiaSource / DiaForcedSource (which store call wrote each key:
    keys stored by another visit are refused, as a unique constraint would) and of DiaObject
    (where the latest version of each object lives); see :mod:`.store`.
``diadb_visit``, ``diadb_metadata``
    The visit registry and the frozen metadata (schema, config, this layout's parameters).
``diadb_chunk``, ``diadb_update``, ``diadb_pending``, ``diadb_chunk_object``, ...
    The change log (see :mod:`.changelog`).
``apdb_packed``
    In keyspaces made with ``packed=1`` (the default), the fixed-width columns of the source and
    object tables that no query filters on and no update changes live in one blob per row (see
    :mod:`diadb.backends.common.packing`): Cassandra's cost is per cell, and this makes a
    DiaSource row ~20 cells instead of 103. The packed list is frozen in the metadata; older
    keyspaces have none.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import TableStats, TimePartition
from diadb.backends.cassandra.codec import cql_type, decode, q, to_arrow, width
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.backends.cassandra.url import Options
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.common.packing import PACKED, RowPacker, packed_columns
from diadb.errors import ConfigError, StorageError
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, ColumnSpec, TableSpec

HISTORY_TABLE = "DiaObject"
SOURCE_TABLES = ("DiaSource", "DiaForcedSource")
TIME_COLUMN = "midpointMjdTai"
#: The partition key of the source and latest-object tables: the row's pixel at ``pixel_order``.
PART = "apdb_part"
#: The partition key of the object history and of the one-column key registries.
BUCKET = "apdb_bucket"
#: Which store call wrote a key (in the key registries).
STORED_VISIT = "apdb_stored_visit"
STORED_DETECTOR = "apdb_stored_detector"
#: Source and object rows carry them too (hidden), so reads show each store wholly (.visibility).
HIDDEN_TYPES = {STORED_VISIT: "long", STORED_DETECTOR: "int"}
#: Keyed stores by the id their rows record (see .visibility), with their chunk once complete.
KEYED_STORES = "diadb_keyed_store"
STORE_COLUMNS_DDL = (f"{STORED_VISIT} bigint", f"{STORED_DETECTOR} int")


def partition_table(table: str, part: int) -> str:
    """The physical table of time partition ``part`` of source table ``table``."""
    return f"{table}_{int(part)}"


def change_log_ddl(t: Callable[[str], str]) -> list[str]:
    """The change-log tables (``t`` qualifies a table name)."""
    return [
        f"CREATE TABLE IF NOT EXISTS {t('diadb_chunk')} (bucket int, chunk_id bigint, last_id bigint static, "
        "kind text, visit bigint, detector int, visit_mjd_tai double, stored_at text, op uuid, "
        "published boolean, PRIMARY KEY ((bucket), chunk_id))",
        f"CREATE TABLE IF NOT EXISTS {t('diadb_update')} (op uuid, seq int, kind text, payload text, "
        "PRIMARY KEY ((op), seq))",
        f'CREATE TABLE IF NOT EXISTS {t("diadb_chunk_object")} (visit bigint, detector int, "diaObjectId" '
        'bigint, "validityStartMjdTai" double, PRIMARY KEY ((visit, detector), "diaObjectId", '
        '"validityStartMjdTai"))',
        f"CREATE TABLE IF NOT EXISTS {t('diadb_pending')} (op_key text PRIMARY KEY, op uuid, from_id bigint, "
        "plan text, visit_mjd_tai double)",
        *keyed_ddl(t),
    ]


def keyed_ddl(t: Callable[[str], str]) -> list[str]:
    """The tables of keyed stores: the store keys, and the rows each keyed store wrote (its
    members: ``tbl`` names the table, ``k1..k3`` the primary key, ``start`` an object version's
    start; one row with ``tbl = ''`` marks the operation as keyed), by visit/detector."""
    return [
        f"CREATE TABLE IF NOT EXISTS {t('diadb_store_key')} (key text PRIMARY KEY, chunk_id bigint, op uuid)",
        f"CREATE TABLE IF NOT EXISTS {t('diadb_chunk_member')} (visit bigint, detector int, op uuid, "
        "tbl text, k1 bigint, k2 bigint, k3 bigint, start double, "
        "PRIMARY KEY ((visit, detector), op, tbl, k1, k2, k3))",
        f"CREATE TABLE IF NOT EXISTS {t(KEYED_STORES)} (store_id bigint PRIMARY KEY, chunk_id bigint)",
    ]


def stored_metadata(session: CassandraSession) -> dict[str, str]:
    """The keyspace's ``diadb_metadata`` (empty when there is none)."""
    if "diadb_metadata" not in session.table_names():
        return {}
    rows = session.execute(f"SELECT key, value FROM {session.t('diadb_metadata')}")
    return {str(k): str(v) for k, v in rows}


class Layout:
    """The layout parameters of one keyspace, its tables and their time partitions."""

    def __init__(
        self,
        session: CassandraSession,
        *,
        rf: int,
        pixel_order: int,
        time_partition_days: float,
        id_bucket_bits: int,
    ) -> None:
        self.session = session
        self.rf = rf
        self.pixel_order = pixel_order
        self.time_partition_days = time_partition_days
        self.id_bucket_bits = id_bucket_bits
        self._schema: ApdbSchema | None = None
        #: Packed columns per logical table (frozen in the metadata; none in older keyspaces).
        self.packer = RowPacker(lambda: self.schema)
        # The partition tables known to exist (a cache: checking the schema per store costs a query).
        self._partitions: set[str] = set()
        self._lock = threading.Lock()
        #: Whether every row records the store that wrote it (``STORED_VISIT``/``_DETECTOR``):
        #: keyspaces made before reads showed stores wholly (see .visibility) do not.
        self.store_columns = False

    @classmethod
    def open(cls, session: CassandraSession, opts: Options, url: str, *, create: bool) -> Layout:
        """A new keyspace's layout from the options, or an existing one's from its metadata."""
        meta = stored_metadata(session) if session.keyspace_exists() else {}
        ks = session.keyspace
        if create:
            if meta:
                raise ConfigError(f"keyspace {ks} already exists and holds an APDB; use Apdb.open to use it")
            return cls(
                session,
                rf=opts.rf or min(3, session.n_hosts()),
                pixel_order=opts.pixel_order,
                time_partition_days=opts.time_partition_days,
                id_bucket_bits=opts.id_bucket_bits,
            )
        if not meta:
            raise ConfigError(f"no APDB in keyspace {ks} at {url}; use Apdb.create to make one")
        layout = cls(
            session,
            rf=int(meta.get("cassandra.replication_factor", "1")),
            pixel_order=int(meta["cassandra.pixel_order"]),
            time_partition_days=float(meta["cassandra.time_partition_days"]),
            id_bucket_bits=int(meta["cassandra.id_bucket_bits"]),
        )
        layout.packer.set(json.loads(meta.get("cassandra.packed_columns", "{}")))
        layout.store_columns = meta.get("cassandra.store_columns") == "1"
        return layout

    @property
    def schema(self) -> ApdbSchema:
        if self._schema is None:
            raise StorageError("backend used before its schema was attached")
        return self._schema

    def attach(self, schema: ApdbSchema) -> None:
        self._schema = schema

    def types(self, table: str) -> dict[str, str]:
        """Felis datatype of each column of ``table``."""
        return {c.name: c.datatype for c in self.schema.table(table).columns}

    def decode(self, table: str, columns: Sequence[str], rows: list[Any]) -> pa.Table:
        """Rows of ``table`` selected with ``packer.physical(table, columns)`` -> ``columns``
        (which may name the hidden ``STORED_VISIT``/``STORED_DETECTOR`` of object rows)."""
        return decode(self.packer, self.schema.table(table), columns, rows, HIDDEN_TYPES)

    def bucket(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64) >> self.id_bucket_bits

    def pixel(self, h29: np.ndarray) -> np.ndarray:
        return (np.asarray(h29, dtype=np.int64) >> (2 * (29 - self.pixel_order))).astype(np.int32)

    def time_partition(self, mjd: float | np.ndarray) -> Any:
        """The time partition number(s) of MJD TAI value(s)."""
        return np.floor(np.asarray(mjd, dtype=np.float64) / self.time_partition_days).astype(np.int64)

    def time_partition_span(self, part: int) -> tuple[float, float]:
        """``[start, end)`` in MJD TAI of time partition ``part``."""
        return part * self.time_partition_days, (part + 1) * self.time_partition_days

    # ---- set-up --------------------------------------------------------------------
    def columns_ddl(self, spec: TableSpec) -> list[str]:
        packed = set(self.packer.packed.get(spec.name, ()))
        cols = [f"{q(c.name)} {cql_type(c.datatype)}" for c in spec.columns if c.name not in packed]
        return cols + [f"{q(HEALPIX_COLUMN)} bigint"] + ([f"{PACKED} blob"] if packed else [])

    def key_table_ddl(self, name: str, key: Sequence[str], spec: TableSpec) -> str:
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
        table = self.session.t(f"diadb_{name}_keys")
        return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)}, PRIMARY KEY {pk})"

    def initialize(self, schema: ApdbSchema, metadata: Mapping[str, str], packed: bool) -> None:
        self._schema = schema
        t = self.session.t
        if packed:
            self.packer.set({n: packed_columns(schema.table(n)) for n in ("DiaObject", *SOURCE_TABLES)})
        self.session.ddl(
            f"CREATE KEYSPACE IF NOT EXISTS {q(self.session.keyspace)} WITH replication = "
            f"{{'class': 'NetworkTopologyStrategy', 'replication_factor': {self.rf}}}"
        )
        obj = schema.table("DiaObject")
        self.store_columns = True
        cols = [*self.columns_ddl(obj), *STORE_COLUMNS_DDL]
        ddl = [
            f"CREATE TABLE IF NOT EXISTS {t('diadb_metadata')} (key text PRIMARY KEY, value text)",
            f"CREATE TABLE IF NOT EXISTS {t('diadb_visit')} (visit bigint, detector int, "
            "visit_mjd_tai double, stored_at timestamp, n_objects int, n_sources int, n_forced_sources int, "
            "chunk_id bigint, PRIMARY KEY ((visit), detector))",
            f"CREATE TABLE IF NOT EXISTS {t(HISTORY_TABLE)} ({', '.join(cols)}, {BUCKET} bigint, "
            f"PRIMARY KEY (({BUCKET}), {q('diaObjectId')}, {q('validityStartMjdTai')}))",
            f"CREATE TABLE IF NOT EXISTS {t(LATEST_TABLE)} ({', '.join(cols)}, {PART} int, "
            f"PRIMARY KEY (({PART}), {q(HEALPIX_COLUMN)}, {q('diaObjectId')}))",
            self.key_table_ddl("DiaObject", ("diaObjectId",), obj),
            *change_log_ddl(t),
        ]
        for name in SOURCE_TABLES:
            spec = schema.table(name)
            ddl.append(self.key_table_ddl(name, spec.primary_key, spec))
        for stmt in ddl:
            self.session.ddl(stmt)
        layout = {
            "cassandra.replication_factor": str(self.rf),
            "cassandra.pixel_order": str(self.pixel_order),
            "cassandra.time_partition_days": repr(self.time_partition_days),
            "cassandra.id_bucket_bits": str(self.id_bucket_bits),
            "cassandra.packed_columns": json.dumps(self.packer.packed),
            "cassandra.store_columns": "1",
        }
        ins = self.session.prepare(f"INSERT INTO {t('diadb_metadata')} (key, value) VALUES (?, ?)")
        # The schema YAML is written last: its presence marks a complete APDB.
        items = [(k, v) for k, v in {**layout, **metadata}.items() if k != "felis.schema_yaml"]
        self.session.run([(ins, kv) for kv in items], write=True)
        if "felis.schema_yaml" in metadata:
            self.session.run([(ins, ("felis.schema_yaml", metadata["felis.schema_yaml"]))], write=True)

    def read_metadata(self) -> dict[str, str]:
        return stored_metadata(self.session)

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        """Set and delete metadata keys in one logged batch (applied all-or-nothing, eventually)."""
        from cassandra.query import BatchStatement, BatchType  # type: ignore[import-untyped]

        if not values and not delete:
            return
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        batch.is_idempotent = True
        ins = self.session.prepare(
            f"INSERT INTO {self.session.t('diadb_metadata')} (key, value) VALUES (?, ?)"
        )
        rm = self.session.prepare(f"DELETE FROM {self.session.t('diadb_metadata')} WHERE key = ?")
        for k, v in values.items():
            batch.add(ins, (str(k), str(v)))
        for k in delete:
            batch.add(rm, (str(k),))
        self.session.run([(batch, ())], write=True)

    # ---- time partitions -----------------------------------------------------------
    def partition_numbers(self) -> dict[str, list[int]]:
        """The existing time partitions of each source table (partition numbers, ascending)."""
        names = self.session.table_names()
        with self._lock:
            self._partitions = names
        found: dict[str, list[int]] = {t: [] for t in SOURCE_TABLES}
        for n in names:
            for t in SOURCE_TABLES:
                m = re.fullmatch(re.escape(t) + r"_(-?\d+)", n)
                if m:
                    found[t].append(int(m.group(1)))
        return {t: sorted(v) for t, v in found.items()}

    def time_partitions(self) -> list[TimePartition]:
        """Every partition table, ordered by table then start."""
        out = [
            TimePartition(table, partition_table(table, p), *self.time_partition_span(p))
            for table, parts in self.partition_numbers().items()
            for p in parts
        ]
        return sorted(out, key=lambda p: (p.table, p.start_mjd))

    def known_partitions(self) -> set[str]:
        """The partition tables known to exist (from the cache when it has any)."""
        return self._partitions or self.session.table_names()

    def create_time_partitions(self, start_mjd: float, end_mjd: float) -> list[str]:
        """Create (ahead of time) the partition tables covering ``[start_mjd, end_mjd)``;
        returns the tables created. Safe to repeat; run it from one process (schema changes
        from many concurrent clients can disagree)."""
        first = int(self.time_partition(start_mjd))
        last = math.ceil(end_mjd / self.time_partition_days) - 1  # the partition holding end - epsilon
        return self.ensure_partitions(range(first, last + 1))

    def drop_time_partitions(self, before_mjd: float) -> list[str]:
        """Drop the partition tables whose whole span ends at or before ``before_mjd``
        (e.g. ``visit_time - 30 * history_months``); returns the tables dropped."""
        dropped = []
        for table, parts in self.partition_numbers().items():
            for p in parts:
                if self.time_partition_span(p)[1] <= before_mjd:
                    name = partition_table(table, p)
                    self.session.ddl(f"DROP TABLE IF EXISTS {self.session.t(name)}")
                    dropped.append(name)
        with self._lock:
            self._partitions -= set(dropped)
        return dropped

    def ensure_partitions(self, parts: Iterable[int]) -> list[str]:
        """Create the partition tables of ``parts`` (both source tables) that do not exist."""
        wanted = [partition_table(t, p) for p in sorted(set(parts)) for t in SOURCE_TABLES]
        if all(w in self._partitions for w in wanted):
            return []
        existing = self.session.table_names()
        created = []
        for name in wanted:
            if name in existing:
                continue
            spec = self.schema.table(name.rsplit("_", 1)[0])
            key = (q(HEALPIX_COLUMN), q(TIME_COLUMN), *(q(c) for c in spec.primary_key))
            cols = [*self.columns_ddl(spec), *(STORE_COLUMNS_DDL if self.store_columns else ())]
            self.session.ddl(
                f"CREATE TABLE IF NOT EXISTS {self.session.t(name)} ({', '.join(cols)}, "
                f"{PART} int, PRIMARY KEY (({PART}), {', '.join(key)}))"
            )
            for index, column in (("_object", "diaObjectId"), ("_visit", "visit")):
                # visit: the change log finds a store's rows by it.
                self.session.ddl(
                    f"CREATE INDEX IF NOT EXISTS {q(name + index)} ON {self.session.t(name)} "
                    f"({q(column)}) USING 'sai'"
                )
            created.append(name)
        with self._lock:
            self._partitions = existing | set(created)
        return created

    def ensure_partitions_or_fail(self, name: str, parts: np.ndarray) -> None:
        """Make sure the partition tables of ``parts`` exist: create them with ``auto_partitions``,
        else StorageError naming the missing ones."""
        names = {partition_table(name, p) for p in parts}
        if names <= self._partitions:
            return
        if self.session.opts.auto_partitions:
            self.ensure_partitions(int(p) for p in parts)
            return
        missing = sorted(names - self.session.table_names())
        if missing:
            raise StorageError(
                f"time partition table(s) {missing} do not exist in {self.session.keyspace}: "
                "create them ahead with create_time_partitions (auto_partitions is off)"
            )
        with self._lock:
            self._partitions |= names

    # ---- retention -----------------------------------------------------------------
    def _before(self, table: str, cutoff_mjd: float) -> tuple[list[str], str | None]:
        """(partition tables wholly before ``cutoff_mjd``, the one table straddling it or None)."""
        whole, straddling = [], None
        for p in self.partition_numbers()[table]:
            lo, hi = self.time_partition_span(p)
            if hi <= cutoff_mjd:
                whole.append(partition_table(table, p))
            elif lo < cutoff_mjd:
                straddling = partition_table(table, p)
        return whole, straddling

    def count_before(self, table: str, cutoff_mjd: float) -> int:
        whole, straddling = self._before(table, cutoff_mjd)
        prepare, t = self.session.prepare, self.session.t
        statements: Statements = [(prepare(f"SELECT count(*) FROM {t(n)}"), ()) for n in whole]
        if straddling is not None:
            stmt = prepare(f"SELECT count(*) FROM {t(straddling)} WHERE {q(TIME_COLUMN)} < ? ALLOW FILTERING")
            statements.append((stmt, (float(cutoff_mjd),)))
        return sum(int(rs[0][0]) for rs in self.session.run(statements, write=False))

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        """Drop the partition tables wholly before ``cutoff_mjd`` (no tombstones) and delete the
        older rows of the one that straddles it (row deletes, batched by partition)."""
        n = self.count_before(table, cutoff_mjd)
        whole, straddling = self._before(table, cutoff_mjd)
        for name in whole:
            self.session.ddl(f"DROP TABLE IF EXISTS {self.session.t(name)}")
        with self._lock:
            self._partitions -= set(whole)
        if straddling is not None:
            key = [PART, HEALPIX_COLUMN, TIME_COLUMN, *self.schema.table(table).primary_key]
            stmt = self.session.prepare(
                f"SELECT {', '.join(map(q, key))} FROM {self.session.t(straddling)} "
                f"WHERE {q(TIME_COLUMN)} < ? ALLOW FILTERING"
            )
            (rows,) = self.session.run([(stmt, (float(cutoff_mjd),))], write=False)
            old = to_arrow({**self.types(table), PART: "int"}, key, rows)
            where = " AND ".join(f"{q(c)} = ?" for c in key)
            delete = self.session.prepare(f"DELETE FROM {self.session.t(straddling)} WHERE {where}")
            self.session.run(self.session.batches(delete, old, [PART], unset_nulls=False), write=True)
        return n

    # ---- bookkeeping ---------------------------------------------------------------
    def table_stats(self) -> dict[str, TableStats]:
        """Rows (``count(*)``: a full scan, meant for tests and small keyspaces) and bytes (the
        on-disk size that ``system_views.disk_usage`` reports, plus the not yet flushed rows at
        their Arrow width, since Cassandra exposes no memtable size through CQL)."""
        tables = self.session.table_names()
        groups: dict[str, list[str]] = {
            "DiaObject": [HISTORY_TABLE],
            LATEST_TABLE: [LATEST_TABLE],
            "diadb_visit": ["diadb_visit"],
        }
        for t in SOURCE_TABLES:
            groups[t] = sorted(n for n in tables if re.fullmatch(re.escape(t) + r"_-?\d+", n))
        disk: dict[str, int] = {}
        try:
            rows = self.session.execute(
                "SELECT table_name, mebibytes FROM system_views.disk_usage WHERE keyspace_name = %s "
                "ALLOW FILTERING",
                [self.session.keyspace],
            )
            disk = {str(n): int(m) << 20 for n, m in rows}
        except Exception:  # an older Cassandra without the virtual table: sizes are estimated
            disk = {}
        stats: dict[str, TableStats] = {}
        for label, names in groups.items():
            n_rows = 0
            size = 0
            for name in names:
                stmt = self.session.prepare(f"SELECT count(*) FROM {self.session.t(name)}")
                (res,) = self.session.run([(stmt, ())], write=False)
                n_rows += int(res[0][0])
                size += disk.get(name, 0)
            if size == 0 and n_rows:
                spec = self.schema.tables.get(label) or self.schema.table("DiaObject")
                size = n_rows * (sum(width(c.datatype) for c in spec.columns) + 8)
            stats[label] = TableStats(rows=n_rows, bytes=size)
        return stats

    # ---- schema evolution ----------------------------------------------------------
    def upgrade_layout(self, from_version: str) -> list[str]:
        """Layout 1.0 had no change log: create its tables (the chunks of earlier stores are not
        backfilled; stores made from now on are logged)."""
        if not from_version.startswith("1.0."):
            return []
        for stmt in change_log_ddl(self.session.t):
            self.session.ddl(stmt)
        try:
            self.session.ddl(f"ALTER TABLE {self.session.t('diadb_visit')} ADD chunk_id bigint")
        except StorageError as e:  # a retried upgrade: the column is there
            if "conflicts with an existing column" not in str(e) and "already exist" not in str(e):
                raise
        return ["layout 1.0 -> 1.1: change log tables (earlier stores are not in the log)"]

    def add_columns(self, table: str, columns: Sequence[ColumnSpec]) -> None:
        """Add nullable columns to every physical table of ``table`` (each time partition)."""
        if table == HISTORY_TABLE:
            physical = [HISTORY_TABLE, LATEST_TABLE]
        else:
            physical = [partition_table(table, p) for p in self.partition_numbers()[table]]
        for name in physical:
            for c in columns:
                try:
                    self.session.ddl(
                        f"ALTER TABLE {self.session.t(name)} ADD {q(c.name)} {cql_type(c.datatype)}"
                    )
                except StorageError as e:  # a retried upgrade: the column is there
                    if "conflicts with an existing column" not in str(e):
                        raise

    def drop(self) -> None:
        """Drop this APDB's keyspace (tests and tear-down)."""
        self.session.ddl(f"DROP KEYSPACE IF EXISTS {q(self.session.keyspace)}")
