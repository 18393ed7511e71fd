"""The visit simulator (ap_proto's model) and the runner that times an APDB with it."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import diadb
from diadb.errors import ConfigError
from diadb.schema import ApdbSchema
from diadb.sim.focal_plane import N_DETECTORS, FocalPlane, detector_regions, from_tangent_plane
from diadb.sim.model import SimConfig, VisitSimulator
from diadb.sim.runner import METRIC_COLUMNS, run, save_metrics, summarize
from diadb.sim.visit import Visit

# One dithered field: consecutive visits overlap, so objects are re-detected.
FIELD = SimConfig(seed=7, scale=0.02, field_centres_deg=((55.0, -30.0),), dither_deg=0.3)
EVERYWHERE = diadb.Box(0, 360, -90, 90)


def _ids(table: pa.Table, column: str) -> npt.NDArray[np.int64]:
    return np.asarray(table.column(column).to_numpy(), dtype=np.int64)


def _visits(schema: ApdbSchema, config: SimConfig, n: int) -> list[Visit]:
    return list(VisitSimulator(config, schema).visits(n))


@pytest.mark.parametrize(
    "config", [FIELD, SimConfig(seed=3, scale=0.005, dec_range_deg=(-40.0, -20.0))], ids=["field", "uniform"]
)
def test_same_seed_gives_the_same_visits(official_schema: ApdbSchema, config: SimConfig) -> None:
    first = _visits(official_schema, config, 3)
    again = _visits(official_schema, config, 3)
    for a, b in zip(first, again, strict=True):
        assert (a.visit, a.mjd_tai, a.pointing, a.band) == (b.visit, b.mjd_tai, b.pointing, b.band)
        assert a.sources.num_rows > 0
        assert a.objects.equals(b.objects)
        assert a.sources.equals(b.sources)
        assert a.forced_sources.equals(b.forced_sources)
    other = _visits(official_schema, replace(config, seed=config.seed + 1), 1)[0]
    assert other.pointing != first[0].pointing


def test_tables_have_every_schema_column(official_schema: ApdbSchema) -> None:
    v = _visits(official_schema, FIELD, 3)[-1]
    for table, name in (
        (v.objects, "DiaObject"),
        (v.sources, "DiaSource"),
        (v.forced_sources, "DiaForcedSource"),
    ):
        assert table.column_names == official_schema.table(name).column_names
    assert v.objects.column("validityEndMjdTai").null_count == v.objects.num_rows
    assert v.sources.column("ssObjectId").null_count == v.sources.num_rows
    assert set(v.sources.column("visit").to_pylist()) == {v.visit}
    assert set(v.sources.column("band").to_pylist()) == {v.band}
    assert np.all(v.sources.column("midpointMjdTai").to_numpy() == v.mjd_tai)
    x = v.sources.column("x").to_numpy()
    assert np.all((x >= 0) & (x <= 4000))


def test_189_tiles_padded_by_52_arcsec() -> None:
    regions = detector_regions(10.0, -45.0)
    assert [d for d, _ in regions] == list(range(N_DETECTORS)) and N_DETECTORS == 189
    fp = FocalPlane()
    inside, outside = math.tan(math.radians(40 / 3600)), math.tan(math.radians(64 / 3600))
    for det in (0, 4, 94, 188):
        xi0, xi1, eta0, eta1 = fp.tile_box(det)
        assert xi1 - xi0 == pytest.approx(2 * math.tan(math.radians(1.75)) / 15)
        mid_xi, mid_eta = (xi0 + xi1) / 2, (eta0 + eta1) / 2
        xi = [mid_xi, xi0 - inside, xi1 + inside, mid_xi, xi0 - outside, xi1 + outside, mid_xi]
        eta = [mid_eta, mid_eta, mid_eta, eta1 + inside, mid_eta, mid_eta, eta0 - outside]
        ra, dec = from_tangent_plane(xi, eta, 10.0, -45.0)
        got = regions[det][1].contains(ra, dec)
        assert got.tolist() == [True, True, True, True, False, False, False]
        unpadded = fp.region(det, 10.0, -45.0, padded=False).contains(ra, dec)
        assert unpadded.tolist() == [True] + [False] * 6


def test_tiles_cover_the_grid_but_the_corner_rafts() -> None:
    fp = FocalPlane()
    # A dense grid over the field lands on every tile, and each point inside its own tile.
    g = np.linspace(-0.0305, 0.0305, 200)
    xi, eta = (a.ravel() for a in np.meshgrid(g, g))
    ra, dec = from_tangent_plane(xi, eta, 10.0, -45.0)
    det, x, y = fp.assign(ra, dec, 10.0, -45.0)
    assert set(det[det >= 0].tolist()) == set(range(189))
    assert np.all((x >= 0) & (x < 4000) & (y >= 0) & (y < 4000))
    # The corner rafts (beyond 3/5 of the half-width on both axes) are missing.
    edge = 0.6 * fp.half_width
    corners = (np.abs(xi) > edge) & (np.abs(eta) > edge)
    assert np.all(det[corners] == -1) and np.all(det[~corners] >= 0)
    for d in (0, 100, 188):
        assert fp.region(d, 10.0, -45.0, padded=False).contains(ra[det == d], dec[det == d]).all()


@pytest.mark.parametrize(
    "config",
    [FIELD, SimConfig(seed=5, scale=0.01, dec_range_deg=(-90.0, -86.0)), SimConfig(seed=6, scale=0.005)],
    ids=["field", "pole", "southern-sky"],
)
def test_every_row_is_inside_the_field_and_its_tile(official_schema: ApdbSchema, config: SimConfig) -> None:
    for v in _visits(official_schema, config, 3):
        assert isinstance(v.region, diadb.Circle)
        for table in (v.objects, v.sources, v.forced_sources):
            ra, dec = table.column("ra").to_numpy(), table.column("dec").to_numpy()
            assert v.region.contains(ra, dec).all()
        parts = v.split_by_detector()
        assert [p.detector for p in parts] == list(range(189))
        assert sum(p.sources.num_rows for p in parts) == v.sources.num_rows
        assert sum(p.objects.num_rows for p in parts) == v.objects.num_rows
        assert sum(p.forced_sources.num_rows for p in parts) == v.forced_sources.num_rows
        for p in parts:
            assert p.region.contains(
                p.sources.column("ra").to_numpy(), p.sources.column("dec").to_numpy()
            ).all()
            assert set(_ids(p.objects, "diaObjectId")) == set(_ids(p.sources, "diaObjectId"))
        busiest = max(parts, key=lambda p: p.sources.num_rows)
        alone = v.for_detector(busiest.detector or 0)
        assert alone.sources.equals(busiest.sources) and alone.objects.equals(busiest.objects)
        # A detector's share pickles (for worker processes) with its own rows only.
        copy = pickle.loads(pickle.dumps(busiest))
        assert copy.sources.equals(busiest.sources) and copy.forced_sources.equals(busiest.forced_sources)
        assert (copy.region, copy.detector, copy.pointing) == (
            busiest.region,
            busiest.detector,
            busiest.pointing,
        )
        assert len(pickle.dumps(busiest)) < len(pickle.dumps(v))


@pytest.mark.parametrize(
    "centre", [(0.3, -20.0), (359.9, -60.0), (123.0, -89.0), (200.0, -88.5), (10.0, 0.5)]
)
def test_field_lookup_finds_exactly_the_population_in_the_field(
    official_schema: ApdbSchema, centre: tuple[float, float]
) -> None:
    sim = VisitSimulator(SimConfig(seed=2, scale=0.01), official_schema)
    pop = sim._population  # the index is internal; check it against brute force
    field = diadb.Circle(centre[0], centre[1], 1.75)
    expected = np.flatnonzero(field.contains(pop.ra, pop.dec))
    assert len(expected) > 50
    assert np.array_equal(pop.in_field(field), expected)


def test_sources_redetect_the_same_objects(official_schema: ApdbSchema) -> None:
    sim = VisitSimulator(FIELD, official_schema)
    visits = list(sim.visits(5))
    all_ids = np.concatenate([_ids(v.sources, "diaObjectId") for v in visits])
    source_ids = np.concatenate([_ids(v.sources, "diaSourceId") for v in visits])
    assert len(np.unique(source_ids)) == len(source_ids)
    seen: dict[int, int] = {}
    for prev, v in zip([None, *visits], visits, strict=False):
        ids = _ids(v.sources, "diaObjectId")
        # Association by construction: each source's object is in this visit at its position.
        assert np.array_equal(ids, _ids(v.objects, "diaObjectId"))
        assert len(np.unique(ids)) == len(ids)
        for c in ("ra", "dec"):
            assert v.sources.column(c).equals(v.objects.column(c))
        real = ids <= sim.population_size
        assert (~real).sum() > 0
        assert np.all(v.objects.column("nDiaSources").to_numpy()[~real] == 1)
        # nDiaSources counts every DiaSource of the object so far.
        expected = np.array([seen.get(int(i), 0) + 1 for i in ids])
        assert np.array_equal(v.objects.column("nDiaSources").to_numpy(), expected)
        seen.update(zip(ids.tolist(), expected.tolist(), strict=True))
        if prev is not None:
            prev_ids = _ids(prev.sources, "diaObjectId")
            common = np.intersect1d(prev_ids, ids)
            assert len(common) > 0.5 * real.sum()
            assert common.max() <= sim.population_size
            # The same object is at the same place in every visit.
            p = dict(zip(prev_ids.tolist(), prev.sources.column("ra").to_pylist(), strict=True))
            here = dict(zip(ids.tolist(), v.sources.column("ra").to_pylist(), strict=True))
            assert all(p[i] == here[i] for i in common.tolist())
    # False detections are one-offs: their ids appear in one visit only.
    values, counts = np.unique(all_ids, return_counts=True)
    assert np.all(counts[values > sim.population_size] == 1)
    assert np.any(counts[values <= sim.population_size] == 5)


def test_forced_sources_only_for_recent_objects_with_more_than_one_source(
    official_schema: ApdbSchema,
) -> None:
    # Four visits a night and a window shorter than a day: the first visits of a night see
    # objects whose last detection is a day old, so the window matters.
    config = SimConfig(
        seed=11,
        scale=0.02,
        field_centres_deg=((55.0, -30.0), (56.5, -30.0)),
        dither_deg=0.5,
        night_hours=0.05,
        forced_window_days=0.02,
    )
    sim = VisitSimulator(config, official_schema)
    count: dict[int, int] = {}
    last: dict[int, float] = {}
    stale_seen = forced_seen = 0
    for v in sim.visits(10):
        ids = _ids(v.sources, "diaObjectId")
        before = np.array([count.get(int(i), 0) for i in ids])
        age = np.array([v.mjd_tai - last.get(int(i), -1e9) for i in ids])
        expected = set(ids[(before > 1) & (age < config.forced_window_days)].tolist())
        forced_ids = _ids(v.forced_sources, "diaObjectId")
        assert set(forced_ids.tolist()) == expected
        assert len(forced_ids) == len(expected)
        stale_seen += int(((before > 1) & (age >= config.forced_window_days)).sum())
        forced_seen += len(forced_ids)
        # A forced source is on the detector of the object's DiaSource, at its position.
        det = dict(zip(ids.tolist(), v.sources.column("detector").to_pylist(), strict=True))
        ra = dict(zip(ids.tolist(), v.sources.column("ra").to_pylist(), strict=True))
        f = v.forced_sources
        assert f.column("detector").to_pylist() == [det[i] for i in forced_ids.tolist()]
        assert f.column("ra").to_pylist() == [ra[i] for i in forced_ids.tolist()]
        assert set(f.column("visit").to_pylist()) <= {v.visit}
        for i in ids.tolist():
            count[i] = count.get(i, 0) + 1
            last[i] = v.mjd_tai
    assert forced_seen > 0 and stale_seen > 0


def _counts(db: diadb.Apdb, mjd: float) -> dict[str, int]:
    return {
        "DiaObject": db.get_objects(EVERYWHERE, columns=["diaObjectId"]).num_rows,
        "DiaSource": db.get_sources(EVERYWHERE, mjd, columns=["diaSourceId"]).num_rows,
        "DiaForcedSource": db.get_forced_sources(EVERYWHERE, mjd, columns=["diaForcedSourceId"]).num_rows,
    }


def test_runner_stores_every_visit(official_schema: ApdbSchema, tmp_path: Path) -> None:
    db = diadb.Apdb.create(tmp_path / "apdb.db", schema=official_schema, sqlite_synchronous="NORMAL")
    sim = VisitSimulator(FIELD, official_schema)
    calls: list[tuple[int, int]] = []
    metrics = run(db, sim, 4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    documented = (
        "visit",
        "detector",
        "table",
        "select_s",
        "store_s",
        "rows_read",
        "rows_stored",
        "visit_wall_s",
    )
    assert tuple(metrics.column_names) == METRIC_COLUMNS == documented
    assert metrics.num_rows == 4 * 4
    assert set(metrics.column("detector").to_pylist()) == {-1}
    rows = metrics.to_pylist()
    stored = {
        t: sum(r["rows_stored"] for r in rows if r["table"] == t)
        for t in ("DiaObject", "DiaSource", "DiaForcedSource")
    }
    assert all(r["store_s"] is None for r in rows if r["table"] != "all")
    assert all(r["store_s"] > 0 for r in rows if r["table"] == "all")
    assert sum(r["rows_read"] for r in rows if r["visit"] == 1) == 0
    assert sum(r["rows_read"] for r in rows if r["visit"] == 4) > 0
    stats = db.stats()
    assert stats["DiaObject"]["rows"] == stored["DiaObject"]  # every version
    assert stats["DiaSource"]["rows"] == stored["DiaSource"] == _counts(db, 60001.0)["DiaSource"]
    assert stats["DiaForcedSource"]["rows"] == stored["DiaForcedSource"] > 0
    assert _counts(db, 60001.0)["DiaForcedSource"] == stored["DiaForcedSource"]
    # Latest versions: one per object ever detected.
    assert _counts(db, 60001.0)["DiaObject"] == stats["diadb_DiaObjectLatest"]["rows"] < stored["DiaObject"]

    summary = summarize(metrics)
    assert summary["visits"] == 4
    assert summary["db_bytes"] > 0
    for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
        assert summary[f"{name}.select_s"] >= 0
    assert summary["all.store_s"] > 0 and summary["visit_wall_s"] > 0
    save_metrics(metrics, tmp_path / "m.parquet")
    save_metrics(metrics, tmp_path / "m.csv")
    saved = pq.read_table(tmp_path / "m.parquet")
    assert saved.equals(metrics)
    assert saved.schema.metadata[b"db_bytes"] == metrics.schema.metadata[b"db_bytes"]
    assert pacsv.read_csv(tmp_path / "m.csv").num_rows == metrics.num_rows
    with pytest.raises(ConfigError):
        save_metrics(metrics, tmp_path / "m.txt")
    db.close()


def test_detector_mode_with_workers_stores_what_field_mode_stores(
    official_schema: ApdbSchema, tmp_path: Path
) -> None:
    def stored(db: diadb.Apdb) -> dict[str, object]:
        src = db.get_sources(EVERYWHERE, 60001.0, columns=["diaSourceId", "detector"])
        forced = db.get_forced_sources(EVERYWHERE, 60001.0, columns=["diaForcedSourceId", "detector"])
        obj = db.get_objects(EVERYWHERE, columns=["diaObjectId", "nDiaSources", "validityStartMjdTai"])
        return {
            "sources": set(zip(*(src.column(c).to_pylist() for c in src.column_names), strict=True)),
            "forced": set(zip(*(forced.column(c).to_pylist() for c in forced.column_names), strict=True)),
            "objects": set(zip(*(obj.column(c).to_pylist() for c in obj.column_names), strict=True)),
            "versions": db.stats()["DiaObject"]["rows"],
        }

    field_db = diadb.Apdb.create(tmp_path / "field.db", schema=official_schema, sqlite_synchronous="NORMAL")
    run(field_db, VisitSimulator(FIELD, official_schema), 3)
    # The first two visits go in field mode to keep this quick; the third, which updates
    # objects and has forced sources, goes detector by detector in two processes.
    det_db = diadb.Apdb.create(tmp_path / "det.db", schema=official_schema, sqlite_synchronous="NORMAL")
    sim = VisitSimulator(FIELD, official_schema)
    run(det_db, sim, 2)
    metrics = run(det_db, sim, 1, mode="detector", workers=2)
    assert metrics.num_rows == 189 * 4
    assert sorted(set(metrics.column("detector").to_pylist())) == list(range(189))
    assert set(metrics.column("visit").to_pylist()) == {3}
    assert all(det_db.contains_visit_detector(3, d) for d in (0, 94, 188))
    want, got = stored(field_db), stored(det_db)
    assert got == want
    assert len(want["forced"]) > 0  # type: ignore[arg-type]
    field_db.close()
    det_db.close()


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        SimConfig(scale=0.0)
    with pytest.raises(ConfigError):
        SimConfig(scale=1.5)
    with pytest.raises(ConfigError):
        SimConfig(field_centres_deg=((400.0, 0.0),))
    assert SimConfig().visits_per_night == 800
    assert SimConfig().visit_mjd(800) == pytest.approx(60001.0)
