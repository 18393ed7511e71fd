"""Every region gives exactly the brute-force rows, or a diadb.Error (issue "Never a wrong
answer", class 6).

The brute force here is independent of diadb.sky: separations by atan2 of cross and dot
products, polygon sides by determinants. Regions are random circles of every radius from 1e-6
to 180 deg, boxes (through ra = 0 and the poles) and convex polygons; the points are random
over the sky, near the region and on its edge. Checked: the pixel cover holds every point the
region holds, the exact test agrees with the brute force away from the edge (within 1e-9 of
it, rounding may go either way), and a read of an embedded SQLite APDB returns exactly the
brute-force rows. Seeded (``derandomize=True``), so CI sees the same examples every run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import diadb
from diadb.errors import ConfigError, Error
from diadb.sky import Box, Circle, Polygon, Region, as_region, cover, parse_region, radec_to_healpix29
from diadb.sky.healpix import in_ranges
from tests.helpers import make_visit

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Points this close to a region's edge (degrees, relative above 1 deg) may go either way.
EDGE_TOL = 1e-9


# ---- brute force ---------------------------------------------------------------------------
def _xyz(ra, dec) -> np.ndarray:
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra = np.degrees(np.arctan2(v[..., 1], v[..., 0])) % 360.0
    dec = np.degrees(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    return ra, np.clip(dec, -90.0, 90.0)


def _sep(p: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(p, c), axis=-1), p @ c))


def brute_force(region: Region, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside, near the edge) of each point, computed without diadb.sky."""
    p = _xyz(ra, dec)
    if isinstance(region, Circle):
        d = _sep(p, _xyz(region.ra_deg, region.dec_deg))
        return d <= region.radius_deg, np.abs(d - region.radius_deg) <= EDGE_TOL * max(1.0, region.radius_deg)
    if isinstance(region, Box):
        ra_in = (
            (ra >= region.ra_min_deg) & (ra <= region.ra_max_deg)
            if region.ra_min_deg <= region.ra_max_deg
            else (ra >= region.ra_min_deg) | (ra <= region.ra_max_deg)
        )
        inside = ra_in & (dec >= region.dec_min_deg) & (dec <= region.dec_max_deg)
        return inside, np.zeros(len(ra), dtype=bool)  # the box test compares the stored values
    assert isinstance(region, Polygon)
    v = _xyz(*np.asarray(region.vertices).T)
    k = len(v)
    # The sign of det(v_i, v_i+1, p) tells the side of edge i; the centroid is inside.
    inner = np.sign(np.linalg.det(np.stack([v, np.roll(v, -1, axis=0), np.tile(v.sum(0), (k, 1))], axis=1)))
    mats = np.stack(
        [np.broadcast_to(v, (len(p), k, 3)), np.broadcast_to(np.roll(v, -1, axis=0), (len(p), k, 3))], axis=2
    )
    sides = np.linalg.det(
        np.concatenate([mats, np.broadcast_to(p[:, None, None, :], (len(p), k, 1, 3))], axis=2)
    )
    edge_len = np.linalg.norm(np.cross(v, np.roll(v, -1, axis=0)), axis=1)
    signed = np.degrees(np.arcsin(np.clip(sides * inner / edge_len, -1, 1)))
    # Unit vectors carry ~1e-16 of rounding, so an edge of length s (radians) is only placed to
    # ~1e-16 / s: a few micro-arcseconds for the smallest polygons here.
    tol = EDGE_TOL + 1e-14 / edge_len.min()
    near = np.any(np.abs(signed) <= tol, axis=1) & np.all(signed >= -tol, axis=1)
    return np.all(signed >= 0, axis=1), near


