"""PostgreSQL's part of the history tier (``diadb.history.manifest.HistoryEngine``): the manifest
of segments and its trash, compaction, the DiaObject snapshot's change tracking, and the overlays
that reads apply on top of rows already in segments (written by ``daytime.py``).

Segments are blobs in this database (``segments.py``). Compaction is one transaction that holds
the schema's compaction lock (an advisory transaction lock: two compactors never race, and a
dead compactor's lock goes with its session); it reads the closed span's rows, writes their
segments' blobs and manifest entries and deletes the rows, so a reader's snapshot (a REPEATABLE
READ transaction, :meth:`Connection.snapshot`) sees each row exactly once, before or after.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import Int64Array, TimeWindow
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.common.packing import RowPacker
from diadb.backends.postgres.connection import Connection, ids, params, q
from diadb.backends.postgres.layout import TIME_COLUMN
from diadb.backends.postgres.read import Reader
from diadb.backends.postgres.segments import PostgresBlobs, blob_ddl
from diadb.backends.postgres.tracking import (
    CHANGED_TABLE,
    forget_sql,
    numbered_sql,
    tracking_ddl,
    upgrade_ddl,
)
from diadb.config import ApdbConfig
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
from diadb.history.store import BlobSegmentStore, SegmentStore
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema
from diadb.sky.healpix import in_ranges
from diadb.updates import MUTABLE_SOURCE_COLUMNS

_SEGMENT_COLUMNS = (
    "table_name", "name", "t_min", "t_max", "span_start", "span_end",
    "pix_min", "pix_max", "rows", "bytes", "checksum",
)  # fmt: skip
#: Sky tiles of order 4 (~3.7 deg, 13.4 deg^2): a 1.75 deg-radius field touches 1-4 of them,
#: so one detector's read fetches a few blobs and a whole field's at most ~4 per span. Measured
#: at 5% density (the README's PostgreSQL tier benchmark): 7-day blobs of ~125 kB, so ~2.5 MB at
#: full density, the size Cassandra and TOAST handle well; but a field then fetches ~5x its
#: area. Orders 3 and 5 are not measured yet: choose again at full density.
PREFERRED_TILE_ORDER = 4


def history_ddl(conn: Connection) -> list[str]:
    """The tier's tables: manifest, trash, blobs, overlays (change tracking starts at the first
    snapshot, see :meth:`PostgresHistory._refresh_object_snapshot`)."""
    t = conn.t
    return [
        f"CREATE TABLE IF NOT EXISTS {t('diadb_segment')} (segment_id BIGINT GENERATED ALWAYS AS "
        "IDENTITY PRIMARY KEY, table_name TEXT NOT NULL, name TEXT NOT NULL UNIQUE, "
        "t_min DOUBLE PRECISION NOT NULL, t_max DOUBLE PRECISION NOT NULL, span_start DOUBLE PRECISION "
        "NOT NULL, span_end DOUBLE PRECISION NOT NULL, pix_min BIGINT NOT NULL, pix_max BIGINT NOT NULL, "
        "rows BIGINT NOT NULL, bytes BIGINT NOT NULL, checksum TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {t('diadb_segment_trash')} (name TEXT PRIMARY KEY, "
        "dropped_at DOUBLE PRECISION NOT NULL)",
        *blob_ddl(conn),
        f'CREATE TABLE IF NOT EXISTS {t("diadb_source_overlay")} ("diaSourceId" BIGINT PRIMARY KEY, '
        '"_healpix_29" BIGINT NOT NULL, "midpointMjdTai" DOUBLE PRECISION NOT NULL, "diaObjectId" BIGINT, '
        '"ssObjectId" BIGINT, "ssObjectReassocTimeMjdTai" DOUBLE PRECISION, '
        '"timeWithdrawnMjdTai" DOUBLE PRECISION)',
        f'CREATE INDEX IF NOT EXISTS diadb_source_overlay_pix ON {t("diadb_source_overlay")} ("_healpix_29")',
        f'CREATE TABLE IF NOT EXISTS {t("diadb_forced_overlay")} ("diaObjectId" BIGINT NOT NULL, '
        'visit BIGINT NOT NULL, detector BIGINT NOT NULL, "_healpix_29" BIGINT NOT NULL, '
        '"midpointMjdTai" DOUBLE PRECISION NOT NULL, "timeWithdrawnMjdTai" DOUBLE PRECISION, '
        'PRIMARY KEY ("diaObjectId", visit, detector))',
        f'CREATE INDEX IF NOT EXISTS diadb_forced_overlay_pix ON {t("diadb_forced_overlay")} ("_healpix_29")',
    ]


class PostgresHistory:
    """The manifest and the moves of rows between the engine and the segments."""

    def __init__(self, conn: Connection, reader: Reader, packer: RowPacker, schema: Any) -> None:
        self.conn = conn
        self.reader = reader
        self.packer = packer
        self._schema = schema  # () -> ApdbSchema
        self._cache_bytes = 0
        self._notes_numbered = False  # known to carry numbers (.tracking)

    def configure(self, config: ApdbConfig) -> None:
        self._cache_bytes = int(config.history_cache_mb * 1e6)

    def create_tables(self) -> None:
        def work(cur: Any) -> None:
            for stmt in history_ddl(self.conn):
                cur.execute(stmt)

        self.conn.run("create of the history tables", work)

    def segment_store(self) -> SegmentStore:
        return BlobSegmentStore(PostgresBlobs(self.conn), self._cache_bytes)

    def preferred_tile_order(self) -> int | None:
        return PREFERRED_TILE_ORDER

    @contextmanager
    def read_snapshot(self) -> Iterator[None]:
        with self.conn.snapshot():
            yield

    def list_segments(self, table: str | None = None) -> list[SegmentInfo]:
        sql = f"SELECT {', '.join(_SEGMENT_COLUMNS)}, segment_id FROM {self.conn.t('diadb_segment')}"
        rows = (
            self.conn.fetch(sql + " WHERE table_name = $1 ORDER BY segment_id", [table])
            if table
            else self.conn.fetch(sql + " ORDER BY segment_id")
        )
        return [SegmentInfo.from_row(r) for r in rows.to_pylist()]

    def _record(self, cur: Any, infos: Sequence[SegmentInfo]) -> None:
        if not infos:
            return
        columns = {
            c: [getattr(i, "table" if c == "table_name" else c) for i in infos] for c in _SEGMENT_COLUMNS
        }
        types = {
            "t_min": pa.float64(),
            "t_max": pa.float64(),
            "span_start": pa.float64(),
            "span_end": pa.float64(),
        }
        rows = pa.table({c: pa.array(v, types.get(c)) for c, v in columns.items()})
        cur.adbc_ingest("diadb_segment", rows, mode="append", db_schema_name=self.conn.namespace)

    def _trash(self, cur: Any, infos: Sequence[SegmentInfo]) -> None:
        if not infos:
            return
        cur.execute(
            f"INSERT INTO {self.conn.t('diadb_segment_trash')} (name, dropped_at) "
            "SELECT name, $2 FROM unnest($1::text[]) AS n(name) ON CONFLICT DO NOTHING",
            parameters=params((pa.array([i.name for i in infos]), pa.string()), time.time()),
        )
        cur.execute(
            f"DELETE FROM {self.conn.t('diadb_segment')} WHERE segment_id = ANY($1::bigint[])",
            parameters=params(ids([i.segment_id for i in infos])),
        )

    def _all_columns(self, table: str) -> list[str]:
        schema: ApdbSchema = self._schema()
        return [*(c.name for c in schema.table(table).columns), HEALPIX_COLUMN]

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
        """Move every row older than ``boundary`` into segments, in one transaction holding the
        compaction lock; with ``objects``, also replace the DiaObject snapshot's changed tiles.
        Rows are fetched and written one sky piece after another (``diadb.history.pieces``).
        Without ``wait``, nothing is done when another compaction holds the lock."""
        hook = fault or (lambda step: None)

        def work(cur: Any) -> list[SegmentInfo]:
            created: list[SegmentInfo] = []
            with self.conn.pin(cur):
                lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
                cur.execute(f"SELECT {lock}($1::integer, 1)", parameters=params(self.conn.lock_space))
                got = cur.fetchall()
                if not wait and not bool(got[0][0]):
                    return []  # another process is compacting
                trash = self.conn.fetch(f"SELECT name, dropped_at FROM {self.conn.t('diadb_segment_trash')}")
                pairs = list(zip(trash.column(0).to_pylist(), trash.column(1).to_pylist(), strict=True))
                live = self.list_segments()
                done = sweep(live, pairs)
                if done:
                    cur.execute(
                        f"DELETE FROM {self.conn.t('diadb_segment_trash')} WHERE name = ANY($1::text[])",
                        parameters=params((pa.array(done, pa.string()), pa.string())),
                    )
                for table in tables:
                    for piece in self._source_runs(table, boundary, pieces):
                        rows = self._take_rows(table, piece, boundary)
                        hook("read")
                        if rows.num_rows == 0:
                            continue
                        infos = write(table, rows)
                        del rows
                        self._record(cur, infos)
                        created += infos
                if merge is not None:
                    made, gone = merge([s for s in live if s.table in tables], boundary)
                    self._record(cur, made)
                    self._trash(cur, gone)
                    created += made
                if objects is not None:
                    snapshot_pieces = pieces if object_pieces is None else object_pieces
                    created += self._refresh_object_snapshot(cur, objects, hook, snapshot_pieces)
                hook("commit")
            return created

        if objects is not None:
            self._number_notes()
        created = self.conn.run("compaction", work)
        hook("committed")
        return created

    def _take_rows(self, table: str, piece: Piece, boundary: float) -> pa.Table:
        """Delete a piece's rows older than ``boundary`` and return them, in one statement of
        the compaction's transaction (``DELETE ... RETURNING``). Reading, then deleting every row
        older than the boundary, would also delete what a store committed in between (a late
        visit's rows) or a daytime change made meanwhile; a row is moved exactly as it is taken."""
        physical = self.packer.physical(table, self._all_columns(table))
        returning = ", ".join(f"t.{q(c)}" for c in physical)
        pix, tcol = q(HEALPIX_COLUMN), q(TIME_COLUMN[table])
        sql = (
            f"DELETE FROM {self.conn.t(table)} AS t WHERE t.{pix} >= current_setting('diadb.p1')::bigint "
            f"AND t.{pix} < current_setting('diadb.p2')::bigint "
            f"AND t.{tcol} < current_setting('diadb.p3')::float8 RETURNING {returning}"
        )
        settings = {
            "diadb.p1": str(int(piece[0])),
            "diadb.p2": str(int(piece[1])),
            "diadb.p3": repr(float(boundary)),
        }
        taken = self.conn.read(f"compaction of {table}", sql, settings)
        return self.packer.expand(table, taken, self._all_columns(table))

    def _number_notes(self) -> None:
        """Tracking made before the notes' numbers gets them, in its own short transaction."""
        if self._notes_numbered:
            return
        tracked = self.conn.fetch(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
            [self.conn.namespace, CHANGED_TABLE],
        )
        numbered = self.conn.fetch(numbered_sql(self.conn), [self.conn.namespace])
        if tracked.column(0)[0].as_py() and not numbered.column(0)[0].as_py():

            def work(cur: Any) -> None:
                for stmt in upgrade_ddl(self.conn):
                    cur.execute(stmt)

            self.conn.run("numbering of the object change notes", work)
        self._notes_numbered = True

    def _piece_counts(self, table: str, shift: int, where: str, settings: dict[str, str]) -> dict[int, int]:
        """Rows per sky piece of a physical table (one aggregate over its rows)."""
        found = self.conn.read(
            f"piece counts of {table}",
            f"SELECT ({q(HEALPIX_COLUMN)} >> {int(shift)})::bigint AS p, count(*)::bigint "
            f"FROM {self.conn.t(table)} {where} GROUP BY 1",
            settings,
        )
        return dict(zip(found.column(0).to_pylist(), found.column(1).to_pylist(), strict=True))

    def _source_runs(self, table: str, boundary: float, pieces: Sequence[Piece]) -> list[Piece]:
        """The ranges a compaction of ``table`` fetches: runs of the pieces holding rows."""
        shift = piece_shift(pieces)
        if shift is None:
            return list(pieces)
        where = f"WHERE {q(TIME_COLUMN[table])} < current_setting('diadb.p1')::float8"
        return fetch_runs(
            pieces, self._piece_counts(table, shift, where, {"diadb.p1": repr(float(boundary))})
        )

    def _refresh_object_snapshot(
        self, cur: Any, write: ObjectSnapshotWriter, hook: FaultHook, pieces: Sequence[Piece]
    ) -> list[SegmentInfo]:
        """The DiaObject snapshot's changed tiles (all of them on a first snapshot), written a
        sky piece at a time; recorded, the replaced tiles trashed, the changes forgotten."""
        old = self.list_segments("DiaObject")
        tracking = bool(
            self.conn.fetch(
                "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
                [self.conn.namespace, CHANGED_TABLE],
            )
            .column(0)[0]
            .as_py()
        )
        columns = self._all_columns("DiaObject")
        changed: Int64Array | None
        shift = piece_shift(pieces)
        if old and tracking and fits_pieces(old, pieces):
            changed, numbers = self._changed_notes()
            if not len(changed):
                return []
            # Where each changed row lives now (two columns), then its rows a piece at a time.
            where = self._changed_rows([HEALPIX_COLUMN, "diaObjectId"], None)
            now_ids = np.asarray(where.column("diaObjectId").to_numpy(), np.int64)
            at_pixels = np.asarray(where.column(HEALPIX_COLUMN).to_numpy(), np.int64)
            counts = {} if shift is None else pixel_counts(at_pixels, shift)
        else:
            for stmt in tracking_ddl(self.conn):
                cur.execute(stmt)
            changed = None
            counts = {} if shift is None else self._piece_counts(LATEST_TABLE, shift, "", {})
        runs = snapshot_runs(pieces, counts, old)
        hook("objects")
        created: list[SegmentInfo] = []
        replaced: list[SegmentInfo] = []
        for piece in runs:
            mine = segments_in_piece(old, piece)
            if changed is None:
                rows = self.reader.select("DiaObject", np.array([piece], np.int64), columns)
                if rows.num_rows == 0 and not mine:
                    continue
            else:
                piece_ids = now_ids[(at_pixels >= piece[0]) & (at_pixels < piece[1])]
                no_ranges = np.zeros((0, 2), np.int64)
                rows = self.reader.select("DiaObject", no_ranges, columns, object_ids=piece_ids)
            made, gone = write(mine, changed, rows)
            del rows
            created += made
            replaced += gone
        self._record(cur, created)
        self._trash(cur, replaced)
        if changed is None:
            # Tracking was (re)made in this transaction, whose trigger DDL locks the table:
            # no store changed a row since this snapshot read it.
            cur.execute(f"DELETE FROM {self.conn.t(CHANGED_TABLE)}")
        else:
            cur.execute(forget_sql(self.conn), parameters=params(ids(changed), ids(numbers)))
        return created

    def _changed_ids(self) -> Int64Array:
        t = self.conn.fetch(f'SELECT "diaObjectId" FROM {self.conn.t(CHANGED_TABLE)}')
        return np.asarray(t.column(0).to_numpy(), np.int64)

    def _changed_notes(self) -> tuple[Int64Array, Int64Array]:
        """The changed ids and their notes' numbers (see ``.tracking``)."""
        t = self.conn.fetch(f'SELECT "diaObjectId", seq FROM {self.conn.t(CHANGED_TABLE)}')
        return np.asarray(t.column(0).to_numpy(), np.int64), np.asarray(t.column(1).to_numpy(), np.int64)

    def _changed_rows(self, columns: Sequence[str], ranges: Int64Array | None) -> pa.Table:
        """The latest rows of the changed ids (in the cover's bounds when ``ranges`` is given)."""
        physical = self.packer.physical("DiaObject", columns)
        cols = ", ".join(f"t.{q(c)}" for c in physical)
        sql = (
            f"SELECT {cols} FROM {self.conn.t(CHANGED_TABLE)} c JOIN {self.conn.t(LATEST_TABLE)} t "
            'ON t."diaObjectId" = c."diaObjectId"'
        )
        settings = {}
        if ranges is not None and len(ranges):
            sql += (
                f" WHERE t.{q(HEALPIX_COLUMN)} >= current_setting('diadb.p1')::bigint "
                f"AND t.{q(HEALPIX_COLUMN)} < current_setting('diadb.p2')::bigint"
            )
            settings = {"diadb.p1": str(int(ranges[0, 0])), "diadb.p2": str(int(ranges[-1, 1]))}
        rows = self.packer.expand(
            "DiaObject", self.conn.read("read of changed objects", sql, settings), columns
        )
        if ranges is not None and len(ranges) and rows.num_rows:
            rows = rows.filter(pa.array(in_ranges(rows.column(HEALPIX_COLUMN).to_numpy(), ranges)))
        return rows

    def select_changed_objects(
        self, ranges: Int64Array, columns: Sequence[str]
    ) -> tuple[Int64Array, pa.Table]:
        return self._changed_ids(), self._changed_rows(columns, ranges)

    def drop_segments(self, segment_ids: Sequence[int]) -> None:
        if not segment_ids:
            return
        wanted = [int(i) for i in segment_ids]

        def work(cur: Any) -> None:
            cur.execute(
                f"INSERT INTO {self.conn.t('diadb_segment_trash')} (name, dropped_at) SELECT name, $2 "
                f"FROM {self.conn.t('diadb_segment')} WHERE segment_id = ANY($1::bigint[]) "
                "ON CONFLICT DO NOTHING",
                parameters=params(ids(wanted), time.time()),
            )
            cur.execute(
                f"DELETE FROM {self.conn.t('diadb_segment')} WHERE segment_id = ANY($1::bigint[])",
                parameters=params(ids(wanted)),
            )

        self.conn.run("drop of history segments", work)

    # ---- the overlays --------------------------------------------------------------
    def _overlay(self, table: str, columns: str, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        where: list[str] = []
        settings: dict[str, str] = {}
        if len(ranges):
            where.append("\"_healpix_29\" >= current_setting('diadb.p1')::bigint")
            where.append("\"_healpix_29\" < current_setting('diadb.p2')::bigint")
            settings.update({"diadb.p1": str(int(ranges[0, 0])), "diadb.p2": str(int(ranges[-1, 1]))})
        if window is not None:
            if np.isfinite(window.start):
                where.append("\"midpointMjdTai\" > current_setting('diadb.p3')::float8")
                settings["diadb.p3"] = repr(float(window.start))
            if np.isfinite(window.end):
                where.append("\"midpointMjdTai\" <= current_setting('diadb.p4')::float8")
                settings["diadb.p4"] = repr(float(window.end))
        sql = f"SELECT {columns} FROM {self.conn.t(table)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self.conn.read(f"read of {table}", sql, settings)

    def select_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        columns = ", ".join(q(c) for c in ("diaSourceId", *MUTABLE_SOURCE_COLUMNS))
        return self._overlay("diadb_source_overlay", columns, ranges, window)

    def select_forced_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        columns = '"diaObjectId", visit, detector, "timeWithdrawnMjdTai" AS _w'
        return self._overlay("diadb_forced_overlay", columns, ranges, window)

    def drop_overlay_before(self, cutoff_mjd: float) -> None:
        def work(cur: Any) -> None:
            for table in ("diadb_source_overlay", "diadb_forced_overlay"):
                cur.execute(
                    f'DELETE FROM {self.conn.t(table)} WHERE "midpointMjdTai" < $1::float8',
                    parameters=params(float(cutoff_mjd)),
                )

        self.conn.run("retention of the overlays", work)

    def contains_store_key(self, key: str) -> bool:
        t = self.conn.fetch(f"SELECT 1 FROM {self.conn.t('diadb_store_key')} WHERE key = $1", [key])
        return bool(t.num_rows > 0)
