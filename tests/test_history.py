"""The history tier: same answers as the engine alone, crash-safe compaction, corruption, retention."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import diadb
from diadb.history import columns as columns_module
from diadb.history import tier as tier_module
from diadb.history.segment import CorruptSegmentError
from tests.helpers import make_visit, random_positions

ROOT = Path(__file__).resolve().parents[1]
EVERYWHERE = diadb.Box(0, 360, -90, 90)
SEGMENTS = {
    "history_tier": True,
    "history_span_days": 1.0,
    "history_span_offset_days": 0.0,
    "history_compact_lag_days": 0.0,
}
#: The same with segments cut by order-6 sky tiles (~0.9 deg): the test regions span several.
TILED = {**SEGMENTS, "history_tile_order": 6}
LAYOUTS = pytest.mark.parametrize("layout", [SEGMENTS, TILED], ids=["spans", "tiles"])


def _stream(db: diadb.Apdb, n_visits: int, n: int = 200, first: int = 1, day_step: float = 2.5) -> None:
    """Visits of a few overlapping objects, ``day_step`` days apart."""
    ra, dec = random_positions(n, 3)
    for v in range(first, first + n_visits):
        ids = np.arange(1, n + 1) + (v % 3) * 10_000  # three object populations, revisited
        visit = make_visit(db.schema, v, 60000.0 + v * day_step, ids, ra + (v % 3) * 0.1, dec, seed=v)
        db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)


@LAYOUTS
def test_tier_on_and_off_return_identical_tables(tmp_path, official_schema, layout):
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    tiered = diadb.Apdb.create(str(tmp_path / "tiered.db"), schema=official_schema, **layout)
    for db in (plain, tiered):
        _stream(db, 12)
    assert len(tiered.segments()) > 5 and plain.segments() == []
    stats = tiered.stats()
    assert stats["DiaSource (history)"]["rows"] > stats["DiaSource"]["rows"]
    regions = [diadb.Circle(55, -30, 0.4), diadb.Box(54, 55.5, -31, -29.5), EVERYWHERE]
    for region in regions:
        for t, months in [(60031.0, 12), (60020.0, 1), (60012.5, 0), (60100.0, 1)]:
            for method in ("get_sources", "get_forced_sources"):
                a = getattr(plain, method)(region, t, months=months)
                b = getattr(tiered, method)(region, t, months=months)
                assert a.equals(b), (method, region, t)
                cols = ["diaObjectId", "ra", "psfFlux"]
                assert getattr(plain, method)(region, t, columns=cols).equals(
                    getattr(tiered, method)(region, t, columns=cols)
                )
        assert plain.get_objects(region).equals(tiered.get_objects(region))
    ids = [1, 10_005, 20_199]
    assert plain.get_sources(None, 60031.0, object_ids=ids).equals(
        tiered.get_sources(None, 60031.0, object_ids=ids)
    )
    plain.close()
    tiered.close()


def test_segments_are_sorted_and_verified(tmp_path, official_schema):
    db = diadb.Apdb.create(str(tmp_path / "a.db"), schema=official_schema, **SEGMENTS)
    _stream(db, 6)
    assert db.verify() == []
    directory = Path(str(tmp_path / "a.db") + ".history")
    for info in db.segments():
        data = pa.ipc.open_file(pa.memory_map(str(directory / info.name))).read_all()
        pix = data.column("_healpix_29").to_numpy()
        assert np.all(np.diff(pix) >= 0)
        if info.table == "DiaObject":  # the latest-object snapshot: one per order-2 tile
            tiles = pix >> (2 * (29 - 2))
            assert tiles[0] == tiles[-1] and f"-t2.{tiles[0]}-" in info.name
            assert data.schema.field("g_psfFluxMean").type == pa.float32()
        else:
            assert data.schema.field("psfFlux").type == pa.float32()  # stored with schema types
        assert info.span_start <= info.t_min <= info.t_max < info.span_end
    db.close()


@LAYOUTS
def test_object_snapshot_follows_every_change(tmp_path, official_schema, layout):
    """Objects read from the snapshot plus the engine's changed rows equal the engine alone,
    after new versions, new objects, closed validity and daytime reassignments. With tiles the
    snapshot is one segment per tile, and a compaction rewrites only the tiles that changed."""
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    tiered = diadb.Apdb.create(str(tmp_path / "tiered.db"), schema=official_schema, **layout)
    tiled = "history_tile_order" in layout
    regions = [diadb.Circle(55, -30, 0.4), diadb.Box(54, 55.5, -31, -29.5), EVERYWHERE]

    def same() -> None:
        for region in regions:
            assert plain.get_objects(region).equals(tiered.get_objects(region)), region
            cols = ["diaObjectId", "nDiaSources", "ra"]
            assert plain.get_objects(region, columns=cols).equals(tiered.get_objects(region, columns=cols))

    for db in (plain, tiered):
        _stream(db, 8)
    snapshots = [s for s in tiered.segments() if s.table == "DiaObject"]
    # One segment per tile: the segments' tiles, or order-2 tiles when sources are not tiled.
    shift = 2 * (29 - layout.get("history_tile_order", 2))
    assert all(s.pix_min >> shift == s.pix_max >> shift for s in snapshots)
    assert len({s.pix_min >> shift for s in snapshots}) == len(snapshots) >= (2 if tiled else 1)
    assert all(s.rows > 0 for s in snapshots)
    same()
    # Changes after the snapshot: new versions of snapshot objects, daytime updates.
    some = tiered.get_sources(EVERYWHERE, 60100.0, months=1000, columns=["diaSourceId", "diaObjectId"])
    source_ids = some.column("diaSourceId").to_numpy()[:5].tolist()
    for db in (plain, tiered):
        _stream(db, 1, first=9)
        db.set_validity_end([2, 3], 60030.0)
        db.reassign_to_ssobjects({source_ids[0]: 777})
        db.reassign_sources({source_ids[1]: 10_001, source_ids[2]: 20_002})
    same()
    # The next compaction folds the changes into a new snapshot; the old one goes.
    tiered.compact(boundary=60100.0)
    after = [s for s in tiered.segments() if s.table == "DiaObject"]
    assert {s.name for s in after} != {s.name for s in snapshots}
    assert len({s.pix_min >> shift for s in after}) == len(after) >= (2 if tiled else 1)
    same()
    for db in (plain, tiered):
        _stream(db, 2, first=10)
    same()
    # Retention never drops the snapshot; verify checks it like any segment.
    tiered.prune(now=80000.0)
    assert {s.table for s in tiered.segments()} == {"DiaObject"}
    assert tiered.verify() == []
    plain.close()
    tiered.close()


def test_damaged_or_missing_segment_is_an_error_not_wrong_rows(tmp_path, official_schema):
    url = str(tmp_path / "c.db")
    db = diadb.Apdb.create(url, schema=official_schema, **SEGMENTS)
    _stream(db, 6)
    segments = [s for s in db.segments() if s.table == "DiaSource"]
    db.close()
    directory = Path(url + ".history")
    # One flipped byte keeps the size: the checksum finds it.
    victim = directory / segments[0].name
    pristine = victim.read_bytes()
    raw = bytearray(pristine)
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with diadb.Apdb.open(url) as again:
        problems = again.verify()
        assert len(problems) == 1 and segments[0].name in problems[0] and "checksum" in problems[0]
        # Reads check block checksums too (tests/test_segment_integrity.py has the details).
        with pytest.raises(CorruptSegmentError, match=segments[0].name):
            again.get_sources(EVERYWHERE, 60100.0)
    victim.write_bytes(pristine)
    # A truncated file is refused on read, naming the file.
    truncated = directory / segments[1].name
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with diadb.Apdb.open(url) as again, pytest.raises(CorruptSegmentError, match=segments[1].name):
        again.get_sources(EVERYWHERE, 60100.0)
    (directory / segments[1].name).unlink()
    with diadb.Apdb.open(url) as again, pytest.raises(CorruptSegmentError, match="is missing"):
        again.get_sources(EVERYWHERE, 60100.0)


COMPACT_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import diadb
    db = diadb.Apdb.open({url!r})

    def fault(step):
        if step == {step!r}:
            os.kill(os.getpid(), signal.SIGKILL)

    db.compact(boundary=1e9, fault=fault)
    print("finished", flush=True)
    """
)


