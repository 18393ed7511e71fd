"""History spans are observing nights by default (issue "Full density", "the recent part too"):
each night's rows move into segments at the next night's first store, so the engine holds about
one night and a few-nights-old database reads mostly from segments; a night in Chile, which
crosses midnight UTC, is one span."""

from __future__ import annotations

import json

import numpy as np
import pytest

import diadb
from diadb.config import ApdbConfig
from diadb.errors import ConfigError
from tests.helpers import make_visit, random_positions
from tests.test_history import EVERYWHERE

#: Three nights of visits (MJD TAI): 23:00 UTC to 07:00 UTC, as at Cerro Pachon.
NIGHTS = [
    (60000.96, 60001.10, 60001.29),
    (60001.96, 60002.12, 60002.25),
    (60002.97, 60003.05),
]


def _store_nights(db: diadb.Apdb, nights: list[tuple[float, ...]]) -> None:
    ra, dec = random_positions(150, 5)
    every = [t for night in NIGHTS for t in night]
    for night in nights:
        for mjd in night:
            v = every.index(mjd) + 1
            ids = np.arange(1, 151) + (v % 2) * 1_000
            visit = make_visit(db.schema, v, mjd, ids, ra + (v % 2) * 0.05, dec, seed=v)
            assert db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)


def test_each_night_is_one_span_compacted_at_the_next_nights_first_store(tmp_path, official_schema):
    tiered = diadb.Apdb.create(str(tmp_path / "tiered.db"), schema=official_schema)
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    assert tiered.tier is not None  # the default on SQLite
    for db in (tiered, plain):
        _store_nights(db, NIGHTS[:1])
    assert [s for s in tiered.segments() if s.table == "DiaSource"] == []  # the night is still on
    for db in (tiered, plain):
        _store_nights(db, NIGHTS[1:2])
    spans = sorted((s.span_start, s.span_end) for s in tiered.segments() if s.table == "DiaSource")
    # The whole first night (across midnight UTC) in one span, from noon UTC to noon UTC.
    assert spans == [(60000.5, 60001.5)]
    # The engine holds the second night only.
    times = plain.get_sources(EVERYWHERE, 60003.0, months=1).column("midpointMjdTai").to_numpy()
    assert tiered.stats()["DiaSource"]["rows"] == int((times > 60001.5).sum()) > 0
    for db in (tiered, plain):
        _store_nights(db, NIGHTS[2:])
    spans = sorted((s.span_start, s.span_end) for s in tiered.segments() if s.table == "DiaSource")
    assert spans == [(60000.5, 60001.5), (60001.5, 60002.5)]
    for region in (diadb.Circle(55, -30, 0.3), EVERYWHERE):
        assert tiered.get_objects(region).equals(plain.get_objects(region))
        for method in ("get_sources", "get_forced_sources"):
            want = getattr(plain, method)(region, 60003.1, months=1)
            assert getattr(tiered, method)(region, 60003.1, months=1).equals(want), method
    tiered.close()
    plain.close()


def test_span_offsets_of_old_databases_and_bad_values():
    old = json.loads(ApdbConfig().to_json())
    del old["history_span_offset_days"]
    old.update(history_span_days=7.0, history_compact_lag_days=1.0)
    # Made before span offsets: its segments' edges are multiples of the span.
    assert ApdbConfig.from_json(json.dumps(old)).history_span_offset_days == 0.0
    assert ApdbConfig().history_span_offset_days == 0.5 and ApdbConfig().history_span_days == 1.0
    with pytest.raises(ConfigError, match="history_span_offset_days must be in"):
        ApdbConfig(history_span_days=0.5)  # the default offset is not inside a half-day span
    with pytest.raises(ConfigError, match="history_span_offset_days must be in"):
        ApdbConfig(history_span_offset_days=-0.1)
