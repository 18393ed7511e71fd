"""PostgreSQL: the tables (DDL, metadata, layout upgrades) and the time partitions of the sources.

- ``DiaSource`` and ``DiaForcedSource`` are declaratively partitioned by range of
  ``midpointMjdTai`` (``partition_days`` per partition, frozen at create). A history read touches
  only the partitions of its window, and old history is dropped a partition at a time (O(1)).
  Partitions are created on demand by the store that needs them, or ahead of time
  (:meth:`Layout.create_time_partitions`). The primary key starts with
  ``(_healpix_29, midpointMjdTai)``; :meth:`Layout.cluster` rewrites partitions in key order.
- ``DiaObject`` keeps every version; ``diadb_DiaObjectLatest`` the latest version of each object.
- The change-log tables are described in :mod:`diadb.backends.postgres.changelog`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import TableStats, TimePartition
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.common.packing import PACKED, RowPacker, packed_columns
from diadb.backends.postgres.connection import Connection, params, q
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, ColumnSpec, TableSpec
from diadb.schema.types import sql_type

TIME_COLUMN = {"DiaSource": "midpointMjdTai", "DiaForcedSource": "midpointMjdTai"}
PARTITIONED = ("DiaSource", "DiaForcedSource")
DEFAULT_PARTITION_DAYS = 30.0
#: The layout a new schema gets (2: with the change log), in the metadata as ``postgres.layout``.
LAYOUT = "partitioned-by-time-2"

#: The change-log tables (``{name}`` is replaced by the schema-qualified name of a table).
CHANGE_LOG_DDL = [
    "CREATE TABLE {diadb_chunk_counter} (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), "
    "last_id BIGINT NOT NULL)",
    "INSERT INTO {diadb_chunk_counter} (one, last_id) VALUES (true, 0)",
    "CREATE TABLE {diadb_chunk} (chunk_id BIGINT PRIMARY KEY, kind TEXT NOT NULL, visit BIGINT, "
    "detector INTEGER, visit_mjd_tai DOUBLE PRECISION, created_at TIMESTAMPTZ NOT NULL, "
    "published BOOLEAN NOT NULL DEFAULT false)",
    "CREATE INDEX {diadb_chunk_unpublished} ON {diadb_chunk} (chunk_id) WHERE NOT published",
    'CREATE TABLE {diadb_chunk_object} (visit BIGINT NOT NULL, detector INTEGER NOT NULL, "diaObjectId" '
    'BIGINT NOT NULL, "validityStartMjdTai" DOUBLE PRECISION NOT NULL, store_id BIGINT)',
    "CREATE INDEX {diadb_chunk_object_store} ON {diadb_chunk_object} (visit, detector)",
    "CREATE TABLE {diadb_update} (chunk_id BIGINT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, "
    "payload TEXT NOT NULL, PRIMARY KEY (chunk_id, seq))",
    "CREATE INDEX {diadb_DiaSource_visit} ON {DiaSource} (visit, detector)",
    "CREATE INDEX {diadb_DiaForcedSource_visit} ON {DiaForcedSource} (visit, detector)",
    # Keyed stores (Apdb.store(key=...)): the key registry (store_id is taken when the store
    # starts, chunk_id when it logs its chunk), and their rows by primary key.
    "CREATE TABLE {diadb_store_key} (key TEXT PRIMARY KEY, "
    "store_id BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, chunk_id BIGINT)",
    "CREATE INDEX {diadb_store_key_chunk} ON {diadb_store_key} (chunk_id)",
    "CREATE TABLE {diadb_chunk_member} (store_id BIGINT NOT NULL, table_name TEXT NOT NULL, "
    "k0 BIGINT NOT NULL, k1 BIGINT, k2 BIGINT)",
    "CREATE INDEX {diadb_chunk_member_store} ON {diadb_chunk_member} (store_id)",
    "CREATE INDEX {diadb_chunk_member_key} ON {diadb_chunk_member} (table_name, k0, k1, k2)",
    "CREATE INDEX {diadb_chunk_object_keyed} ON {diadb_chunk_object} (store_id) WHERE store_id IS NOT NULL",
]
_CHANGE_LOG_TABLES = (
    "diadb_chunk_counter",
    "diadb_chunk",
    "diadb_chunk_object",
    "diadb_update",
    "diadb_store_key",
    "diadb_chunk_member",
)
_CHANGE_LOG_INDEXES = (  # not schema-qualified: an index lives in its table's schema
    "diadb_chunk_unpublished",
    "diadb_chunk_object_store",
    "diadb_DiaSource_visit",
    "diadb_DiaForcedSource_visit",
    "diadb_store_key_chunk",
    "diadb_chunk_member_store",
    "diadb_chunk_member_key",
    "diadb_chunk_object_keyed",
)


def partition_bounds(times: np.ndarray, days: float) -> list[int]:
    """Indexes ``k`` of the partitions ``[k * days, (k + 1) * days)`` that ``times`` fall in."""
    if not len(times):
        return []
    k = np.unique(np.floor(np.asarray(times, dtype=np.float64) / days).astype(np.int64))
    return [int(x) for x in k]


def partition_name(table: str, k: int) -> str:
    return f"{table}_p{k}" if k >= 0 else f"{table}_m{-k}"


class Layout:
    """The schema's tables and partitions. ``partition_days`` is set once the backend knows it
    (given at create, frozen in the metadata afterwards)."""

    def __init__(self, conn: Connection, packer: RowPacker) -> None:
        self.conn = conn
        self.packer = packer
        self.partition_days = DEFAULT_PARTITION_DAYS
        # The partitions known to exist, per table: a store creates only what is missing. A
        # partition another client drops behind this cache is found by the failed insert.
        self._partitions: dict[str, set[int]] = {name: set() for name in PARTITIONED}
        self._partitions_lock = threading.Lock()

    # ---- set-up --------------------------------------------------------------------
    def change_log_ddl(self) -> list[str]:
        t = self.conn.t
        names = {n: t(n) for n in (*_CHANGE_LOG_TABLES, "DiaSource", "DiaForcedSource")}
        names |= {n: q(n) for n in _CHANGE_LOG_INDEXES}
        return [stmt.format(**names) for stmt in CHANGE_LOG_DDL]

    def initialize(
        self, schema: ApdbSchema, metadata: Mapping[str, str], pack: bool, extra: Sequence[str] = ()
    ) -> None:
        """Create the schema's tables, and ``extra`` statements (the history tier's tables), in one
        transaction."""
        t = self.conn.t
        if pack:
            self.packer.set(
                {name: packed_columns(schema.table(name)) for name in ("DiaObject", *PARTITIONED)}
            )
        ddl = [f"CREATE SCHEMA IF NOT EXISTS {q(self.conn.namespace)}"]
        ddl.append(f"CREATE TABLE {t('diadb_metadata')} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        ddl.append(
            f"CREATE TABLE {t('diadb_visit')} (visit BIGINT NOT NULL, detector INTEGER NOT NULL, "
            "visit_mjd_tai DOUBLE PRECISION NOT NULL, stored_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
            "n_objects INTEGER NOT NULL, n_sources INTEGER NOT NULL, n_forced_sources INTEGER NOT NULL, "
            "chunk_id BIGINT, PRIMARY KEY (visit, detector))"
        )
        obj = schema.table("DiaObject")
        ddl.append(
            self._create_table("DiaObject", obj, obj.primary_key or ("diaObjectId", "validityStartMjdTai"))
        )
        # The open version of each object, found by the update that closes it.
        ddl.append(
            f"CREATE INDEX {q('diadb_DiaObject_open')} ON {t('DiaObject')} "
            '("diaObjectId") WHERE "validityEndMjdTai" IS NULL'
        )
        ddl.append(self._create_table(LATEST_TABLE, obj, ("diaObjectId",)))
        ddl.append(f"CREATE INDEX {q(LATEST_TABLE + '_healpix')} ON {t(LATEST_TABLE)} ({q(HEALPIX_COLUMN)})")
        for name in PARTITIONED:
            spec = schema.table(name)
            pk = spec.primary_key
            ddl.append(
                self._create_table(
                    name, spec, (HEALPIX_COLUMN, TIME_COLUMN[name], *pk), partition_by=TIME_COLUMN[name]
                )
            )
            ddl.append(f"CREATE INDEX {q('diadb_' + name + '_key')} ON {t(name)} ({', '.join(map(q, pk))})")
            if pk[:1] != ("diaObjectId",):
                ddl.append(f'CREATE INDEX {q("diadb_" + name + "_object")} ON {t(name)} ("diaObjectId")')
        ddl += self.change_log_ddl()
        ddl += extra
        meta = dict(metadata)
        meta["postgres.partition_days"] = repr(self.partition_days)
        meta["postgres.packed_columns"] = json.dumps(self.packer.packed)
        meta["postgres.layout"] = LAYOUT

        def work(cur: Any) -> None:
            for stmt in ddl:
                cur.execute(stmt)
            cur.adbc_ingest(
                "diadb_metadata",
                pa.table({"key": list(meta), "value": list(meta.values())}),
                mode="append",
                db_schema_name=self.conn.namespace,
            )

        self.conn.run("create", work)

    def _create_table(
        self, name: str, spec: TableSpec, key: Sequence[str], *, partition_by: str | None = None
    ) -> str:
        packed = set(self.packer.packed.get(spec.name, ()))
        cols = [
            f"{q(c.name)} {sql_type(c.datatype, 'postgresql')}{'' if c.nullable else ' NOT NULL'}"
            for c in spec.columns
            if c.name not in packed
        ]
        cols.append(f"{q(HEALPIX_COLUMN)} BIGINT NOT NULL")
        if packed:
            cols.append(f"{PACKED} BYTEA NOT NULL")
        cols.append(f"CONSTRAINT {q(name + '_pkey')} PRIMARY KEY ({', '.join(map(q, key))})")
        tail = f" PARTITION BY RANGE ({q(partition_by)})" if partition_by else ""
        return f"CREATE TABLE {self.conn.t(name)} ({', '.join(cols)}){tail}"

    def read_metadata(self) -> dict[str, str]:
        try:
            t = self.conn.fetch(f"SELECT key, value FROM {self.conn.t('diadb_metadata')}")
        except StorageError:
            return {}
        return dict(zip(t.column("key").to_pylist(), t.column("value").to_pylist(), strict=True))

    def open(self, meta: Mapping[str, str]) -> None:
        """Take the frozen layout of an existing APDB from its metadata."""
        frozen = meta.get("postgres.partition_days")
        self.partition_days = float(frozen) if frozen else DEFAULT_PARTITION_DAYS
        # Layouts made before packing have none: every column stands alone.
        self.packer.set(json.loads(meta.get("postgres.packed_columns", "{}")))

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        keys, vals = list(values), [values[k] for k in values]
        gone = [str(k) for k in delete]
        table = self.conn.t("diadb_metadata")

        def work(cur: Any) -> None:
            if gone:
                cur.execute(
                    f"DELETE FROM {table} WHERE key = ANY($1::text[])",
                    parameters=params((pa.array(gone, pa.string()), pa.string())),
                )
            if not keys:
                return
            cur.execute(
                f"INSERT INTO {table} (key, value) SELECT * FROM unnest($1::text[], $2::text[]) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                parameters=params(
                    (pa.array(keys, pa.string()), pa.string()), (pa.array(vals, pa.string()), pa.string())
                ),
            )

        self.conn.run("metadata update", work)

    # ---- schema evolution ----------------------------------------------------------
    def add_columns(self, table: str, columns: Sequence[ColumnSpec]) -> None:
        """Add nullable columns to a stored table (and to the latest-object table for DiaObject);
        a partitioned table passes them on to its partitions."""
        physical = [table] + ([LATEST_TABLE] if table == "DiaObject" else [])

        def work(cur: Any) -> None:
            for name in physical:
                for col in columns:
                    cur.execute(
                        f"ALTER TABLE {self.conn.t(name)} ADD COLUMN {q(col.name)} "
                        f"{sql_type(col.datatype, 'postgresql')}"
                    )

        self.conn.run("column addition", work)

    def upgrade_layout(self, from_version: str) -> list[str]:
        """Migrate diadb's own tables from an older layout, in one transaction (as SQLite does)."""
        if not from_version.startswith("1.0."):
            return []
        t = self.conn.t
        visits, chunks = t("diadb_visit"), t("diadb_chunk")

        def work(cur: Any) -> None:
            self.conn.lock_layout(cur)
            for stmt in self.change_log_ddl():
                cur.execute(stmt)
            cur.execute(f"ALTER TABLE {visits} ADD COLUMN chunk_id BIGINT")
            # One store chunk per visit already stored, in the order they were stored.
            cur.execute(
                f"INSERT INTO {chunks} (chunk_id, kind, visit, detector, visit_mjd_tai, created_at, "
                "published) SELECT row_number() OVER (ORDER BY stored_at, visit, detector), 'store', visit, "
                f"detector, visit_mjd_tai, stored_at, false FROM {visits}"
            )
            cur.execute(
                f"UPDATE {visits} v SET chunk_id = c.chunk_id FROM {chunks} c "
                "WHERE c.visit = v.visit AND c.detector = v.detector"
            )
            cur.execute(
                f"UPDATE {t('diadb_chunk_counter')} "
                f"SET last_id = (SELECT COALESCE(max(chunk_id), 0) FROM {chunks})"
            )
            # Layout 1.0 did not record which store wrote an object version: a version that
            # started at a visit's time is attributed to that visit's chunk.
            cur.execute(
                f'INSERT INTO {t("diadb_chunk_object")} (visit, detector, "diaObjectId", '
                '"validityStartMjdTai") SELECT c.visit, c.detector, o."diaObjectId", o."validityStartMjdTai" '
                f'FROM {t("DiaObject")} o JOIN {chunks} c ON c.visit_mjd_tai = o."validityStartMjdTai"'
            )
            cur.execute(f"UPDATE {t('diadb_metadata')} SET value = '{LAYOUT}' WHERE key = 'postgres.layout'")

        self.conn.run("layout upgrade", work)
        return ["layout 1.0 -> 1.1: change log tables (chunks backfilled from the visit registry)"]

    # ---- time partitions -----------------------------------------------------------
    def _known_partitions(self, cur: Any, table: str) -> set[int]:
        cur.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(format('%I.%I', $1::text, $2::text))",
            parameters=params(self.conn.namespace, table),
        )
        names = cur.fetch_arrow_table().column(0).to_pylist()
        found: set[int] = set()
        for n in names:
            suffix = n[len(table) + 1 :]
            if suffix[:1] in ("p", "m") and suffix[1:].isdigit():
                found.add(int(suffix[1:]) * (1 if suffix[0] == "p" else -1))
        return found

    def forget_partitions(self) -> None:
        """Empty the cache of known partitions (some were dropped, perhaps by another client)."""
        with self._partitions_lock:
            for known in self._partitions.values():
                known.clear()

    def ensure_partitions(self, needed: Mapping[str, Sequence[int]]) -> list[str]:
        """Create the missing time partitions ``{table: [k, ...]}`` in a short transaction of its
        own; return the names created.

        Creating a partition locks its parent (ACCESS EXCLUSIVE) until commit; doing it before
        the data transaction keeps that to milliseconds rather than the length of a store. An
        advisory lock orders concurrent creators; an unused empty partition is harmless.
        """
        with self._partitions_lock:
            missing = {t: [k for k in ks if k not in self._partitions[t]] for t, ks in needed.items()}
        if not any(missing.values()):
            return []
        days = self.partition_days

        def work(cur: Any) -> tuple[dict[str, set[int]], list[str]]:
            self.conn.lock_layout(cur)
            now: dict[str, set[int]] = {}
            created: list[str] = []
            for table, ks in missing.items():
                have = self._known_partitions(cur, table)
                for k in ks:
                    if k in have:
                        continue
                    lo, hi = k * days, (k + 1) * days
                    name = partition_name(table, k)
                    cur.execute(
                        f"CREATE TABLE {self.conn.t(name)} PARTITION OF "
                        f"{self.conn.t(table)} FOR VALUES FROM ({lo!r}) TO ({hi!r})"
                    )
                    have.add(k)
                    created.append(name)
                now[table] = have
            return now, created

        found, created = self.conn.run("partition creation", work)
        with self._partitions_lock:
            for table, ks in found.items():
                self._partitions[table] |= ks
        return created

    def time_partitions(self) -> list[TimePartition]:
        """Every partition of DiaSource and DiaForcedSource, ordered by table then start."""

        def work(cur: Any) -> dict[str, set[int]]:
            return {table: self._known_partitions(cur, table) for table in PARTITIONED}

        days = self.partition_days
        return [
            TimePartition(table, partition_name(table, k), k * days, (k + 1) * days)
            for table, ks in sorted(self.conn.run("partition listing", work).items())
            for k in sorted(ks)
        ]

    def create_time_partitions(self, start_mjd: float, end_mjd: float) -> list[str]:
        """Create (ahead of the stores that need them) the partitions of both source tables that
        cover ``[start_mjd, end_mjd)``; return the names created (none when all exist)."""
        if not (math.isfinite(start_mjd) and math.isfinite(end_mjd)) or end_mjd <= start_mjd:
            return []
        first = math.floor(start_mjd / self.partition_days)
        last = math.ceil(end_mjd / self.partition_days) - 1
        ks = list(range(first, last + 1))
        return self.ensure_partitions({table: ks for table in PARTITIONED})

    def drop_time_partitions(self, before_mjd: float) -> list[str]:
        """Drop every DiaSource/DiaForcedSource partition that ends at or before ``before_mjd``
        (O(1) per partition: no row is deleted one by one). Returns the dropped names."""

        def work(cur: Any) -> list[str]:
            self.conn.lock_layout(cur)
            dropped: list[str] = []
            for table in PARTITIONED:
                for k in sorted(self._known_partitions(cur, table)):
                    if (k + 1) * self.partition_days <= before_mjd:
                        name = partition_name(table, k)
                        cur.execute(f"DROP TABLE {self.conn.t(name)}")
                        dropped.append(name)
            return dropped

        dropped = self.conn.run("partition drop", work)
        self.forget_partitions()
        return dropped

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        """Whole partitions that end at or before the cutoff are dropped (O(1) each); only the
        partition straddling it has rows deleted one by one."""
        if table not in PARTITIONED:
            raise StorageError(f"{table} has no time column to delete by")
        cutoff = float(cutoff_mjd)

        def work(cur: Any) -> int:
            self.conn.lock_layout(cur)
            n = 0
            for k in sorted(self._known_partitions(cur, table)):
                if (k + 1) * self.partition_days <= cutoff:
                    name = self.conn.t(partition_name(table, k))
                    cur.execute(f"SELECT count(*) FROM {name}")
                    n += int(cur.fetch_arrow_table().column(0)[0].as_py())
                    cur.execute(f"DROP TABLE {name}")
            cur.execute(
                f"WITH d AS (DELETE FROM {self.conn.t(table)} WHERE {q(TIME_COLUMN[table])} < $1::float8 "
                "RETURNING 1) SELECT count(*) FROM d",
                parameters=params(cutoff),
            )
            n += int(cur.fetch_arrow_table().column(0)[0].as_py())
            return n

        n = self.conn.run(f"delete from {table}", work)
        with self._partitions_lock:
            self._partitions[table].clear()
        return n

    # ---- maintenance ---------------------------------------------------------------
    def cluster(self) -> None:
        """Rewrite each table in primary-key order (``_healpix_29`` first): one region's rows become
        contiguous. Takes exclusive locks: a maintenance-window operation, then ``ANALYZE``."""
        t = self.conn.t

        def work(cur: Any) -> None:
            for table in PARTITIONED:
                cur.execute(f"CLUSTER {t(table)} USING {q(table + '_pkey')}")
            cur.execute(f"CLUSTER {t(LATEST_TABLE)} USING {q(LATEST_TABLE + '_healpix')}")
            for table in (*PARTITIONED, LATEST_TABLE, "DiaObject"):
                cur.execute(f"ANALYZE {t(table)}")

        self.conn.run("cluster", work)

    def grant_read_only(self, role: str) -> None:
        """Let ``role`` (an existing PostgreSQL role) read this APDB and nothing more: USAGE on
        the schema and SELECT on its tables, now and (default privileges) on tables created
        later by the current role. Partitions are read through their parent, so new partitions
        need no grant. Writes by that role fail with "permission denied"."""
        ns, who = q(self.conn.namespace), q(role)

        def work(cur: Any) -> None:
            cur.execute(f"GRANT USAGE ON SCHEMA {ns} TO {who}")
            cur.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {ns} TO {who}")
            cur.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {ns} GRANT SELECT ON TABLES TO {who}")

        self.conn.run("grant", work)

    def table_stats(self) -> dict[str, TableStats]:
        names = ["DiaObject", LATEST_TABLE, "DiaSource", "DiaForcedSource", "diadb_visit"]

        def work(cur: Any) -> dict[str, TableStats]:
            stats: dict[str, TableStats] = {}
            for name in names:
                cur.execute(f"SELECT count(*) FROM {self.conn.t(name)}")
                rows = cur.fetch_arrow_table().column(0)[0].as_py()
                # A plain table has no partition tree (PostgreSQL 15 lists nothing): its own size.
                cur.execute(
                    "SELECT GREATEST(pg_total_relation_size(r), COALESCE((SELECT "
                    "SUM(pg_total_relation_size(relid)) FROM pg_partition_tree(r)), 0))::bigint "
                    "FROM to_regclass(format('%I.%I', $1::text, $2::text)) AS r",
                    parameters=params(self.conn.namespace, name),
                )
                size = cur.fetch_arrow_table().column(0)[0].as_py()
                stats[name] = TableStats(rows=int(rows), bytes=int(size))
            return stats

        return self.conn.run("stats", work)
