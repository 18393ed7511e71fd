"""Span merges: fewer, larger history segments once their spans are long closed.

Compaction writes one segment per table, time span (``history_span_days``) and sky tile. At
12-month depth that is 52 (weekly spans) to 365 (daily) segments per table and tile, and every
read pays for each one it touches (a map or a blob fetch, the pixel search, the checksum
bookkeeping, a gather per column): a detector-sized read was almost all such fixed costs. So
once a *group* of ``history_merge_spans`` consecutive spans (aligned on multiples of the group's
width, so that a span belongs to exactly one group, however often the merge runs) lies wholly
below the compaction boundary, its segments of one table and tile become one segment whose span
is the group's; and groups of that many groups in turn, up to :data:`MAX_MERGED_DAYS`
(:func:`merge_widths`). A later compaction of a late store's rows into such a span adds a
segment to the group, which the next merge folds in again.

A merge runs inside a compaction, under the same engine transaction or lease: the engine records
the merged segments and sends those they replace to the trash in the step that commits the
compaction (``HistoryEngine.compact_history``'s ``merge``), so a reader sees either the old
segments or the merged one, never both and never neither; a crash before that step leaves the
merged file an orphan the next compaction's sweep deletes. Merged bytes are checked whole
first: a damaged segment fails the compaction, it is never copied into a new one.

What it changes: retention drops whole segments, so with merged groups of up to 64 days the
history kept beyond the window grows by up to that much before a group goes (reads still stop at the
window); a group over ``MAX_MERGED_BYTES`` stays unmerged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from diadb.history.columns import column_values, select_columns
from diadb.history.manifest import FaultHook, SegmentMerger
from diadb.history.segment import SegmentInfo
from diadb.history.tier import HISTORY_TABLES, HistoryTier
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema

#: A merge whose inputs hold more bytes than this is not made: the merged rows are held in memory
#: once while they are written (the inputs are mapped, or fetched blobs).
MAX_MERGED_BYTES = 1 << 30
#: The widest merge level, in days: retention drops whole segments, so the history kept past the
#: window grows by up to this much before a merged group goes.
MAX_MERGED_DAYS = 64.0


def merge_widths(span_days: float, factor: int, max_days: float = MAX_MERGED_DAYS) -> list[float]:
    """The widths (days) of the merge levels, widest first: ``span_days * factor**k`` for k >= 1
    up to ``max_days`` (always the first). Weekly spans merged by 4 give one level, 28 days;
    daily spans give 4, 16 and 64 days: each row is rewritten once per level, and a 12-month
    read touches ~6 widest segments per tile, plus the few narrower ones of the newest weeks."""
    widths = [span_days * factor]
    while widths[-1] * factor <= max_days + 1e-9:
        widths.append(widths[-1] * factor)
    return widths[::-1]


def plan_merges(
    segments: Sequence[SegmentInfo],
    boundary: float,
    span_days: float,
    factor: int,
    tiles_of: Callable[[int], int],
    max_days: float = MAX_MERGED_DAYS,
    offset: float = 0.0,
) -> list[tuple[tuple[float, float], list[SegmentInfo]]]:
    """The groups to merge: ``(the group's span, its segments oldest first)`` for each table, group
    wholly below ``boundary`` of a merge level (:func:`merge_widths`, widest first: a segment
    taken by a wider group is not merged at a narrower level) and sky tile holding two segments
    or more. Groups are aligned on multiples of their width, ``offset`` days past MJD 0."""
    if factor < 2 or not math.isfinite(boundary):
        return []
    plans = []
    left = [s for s in segments if s.table in HISTORY_TABLES]
    for width in merge_widths(span_days, factor, max_days):
        groups: dict[tuple[str, int, int], list[SegmentInfo]] = {}
        for info in left:
            g = math.floor(((info.span_start + info.span_end) / 2.0 - offset) / width)
            start, end = g * width + offset, (g + 1) * width + offset
            # Rounding of the span bounds (multiples of span_days) is far below a day.
            fits = info.span_start >= start - 1e-6 and info.span_end <= end + 1e-6
            tile = tiles_of(info.pix_min)
            if not fits or end > boundary or tiles_of(info.pix_max) != tile:
                continue
            groups.setdefault((info.table, g, tile), []).append(info)
        taken: set[str] = set()
        for (_, g, _), members in sorted(groups.items()):
            if len(members) >= 2 and sum(m.bytes for m in members) <= MAX_MERGED_BYTES:
                span = (g * width + offset, (g + 1) * width + offset)
                plans.append((span, sorted(members, key=lambda m: (m.t_min, m.name))))
                taken.update(m.name for m in members)
        left = [s for s in left if s.name not in taken]
    return plans


def merge_group(
    tier: HistoryTier,
    schema: ApdbSchema,
    span: tuple[float, float],
    members: Sequence[SegmentInfo],
    fault: FaultHook | None = None,
) -> SegmentInfo:
    """One segment holding every row of ``members`` (one table and tile), for ``span``.

    Each input is sorted by pixel then time and they come oldest first, so a stable sort of
    their concatenation by pixel alone orders it by pixel and time; ``write_segment`` checks that
    order in one pass (and sorts fully if spans overlap in time, e.g. a late store's segment)."""
    table = members[0].table
    spec = schema.table(table)
    columns = [*spec.column_names, HEALPIX_COLUMN]
    parts = [spec.cast(select_columns(data, columns)) for data in tier.checked_tables(members)]
    rows = pa.concat_tables(parts).combine_chunks()
    order = np.argsort(column_values(rows, HEALPIX_COLUMN), kind="stable")
    rows = rows.take(pa.array(order))
    label = tier.tile_label_of(members[0].pix_min)
    return tier.write_rows(table, rows, span, label, fault)


def span_merger(
    tier: HistoryTier, schema: ApdbSchema, factor: int, fault: FaultHook | None = None
) -> SegmentMerger:
    """The ``merge`` a compaction hands its engine (see the module docstring)."""

    def merge(live: list[SegmentInfo], boundary: float) -> tuple[list[SegmentInfo], list[SegmentInfo]]:
        made: list[SegmentInfo] = []
        gone: list[SegmentInfo] = []
        tiles = tier.tile_order

        def tiles_of(pixel: int) -> int:
            return 0 if tiles is None else int(pixel) >> (2 * (29 - tiles))

        for span, members in plan_merges(
            live, boundary, tier.span_days, factor, tiles_of, offset=tier.span_offset
        ):
            made.append(merge_group(tier, schema, span, members, fault))
            gone += members
        if made and fault is not None:
            fault("merged")
        return made, gone

    return merge
