"""Span merges (``diadb.history.merging``): fewer, larger segments with the same rows, made in the
compaction's commit, crash-safe, never from damaged bytes, folding late stores in again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import diadb
from diadb.history.merging import MAX_MERGED_BYTES, merge_widths, plan_merges
from diadb.history.segment import CorruptSegmentError, SegmentInfo
from tests.test_history import EVERYWHERE, _rows_per_visit, _stream, compact_and_die
from tests.test_history_server import fresh_url

DAILY = {
    "history_tier": True,
    "history_span_days": 1.0,
    "history_span_offset_days": 0.0,
    "history_compact_lag_days": 0.0,
}


def _info(
    table: str, start: float, end: float, pix: tuple[int, int] = (0, 10), size: int = 100
) -> SegmentInfo:
    name = f"{table}-{start}-{end}"
    return SegmentInfo(table, name, start, end - 0.5, start, end, pix[0], pix[1], 1, size, "x")


def test_plan_groups_aligned_closed_spans_of_one_table_and_tile():
    def tiles(pixel: int) -> int:
        return pixel // 100

    segments = [
        *(_info("DiaSource", d, d + 1) for d in range(8, 16)),  # two whole groups [8, 12), [12, 16)
        _info("DiaSource", 16, 17),  # alone in its group
        _info("DiaForcedSource", 8, 9),
        _info("DiaForcedSource", 9, 10, pix=(100, 110)),  # another tile: not with the one before
        _info("DiaForcedSource", 10, 11, pix=(100, 110)),
        _info("DiaSource", 20, 21),
        _info("DiaSource", 21, 22),  # group [20, 24) not closed below boundary 23
        _info("DiaObject", 8, 9),
        _info("DiaObject", 9, 10),  # the snapshot is never merged
        _info("DiaSource", 12, 16),  # an earlier merge of the same group: merged again with the rest
    ]
    plans = plan_merges(segments, 23.0, 1.0, 4, tiles, max_days=4.0)  # one level: 4 days
    spans = [(span, [m.name for m in members]) for span, members in plans]
    assert [s for s, _ in spans] == [(8.0, 12.0), (8.0, 12.0), (12.0, 16.0)]
    assert {len(m) for _, m in spans} == {4, 2, 5}
    forced = next(m for s, m in spans if len(m) == 2)
    assert all(name.startswith(("DiaForcedSource-9", "DiaForcedSource-10")) for name in forced)
    assert plan_merges(segments, 23.0, 1.0, 1, tiles) == []  # factor 1: never
    big = [_info("DiaSource", 8, 9, size=MAX_MERGED_BYTES), _info("DiaSource", 9, 10)]
    assert plan_merges(big, 23.0, 1.0, 4, tiles) == []  # too large to hold at once


def test_merge_levels_take_the_widest_closed_group_first():
    assert merge_widths(7.0, 4) == [28.0]  # weekly spans: one level (112 days is over the cap)
    assert merge_widths(1.0, 4) == [64.0, 16.0, 4.0]
    assert merge_widths(1.0, 4, max_days=2.0) == [4.0]  # the first level always

    def tiles(pixel: int) -> int:
        return 0

    segments = [
        *(_info("DiaSource", d, d + 1) for d in range(0, 3)),  # daily, in [0, 16)
        _info("DiaSource", 4, 8),
        _info("DiaSource", 8, 12),  # merged earlier at 4 days, in [0, 16)
        _info("DiaSource", 16, 20),
        _info("DiaSource", 20, 21),  # [16, 32) is not closed below 30: 4-day group [20, 24)
        _info("DiaSource", 21, 22),
        _info("DiaSource", 0, 64),  # as wide as the widest level: never merged again alone
    ]
    plans = plan_merges(segments, 30.0, 1.0, 4, tiles)
    spans = {span: sorted(m.name for m in members) for span, members in plans}
    assert set(spans) == {(0.0, 16.0), (20.0, 24.0)}
    assert len(spans[(0.0, 16.0)]) == 5 and len(spans[(20.0, 24.0)]) == 2
    # Once [0, 64) is closed, everything in it goes into one segment, the 64-day one included.
    plans = plan_merges(segments, 64.0, 1.0, 4, tiles)
    assert [(span, len(m)) for span, m in plans] == [((0.0, 64.0), len(segments))]


def test_merged_database_reads_as_the_engine_alone_and_folds_late_stores_in(tmp_path, official_schema):
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    merged = diadb.Apdb.create(str(tmp_path / "merged.db"), schema=official_schema, **DAILY)
    unmerged = diadb.Apdb.create(
        str(tmp_path / "unmerged.db"), schema=official_schema, history_merge_spans=1, **DAILY
    )
    dbs = (plain, merged, unmerged)
    for db in dbs:
        _stream(db, 16, n=80, day_step=1.0)
    widths = sorted({s.span_end - s.span_start for s in merged.segments() if s.table == "DiaSource"})
    assert widths == [1.0, 16.0]  # days 60000-60015 closed as one 16-day group (the widest)
    assert {s.span_end - s.span_start for s in unmerged.segments() if s.table != "DiaObject"} == {1.0}
    n_merged = len([s for s in merged.segments() if s.table == "DiaSource"])
    assert n_merged < len([s for s in unmerged.segments() if s.table == "DiaSource"]) / 2

    def same() -> None:
        for region in (diadb.Circle(55, -30, 0.4), EVERYWHERE):
            for t, months in ((60017.0, 12), (60009.5, 0), (60100.0, 12)):
                for method in ("get_sources", "get_forced_sources"):
                    want = getattr(plain, method)(region, t, months=months)
                    for db in (merged, unmerged):
                        assert getattr(db, method)(region, t, months=months).equals(want), (method, t)
            assert merged.get_objects(region).equals(plain.get_objects(region))

    same()
    # A late store of a visit inside an already merged group: its rows reach a 1-day segment of
    # that group at the next compaction, and the one after folds it into the group's segment.
    for db in dbs:
        _stream(db, 1, n=80, first=40, day_step=0.26)  # visit 40 at MJD 60010.4
        _stream(db, 2, n=80, first=17, day_step=1.0)
    if merged.tier is not None:
        merged.compact()
        merged.compact()
    group = [s for s in merged.segments() if s.table == "DiaSource" and s.span_start <= 60010.4 < s.span_end]
    assert len(group) == 1 and group[0].span_end - group[0].span_start == 16.0
    same()
    assert merged.verify() == []
    for db in dbs:
        db.close()


def test_sigkill_while_merging_keeps_every_row_once(tmp_path, official_schema):
    url = str(tmp_path / "m.db")
    db = diadb.Apdb.create(url, schema=official_schema, history_auto_compact=False, **DAILY)
    _stream(db, 8, n=60, day_step=1.0)  # visits on days 1..8
    db.compact(boundary=60009.0)  # daily segments, committed: the next compaction merges them
    db.close()
    expected = {v: 60 for v in range(1, 9)}
    for step in ("merged", "commit"):
        compact_and_die(url, step)
        assert _rows_per_visit(url) == (expected, expected)
        with diadb.Apdb.open(url) as again:
            assert again.verify() == []
            assert {s.span_end - s.span_start for s in again.segments() if s.table != "DiaObject"} == {1.0}
    with diadb.Apdb.open(url) as again:
        before = {s.name for s in again.segments()}
        again.compact(boundary=1e9)
        live = {s.name for s in again.segments()}
        assert 64.0 in {s.span_end - s.span_start for s in again.segments() if s.table != "DiaObject"}
    assert _rows_per_visit(url) == (expected, expected)
    files = {p.name for p in Path(url + ".history").iterdir()}
    assert files == live | (before - live)  # the killed merges' files were swept as orphans


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "cassandra"])
def test_a_damaged_segment_is_never_merged(request, tmp_path, official_schema, engine):
    """A merge reads every block of its inputs first: damage fails the compaction, naming the
    segment, and the manifest stays as it was."""
    url = str(tmp_path / "d.db") if engine == "sqlite" else fresh_url(request, engine)
    db = diadb.Apdb.create(url, schema=official_schema, history_auto_compact=False, **DAILY)
    _stream(db, 6, n=60, day_step=1.0)
    db.compact(boundary=60007.0)
    before = db.segments()
    victim = next(s for s in before if s.table == "DiaSource" and 60004.0 <= s.span_start < 60008.0)
    db.close()
    if engine == "sqlite":
        path = Path(url + ".history") / victim.name
        data = bytearray(path.read_bytes())
        data[victim.bytes // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        from tests.test_history_server import _damage

        _damage(request, url, victim.name, victim.bytes // 2)
    with diadb.Apdb.open(url) as again:
        with pytest.raises(CorruptSegmentError, match=victim.name):
            again.compact(boundary=60010.0)
        assert [s.name for s in again.segments()] == [s.name for s in before]


def test_merge_spans_option_is_checked(tmp_path, official_schema):
    for bad in (0, 65, 2.5, True):
        with pytest.raises(diadb.ConfigError, match="history_merge_spans"):
            diadb.Apdb.create(str(tmp_path / f"x{bad}.db"), schema=official_schema, history_merge_spans=bad)
    np.testing.assert_equal(diadb.ApdbConfig().history_merge_spans, 4)
