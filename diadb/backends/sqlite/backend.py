"""The embedded default engine: one SQLite file in WAL mode, data moved as Arrow through ADBC.

Layout: the source tables and the latest-version DiaObject table are ``WITHOUT ROWID`` tables
whose primary key starts with ``_healpix_29``, so the rows of one sky region are stored
together and a visit's read is a few range scans of contiguous pages. ADBC's SQLite driver
moves whole Arrow tables in and out (measured ~10x faster than ``sqlite3`` + Python tuples
for 100-column rows); one writer and any number of reader processes share the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import Int64Array, ReadTable, TableStats, TimeWindow, VisitBatch
from diadb.backends.common.members import MEMBER_TABLES, member_rows
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.sqlite.changes import CHANGE_LOG_DDL, SqliteChanges
from diadb.backends.sqlite.forced import SqliteForced
from diadb.backends.sqlite.url import history_directory, is_foreign_file, path_from_url
from diadb.config import ApdbConfig
from diadb.errors import ConfigError, StorageError
from diadb.history.manifest import FaultHook, ObjectSnapshotWriter, SegmentSweeper, SegmentWriter
from diadb.history.segment import SegmentInfo
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, ColumnSpec, TableSpec
from diadb.schema.types import sql_type
from diadb.sky.healpix import coarsen_ranges, in_ranges

TIME_COLUMN = {"DiaSource": "midpointMjdTai", "DiaForcedSource": "midpointMjdTai"}
# Above this many ranges a query's cover is coarsened (merged across the smallest gaps);
# the exact region filter in the facade removes the extra rows.
MAX_RANGES = 2000
# The DiaObject snapshot of the history tier is a cache of the latest-object table: triggers
# record every object id written or deleted since the snapshot was made, whatever code path
# (store, daytime update, an older diadb) changed it, so a read takes the snapshot's rows of
# unchanged ids and the engine's rows of the changed ones. Created with the first snapshot.
_CHANGED = "diadb_object_changed"
OBJECT_CHANGES_DDL = [
    f"CREATE TABLE IF NOT EXISTS {_CHANGED} (diaObjectId INTEGER PRIMARY KEY)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS diadb_object_changed_{event.lower()} AFTER {event} "
        f'ON "{LATEST_TABLE}" BEGIN INSERT OR IGNORE INTO {_CHANGED} VALUES ({row}.diaObjectId); END'
        for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
    ),
]
# ADBC's SQLite driver infers column types from the first batch; one batch for the whole
# result makes a column that starts with NULLs come back with its real type.
_BATCH_ROWS = str(2**30)


def q(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


class SqliteBackend(SqliteChanges, SqliteForced):
    """SQLite through ADBC. See the module docstring for the layout."""

    #: ``Apdb.store(key=...)`` is supported (a key registry and chunk membership).
    supports_store_key = True

    def __init__(self, url: str, *, create: bool) -> None:
        import adbc_driver_manager
        import adbc_driver_sqlite.dbapi as dbapi

        self._errors: tuple[type[BaseException], ...] = (adbc_driver_manager.Error,)
        self.path = path_from_url(url)
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if create and exists:
            raise ConfigError(f"{self.path} already exists; use Apdb.open to use it")
        if not create and not exists:
            raise ConfigError(f"no APDB at {self.path}; use Apdb.create to make one")
        if not create and is_foreign_file(self.path):
            raise ConfigError(f"{self.path} is neither a PPDB export directory nor a SQLite database")
        if create:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = dbapi.connect(self.path, autocommit=True)
        except self._errors as e:
            raise StorageError(f"cannot open SQLite database {self.path}: {e}") from e
        self._schema: ApdbSchema | None = None
        cur = self._conn.cursor()
        if create:
            # Large pages keep 100-column rows on one page; must be set before WAL is enabled.
            cur.execute("PRAGMA page_size = 32768")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")  # until configure() says otherwise
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA temp_store = MEMORY")
        cur.execute("PRAGMA mmap_size = 4294967296")
        cur.close()

    def configure(self, config: ApdbConfig) -> None:
        """Apply the frozen config's engine options: ``sqlite_synchronous``."""
        level = "NORMAL" if config.sqlite_synchronous == "NORMAL" else "FULL"
        cur = self._conn.cursor()
        try:
            cur.execute(f"PRAGMA synchronous = {level}")
        finally:
            cur.close()

    # ---- helpers -------------------------------------------------------------------
    def _cursor(self) -> Any:
        cur = self._conn.cursor()
        cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": _BATCH_ROWS})
        return cur

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        cur = self._cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            cur.close()
            raise
        cur.execute("COMMIT")
        cur.close()

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        cur = self._cursor()
        try:
            cur.execute(sql, list(params) if params else None)
            result: pa.Table = cur.fetch_arrow_table()
            return result
        except self._errors as e:
            raise StorageError(f"SQLite read failed on {self.path}: {e}") from e
        finally:
            cur.close()

    def _temp_table(self, cur: Any, name: str, data: pa.Table) -> None:
        cur.execute(f"DROP TABLE IF EXISTS temp.{q(name)}")
        cur.adbc_ingest(name, data, mode="create", temporary=True)

    @property
    def schema(self) -> ApdbSchema:
        if self._schema is None:
            raise StorageError("backend used before its schema was attached")
        return self._schema

    # ---- set-up --------------------------------------------------------------------
    def initialize(self, schema: ApdbSchema, metadata: Mapping[str, str]) -> None:
        self._schema = schema
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
        ddl.append(
            self._create_table("DiaObject", obj, obj.primary_key or ("diaObjectId", "validityStartMjdTai"))
        )
        ddl.append(self._create_table(LATEST_TABLE, obj, (HEALPIX_COLUMN, "diaObjectId")))
        ddl.append(f"CREATE UNIQUE INDEX diadb_latest_id ON {q(LATEST_TABLE)} (diaObjectId)")
        for name in ("DiaSource", "DiaForcedSource"):
            spec = schema.table(name)
            pk = spec.primary_key
            ddl.append(self._create_table(name, spec, (HEALPIX_COLUMN, TIME_COLUMN[name], *pk)))
            ddl.append(
                f"CREATE UNIQUE INDEX {q('diadb_' + name + '_pk')} ON {q(name)} ({', '.join(map(q, pk))})"
            )
            if pk[:1] != ("diaObjectId",):
                ddl.append(f"CREATE INDEX {q('diadb_' + name + '_object')} ON {q(name)} (diaObjectId)")
        ddl += CHANGE_LOG_DDL
        with self._transaction() as cur:
            for stmt in ddl:
                cur.execute(stmt)
            cur.adbc_ingest(
                "diadb_metadata",
                pa.table({"key": list(metadata), "value": list(metadata.values())}),
                mode="append",
            )

    def _create_table(self, name: str, spec: TableSpec, key: Sequence[str]) -> str:
        cols = [
            f"{q(c.name)} {sql_type(c.datatype, 'sqlite')}{'' if c.nullable else ' NOT NULL'}"
            for c in spec.columns
        ]
        cols.append(f"{q(HEALPIX_COLUMN)} INTEGER NOT NULL")
        cols.append(f"PRIMARY KEY ({', '.join(map(q, key))})")
        return f"CREATE TABLE {q(name)} ({', '.join(cols)}) WITHOUT ROWID"

    def read_metadata(self) -> dict[str, str]:
        try:
            t = self._fetch("SELECT key, value FROM diadb_metadata")
        except StorageError:
            return {}
        return dict(zip(t.column("key").to_pylist(), t.column("value").to_pylist(), strict=True))

    def counters(self) -> dict[str, int]:
        """Event counters since open."""
        return {}

    def attach_schema(self, schema: ApdbSchema) -> None:
        self._schema = schema

    # ---- reads ---------------------------------------------------------------------
    def select(
        self,
        table: ReadTable,
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None = None,
        object_ids: Int64Array | None = None,
    ) -> pa.Table:
        physical = LATEST_TABLE if table == "DiaObject" else table
        select_list = ", ".join(f"t.{q(c)}" for c in columns)
        where: list[str] = []
        params: list[Any] = []
        if window is not None:
            tcol = q(TIME_COLUMN[table])
            if np.isfinite(window.start):
                where.append(f"t.{tcol} > ?")
                params.append(float(window.start))
            if np.isfinite(window.end):
                where.append(f"t.{tcol} <= ?")
                params.append(float(window.end))
        cur = self._cursor()
        try:
            if object_ids is not None:
                ids = np.unique(np.asarray(object_ids, dtype=np.int64))
                self._temp_table(cur, "diadb_ids", pa.table({"id": ids}))
            if len(ranges):
                r = coarsen_ranges(np.asarray(ranges, dtype=np.int64), MAX_RANGES)
                values = ", ".join(["(?, ?)"] * len(r))
                if object_ids is not None:
                    where.append("t.diaObjectId IN (SELECT id FROM temp.diadb_ids)")
                # CROSS JOIN fixes the ranges as the outer loop: one primary-key range scan each.
                sql = (
                    f"WITH r(lo, hi) AS (VALUES {values}) "
                    f"SELECT {select_list} FROM r CROSS JOIN {q(physical)} t "
                    f"ON t.{q(HEALPIX_COLUMN)} >= r.lo AND t.{q(HEALPIX_COLUMN)} < r.hi"
                )
                params = [int(x) for x in r.ravel()] + params
            elif object_ids is not None:
                sql = (
                    f"SELECT {select_list} FROM temp.diadb_ids i "
                    f"CROSS JOIN {q(physical)} t ON t.diaObjectId = i.id"
                )
            else:
                sql = f"SELECT {select_list} FROM {q(physical)} t"
            if where:
                sql += (" AND " if len(ranges) or object_ids is not None else " WHERE ") + " AND ".join(where)
            cur.execute(sql, params or None)
            result: pa.Table = cur.fetch_arrow_table()
            return result
        except self._errors as e:
            raise StorageError(f"SQLite read of {table} failed on {self.path}: {e}") from e
        finally:
            cur.close()

    def existing_keys(self, table: str, keys: pa.Table) -> pa.Table:
        physical = LATEST_TABLE if table == "DiaObjectLatest" else table
        cols = keys.column_names
        cur = self._cursor()
        try:
            self._temp_table(cur, "diadb_probe", keys)
            match = " AND ".join(f"t.{q(c)} = p.{q(c)}" for c in cols)
            cur.execute(
                f"SELECT {', '.join('p.' + q(c) for c in cols)} FROM temp.diadb_probe p "
                f"WHERE EXISTS (SELECT 1 FROM {q(physical)} t WHERE {match})"
            )
            result: pa.Table = cur.fetch_arrow_table()
            return result
        except self._errors as e:
            raise StorageError(f"SQLite key lookup in {table} failed: {e}") from e
        finally:
            cur.close()

    def known_object_ids(self, ids: Int64Array) -> Int64Array:
        found = self.existing_keys("DiaObjectLatest", pa.table({"diaObjectId": np.unique(ids)}))
        return np.asarray(found.column("diaObjectId").to_numpy(), dtype=np.int64)

    def count_before(self, table: str, cutoff_mjd: float) -> int:
        sql = f"SELECT count(*) FROM {q(table)} WHERE {q(TIME_COLUMN[table])} < ?"
        return int(self._fetch(sql, [cutoff_mjd]).column(0)[0].as_py())

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        with self._transaction() as cur:
            n = self.count_before(table, cutoff_mjd)
            cur.execute(f"DELETE FROM {q(table)} WHERE {q(TIME_COLUMN[table])} < ?", [cutoff_mjd])
        return n

    def latest_visit_mjd(self) -> float | None:
        value = self._fetch("SELECT MAX(visit_mjd_tai) FROM diadb_visit").column(0)[0].as_py()
        return None if value is None else float(value)

    def contains_visit_detector(self, visit: int, detector: int) -> bool:
        if detector == -1:
            t = self._fetch("SELECT 1 FROM diadb_visit WHERE visit = ? LIMIT 1", [int(visit)])
        else:
            t = self._fetch(
                "SELECT 1 FROM diadb_visit WHERE visit = ? AND detector IN (?, -1) LIMIT 1",
                [int(visit), int(detector)],
            )
        return bool(t.num_rows > 0)

    def contains_store_key(self, key: str) -> bool:
        t = self._fetch("SELECT 1 FROM diadb_store_key WHERE key = ?", [key])
        return bool(t.num_rows > 0)

    # ---- writes --------------------------------------------------------------------
    def store_visit(self, batch: VisitBatch) -> bool:
        try:
            with self._transaction() as cur:
                # Checked inside the write transaction, so two writers cannot both store it.
                if batch.key is not None:
                    cur.execute("SELECT 1 FROM diadb_store_key WHERE key = ?", [batch.key])
                elif batch.detector == -1:
                    cur.execute("SELECT 1 FROM diadb_visit WHERE visit = ? LIMIT 1", [batch.visit])
                else:
                    cur.execute(
                        "SELECT 1 FROM diadb_visit WHERE visit = ? AND detector IN (?, -1) LIMIT 1",
                        [batch.visit, batch.detector],
                    )
                if cur.fetchall():
                    raise _AlreadyStored
                chunk = self._log_chunk(cur, "store", batch.visit, batch.detector, batch.visit_mjd_tai)
                if batch.objects.num_rows:
                    self._store_objects(cur, batch.objects)
                    keys = batch.objects.select(["diaObjectId", "validityStartMjdTai"])
                    keys = keys.add_column(
                        0, "chunk_id", pa.array(np.full(keys.num_rows, chunk, dtype=np.int64))
                    )
                    cur.adbc_ingest("diadb_chunk_object", keys, mode="append")
                if batch.sources.num_rows:
                    cur.adbc_ingest("DiaSource", batch.sources, mode="append")
                if batch.forced_sources.num_rows:
                    cur.adbc_ingest("DiaForcedSource", batch.forced_sources, mode="append")
                row = [
                    batch.visit,
                    batch.detector,
                    batch.visit_mjd_tai,
                    _dt.datetime.now(_dt.UTC).isoformat(),
                    batch.objects.num_rows,
                    batch.sources.num_rows,
                    batch.forced_sources.num_rows,
                    chunk,
                ]
                if batch.key is None:
                    cur.execute("INSERT INTO diadb_visit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                else:
                    self._register_keyed(cur, batch, chunk, row)
        except _AlreadyStored:
            return False
        except self._errors as e:
            raise StorageError(
                f"SQLite store of visit {batch.visit} detector {batch.detector} failed: {e}"
            ) from e
        return True

    def _register_keyed(self, cur: Any, batch: VisitBatch, chunk: int, row: list[Any]) -> None:
        """A keyed store: its key, the primary keys of its rows, and its visit/detector (shared
        with other keyed stores of that visit/detector: counts add up, the latest time wins)."""
        cur.execute("INSERT INTO diadb_store_key (key, chunk_id) VALUES (?, ?)", [batch.key, chunk])
        for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
            if data.num_rows and name in MEMBER_TABLES:
                members = member_rows(self.schema.table(name), data, "chunk_id", chunk)
                cur.adbc_ingest("diadb_chunk_member", members, mode="append")
        cur.execute(
            "INSERT INTO diadb_visit VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (visit, detector) DO UPDATE "
            "SET visit_mjd_tai = max(visit_mjd_tai, excluded.visit_mjd_tai), "
            "n_objects = n_objects + excluded.n_objects, n_sources = n_sources + excluded.n_sources, "
            "n_forced_sources = n_forced_sources + excluded.n_forced_sources, chunk_id = excluded.chunk_id",
            row,
        )

    def _store_objects(self, cur: Any, objects: pa.Table) -> None:
        keys = objects.select(["diaObjectId", "validityStartMjdTai"]).rename_columns(["id", "start"])
        self._temp_table(cur, "diadb_new_versions", keys)
        cur.execute("CREATE UNIQUE INDEX temp.diadb_new_versions_id ON diadb_new_versions (id)")
        # Close the open version of each updated object at the new version's start.
        cur.execute(
            'UPDATE "DiaObject" SET "validityEndMjdTai" = (SELECT n.start FROM temp.diadb_new_versions n '
            'WHERE n.id = "DiaObject"."diaObjectId") '
            'WHERE "diaObjectId" IN (SELECT id FROM temp.diadb_new_versions) AND "validityEndMjdTai" IS NULL'
        )
        # Re-storing the same version (same id and start) replaces it rather than failing.
        cur.execute(
            'DELETE FROM "DiaObject" WHERE ("diaObjectId", "validityStartMjdTai") IN '
            "(SELECT id, start FROM temp.diadb_new_versions)"
        )
        cur.adbc_ingest("DiaObject", objects, mode="append")
        cur.execute(
            f"DELETE FROM {q(LATEST_TABLE)} WHERE diaObjectId IN (SELECT id FROM temp.diadb_new_versions)"
        )
        cur.adbc_ingest(LATEST_TABLE, objects, mode="append")

    # ---- history tier --------------------------------------------------------------
    def history_directory(self) -> Path:
        return history_directory(self.path)

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Reads inside see one consistent state (one SQLite read transaction in WAL mode)."""
        cur = self._conn.cursor()
        cur.execute("BEGIN")
        try:
            yield
        finally:
            cur.execute("COMMIT")
            cur.close()

    def list_segments(self, table: str | None = None) -> list[SegmentInfo]:
        sql = (
            "SELECT table_name, name, t_min, t_max, span_start, span_end, pix_min, pix_max, rows, bytes, "
            "checksum, segment_id FROM diadb_segment"
        )
        if table:
            t = self._fetch(sql + " WHERE table_name = ? ORDER BY segment_id", [table])
        else:
            t = self._fetch(sql + " ORDER BY segment_id")
        return [
            SegmentInfo(
                table=r["table_name"],
                name=r["name"],
                t_min=r["t_min"],
                t_max=r["t_max"],
                span_start=r["span_start"],
                span_end=r["span_end"],
                pix_min=r["pix_min"],
                pix_max=r["pix_max"],
                rows=r["rows"],
                bytes=r["bytes"],
                checksum=r["checksum"],
                segment_id=r["segment_id"],
            )
            for r in t.to_pylist()
        ]

    def compact_history(
        self,
        tables: Sequence[str],
        boundary: float,
        write: SegmentWriter,
        sweep: SegmentSweeper,
        fault: FaultHook | None = None,
        objects: ObjectSnapshotWriter | None = None,
    ) -> list[SegmentInfo]:
        """Move every row older than ``boundary`` into segments, in one write transaction;
        with ``objects``, also replace the DiaObject snapshot (see ``OBJECT_CHANGES_DDL``).

        Files are written (and made durable) by ``write`` while the transaction holds the
        write lock; the manifest rows and the deletion of the moved rows commit together.
        A crash before the commit leaves the rows in the engine and an orphan file that the
        next compaction's ``sweep`` deletes.
        """
        hook = fault or (lambda step: None)
        created: list[SegmentInfo] = []
        try:
            with self._transaction() as cur:
                trash = self._fetch("SELECT name, dropped_at FROM diadb_segment_trash")
                trash_list = list(zip(trash.column(0).to_pylist(), trash.column(1).to_pylist(), strict=True))
                for name in sweep(self.list_segments(), trash_list):
                    cur.execute("DELETE FROM diadb_segment_trash WHERE name = ?", [name])
                for table in tables:
                    tcol = q(TIME_COLUMN[table])
                    cur.execute(f"SELECT * FROM {q(table)} WHERE {tcol} < ?", [boundary])
                    rows: pa.Table = cur.fetch_arrow_table()
                    hook("read")
                    if rows.num_rows == 0:
                        continue
                    infos = write(table, rows)
                    for info in infos:
                        self._record_segment(cur, info)
                    cur.execute(f"DELETE FROM {q(table)} WHERE {tcol} < ?", [boundary])
                    created += infos
                if objects is not None:
                    created += self._refresh_object_snapshot(cur, objects, hook)
                hook("commit")
            hook("committed")
        except self._errors as e:
            raise StorageError(f"SQLite compaction failed on {self.path}: {e}") from e
        return created

    @staticmethod
    def _record_segment(cur: Any, info: SegmentInfo) -> None:
        cur.execute(
            "INSERT INTO diadb_segment (table_name, name, t_min, t_max, span_start, "
            "span_end, pix_min, pix_max, rows, bytes, checksum) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                info.table,
                info.name,
                info.t_min,
                info.t_max,
                info.span_start,
                info.span_end,
                info.pix_min,
                info.pix_max,
                info.rows,
                info.bytes,
                info.checksum,
            ],
        )

    def _refresh_object_snapshot(
        self, cur: Any, write: ObjectSnapshotWriter, hook: FaultHook
    ) -> list[SegmentInfo]:
        """Inside compaction's transaction: write a current DiaObject snapshot, record it, send
        the old one to the trash and forget the changes it now includes."""
        old = self.list_segments("DiaObject")
        tracking = bool(
            self._fetch("SELECT count(*) FROM sqlite_master WHERE name = ?", [_CHANGED]).column(0)[0].as_py()
        )
        if old and tracking:
            cur.execute(f"SELECT diaObjectId FROM {_CHANGED}")
            ids = np.asarray(cur.fetch_arrow_table().column(0).to_numpy(), np.int64)
            if not len(ids):
                return []
            changed: Int64Array | None = ids
            cur.execute(
                f"SELECT t.* FROM {_CHANGED} c CROSS JOIN {q(LATEST_TABLE)} t "
                "ON t.diaObjectId = c.diaObjectId"
            )
        else:
            # First snapshot (or one lost): every latest row, and start tracking changes.
            for stmt in OBJECT_CHANGES_DDL:
                cur.execute(stmt)
            changed = None
            cur.execute(f"SELECT * FROM {q(LATEST_TABLE)}")
        rows: pa.Table = cur.fetch_arrow_table()
        if changed is None and rows.num_rows == 0:
            return []
        hook("objects")
        info = write(old[0] if old else None, changed, rows)
        self._record_segment(cur, info)
        if old:
            cur.execute(
                "INSERT OR IGNORE INTO diadb_segment_trash (name, dropped_at) VALUES (?, ?)",
                [old[0].name, time.time()],
            )
            cur.execute("DELETE FROM diadb_segment WHERE segment_id = ?", [old[0].segment_id])
        cur.execute(f"DELETE FROM {_CHANGED}")
        return [info]

    def select_changed_objects(
        self, ranges: Int64Array, columns: Sequence[str]
    ) -> tuple[Int64Array, pa.Table]:
        changed = np.asarray(
            self._fetch(f"SELECT diaObjectId FROM {_CHANGED}").column(0).to_numpy(), np.int64
        )
        cols = ", ".join(f"t.{q(c)}" for c in columns)
        sql = (
            f"SELECT {cols} FROM {_CHANGED} c CROSS JOIN {q(LATEST_TABLE)} t ON t.diaObjectId = c.diaObjectId"
        )
        params: list[Any] = []
        if len(ranges):
            # The cover's bounds in SQL; the exact ranges below (a few changed rows at most).
            sql += f" WHERE t.{q(HEALPIX_COLUMN)} >= ? AND t.{q(HEALPIX_COLUMN)} < ?"
            params = [int(ranges[0, 0]), int(ranges[-1, 1])]
        rows = self._fetch(sql, params)
        if len(ranges) and rows.num_rows:
            rows = rows.filter(pa.array(in_ranges(rows.column(HEALPIX_COLUMN).to_numpy(), ranges)))
        return changed, rows

    def drop_segments(self, segment_ids: Sequence[int]) -> None:
        """Remove segments from the manifest; their files go to the trash (deleted after a grace)."""
        if not segment_ids:
            return
        ids = [int(i) for i in segment_ids]
        marks = ", ".join("?" * len(ids))
        with self._transaction() as cur:
            cur.execute(
                f"INSERT OR IGNORE INTO diadb_segment_trash SELECT name, ? FROM diadb_segment "
                f"WHERE segment_id IN ({marks})",
                [time.time(), *ids],
            )
            cur.execute(f"DELETE FROM diadb_segment WHERE segment_id IN ({marks})", ids)

    # ---- schema evolution ----------------------------------------------------------
    def upgrade_layout(self, from_version: str) -> list[str]:
        """Migrate diadb's own tables from an older layout, in one transaction."""
        steps: list[str] = []
        if from_version.startswith("1.0."):
            with self._transaction() as cur:
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
        with self._transaction() as cur:
            for name in physical:
                for col in columns:
                    cur.execute(
                        f"ALTER TABLE {q(name)} ADD COLUMN {q(col.name)} {sql_type(col.datatype, 'sqlite')}"
                    )

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        with self._transaction() as cur:
            for key, value in values.items():
                cur.execute("INSERT OR REPLACE INTO diadb_metadata (key, value) VALUES (?, ?)", [key, value])
            for key in delete:
                cur.execute("DELETE FROM diadb_metadata WHERE key = ?", [key])

    # ---- bookkeeping ---------------------------------------------------------------
    def table_stats(self) -> dict[str, TableStats]:
        stats: dict[str, TableStats] = {}
        for name in ("DiaObject", LATEST_TABLE, "DiaSource", "DiaForcedSource", "diadb_visit"):
            rows = self._fetch(f"SELECT count(*) AS n FROM {q(name)}").column(0)[0].as_py()
            size = (
                self._fetch(
                    "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN "
                    "(SELECT name FROM sqlite_master WHERE tbl_name = ?)",
                    [name],
                )
                .column(0)[0]
                .as_py()
            )
            stats[name] = TableStats(rows=int(rows), bytes=int(size))
        return stats

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


class _AlreadyStored(Exception):
    """Internal: unwinds the store transaction when the visit is already present."""
