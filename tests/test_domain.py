"""Values outside their domain are refused (issue "Never a wrong answer", class 2).

Each test reproduces a store that used to be accepted (and then dropped rows, credited them to
the wrong visit, or stored what cannot be read back); now it raises and writes nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diadb
from diadb.errors import CatalogError, ConfigError
from diadb.schema import domain
from diadb.schema.model import ColumnSpec, TableSpec
from diadb.schema.validate import validate_catalog
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)
N = 12


@pytest.fixture
def visit(official_schema):
    ra, dec = random_positions(N, 21)
    return make_visit(official_schema, 1, 60000.0, np.arange(1, N + 1), ra, dec, detector=4)


def _replace(t: pa.Table, name: str, values) -> pa.Table:
    arr = values if isinstance(values, pa.Array) else pa.array(values)
    return t.set_column(t.schema.get_field_index(name), name, arr)


def _column(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False).copy()


def _nothing_written(db: diadb.Apdb) -> None:
    assert db.get_objects(EVERYWHERE).num_rows == 0
    assert db.get_sources(EVERYWHERE, 70000.0, months=1000).num_rows == 0
    assert db.get_forced_sources(EVERYWHERE, 70000.0, months=1000).num_rows == 0
    for v in (0, 1, 2):
        assert not db.contains_visit_detector(v)


def _refused(db, v, error, match, *, objects=None, sources=None, forced=None, **kwargs):
    args = {"visit": 1, "detector": 4, **kwargs}
    with pytest.raises(error, match=match) as info:
        db.store(
            args.pop("visit_time", v.mjd),
            v.objects if objects is None else objects,
            v.sources if sources is None else sources,
            v.forced if forced is None else forced,
            **args,
        )
    _nothing_written(db)
    return info.value


# ---- store() arguments ----------------------------------------------------------------
def test_absurd_visit_time_is_refused(apdb, visit):
    # 1e300 used to be stored: compaction then moved everything, prune deleted all history.
    for when in (1e300, -1e300, 0.0, 1.0, 33281.9, 88069.1, 1e6):
        _refused(apdb, visit, ConfigError, r"visit_time must lie in \[33282, 88069\] MJD", visit_time=when)
    assert domain.check_visit_time(domain.MJD_MIN) == domain.MJD_MIN
    assert domain.check_visit_time(domain.MJD_MAX) == domain.MJD_MAX


def test_visit_and_detector_must_be_integers_in_range(apdb, visit):
    # visit=1.5 and visit=True were truncated to visit 1.
    for bad in (1.5, True, np.True_, "1", None, 1 + 1e-9, float("nan"), float("inf"), -1, 2**63):
        _refused(apdb, visit, ConfigError, r"^visit must be", visit=bad)
    for bad in (4.5, True, "4", 70000, 2**31, -5, np.int64(-2)):
        _refused(apdb, visit, ConfigError, r"^detector must be", detector=bad)
    # -1 is diadb's internal "whole visit": the public way is detector=None.
    _refused(apdb, visit, ConfigError, r"detector=None for the whole visit", detector=-1)
    _refused(apdb, visit, ConfigError, r"detector=None for the whole visit", detector=np.int16(-1))
    # numpy integers and integral floats are integers.
    assert apdb.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=np.int64(1), detector=4.0)
    assert apdb.contains_visit_detector(1, 4)
    w = make_visit(apdb.schema, 2, 60001.0, np.arange(1, N + 1), *random_positions(N, 21), detector=5)
    assert apdb.store(w.mjd, w.objects, w.sources, w.forced, visit=2.0, detector=np.int16(5))
    assert apdb.contains_visit_detector(2, 5)


def test_rows_must_belong_to_the_store(apdb, visit):
    # Rows of another visit/detector were stored and credited to this store's change-log chunk.
    sources = _replace(visit.sources, "visit", np.where(np.arange(N) == 3, 2, 1))
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaSource.visit: rows of visit \[2\] in a store of visit=1",
        sources=sources,
    )
    assert err.rows == [3]
    forced = _replace(visit.forced, "detector", np.where(np.arange(N) >= 10, 5, 4).astype(np.int16))
    err = _refused(
        apdb, visit, CatalogError, r"DiaForcedSource.detector: rows of detector \[5\]", forced=forced
    )
    assert err.rows == [10, 11]
    # A whole-visit store takes any detector, but still only its own visit.
    whole = _replace(visit.sources, "visit", np.full(N, 2))
    _refused(apdb, visit, CatalogError, r"DiaSource.visit", sources=whole, detector=None)
    many = _replace(visit.sources, "detector", (np.arange(N) % 3).astype(np.int16))
    assert apdb.store(visit.mjd, visit.objects, many, visit.forced, visit=1)
    assert apdb.contains_visit_detector(1, 2)


def test_keyed_stores_negative_visits_and_mixed_rows(apdb, visit):
    # The lsst.dax.apdb facade records reference stores without source rows this way.
    assert apdb.store(visit.mjd, visit.objects, visit=-12345, key="objects only")
    with pytest.raises(ConfigError, match=r"^visit must be in \[0, "):
        apdb.store(visit.mjd + 1, visit.objects, visit=-12345)
    with pytest.raises(CatalogError, match=r"DiaSource.visit: rows of visit \[1\] in a store of visit=-7"):
        apdb.store(visit.mjd + 1, visit.objects, visit.sources, visit=-7, detector=4, key="with rows")
    # A keyed whole-visit store lists its rows by key: it may mix visits, as reference stores do.
    mixed = _replace(visit.forced, "visit", np.full(N, 3))
    assert apdb.store(visit.mjd + 1, visit.objects, visit.sources, mixed, visit=1, key="mixed")
    assert (
        apdb.get_forced_sources(EVERYWHERE, visit.mjd + 1, columns=["visit"]).column(0).to_pylist() == [3] * N
    )
    with pytest.raises(CatalogError, match=r"DiaForcedSource.visit"):
        apdb.store(
            visit.mjd + 1, visit.objects, visit.sources, mixed, visit=1, detector=4, key="per detector"
        )


def test_forced_sources_of_unknown_objects_are_refused(apdb, visit, official_schema):
    ids = _column(visit.forced, "diaObjectId")
    ids[[2, 7]] = [999_999, 888_888]
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaForcedSource.diaObjectId: refers to DiaObjects neither in this store nor in the database: "
        r"\[888888, 999999\]",
        forced=_replace(visit.forced, "diaObjectId", ids),
    )
    assert err.rows == [2, 7]
    # Objects stored before are valid references, checked together with the DiaSources'.
    assert apdb.store(visit.mjd, visit.objects, None, None, visit=1, detector=4)
    v2 = make_visit(official_schema, 2, 60001.0, np.arange(1, N + 1), *random_positions(N, 21), detector=4)
    assert apdb.store(v2.mjd, v2.objects.slice(0, 0), v2.sources, v2.forced, visit=2, detector=4)
    assert apdb.get_forced_sources(EVERYWHERE, 60001.0).num_rows == N


# ---- catalog values -----------------------------------------------------------------------
def test_time_columns_are_in_the_window(apdb, visit):
    cases = [
        ("sources", "midpointMjdTai", 1e300),
        ("sources", "ssObjectReassocTimeMjdTai", 0.0),
        ("sources", "timeWithdrawnMjdTai", 1e6),
        ("sources", "timeProcessedMjdTai", -5.0),
        ("forced", "midpointMjdTai", np.nan),
        ("forced", "timeWithdrawnMjdTai", 33281.0),
        ("objects", "validityStartMjdTai", 1.0),
        ("objects", "firstDiaSourceMjdTai", 1e300),
        ("objects", "lastDiaSourceMjdTai", 88070.0),
    ]
    tables = {"sources": ("DiaSource", visit.sources), "forced": ("DiaForcedSource", visit.forced)}
    tables["objects"] = ("DiaObject", visit.objects)
    for which, column, value in cases:
        table_name, table = tables[which]
        values = np.full(N, 60000.5)
        values[[1, 5]] = value
        problem = "NaN time" if np.isnan(value) else r"time outside \[33282, 88069\] MJD"
        err = _refused(
            apdb,
            visit,
            CatalogError,
            rf"{table_name}.{column}: {problem}",
            **{which: _replace(table, column, values)},
        )
        assert err.rows == [1, 5]
    # Null is allowed where the column is nullable; the window's edges are inside.
    edges = _replace(
        visit.sources, "timeWithdrawnMjdTai", pa.array([None, domain.MJD_MIN] * (N // 2), pa.float64())
    )
    assert apdb.store(visit.mjd, visit.objects, edges, visit.forced, visit=1, detector=4)


def test_every_mjd_column_of_the_schema_is_a_time_column(official_schema):
    # Derived from the Felis schema, not listed: every *MjdTai column of every table.
    for spec in official_schema.tables.values():
        mjd = {c.name for c in spec.columns if c.name.endswith("MjdTai")}
        assert mjd <= set(domain._roles(spec).times), spec.name
    assert set(domain._roles(official_schema.table("DiaSource")).times) >= {
        "midpointMjdTai",
        "ssObjectReassocTimeMjdTai",
        "timeWithdrawnMjdTai",
    }


def test_timestamp_columns_are_in_the_window():
    spec = TableSpec(
        "T", (ColumnSpec("id", "long", False), ColumnSpec("at", "timestamp", True)), primary_key=("id",)
    )
    ok = pa.table({"id": [1, 2], "at": pa.array([0, None], pa.int64()).cast(pa.timestamp("us", tz="UTC"))})
    validate_catalog(spec, ok)  # 1970 and null
    year_2200 = 7_258_118_400_000_000
    bad = pa.table({"id": [1, 2], "at": pa.array([0, year_2200], pa.timestamp("us", tz="UTC"))})
    with pytest.raises(CatalogError, match=r"T.at: time outside") as info:
        validate_catalog(spec, bad)
    assert info.value.rows == [1]


def test_keys_are_non_negative_integers(apdb, visit):
    ids = _column(visit.objects, "diaObjectId")
    ids[4] = -1
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaObject.diaObjectId: key value out of range",
        objects=_replace(visit.objects, "diaObjectId", ids),
    )
    assert err.rows == [4]
    for table, column in [
        ("sources", "diaSourceId"),
        ("sources", "parentDiaSourceId"),
        ("forced", "diaForcedSourceId"),
    ]:
        data = visit.sources if table == "sources" else visit.forced
        values = _column(data, column)
        values[0] = -9
        _refused(
            apdb,
            visit,
            CatalogError,
            rf"{column}: key value out of range",
            **{table: _replace(data, column, values)},
        )
    # Ids given as floats: integral only (0.5 was refused before), and exact (above 2**53 a
    # float is not the integer it claims to be).
    big = _column(visit.sources, "diaSourceId").astype(np.float64)
    big[6] = 2.0**60
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaSource.diaSourceId: floats beyond \+-2\*\*53",
        sources=_replace(visit.sources, "diaSourceId", big),
    )
    assert err.rows == [6]
    fractional = _column(visit.sources, "diaSourceId") + 0.5
    _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaSource.diaSourceId",
        sources=_replace(visit.sources, "diaSourceId", fractional),
    )


def test_felis_lengths_and_utf8_are_enforced(apdb, visit):
    band = visit.sources.column("band").to_pylist()
    band[3] = "gg"
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaSource.band: longer than the schema's length of 1",
        sources=_replace(visit.sources, "band", band),
    )
    assert err.rows == [3]
    version = ["v1.2.3"] * N
    version[9] = "v1.2.3-rc1"  # 10 characters in a Felis length of 7
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaSource.reliabilityVersion: longer than",
        sources=_replace(visit.sources, "reliabilityVersion", version),
    )
    assert err.rows == [9]
    # Length counts characters, not bytes: one non-ASCII character fits a length of 1.
    wide = visit.forced.column("band").to_pylist()
    wide[0] = "\u00e9"
    ok_forced = _replace(visit.forced, "band", wide)
    # Invalid UTF-8 used to be stored (its reads then failed).
    raw = [b"g"] * N
    raw[2], raw[5] = b"\xff", b"\xc3"
    invalid = pa.array(raw, pa.binary()).view(pa.string())
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaForcedSource.band: invalid UTF-8",
        forced=_replace(visit.forced, "band", invalid),
    )
    assert err.rows == [2, 5]
    # pandas text that is not UTF-8-encodable is named, not a raw UnicodeEncodeError.
    frame = visit.sources.to_pandas()
    frame["band"] = pd.Series(["g", "\udcff", *["r"] * (N - 2)], dtype=object)
    _refused(apdb, visit, CatalogError, r"DiaSource.band: cannot be converted to Arrow", sources=frame)
    assert apdb.store(visit.mjd, visit.objects, visit.sources, ok_forced, visit=1, detector=4)
    got = apdb.get_forced_sources(EVERYWHERE, visit.mjd, columns=["band"]).column("band").to_pylist()
    assert "\u00e9" in got


def test_finite_floats_must_not_overflow_float32(apdb, visit):
    flux = _column(visit.sources, "psfFlux").astype(np.float64)
    flux[[4, 8]] = [1e300, -3.5e38]
    err = _refused(
        apdb,
        visit,
        CatalogError,
        r"DiaSource.psfFlux: finite values overflow Felis float",
        sources=_replace(visit.sources, "psfFlux", flux),
    )
    assert err.rows == [4, 8]
    # NaN and an explicit infinity are the caller's values, kept; the float32 limit fits.
    kept = _column(visit.sources, "psfFlux").astype(np.float64)
    kept[[0, 1, 2]] = [np.nan, np.inf, float(np.finfo(np.float32).max)]
    assert apdb.store(
        visit.mjd, visit.objects, _replace(visit.sources, "psfFlux", kept), visit.forced, visit=1, detector=4
    )


def test_pandas_catalogs_get_the_same_rules(apdb, visit):
    frame = visit.sources.to_pandas()
    frame["midpointMjdTai"] = 1e300
    _refused(apdb, visit, CatalogError, r"DiaSource.midpointMjdTai: time outside", sources=frame)
    frame = visit.forced.to_pandas()
    frame["visit"] = pd.array([1] * (N - 1) + [3], dtype="int64")
    err = _refused(apdb, visit, CatalogError, r"DiaForcedSource.visit: rows of visit \[3\]", forced=frame)
    assert err.rows == [N - 1]


# ---- fuzz: random catalogs with one out-of-domain value ----------------------------------------
@pytest.fixture(scope="module")
def fuzz_db(tmp_path_factory, official_schema):
    db = diadb.Apdb.create(str(tmp_path_factory.mktemp("domain") / "fuzz.db"), schema=official_schema)
    yield db
    db.close()


def _defects(schema) -> st.SearchStrategy:
    """(catalog, column, bad value): one rule, then one of the columns it applies to."""
    outside_window = st.one_of(
        st.floats(domain.MJD_MAX, 1e308, exclude_min=True),
        st.floats(-1e308, domain.MJD_MIN, exclude_max=True),
        st.just(float("nan")),
    )
    overflow = st.floats(3.5e38, 1e308).flatmap(lambda v: st.sampled_from([v, -v]))
    times, keys, floats, texts = [], [], [], []
    for which, table in (("objects", "DiaObject"), ("sources", "DiaSource"), ("forced", "DiaForcedSource")):
        spec = schema.table(table)
        roles = domain._roles(spec)
        times += [(which, name) for name in roles.times]
        keys += [(which, name) for name, _ in roles.keys]
        floats += [(which, c.name) for c in spec.columns if c.datatype == "float"]
        texts += [(which, name, length) for name, length in roles.lengths]
    return st.one_of(
        st.tuples(st.sampled_from(times), outside_window).map(lambda t: (*t[0], t[1])),
        st.tuples(st.sampled_from(keys), st.integers(-(2**15), -1)).map(lambda t: (*t[0], t[1])),
        st.tuples(st.sampled_from(floats), overflow).map(lambda t: (*t[0], t[1])),
        st.sampled_from(texts).flatmap(
            lambda t: st.text("abc\u00e9", min_size=t[2] + 1, max_size=9).map(lambda x: (t[0], t[1], x))
        ),
        # Rows of another visit or detector; forced sources of objects nowhere (distinct ids).
        st.tuples(st.sampled_from(["sources", "forced"]), st.just("visit"), st.integers(2, 2**62)),
        st.tuples(st.sampled_from(["sources", "forced"]), st.just("detector"), st.integers(5, 200)),
        st.tuples(st.just("forced"), st.just("diaObjectId"), st.integers(10**6, 2**62)),
    )


@settings(
    derandomize=True, deadline=None, database=None, max_examples=120, suppress_health_check=list(HealthCheck)
)
@given(data=st.data())
def test_fuzz_out_of_domain_values_are_refused_and_nothing_is_stored(fuzz_db, official_schema, data):
    ra, dec = random_positions(N, 5)
    v = make_visit(official_schema, 1, 60000.0, np.arange(1, N + 1), ra, dec, detector=4)
    which, column, value = data.draw(_defects(official_schema))
    rows = sorted(data.draw(st.sets(st.integers(0, N - 1), min_size=1, max_size=4)))
    tables = {"objects": v.objects, "sources": v.sources, "forced": v.forced}
    table = tables[which]
    values = table.column(column).to_pylist()
    for i in rows:
        values[i] = value + i if (which, column) == ("forced", "diaObjectId") and value > 0 else value
    tables[which] = _replace(
        table, column, pa.array(values, table.schema.field(column).type if isinstance(value, str) else None)
    )
    name = {"objects": "DiaObject", "sources": "DiaSource", "forced": "DiaForcedSource"}[which]
    with pytest.raises(CatalogError) as info:
        fuzz_db.store(v.mjd, tables["objects"], tables["sources"], tables["forced"], visit=1, detector=4)
    err = info.value
    assert (err.table, err.column) == (name, column), str(err)
    assert err.rows == rows, str(err)
    _nothing_written(fuzz_db)
