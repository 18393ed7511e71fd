"""Cassandra's part of the history tier (``diadb.history.manifest.HistoryEngine``).

Cassandra has no multi-partition transactions, so a compaction cannot delete the rows it moved
in the same step that records their segments. Visibility is carried by a **boundary** instead:

- The manifest is one Cassandra partition (``diadb_segment``, bucket 0): the live segments, and
  as static columns the boundary ``B`` (every source row older than it is in segments) and when
  it was committed. A compaction writes its segments' blobs first, then the new entries and the
  new boundary in one logged batch of that single partition: applied wholly or not at all, and
  isolated, so a reader sees the old manifest or the new one.
- A read lists the manifest once (:meth:`read_snapshot`) and takes engine rows only at or after
  ``B`` (its window is clipped), so a row is read from segments or from the engine, never both.
- The engine's copies of moved rows are dropped later, a whole time-partition table at a time
  (``DROP TABLE``: no tombstones), once the table lies below a boundary committed more than
  :data:`~diadb.history.tier.TRASH_GRACE_S` ago: a reader that listed the manifest before the
  commit is long done by then.
- One compactor at a time: a lease (a lightweight transaction with a TTL, ``segments.Lease``).
  Daytime updates take the same lease, so none changes an engine row while a compaction copies it.
- A store older than ``B`` would be hidden by the clip, so it is refused (:meth:`check_store_time`),
  and a compaction holds ``B`` back to the oldest store in progress (:mod:`.store_guard`).

Not here yet: the DiaObject snapshot (objects are read from the engine's latest table, as with the
tier off), so ``compact_history`` ignores ``objects``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array, TimeWindow
from diadb.backends.cassandra.codec import q, to_arrow
from diadb.backends.cassandra.layout import PART, TIME_COLUMN, Layout
from diadb.backends.cassandra.read import Reader
from diadb.backends.cassandra.segments import FORCED_OVERLAY, SOURCE_OVERLAY, CassandraBlobs, Lease, blob_ddl
from diadb.backends.cassandra.session import CassandraSession
from diadb.backends.cassandra.store_guard import StoreGuard, guard_ddl
from diadb.config import ApdbConfig
from diadb.history.manifest import (
    FaultHook,
    ObjectSnapshotWriter,
    SegmentMerger,
    SegmentSweeper,
    SegmentWriter,
)
from diadb.history.pieces import WHOLE_SKY, Piece
from diadb.history.segment import SegmentInfo
from diadb.history.store import BlobSegmentStore, SegmentStore
from diadb.history.tier import TRASH_GRACE_S
from diadb.schema.model import HEALPIX_COLUMN
from diadb.updates import MUTABLE_SOURCE_COLUMNS

log = logging.getLogger(__name__)
MANIFEST = "diadb_segment"
TRASH = "diadb_segment_trash"
#: Order-4 sky tiles, as on PostgreSQL (see the measurement there): a detector's read fetches
#: one to a few blobs.
PREFERRED_TILE_ORDER = 4
#: Above this many coarse pixels an overlay read scans the overlay table instead.
MAX_OVERLAY_PARTITIONS = 256
_FIELDS = (
    "table_name", "t_min", "t_max", "span_start", "span_end",
    "pix_min", "pix_max", "rows", "bytes", "checksum",
)  # fmt: skip


def history_ddl(session: CassandraSession) -> list[str]:
    t = session.t
    return [
        f"CREATE TABLE IF NOT EXISTS {t(MANIFEST)} (bucket int, name text, table_name text, "
        "t_min double, t_max double, span_start double, span_end double, pix_min bigint, pix_max bigint, "
        "rows bigint, bytes bigint, checksum text, recorded_at double, "
        "boundary double STATIC, committed_at double STATIC, PRIMARY KEY (bucket, name))",
        f"CREATE TABLE IF NOT EXISTS {t(TRASH)} (bucket int, name text, dropped_at double, "
        "PRIMARY KEY (bucket, name))",
        *blob_ddl(session),
        *guard_ddl(session),
        f'CREATE TABLE IF NOT EXISTS {t(SOURCE_OVERLAY)} ({PART} int, "diaSourceId" bigint, '
        '"_healpix_29" bigint, "midpointMjdTai" double, "diaObjectId" bigint, "ssObjectId" bigint, '
        '"ssObjectReassocTimeMjdTai" double, "timeWithdrawnMjdTai" double, '
        f'PRIMARY KEY ({PART}, "diaSourceId"))',
        f'CREATE TABLE IF NOT EXISTS {t(FORCED_OVERLAY)} ({PART} int, "diaObjectId" bigint, visit bigint, '
        'detector bigint, "_healpix_29" bigint, "midpointMjdTai" double, "timeWithdrawnMjdTai" double, '
        f'PRIMARY KEY ({PART}, "diaObjectId", visit, detector))',
    ]


def segment_id(name: str) -> int:
    """A stable id for a segment name (Cassandra has no sequences): 63 bits of its hash."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 1