def compact_and_die(url: str, step: str) -> None:
    """A compaction of ``url`` in another process, killed with SIGKILL at ``step``."""
    code = COMPACT_AND_DIE.format(root=str(ROOT), url=url, step=step)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _rows_per_visit(url: str) -> tuple[dict[int, int], dict[int, int]]:
    with diadb.Apdb.open(url) as db:
        out = []
        for method in ("get_sources", "get_forced_sources"):
            visits = getattr(db, method)(EVERYWHERE, 70000.0, months=1000, columns=["visit"]).column(0)
            values, counts = np.unique(visits.to_numpy(), return_counts=True)
            out.append(dict(zip(values.tolist(), counts.tolist(), strict=True)))
        return out[0], out[1]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["read", "write_tmp", "rename", "renamed", "objects", "commit", "committed"])
def test_sigkill_at_every_compaction_step_keeps_every_row_once(tmp_path, official_schema, step):
    url = str(tmp_path / "k.db")
    db = diadb.Apdb.create(url, schema=official_schema, history_auto_compact=False)
    _stream(db, 5, n=150)
    db.close()
    expected = {v: 150 for v in range(1, 6)}
    assert _rows_per_visit(url) == (expected, expected)
    compact_and_die(url, step)
    assert _rows_per_visit(url) == (expected, expected)
    with diadb.Apdb.open(url) as again:
        assert again.verify() == []
        moved = sum(s.rows for s in again.segments() if s.table != "DiaObject")
        assert moved == (1500 if step == "committed" else 0)
        before = {s.name for s in again.segments()}
        again.compact(boundary=1e9)  # finishes the job and sweeps the crash's orphan files
        live = {s.name for s in again.segments()}
    assert _rows_per_visit(url) == (expected, expected)
    files = {p.name for p in Path(url + ".history").iterdir()}
    # No temporary or orphan file is left; after "committed" the second compaction merged the
    # spans' segments, whose files wait in the trash for readers that listed them.
    assert files == live | (before - live)
    if step == "committed":  # the five nights' spans lie in one closed 64-day group: merged
        for table in ("DiaSource", "DiaForcedSource"):
            assert [n.split("-")[0] for n in before - live].count(table) == 5
            assert sum(1 for n in live if n.startswith(table + "-")) == 1


