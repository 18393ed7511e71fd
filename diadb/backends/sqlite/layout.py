"""The SQLite engine's tables: their DDL, creation, metadata, schema evolution and sizes.

Layout: the source tables and the latest-version DiaObject table are ``WITHOUT ROWID`` tables
whose primary key starts with ``_healpix_29``, so the rows of one sky region are stored
together and a visit's read is a few range scans of contiguous pages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from diadb.backends.base import TableStats
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.sqlite.connection import SqliteConnection, q
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, ColumnSpec, TableSpec
from diadb.schema.types import sql_type

TIME_COLUMN = {"DiaSource": "midpointMjdTai", "DiaForcedSource": "midpointMjdTai"}

CHANGE_LOG_DDL = [
    "CREATE TABLE diadb_chunk (chunk_id INTEGER PRIMARY KEY, kind TEXT NOT NULL, visit INTEGER, "
    "detector INTEGER, visit_mjd_tai REAL, created_at TEXT NOT NULL, published INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE diadb_chunk_object (chunk_id INTEGER NOT NULL, diaObjectId INTEGER NOT NULL, "
    "validityStartMjdTai REAL NOT NULL)",
    "CREATE INDEX diadb_chunk_object_chunk ON diadb_chunk_object (chunk_id)",
    "CREATE TABLE diadb_update (chunk_id INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, "
    "payload TEXT NOT NULL, PRIMARY KEY (chunk_id, seq))",
    "CREATE TABLE diadb_source_overlay (diaSourceId INTEGER PRIMARY KEY, _healpix_29 INTEGER NOT NULL, "
    "midpointMjdTai REAL NOT NULL, diaObjectId INTEGER, ssObjectId INTEGER, ssObjectReassocTimeMjdTai REAL, "
    "timeWithdrawnMjdTai REAL)",
    "CREATE INDEX diadb_source_overlay_pix ON diadb_source_overlay (_healpix_29)",
    'CREATE INDEX diadb_DiaSource_visit ON "DiaSource" (visit, detector)',
    'CREATE INDEX diadb_DiaForcedSource_visit ON "DiaForcedSource" (visit, detector)',
    # Stores made with a key (Apdb.store(key=...)): the key registry, and the rows of each such
    # chunk by primary key (at most three integer columns).
    "CREATE TABLE diadb_store_key (key TEXT PRIMARY KEY, chunk_id INTEGER NOT NULL)",
    "CREATE TABLE diadb_chunk_member (chunk_id INTEGER NOT NULL, table_name TEXT NOT NULL, "
    "k0 INTEGER NOT NULL, k1 INTEGER, k2 INTEGER)",
    "CREATE INDEX diadb_chunk_member_chunk ON diadb_chunk_member (chunk_id)",
    "CREATE INDEX diadb_chunk_member_key ON diadb_chunk_member (table_name, k0, k1, k2)",
    # Withdrawal times of DiaForcedSources already in history segments.
    "CREATE TABLE diadb_forced_overlay (diaObjectId INTEGER NOT NULL, visit INTEGER NOT NULL, "
    "detector INTEGER NOT NULL, _healpix_29 INTEGER NOT NULL, midpointMjdTai REAL NOT NULL, "
    "timeWithdrawnMjdTai REAL, PRIMARY KEY (diaObjectId, visit, detector))",
    "CREATE INDEX diadb_forced_overlay_pix ON diadb_forced_overlay (_healpix_29)",
]

# The DiaObject snapshot of the history tier is a cache of the latest-object table: triggers
# record every object id written or deleted since the snapshot was made, whatever code path
# (store, daytime update, an older diadb) changed it, so a read takes the snapshot's rows of
# unchanged ids and the engine's rows of the changed ones. Created with the first snapshot.
CHANGED_TABLE = "diadb_object_changed"
OBJECT_CHANGES_DDL = [
    f"CREATE TABLE IF NOT EXISTS {CHANGED_TABLE} (diaObjectId INTEGER PRIMARY KEY)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS diadb_object_changed_{event.lower()} AFTER {event} "
        f'ON "{LATEST_TABLE}" BEGIN INSERT OR IGNORE INTO {CHANGED_TABLE} VALUES ({row}.diaObjectId); END'
        for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
    ),
]


def create_table(name: str, spec: TableSpec, key: Sequence[str]) -> str:
    """``CREATE TABLE`` for a schema table, plus the pixel column, clustered on ``key``."""
    cols = [
        f"{q(c.name)} {sql_type(c.datatype, 'sqlite')}{'' if c.nullable else ' NOT NULL'}"
        for c in spec.columns
    ]
    cols.append(f"{q(HEALPIX_COLUMN)} INTEGER NOT NULL")
    cols.append(f"PRIMARY KEY ({', '.join(map(q, key))})")
    return f"CREATE TABLE {q(name)} ({', '.join(cols)}) WITHOUT ROWID"


def layout_ddl(schema: ApdbSchema) -> list[str]:
    """Every statement that creates a new database's tables and indexes."""
    ddl = ["CREATE TABLE diadb_metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL)"]
    ddl.append(
        "CREATE TABLE diadb_visit (visit INTEGER NOT NULL, detector INTEGER NOT NULL, "
        "visit_mjd_tai REAL NOT NULL, stored_at TEXT NOT NULL, n_objects INTEGER NOT NULL, "
        "n_sources INTEGER NOT NULL, n_forced_sources INTEGER NOT NULL, chunk_id INTEGER, "
        "PRIMARY KEY (visit, detector))"
    )
    # The manifest of history segments (diadb.history), and segments waiting for deletion.
    ddl.append(
        "CREATE TABLE diadb_segment (segment_id INTEGER PRIMARY KEY, table_name TEXT NOT NULL, "
        "name TEXT NOT NULL UNIQUE, t_min REAL NOT NULL, t_max REAL NOT NULL, span_start REAL NOT NULL, "
        "span_end REAL NOT NULL, pix_min INTEGER NOT NULL, pix_max INTEGER NOT NULL, "
        "rows INTEGER NOT NULL, bytes INTEGER NOT NULL, checksum TEXT NOT NULL)"
    )
    ddl.append("CREATE TABLE diadb_segment_trash (name TEXT PRIMARY KEY, dropped_at REAL NOT NULL)")
    obj = schema.table("DiaObject")
    ddl.append(create_table("DiaObject", obj, obj.primary_key or ("diaObjectId", "validityStartMjdTai")))
    ddl.append(create_table(LATEST_TABLE, obj, (HEALPIX_COLUMN, "diaObjectId")))
    ddl.append(f"CREATE UNIQUE INDEX diadb_latest_id ON {q(LATEST_TABLE)} (diaObjectId)")
    for name in ("DiaSource", "DiaForcedSource"):
        spec = schema.table(name)
        pk = spec.primary_key
        ddl.append(create_table(name, spec, (HEALPIX_COLUMN, TIME_COLUMN[name], *pk)))
        ddl.append(f"CREATE UNIQUE INDEX {q('diadb_' + name + '_pk')} ON {q(name)} ({', '.join(map(q, pk))})")
        if pk[:1] != ("diaObjectId",):
            ddl.append(f"CREATE INDEX {q('diadb_' + name + '_object')} ON {q(name)} (diaObjectId)")
    return ddl + CHANGE_LOG_DDL


