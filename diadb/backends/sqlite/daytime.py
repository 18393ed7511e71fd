"""SQLite: the daytime updates of stored rows, each one transaction and one change-log chunk.

Sources already moved into history segments cannot be updated in place: their mutable columns
go to an overlay table that reads apply on top. A forced source is named by ``(diaObjectId,
visit, detector)``; rows still in the engine are updated in place, rows already in segments get
an entry in ``diadb_forced_overlay`` (their withdrawal time), as DiaSources' overlay does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.sqlite.changelog import SqliteChangeLog
from diadb.backends.sqlite.connection import SqliteConnection
from diadb.errors import StorageError
from diadb.updates import (
    CURRENT_COLUMNS,
    FORCED_CURRENT,
    FORCED_KEY,
    MUTABLE_SOURCE_COLUMNS,
    apply_forced_overlay,
    apply_source_overlay,
    closing_payload,
    empty_current,
    forced_payload,
    missing_keys,
    normalise_current,
    normalise_forced,
    object_counts,
    plan_source_update,
    require_known,
    require_known_forced,
)

#: Finds sources in the history segments: ids -> their current row (id, pixel, time, mutable columns).
SegmentSourceLookup = Callable[[Int64Array], pa.Table]


class SqliteDaytime:
    """The daytime calls; each logs its chunk through the change log part."""

    def __init__(self, conn: SqliteConnection, changelog: SqliteChangeLog) -> None:
        self._conn = conn
        self._changelog = changelog

    # ---- DiaSources ----------------------------------------------------------------
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
        with self._conn.transaction() as cur:
            self._conn.temp_table(cur, "diadb_change", changes)
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
                overlay = self._conn.fetch(
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
                self._conn.temp_table(cur, "diadb_targets", pa.table({"id": plan.targets}))
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
            chunk = self._changelog.log_chunk(cur, "update", None, None, when_mjd)
            self._changelog.write_updates(cur, chunk, kind, [plan.payload(when_mjd, counts)])
        return chunk

    def _write_engine_sources(self, cur: Any, new: pa.Table) -> None:
        if not new.num_rows:
            return
        self._conn.temp_table(cur, "diadb_new_values", new.select(["diaSourceId", *MUTABLE_SOURCE_COLUMNS]))
        sets = ", ".join(f"{c} = n.{c}" for c in MUTABLE_SOURCE_COLUMNS)
        cur.execute(
            f'UPDATE "DiaSource" SET {sets} FROM temp.diadb_new_values n '
            'WHERE "DiaSource".diaSourceId = n.diaSourceId'
        )

    def _write_overlay(self, cur: Any, new: pa.Table) -> None:
        if not new.num_rows:
            return
        cols = ["diaSourceId", "_healpix_29", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS]
        self._conn.temp_table(cur, "diadb_new_overlay", new.select(cols))
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
        self._conn.temp_table(cur, "diadb_delta", delta)
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

    # ---- DiaForcedSources ----------------------------------------------------------
    def withdraw_forced_sources(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None = None,
    ) -> int:
        """Set ``timeWithdrawnMjdTai`` of these forced sources where it is not set yet, in one
        transaction; return the chunk (0 when none changed). UnknownIdError for unknown keys."""
        keys = pa.table([keys.column(c).cast(pa.int64()) for c in FORCED_KEY], names=list(FORCED_KEY))
        match = " AND ".join(f"f.{c} = k.{c}" for c in FORCED_KEY)
        in_table = " AND ".join(f'"DiaForcedSource".{c} = k.{c}' for c in FORCED_KEY)
        try:
            with self._conn.transaction() as cur:
                self._conn.temp_table(cur, "diadb_fkeys", keys)
                cols = ", ".join(f"f.{c}" for c in FORCED_CURRENT)
                cur.execute(f'SELECT {cols} FROM temp.diadb_fkeys k JOIN "DiaForcedSource" f ON {match}')
                in_engine = normalise_forced(cur.fetch_arrow_table())
                rest = missing_keys(keys, in_engine)
                in_segments = (
                    normalise_forced(segment_lookup(rest)) if rest.num_rows else in_engine.slice(0, 0)
                )
                if in_segments.num_rows:
                    in_segments = self._with_forced_overlay(cur, in_segments)
                require_known_forced(missing_keys(rest, in_segments))
                engine = in_engine.filter(pc.is_null(in_engine.column("timeWithdrawnMjdTai")))
                segment = in_segments.filter(pc.is_null(in_segments.column("timeWithdrawnMjdTai")))
                if not engine.num_rows and not segment.num_rows:
                    return 0
                if engine.num_rows:
                    self._conn.temp_table(cur, "diadb_fwithdraw", engine.select(list(FORCED_KEY)))
                    cur.execute(
                        'UPDATE "DiaForcedSource" SET "timeWithdrawnMjdTai" = ? WHERE EXISTS '
                        f"(SELECT 1 FROM temp.diadb_fwithdraw k WHERE {in_table})",
                        [when_mjd],
                    )
                if segment.num_rows:
                    cols_o = [*FORCED_KEY, "_healpix_29", "midpointMjdTai"]
                    self._conn.temp_table(cur, "diadb_foverlay", segment.select(cols_o))
                    cur.execute(
                        f"INSERT INTO diadb_forced_overlay ({', '.join(cols_o)}, timeWithdrawnMjdTai) "
                        f"SELECT {', '.join(cols_o)}, ? FROM temp.diadb_foverlay WHERE true "
                        "ON CONFLICT (diaObjectId, visit, detector) DO UPDATE SET "
                        "timeWithdrawnMjdTai = excluded.timeWithdrawnMjdTai",
                        [when_mjd],
                    )
                logged = when_mjd if logged_mjd is None else logged_mjd
                chunk = self._changelog.log_chunk(cur, "update", None, None, logged)
                rows = pa.concat_tables([engine, segment])
                payload = forced_payload(rows, when_mjd, logged)
                self._changelog.write_updates(cur, chunk, "withdraw_forced_sources", [payload])
        except self._conn.errors as e:
            raise StorageError(f"SQLite forced-source withdrawal failed on {self._conn.path}: {e}") from e
        return chunk

    def _with_forced_overlay(self, cur: Any, rows: pa.Table) -> pa.Table:
        """``rows`` (segment rows) with the withdrawal times the overlay holds."""
        self._conn.temp_table(cur, "diadb_fprobe", rows.select(list(FORCED_KEY)))
        cur.execute(
            "SELECT o.diaObjectId, o.visit, o.detector, o.timeWithdrawnMjdTai AS _w "
            "FROM diadb_forced_overlay o JOIN temp.diadb_fprobe k ON o.diaObjectId = k.diaObjectId "
            "AND o.visit = k.visit AND o.detector = k.detector"
        )
        return apply_forced_overlay(rows, cur.fetch_arrow_table())

    # ---- DiaObjects ----------------------------------------------------------------
    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        """Close the open version of these objects (they leave the latest table); return how many.
        Unknown ids raise UnknownIdError, or are skipped with ``missing_ok``."""
        ids = np.unique(np.asarray(object_ids, dtype=np.int64))
        with self._conn.transaction() as cur:
            self._conn.temp_table(cur, "diadb_close", pa.table({"id": ids}))
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
            chunk = self._changelog.log_chunk(cur, "update", None, None, when_mjd)
            self._changelog.write_updates(cur, chunk, "set_validity_end", [closing_payload(closed, when_mjd)])
        return int(closed.num_rows)

    def objects_since(self, since_mjd: float) -> pa.Table:
        """Latest versions of objects whose version started at or after ``since_mjd``."""
        return self._conn.fetch(f'SELECT * FROM {LATEST_TABLE} WHERE "validityStartMjdTai" >= ?', [since_mjd])

    def count_unassociated(self) -> int:
        return int(self._conn.scalar(f'SELECT count(*) FROM {LATEST_TABLE} WHERE "nDiaSources" = 1'))
