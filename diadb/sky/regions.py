"""Sky regions: what a read selects. Each gives HEALPix ranges (a cover) and an exact membership test."""

from __future__ import annotations

import functools
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from diadb.errors import ConfigError
from diadb.sky import cover, healpix
from diadb.sky.healpix import FloatArray, Int64Array

BoolArray = npt.NDArray[np.bool_]

#: Default refinement of region covers: cells about 1/16 of the region's size.
DEFAULT_REFINEMENT = 4


def unit_vectors(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> FloatArray:
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


class Region(ABC):
    """A region of the sky."""

    @abstractmethod
    def contains(self, ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> BoolArray:
        """Exact test, vectorised over points in degrees."""

    @abstractmethod
    def size_deg(self) -> float:
        """A rough diameter, used to choose the depth of the pixel cover."""

    @abstractmethod
    def _cover(self, depth: int) -> tuple[Int64Array, Int64Array]:
        """Order-29 ranges that contain the region, computed at ``depth``, and the part of them
        inside it (:func:`diadb.sky.cover.cover_with_inner`)."""

    def pixel_ranges(self, refinement: int = DEFAULT_REFINEMENT) -> Int64Array:
        """Sorted, merged ``[lo, hi)`` order-29 pixel ranges covering the region (a superset).

        Cached: a pipeline reads objects, sources and forced sources of one region in turn."""
        return _cover_cached(self, refinement)[0].copy()

    def inner_ranges(self, refinement: int = DEFAULT_REFINEMENT) -> Int64Array:
        """The ranges of :meth:`pixel_ranges` whose every point is inside the region: a row whose
        pixel lies in one needs no exact test (reads test only the others). Cached likewise."""
        return _cover_cached(self, refinement)[1].copy()


@dataclass(frozen=True)
class Circle(Region):
    """A cone: centre and radius in degrees."""

    ra_deg: float
    dec_deg: float
    radius_deg: float

    def __post_init__(self) -> None:
        for name in ("ra_deg", "dec_deg", "radius_deg"):
            object.__setattr__(self, name, _number("Circle", name, getattr(self, name)))
        _check_radec("Circle", self.ra_deg, self.dec_deg)
        if not (0.0 < self.radius_deg <= 180.0):
            raise ConfigError(f"Circle radius_deg must be in (0, 180], got {self.radius_deg}")

    def contains(self, ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> BoolArray:
        # Chord lengths, not dot products: 1 - cos(r) is below float64's resolution for radii
        # under ~1e-5 deg (a 2e-6 deg cone accepted points 14% beyond its edge). A cone wider
        # than 90 deg is tested as the outside of its antipodal cap, for the same reason.
        centre = unit_vectors(self.ra_deg, self.dec_deg)
        points = unit_vectors(ra_deg, dec_deg)
        if self.radius_deg <= 90.0:
            chord = 2.0 * math.sin(math.radians(self.radius_deg) / 2.0)
            inside: BoolArray = np.sum((points - centre) ** 2, axis=-1) <= chord * chord
            return inside
        chord = 2.0 * math.sin(math.radians(180.0 - self.radius_deg) / 2.0)
        outside_cap: BoolArray = np.sum((points + centre) ** 2, axis=-1) >= chord * chord
        return outside_cap

    def size_deg(self) -> float:
        return 2.0 * self.radius_deg

    def _cover(self, depth: int) -> tuple[Int64Array, Int64Array]:
        centre = unit_vectors(self.ra_deg, self.dec_deg)
        radius = max(self.radius_deg, healpix.MIN_COVER_RADIUS_DEG)
        ranges, inner = cover.cover_with_inner(cover.circle_test(centre, radius), depth)
        # A cone under the smallest cover radius is covered as a larger one: none of it is inner.
        return ranges, inner if radius == self.radius_deg else inner[:0]


@dataclass(frozen=True)
class Box(Region):
    """An ra/dec range in degrees. ``ra_min > ra_max`` wraps through ra = 0."""

    ra_min_deg: float
    ra_max_deg: float
    dec_min_deg: float
    dec_max_deg: float

    def __post_init__(self) -> None:
        for name in ("ra_min_deg", "ra_max_deg", "dec_min_deg", "dec_max_deg"):
            object.__setattr__(self, name, _number("Box", name, getattr(self, name)))
        for v in (self.ra_min_deg, self.ra_max_deg):
            if not (0.0 <= v <= 360.0):
                raise ConfigError(f"Box ra must be in [0, 360], got {v}")
        if not (-90.0 <= self.dec_min_deg < self.dec_max_deg <= 90.0):
            raise ConfigError(
                f"Box needs -90 <= dec_min < dec_max <= 90, got {self.dec_min_deg}, {self.dec_max_deg}"
            )

    def contains(self, ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> BoolArray:
        ra = np.asarray(ra_deg, dtype=np.float64)
        dec = np.asarray(dec_deg, dtype=np.float64)
        in_dec = (dec >= self.dec_min_deg) & (dec <= self.dec_max_deg)
        if self.ra_min_deg <= self.ra_max_deg:
            in_ra = (ra >= self.ra_min_deg) & (ra <= self.ra_max_deg)
        else:
            in_ra = (ra >= self.ra_min_deg) | (ra <= self.ra_max_deg)
        result: BoolArray = in_ra & in_dec
        return result

    def _ra_width(self) -> float:
        return (self.ra_max_deg - self.ra_min_deg) % 360.0 or (
            360.0 if self.ra_max_deg != self.ra_min_deg else 0.0
        )

    def size_deg(self) -> float:
        dec_width = self.dec_max_deg - self.dec_min_deg
        cos_dec = max(math.cos(math.radians(self.dec_min_deg)), math.cos(math.radians(self.dec_max_deg)))
        return max(dec_width, self._ra_width() * cos_dec)

    def _cover(self, depth: int) -> tuple[Int64Array, Int64Array]:
        return cover.cover_with_inner(
            cover.box_test(
                self.ra_min_deg,
                self._ra_width(),
                self.dec_min_deg,
                self.dec_max_deg,
                full_ra=self.ra_min_deg == 0.0 and self.ra_max_deg == 360.0,
            ),
            depth,
        )


@dataclass(frozen=True)
class Polygon(Region):
    """A convex spherical polygon; vertices (ra, dec) in degrees, in either winding order."""

    vertices: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "vertices", _vertices(self.vertices))
        if len(self.vertices) < 3:
            raise ConfigError(f"Polygon needs at least 3 vertices, got {len(self.vertices)}")
        for ra, dec in self.vertices:
            _check_radec("Polygon", ra, dec)
        v = self._vectors()
        normals = np.cross(v, np.roll(v, -1, axis=0))
        if np.any(np.linalg.norm(normals, axis=1) < 1e-15):
            raise ConfigError("Polygon has repeated or antipodal consecutive vertices")
        # Every vertex must lie on the inner side of every edge (convexity).
        sign = np.sign(normals @ v.sum(axis=0))
        if np.any(sign == 0) or not np.all(sign == sign[0]):
            raise ConfigError("Polygon is not convex")
        side = (normals @ v.T) * sign[0]
        if np.any(side < -1e-12):
            raise ConfigError("Polygon is not convex")

    def _vectors(self) -> FloatArray:
        arr = np.asarray(self.vertices, dtype=np.float64)
        return unit_vectors(arr[:, 0], arr[:, 1])

    def _inward_normals(self) -> FloatArray:
        return self._normals_t.T

    @functools.cached_property
    def _normals_t(self) -> FloatArray:
        """The edges' inward normals, transposed: computed once (a detector's read tests
        its polygon once per segment; the cross products cost more than the test)."""
        v = self._vectors()
        normals = np.cross(v, np.roll(v, -1, axis=0))
        if normals[0] @ v.sum(axis=0) < 0:
            normals = -normals
        result: FloatArray = np.ascontiguousarray(normals.T)
        return result

    def contains(self, ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> BoolArray:
        p = unit_vectors(ra_deg, dec_deg)
        result: BoolArray = np.all(p @ self._normals_t >= 0.0, axis=-1)
        return result

    def size_deg(self) -> float:
        v = self._vectors()
        centre = v.sum(axis=0)
        centre /= np.linalg.norm(centre)
        return 2.0 * float(np.degrees(np.arccos(np.clip(v @ centre, -1.0, 1.0)).max()))

    def _cover(self, depth: int) -> tuple[Int64Array, Int64Array]:
        return cover.cover_with_inner(cover.convex_test(self._inward_normals()), depth)


@functools.lru_cache(maxsize=512)
def _cover_cached(region: Region, refinement: int) -> tuple[Int64Array, Int64Array]:
    return region._cover(healpix.depth_for_size(region.size_deg(), refinement))


def _number(kind: str, name: str, value: Any) -> float:
    """A coordinate or radius as a float; anything else (text, None, bool) is a ConfigError."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{kind} {name} must be a number of degrees, got {type(value).__name__} {value!r}")
    return float(value)


def _vertices(vertices: Any) -> tuple[tuple[float, float], ...]:
    """Polygon vertices as a tuple of (ra, dec) float pairs (from any sequence or an (n, 2) array)."""
    if isinstance(vertices, str | bytes) or not hasattr(vertices, "__iter__"):
        raise ConfigError(f"Polygon vertices must be a sequence of (ra, dec) pairs, got {vertices!r}")
    result = []
    for i, vertex in enumerate(vertices):
        if isinstance(vertex, str | bytes) or not hasattr(vertex, "__len__") or len(vertex) != 2:
            raise ConfigError(f"Polygon vertex {i} must be an (ra, dec) pair, got {vertex!r}")
        result.append(
            (
                _number("Polygon", f"vertex {i} ra", vertex[0]),
                _number("Polygon", f"vertex {i} dec", vertex[1]),
            )
        )
    return tuple(result)


def _check_radec(kind: str, ra: float, dec: float) -> None:
    if not (math.isfinite(ra) and 0.0 <= ra <= 360.0):
        raise ConfigError(f"{kind} ra must be in [0, 360] degrees, got {ra}")
    if not (math.isfinite(dec) and -90.0 <= dec <= 90.0):
        raise ConfigError(f"{kind} dec must be in [-90, 90] degrees, got {dec}")


def as_region(region: Any) -> Region:
    """Accept a diadb region, an ``lsst.sphgeom`` region, or a text like ``"circle 55 -30 3"``."""
    if isinstance(region, Region):
        return region
    if isinstance(region, str):
        return parse_region(region)
    if type(region).__module__.startswith("lsst.sphgeom"):
        return _from_sphgeom(region)
    raise ConfigError(f"not a region: {region!r} (use diadb.Circle, Box, Polygon or an lsst.sphgeom region)")


def parse_region(text: str) -> Region:
    """Parse ``circle RA DEC RADIUS``, ``box RA_MIN RA_MAX DEC_MIN DEC_MAX`` or ``polygon RA1 DEC1 ...``."""
    words = text.replace(",", " ").split()
    if not words:
        raise ConfigError("empty region text")
    kind, args = words[0].lower(), words[1:]
    try:
        nums = [float(a) for a in args]
    except ValueError:
        raise ConfigError(f"region {text!r}: the numbers are not numbers") from None
    if kind == "circle" and len(nums) == 3:
        return Circle(*nums)
    if kind == "box" and len(nums) == 4:
        return Box(*nums)
    if kind == "polygon" and len(nums) >= 6 and len(nums) % 2 == 0:
        return Polygon(tuple(zip(nums[0::2], nums[1::2], strict=True)))
    raise ConfigError(
        f"region {text!r}: expected 'circle RA DEC RADIUS', 'box RA_MIN RA_MAX DEC_MIN DEC_MAX' "
        "or 'polygon RA1 DEC1 RA2 DEC2 RA3 DEC3 ...' (degrees)"
    )


def _from_sphgeom(region: Any) -> Region:
    from lsst import sphgeom

    if isinstance(region, sphgeom.Circle):
        c = sphgeom.LonLat(region.getCenter())
        return Circle(
            c.getLon().asDegrees() % 360.0, c.getLat().asDegrees(), region.getOpeningAngle().asDegrees()
        )
    if isinstance(region, sphgeom.ConvexPolygon):
        verts = []
        for v in region.getVertices():
            ll = sphgeom.LonLat(v)
            verts.append((ll.getLon().asDegrees() % 360.0, ll.getLat().asDegrees()))
        return Polygon(tuple(verts))
    if isinstance(region, sphgeom.Box):
        lon, lat = region.getLon(), region.getLat()
        if lon.isFull():
            ra_min, ra_max = 0.0, 360.0
        else:
            ra_min, ra_max = lon.getA().asDegrees() % 360.0, lon.getB().asDegrees() % 360.0
        return Box(ra_min, ra_max, lat.getA().asDegrees(), lat.getB().asDegrees())
    raise ConfigError(f"unsupported lsst.sphgeom region type {type(region).__name__}")
