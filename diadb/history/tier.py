"""The history tier: reads across memory-mapped segments, and compaction of engine rows into them.

The engine (SQLite by default) keeps recent rows and all mutable state, including the
manifest of live segments. Compaction moves every source row older than a span boundary
into new segments inside one engine write transaction, so a reader's snapshot (manifest +
engine rows read together) sees each row exactly once, before or after.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from diadb.errors import ConfigError, StorageError
from diadb.history.columns import column_values, matching, select_columns, take_rows
from diadb.history.manifest import FaultHook
from diadb.history.pieces import snapshot_tile_order
from diadb.history.segment import (
    Int64Array,
    MappedSegment,
    SegmentInfo,
    map_segments,
    snapshot_span,
    verify_segment,
    write_segment,
)
from diadb.history.store import FileSegmentStore, SegmentStore
from diadb.schema.model import HEALPIX_COLUMN
from diadb.times import TimeWindow

HISTORY_TABLES = ("DiaSource", "DiaForcedSource")
TIME_COLUMN = "midpointMjdTai"
#: The latest versions of all DiaObjects, as of the last compaction: a segment per tile (a cache of
#: the engine's latest-object table, which stays complete). The engine tracks the ids changed
#: since; a read takes the snapshot's other rows, so ~95% of a field's objects come from here.
OBJECT_TABLE = "DiaObject"
#: A dropped segment's file is deleted only this long after it left the manifest, so a reader
#: that listed it just before can still open it.
TRASH_GRACE_S = 600.0


def compaction_boundary(
    latest_mjd: float, span_days: float, lag_days: float, offset_days: float = 0.0
) -> float:
    """Rows older than this (a span edge at least ``lag_days`` before ``latest_mjd``) move. Span
    edges are ``offset_days`` past multiples of ``span_days`` (MJD)."""
    return math.floor((latest_mjd - lag_days - offset_days) / span_days) * span_days + offset_days


class HistoryTier:
    """The segments of one database, opened on first use and kept per process.

    ``store`` holds their bytes (:mod:`diadb.history.store`): mapped files are kept open without
    bound (their pages are the OS's), fetched blobs up to the store's ``cache_bytes``.
    ``tile_order``: segments are cut by HEALPix tile of this order as well as by time span, so a
    read fetches only the tiles its region touches (None: by time span only)."""

    def __init__(
        self, store: SegmentStore, span_days: float, tile_order: int | None = None, span_offset: float = 0.0
    ) -> None:
        self.store = store
        self.span_days = span_days
        #: Span edges lie this many days past multiples of ``span_days`` (``history_span_offset_days``).
        self.span_offset = span_offset
        self.tile_order = tile_order
        #: The DiaObject snapshot is cut by tile even when sources are not (pieces.py says why).
        self.snapshot_tile_order = snapshot_tile_order(tile_order)
        self._open: collections.OrderedDict[str, tuple[MappedSegment, int]] = collections.OrderedDict()
        self._open_bytes = 0
        self._bounds: dict[tuple[str, tuple[str, ...]], list[tuple[int, int]]] = {}

    @property
    def directory(self) -> Path:
        """The directory of a file store (tests and tools that look at the files)."""
        if not isinstance(self.store, FileSegmentStore):
            raise ConfigError(f"history segments of this database are not files: {self.store.location('')}")
        return self.store.directory

    def _segment(self, info: SegmentInfo) -> MappedSegment:
        """The opened segment; its rows are read only after its ``check`` (segment.py)."""
        return self._segments([info])[0]

    def _segments(self, infos: Sequence[SegmentInfo]) -> list[MappedSegment]:
        """The opened segments, those not open yet fetched in one round."""
        missing = [info for info in infos if info.name not in self._open]
        opened = dict(zip((i.name for i in missing), map_segments(self.store, missing), strict=True))
        result = [opened.get(info.name) or self._open[info.name][0] for info in infos]
        for info in infos:
            if info.name in opened:
                self._keep(info, opened[info.name])
            elif info.name in self._open:
                self._open.move_to_end(info.name)
        return result

    def _keep(self, info: SegmentInfo, segment: MappedSegment) -> None:
        """Remember an opened segment, within the store's bound (least recently used go)."""
        limit = self.store.cache_bytes
        if limit is not None and info.bytes > limit:
            return
        self._open[info.name] = (segment, info.bytes)
        self._open_bytes += info.bytes
        if limit is not None:
            while self._open_bytes > limit and self._open:
                _, (_, size) = self._open.popitem(last=False)
                self._open_bytes -= size

    def forget(self, table: str, live: Sequence[SegmentInfo]) -> None:
        """Drop the opened segments of ``table`` that left the manifest."""
        names = {s.name for s in live}
        for name in [n for n in self._open if n.startswith(table + "-") and n not in names]:
            self._open_bytes -= self._open.pop(name)[1]

    def release(self) -> None:
        """Unmap every segment (after a bulk scan, so its pages leave this process's RSS)."""
        self._open.clear()
        self._open_bytes = 0

    def candidates(
        self,
        segments: Sequence[SegmentInfo],
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None,
        object_ids: Int64Array | None,
        include_ids: Int64Array | None = None,
        exclude_ids: Int64Array | None = None,
    ) -> list[tuple[pa.Table, Int64Array]]:
        """Per segment: its ``columns`` and the row numbers in the pixel ``ranges`` (all rows when
        empty), in the window, of ``object_ids`` (or whose ``diaSourceId`` is in ``include_ids``)
        when given, and not of ``exclude_ids`` (object ids). Nothing is gathered yet: the reader
        filters the region exactly on these rows, then gathers (:func:`gather`). The blocks of
        ``columns`` at the rows returned are checked (segment.py), so the reader may use them."""
        pieces: list[tuple[pa.Table, Int64Array]] = []
        # Oldest first: the reader's pixel sort then nearly always finds time in order too.
        wanted = [i for i in segments if _overlaps(i, ranges, window)]
        wanted.sort(key=lambda i: (i.t_min, i.span_start))
        for segment in self._segments(wanted):
            data = segment.table
            idx = segment.locate(ranges) if len(ranges) else np.arange(data.num_rows, dtype=np.int64)
            # Integrity: the filters' columns checked at the rows they filter, then ``columns``.
            filters = [TIME_COLUMN] if window is not None else []
            filters += ["diaObjectId"] if object_ids is not None or exclude_ids is not None else []
            filters += ["diaSourceId"] if include_ids is not None else []
            segment.check(filters, idx)
            if idx.size and window is not None:
                t = column_values(data, TIME_COLUMN)[idx]
                idx = idx[(t > window.start) & (t <= window.end)]
            if idx.size and object_ids is not None:
                keep = matching(data, "diaObjectId", idx, object_ids)
                if include_ids is not None and len(include_ids):
                    keep |= matching(data, "diaSourceId", idx, include_ids)
                idx = idx[keep]
            if idx.size and exclude_ids is not None and len(exclude_ids):
                idx = idx[~matching(data, "diaObjectId", idx, exclude_ids)]
            if idx.size:
                segment.check(columns, idx)
                pieces.append((_selection(segment, columns), idx))
        return pieces

    def find_rows(
        self, segments: Sequence[SegmentInfo], column: str, ids: Int64Array, columns: Sequence[str]
    ) -> pa.Table:
        """Rows whose ``column`` is in ``ids``, searching ``segments`` in the order given and
        stopping once every id is found (daytime updates mostly touch recent rows)."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        parts: list[pa.Table] = []
        for info in segments:
            if not len(wanted):
                break
            segment = self._segment(info)
            data = segment.table
            values = segment.values(column)
            idx = np.flatnonzero(np.isin(values, wanted))
            if idx.size:
                segment.check(columns, idx)
                parts.append(select_columns(data, columns).take(pa.array(idx)))
                wanted = np.setdiff1d(wanted, values[idx])
        if not parts:
            return pa.table({c: pa.array([], pa.int64()) for c in columns}).select(list(columns))
        return pa.concat_tables(parts, promote_options="permissive")

    def stored_keys(self, segments: Sequence[SegmentInfo], keys: pa.Table) -> Int64Array:
        """Positions of the rows of ``keys`` (integer primary-key columns) that some segment holds.

        Each segment's smallest and largest value of each key column are computed once per
        process; only segments whose bounds overlap the keys' on every column are searched, so
        keys that grow with time (Rubin's ids, visits) cost a comparison per segment. Segments
        that overlap are searched on their first key column, then matched on all of them."""
        if not keys.num_rows or not segments:
            return np.zeros(0, dtype=np.int64)
        names = keys.column_names
        values = [np.asarray(keys.column(c).to_numpy(), dtype=np.int64) for c in names]
        lo = [v.min() for v in values]
        hi = [v.max() for v in values]
        found = np.zeros(keys.num_rows, dtype=bool)
        for info in segments:
            bounds = self._key_bounds(info, names)
            if any(b[1] < lo[i] or b[0] > hi[i] for i, b in enumerate(bounds)):
                continue
            segment = self._segment(info)
            data = segment.table
            first = segment.values(names[0])
            idx = np.flatnonzero(np.isin(first, values[0]))
            if not idx.size:
                continue
            segment.check(names, idx)
            stored = pa.table({c: pa.array(column_values(data, c)[idx]).cast(pa.int64()) for c in names})
            probe = pa.table({c: pa.array(v) for c, v in zip(names, values, strict=True)})
            probe = probe.append_column("_pos", pa.array(np.arange(keys.num_rows, dtype=np.int64)))
            hit = probe.join(stored, keys=names, join_type="left semi").column("_pos").to_numpy()
            found[hit] = True
        return np.flatnonzero(found)

    def _key_bounds(self, info: SegmentInfo, names: Sequence[str]) -> list[tuple[int, int]]:
        cache_key = (info.name, tuple(names))
        bounds = self._bounds.get(cache_key)
        if bounds is None:
            segment = self._segment(info)
            bounds = []
            for c in names:
                v = segment.values(c)
                bounds.append((int(v.min()), int(v.max())) if v.size else (0, -1))
            self._bounds[cache_key] = bounds
        return bounds

    def tiles_of(self, pixels: npt.NDArray[Any], order: int | None = None) -> Int64Array:
        """The sky tile of order ``order`` (default: the segments' tile order) of each order-29
        pixel; all 0 when that order is None (segments not cut by tile)."""
        if order is None:
            order = self.tile_order
        if order is None:
            return np.zeros(len(pixels), dtype=np.int64)
        return np.asarray(pixels, dtype=np.int64) >> (2 * (29 - order))

    def _tile_label(self, tile: int, order: int | None = None) -> str:
        order = self.tile_order if order is None else order
        return "" if order is None else f"t{order}.{tile}"

    def checked_tables(self, infos: Sequence[SegmentInfo]) -> list[pa.Table]:
        """The segments' tables, every block of each checked (a merge copies them whole)."""
        return [segment.checked_table() for segment in self._segments(infos)]

    def tile_label_of(self, pixel: int) -> str:
        """The tile label in the name of a segment holding ``pixel``."""
        return self._tile_label(int(self.tiles_of(np.array([pixel]))[0]))

    def write_rows(
        self, table: str, rows: pa.Table, span: tuple[float, float], label: str, fault: FaultHook | None
    ) -> SegmentInfo:
        """One segment of ``rows`` (sorted by pixel and time, else sorted here) for ``span``."""
        with _storage_errors(self.store):
            return write_segment(self.store, table, rows, TIME_COLUMN, span, fault=fault, tile=label)

    def write(self, table: str, rows: pa.Table, fault: FaultHook | None = None) -> list[SegmentInfo]:
        """Write ``rows`` as one segment per time span (and sky tile) they fall in."""
        t = column_values(rows, TIME_COLUMN)
        span_index = np.floor((t - self.span_offset) / self.span_days).astype(np.int64)
        tiles = self.tiles_of(column_values(rows, HEALPIX_COLUMN))
        cells = np.unique(np.stack([span_index, tiles], axis=1), axis=0)
        infos = []
        for k, tile in cells:
            # One cell (the usual compaction of one closed span): its rows as they are, no copy.
            part = rows if len(cells) == 1 else rows.filter(pa.array((span_index == k) & (tiles == tile)))
            span = (
                float(k) * self.span_days + self.span_offset,
                float(k + 1) * self.span_days + self.span_offset,
            )
            with _storage_errors(self.store):
                infos.append(
                    write_segment(
                        self.store,
                        table,
                        part,
                        TIME_COLUMN,
                        span,
                        fault=fault,
                        tile=self._tile_label(int(tile)),
                    )
                )
        return infos

    def write_objects(
        self,
        old: Sequence[SegmentInfo],
        changed: Int64Array | None,
        rows: pa.Table,
        fault: FaultHook | None = None,
    ) -> tuple[list[SegmentInfo], list[SegmentInfo]]:
        """The new DiaObject snapshot: ``old``'s rows but those of ``changed`` ids (None: none of
        them, a full rebuild), plus ``rows``, the engine's current rows of those ids. Returns the
        new segments and the old ones they replace (the others stay in the snapshot).

        The snapshot is one segment per sky tile (of ``snapshot_tile_order``); only the tiles
        that hold a changed id or a new row are rewritten, one after another, so compaction
        holds at most one tile's rows in memory. Within a tile the old segment's kept
        rows stay in its pages and are only listed by position; one sort of the two key columns,
        then one gather of each column into the new segment. Run once per compaction span."""
        order = self.snapshot_tile_order
        ids = np.asarray(column_values(rows, "diaObjectId"), dtype=np.int64)
        new_tiles = self.tiles_of(column_values(rows, HEALPIX_COLUMN), order) if rows.num_rows else ids[:0]
        by_tile: dict[int, SegmentInfo] = {}
        if changed is not None:
            for info in old:
                tile, last = self.tiles_of(np.array([info.pix_min, info.pix_max]), order)
                if tile != last:  # a snapshot from before tiles: the engine rebuilds it whole
                    raise StorageError(
                        f"DiaObject snapshot segment {self.store.location(info.name)} spans several "
                        f"order-{order} tiles: it can only be replaced by a full rebuild"
                    )
                by_tile[int(tile)] = info
        replaced: list[SegmentInfo] = []
        created: list[SegmentInfo] = []
        touched = set(np.unique(new_tiles).tolist())
        if changed is None:
            replaced = list(old)
        else:
            for tile, info in by_tile.items():
                if tile not in touched and self._holds_any(info, changed):
                    touched.add(tile)
        for tile in sorted(touched):
            previous = by_tile.get(tile)
            mine = rows.filter(pa.array(new_tiles == tile)) if len(touched) > 1 else rows
            written = self._write_object_tile(previous, changed, mine, tile, fault)
            if previous is not None:
                replaced.append(previous)
            if written is not None:
                created.append(written)
        return created, replaced

    def _holds_any(self, info: SegmentInfo, ids: Int64Array) -> bool:
        """Whether segment ``info`` (a snapshot tile) holds one of ``ids`` (its bounds first)."""
        if not len(ids):
            return False
        lo, hi = self._key_bounds(info, ["diaObjectId"])[0]
        if hi < int(ids.min()) or lo > int(ids.max()):
            return False
        return bool(np.isin(self._segment(info).values("diaObjectId"), ids).any())

    def _write_object_tile(
        self,
        old: SegmentInfo | None,
        changed: Int64Array | None,
        rows: pa.Table,
        tile: int,
        fault: FaultHook | None,
    ) -> SegmentInfo | None:
        """One tile of the snapshot: ``old``'s rows but ``changed``, plus ``rows``; None if empty."""
        merged = rows
        positions = np.arange(rows.num_rows, dtype=np.int64)
        if old is not None and changed is not None:
            data = self._segment(old).checked_table()  # never carry damage into a new snapshot
            previous = select_columns(data, rows.column_names)
            if previous.schema != rows.schema:
                previous = previous.cast(rows.schema)
            keep = np.flatnonzero(~np.isin(column_values(data, "diaObjectId"), changed))
            merged = pa.concat_tables([previous, rows])  # no copy: the chunks are referenced
            positions = np.concatenate([keep, positions + previous.num_rows])
        if not len(positions):
            return None
        take = pa.array(positions)
        keys = pa.table({c: merged.column(c).take(take) for c in (HEALPIX_COLUMN, "diaObjectId")})
        order = pc.sort_indices(keys, [(HEALPIX_COLUMN, "ascending"), ("diaObjectId", "ascending")])
        snapshot = take_rows(merged, pa.array(positions[np.asarray(order)]))
        del merged, keys
        span = snapshot_span(snapshot.column("validityStartMjdTai"))
        with _storage_errors(self.store):
            return write_segment(
                self.store,
                OBJECT_TABLE,
                snapshot,
                "validityStartMjdTai",
                span,
                fault=fault,
                order=("diaObjectId",),
                presorted=True,
                tile=self._tile_label(tile, self.snapshot_tile_order),
            )

    def sweep(self, live: Sequence[SegmentInfo], trash: Sequence[tuple[str, float]]) -> list[str]:
        """Delete segments that no manifest entry names: crash leftovers, and trash past its grace.

        Must run while no other compaction can be writing (inside the engine's write transaction,
        or holding its compaction lease). Returns the names of the trash entries deleted.
        """
        live_names = {s.name for s in live}
        now = time.time()
        keep_trash = {name for name, dropped in trash if now - dropped < TRASH_GRACE_S}
        self.store.delete([n for n in self.store.names() if n not in live_names and n not in keep_trash])
        return [name for name, dropped in trash if now - dropped >= TRASH_GRACE_S]

    def verify(self, segments: Sequence[SegmentInfo]) -> list[str]:
        """Check every segment fully; return one problem line per bad segment."""
        problems = []
        for info in segments:
            try:
                verify_segment(self.store, info)
            except Exception as e:  # every failure is reported, none stops the check
                text = str(e)
                where = self.store.location(info.name)
                problems.append(text if where in text else f"history segment {where}: {text}")
        return problems


def _overlaps(info: SegmentInfo, ranges: Int64Array, window: TimeWindow | None) -> bool:
    """Whether segment ``info`` may hold rows in the pixel ``ranges`` (all when empty) and the
    window: its pixel bounds against each range, so a tile beside the region is never fetched."""
    if window is not None and (info.t_max <= window.start or info.t_min > window.end):
        return False
    if not len(ranges):
        return True
    i = int(np.searchsorted(ranges[:, 1], info.pix_min, side="right"))
    return i < len(ranges) and int(ranges[i, 0]) <= info.pix_max


@contextlib.contextmanager
def _storage_errors(store: SegmentStore) -> Iterator[None]:
    """A full disk or an I/O error while writing a segment is a :class:`StorageError` (the
    compaction's transaction rolls back; the orphan is swept by the next one)."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"writing a history segment in {store.location('')} failed: {e}") from e


def _selection(segment: MappedSegment, columns: Sequence[str]) -> pa.Table:
    """``select_columns`` of a segment's table, kept on the segment for the next read of the
    same columns (selecting ~100 columns by name cost ~0.1 ms a segment: a third of a
    detector-sized read of 50 segments)."""
    key = tuple(columns)
    table = segment.selections.get(key)
    if table is None:
        table = select_columns(segment.table, columns)
        if len(segment.selections) < 8:
            segment.selections[key] = table
    return table
