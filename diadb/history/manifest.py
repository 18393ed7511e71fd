"""What an engine offers the history tier: the small protocol a fourth engine implements.

The tier keeps immutable segments (:mod:`diadb.history.segment`); the engine keeps everything
that changes, in its own transactions: the manifest of live segments, the overlays of daytime
changes to rows already in segments, the ids of DiaObjects changed since the snapshot, and the
one atomic step of compaction (record new segments and delete the rows they hold). Reads go
through :mod:`diadb.history.reader`, compaction through :mod:`diadb.history.compaction`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import pyarrow as pa

from diadb.history.pieces import WHOLE_SKY, Piece
from diadb.history.segment import Int64Array, SegmentInfo
from diadb.history.store import SegmentStore
from diadb.times import TimeWindow

#: Writes a table's rows as segments (one per time span) and returns their manifest entries.
SegmentWriter = Callable[[str, pa.Table], list[SegmentInfo]]
#: Deletes unreferenced files: (live segments, trash entries (name, dropped at)) -> trash names deleted.
SegmentSweeper = Callable[[list[SegmentInfo], list[tuple[str, float]]], list[str]]
#: Writes the new DiaObject snapshot: (the current snapshot's segments, one per sky tile, the
#: ids changed since it or None for a full rebuild, the engine's latest rows of those ids) ->
#: (the new segments, the old ones they replace).
ObjectSnapshotWriter = Callable[
    [list[SegmentInfo], Int64Array | None, pa.Table], tuple[list[SegmentInfo], list[SegmentInfo]]
]
#: Merges closed spans' segments (``diadb.history.merging``): (the committed live segments of the
#: source tables, the boundary every older row is below) -> (merged segments, those they replace).
SegmentMerger = Callable[[list[SegmentInfo], float], tuple[list[SegmentInfo], list[SegmentInfo]]]
#: Tests only: called with a step's name before each step of a compaction, to crash there.
FaultHook = Callable[[str], None]


@runtime_checkable
class HistoryEngine(Protocol):
    """An engine that keeps the manifest of history segments and their overlays."""

    def segment_store(self) -> SegmentStore:
        """Where this database's segments' bytes live (files beside it, or blobs inside it)."""

    def tier_by_default(self) -> bool:
        """Whether a new database on this engine gets the tier when ``history_tier`` is not set
        (on where the benchmark shows it wins; see the README)."""

    def preferred_tile_order(self) -> int | None:
        """The HEALPix order of the sky tiles segments are cut by on a new database (None: cut
        by time span only), for this engine's segment store."""

    def read_snapshot(self) -> AbstractContextManager[None]:
        """Reads made inside see one consistent state of rows, overlays and manifest."""

    def list_segments(self, table: str | None = None) -> list[SegmentInfo]:
        """The live segments (of ``table``), in the order they were recorded."""

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
        """Atomically move rows older than ``boundary`` into segments written by ``write``,
        and (with ``objects``) replace the DiaObject snapshot by one that is current. Without
        ``wait``, return at once (nothing done) if another compaction holds the engine's
        compaction lock: the automatic compaction of one of many clients. ``pieces``: the sky
        ranges to fetch and write one after another, so memory is one piece's rows
        (:mod:`diadb.history.pieces`); ``write`` and ``objects`` get whole tiles each time.
        ``object_pieces``: the same for the DiaObject snapshot (default ``pieces``); a snapshot
        whose segments do not each fit in one of them (written before it was cut by tile) is
        rebuilt whole (``fits_pieces``). ``merge``: given the source tables' segments live when
        the compaction began, merges closed spans; its segments are recorded and those they
        replace trashed in the same commit (the segments this compaction writes are merged by
        a later one: a server engine's new blobs are not visible to other sessions yet)."""

    def select_changed_objects(
        self, ranges: Int64Array, columns: Sequence[str]
    ) -> tuple[Int64Array, pa.Table]:
        """The ids of every latest DiaObject row written or deleted since the snapshot was made,
        and the current rows of those ids inside ``ranges``. Call inside :meth:`read_snapshot`."""

    def drop_segments(self, segment_ids: Sequence[int]) -> None:
        """Take segments out of the manifest (their files are deleted after a grace period)."""

    def select_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        """Current mutable columns of sources in segments that daytime updates changed."""

    def select_forced_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        """Withdrawal times of forced sources in segments (diaObjectId, visit, detector, ``_w``)."""

    def contains_visit_detector(self, visit: int, detector: int) -> bool:
        """Whether this visit/detector (-1: any part of the visit) is stored."""

    def contains_store_key(self, key: str) -> bool:
        """Whether a store was made with this idempotency key (``store(key=...)``)."""

    def drop_overlay_before(self, cutoff_mjd: float) -> None:
        """Forget overlay entries of rows older than ``cutoff_mjd`` (retention)."""