def probe_points(region: Region, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points over the sky, near the region and on its edge (either side)."""
    rng = np.random.default_rng(seed)
    ra = [rng.uniform(0, 360, 3000)]
    dec = [np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))]
    if isinstance(region, Circle):
        centre, size = _xyz(region.ra_deg, region.dec_deg), region.radius_deg
        edge = _ring(centre, region.radius_deg * (1 + rng.uniform(-1e-6, 1e-6, 1500)), rng)
    elif isinstance(region, Box):
        lo, w = region.ra_min_deg, region._ra_width()
        d0, d1 = region.dec_min_deg, region.dec_max_deg
        ra += [
            (lo + rng.uniform(0, w, 1500)) % 360.0,
            rng.choice([region.ra_min_deg, region.ra_max_deg % 360], 500),
        ]
        dec += [rng.choice([d0, d1], 1500), rng.uniform(d0, d1, 500)]
        mid = _xyz((lo + w / 2) % 360, (d0 + d1) / 2)
        centre, size = mid, max(region.size_deg(), d1 - d0)
        edge = _xyz(ra[-1], dec[-1])
    else:
        assert isinstance(region, Polygon)
        v = _xyz(*np.asarray(region.vertices).T)
        centre = v.sum(0) / np.linalg.norm(v.sum(0))
        size = float(_sep(v, centre).max())
        j, t = rng.integers(0, len(v), 1500), rng.random(1500)[:, None]
        edge = v[j] * (1 - t) + np.roll(v, -1, axis=0)[j] * t
        edge /= np.linalg.norm(edge, axis=1, keepdims=True)
    near = _ring(centre, np.minimum(size * 1.5 * rng.random(3000), 180.0), rng)
    e_ra, e_dec = _radec(edge)
    n_ra, n_dec = _radec(near)
    return np.concatenate([*ra, e_ra, n_ra]), np.concatenate([*dec, e_dec, n_dec])


def _ring(centre: np.ndarray, angle_deg, rng: np.random.Generator) -> np.ndarray:
    """Points at ``angle_deg`` from ``centre`` in random directions."""
    angle = np.radians(np.minimum(np.asarray(angle_deg, float), 180.0))
    t = rng.normal(size=(angle.size, 3))
    t -= (t @ centre)[:, None] * centre
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return np.cos(angle)[:, None] * centre + np.sin(angle)[:, None] * t


# ---- strategies ------------------------------------------------------------------------------
ras = st.one_of(st.floats(0.0, 360.0, exclude_max=True), st.sampled_from([0.0, 90.0, 270.0, 359.9999999]))
decs = st.one_of(st.floats(-90.0, 90.0), st.sampled_from([-90.0, 90.0, 0.0, 89.9999, -89.99]))
radii = st.one_of(
    st.floats(-6.0, math.log10(180.0)).map(lambda x: min(10.0**x, 180.0)),
    st.sampled_from([1e-6, 4e-6, 1.75, 90.0, 90.5, 135.0, 136.0, 150.0, 179.999, 180.0]),
)
circles = st.builds(Circle, ras, decs, radii)


@st.composite
def boxes(draw: st.DrawFn) -> Box:
    ra_min = draw(ras)
    width = draw(st.one_of(st.floats(-5.0, math.log10(360.0)).map(lambda x: 10.0**x), st.just(360.0)))
    ra_max = 360.0 if width >= 360.0 else (ra_min + width) % 360.0
    dec_min = draw(st.one_of(st.floats(-90.0, 89.9), st.just(-90.0)))
    height = draw(st.floats(-5.0, math.log10(180.0)).map(lambda x: 10.0**x))
    dec_max = draw(st.one_of(st.just(min(dec_min + height, 90.0)), st.just(90.0)))
    assume(dec_max > dec_min)
    return Box(ra_min, ra_max, dec_min, dec_max)


@st.composite
def polygons(draw: st.DrawFn, ra: float | None = None, dec: float | None = None) -> Polygon:
    centre = _xyz(draw(ras) if ra is None else ra, draw(decs) if dec is None else dec)
    radius = math.radians(draw(st.floats(-5.0, math.log10(89.0)).map(lambda x: 10.0**x)))
    k = draw(st.integers(3, 8))
    # Vertices on a small circle, every gap between them under 180 deg: a convex polygon.
    gaps = np.asarray(draw(st.lists(st.floats(0.6, 1.0), min_size=k, max_size=k)))
    angles = np.cumsum(gaps / gaps.sum() * 2 * math.pi) + draw(st.floats(0.0, 6.3))
    e = np.cross(centre, [0.0, 0.0, 1.0]) if abs(centre[2]) < 0.999 else np.array([1.0, 0.0, 0.0])
    e /= np.linalg.norm(e)
    f = np.cross(centre, e)
    v = math.cos(radius) * centre + math.sin(radius) * (
        np.cos(angles)[:, None] * e + np.sin(angles)[:, None] * f
    )
    vra, vdec = _radec(v)
    try:
        return Polygon(tuple(zip(vra.tolist(), vdec.tolist(), strict=True)))
    except ConfigError:  # vertices too close for float64 to tell the edges apart
        assume(False)
        raise


regions = st.one_of(circles, boxes(), polygons())


# ---- the cover and the exact test -------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(region=regions, seed=st.integers(0, 2**16))
def test_cover_holds_every_point_inside_and_the_exact_test_is_the_brute_force(region, seed):
    ra, dec = probe_points(region, seed)
    ranges = region.pixel_ranges()
    assert ranges.dtype == np.int64 and ranges.ndim == 2
    assert np.all(ranges[:, 0] < ranges[:, 1]) and np.all(ranges[1:, 0] > ranges[:-1, 1])
    inside = region.contains(ra, dec)
    expected, edge = brute_force(region, ra, dec)
    wrong = (inside != expected) & ~edge
    assert not wrong.any(), (
        f"{int(wrong.sum())} points judged wrongly, e.g. {ra[wrong][:3]}, {dec[wrong][:3]}"
    )
    covered = in_ranges(radec_to_healpix29(ra, dec), ranges)
    missed = (inside | expected) & ~covered
    assert not missed.any(), f"the cover misses {int(missed.sum())} of {int(inside.sum())} points inside"


# ---- end to end, on SQLite ------------------------------------------------------------------------
ANCHORS = [(55.0, -30.0), (0.0, 0.0), (10.0, 90.0), (200.0, -90.0), (270.0, 60.3), (359.99, 45.0)]


@pytest.fixture(scope="module")
def sky_db(tmp_path_factory, official_schema):
    """Objects over the whole sky, plus clusters around a few anchors at every scale from
    1e-7 deg to 30 deg, so circles of every radius there have rows on both sides of their edge."""
    rng = np.random.default_rng(16)
    ra = [rng.uniform(0, 360, 16000)]
    dec = [np.degrees(np.arcsin(rng.uniform(-1, 1, 16000)))]
    for a_ra, a_dec in ANCHORS:
        v = _ring(_xyz(a_ra, a_dec), 10.0 ** rng.uniform(-7, 1.5, 2500), rng)
        r, d = _radec(v)
        ra.append(r)
        dec.append(d)
    ra_all, dec_all = np.concatenate(ra), np.concatenate(dec)
    db = diadb.Apdb.create(str(tmp_path_factory.mktemp("fuzz") / "sky.db"), schema=official_schema)
    n = len(ra_all)
    v = make_visit(official_schema, 1, 60000.0, np.arange(1, n + 1), ra_all, dec_all)
    assert db.store(v.mjd, v.objects, v.sources, None, visit=1, detector=0)
    yield db, ra_all, dec_all
    db.close()


@st.composite
def anchored(draw: st.DrawFn) -> Region:
    """Regions placed at the anchors (or anywhere), at every scale."""
    a_ra, a_dec = draw(st.sampled_from(ANCHORS))
    offset = draw(st.floats(-7.0, 0.5).map(lambda x: 10.0**x))
    ra0 = (a_ra + draw(st.floats(-1.0, 1.0)) * offset) % 360.0
    dec0 = float(np.clip(a_dec + draw(st.floats(-1.0, 1.0)) * offset, -90.0, 90.0))
    kind = draw(st.sampled_from(["circle", "circle", "box", "polygon", "any"]))
    if kind == "circle":
        return Circle(ra0, dec0, draw(radii))
    if kind == "box":
        half = draw(st.floats(-6.0, 1.5).map(lambda x: 10.0**x))
        return Box(
            (ra0 - half) % 360.0, (ra0 + half) % 360.0, max(dec0 - half, -90.0), min(dec0 + half + 1e-9, 90.0)
        )
    if kind == "polygon":
        return draw(polygons(ra0, dec0))
    return draw(regions)


def _check_read(db: diadb.Apdb, ra: np.ndarray, dec: np.ndarray, region: Region) -> None:
    expected, edge = brute_force(region, ra, dec)
    must = set((np.flatnonzero(expected & ~edge) + 1).tolist())
    may = set((np.flatnonzero(expected | edge) + 1).tolist())
    for got in (
        db.get_objects(region, columns=["diaObjectId"]).column(0).to_pylist(),
        db.get_sources(region, 60000.0, columns=["diaObjectId"]).column(0).to_pylist(),
    ):
        assert len(got) == len(set(got))
        assert must <= set(got) <= may, (len(must - set(got)), len(set(got) - may))


@settings(FUZZ, max_examples=80)
@given(region=anchored())
def test_read_returns_exactly_the_brute_force_rows(sky_db, region):
    db, ra, dec = sky_db
    _check_read(db, ra, dec, region)


def test_issue_reproductions_read_exactly(sky_db):
    """The regions of the issue: each used to lose rows or crash."""
    db, ra, dec = sky_db
    for region in [
        Circle(55.0, -30.0, 150.0),  # missed 1,497 of 31,407 rows
        Circle(0.0, 0.0, 179.9),
        Circle(225.627, 69.831, 20.398),  # over the pole: cdshealpix missed cells at ra = 270
        Circle(55.0, -30.0, 1e-6),  # cdshealpix panicked (a BaseException)
        Circle(55.0, -30.0, 3e-6),  # the dot-product test accepted points 10% beyond the edge
        Circle(10.0, 90.0, 1e-9),
        Polygon(((226.25, -15.88), (83.97, -65.36), (333.45, 38.69), (307.16, 42.17), (256.1, 22.89))),
        Polygon(tuple((a, 89.993) for a in (0.0, 72.0, 144.0, 216.0, 288.0))),  # around the pole
        Box(350.0, 10.0, -90.0, -80.0),
        Box(0.0, 360.0, 89.999999, 90.0),
    ]:
        _check_read(db, ra, dec, region)


# ---- arguments that are not regions -------------------------------------------------------------
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**20), 10**20),
    st.lists(st.floats(-400, 400), max_size=3),
)


@settings(FUZZ, max_examples=150)
@given(
    kind=st.sampled_from(["circle", "box", "polygon", "text", "as_region"]),
    args=st.lists(junk, min_size=1, max_size=5),
)
def test_bad_arguments_are_config_errors(kind, args):
    try:
        if kind == "circle":
            region: Region = Circle(*args[:3], *[1.0] * max(0, 3 - len(args)))
        elif kind == "box":
            region = Box(*args[:4], *[1.0] * max(0, 4 - len(args)))
        elif kind == "polygon":
            region = Polygon(args[0] if isinstance(args[0], list) else args)
        elif kind == "text":
            region = parse_region(" ".join(["circle", *map(str, args)]))
        else:
            region = as_region(args[0])
    except ConfigError:
        return
    except Error as e:  # pragma: no cover - any other diadb error would also be acceptable
        raise AssertionError(f"unexpected {type(e).__name__}") from e
    ranges = region.pixel_ranges()
    assert len(ranges) >= 0
    region.contains(np.array([0.0, 120.0]), np.array([0.0, -45.0]))


def test_specific_bad_arguments():
    for make in (
        lambda: Circle("55", -30, 1),
        lambda: Circle(55, None, 1),
        lambda: Circle(55, -30, True),
        lambda: Circle(55, -30, 0.0),
        lambda: Circle(55, -30, 180.5),
        lambda: Box(0, 10, "a", 5),
        lambda: Box(0, 10, 5, 5),
        lambda: Polygon(5),
        lambda: Polygon("polygon"),
        lambda: Polygon(((1, 2, 3), (4, 5, 6), (7, 8, 9))),
        lambda: Polygon(((0, 0), (1, 0))),
        lambda: parse_region("circle 55 -30 nan"),
        lambda: as_region(b"circle 1 2 3"),
        lambda: as_region((55, -30, 1)),
    ):
        with pytest.raises(ConfigError):
            make()
    # Sequences and arrays of vertices are accepted (and hashable, for the cover cache).
    square = np.array([(10.0, 10.0), (11.0, 10.0), (11.0, 11.0), (10.0, 11.0)])
    assert Polygon(square) == Polygon([tuple(v) for v in square.tolist()])
    assert len(Polygon(square).pixel_ranges()) > 0


def test_sphgeom_edge_cases():
    sphgeom = pytest.importorskip("lsst.sphgeom")
    x = sphgeom.UnitVector3d(1.0, 0.0, 0.0)
    for bad in (sphgeom.Circle.empty(), sphgeom.Circle(x), sphgeom.Box.empty()):
        with pytest.raises(ConfigError):
            as_region(bad).pixel_ranges()
    tiny = as_region(sphgeom.Circle(x, sphgeom.Angle.fromDegrees(1e-9)))
    assert isinstance(tiny, Circle) and len(tiny.pixel_ranges()) > 0
    assert as_region(sphgeom.Circle.full()).pixel_ranges().tolist() == [[0, 12 * 4**29]]


# ---- the HEALPix geometry the covers are built on -------------------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 3, 8, 17, 27, 29])
def test_cell_geometry_matches_cdshealpix(depth):
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix import nested

    rng = np.random.default_rng(depth)
    n = min(12 * 4**depth, 3000)
    ipix = np.arange(n, dtype=np.int64) if n == 12 * 4**depth else rng.integers(0, 12 * 4**depth, n)
    centres, _ = cover.cell_caps(ipix, depth)
    lon, lat = nested.healpix_to_lonlat(ipix.astype(np.uint64), depth)
    assert cover.angle_deg(centres, _xyz(lon.deg, lat.deg)).max() < 1e-11
    # Random points of each cell (by cdshealpix's own pixel of them) lie within its reach.
    pra, pdec = rng.uniform(0, 360, 50000), np.degrees(np.arcsin(rng.uniform(-1, 1, 50000)))
    pix = np.asarray(
        nested.lonlat_to_healpix(Longitude(pra, unit="deg"), Latitude(pdec, unit="deg"), depth), np.int64
    )
    c, r = cover.cell_caps(pix, depth)
    assert np.all(cover.angle_deg(_xyz(pra, pdec), c) <= r)


# ---- the inner part of a cover ----------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(region=regions, seed=st.integers(0, 2**16))
def test_inner_ranges_hold_only_points_inside(region, seed):
    """Reads skip the exact test for rows whose pixel lies in an inner range, so every point
    there must be inside: the probe points (the edge included) and the centres of random
    order-29 pixels drawn from the inner ranges themselves."""
    from cdshealpix import nested

    ranges, inner = region.pixel_ranges(), region.inner_ranges()
    assert inner.dtype == np.int64 and inner.ndim == 2
    if not len(inner):
        return
    assert np.all(inner[:, 0] < inner[:, 1]) and np.all(in_ranges(inner[:, 0], ranges))
    assert np.all(in_ranges(inner[:, 1] - 1, ranges))
    ra, dec = probe_points(region, seed)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(inner), 2000)
    pixels = inner[pick, 0] + (rng.random(2000) * (inner[pick, 1] - inner[pick, 0])).astype(np.int64)
    lon, lat = nested.healpix_to_lonlat(pixels.astype(np.uint64), 29)
    ra = np.concatenate([ra, np.asarray(lon.deg, float) % 360.0])
    dec = np.concatenate([dec, np.asarray(lat.deg, float)])
    in_inner = in_ranges(radec_to_healpix29(ra, dec), inner)
    assert in_inner.sum() > 0
    outside = in_inner & ~region.contains(ra, dec)
    assert not outside.any(), f"{int(outside.sum())} points of inner cells outside, e.g. {ra[outside][:3]}"
    expected, edge = brute_force(region, ra, dec)
    assert not (in_inner & ~expected & ~edge).any()


def test_tiny_circles_have_no_inner_part():
    """Below the smallest cover radius a circle is covered as a larger one: none of it is inner."""
    assert len(Circle(55.0, -30.0, 1e-8).inner_ranges()) == 0
    assert len(Circle(55.0, -30.0, 1.75).inner_ranges()) > 0