class SqliteLayout:
    """The tables of one database, and the schema they were made from (the other parts ask
    this object for it: it is attached after the connection is made)."""

    def __init__(self, conn: SqliteConnection) -> None:
        self._conn = conn
        self._schema: ApdbSchema | None = None

    @property
    def schema(self) -> ApdbSchema:
        if self._schema is None:
            raise StorageError("backend used before its schema was attached")
        return self._schema

    def attach_schema(self, schema: ApdbSchema) -> None:
        self._schema = schema

    def initialize(self, schema: ApdbSchema, metadata: Mapping[str, str]) -> None:
        self._schema = schema
        with self._conn.transaction() as cur:
            for stmt in layout_ddl(schema):
                cur.execute(stmt)
            cur.adbc_ingest(
                "diadb_metadata",
                pa.table({"key": list(metadata), "value": list(metadata.values())}),
                mode="append",
            )

    def read_metadata(self) -> dict[str, str]:
        try:
            t = self._conn.fetch("SELECT key, value FROM diadb_metadata")
        except StorageError:
            return {}
        return dict(zip(t.column("key").to_pylist(), t.column("value").to_pylist(), strict=True))

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        with self._conn.transaction() as cur:
            for key, value in values.items():
                cur.execute("INSERT OR REPLACE INTO diadb_metadata (key, value) VALUES (?, ?)", [key, value])
            for key in delete:
                cur.execute("DELETE FROM diadb_metadata WHERE key = ?", [key])

    def upgrade_layout(self, from_version: str) -> list[str]:
        """Migrate diadb's own tables from an older layout, in one transaction."""
        steps: list[str] = []
        if from_version.startswith("1.0."):
            with self._conn.transaction() as cur:
                for stmt in CHANGE_LOG_DDL:
                    cur.execute(stmt)
                cur.execute("ALTER TABLE diadb_visit ADD COLUMN chunk_id INTEGER")
                # One store chunk per visit already stored, in the order they were stored.
                cur.execute(
                    "INSERT INTO diadb_chunk (kind, visit, detector, visit_mjd_tai, created_at, published) "
                    "SELECT 'store', visit, detector, visit_mjd_tai, stored_at, 0 FROM diadb_visit "
                    "ORDER BY stored_at, visit, detector"
                )
                cur.execute(
                    "UPDATE diadb_visit SET chunk_id = (SELECT c.chunk_id FROM diadb_chunk c "
                    "WHERE c.visit = diadb_visit.visit AND c.detector = diadb_visit.detector)"
                )
                # Layout 1.0 did not record which store wrote an object version: a version
                # that started at a visit's time is attributed to that visit's chunk.
                cur.execute(
                    "INSERT INTO diadb_chunk_object "
                    'SELECT c.chunk_id, o."diaObjectId", o."validityStartMjdTai" '
                    'FROM "DiaObject" o JOIN diadb_chunk c ON c.visit_mjd_tai = o."validityStartMjdTai"'
                )
            steps.append("layout 1.0 -> 1.1: change log tables (chunks backfilled from the visit registry)")
        return steps

    def add_columns(self, table: str, columns: Sequence[ColumnSpec]) -> None:
        """Add nullable columns to a stored table (and to the latest-object table for DiaObject)."""
        physical = [table] + ([LATEST_TABLE] if table == "DiaObject" else [])
        with self._conn.transaction() as cur:
            for name in physical:
                for col in columns:
                    cur.execute(
                        f"ALTER TABLE {q(name)} ADD COLUMN {q(col.name)} {sql_type(col.datatype, 'sqlite')}"
                    )

    def table_stats(self) -> dict[str, TableStats]:
        stats: dict[str, TableStats] = {}
        for name in ("DiaObject", LATEST_TABLE, "DiaSource", "DiaForcedSource", "diadb_visit"):
            rows = self._conn.scalar(f"SELECT count(*) AS n FROM {q(name)}")
            size = self._conn.scalar(
                "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN "
                "(SELECT name FROM sqlite_master WHERE tbl_name = ?)",
                [name],
            )
            stats[name] = TableStats(rows=int(rows), bytes=int(size))
        return stats
