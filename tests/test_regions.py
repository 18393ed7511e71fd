"""Region covers and exact queries, checked against brute force on random skies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diadb
from diadb.errors import ConfigError
from diadb.sky import Box, Circle, Polygon, as_region, parse_region, radec_to_healpix29
from diadb.sky.healpix import merge_ranges, split_ranges
from tests.helpers import make_visit

ra_st = st.floats(0.0, 359.999)
dec_st = st.floats(-89.0, 89.0)

circles = st.builds(Circle, ra_st, dec_st, st.floats(0.01, 20.0))
boxes = st.builds(
    lambda ra0, w, dec0, h: Box(ra0, (ra0 + w) % 360.0, dec0, min(dec0 + h, 90.0)),
    ra_st,
    st.floats(0.01, 300.0),
    st.floats(-90.0, 89.0),
    st.floats(0.01, 30.0),
)
polygons = st.builds(
    lambda ra0, dec0, r, rot: Polygon(tuple(_offset(ra0, dec0, r, rot + k * 360.0 / 5) for k in range(5))),
    ra_st,
    st.floats(-80.0, 80.0),
    st.floats(0.05, 5.0),
    st.floats(0.0, 72.0),
)


def _offset(ra0: float, dec0: float, r: float, angle: float) -> tuple[float, float]:
    dec = dec0 + r * np.sin(np.radians(angle))
    ra = (ra0 + r * np.cos(np.radians(angle)) / np.cos(np.radians(dec0))) % 360.0
    return float(ra), float(dec)


def _sky(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))


def _covered(ranges: np.ndarray, pix: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(ranges[:, 0], pix, side="right") - 1
    return (idx >= 0) & (pix < ranges[np.maximum(idx, 0), 1])


@settings(max_examples=60, deadline=None)
@given(region=st.one_of(circles, boxes, polygons), seed=st.integers(0, 1000))
def test_cover_contains_every_point_inside(region, seed):
    ra, dec = _sky(20000, seed)
    # Concentrate half of the points near the region so small regions are tested too.
    near_ra, near_dec = ra.copy(), dec.copy()
    centre = region if isinstance(region, Circle) else None
    if centre is not None:
        rng = np.random.default_rng(seed)
        near_dec = np.clip(centre.dec_deg + rng.normal(0, centre.radius_deg, 20000), -90, 90)
        near_ra = (centre.ra_deg + rng.normal(0, centre.radius_deg, 20000)) % 360.0
    ra, dec = np.concatenate([ra, near_ra]), np.concatenate([dec, near_dec])
    ranges = region.pixel_ranges()
    assert np.all(ranges[:, 0] < ranges[:, 1]) and np.all(ranges[1:, 0] > ranges[:-1, 1])
    inside = region.contains(ra, dec)
    assert _covered(ranges, radec_to_healpix29(ra, dec))[inside].all()


def test_merge_ranges_joins_touching_and_overlapping():
    r = np.array([[10, 20], [0, 5], [5, 8], [15, 30], [40, 41]], dtype=np.int64)
    assert merge_ranges(r).tolist() == [[0, 8], [10, 30], [40, 41]]


def test_parse_and_bad_regions():
    assert parse_region("circle 55 -30 3") == Circle(55, -30, 3)
    assert parse_region("box 350 10 -5 5") == Box(350, 10, -5, 5)
    assert isinstance(parse_region("polygon 1 1 2 1 2 2"), Polygon)
    for text in ["circle 1 2", "ellipse 1 2 3", "circle a b c", ""]:
        with pytest.raises(ConfigError):
            parse_region(text)
    with pytest.raises(ConfigError, match="radius"):
        Circle(0, 0, -1)
    with pytest.raises(ConfigError, match="dec"):
        Circle(0, 95, 1)
    with pytest.raises(ConfigError, match="convex"):
        Polygon(((0, 0), (2, 0), (1, 0.2), (2, 2), (0, 2)))
    with pytest.raises(ConfigError, match="not a region"):
        as_region(42)


def test_sphgeom_regions_are_accepted():
    sphgeom = pytest.importorskip("lsst.sphgeom")
    centre = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(55, -30))
    c = as_region(sphgeom.Circle(centre, sphgeom.Angle.fromDegrees(1.0)))
    assert isinstance(c, Circle) and abs(c.radius_deg - 1.0) < 1e-9
    p = as_region(
        sphgeom.ConvexPolygon(
            [
                sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(a, b))
                for a, b in ((54, -31), (56, -31), (55, -29))
            ]
        )
    )
    assert p.contains([55.0], [-30.5])[0]
    b = as_region(sphgeom.Box.fromDegrees(10, -5, 20, 5))
    assert b == Box(10, 20, -5, 5)


@pytest.fixture(scope="module")
def sky_db(tmp_path_factory, official_schema):
    """One database with objects spread over a 20 x 20 deg patch, queried by many regions."""
    path = tmp_path_factory.mktemp("sky") / "sky.db"
    db = diadb.Apdb.create(str(path), schema=official_schema)
    rng = np.random.default_rng(7)
    n = 6000
    ra = rng.uniform(40, 60, n)
    dec = rng.uniform(-40, -20, n)
    v = make_visit(official_schema, 1, 60000.0, np.arange(1, n + 1), ra, dec)
    db.store(v.mjd, v.objects, v.sources, v.forced, visit=1, detector=0)
    yield db, ra, dec
    db.close()


near = st.one_of(
    st.builds(Circle, st.floats(40, 60), st.floats(-40, -20), st.floats(0.05, 6.0)),
    st.builds(
        lambda a, w, d, h: Box(a, a + w, d, d + h),
        st.floats(38, 60),
        st.floats(0.1, 10),
        st.floats(-42, -20),
        st.floats(0.1, 10),
    ),
    st.builds(
        lambda a, d, r: Polygon(tuple(_offset(a, d, r, k * 90.0 + 10) for k in range(4))),
        st.floats(42, 58),
        st.floats(-38, -22),
        st.floats(0.1, 3.0),
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(region=near)
def test_query_equals_brute_force(sky_db, region):
    db, ra, dec = sky_db
    expected = set((np.flatnonzero(region.contains(ra, dec)) + 1).tolist())
    got = db.get_objects(region, columns=["diaObjectId"]).column("diaObjectId").to_pylist()
    assert len(got) == len(set(got))
    assert set(got) == expected
    src = db.get_sources(region, 60001.0, columns=["diaObjectId"]).column("diaObjectId").to_pylist()
    assert set(src) == expected and len(src) == len(expected)


@settings(derandomize=True, database=None, max_examples=200)
@given(
    edges=st.lists(st.integers(0, 12 * 4**29), min_size=0, max_size=12, unique=True),
    n=st.integers(-1, 12 * 4**29),
)
def test_split_ranges_cuts_a_cover_into_two_that_make_it_whole(edges: list[int], n: int) -> None:
    """The head holds the first ``n`` pixels (or all), the tail the rest; both sorted and
    non-empty ranges; concatenated and merged they are the cover again."""
    e = sorted(edges)[: len(edges) // 2 * 2]
    ranges = np.array(e, dtype=np.int64).reshape(-1, 2)
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    head, tail = split_ranges(ranges, n)
    total = int((ranges[:, 1] - ranges[:, 0]).sum())
    assert int((head[:, 1] - head[:, 0]).sum()) == min(max(n, 0), total)
    for part in (head, tail):
        assert np.all(part[:, 1] > part[:, 0])
    if len(head) and len(tail):
        assert head[-1, 1] <= tail[0, 0]
    both = np.concatenate([head, tail]) if len(head) + len(tail) else ranges
    assert np.array_equal(merge_ranges(both), merge_ranges(ranges))
