"""The one module that talks to the HEALPix library (cdshealpix, CDS's Rust implementation),
for the order-29 pixel of a position; region covers are computed by :mod:`diadb.sky.cover`.

Everything else in diadb sees plain numpy arrays: order-29 nested pixel numbers and
half-open ranges ``[lo, hi)`` of them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

ORDER = 29
#: Number of order-29 pixels on the sphere: 12 * 4**29.
NPIX_29 = 12 * 4**ORDER

#: Covers are computed as if regions were at least this large (radius, about 3.6 mas): deeper
#: cells only add ranges, and the exact filter removes the rows a tinier region leaves out.
MIN_COVER_RADIUS_DEG = 1e-6

Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def _lonlat(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> tuple[object, object]:
    import astropy.units as u
    from astropy.coordinates import Latitude, Longitude

    lon = Longitude(np.asarray(ra_deg, dtype=np.float64), unit=u.deg)
    lat = Latitude(np.asarray(dec_deg, dtype=np.float64), unit=u.deg)
    return lon, lat


def radec_to_healpix29(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> Int64Array:
    """Order-29 nested HEALPix pixel of each (ra, dec) in degrees."""
    from cdshealpix import nested

    ra = np.asarray(ra_deg, dtype=np.float64)
    if ra.size == 0:
        return np.zeros(0, dtype=np.int64)
    lon, lat = _lonlat(ra, dec_deg)
    return np.asarray(nested.lonlat_to_healpix(lon, lat, ORDER), dtype=np.int64)


def cells_to_ranges(ipix: npt.ArrayLike, depth: npt.ArrayLike) -> Int64Array:
    """Multi-order cells to sorted, merged order-29 ranges, an ``(n, 2)`` array of ``[lo, hi)``."""
    ipix_a = np.asarray(ipix, dtype=np.int64)
    shift = 2 * (ORDER - np.asarray(depth, dtype=np.int64))
    lo = ipix_a << shift
    hi = (ipix_a + 1) << shift
    return merge_ranges(np.stack([lo, hi], axis=1) if lo.size else np.zeros((0, 2), np.int64))


def merge_ranges(ranges: Int64Array) -> Int64Array:
    """Sort ranges and join the ones that touch or overlap."""
    if len(ranges) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    r = ranges[np.argsort(ranges[:, 0], kind="stable")]
    # A new run starts where a range begins after everything before it has ended.
    ends = np.maximum.accumulate(r[:, 1])
    starts_new = np.ones(len(r), dtype=bool)
    starts_new[1:] = r[1:, 0] > ends[:-1]
    idx = np.flatnonzero(starts_new)
    lo = r[idx, 0]
    hi = np.maximum.reduceat(r[:, 1], idx)
    return np.stack([lo, hi], axis=1).astype(np.int64)


def depth_for_size(size_deg: float, refinement: int) -> int:
    """A search depth whose cells are about ``size_deg / 2**refinement`` across.

    Larger ``refinement`` gives tighter ranges (fewer rows to filter) but more of them.
    """
    # Order-0 cells are ~58.6 deg across; each order halves that. Below the smallest cover
    # radius, deeper cells would only add ranges.
    base = np.log2(58.6 / max(size_deg, 2.0 * MIN_COVER_RADIUS_DEG))
    return int(np.clip(np.floor(base) + refinement, 0, ORDER))


def coarsen_ranges(ranges: Int64Array, max_ranges: int) -> Int64Array:
    """Merge ranges across their smallest gaps until at most ``max_ranges`` remain (a superset:
    engines bound the size of a query this way, and the exact region filter removes the extra rows)."""
    if len(ranges) <= max_ranges:
        return ranges
    gaps = ranges[1:, 0] - ranges[:-1, 1]
    keep_gap = np.zeros(len(gaps), dtype=bool)
    keep_gap[np.argsort(gaps, kind="stable")[len(gaps) - (max_ranges - 1) :]] = True
    starts = np.concatenate([[0], np.flatnonzero(keep_gap) + 1])
    ends = np.concatenate([np.flatnonzero(keep_gap), [len(ranges) - 1]])
    merged: Int64Array = np.stack([ranges[starts, 0], ranges[ends, 1]], axis=1)
    return merged


def in_ranges(pixels: npt.ArrayLike, ranges: Int64Array) -> npt.NDArray[np.bool_]:
    """Whether each pixel lies in one of the sorted, disjoint ``[lo, hi)`` ``ranges``."""
    values = np.asarray(pixels, dtype=np.int64)
    if len(ranges) == 0:
        return np.zeros(values.shape, dtype=bool)
    i = np.searchsorted(ranges[:, 0], values, side="right") - 1
    inside: npt.NDArray[np.bool_] = (i >= 0) & (values < ranges[np.maximum(i, 0), 1])
    return inside


def split_ranges(ranges: Int64Array, n_pixels: int) -> tuple[Int64Array, Int64Array]:
    """The first ``n_pixels`` order-29 pixels of sorted, disjoint ``ranges`` and the rest, a range
    cut in two where the count falls inside it (both parts sorted: concatenated, the original)."""
    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    if n_pixels <= 0 or not len(r):
        return r[:0].copy(), r.copy()
    # A whole-sky cover counts 12 * 4**29 ~ 3.5e18 pixels: the running sum fits in int64.
    ends = np.cumsum(r[:, 1] - r[:, 0])
    i = int(np.searchsorted(ends, n_pixels, side="left"))
    if i >= len(r):
        return r.copy(), r[:0].copy()
    cut = int(r[i, 1] - (ends[i] - n_pixels))
    head = r[: i + 1].copy()
    head[-1, 1] = cut
    tail = r[i:].copy()
    tail[0, 0] = cut
    if tail[0, 0] == tail[0, 1]:
        tail = tail[1:]
    return head, tail
