"""Reads of the SQLite engine: sky-region selects, key probes, the visit registry, and the
counts and deletes of rows older than a cutoff."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import Int64Array, ReadTable, TimeWindow
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.sqlite.connection import SqliteConnection, q
from diadb.backends.sqlite.layout import TIME_COLUMN
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.healpix import coarsen_ranges

# Above this many ranges a query's cover is coarsened (merged across the smallest gaps);
# the exact region filter in the facade removes the extra rows.
MAX_RANGES = 2000


class SqliteReader:
    """Reads through the shared connection."""

    def __init__(self, conn: SqliteConnection) -> None:
        self._conn = conn

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
        cur = self._conn.cursor()
        try:
            if object_ids is not None:
                ids = np.unique(np.asarray(object_ids, dtype=np.int64))
                self._conn.temp_table(cur, "diadb_ids", pa.table({"id": ids}))
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
        except self._conn.errors as e:
            raise StorageError(f"SQLite read of {table} failed on {self._conn.path}: {e}") from e
        finally:
            cur.close()

    def existing_keys(self, table: str, keys: pa.Table) -> pa.Table:
        physical = LATEST_TABLE if table == "DiaObjectLatest" else table
        cols = keys.column_names
        cur = self._conn.cursor()
        try:
            self._conn.temp_table(cur, "diadb_probe", keys)
            match = " AND ".join(f"t.{q(c)} = p.{q(c)}" for c in cols)
            cur.execute(
                f"SELECT {', '.join('p.' + q(c) for c in cols)} FROM temp.diadb_probe p "
                f"WHERE EXISTS (SELECT 1 FROM {q(physical)} t WHERE {match})"
            )
            result: pa.Table = cur.fetch_arrow_table()
            return result
        except self._conn.errors as e:
            raise StorageError(f"SQLite key lookup in {table} failed: {e}") from e
        finally:
            cur.close()

    def known_object_ids(self, ids: Int64Array) -> Int64Array:
        found = self.existing_keys("DiaObjectLatest", pa.table({"diaObjectId": np.unique(ids)}))
        return np.asarray(found.column("diaObjectId").to_numpy(), dtype=np.int64)

    def count_before(self, table: str, cutoff_mjd: float) -> int:
        sql = f"SELECT count(*) FROM {q(table)} WHERE {q(TIME_COLUMN[table])} < ?"
        return int(self._conn.scalar(sql, [cutoff_mjd]))

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        with self._conn.transaction() as cur:
            n = self.count_before(table, cutoff_mjd)
            cur.execute(f"DELETE FROM {q(table)} WHERE {q(TIME_COLUMN[table])} < ?", [cutoff_mjd])
        return n

    def latest_visit_mjd(self) -> float | None:
        value = self._conn.scalar("SELECT MAX(visit_mjd_tai) FROM diadb_visit")
        return None if value is None else float(value)

    def contains_store_key(self, key: str) -> bool:
        t = self._conn.fetch("SELECT 1 FROM diadb_store_key WHERE key = ?", [key])
        return bool(t.num_rows > 0)

    def contains_visit_detector(self, visit: int, detector: int) -> bool:
        if detector == -1:
            t = self._conn.fetch("SELECT 1 FROM diadb_visit WHERE visit = ? LIMIT 1", [int(visit)])
        else:
            t = self._conn.fetch(
                "SELECT 1 FROM diadb_visit WHERE visit = ? AND detector IN (?, -1) LIMIT 1",
                [int(visit), int(detector)],
            )
        return bool(t.num_rows > 0)
