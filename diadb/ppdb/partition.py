"""HEALPix partition planning for HATS catalogs, vectorised over sparse pixel counts.

A partition is a pixel ``(order, npix)``; every row belongs to the one partition containing
its ``_healpix_29`` (``npix = _healpix_29 >> 2 * (29 - order)``). ``plan_partitions`` picks,
from the top of the hierarchy down, the lowest order at which a pixel holds at most
``max_rows`` rows, as HATS's adaptive tiling does. (``hats.pixel_math.generate_alignment``
does the same from a dense full-sky histogram with Python loops over every pixel; this keeps
only the non-empty pixels.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from diadb.errors import ConfigError
from diadb.sky.healpix import ORDER, merge_ranges

Int64Array = npt.NDArray[np.int64]

#: Highest partition order considered (HATS's usual ceiling; order-10 pixels are ~3.4 arcmin).
MAX_ORDER = 10


@dataclass(frozen=True, order=True)
class Pixel:
    """One HATS partition: HEALPix ``order`` and nested pixel number ``npix`` at that order."""

    order: int
    npix: int

    def __post_init__(self) -> None:
        if not (0 <= self.order <= ORDER and 0 <= self.npix < 12 * 4**self.order):
            raise ConfigError(f"not a HEALPix pixel: order {self.order}, pixel {self.npix}")

    @property
    def dir(self) -> int:
        return self.npix // 10_000 * 10_000

    def range29(self) -> tuple[int, int]:
        """The ``[lo, hi)`` range of order-29 pixels inside this pixel."""
        shift = 2 * (ORDER - self.order)
        return self.npix << shift, (self.npix + 1) << shift

    def relative_path(self) -> str:
        return f"Norder={self.order}/Dir={self.dir}/Npix={self.npix}.parquet"


def histogram(healpix29: Int64Array, order: int = MAX_ORDER) -> tuple[Int64Array, Int64Array]:
    """Sparse counts of rows per pixel at ``order``: ``(pixels, counts)``, pixels sorted."""
    pix = np.asarray(healpix29, dtype=np.int64) >> (2 * (ORDER - order))
    uniq, counts = np.unique(pix, return_counts=True)
    return uniq.astype(np.int64), counts.astype(np.int64)


def merge_histograms(parts: list[tuple[Int64Array, Int64Array]]) -> tuple[Int64Array, Int64Array]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pix = np.concatenate([p for p, _ in parts])
    cnt = np.concatenate([c for _, c in parts])
    uniq, inverse = np.unique(pix, return_inverse=True)
    sums = np.zeros(len(uniq), dtype=np.int64)
    np.add.at(sums, inverse, cnt)
    return uniq.astype(np.int64), sums


def plan_partitions(
    pixels: Int64Array,
    counts: Int64Array,
    *,
    max_rows: int,
    hist_order: int = MAX_ORDER,
    lowest_order: int = 0,
    forbidden: list[Pixel] | None = None,
) -> list[tuple[Pixel, int]]:
    """Adaptive partitions for a sparse histogram at ``hist_order``: ``[(pixel, rows)]``.

    Each partition is the lowest-order pixel holding at most ``max_rows`` rows (or a pixel at
    ``hist_order`` when even that is too full). ``forbidden`` pixels (existing partitions, for
    an incremental export) are never contained in a chosen pixel.
    """
    if max_rows < 1:
        raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
    if not (0 <= lowest_order <= hist_order <= ORDER):
        raise ConfigError(f"need 0 <= lowest_order <= hist_order <= 29, got {lowest_order}, {hist_order}")
    pix = np.asarray(pixels, dtype=np.int64)
    cnt = np.asarray(counts, dtype=np.int64)
    keep = cnt > 0
    pix, cnt = pix[keep], cnt[keep]
    order_idx = np.argsort(pix, kind="stable")
    pix, cnt = pix[order_idx], cnt[order_idx]
    # Ancestors of forbidden pixels, per order, cannot be chosen.
    blocked: dict[int, Int64Array] = {}
    for f in forbidden or []:
        for k in range(lowest_order, min(f.order, hist_order) + 1):
            anc = np.int64(f.npix >> (2 * (f.order - k)))
            blocked[k] = np.append(blocked.get(k, np.zeros(0, np.int64)), anc)
    chosen: list[tuple[Pixel, int]] = []
    for k in range(lowest_order, hist_order + 1):
        if not len(pix):
            break
        parents = pix >> (2 * (hist_order - k))
        starts = np.flatnonzero(np.r_[True, parents[1:] != parents[:-1]])
        uniq = parents[starts]
        sums = np.add.reduceat(cnt, starts)
        done = (sums <= max_rows) | (k == hist_order)
        if k in blocked and k < hist_order:
            done &= ~np.isin(uniq, blocked[k])
        chosen.extend(
            (Pixel(k, int(p)), int(s)) for p, s in zip(uniq[done].tolist(), sums[done].tolist(), strict=True)
        )
        # Rows whose parent was chosen leave; the rest go one order deeper.
        finished = np.repeat(done, np.diff(np.r_[starts, len(pix)]))
        pix, cnt = pix[~finished], cnt[~finished]
    return sorted(chosen, key=lambda pc: pc[0].range29())


def pixel_ranges(pixels: list[Pixel]) -> Int64Array:
    """Sorted, merged order-29 ranges of a list of pixels."""
    if not pixels:
        return np.zeros((0, 2), np.int64)
    return merge_ranges(np.array([p.range29() for p in pixels], dtype=np.int64))


def intersect_ranges(a: Int64Array, b: Int64Array) -> Int64Array:
    """The intersection of two sorted, disjoint range lists."""
    if not len(a) or not len(b):
        return np.zeros((0, 2), np.int64)
    # For each range of a, the ranges of b that overlap it are a contiguous run.
    i0 = np.searchsorted(b[:, 1], a[:, 0], side="right")
    i1 = np.searchsorted(b[:, 0], a[:, 1], side="left")
    n = np.maximum(i1 - i0, 0)
    if not n.sum():
        return np.zeros((0, 2), np.int64)
    ai = np.repeat(np.arange(len(a)), n)
    bi = np.repeat(i0, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    lo = np.maximum(a[ai, 0], b[bi, 0])
    hi = np.minimum(a[ai, 1], b[bi, 1])
    ok = lo < hi
    return merge_ranges(np.stack([lo[ok], hi[ok]], axis=1).astype(np.int64))


def in_ranges(values: Int64Array, ranges: Int64Array) -> npt.NDArray[np.bool_]:
    """Which ``values`` fall inside one of the sorted, disjoint ``ranges``."""
    if not len(ranges):
        return np.zeros(len(values), dtype=bool)
    i = np.searchsorted(ranges[:, 0], values, side="right") - 1
    ok = i >= 0
    result: npt.NDArray[np.bool_] = ok & (values < ranges[np.clip(i, 0, None), 1])
    return result


def partition_of(values: Int64Array, partitions: list[Pixel]) -> npt.NDArray[np.int64]:
    """Index into ``partitions`` (sorted by range) of each order-29 value, or -1 when outside all."""
    if not partitions:
        return np.full(len(values), -1, dtype=np.int64)
    bounds = np.array([p.range29() for p in partitions], dtype=np.int64)
    i = np.searchsorted(bounds[:, 0], values, side="right") - 1
    inside = (i >= 0) & (values < bounds[np.clip(i, 0, None), 1])
    return np.where(inside, i, -1).astype(np.int64)


def margin_order_for(threshold_arcsec: float) -> int:
    """The highest order whose pixels are still at least ``threshold_arcsec`` across."""
    # Order-k pixels are about 58.6 deg / 2**k across; their narrowest side is ~0.7 of that.
    size_arcsec = 58.6 * 3600.0 * 0.7 / 2.0 ** np.arange(ORDER + 1)
    ok = np.flatnonzero(size_arcsec >= threshold_arcsec)
    return int(ok[-1]) if len(ok) else 0


def margin_ranges(pixel: Pixel, margin_order: int) -> Int64Array:
    """Order-29 ranges of the pixels at ``margin_order`` that border ``pixel`` from outside."""
    from cdshealpix import nested

    if margin_order <= pixel.order:
        margin_order = pixel.order + 1
    edges, corners = nested.external_neighbours(
        np.array([pixel.npix], dtype=np.uint64), pixel.order, margin_order - pixel.order
    )
    cells = np.concatenate([np.asarray(edges).ravel(), np.asarray(corners).ravel()]).astype(np.int64)
    cells = cells[cells >= 0]
    shift = 2 * (ORDER - margin_order)
    return merge_ranges(np.stack([cells << shift, (cells + 1) << shift], axis=1))