class _Manifest:
    """One read of the manifest partition."""

    def __init__(self, segments: list[SegmentInfo], boundary: float, committed_at: float) -> None:
        self.segments = segments
        self.boundary = boundary
        self.committed_at = committed_at


class CassandraHistory:
    """The manifest, the boundary, compaction and the overlays (see the module docstring)."""

    def __init__(self, session: CassandraSession, layout: Layout, reader: Reader) -> None:
        self.session = session
        self.layout = layout
        self.reader = reader
        self._cache_bytes = 0
        self._local = threading.local()
        self.enabled = False
        self.guard = StoreGuard(session)

    def configure(self, config: ApdbConfig) -> None:
        self._cache_bytes = int(config.history_cache_mb * 1e6)
        self.enabled = bool(config.history_tier)

    def create_tables(self) -> None:
        for stmt in history_ddl(self.session):
            self.session.ddl(stmt)

    def segment_store(self) -> SegmentStore:
        return BlobSegmentStore(CassandraBlobs(self.session), self._cache_bytes)

    def preferred_tile_order(self) -> int | None:
        return PREFERRED_TILE_ORDER

    def lease(self) -> Lease:
        return Lease(self.session, "compaction")

    # ---- the manifest ------------------------------------------------------------------
    def _read_manifest(self) -> _Manifest:
        cols = ", ".join(["name", *_FIELDS, "recorded_at", "boundary", "committed_at"])
        stmt = self.session.prepare(f"SELECT {cols} FROM {self.session.t(MANIFEST)} WHERE bucket = 0")
        (rows,) = self.session.run([(stmt, ())], write=False)
        boundary, committed = -math.inf, 0.0
        entries = []
        for r in rows:
            boundary = -math.inf if r[-2] is None else float(r[-2])
            committed = 0.0 if r[-1] is None else float(r[-1])
            if r[1] is None:  # only the static columns are set
                continue
            entries.append((r[-3] or 0.0, r[0], r))
        segments = []
        for _, name, r in sorted(entries, key=lambda e: (e[0], e[1])):
            segments.append(
                SegmentInfo(
                    table=r[1],
                    name=name,
                    t_min=r[2],
                    t_max=r[3],
                    span_start=r[4],
                    span_end=r[5],
                    pix_min=int(r[6]),
                    pix_max=int(r[7]),
                    rows=int(r[8]),
                    bytes=int(r[9]),
                    checksum=r[10],
                    segment_id=segment_id(name),
                )
            )
        return _Manifest(segments, boundary, committed)

    def _manifest(self) -> _Manifest:
        snap: _Manifest | None = getattr(self._local, "snapshot", None)
        return snap if snap is not None else self._read_manifest()

    @contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Inside, this thread sees one read of the manifest, and engine reads of sources are
        clipped at its boundary (see the module docstring)."""
        if getattr(self._local, "snapshot", None) is not None:
            yield
            return
        self._local.snapshot = self._read_manifest()
        try:
            yield
        finally:
            self._local.snapshot = None

    def boundary(self) -> float:
        """Every source row older than this lives in segments (-inf before the first compaction):
        the snapshot's, or one read of the manifest's static column (not its entries)."""
        if not self.enabled:
            return -math.inf
        snap: _Manifest | None = getattr(self._local, "snapshot", None)
        if snap is not None:
            return snap.boundary
        stmt = self.session.prepare(
            f"SELECT boundary FROM {self.session.t(MANIFEST)} WHERE bucket = 0 LIMIT 1"
        )
        (rows,) = self.session.run([(stmt, ())], write=False)
        return -math.inf if not rows or rows[0][0] is None else float(rows[0][0])

    def clip(self, window: TimeWindow | None) -> TimeWindow | None:
        """``window`` without the times below the boundary (those rows are read from segments)."""
        b = self.boundary()
        if not math.isfinite(b):
            return window
        start = float(np.nextafter(b, -np.inf))  # windows are (start, end]: t >= b stays in
        if window is None:
            return TimeWindow(start, math.inf)
        return TimeWindow(max(window.start, start), window.end)

    def check_store_time(self, visit_mjd: float) -> None:
        """CatalogError if a store (its pending record written) is older than the boundary or a
        running compaction's (see :mod:`.store_guard`)."""
        if self.enabled:
            self.guard.check_store(visit_mjd, self.boundary())

    def recheck_store_time(self, visit_mjd: float, began_s_ago: float) -> None:
        """StorageError if a compaction passed a store's visit while it ran (its record, taken
        for a dead store's, has just been rewritten: see :mod:`.store_guard`)."""
        if self.enabled:
            self.guard.recheck_store(visit_mjd, self.boundary(), began_s_ago)

    def list_segments(self, table: str | None = None) -> list[SegmentInfo]:
        segments = self._manifest().segments
        return [s for s in segments if table is None or s.table == table]

    # ---- compaction --------------------------------------------------------------------
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
        """Under the compaction lease: drop engine tables a boundary old enough covers, sweep
        orphan blobs, write the segments of rows in ``[B, boundary)`` (fetched and written one
        sky piece after another on other engines; here in one pass, see below) and commit them with the new
        boundary in one batch. ``objects`` and ``object_pieces`` are ignored (no DiaObject snapshot
        here yet)."""
        hook = fault or (lambda step: None)
        lease = self.lease()
        if not lease.acquire(wait_s=60.0 if wait else 0.0, required=wait):
            return []  # another process is compacting
        try:
            current = self._read_manifest()
            if current.committed_at and time.time() - current.committed_at >= TRASH_GRACE_S:
                self.layout.drop_time_partitions(current.boundary)
            trash = self._trash()
            done = sweep(current.segments, trash)
            self._forget_trash(done)
            if boundary <= current.boundary:
                return []
            # Announced before anything is read; then no store in progress is passed.
            self.guard.ensure()
            self.guard.announce(boundary, lease.ttl_s)
            hook("announced")
            boundary = self.guard.held_back(boundary)
            if boundary <= current.boundary:
                return []
            self.guard.announce(boundary, lease.ttl_s)  # stores above it need not wait
            start = current.boundary if math.isfinite(current.boundary) else -math.inf
            window = TimeWindow(
                float(np.nextafter(start, -np.inf)) if math.isfinite(start) else -math.inf,
                float(np.nextafter(boundary, -np.inf)),
            )
            created: list[SegmentInfo] = []
            for table in tables:
                columns = [*(c.name for c in self.layout.schema.table(table).columns), HEALPIX_COLUMN]
                # One pass, whatever ``pieces``: a piece spans thousands of this layout's
                # partitions, which the reader turns into token-range scans of the whole table,
                # so reading piece by piece would scan it once per piece.
                rows = self.reader.select(table, np.zeros((0, 2), np.int64), columns, window=window)  # type: ignore[arg-type]
                hook("read")
                if rows.num_rows:
                    created += write(table, rows)
                del rows
                lease.renew()  # a compaction longer than the TTL keeps its lease
                self.guard.announce(boundary, lease.ttl_s)  # and its intent
            gone: list[SegmentInfo] = []
            if merge is not None:
                made, gone = merge([s for s in current.segments if s.table in tables], boundary)
                created += made
            hook("commit")
            lease.renew()  # still ours: no other compactor can have started meanwhile
            self._commit(created, boundary, gone)
        finally:
            try:
                if self.guard.announced:
                    self.guard.withdraw()
            except Exception as e:  # it expires with the lease's TTL; the outcome stands
                log.warning("the compaction's announced boundary was not withdrawn: %s", e)
            finally:
                lease.release()
        hook("committed")
        return created

    def _commit(
        self, infos: Sequence[SegmentInfo], boundary: float, gone: Sequence[SegmentInfo] = ()
    ) -> None:
        """The new entries, the removal of the ``gone`` ones (merged into new ones) and the
        boundary: one logged batch of the manifest's one partition. The gone blobs enter the
        trash first: a crash after that leaves them live (the sweep never deletes a live blob,
        and forgets their trash entries once past the grace), and once the batch applies, a
        reader that listed them just before still finds them during the grace."""
        from cassandra.query import BatchStatement, BatchType  # type: ignore[import-untyped]

        if gone:
            trash = self.session.prepare(
                f"INSERT INTO {self.session.t(TRASH)} (bucket, name, dropped_at) VALUES (0, ?, ?)"
            )
            self.session.run([(trash, (g.name, time.time())) for g in gone], write=True)

        cols = ", ".join(["bucket", "name", *_FIELDS, "recorded_at"])
        entry = self.session.prepare(
            f"INSERT INTO {self.session.t(MANIFEST)} ({cols}) VALUES ({', '.join('?' * (len(_FIELDS) + 3))})"
        )
        static = self.session.prepare(
            f"UPDATE {self.session.t(MANIFEST)} SET boundary = ?, committed_at = ? WHERE bucket = 0"
        )
        now = time.time()
        batch = BatchStatement(batch_type=BatchType.LOGGED, consistency_level=self.session.write_cl)
        for info in infos:
            values = [getattr(info, "table" if f == "table_name" else f) for f in _FIELDS]
            batch.add(entry, (0, info.name, *values, now))
        if gone:
            drop = self.session.prepare(
                f"DELETE FROM {self.session.t(MANIFEST)} WHERE bucket = 0 AND name = ?"
            )
            for g in gone:
                batch.add(drop, (g.name,))
        batch.add(static, (float(boundary), now))
        self.session.execute(batch)

    def _trash(self) -> list[tuple[str, float]]:
        stmt = self.session.prepare(f"SELECT name, dropped_at FROM {self.session.t(TRASH)} WHERE bucket = 0")
        (rows,) = self.session.run([(stmt, ())], write=False)
        return [(r[0], float(r[1])) for r in rows]

    def _forget_trash(self, names: Sequence[str]) -> None:
        stmt = self.session.prepare(f"DELETE FROM {self.session.t(TRASH)} WHERE bucket = 0 AND name = ?")
        self.session.run([(stmt, (n,)) for n in names], write=True)

    def drop_segments(self, segment_ids: Sequence[int]) -> None:
        """Take segments out of the manifest (their blobs go after the grace), in one batch."""
        from cassandra.query import BatchStatement, BatchType

        wanted = {int(i) for i in segment_ids}
        names = [s.name for s in self._read_manifest().segments if s.segment_id in wanted]
        if not names:
            return
        trash = self.session.prepare(
            f"INSERT INTO {self.session.t(TRASH)} (bucket, name, dropped_at) VALUES (0, ?, ?)"
        )
        self.session.run([(trash, (n, time.time())) for n in names], write=True)
        gone = self.session.prepare(f"DELETE FROM {self.session.t(MANIFEST)} WHERE bucket = 0 AND name = ?")
        batch = BatchStatement(batch_type=BatchType.LOGGED, consistency_level=self.session.write_cl)
        for n in names:
            batch.add(gone, (n,))
        self.session.execute(batch)

    def select_changed_objects(
        self, ranges: Int64Array, columns: Sequence[str]
    ) -> tuple[Int64Array, pa.Table]:
        """Never asked: there is no DiaObject snapshot on this engine (see the module docstring)."""
        return np.zeros(0, np.int64), pa.table({})

    # ---- the overlays ------------------------------------------------------------------
    def _overlay(
        self, table: str, columns: Sequence[str], ranges: Int64Array, window: TimeWindow | None
    ) -> pa.Table:
        types = {
            "diaSourceId": "long", "diaObjectId": "long", "ssObjectId": "long", "visit": "long",
            "detector": "long", "_healpix_29": "long", "midpointMjdTai": "double",
            "ssObjectReassocTimeMjdTai": "double", "timeWithdrawnMjdTai": "double",
        }  # fmt: skip
        fetch = list(dict.fromkeys([*columns, HEALPIX_COLUMN, TIME_COLUMN]))
        select = ", ".join(q(c) for c in fetch)
        pixels = self._pixels(ranges)
        if pixels is not None:
            stmt = self.session.prepare(f"SELECT {select} FROM {self.session.t(table)} WHERE {PART} = ?")
            statements: list[tuple[Any, tuple[Any, ...]]] = [(stmt, (int(p),)) for p in pixels]
        else:  # a large region (or none): one scan of the overlay, filtered below
            statements = [(self.session.prepare(f"SELECT {select} FROM {self.session.t(table)}"), ())]
        rows = [r for rs in self.session.run(statements, write=False) for r in rs]
        data = to_arrow(types, fetch, rows)
        if data.num_rows:
            h = np.asarray(data.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
            keep = np.ones(len(h), dtype=bool)
            if len(ranges):
                pos = np.searchsorted(ranges[:, 0], h, side="right") - 1
                keep &= (pos >= 0) & (h < ranges[np.clip(pos, 0, None), 1])
            if window is not None:
                tm = np.asarray(data.column(TIME_COLUMN).to_numpy(), dtype=np.float64)
                keep &= (tm > window.start) & (tm <= window.end)
            data = data.filter(pa.array(keep))
        return data.select(list(columns))

    def _pixels(self, ranges: Int64Array) -> Int64Array | None:
        """The overlay partitions (coarse pixels) of ``ranges``, or None when they are more than
        a scan of the (small) overlay costs."""
        if not len(ranges):
            return None
        lo = self.layout.pixel(np.asarray(ranges[:, 0]))
        hi = self.layout.pixel(np.asarray(ranges[:, 1]) - 1)
        if int((hi - lo + 1).sum()) > MAX_OVERLAY_PARTITIONS:
            return None
        return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]))

    def select_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        return self._overlay(SOURCE_OVERLAY, ["diaSourceId", *MUTABLE_SOURCE_COLUMNS], ranges, window)

    def select_forced_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        data = self._overlay(
            FORCED_OVERLAY, ["diaObjectId", "visit", "detector", "timeWithdrawnMjdTai"], ranges, window
        )
        return data.rename_columns(["diaObjectId", "visit", "detector", "_w"])

    def drop_overlay_before(self, cutoff_mjd: float) -> None:
        """Retention of the overlays: entries of rows older than ``cutoff_mjd`` are deleted."""
        for table, key in (
            (SOURCE_OVERLAY, ["diaSourceId"]),
            (FORCED_OVERLAY, ["diaObjectId", "visit", "detector"]),
        ):
            cols = [PART, *key, TIME_COLUMN]
            (rows,) = self.session.run(
                [
                    (
                        self.session.prepare(
                            f"SELECT {', '.join(q(c) for c in cols)} FROM {self.session.t(table)}"
                        ),
                        (),
                    )
                ],
                write=False,
            )
            old = [r for r in rows if r[-1] is not None and r[-1] < cutoff_mjd]
            where = " AND ".join(f"{q(c)} = ?" for c in [PART, *key])
            stmt = self.session.prepare(f"DELETE FROM {self.session.t(table)} WHERE {where}")
            self.session.run([(stmt, tuple(r[:-1])) for r in old], write=True)

    def source_overlay_of(self, rows: pa.Table) -> pa.Table:
        """The overlay entries of these sources (``diaSourceId``, ``_healpix_29`` columns)."""
        columns = ["diaSourceId", *MUTABLE_SOURCE_COLUMNS]
        if not rows.num_rows:
            return pa.table({c: pa.array([], pa.float64() if "Mjd" in c else pa.int64()) for c in columns})
        found = self._overlay(SOURCE_OVERLAY, columns, _pixels_of(rows), None)
        wanted = pa.array(np.asarray(rows.column("diaSourceId").to_numpy(), dtype=np.int64))
        return found.filter(pc.is_in(found.column("diaSourceId"), value_set=wanted))

    def forced_overlay_of(self, rows: pa.Table) -> pa.Table:
        """The forced overlay entries (``diaObjectId, visit, detector, _w``) of these rows."""
        if not rows.num_rows:
            names = ["diaObjectId", "visit", "detector", "_w"]
            return pa.table({c: pa.array([], pa.float64() if c == "_w" else pa.int64()) for c in names})
        return self.select_forced_overlay(_pixels_of(rows), None)


def _pixels_of(rows: pa.Table) -> Int64Array:
    """One-pixel ranges of the rows' ``_healpix_29`` (to read their overlay partitions)."""
    h = np.unique(np.asarray(rows.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64))
    return np.stack([h, h + 1], axis=1)
