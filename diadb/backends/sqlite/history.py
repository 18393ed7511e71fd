"""SQLite's part of the history tier (``diadb.history.manifest.HistoryEngine``): the manifest
of segments and its trash, compaction, the DiaObject snapshot, and the overlays that reads
apply on top of the rows already in segments (written by the daytime part)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import Int64Array, TimeWindow
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.sqlite.connection import SqliteConnection, q
from diadb.backends.sqlite.layout import CHANGED_TABLE, OBJECT_CHANGES_DDL, TIME_COLUMN
from diadb.backends.sqlite.url import history_directory
from diadb.errors import StorageError
from diadb.history.manifest import (
    FaultHook,
    ObjectSnapshotWriter,
    SegmentMerger,
    SegmentSweeper,
    SegmentWriter,
)
from diadb.history.pieces import (
    WHOLE_SKY,
    Piece,
    fetch_runs,
    fits_pieces,
    piece_shift,
    pixel_counts,
    segments_in_piece,
    snapshot_runs,
)
from diadb.history.segment import SegmentInfo
from diadb.history.store import FileSegmentStore, SegmentStore
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.healpix import in_ranges
from diadb.updates import MUTABLE_SOURCE_COLUMNS

_SEGMENT_COLUMNS = (
    "table_name, name, t_min, t_max, span_start, span_end, pix_min, pix_max, rows, bytes, checksum"
)


def record_segment(cur: Any, info: SegmentInfo) -> None:
    """A manifest row for ``info``, in the transaction of ``cur``."""
    cur.execute(
        f"INSERT INTO diadb_segment ({_SEGMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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


def overlay_filter(ranges: Int64Array, window: TimeWindow | None) -> tuple[str, list[float]]:
    """The ``WHERE`` clause (or nothing) of an overlay read: the cover's bounds and the window."""
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
    return (" WHERE " + " AND ".join(where) if where else ""), params


