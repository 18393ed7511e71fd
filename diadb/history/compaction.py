"""Compaction: moving closed spans of engine rows into immutable history segments.

The procedure, owned here, is the same on every engine that implements
:class:`~diadb.history.manifest.HistoryEngine`:

1. **Boundary**: a span edge at least ``history_compact_lag_days`` before the newest visit;
   every source row older than it moves.
2. **Inside one engine write transaction** (``compact_history``), the engine reads those rows,
   this module writes them as segments (sorted by pixel and time, durable: temporary file,
   fsync, rename, fsync of the directory), the engine records the manifest entries and deletes
   the rows, and the DiaObject snapshot segment is replaced by a current one. A reader's snapshot
   sees each row exactly once, before or after.
3. **Faults**: a crash at any step before the commit leaves the rows in the engine and at most an
   orphan file, which the next compaction's sweep (run inside its transaction) deletes; files of
   dropped segments go to a trash and are deleted after :data:`~diadb.history.tier.TRASH_GRACE_S`.
4. **Merges**: in the same step, the segments of long-closed spans are merged into fewer, larger
   ones (:mod:`diadb.history.merging`).

Automatic compaction runs after a committed store; its failure never changes that store's
outcome (see :meth:`Compactor.after_store`).
"""

from __future__ import annotations

import logging

import pyarrow as pa

from diadb.config import ApdbConfig
from diadb.history.manifest import FaultHook, HistoryEngine
from diadb.history.merging import span_merger
from diadb.history.pieces import compaction_pieces
from diadb.history.segment import Int64Array, SegmentInfo
from diadb.history.tier import HISTORY_TABLES, OBJECT_TABLE, HistoryTier, compaction_boundary
from diadb.schema.model import ApdbSchema

log = logging.getLogger("diadb.history")


class Compactor:
    """Runs compactions of one database: one shot (:meth:`run`) or after stores."""

    def __init__(
        self, engine: HistoryEngine, tier: HistoryTier, schema: ApdbSchema, config: ApdbConfig
    ) -> None:
        self._engine = engine
        self._tier = tier
        self._schema = schema
        self._config = config
        #: The newest boundary compacted by this process (later stores below it need no run).
        self.compacted_to = float("-inf")
        #: The error of the last automatic compaction that failed (None once one succeeds).
        self.last_error: BaseException | None = None

    def boundary(self, latest_mjd: float) -> float:
        """The compaction boundary for a database whose newest visit is at ``latest_mjd``."""
        c = self._config
        return compaction_boundary(
            latest_mjd, c.history_span_days, c.history_compact_lag_days, c.history_span_offset_days
        )

    def run(self, boundary: float, fault: FaultHook | None = None, wait: bool = True) -> list[SegmentInfo]:
        """Move every source row older than ``boundary`` into segments and refresh the DiaObject
        snapshot, in one engine transaction; the new segments' manifest entries. Without
        ``wait``, nothing is done while another process compacts (see ``after_store``)."""
        tier, schema = self._tier, self._schema

        def write(table: str, rows: pa.Table) -> list[SegmentInfo]:
            return tier.write(table, schema.table(table).cast(rows), fault)

        def write_objects(
            old: list[SegmentInfo], changed: Int64Array | None, rows: pa.Table
        ) -> tuple[list[SegmentInfo], list[SegmentInfo]]:
            return tier.write_objects(old, changed, schema.table(OBJECT_TABLE).cast(rows), fault)

        created = self._engine.compact_history(
            HISTORY_TABLES,
            boundary,
            write,
            tier.sweep,
            fault,
            objects=write_objects,
            wait=wait,
            pieces=compaction_pieces(tier.tile_order),
            object_pieces=compaction_pieces(tier.snapshot_tile_order),
            merge=span_merger(tier, schema, self._config.history_merge_spans, fault),
        )
        self.compacted_to = max(self.compacted_to, boundary)
        return created

    def after_store(self, visit_mjd: float) -> list[SegmentInfo]:
        """The automatic compaction after a committed store at ``visit_mjd``, when a span closed.

        The store has committed: whatever happens here, its outcome stands. A failure (a full
        disk, an I/O error) is logged and kept in :attr:`last_error`; the boundary is not
        marked done, so the next store (or ``diadb compact``) tries again."""
        boundary = self.boundary(visit_mjd)
        if boundary <= self.compacted_to:
            return []
        try:
            # Of many clients of one server, the first to see a span close compacts it; the
            # others do not queue behind it (their stores would wait) and find it done later.
            created = self.run(boundary, wait=False)
        except Exception as e:  # reported and retried later: the store stands
            self.last_error = e
            log.warning("automatic compaction to MJD %s failed (the store is committed): %s", boundary, e)
            return []
        self.last_error = None
        return created
