"""SQLite: the change log (replica chunks) and the daytime updates of stored rows.

Every store and every daytime call is one chunk, numbered in commit order (the write lock
serialises them). A store chunk's rows are found by the ``visit``/``detector`` columns that
every source row carries, and by a list of the object versions it wrote; a daytime chunk
holds update records (JSON). Sources already moved into history segments cannot be updated
in place: their mutable columns go to an overlay table that reads apply on top.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import Int64Array, TimeWindow
from diadb.backends.common.members import MEMBER_TABLES, member_key, member_match
from diadb.backends.common.names import LATEST_TABLE
from diadb.errors import StorageError
from diadb.updates import (
    CURRENT_COLUMNS,
    MUTABLE_SOURCE_COLUMNS,
    apply_source_overlay,
    closing_payload,
    empty_current,
    normalise_current,
    object_counts,
    plan_source_update,
    require_known,
)

if TYPE_CHECKING:
    from diadb.schema.model import ApdbSchema


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

#: Finds sources in the history segments: ids -> their current row (id, pixel, time, mutable columns).
SegmentSourceLookup = Callable[[Int64Array], pa.Table]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


class SqliteChanges:
    """Mixed into ``SqliteBackend``; uses its connection helpers."""

    # Provided by SqliteBackend.
    _errors: tuple[type[BaseException], ...]
    path: str
    _transaction: Callable[[], Any]
    _fetch: Callable[..., pa.Table]
    _temp_table: Callable[[Any, str, pa.Table], None]
    _cursor: Callable[[], Any]

    if TYPE_CHECKING:

        @property
        def schema(self) -> ApdbSchema: ...

    # ---- the change log ------------------------------------------------------------
    def _log_chunk(
        self, cur: Any, kind: str, visit: int | None, detector: int | None, mjd: float | None
    ) -> int:
        cur.execute(
            "INSERT INTO diadb_chunk (kind, visit, detector, visit_mjd_tai, created_at) "
            "VALUES (?, ?, ?, ?, ?) RETURNING chunk_id",
            [kind, visit, detector, mjd, _now()],
        )
        return int(cur.fetchall()[0][0])

    def _log_updates(self, cur: Any, chunk_id: int, kind: str, payloads: Sequence[dict[str, Any]]) -> None:
        if payloads:
            records = pa.table(
                {
                    "chunk_id": pa.array([chunk_id] * len(payloads), pa.int64()),
                    "seq": pa.array(np.arange(len(payloads)), pa.int64()),
                    "kind": pa.array([kind] * len(payloads)),
                    "payload": pa.array([json.dumps(p) for p in payloads]),
                }
            )
            cur.adbc_ingest("diadb_update", records, mode="append")

    def list_chunks(self, published: bool | None = None) -> pa.Table:
        sql = (
            "SELECT chunk_id, kind, visit, detector, visit_mjd_tai, created_at AS stored_at, published "
            "FROM diadb_chunk"
            + ("" if published is None else f" WHERE published = {int(published)}")
            + " ORDER BY chunk_id"
        )
        return self._fetch(sql)

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        ids = pa.table({"id": np.asarray(chunk_ids, dtype=np.int64)})
        with self._transaction() as cur:
            self._temp_table(cur, "diadb_publish", ids)
            cur.execute(
                "UPDATE diadb_chunk SET published = 1 WHERE chunk_id IN (SELECT id FROM temp.diadb_publish)"
            )

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        """The engine's rows written by these store chunks, each with a ``_chunk_id`` column first,
        the update records of these daytime chunks, and (``members``) the primary keys that keyed
        stores recorded. A keyed store's rows are found by those keys; any other store's by its
        visit/detector (rows that a keyed store recorded excepted)."""
        ids = pa.table({"id": np.asarray(chunk_ids, dtype=np.int64)})
        cur = self._cursor()
        try:
            self._temp_table(cur, "diadb_chunks", ids)
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS diadb_chunk_keys AS SELECT chunk_id, visit, detector, "
                "0 AS keyed FROM diadb_chunk WHERE 0"
            )
            cur.execute("DELETE FROM temp.diadb_chunk_keys")
            cur.execute(
                "INSERT INTO temp.diadb_chunk_keys SELECT c.chunk_id, c.visit, c.detector, "
                "EXISTS (SELECT 1 FROM diadb_store_key s WHERE s.chunk_id = c.chunk_id) FROM diadb_chunk c "
                "WHERE c.kind = 'store' AND c.chunk_id IN (SELECT id FROM temp.diadb_chunks)"
            )
            out: dict[str, pa.Table] = {}
            for table in MEMBER_TABLES:
                match = member_match(member_key(self.schema.table(table)), _quote)
                cur.execute(
                    f'SELECT k.chunk_id AS _chunk_id, t.* FROM temp.diadb_chunk_keys k JOIN "{table}" t '
                    "ON t.visit = k.visit AND (k.detector = -1 OR t.detector = k.detector) WHERE NOT k.keyed "
                    f"AND NOT EXISTS (SELECT 1 FROM diadb_chunk_member m WHERE m.table_name = ? AND {match}) "
                    "UNION ALL "
                    "SELECT k.chunk_id AS _chunk_id, t.* FROM temp.diadb_chunk_keys k "
                    "JOIN diadb_chunk_member m ON m.chunk_id = k.chunk_id AND m.table_name = ? "
                    f'JOIN "{table}" t ON {match} WHERE k.keyed',
                    [table, table],
                )
                out[table] = cur.fetch_arrow_table()
            cur.execute(
                'SELECT o.chunk_id AS _chunk_id, t.* FROM diadb_chunk_object o JOIN "DiaObject" t '
                'ON t."diaObjectId" = o.diaObjectId AND t."validityStartMjdTai" = o.validityStartMjdTai '
                "WHERE o.chunk_id IN (SELECT id FROM temp.diadb_chunks)"
            )
            out["DiaObject"] = cur.fetch_arrow_table()
            cur.execute(
                "SELECT chunk_id, seq, kind, payload FROM diadb_update "
                "WHERE chunk_id IN (SELECT id FROM temp.diadb_chunks) ORDER BY chunk_id, seq"
            )
            out["updates"] = cur.fetch_arrow_table()
            cur.execute(
                "SELECT chunk_id AS _chunk_id, table_name, k0, k1, k2 FROM diadb_chunk_member "
                "WHERE chunk_id IN (SELECT id FROM temp.diadb_chunks)"
            )
            out["members"] = cur.fetch_arrow_table()
            return out
        except self._errors as e:
            raise StorageError(f"SQLite change-log read failed on {self.path}: {e}") from e
        finally:
            cur.close()

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, Any]], when_mjd: float) -> int:
        """Record foreign update records as one daytime chunk."""
        try:
            with self._transaction() as cur:
                chunk = self._log_chunk(cur, "update", None, None, when_mjd)
                self._log_updates(cur, chunk, kind, [dict(p) for p in payloads])
        except self._errors as e:
            raise StorageError(f"SQLite change-log write failed on {self.path}: {e}") from e
        return chunk

    # ---- the overlay ---------------------------------------------------------------
    def select_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        """Overlay rows (current values of the mutable source columns) in the ranges and window."""
        where: list[str] = []
        params: list[float] = []
        if len(ranges):
            lo, hi = int(ranges[0, 0]), int(ranges[-1, 1])
            where.append("_healpix_29 >= ? AND _healpix_29 < ?")
            params += [lo, hi]
        if window is not None:
            if np.isfinite(window.start):
                where.append("midpointMjdTai > ?")
                params.append(float(window.start))
            if np.isfinite(window.end):
                where.append("midpointMjdTai <= ?")
                params.append(float(window.end))
        sql = "SELECT diaSourceId, " + ", ".join(MUTABLE_SOURCE_COLUMNS) + " FROM diadb_source_overlay"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._fetch(sql, params)

    def drop_overlay_before(self, cutoff_mjd: float) -> None:
        with self._transaction() as cur:
            cur.execute("DELETE FROM diadb_source_overlay WHERE midpointMjdTai < ?", [cutoff_mjd])
            cur.execute("DELETE FROM diadb_forced_overlay WHERE midpointMjdTai < ?", [cutoff_mjd])

    # ---- daytime updates -----------------------------------------------------------
    def update_sources(
        self,
        changes: pa.Table,
        *,
        kind: str,
        when_mjd: float,
        segment_lookup: SegmentSourceLookup,
        object_deltas: bool,
        remove_empty: bool,
        increment: bool = True,
        decrement: bool = True,
        only_null: str | None = None,
    ) -> int:
        """Set mutable columns of DiaSources, in one transaction; return the chunk id (0 when no
        row changed: no chunk then).

        ``changes`` has ``diaSourceId`` and any of the mutable columns (the new values).
        With ``object_deltas`` the nDiaSources of the new (``increment``) and old (``decrement``)
        DiaObjects follow the move; with ``remove_empty`` a DiaObject left with no sources is
        closed and leaves the latest table. Rows whose ``only_null`` column is already set keep
        their values. Raises UnknownIdError naming unknown DiaSource or DiaObject ids; nothing
        changes then.
        """
        ids = np.asarray(changes.column("diaSourceId").to_numpy(), dtype=np.int64)
        with self._transaction() as cur:
            self._temp_table(cur, "diadb_change", changes)
            cols = ", ".join(f"s.{c}" for c in CURRENT_COLUMNS)
            cur.execute(
                f'SELECT {cols} FROM temp.diadb_change c JOIN "DiaSource" s ON s.diaSourceId = c.diaSourceId'
            )
            in_engine: pa.Table = cur.fetch_arrow_table()
            engine_ids = np.asarray(in_engine.column(0).to_numpy(), dtype=np.int64)
            rest = np.setdiff1d(ids, engine_ids)
            in_segments = segment_lookup(rest) if len(rest) else empty_current()
            if len(rest):
                # The overlay holds the current values of sources already in segments.
                overlay = self._fetch(
                    "SELECT diaSourceId, " + ", ".join(MUTABLE_SOURCE_COLUMNS) + " FROM diadb_source_overlay "
                    "WHERE diaSourceId IN (SELECT diaSourceId FROM temp.diadb_change)"
                )
                in_segments = apply_source_overlay(in_segments, overlay)
            plan = plan_source_update(
                pa.concat_tables([normalise_current(in_engine), normalise_current(in_segments)]),
                changes,
                object_deltas=object_deltas,
                increment=increment,
                decrement=decrement,
                only_null=only_null,
            )
            if plan is None:
                return 0
            if len(plan.targets):
                self._temp_table(cur, "diadb_targets", pa.table({"id": plan.targets}))
                cur.execute(
                    f"SELECT diaObjectId FROM {LATEST_TABLE} "
                    "WHERE diaObjectId IN (SELECT id FROM temp.diadb_targets)"
                )
                require_known("DiaObject", plan.targets, cur.fetch_arrow_table().column(0).to_numpy())
            counts = self._apply_object_deltas(cur, plan.delta, when_mjd, remove_empty)
            new = plan.new
            is_engine = np.isin(np.asarray(new.column("diaSourceId").to_numpy(), dtype=np.int64), engine_ids)
            self._write_engine_sources(cur, new.filter(pa.array(is_engine)))
            self._write_overlay(cur, new.filter(pa.array(~is_engine)))
            chunk = self._log_chunk(cur, "update", None, None, when_mjd)
            self._log_updates(cur, chunk, kind, [plan.payload(when_mjd, counts)])
        return chunk

    def _write_engine_sources(self, cur: Any, new: pa.Table) -> None:
        if not new.num_rows:
            return
        self._temp_table(cur, "diadb_new_values", new.select(["diaSourceId", *MUTABLE_SOURCE_COLUMNS]))
        sets = ", ".join(f"{c} = n.{c}" for c in MUTABLE_SOURCE_COLUMNS)
        cur.execute(
            f'UPDATE "DiaSource" SET {sets} FROM temp.diadb_new_values n '
            'WHERE "DiaSource".diaSourceId = n.diaSourceId'
        )

    def _write_overlay(self, cur: Any, new: pa.Table) -> None:
        if not new.num_rows:
            return
        cols = ["diaSourceId", "_healpix_29", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS]
        self._temp_table(cur, "diadb_new_overlay", new.select(cols))
        updates = ", ".join(f"{c} = excluded.{c}" for c in MUTABLE_SOURCE_COLUMNS)
        cur.execute(
            f"INSERT INTO diadb_source_overlay ({', '.join(cols)}) SELECT {', '.join(cols)} "
            f"FROM temp.diadb_new_overlay WHERE true ON CONFLICT (diaSourceId) DO UPDATE SET {updates}"
        )

    def _apply_object_deltas(
        self, cur: Any, delta: pa.Table, when_mjd: float, remove_empty: bool
    ) -> list[dict[str, Any]]:
        """Add ``delta`` (id, delta) to nDiaSources; return the objects' new counts and positions."""
        if not delta.num_rows:
            return []
        self._temp_table(cur, "diadb_delta", delta)
        for table, extra in ((LATEST_TABLE, ""), ("DiaObject", ' AND "validityEndMjdTai" IS NULL')):
            cur.execute(
                f'UPDATE "{table}" SET "nDiaSources" = "nDiaSources" + d.delta FROM temp.diadb_delta d '
                f'WHERE "{table}"."diaObjectId" = d.id{extra}'
            )
        cur.execute(
            f'SELECT o."diaObjectId", o.ra, o.dec, o."nDiaSources" FROM {LATEST_TABLE} o '
            'WHERE o."diaObjectId" IN (SELECT id FROM temp.diadb_delta) ORDER BY o."diaObjectId"'
        )
        counts = object_counts(cur.fetch_arrow_table())
        if remove_empty:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS diadb_empty AS "
                f"SELECT diaObjectId AS id FROM {LATEST_TABLE} WHERE 0"
            )
            cur.execute("DELETE FROM temp.diadb_empty")
            cur.execute(
                f"INSERT INTO temp.diadb_empty SELECT diaObjectId FROM {LATEST_TABLE} "
                'WHERE "nDiaSources" <= 0 '
                "AND diaObjectId IN (SELECT id FROM temp.diadb_delta)"
            )
            cur.execute(
                'UPDATE "DiaObject" SET "validityEndMjdTai" = ? WHERE "validityEndMjdTai" IS NULL '
                'AND "diaObjectId" IN (SELECT id FROM temp.diadb_empty)',
                [when_mjd],
            )
            cur.execute(f"DELETE FROM {LATEST_TABLE} WHERE diaObjectId IN (SELECT id FROM temp.diadb_empty)")
        return counts

    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        """Close the open version of these objects (they leave the latest table); return how many.
        Unknown ids raise UnknownIdError, or are skipped with ``missing_ok``."""
        ids = np.unique(np.asarray(object_ids, dtype=np.int64))
        with self._transaction() as cur:
            self._temp_table(cur, "diadb_close", pa.table({"id": ids}))
            cur.execute(
                'SELECT DISTINCT "diaObjectId" FROM "DiaObject" '
                'WHERE "diaObjectId" IN (SELECT id FROM temp.diadb_close)'
            )
            known = np.asarray(cur.fetch_arrow_table().column(0).to_numpy(), dtype=np.int64)
            if not missing_ok:
                require_known("DiaObject", ids, known)
            cur.execute(
                'SELECT "diaObjectId", ra, dec FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL '
                'AND "diaObjectId" IN (SELECT id FROM temp.diadb_close) ORDER BY "diaObjectId"'
            )
            closed = cur.fetch_arrow_table()
            if not closed.num_rows:
                return 0
            cur.execute(
                'UPDATE "DiaObject" SET "validityEndMjdTai" = ? WHERE "validityEndMjdTai" IS NULL '
                'AND "diaObjectId" IN (SELECT id FROM temp.diadb_close)',
                [when_mjd],
            )
            cur.execute(f"DELETE FROM {LATEST_TABLE} WHERE diaObjectId IN (SELECT id FROM temp.diadb_close)")
            chunk = self._log_chunk(cur, "update", None, None, when_mjd)
            self._log_updates(cur, chunk, "set_validity_end", [closing_payload(closed, when_mjd)])
        return int(closed.num_rows)

    def objects_since(self, since_mjd: float) -> pa.Table:
        """Latest versions of objects whose version started at or after ``since_mjd``."""
        return self._fetch(f'SELECT * FROM {LATEST_TABLE} WHERE "validityStartMjdTai" >= ?', [since_mjd])

    def count_unassociated(self) -> int:
        t = self._fetch(f'SELECT count(*) FROM {LATEST_TABLE} WHERE "nDiaSources" = 1')
        return int(t.column(0)[0].as_py())
