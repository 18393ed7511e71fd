"""Round trips, windows, versions and idempotency, run on every backend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from astropy.time import Time

import diadb
from diadb.backends.sqlite import SqliteBackend
from diadb.errors import ConfigError, DuplicateVisitError, SchemaVersionError
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)


def _sorted(t: pa.Table, keys: list[str]) -> pa.Table:
    return t.take(pc.sort_indices(t, sort_keys=[(k, "ascending") for k in keys]))


def test_round_trip_every_row_once_values_equal(apdb, official_schema):
    ids = np.arange(1, 301)
    ra, dec = random_positions(300, 1)
    v = make_visit(official_schema, 7, 60100.0, ids, ra, dec, detector=3)
    assert apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=7, detector=3)
    for got, sent, key in [
        (apdb.get_objects(EVERYWHERE), v.objects, ["diaObjectId"]),
        (apdb.get_sources(EVERYWHERE, v.mjd), v.sources, ["diaSourceId"]),
        (apdb.get_forced_sources(EVERYWHERE, v.mjd), v.forced, ["diaObjectId"]),
    ]:
        assert got.num_rows == sent.num_rows
        assert got.column_names[-1] == "_healpix_29"
        got_cmp = _sorted(got.drop_columns(["_healpix_29"]), key)
        sent_cmp = _sorted(sent, key).cast(got_cmp.schema)
        for name in sent_cmp.column_names:
            assert got_cmp.column(name).equals(sent_cmp.column(name)), name


def test_results_are_sorted_and_schema_typed(apdb, official_schema):
    ids = np.arange(1, 501)
    ra, dec = random_positions(500, 2)
    v = make_visit(official_schema, 1, 60000.0, ids, ra, dec)
    apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=1)
    src = apdb.get_sources(diadb.Circle(55, -30, 2), 60000.0)
    pix = src.column("_healpix_29").to_numpy()
    assert np.all(np.diff(pix) >= 0)
    assert src.schema.field("detector").type == pa.int16()
    assert src.schema.field("psfFlux").type == pa.float32()
    assert src.schema.field("pixelFlags").type == pa.bool_()
    assert src.schema.field("band").type == pa.string()


def test_window_start_exclusive_end_inclusive(apdb, official_schema):
    ra, dec = random_positions(10, 3)
    ids = np.arange(1, 11)
    for visit, mjd in [(1, 60000.0), (2, 60010.0), (3, 60020.0)]:
        v = make_visit(official_schema, visit, mjd, ids, ra, dec)
        apdb.store(mjd, v.objects, v.sources, v.forced, visit=visit)
    region = diadb.Circle(55, -30, 3)

    def visits(t: float, months: int) -> set[int]:
        s = apdb.get_sources(region, t, months=months, columns=["visit"]).column("visit").to_pylist()
        f = apdb.get_forced_sources(region, t, months=months, columns=["visit"]).column("visit").to_pylist()
        assert sorted(s) == sorted(f)
        return set(s)

    assert visits(60030.0, 1) == {2, 3}  # start = 60000 exactly: excluded
    assert visits(60029.999, 1) == {1, 2, 3}
    assert visits(60020.0, 12) == {1, 2, 3}  # end = 60020 exactly: included
    assert visits(60019.999, 12) == {1, 2}
    assert visits(60015.0, 0) == set()


def test_visit_time_types(apdb, official_schema):
    ra, dec = random_positions(5, 4)
    v = make_visit(official_schema, 1, 60000.0, np.arange(1, 6), ra, dec)
    apdb.store(Time(60000.0, format="mjd", scale="tai"), v.objects, v.sources, v.forced, visit=1)
    got = apdb.get_sources(EVERYWHERE, Time(60000.0, format="mjd", scale="tai"))
    assert got.num_rows == 5
    with pytest.raises(ConfigError, match="not a time"):
        apdb.get_sources(EVERYWHERE, "yesterday")


def test_new_version_closes_previous_and_only_latest_is_read(apdb, official_schema):
    ids = np.arange(1, 21)
    ra, dec = random_positions(20, 5)
    v1 = make_visit(official_schema, 1, 60000.0, ids, ra, dec)
    apdb.store(v1.mjd, v1.objects, v1.sources, v1.forced, visit=1)
    # Objects 1..10 are updated, and move slightly.
    v2 = make_visit(official_schema, 2, 60001.0, ids[:10], ra[:10] + 1e-4, dec[:10], seed=99)
    apdb.store(v2.mjd, v2.objects, v2.sources, v2.forced, visit=2)
    latest = apdb.get_objects(
        EVERYWHERE, columns=["diaObjectId", "validityStartMjdTai", "validityEndMjdTai", "ra"]
    )
    assert latest.num_rows == 20
    by_id = {r["diaObjectId"]: r for r in latest.to_pylist()}
    assert all(by_id[i]["validityStartMjdTai"] == 60001.0 for i in range(1, 11))
    assert all(by_id[i]["validityStartMjdTai"] == 60000.0 for i in range(11, 21))
    assert all(r["validityEndMjdTai"] is None for r in by_id.values())
    assert by_id[1]["ra"] == pytest.approx(ra[0] + 1e-4)
    # The history table keeps the closed version.
    assert apdb.get_sources(None, 60001.0, object_ids=[1]).num_rows == 2
    backend = apdb._backend
    closed = (
        backend.connection.fetch(
            'SELECT "validityEndMjdTai" FROM "DiaObject" '
            'WHERE "diaObjectId" = 1 ORDER BY "validityStartMjdTai"'
        )
        if isinstance(backend, SqliteBackend)
        else None
    )
    if closed is not None:
        assert closed.column(0).to_pylist() == [60001.0, None]


def test_store_same_visit_detector_is_a_noop(apdb, official_schema):
    ra, dec = random_positions(30, 6)
    v = make_visit(official_schema, 5, 60000.0, np.arange(1, 31), ra, dec, detector=1)
    assert apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=5, detector=1) is True
    assert apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=5, detector=1) is False
    assert apdb.get_sources(EVERYWHERE, v.mjd).num_rows == 30
    assert apdb.contains_visit_detector(5, 1)
    assert apdb.contains_visit_detector(5)
    assert not apdb.contains_visit_detector(5, 2)
    assert not apdb.contains_visit_detector(6, 1)


def test_duplicate_visit_can_be_an_error(backend_url, official_schema):
    db = diadb.Apdb.create(backend_url, schema=official_schema, on_duplicate_visit="error")
    ra, dec = random_positions(3, 6)
    v = make_visit(official_schema, 5, 60000.0, np.arange(1, 4), ra, dec)
    db.store(v.mjd, v.objects, v.sources, v.forced, visit=5)
    v9 = make_visit(official_schema, 5, 60000.0, np.arange(1, 4), ra, dec, detector=9)
    with pytest.raises(DuplicateVisitError, match="visit 5"):
        db.store(
            v9.mjd, v9.objects, v9.sources, v9.forced, visit=5, detector=9
        )  # the whole visit covers detector 9
    db.close()


def test_columns_pandas_and_object_ids(apdb, official_schema):
    ids = np.arange(1, 51)
    ra, dec = random_positions(50, 8)
    v = make_visit(official_schema, 1, 60000.0, ids, ra, dec)
    apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=1)
    t = apdb.get_sources(EVERYWHERE, 60000.0, columns=["psfFlux", "diaSourceId"])
    assert t.column_names == ["psfFlux", "diaSourceId"]
    df = apdb.get_forced_sources(EVERYWHERE, 60000.0, as_pandas=True)
    assert isinstance(df, pd.DataFrame) and len(df) == 50
    only = apdb.get_sources(None, 60000.0, object_ids=[3, 4, 999])
    assert sorted(only.column("diaObjectId").to_pylist()) == [3, 4]
    both = apdb.get_sources(diadb.Circle(float(ra[2]), float(dec[2]), 0.001), 60000.0, object_ids=[3, 4])
    assert both.column("diaObjectId").to_pylist() == [3]
    with pytest.raises(ConfigError, match="unknown column"):
        apdb.get_sources(EVERYWHERE, 60000.0, columns=["nope"])
    with pytest.raises(ConfigError, match="give a region"):
        apdb.get_sources(None, 60000.0)


def test_config_is_frozen_and_checked_on_open(backend_url, official_schema):
    db = diadb.Apdb.create(backend_url, schema=official_schema, history_months=6, region_refinement=5)
    db.close()
    with diadb.Apdb.open(backend_url) as again:
        assert again.config.history_months == 6 and again.config.region_refinement == 5
        assert again.schema.version == official_schema.version
    with pytest.raises(ConfigError, match=r"unknown config"):
        diadb.Apdb.create(backend_url + "x", schema=official_schema, bogus=1)
    with pytest.raises(ConfigError, match="already exists"):
        diadb.Apdb.create(backend_url, schema=official_schema)


def test_incompatible_layout_refused(tmp_path, official_schema):
    path = tmp_path / "old.db"
    diadb.Apdb.create(str(path), schema=official_schema).close()
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("UPDATE diadb_metadata SET value = '0.9.0' WHERE key = 'diadb.layout_version'")
    con.commit()
    con.close()
    with pytest.raises(SchemaVersionError, match=r"layout 0\.9\.0"):
        diadb.Apdb.open(str(path))
    with pytest.raises(ConfigError, match="no APDB"):
        diadb.Apdb.open(str(tmp_path / "missing.db"))


def test_stats_counts_rows_and_bytes(apdb, official_schema):
    ra, dec = random_positions(40, 9)
    v = make_visit(official_schema, 1, 60000.0, np.arange(1, 41), ra, dec)
    apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=1)
    stats = apdb.stats()
    assert stats["DiaSource"]["rows"] == 40 and stats["DiaSource"]["bytes"] > 0
    assert stats["DiaForcedSource"]["rows"] == 40
    assert stats["DiaObject"]["rows"] == 40


def test_read_batches_stream_exactly_the_whole_read(apdb, official_schema):
    """A streaming read gives the rows of the whole read, in its order, in batches of at most
    ``rows_per_batch`` rows, a piece of the cover at a time (segments and engine rows alike)."""
    ids = np.arange(1, 401)
    ra, dec = random_positions(400, 11)
    for visit, mjd in [(1, 60000.0), (2, 60002.0), (3, 60004.0)]:
        v = make_visit(official_schema, visit, mjd, ids, ra, dec)
        assert apdb.store(mjd, v.objects, v.sources, v.forced, visit=visit)
    region = diadb.Circle(55, -30, 2.5)
    for table, whole in [
        ("DiaObject", apdb.get_objects(region)),
        ("DiaSource", apdb.get_sources(region, 60004.0)),
        ("DiaForcedSource", apdb.get_forced_sources(region, 60004.0)),
    ]:
        assert whole.num_rows > 100, table
        stream = apdb.read_batches(table, region, 60004.0, rows_per_batch=40)
        batches = list(stream)
        assert len(batches) > 3, table
        assert all(0 < b.num_rows <= 40 for b in batches), table
        got = pa.Table.from_batches(batches, schema=stream.schema)
        assert got.equals(whole), table
    cols = ["diaSourceId", "visit"]
    part = apdb.read_batches("DiaSource", region, 60004.0, months=0, start=60001.0, columns=cols).read_all()
    assert part.column_names == cols
    assert part.equals(apdb.get_sources(region, 60004.0, start=60001.0, columns=cols))
    assert set(part.column("visit").to_pylist()) == {2, 3}
    by_id = apdb.read_batches("DiaSource", None, 60004.0, object_ids=[5, 6], rows_per_batch=2).read_all()
    assert by_id.equals(apdb.get_sources(None, 60004.0, object_ids=[5, 6]))
    empty = apdb.read_batches("DiaSource", diadb.Circle(200, 60, 0.1), 60004.0).read_all()
    assert empty.num_rows == 0 and empty.schema.names == by_id.schema.names
    with pytest.raises(ConfigError, match="rows_per_batch"):
        apdb.read_batches("DiaSource", region, 60004.0, rows_per_batch=0)
    with pytest.raises(ConfigError, match="visit_time"):
        apdb.read_batches("DiaSource", region)