class SqliteHistory:
    """The manifest and the moves of rows between the engine and the segments."""

    def __init__(self, conn: SqliteConnection) -> None:
        self._conn = conn

    def segment_store(self) -> SegmentStore:
        """Segment files in a directory beside the database, memory-mapped to read."""
        return FileSegmentStore(history_directory(self._conn.path))

    def preferred_tile_order(self) -> int | None:
        """None: mapped files gain little from tiles (a read touches only its rows' pages)."""
        return None

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Reads inside see one consistent state (one SQLite read transaction in WAL mode)."""
        with self._conn.read_transaction():
            yield

    def list_segments(self, table: str | None = None) -> list[SegmentInfo]:
        sql = f"SELECT {_SEGMENT_COLUMNS}, segment_id FROM diadb_segment"
        if table:
            t = self._conn.fetch(sql + " WHERE table_name = ? ORDER BY segment_id", [table])
        else:
            t = self._conn.fetch(sql + " ORDER BY segment_id")
        return [SegmentInfo.from_row(r) for r in t.to_pylist()]

    def compact_history(
        self,
        tables: Sequence[str],
        boundary: float,
        write: SegmentWriter,
        sweep: SegmentSweeper,
        fault: FaultHook | None = None,
        objects: ObjectSnapshotWriter | None = None,
        wait: bool = True,
        pieces: Sequence[Piece] = WHOLE_SKY,
        object_pieces: Sequence[Piece] | None = None,
        merge: SegmentMerger | None = None,
    ) -> list[SegmentInfo]:
        """Move every row older than ``boundary`` into segments, in one write transaction;
        with ``objects``, also replace the DiaObject snapshot (see ``layout.OBJECT_CHANGES_DDL``).
        Rows are fetched and written one sky piece after another (``diadb.history.pieces``).

        Files are written (and made durable) by ``write`` while the transaction holds the
        write lock; the manifest rows and the deletion of the moved rows commit together.
        A crash before the commit leaves the rows in the engine and an orphan file that the
        next compaction's ``sweep`` deletes. ``wait`` is not used: the processes sharing a file
        are on one host, and SQLite's write lock queues them briefly.
        """
        hook = fault or (lambda step: None)
        created: list[SegmentInfo] = []
        try:
            with self._conn.transaction() as cur:
                trash = self._conn.fetch("SELECT name, dropped_at FROM diadb_segment_trash")
                trash_list = list(zip(trash.column(0).to_pylist(), trash.column(1).to_pylist(), strict=True))
                live = self.list_segments()
                for name in sweep(live, trash_list):
                    cur.execute("DELETE FROM diadb_segment_trash WHERE name = ?", [name])
                for table in tables:
                    tcol = q(TIME_COLUMN[table])
                    moved = 0
                    for lo, hi in self._source_runs(cur, table, boundary, pieces):
                        # A range of the clustered key (_healpix_29 first): one scan in all.
                        cur.execute(
                            f"SELECT * FROM {q(table)} WHERE {q(HEALPIX_COLUMN)} >= ? "
                            f"AND {q(HEALPIX_COLUMN)} < ? AND {tcol} < ?",
                            [lo, hi, boundary],
                        )
                        rows: pa.Table = cur.fetch_arrow_table()
                        hook("read")
                        if rows.num_rows == 0:
                            continue
                        infos = write(table, rows)
                        del rows
                        for info in infos:
                            record_segment(cur, info)
                        created += infos
                        moved += 1
                    if moved:
                        cur.execute(f"DELETE FROM {q(table)} WHERE {tcol} < ?", [boundary])
                if merge is not None:
                    made, gone = merge([s for s in live if s.table in tables], boundary)
                    for info in made:
                        record_segment(cur, info)
                    self._trash_segments(cur, gone)
                    created += made
                if objects is not None:
                    snapshot_pieces = pieces if object_pieces is None else object_pieces
                    created += self._refresh_object_snapshot(cur, objects, hook, snapshot_pieces)
                hook("commit")
            hook("committed")
        except self._conn.errors as e:
            raise StorageError(f"SQLite compaction failed on {self._conn.path}: {e}") from e
        return created

    @staticmethod
    def _source_runs(cur: Any, table: str, boundary: float, pieces: Sequence[Piece]) -> list[Piece]:
        """The ranges a compaction of ``table`` fetches: runs of the pieces holding rows."""
        shift = piece_shift(pieces)
        if shift is None:
            return list(pieces)
        # One pass over the clustered key counts each piece's rows (an integer shift, no cast).
        cur.execute(
            f"SELECT {q(HEALPIX_COLUMN)} >> {int(shift)} AS p, count(*) FROM {q(table)} "
            f"WHERE {q(TIME_COLUMN[table])} < ? GROUP BY p",
            [boundary],
        )
        found = cur.fetch_arrow_table()
        counts = dict(zip(found.column(0).to_pylist(), found.column(1).to_pylist(), strict=True))
        return fetch_runs(pieces, counts)

    def _refresh_object_snapshot(
        self, cur: Any, write: ObjectSnapshotWriter, hook: FaultHook, pieces: Sequence[Piece]
    ) -> list[SegmentInfo]:
        """Inside compaction's transaction: write a current DiaObject snapshot, a sky piece at a
        time, record it, send the tiles it replaces to the trash and forget the changes it now
        includes."""
        old = self.list_segments("DiaObject")
        tracking = bool(
            self._conn.scalar("SELECT count(*) FROM sqlite_master WHERE name = ?", [CHANGED_TABLE])
        )
        changed: Int64Array | None
        shift = piece_shift(pieces)
        if old and tracking and fits_pieces(old, pieces):
            cur.execute(f"SELECT diaObjectId FROM {CHANGED_TABLE}")
            changed = np.asarray(cur.fetch_arrow_table().column(0).to_numpy(), np.int64)
            if not len(changed):
                return []
            # Where each changed row lives now (two columns), then its rows a piece at a time.
            cur.execute(
                f"SELECT t.{q(HEALPIX_COLUMN)}, t.diaObjectId FROM {CHANGED_TABLE} c "
                f"CROSS JOIN {q(LATEST_TABLE)} t ON t.diaObjectId = c.diaObjectId"
            )
            where = cur.fetch_arrow_table()
            ids = np.asarray(where.column(1).to_numpy(), np.int64)
            pixels = np.asarray(where.column(0).to_numpy(), np.int64)
            counts = {} if shift is None else pixel_counts(pixels, shift)
        else:
            # First snapshot (or one lost): every latest row, and start tracking changes.
            for stmt in OBJECT_CHANGES_DDL:
                cur.execute(stmt)
            changed = None
            counts = {}
            if shift is not None:
                cur.execute(
                    f"SELECT {q(HEALPIX_COLUMN)} >> {int(shift)} AS p, count(*) "
                    f"FROM {q(LATEST_TABLE)} GROUP BY p"
                )
                found = cur.fetch_arrow_table()
                counts = dict(zip(found.column(0).to_pylist(), found.column(1).to_pylist(), strict=True))
        runs = snapshot_runs(pieces, counts, old)
        hook("objects")
        created: list[SegmentInfo] = []
        replaced: list[SegmentInfo] = []
        for piece in runs:
            mine = segments_in_piece(old, piece)
            if changed is None:
                cur.execute(
                    f"SELECT * FROM {q(LATEST_TABLE)} WHERE {q(HEALPIX_COLUMN)} >= ? "
                    f"AND {q(HEALPIX_COLUMN)} < ?",
                    list(piece),
                )
            else:
                # The ids as one JSON parameter: looked up by the id index, whatever their number.
                inside = (pixels >= piece[0]) & (pixels < piece[1])
                ids_json = json.dumps(ids[inside].tolist())
                cur.execute(
                    f"SELECT * FROM {q(LATEST_TABLE)} WHERE diaObjectId IN (SELECT value FROM json_each(?))",
                    [ids_json],
                )
            rows: pa.Table = cur.fetch_arrow_table()
            if changed is None and rows.num_rows == 0 and not mine:
                continue
            made, gone = write(mine, changed, rows)
            del rows
            created += made
            replaced += gone
        for info in created:
            record_segment(cur, info)
        self._trash_segments(cur, replaced)
        cur.execute(f"DELETE FROM {CHANGED_TABLE}")
        return created

    @staticmethod
    def _trash_segments(cur: Any, infos: Sequence[SegmentInfo]) -> None:
        """Inside a compaction: take segments out of the manifest, their files to the trash."""
        now = time.time()
        for info in infos:
            cur.execute(
                "INSERT OR IGNORE INTO diadb_segment_trash (name, dropped_at) VALUES (?, ?)", [info.name, now]
            )
            cur.execute("DELETE FROM diadb_segment WHERE segment_id = ?", [info.segment_id])

    def select_changed_objects(
        self, ranges: Int64Array, columns: Sequence[str]
    ) -> tuple[Int64Array, pa.Table]:
        changed = np.asarray(
            self._conn.fetch(f"SELECT diaObjectId FROM {CHANGED_TABLE}").column(0).to_numpy(), np.int64
        )
        cols = ", ".join(f"t.{q(c)}" for c in columns)
        sql = (
            f"SELECT {cols} FROM {CHANGED_TABLE} c CROSS JOIN {q(LATEST_TABLE)} t "
            "ON t.diaObjectId = c.diaObjectId"
        )
        params: list[Any] = []
        if len(ranges):
            # The cover's bounds in SQL; the exact ranges below (a few changed rows at most).
            sql += f" WHERE t.{q(HEALPIX_COLUMN)} >= ? AND t.{q(HEALPIX_COLUMN)} < ?"
            params = [int(ranges[0, 0]), int(ranges[-1, 1])]
        rows = self._conn.fetch(sql, params)
        if len(ranges) and rows.num_rows:
            rows = rows.filter(pa.array(in_ranges(rows.column(HEALPIX_COLUMN).to_numpy(), ranges)))
        return changed, rows

    def drop_segments(self, segment_ids: Sequence[int]) -> None:
        """Remove segments from the manifest; their files go to the trash (deleted after a grace)."""
        if not segment_ids:
            return
        ids = [int(i) for i in segment_ids]
        marks = ", ".join("?" * len(ids))
        with self._conn.transaction() as cur:
            cur.execute(
                f"INSERT OR IGNORE INTO diadb_segment_trash SELECT name, ? FROM diadb_segment "
                f"WHERE segment_id IN ({marks})",
                [time.time(), *ids],
            )
            cur.execute(f"DELETE FROM diadb_segment WHERE segment_id IN ({marks})", ids)

    # ---- the overlays --------------------------------------------------------------
    def select_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        """Overlay rows (current values of the mutable source columns) in the ranges and window."""
        where, params = overlay_filter(ranges, window)
        sql = "SELECT diaSourceId, " + ", ".join(MUTABLE_SOURCE_COLUMNS) + " FROM diadb_source_overlay"
        return self._conn.fetch(sql + where, params)

    def select_forced_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        """Overlay rows (withdrawal times of forced sources in segments) in the ranges and window."""
        where, params = overlay_filter(ranges, window)
        sql = "SELECT diaObjectId, visit, detector, timeWithdrawnMjdTai AS _w FROM diadb_forced_overlay"
        return self._conn.fetch(sql + where, params)

    def drop_overlay_before(self, cutoff_mjd: float) -> None:
        with self._conn.transaction() as cur:
            cur.execute("DELETE FROM diadb_source_overlay WHERE midpointMjdTai < ?", [cutoff_mjd])
            cur.execute("DELETE FROM diadb_forced_overlay WHERE midpointMjdTai < ?", [cutoff_mjd])
