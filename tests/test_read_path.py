"""The reader's merge: its pixel sort is Arrow's sort, and ``sort=False`` gives the same rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diadb
from diadb.history.reader import sort_indices
from tests.helpers import make_visit, random_positions

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=200)
ORDER = ["_healpix_29", "midpointMjdTai", "diaObjectId", "visit"]


@st.composite
def pieces_of_rows(draw: st.DrawFn) -> pa.Table:
    """Rows as a read concatenates them: a few runs each sorted (or not) by pixel and time,
    with ties on pixel, on pixel and time, whole duplicate keys, and now and then a null."""
    n_runs = draw(st.integers(1, 5))
    parts = []
    for _ in range(n_runs):
        n = draw(st.integers(0, 40))
        pix = np.asarray(draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)), np.int64)
        t = np.asarray(draw(st.lists(st.sampled_from([1.0, 2.0, 3.0, np.nan]), min_size=n, max_size=n)))
        obj = np.asarray(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.int64)
        visit = np.asarray(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), np.int64)
        if draw(st.booleans()):  # sorted like a segment
            o = np.lexsort((t, pix))
            pix, t, obj, visit = pix[o], t[o], obj[o], visit[o]
        parts.append((pix, t, obj, visit))
    cols = [np.concatenate([p[i] for p in parts]) for i in range(4)]
    table = pa.table(dict(zip(ORDER, cols, strict=True)))
    if draw(st.integers(0, 9)) == 0 and table.num_rows:
        mask = np.zeros(table.num_rows, bool)
        mask[draw(st.integers(0, table.num_rows - 1))] = True
        table = table.set_column(2, "diaObjectId", pa.array(cols[2], mask=mask))
    return table


@settings(FUZZ, suppress_health_check=[HealthCheck.too_slow])
@given(table=pieces_of_rows())
def test_pixel_sort_orders_rows_as_arrow_does(table):
    """Equal keys may come in either order (both sorts are correct then); the sorted keys agree."""
    ours = table.take(sort_indices(table, ORDER))
    arrow = table.take(pc.sort_indices(table, sort_keys=[(c, "ascending") for c in ORDER]))
    assert ours.to_pandas().equals(arrow.to_pandas())  # (pandas: NaN equals NaN)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, official_schema):
    """A database with most rows in 1-day segments (merged into 4-day ones), some in the engine."""
    db = diadb.Apdb.create(
        str(tmp_path_factory.mktemp("read") / "r.db"),
        schema=official_schema,
        history_span_days=1.0,
        history_span_offset_days=0.0,
        history_compact_lag_days=0.0,
    )
    ra, dec = random_positions(300, 5)
    for v in range(1, 16):
        ids = np.arange(1, 301) + (v % 2) * 10_000
        visit = make_visit(db.schema, v, 60000.0 + v * 1.3, ids, ra + (v % 2) * 0.05, dec, seed=v)
        db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)
    yield db
    db.close()


@pytest.mark.parametrize(
    "region", [diadb.Circle(55, -30, 0.5), diadb.Box(54.5, 55.5, -30.5, -29.5), diadb.Box(0, 360, -90, 90)]
)
def test_unsorted_reads_return_the_sorted_rows(stored, region):
    """``sort=False`` returns the same rows, in storage order: segments oldest first, each in
    pixel order, then the engine's rows."""
    assert any(s.span_end - s.span_start > 1.0 for s in stored.segments())  # merged spans
    for method, table, key in (
        ("get_sources", "DiaSource", ["diaSourceId"]),
        ("get_forced_sources", "DiaForcedSource", ["diaObjectId", "visit", "detector"]),
    ):
        sorted_rows = getattr(stored, method)(region, 60020.0)
        rows = getattr(stored, method)(region, 60020.0, sort=False)
        assert rows.num_rows == sorted_rows.num_rows > 0
        by_key = [(c, "ascending") for c in key]
        assert rows.sort_by(by_key).equals(sorted_rows.sort_by(by_key))
        times = rows.column("midpointMjdTai").to_numpy()
        boundary = max(s.span_end for s in stored.segments() if s.table == table)
        engine_from = np.flatnonzero(times >= boundary)
        assert len(engine_from) and engine_from[-1] == len(times) - 1  # the engine's rows last
        assert np.all(np.diff(engine_from) == 1)
    objects = stored.get_objects(region, sort=False)
    assert objects.sort_by("diaObjectId").equals(stored.get_objects(region).sort_by("diaObjectId"))
