"""HEALPix covers of regions, computed in numpy from the HEALPix geometry itself.

cdshealpix's searches are not used for covers: its cone search misses cells of cones wider
than about 135 deg (a 150 deg cone lost 5% of its rows) and of some ordinary cones (a 20 deg
cone reaching over the pole missed cells at ra = 270, 0.02 deg inside its edge), its polygon
search misses cells of large polygons and of polygons around a pole, and both panic (a Rust
``PanicException``, a ``BaseException``) when asked for depth 28 or 29 with their default
``depth_delta``. A wrong cover means rows silently missing from a read.

Instead a cover is found by descending the HEALPix tree from the 12 base cells: each cell is
bounded by a cap (its centre and the largest distance from the centre to its boundary, the
*reach*), and a region's test says, for each cap, whether the region may meet it and whether
it contains it. Cells the region cannot meet are dropped, cells it contains are kept whole,
the others are split until the target depth, where they are kept. A cell is dropped only when
its bounding cap provably misses the region, so the cover is a superset by construction.

Cell centres and boundaries come from the HEALPix projection (Gorski et al. 2005, the
``xyf2loc`` mapping), vectorised here; tests check them against cdshealpix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from diadb.sky.healpix import ORDER, FloatArray, Int64Array, cells_to_ranges

BoolArray = npt.NDArray[np.bool_]
#: ``test(centres, reach_deg) -> (may_meet, contains)`` over caps (unit vectors, degrees).
CapTest = Callable[[FloatArray, FloatArray], tuple[BoolArray, BoolArray]]

#: Tests are padded by this much (degrees, ~4 micro-arcsec) so a point the exact test accepts
#: by rounding, or that HEALPix puts in the neighbouring pixel by rounding, is still covered.
PAD_DEG = 1e-9
#: Boundary points sampled per cell edge to find a cell's reach.
_EDGE_SAMPLES = 2
#: The sampled reach is enlarged by this factor: the boundary between samples is nearly straight
#: and the farthest point of a cell from its centre lies on its boundary, so this bounds it.
_REACH_MARGIN = 1.1
#: A level with more cells than this is not split further (its cells are kept: a superset).
_MAX_CELLS = 100_000
#: Levels are skipped (cells split into 16, 64... children) while the children number at most this.
_BATCH_CELLS = 256

_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.float64)
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.float64)


def cover(test: CapTest, depth: int) -> Int64Array:
    """Sorted, merged order-29 ranges of the cells (at most ``depth`` deep) ``test`` may meet."""
    return cover_with_inner(test, depth)[0]


def cover_with_inner(test: CapTest, depth: int) -> tuple[Int64Array, Int64Array]:
    """The cover (:func:`cover`) and its *inner* part: the ranges of the cells ``test`` says the
    region contains. A point whose pixel lies in an inner range is inside the region, so a read
    tests exactly only the rows of the other (boundary) ranges. Tests say "contains" with a
    margin of ``PAD_DEG`` inwards, beyond the rounding of the exact test and of HEALPix."""
    depth = int(np.clip(depth, 0, ORDER))
    cells = np.arange(12, dtype=np.int64)
    level = 0
    kept_cells: list[Int64Array] = []
    kept_depths: list[Int64Array] = []
    inner_cells: list[Int64Array] = []
    inner_depths: list[Int64Array] = []

    def keep(pix: Int64Array, d: int, inner: bool = False) -> None:
        kept_cells.append(pix)
        kept_depths.append(np.full(len(pix), d, dtype=np.int64))
        if inner:
            inner_cells.append(pix)
            inner_depths.append(kept_depths[-1])

    while cells.size:
        centres, reach = cell_caps(cells, level)
        may_meet, contains = test(centres, reach)
        if level == depth:
            keep(cells[may_meet & contains], level, inner=True)
            keep(cells[may_meet & ~contains], level)
            break
        keep(cells[may_meet & contains], level, inner=True)
        split = cells[may_meet & ~contains]
        if 4 * split.size > _MAX_CELLS:
            keep(split, level)
            break
        # Several levels at once while the cells are few: each level costs its numpy calls.
        step = 1
        while level + step < depth and split.size * 4 ** (step + 1) <= _BATCH_CELLS:
            step += 1
        children = np.arange(4**step, dtype=np.int64)
        cells = (split[:, None] * 4**step + children).ravel()
        level += step
    return _ranges(kept_cells, kept_depths), _ranges(inner_cells, inner_depths)


def _ranges(cells: list[Int64Array], depths: list[Int64Array]) -> Int64Array:
    if not cells or not sum(len(c) for c in cells):
        return np.zeros((0, 2), dtype=np.int64)
    return cells_to_ranges(np.concatenate(cells), np.concatenate(depths))


# ---- HEALPix geometry ---------------------------------------------------------------------
def _compact_bits(v: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The even bits of ``v`` packed together (the x (or, shifted, y) of a nested index)."""
    v = v & np.uint64(0x5555555555555555)
    v = (v | (v >> np.uint64(1))) & np.uint64(0x3333333333333333)
    v = (v | (v >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v | (v >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    v = (v | (v >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)
    return v


def face_xy(ipix: Int64Array, depth: int) -> tuple[Int64Array, FloatArray, FloatArray]:
    """Base cell and in-face integer coordinates (ix, iy) of nested cells at ``depth``."""
    pix = np.asarray(ipix, dtype=np.uint64)
    face = (pix >> np.uint64(2 * depth)).astype(np.int64)
    sub = pix & np.uint64((1 << (2 * depth)) - 1)
    both = _compact_bits(np.stack([sub, sub >> np.uint64(1)])).astype(np.float64)
    return face, both[0], both[1]


Vectors = tuple[FloatArray, FloatArray, FloatArray]


def face_to_vectors(face: Int64Array, x: FloatArray, y: FloatArray) -> Vectors:
    """Unit vectors (x, y, z components) of points ``(x, y)`` in ``[0, 1]^2`` of base cells
    ``face`` (broadcast together)."""
    jr = _JRLL[face] - x - y
    north, south = jr < 1.0, jr > 3.0
    polar_cap = north | south
    nr = np.where(north, jr, np.where(south, 4.0 - jr, 1.0))
    tmp = nr * nr / 3.0
    z = np.where(north, 1.0 - tmp, np.where(south, tmp - 1.0, (2.0 - jr) * (2.0 / 3.0)))
    # In the polar caps sin(theta) from nr keeps its precision (1 - z*z would lose it).
    sin_theta = np.sqrt(np.maximum(np.where(polar_cap, tmp * (2.0 - tmp), (1.0 - z) * (1.0 + z)), 0.0))
    t = np.mod(_JPLL[face] * nr + x - y, 8.0)
    phi = (np.pi / 4.0) * t / np.maximum(nr, 1e-300)
    return sin_theta * np.cos(phi), sin_theta * np.sin(phi), z


def cell_caps(ipix: Int64Array, depth: int) -> tuple[FloatArray, FloatArray]:
    """Centre (``(n, 3)`` unit vectors) and reach (degrees, an upper bound of the distance from
    the centre to any point of the cell) of nested cells at ``depth``."""
    face, ix, iy = face_xy(ipix, depth)
    scale = 1.0 / float(1 << depth)
    # Column 0: the centre; then the boundary, counter-clockwise from corner (0, 0).
    x, y, z = face_to_vectors(
        face[:, None], (ix[:, None] + _SAMPLE_X) * scale, (iy[:, None] + _SAMPLE_Y) * scale
    )
    chord2 = ((x[:, 1:] - x[:, :1]) ** 2 + (y[:, 1:] - y[:, :1]) ** 2 + (z[:, 1:] - z[:, :1]) ** 2).max(
        axis=1
    )
    centres: FloatArray = np.stack([x[:, 0], y[:, 0], z[:, 0]], axis=1)
    return centres, _chord_to_deg(chord2) * _REACH_MARGIN + PAD_DEG


def _chord_to_deg(chord2: FloatArray) -> FloatArray:
    """The angle (degrees) subtended by chords of squared length ``chord2``."""
    angle: FloatArray = 2.0 * np.degrees(np.arcsin(np.minimum(np.sqrt(chord2) / 2.0, 1.0)))
    return angle


# Where a cell is sampled, in its face coordinates: its centre, then its boundary
# counter-clockwise from corner (0, 0), four edges of _EDGE_SAMPLES points each.
_T = np.arange(_EDGE_SAMPLES, dtype=np.float64) / _EDGE_SAMPLES
_SAMPLE_X = np.concatenate([[0.5], _T, np.ones_like(_T), 1.0 - _T, np.zeros_like(_T)])
_SAMPLE_Y = np.concatenate([[0.5], np.zeros_like(_T), _T, np.ones_like(_T), 1.0 - _T])


def angle_deg(a: FloatArray, b: FloatArray) -> FloatArray:
    """Angles (degrees) between unit vectors (last axis 3), accurate at every separation: from
    the chord to ``b`` below 90 degrees, from the chord to ``-b`` above."""
    near = np.sum((a - b) ** 2, axis=-1)
    far = np.sum((a + b) ** 2, axis=-1)
    angle: FloatArray = np.where(near <= far, _chord_to_deg(near), 180.0 - _chord_to_deg(far))
    return angle


def vectors_to_radec(v: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(ra, dec) in degrees of unit vectors; dec by atan2, precise near the poles too."""
    ra = np.mod(np.degrees(np.arctan2(v[..., 1], v[..., 0])), 360.0)
    dec = np.degrees(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    return ra, dec


# ---- the tests of each kind of region -------------------------------------------------------
def circle_test(centre: FloatArray, radius_deg: float) -> CapTest:
    """Caps a circle may meet (centre distance minus reach within the radius) and contains."""

    def test(centres: FloatArray, reach: FloatArray) -> tuple[BoolArray, BoolArray]:
        distance = angle_deg(centres, centre)
        return distance - reach <= radius_deg + PAD_DEG, distance + reach <= radius_deg - PAD_DEG

    return test


def convex_test(normals: FloatArray) -> CapTest:
    """Caps an intersection of hemispheres ``normal . p >= 0`` may meet and contains: a cap is
    outside a hemisphere when its centre is more than its reach beyond the great circle."""
    unit = normals / np.linalg.norm(normals, axis=1, keepdims=True)

    def test(centres: FloatArray, reach: FloatArray) -> tuple[BoolArray, BoolArray]:
        signed = np.degrees(np.arcsin(np.clip(centres @ unit.T, -1.0, 1.0)))  # (cells, edges)
        r = reach[:, None]
        may_meet: BoolArray = np.all(signed >= -r - PAD_DEG, axis=1)
        contains: BoolArray = np.all(signed >= r + PAD_DEG, axis=1)
        return may_meet, contains

    return test


def box_test(
    ra_min_deg: float, ra_width_deg: float, dec_min_deg: float, dec_max_deg: float, full_ra: bool = True
) -> CapTest:
    """Caps an ra/dec box (``ra_width_deg`` from ``ra_min_deg`` eastwards) may meet and contains
    (``full_ra``: the box's exact test takes every ra, not only a width of 360 deg).
    A cap of radius rho at declination d spans d +- rho, and ra +- asin(sin rho / cos d)
    unless it holds a pole."""

    def test(centres: FloatArray, reach: FloatArray) -> tuple[BoolArray, BoolArray]:
        ra, dec = vectors_to_radec(centres)
        lo, hi = dec - reach, dec + reach
        may_meet = (lo <= dec_max_deg + PAD_DEG) & (hi >= dec_min_deg - PAD_DEG)
        contains = (lo >= dec_min_deg + PAD_DEG) & (hi <= dec_max_deg - PAD_DEG)
        if ra_width_deg >= 360.0 and full_ra:
            return may_meet, contains
        # (A box 360 deg wide by rounding, e.g. from ra 1e-308 to 360, still leaves out ra = 0:
        # its cells there are not contained, and their rows get the exact test.)
        pole = (hi >= 90.0) | (lo <= -90.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.sin(np.radians(np.minimum(reach, 90.0))) / np.cos(np.radians(dec))
        half = np.where(pole | ~(ratio < 1.0), 180.0, np.degrees(np.arcsin(np.clip(ratio, 0.0, 1.0))))
        offset = np.mod(ra - ra_min_deg, 360.0)
        in_ra = (offset <= ra_width_deg + half + PAD_DEG) | (offset >= 360.0 - half - PAD_DEG)
        within = ~pole & (offset - half >= PAD_DEG) & (offset + half <= ra_width_deg - PAD_DEG)
        return may_meet & in_ra, contains & within

    return test
