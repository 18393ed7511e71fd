"""One test per class of bad input: a CatalogError naming table, column and rows; nothing written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import diadb
from diadb.errors import CatalogError
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)


@pytest.fixture
def visit(official_schema):
    ra, dec = random_positions(20, 11)
    return make_visit(official_schema, 1, 60000.0, np.arange(1, 21), ra, dec)


def _replace(t: pa.Table, name: str, values) -> pa.Table:
    arr = values if isinstance(values, pa.Array) else pa.array(values)
    return t.set_column(t.schema.get_field_index(name), name, arr)


def _assert_nothing_written(db: diadb.Apdb) -> None:
    assert db.get_objects(EVERYWHERE).num_rows == 0
    assert db.get_sources(EVERYWHERE, 70000.0).num_rows == 0
    assert db.get_forced_sources(EVERYWHERE, 70000.0).num_rows == 0
    assert not db.contains_visit_detector(1)


def _store_fails(db, v, *, objects=None, sources=None, forced=None, match: str) -> CatalogError:
    with pytest.raises(CatalogError, match=match) as info:
        db.store(
            v.mjd,
            objects if objects is not None else v.objects,
            sources if sources is not None else v.sources,
            forced if forced is not None else v.forced,
            visit=1,
        )
    _assert_nothing_written(db)
    return info.value


def test_unknown_column(apdb, visit):
    bad = visit.sources.append_column("colour", pa.array(np.zeros(20)))
    err = _store_fails(apdb, visit, sources=bad, match=r"DiaSource.colour: unknown column")
    assert (err.table, err.column) == ("DiaSource", "colour")


def test_missing_non_nullable_column(apdb, visit):
    bad = visit.forced.drop_columns(["midpointMjdTai"])
    _store_fails(apdb, visit, forced=bad, match=r"DiaForcedSource.midpointMjdTai: required")


def test_type_that_cannot_be_cast(apdb, visit):
    bad = _replace(visit.sources, "psfFlux", pa.array(["bright"] * 20))
    _store_fails(apdb, visit, sources=bad, match=r"DiaSource.psfFlux: type string cannot be stored as float")


def test_lossy_integer_cast_names_rows(apdb, visit):
    values = np.zeros(20, dtype=np.int64)
    values[[4, 7]] = 70000  # does not fit 'short'
    err = _store_fails(
        apdb,
        visit,
        sources=_replace(visit.sources, "detector", values),
        match=r"DiaSource.detector: values of type int64 do not fit short",
    )
    assert err.rows == [4, 7]
    fractional = np.arange(20, dtype=np.float64) + 0.5
    _store_fails(apdb, visit, sources=_replace(visit.sources, "visit", fractional), match=r"DiaSource.visit")


def test_null_in_non_nullable(apdb, visit):
    ra = pa.array([None if i == 3 else 55.0 for i in range(20)], pa.float64())
    err = _store_fails(
        apdb, visit, objects=_replace(visit.objects, "ra", ra), match=r"DiaObject.ra: 1 null value"
    )
    assert err.rows == [3]


def test_nan_and_out_of_range_positions(apdb, visit):
    dec = visit.sources.column("dec").to_numpy().copy()
    dec[5] = np.nan
    err = _store_fails(apdb, visit, sources=_replace(visit.sources, "dec", dec), match=r"DiaSource.dec: NaN")
    assert err.rows == [5]
    ra = visit.forced.column("ra").to_numpy().copy()
    ra[[2, 9]] = [361.0, -1.0]
    err = _store_fails(
        apdb, visit, forced=_replace(visit.forced, "ra", ra), match=r"DiaForcedSource.ra: value out of range"
    )
    assert err.rows == [2, 9]


def test_duplicate_primary_keys_in_batch(apdb, visit):
    ids = visit.sources.column("diaSourceId").to_numpy().copy()
    ids[8] = ids[2]
    err = _store_fails(
        apdb,
        visit,
        sources=_replace(visit.sources, "diaSourceId", ids),
        match=r"DiaSource.diaSourceId: duplicate",
    )
    assert err.rows == [8]
    det = visit.forced.column("diaObjectId").to_numpy().copy()
    det[6] = det[1]  # (diaObjectId, visit, detector) repeated
    err = _store_fails(
        apdb,
        visit,
        forced=_replace(visit.forced, "diaObjectId", det),
        match=r"DiaForcedSource.diaObjectId, visit, detector: duplicate",
    )
    assert err.rows == [6]


def test_source_with_unknown_object(apdb, visit, official_schema):
    ids = visit.sources.column("diaObjectId").to_numpy().copy()
    ids[[0, 13]] = [999_999, 888_888]
    err = _store_fails(
        apdb,
        visit,
        sources=_replace(visit.sources, "diaObjectId", ids),
        match=r"DiaSource.diaObjectId: refers to DiaObjects neither",
    )
    assert err.rows == [0, 13]
    # An object stored by an earlier visit is a valid reference.
    apdb.store(visit.mjd, visit.objects, None, None, visit=1)
    v2 = make_visit(official_schema, 2, 60001.0, np.arange(1, 21), *random_positions(20, 11))
    assert apdb.store(v2.mjd, v2.objects.slice(0, 0), v2.sources, None, visit=2)


def test_source_key_already_stored_by_another_visit(apdb, visit):
    apdb.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=1)
    again = _replace(visit.sources.slice(0, 3), "visit", np.full(3, 2))  # visit 2's rows, visit 1's keys
    with pytest.raises(CatalogError, match=r"DiaSource.diaSourceId: primary key already stored") as info:
        apdb.store(visit.mjd + 1, visit.objects.slice(0, 0), again, None, visit=2)
    assert info.value.rows == [0, 1, 2]
    assert not apdb.contains_visit_detector(2)


def test_a_keyed_store_reusing_another_keyed_stores_source_keys_is_refused(apdb, visit):
    """Keyed stores of one visit append; each owns its rows' keys (on Cassandra too, where rows
    record their store: a retry of the same key is told from another keyed store)."""
    assert apdb.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=1, key="first")
    with pytest.raises(CatalogError, match=r"DiaSource.diaSourceId: primary key already stored"):
        again = visit.sources.slice(0, 3)
        apdb.store(visit.mjd, visit.objects.slice(0, 0), again, None, visit=1, key="second")
    assert apdb.get_sources(EVERYWHERE, visit.mjd).num_rows == visit.sources.num_rows
    assert not apdb.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=1, key="first")


def test_pandas_input_and_validity_end_rules(apdb, visit):
    df = visit.sources.to_pandas()
    objs = visit.objects.drop_columns(["validityStartMjdTai"]).to_pandas()
    assert apdb.store(visit.mjd, objs, df, visit.forced.to_pandas(), visit=1)
    got = apdb.get_objects(EVERYWHERE, columns=["validityStartMjdTai"])
    assert set(got.column(0).to_pylist()) == {visit.mjd}
    bad = _replace(visit.objects, "validityEndMjdTai", np.full(20, visit.mjd + 1.0))
    with pytest.raises(CatalogError, match="validityEndMjdTai: must be null"):
        apdb.store(visit.mjd + 1, bad, visit=2)
    with pytest.raises(CatalogError, match=r"expected a pyarrow\.Table"):
        apdb.store(visit.mjd + 1, [1, 2, 3], visit=2)
