"""History segments are never a wrong answer: damage is an error naming the file; names and spans
do not depend on the magnitude of the values in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import diadb
from diadb.history.segment import write_segment
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)
SEGMENTS = {"history_span_days": 1.0, "history_compact_lag_days": 0.0}


def _store(db: diadb.Apdb, visit: int, n: int = 100, **objects: float) -> None:
    ra, dec = random_positions(n, 3)
    ids = np.arange(1, n + 1) + (visit % 3) * 10_000
    v = make_visit(db.schema, visit, 60000.0 + visit * 2.5, ids, ra, dec, seed=visit)
    table = v.objects
    for name, value in objects.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(np.full(n, value)))
    db.store(v.mjd, table, v.sources, v.forced, visit=visit)


# ---- names and spans (issue "Never a wrong answer", class 2) -----------------------------


def test_a_huge_validity_start_does_not_break_later_stores(tmp_path, official_schema):
    """A validityStartMjdTai of 1e300 once put a 300-digit number into the DiaObject snapshot's
    file name: every later compaction (so every store) failed, even after reopening."""
    url = str(tmp_path / "big.db")
    db = diadb.Apdb.create(url, schema=official_schema, **SEGMENTS)
    _store(db, 1, validityStartMjdTai=1e300)
    db.close()
    with diadb.Apdb.open(url) as again:
        for visit in (2, 4, 5):  # objects of visit 1 are not seen again (visit 4 has the same ids)
            _store(again, visit)
        names = [s.name for s in again.segments()]
        assert names and all(len(name) < 80 for name in names)
        snapshot = next(s for s in again.segments() if s.table == "DiaObject")
        assert snapshot.span_start < snapshot.span_end and np.isfinite(snapshot.span_end)
        assert again.get_objects(EVERYWHERE).num_rows > 0
        assert again.verify() == []


@pytest.mark.parametrize("span", [(float("nan"), 1.0), (0.0, float("inf")), (-float("inf"), 0.0), (2.0, 2.0)])
def test_write_segment_refuses_a_non_finite_or_empty_span(tmp_path, span):
    data = pa.table({"_healpix_29": pa.array([1, 2], pa.int64()), "t": pa.array([0.5, 0.6])})
    with pytest.raises(diadb.StorageError, match="refusing to write a DiaSource history segment"):
        write_segment(tmp_path, "DiaSource", data, "t", span)
    assert list(Path(tmp_path).iterdir()) == []


def test_segment_names_are_bounded_whatever_the_span(tmp_path):
    data = pa.table({"_healpix_29": pa.array([1, 2], pa.int64()), "t": pa.array([0.5, 0.6])})
    for span in [(0.0, 1.0), (-1e300, 1e300), (1e15, 1e16), (-5e5, 5e5)]:
        info = write_segment(tmp_path, "DiaForcedSource", data, "t", span)
        assert info.name.startswith("DiaForcedSource-") and len(info.name) < 80
