"""The simulator's geometry: the focal plane's 189 CCD tiles, the gnomonic (tangent-plane)
projection around a pointing, and uniform points and areas on the sphere.

The focal plane is a 15 x 15 grid of square CCD tiles (5 x 5 rafts of 3 x 3 CCDs, without the
four corner rafts: 189 detectors) on the tangent plane of the pointing, spanning the field's
diameter. A row belongs to the one tile that contains it; rows outside every tile (in the missing
corner rafts) are not detected. A detector reads the sky of its tile padded by 52 arcsec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from diadb.errors import ConfigError
from diadb.sky.regions import Polygon, unit_vectors

FloatArray = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

RAFTS_PER_SIDE = 5
CCDS_PER_RAFT_SIDE = 3
#: CCD tiles along one side of the focal-plane grid.
GRID_SIDE = RAFTS_PER_SIDE * CCDS_PER_RAFT_SIDE
#: Pixels along one side of a CCD; sets the DiaSource ``x``/``y`` scale.
CCD_PIXELS = 4000


def _layout() -> tuple[Int64Array, Int64Array, Int64Array]:
    """Grid column and row of each detector (ids in raft-major order) and the grid -> id map."""
    rr, rc, sr, sc = np.meshgrid(
        np.arange(RAFTS_PER_SIDE),
        np.arange(RAFTS_PER_SIDE),
        np.arange(CCDS_PER_RAFT_SIDE),
        np.arange(CCDS_PER_RAFT_SIDE),
        indexing="ij",
    )
    edge = RAFTS_PER_SIDE - 1
    corner = ((rr == 0) | (rr == edge)) & ((rc == 0) | (rc == edge))
    keep = ~corner.ravel()
    row = (rr * CCDS_PER_RAFT_SIDE + sr).ravel()[keep].astype(np.int64)
    col = (rc * CCDS_PER_RAFT_SIDE + sc).ravel()[keep].astype(np.int64)
    grid = np.full((GRID_SIDE, GRID_SIDE), -1, dtype=np.int64)
    grid[row, col] = np.arange(len(row))
    return col, row, grid


_TILE_COL, _TILE_ROW, _GRID = _layout()
#: Number of detectors: 25 rafts minus 4 corners, 9 CCDs each.
N_DETECTORS = len(_TILE_COL)


# ---- sphere helpers ----------------------------------------------------------------------
def _basis(ra0_deg: float, dec0_deg: float) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Unit vectors of the pointing and of local east and north there."""
    a, d = math.radians(ra0_deg), math.radians(dec0_deg)
    centre = np.array([math.cos(d) * math.cos(a), math.cos(d) * math.sin(a), math.sin(d)])
    east = np.array([-math.sin(a), math.cos(a), 0.0])
    north = np.array([-math.sin(d) * math.cos(a), -math.sin(d) * math.sin(a), math.cos(d)])
    return centre, east, north