READ_WHILE_COMPACTING = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {root!r})
    import diadb
    db = diadb.Apdb.open({url!r})
    bad = 0
    for _ in range(60):
        v = db.get_sources(diadb.Box(0, 360, -90, 90), 70000.0, months=1000, columns=["visit"]).column(0)
        counts = np.unique(v.to_numpy(), return_counts=True)[1]
        bad += int((counts != {n}).sum())
    print("bad", bad, flush=True)
    """
)


@pytest.mark.slow
def test_readers_see_each_row_once_while_compaction_runs(tmp_path, official_schema):
    url = str(tmp_path / "r.db")
    db = diadb.Apdb.create(url, schema=official_schema, **SEGMENTS)
    n = 150
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READ_WHILE_COMPACTING.format(root=str(ROOT), url=url, n=n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    _stream(db, 20, n=n, day_step=1.0)  # a compaction after nearly every store
    for r in readers:
        out, _ = r.communicate(timeout=300)
        assert r.returncode == 0 and out.strip() == "bad 0"
    assert len(db.segments()) >= 5  # 20 nights' spans, merged in groups of 4 and 16
    db.close()


def test_retention_drops_whole_segments_then_their_files(tmp_path, official_schema, monkeypatch):
    url = str(tmp_path / "p.db")
    db = diadb.Apdb.create(
        url, schema=official_schema, history_months=1, retention_grace_days=5.0, **SEGMENTS
    )
    _stream(db, 30, n=50, day_step=4.0)  # visits at days 4..120
    before = db.get_sources(EVERYWHERE, 60120.0, months=100, columns=["midpointMjdTai"]).column(0).to_numpy()
    cutoff = 60120.0 - 30.0 - 5.0  # a closed 64-day group, [59968, 60032), lies before it
    preview = db.prune(dry_run=True)
    assert db.get_sources(EVERYWHERE, 60120.0, months=100).num_rows == len(before)  # dry run changed nothing
    # Whole segments go: a merged group of spans (history_merge_spans) reaching past the cutoff stays.
    kept_from = min(s.span_start for s in db.segments() if s.table == "DiaSource" and s.span_end > cutoff)
    going = {s.name for s in db.segments() if s.table != "DiaObject" and s.span_end <= cutoff}
    assert kept_from <= cutoff
    expected_gone = int((before < kept_from).sum())
    assert preview["DiaSource"]["rows"] == expected_gone > 0
    report = db.prune()
    assert report == preview
    after = db.get_sources(EVERYWHERE, 60120.0, months=100, columns=["midpointMjdTai"]).column(0).to_numpy()
    assert len(after) == len(before) - expected_gone and after.min() >= kept_from
    directory = Path(url + ".history")
    dropped = report["DiaSource"]["segments"] + report["DiaForcedSource"]["segments"]
    assert dropped > 0
    # Files stay for a grace period (a reader may have listed them), then the next compaction deletes them.
    # (So do the segments merged into larger ones, and replaced DiaObject snapshots.)
    files = {f.name for f in directory.iterdir()}
    assert len(going) == dropped and going <= files and {s.name for s in db.segments()} <= files
    assert not going & {s.name for s in db.segments()}
    monkeypatch.setattr(tier_module, "TRASH_GRACE_S", 0.0)
    db.compact()  # sweeps the trash, and may merge spans (their files go to the trash)
    db.compact()  # sweeps that: nothing left to merge
    assert len(list(directory.iterdir())) == len(db.segments())
    db.close()


def test_segment_sources_without_an_object_are_read_by_object_ids(tmp_path, official_schema):
    """A DiaSource of a solar-system object has no ``diaObjectId``: in a segment, a read by object
    ids skips it (it raised ``ArrowInvalid`` from a zero-copy conversion of the nullable ids)."""
    db = diadb.Apdb.create(str(tmp_path / "sso.db"), schema=official_schema, **SEGMENTS)
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    ra, dec = random_positions(20, 9)
    for d in (db, plain):
        visit = make_visit(official_schema, 1, 60001.0, np.arange(1, 21), ra, dec, seed=1)
        sources = visit.sources
        i = sources.schema.get_field_index("diaObjectId")
        ids = pa.array([None, *sources.column(i).to_pylist()[1:]], pa.int64())
        sources = sources.set_column(i, sources.schema.field(i), ids)
        j = sources.schema.get_field_index("ssObjectId")
        sources = sources.set_column(
            j, sources.schema.field(j), pa.array([77, *[None] * (len(ids) - 1)], pa.int64())
        )
        assert d.store(visit.mjd, visit.objects, sources, visit.forced, visit=1)
    db.compact(boundary=1e9)
    assert [s.table for s in db.segments() if s.table == "DiaSource"] == ["DiaSource"]
    wanted = np.array([2, 3, 5], dtype=np.int64)
    for d in (db, plain):
        got = d.get_sources(None, 70000.0, object_ids=wanted, start=float("-inf"), end=float("inf"))
        assert sorted(got.column("diaObjectId").to_pylist()) == sorted(
            i for i in sources.column("diaObjectId").to_pylist() if i in (2, 3, 5)
        )
    assert db.get_sources(EVERYWHERE, 60002.0).equals(plain.get_sources(EVERYWHERE, 60002.0))
    db.close()
    plain.close()


def test_compact_without_tier_is_a_clear_error(tmp_path, official_schema):
    with diadb.Apdb.create(str(tmp_path / "x.db"), schema=official_schema, history_tier=False) as db:
        with pytest.raises(diadb.ConfigError, match="no history tier"):
            db.compact()
        assert db.verify() == [] and db.segments() == []


def test_cli_compact_verify_prune(tmp_path, official_schema):
    from typer.testing import CliRunner

    from diadb.cli import app

    url = str(tmp_path / "cli.db")
    db = diadb.Apdb.create(
        url, schema=official_schema, history_auto_compact=False, history_months=1, retention_grace_days=5.0
    )
    _stream(db, 4, n=30, day_step=20.0)
    db.close()
    runner = CliRunner()
    result = runner.invoke(app, ["compact", url])
    assert result.exit_code == 0 and "compacted 180 rows" in result.output
    assert runner.invoke(app, ["verify", url]).exit_code == 0
    dry = runner.invoke(app, ["prune", url, "--dry-run"])
    # Nights 60020 and 60040 (of 60020..60080) lie before the cutoff, 60045: one segment each.
    assert dry.exit_code == 0 and "DiaSource: would drop 60 rows (2 segment(s))" in dry.output
    seg = next(Path(url + ".history").iterdir())
    seg.write_bytes(b"junk")
    bad = runner.invoke(app, ["verify", url])
    assert bad.exit_code == 1 and seg.name in bad.output


def test_parallel_gather_returns_the_same_rows(tmp_path, official_schema, monkeypatch):
    """Large reads gather segments and columns on a thread pool; forced here for small ones."""
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    tiered = diadb.Apdb.create(str(tmp_path / "tiered.db"), schema=official_schema, **SEGMENTS)
    for db in (plain, tiered):
        _stream(db, 10)
    monkeypatch.setattr(columns_module, "PARALLEL_MIN_ROWS", 0)
    for region in (diadb.Circle(55, -30, 0.4), EVERYWHERE):
        assert plain.get_objects(region).equals(tiered.get_objects(region))
        for method in ("get_sources", "get_forced_sources"):
            assert getattr(plain, method)(region, 60031.0).equals(getattr(tiered, method)(region, 60031.0))
    plain.close()
    tiered.close()


def test_compaction_fetches_and_writes_one_sky_piece_at_a_time(tmp_path, official_schema, monkeypatch):
    """With tiles, a compaction hands the tier one order-2 sky piece at a time when a piece holds
    the row budget (its memory is a piece's rows, not the sky's), sources and DiaObject snapshot
    alike; reads are unchanged."""
    from diadb.history import pieces as pieces_module
    from diadb.history.pieces import compaction_pieces, piece_shift, pixel_counts
    from diadb.history.tier import HistoryTier

    monkeypatch.setattr(pieces_module, "ROWS_PER_FETCH", 1)  # every piece a fetch of its own

    calls: list[tuple[str, np.ndarray]] = []
    write, write_objects = HistoryTier.write, HistoryTier.write_objects

    def spy_write(self, table, rows, fault=None):
        calls.append((table, rows.column("_healpix_29").to_numpy()))
        return write(self, table, rows, fault)

    def spy_objects(self, old, changed, rows, fault=None):
        calls.append(("DiaObject", rows.column("_healpix_29").to_numpy()))
        return write_objects(self, old, changed, rows, fault)

    monkeypatch.setattr(HistoryTier, "write", spy_write)
    monkeypatch.setattr(HistoryTier, "write_objects", spy_objects)
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    tiled = diadb.Apdb.create(
        str(tmp_path / "tiled.db"), schema=official_schema, **{**SEGMENTS, "history_tile_order": 3}
    )
    places = [(10.0, 40.0), (100.0, -20.0), (200.0, 5.0), (300.0, -60.0)]
    for v in range(1, 7):
        ra = np.concatenate([random_positions(50, v, ra0=a, dec0=d)[0] for a, d in places])
        dec = np.concatenate([random_positions(50, v, ra0=a, dec0=d)[1] for a, d in places])
        ids = np.arange(1, len(ra) + 1) + (v % 2) * 10_000
        visit = make_visit(official_schema, v, 60000.0 + 2 * v, ids, ra, dec, seed=v)
        for db in (plain, tiled):
            assert db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)
    pieces = compaction_pieces(3)
    assert len(pieces) == 192
    by_table: dict[str, int] = {}
    for table, pixels in calls:
        if len(pixels):
            assert len(pixel_counts(pixels, piece_shift(pieces))) == 1, table  # one piece per call
            by_table[table] = by_table.get(table, 0) + 1
    # Four places in four pieces: at least four calls per table and compaction.
    assert min(by_table.values()) >= 4 and set(by_table) == {"DiaSource", "DiaForcedSource", "DiaObject"}
    for method in ("get_sources", "get_forced_sources"):
        assert getattr(plain, method)(EVERYWHERE, 60013.0).equals(getattr(tiled, method)(EVERYWHERE, 60013.0))
    assert plain.get_objects(EVERYWHERE).equals(tiled.get_objects(EVERYWHERE))
    assert len([s for s in tiled.segments() if s.table == "DiaObject"]) >= 4
    plain.close()
    tiled.close()


def test_an_untiled_database_writes_its_object_snapshot_one_tile_at_a_time(
    tmp_path, official_schema, monkeypatch
):
    """Sources untiled (SQLite's default), the DiaObject snapshot still cut by order-2 tile and
    handed to the tier one piece at a time (issue 16 class 8: rewritten whole, it made a store's
    memory grow by 2.46x its input); a compaction rewrites only the tiles that changed; a
    snapshot written before it was tiled (one segment over the sky) is rebuilt into tiles once."""
    from diadb.history import pieces as pieces_module
    from diadb.history.tier import HistoryTier

    monkeypatch.setattr(pieces_module, "ROWS_PER_FETCH", 1)
    calls: list[np.ndarray] = []
    write_objects = HistoryTier.write_objects

    def spy_objects(self, old, changed, rows, fault=None):
        calls.append(rows.column("_healpix_29").to_numpy())
        return write_objects(self, old, changed, rows, fault)

    monkeypatch.setattr(HistoryTier, "write_objects", spy_objects)
    plain = diadb.Apdb.create(str(tmp_path / "plain.db"), schema=official_schema, history_tier=False)
    tiered = diadb.Apdb.create(str(tmp_path / "tiered.db"), schema=official_schema, **SEGMENTS)
    tier = tiered._tier
    places = [(10.0, 40.0), (100.0, -20.0), (200.0, 5.0), (300.0, -60.0)]

    def visit(v: int, where: list[tuple[float, float]]) -> None:
        ra = np.concatenate([random_positions(50, v, ra0=a, dec0=d)[0] for a, d in where])
        dec = np.concatenate([random_positions(50, v, ra0=a, dec0=d)[1] for a, d in where])
        ids = np.arange(1, len(ra) + 1) + 100_000 * v
        x = make_visit(official_schema, v, 60000.0 + 2 * v, ids, ra, dec, seed=v)
        for db in (plain, tiered):
            assert db.store(x.mjd, x.objects, x.sources, x.forced, visit=v)

    def same() -> None:
        assert plain.get_objects(EVERYWHERE).equals(tiered.get_objects(EVERYWHERE))
        for a, d in places:
            region = diadb.Circle(a, d, 1.0)
            assert plain.get_objects(region).equals(tiered.get_objects(region))

    # A snapshot as written before tiles: one segment over the whole sky.
    monkeypatch.setattr(tier, "snapshot_tile_order", None)
    visit(1, places)
    visit(2, places)
    (legacy,) = [s for s in tiered.segments() if s.table == "DiaObject"]
    assert legacy.pix_max - legacy.pix_min > 1 << 56
    same()
    monkeypatch.setattr(tier, "snapshot_tile_order", 2)
    calls.clear()
    visit(3, places[:1])
    visit(4, places[:1])  # compacts visit 3: the legacy snapshot is rebuilt into tiles
    snapshots = [s for s in tiered.segments() if s.table == "DiaObject"]
    every = tiered.get_objects(EVERYWHERE).column("_healpix_29").to_numpy()
    assert legacy.name not in {s.name for s in snapshots} and len(snapshots) == len(np.unique(every >> 54))
    assert len(snapshots) >= 4
    assert all(s.pix_min >> 54 == s.pix_max >> 54 for s in snapshots)
    assert all(len(np.unique(p >> 54)) <= 1 for p in calls) and sum(len(p) > 0 for p in calls) >= 4
    assert len([s for s in tiered.segments() if s.table == "DiaSource"]) >= 3  # sources: per span
    assert any(s.pix_min >> 54 != s.pix_max >> 54 for s in tiered.segments() if s.table == "DiaSource")
    same()
    # New objects in one place: only that tile is rewritten.
    visit(5, places[:1])
    visit(6, places[:1])
    now = [s for s in tiered.segments() if s.table == "DiaObject"]
    here = tiered.get_objects(diadb.Circle(*places[0], 3.0)).column("_healpix_29").to_numpy()
    assert len({s.name for s in now} - {s.name for s in snapshots}) == len(np.unique(here >> 54))
    assert len(now) == len(snapshots)
    same()
    assert tiered.verify() == []
    plain.close()
    tiered.close()


def test_compaction_pieces_and_grouping():
    from diadb.history.pieces import (
        NPIX29,
        WHOLE_SKY,
        compaction_pieces,
        fetch_runs,
        piece_shift,
        pixel_counts,
    )

    assert compaction_pieces(None) == list(WHOLE_SKY) == [(0, NPIX29)]
    assert len(compaction_pieces(1)) == 48 and len(compaction_pieces(9)) == 192
    assert piece_shift(WHOLE_SKY) is None and piece_shift(compaction_pieces(4)) == 54
    pieces = compaction_pieces(5)
    assert pieces[0][0] == 0 and pieces[-1][1] == NPIX29
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    pixels = np.array([NPIX29 - 1, 0, pieces[7][0], pieces[7][1] - 1, 5])
    # Rows per piece index: two in the first piece, two in the eighth, one in the last.
    assert pixel_counts(pixels, piece_shift(pieces)) == {0: 2, 7: 2, len(pieces) - 1: 1}
    # Runs: neighbouring listed pieces up to the budget; a piece over it alone; 0 rows visited.
    assert fetch_runs(pieces, {0: 3, 1: 4, 5: 10, 6: 0, 100: 1}, budget=8) == [
        (pieces[0][0], pieces[1][1]),
        (pieces[5][0], pieces[5][1]),
        (pieces[6][0], pieces[100][1]),
    ]
    assert fetch_runs(pieces, {}) == []
