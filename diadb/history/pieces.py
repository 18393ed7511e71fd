"""Compaction a piece of the sky at a time, so that its memory does not grow with the sky.

A compaction moves every engine row older than its boundary and rewrites the DiaObject
snapshot's changed tiles. Fetched whole, those rows grow with the survey's footprint (and the
snapshot with every object ever seen). When segments are cut by sky tile, the engine instead
fetches and writes one *piece* after another: a HEALPix cell of order ``min(tile_order,
PIECE_ORDER)``, so each piece holds whole tiles and the segments written are the same as in one
pass. Without tiles a span's segment covers the whole sky, and there is one piece.

``PIECE_ORDER`` 2 (192 cells of ~215 deg2): a piece holds a few fields' worth of rows, and an
engine asks at most 192 small queries per table (fewer than one per tile at order 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from diadb.history.segment import SegmentInfo

#: Order-29 pixels on the sphere; ``[0, NPIX29)`` is the whole sky.
NPIX29 = 12 * 4**29
PIECE_ORDER = 2
#: The tile order of the DiaObject snapshot on databases whose segments are not cut by tile.
SNAPSHOT_TILE_ORDER = 2

Piece = tuple[int, int]
WHOLE_SKY: tuple[Piece, ...] = ((0, NPIX29),)


def compaction_pieces(tile_order: int | None) -> list[Piece]:
    """The ``[lo, hi)`` order-29 pixel ranges a compaction fetches one after another."""
    if tile_order is None:
        return list(WHOLE_SKY)
    order = min(tile_order, PIECE_ORDER)
    shift = 2 * (29 - order)
    return [(i << shift, (i + 1) << shift) for i in range(12 * 4**order)]


def snapshot_tile_order(tile_order: int | None) -> int:
    """The tile order of the DiaObject snapshot: the segments' own, or ``SNAPSHOT_TILE_ORDER``."""
    return SNAPSHOT_TILE_ORDER if tile_order is None else tile_order


def fits_pieces(segments: Sequence[SegmentInfo], pieces: Sequence[Piece]) -> bool:
    """Whether every segment lies inside one piece. A snapshot written before it was cut by tile
    is one segment over the whole sky: it does not fit, and is rebuilt whole (once)."""
    shift = piece_shift(pieces)
    return shift is None or all(s.pix_min >> shift == s.pix_max >> shift for s in segments)


def segments_in_piece(segments: Sequence[SegmentInfo], piece: Piece) -> list[SegmentInfo]:
    """The segments (snapshot tiles) whose rows lie in ``piece``: a tile never straddles one."""
    return [s for s in segments if piece[0] <= s.pix_min < piece[1]]


#: Rows fetched at once, at most (unless one piece alone holds more): neighbouring pieces are
#: fetched together up to this, so a compaction asks few queries (an ADBC round costs ~2-3 ms
#: even when empty) and still holds a bounded number of rows.
ROWS_PER_FETCH = 100_000


def piece_shift(pieces: Sequence[Piece]) -> int | None:
    """The right shift taking an order-29 pixel to its piece's index (None: one piece)."""
    if len(pieces) <= 1:
        return None
    return int(pieces[0][1] - pieces[0][0]).bit_length() - 1


def fetch_runs(pieces: Sequence[Piece], counts: Mapping[int, int], budget: int | None = None) -> list[Piece]:
    """Ranges to fetch one after another: runs of consecutive pieces of ``counts`` (piece
    index -> rows; a piece listed with 0 rows is still visited) holding at most ``budget``
    (default ``ROWS_PER_FETCH``) rows together; one piece over the budget is a run of its own.
    Pieces not listed are skipped."""
    budget = ROWS_PER_FETCH if budget is None else budget
    runs: list[Piece] = []
    start = end = total = -1
    for index in sorted(counts):
        n = int(counts[index])
        if start >= 0 and total + n > budget:
            runs.append((pieces[start][0], pieces[end][1]))
            start = -1
        if start < 0:
            start, total = index, 0
        end, total = index, total + n
    if start >= 0:
        runs.append((pieces[start][0], pieces[end][1]))
    return runs


def pixel_counts(pixels: npt.ArrayLike, shift: int) -> dict[int, int]:
    """Rows per piece index of order-29 ``pixels`` (pieces of ``piece_shift``)."""
    index, n = np.unique(np.asarray(pixels, dtype=np.int64) >> shift, return_counts=True)
    return {int(i): int(c) for i, c in zip(index, n, strict=True)}


def snapshot_runs(
    pieces: Sequence[Piece], counts: Mapping[int, int], old: Sequence[SegmentInfo]
) -> list[Piece]:
    """The ranges a DiaObject snapshot refresh fetches: runs of the pieces with rows to write
    (``counts``) and of every piece holding a current snapshot tile (it may lose rows even if
    nothing is added to it)."""
    shift = piece_shift(pieces)
    if shift is None:
        return list(pieces)
    visit = dict(counts)
    for info in old:
        visit.setdefault(info.pix_min >> shift, 0)
    return fetch_runs(pieces, visit)
