"""SQLite: withdrawing DiaForcedSources (a daytime call), in the engine and in history segments.

A forced source is named by ``(diaObjectId, visit, detector)``. Rows still in the engine are
updated in place; rows already in history segments get an entry in ``diadb_forced_overlay``
(their withdrawal time) that reads apply on top, as DiaSources' overlay does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array, TimeWindow
from diadb.errors import StorageError
from diadb.updates import (
    FORCED_CURRENT,
    FORCED_KEY,
    apply_forced_overlay,
    forced_payload,
    missing_keys,
    normalise_forced,
    require_known_forced,
)


class SqliteForced:
    """Mixed into ``SqliteBackend``; uses its connection helpers."""

    _errors: tuple[type[BaseException], ...]
    path: str
    _transaction: Callable[[], Any]
    _fetch: Callable[..., pa.Table]
    _temp_table: Callable[[Any, str, pa.Table], None]
    _log_chunk: Callable[..., int]
    _log_updates: Callable[..., None]

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
            with self._transaction() as cur:
                self._temp_table(cur, "diadb_fkeys", keys)
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
                    self._temp_table(cur, "diadb_fwithdraw", engine.select(list(FORCED_KEY)))
                    cur.execute(
                        'UPDATE "DiaForcedSource" SET "timeWithdrawnMjdTai" = ? WHERE EXISTS '
                        f"(SELECT 1 FROM temp.diadb_fwithdraw k WHERE {in_table})",
                        [when_mjd],
                    )
                if segment.num_rows:
                    cols_o = [*FORCED_KEY, "_healpix_29", "midpointMjdTai"]
                    self._temp_table(cur, "diadb_foverlay", segment.select(cols_o))
                    cur.execute(
                        f"INSERT INTO diadb_forced_overlay ({', '.join(cols_o)}, timeWithdrawnMjdTai) "
                        f"SELECT {', '.join(cols_o)}, ? FROM temp.diadb_foverlay WHERE true "
                        "ON CONFLICT (diaObjectId, visit, detector) DO UPDATE SET "
                        "timeWithdrawnMjdTai = excluded.timeWithdrawnMjdTai",
                        [when_mjd],
                    )
                logged = when_mjd if logged_mjd is None else logged_mjd
                chunk = self._log_chunk(cur, "update", None, None, logged)
                rows = pa.concat_tables([engine, segment])
                payload = forced_payload(rows, when_mjd, logged)
                self._log_updates(cur, chunk, "withdraw_forced_sources", [payload])
        except self._errors as e:
            raise StorageError(f"SQLite forced-source withdrawal failed on {self.path}: {e}") from e
        return chunk

    def _with_forced_overlay(self, cur: Any, rows: pa.Table) -> pa.Table:
        """``rows`` (segment rows) with the withdrawal times the overlay holds."""
        self._temp_table(cur, "diadb_fprobe", rows.select(list(FORCED_KEY)))
        cur.execute(
            "SELECT o.diaObjectId, o.visit, o.detector, o.timeWithdrawnMjdTai AS _w "
            "FROM diadb_forced_overlay o JOIN temp.diadb_fprobe k ON o.diaObjectId = k.diaObjectId "
            "AND o.visit = k.visit AND o.detector = k.detector"
        )
        return apply_forced_overlay(rows, cur.fetch_arrow_table())

    def select_forced_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        """Overlay rows (withdrawal times of forced sources in segments) in the ranges and window."""
        where: list[str] = []
        params: list[float] = []
        if len(ranges):
            where.append("_healpix_29 >= ? AND _healpix_29 < ?")
            params += [int(ranges[0, 0]), int(ranges[-1, 1])]
        if window is not None:
            if np.isfinite(window.start):
                where.append("midpointMjdTai > ?")
                params.append(float(window.start))
            if np.isfinite(window.end):
                where.append("midpointMjdTai <= ?")
                params.append(float(window.end))
        sql = "SELECT diaObjectId, visit, detector, timeWithdrawnMjdTai AS _w FROM diadb_forced_overlay"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._fetch(sql, params)