def _radec(vectors: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(ra, dec) in degrees of (n, 3) vectors of any length; ra in [0, 360)."""
    v = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    ra = np.mod(np.degrees(np.arctan2(v[..., 1], v[..., 0])), 360.0)
    # mod of a tiny negative angle rounds to exactly 360, which is outside [0, 360).
    ra = np.where(ra >= 360.0, 0.0, ra)
    dec = np.degrees(np.arcsin(np.clip(v[..., 2], -1.0, 1.0)))
    return ra, dec


def to_tangent_plane(
    ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike, ra0_deg: float, dec0_deg: float
) -> tuple[FloatArray, FloatArray, BoolArray]:
    """Gnomonic coordinates (xi east, eta north; tangents, unitless) around a pointing.

    The third array is False for points on the far hemisphere, which have no projection.
    """
    centre, east, north = _basis(ra0_deg, dec0_deg)
    v = unit_vectors(ra_deg, dec_deg)
    depth = v @ centre
    front = depth > 0.0
    safe = np.where(front, depth, 1.0)
    return (v @ east) / safe, (v @ north) / safe, front


def from_tangent_plane(
    xi: npt.ArrayLike, eta: npt.ArrayLike, ra0_deg: float, dec0_deg: float
) -> tuple[FloatArray, FloatArray]:
    """(ra, dec) in degrees of gnomonic coordinates around a pointing."""
    centre, east, north = _basis(ra0_deg, dec0_deg)
    x = np.asarray(xi, dtype=np.float64)[..., None]
    y = np.asarray(eta, dtype=np.float64)[..., None]
    return _radec(centre + x * east + y * north)


def random_in_cap(
    rng: np.random.Generator, n: int, ra0_deg: float, dec0_deg: float, radius_deg: float
) -> tuple[FloatArray, FloatArray]:
    """``n`` points uniform on the sphere within ``radius_deg`` of a centre."""
    centre, east, north = _basis(ra0_deg, dec0_deg)
    # Uniform in cos(angle from centre) is uniform in area on the sphere.
    cos_t = 1.0 - rng.random(n) * (1.0 - math.cos(math.radians(radius_deg)))
    sin_t = np.sqrt(np.clip(1.0 - cos_t * cos_t, 0.0, 1.0))
    phi = rng.random(n) * 2.0 * math.pi
    v = (
        cos_t[:, None] * centre
        + (sin_t * np.cos(phi))[:, None] * east
        + (sin_t * np.sin(phi))[:, None] * north
    )
    return _radec(v)


def cap_area_deg2(radius_deg: float) -> float:
    """Area in square degrees of a spherical cap of ``radius_deg``."""
    return 2.0 * math.pi * (1.0 - math.cos(math.radians(radius_deg))) * (180.0 / math.pi) ** 2


def band_area_deg2(dec_min_deg: float, dec_max_deg: float) -> float:
    """Area in square degrees of the band of declinations ``[dec_min_deg, dec_max_deg]``."""
    s = math.sin(math.radians(dec_max_deg)) - math.sin(math.radians(dec_min_deg))
    return 2.0 * math.pi * s * (180.0 / math.pi) ** 2


# ---- focal plane -------------------------------------------------------------------------
@dataclass(frozen=True)
class FocalPlane:
    """The 189 CCD tiles on the tangent plane of a pointing (see the module docstring)."""

    fov_radius_deg: float = 1.75
    padding_arcsec: float = 52.0

    @property
    def half_width(self) -> float:
        """Half the grid's side on the tangent plane (tangent of the field radius)."""
        return math.tan(math.radians(self.fov_radius_deg))

    @property
    def tile_width(self) -> float:
        return 2.0 * self.half_width / GRID_SIDE

    def tile_box(self, detector: int, *, padded: bool = False) -> tuple[float, float, float, float]:
        """(xi_min, xi_max, eta_min, eta_max) of a tile on the tangent plane."""
        if not 0 <= detector < N_DETECTORS:
            raise ConfigError(f"detector must be in [0, {N_DETECTORS}), got {detector}")
        w, h = self.tile_width, self.half_width
        pad = math.tan(math.radians(self.padding_arcsec / 3600.0)) if padded else 0.0
        xi0 = -h + int(_TILE_COL[detector]) * w
        eta0 = -h + int(_TILE_ROW[detector]) * w
        return xi0 - pad, xi0 + w + pad, eta0 - pad, eta0 + w + pad

    def assign(
        self, ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike, ra0_deg: float, dec0_deg: float
    ) -> tuple[Int64Array, FloatArray, FloatArray]:
        """Detector of each point (-1 when on no tile) and its pixel ``x``, ``y`` on that CCD."""
        xi, eta, front = to_tangent_plane(ra_deg, dec_deg, ra0_deg, dec0_deg)
        fc = (xi + self.half_width) / self.tile_width
        fr = (eta + self.half_width) / self.tile_width
        col = np.floor(fc).astype(np.int64)
        row = np.floor(fr).astype(np.int64)
        on_grid = front & (col >= 0) & (col < GRID_SIDE) & (row >= 0) & (row < GRID_SIDE)
        det = np.full(col.shape, -1, dtype=np.int64)
        det[on_grid] = _GRID[row[on_grid], col[on_grid]]
        return det, (fc - col) * CCD_PIXELS, (fr - row) * CCD_PIXELS

    def region(self, detector: int, ra0_deg: float, dec0_deg: float, *, padded: bool = True) -> Polygon:
        """A detector's tile on the sky: great-circle edges, so a convex polygon."""
        xi0, xi1, eta0, eta1 = self.tile_box(detector, padded=padded)
        ra, dec = from_tangent_plane([xi0, xi1, xi1, xi0], [eta0, eta0, eta1, eta1], ra0_deg, dec0_deg)
        return Polygon(tuple((float(r), float(d)) for r, d in zip(ra, dec, strict=True)))

    def regions(self, ra0_deg: float, dec0_deg: float, *, padded: bool = True) -> list[tuple[int, Polygon]]:
        """``(detector, polygon)`` of every detector, ids 0..188."""
        return [(d, self.region(d, ra0_deg, dec0_deg, padded=padded)) for d in range(N_DETECTORS)]


def detector_regions(
    ra_deg: float, dec_deg: float, *, fov_radius_deg: float = 1.75, padding_arcsec: float = 52.0
) -> list[tuple[int, Polygon]]:
    """The padded sky region of each of the 189 detectors for a pointing at (ra, dec) degrees."""
    return FocalPlane(fov_radius_deg, padding_arcsec).regions(ra_deg, dec_deg)


__all__ = [
    "CCD_PIXELS",
    "GRID_SIDE",
    "N_DETECTORS",
    "FocalPlane",
    "band_area_deg2",
    "cap_area_deg2",
    "detector_regions",
    "from_tangent_plane",
    "random_in_cap",
    "to_tangent_plane",
]
