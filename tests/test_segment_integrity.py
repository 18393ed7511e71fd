"""History segments are never a wrong answer: damage is an error naming the file; names and spans
do not depend on the magnitude of the values in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import diadb
from diadb.history import segment as segment_module
from diadb.history.segment import (
    CorruptSegmentError,
    file_checksum,
    map_segment,
    verify_segment,
    write_segment,
)
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)
SEGMENTS = {"history_span_days": 1.0, "history_span_offset_days": 0.0, "history_compact_lag_days": 0.0}


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
    file name: every later compaction (so every store) failed, even after reopening. The store is
    refused now (the value domain); the names are bounded whatever the span (below)."""
    url = str(tmp_path / "big.db")
    db = diadb.Apdb.create(url, schema=official_schema, **SEGMENTS)
    with pytest.raises(diadb.CatalogError, match="validityStartMjdTai"):
        _store(db, 1, validityStartMjdTai=1e300)
    db.close()
    with diadb.Apdb.open(url) as again:
        for visit in (2, 4, 5):
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


# ---- damaged segments (class 3) ---------------------------------------------------------

READS = {"DiaSource": "get_sources", "DiaForcedSource": "get_forced_sources", "DiaObject": "get_objects"}
IDS = {"DiaSource": "diaSourceId", "DiaForcedSource": "diaForcedSourceId", "DiaObject": "diaObjectId"}
FIELD = diadb.Circle(55.2, -30.1, 0.3)


def _read(db: diadb.Apdb, table: str, region: diadb.Region) -> pa.Table:
    if table == "DiaObject":
        return db.get_objects(region)
    result: pa.Table = getattr(db, READS[table])(region, 60100.0, months=1000)
    return result


def _answers(db: diadb.Apdb) -> dict[tuple[str, int], pa.Table]:
    return {(t, i): _read(db, t, region) for t in READS for i, region in enumerate((EVERYWHERE, FIELD))}


@pytest.fixture(scope="module", params=[None, 4096], ids=["64KiB-blocks", "4KiB-blocks"])
def damaged_db(request, tmp_path_factory, official_schema):
    """A database whose source rows all live in segments, its pristine answers, and one segment
    of each table (name, path). With 4 KiB blocks a field read touches only some blocks."""
    url = str(tmp_path_factory.mktemp("damage") / "d.db")
    db = diadb.Apdb.create(url, schema=official_schema, **SEGMENTS)
    with pytest.MonkeyPatch.context() as patch:
        if request.param:
            patch.setattr(segment_module, "BLOCK_SIZE", request.param)
        for visit in range(1, 7):
            _store(db, visit, n=300)
        db.compact(boundary=1e9)
    assert db.get_sources(EVERYWHERE, 60100.0, months=1000).num_rows == 1800
    answers = _answers(db)
    victims = {}
    for table in READS:
        info = next(s for s in db.segments() if s.table == table)
        victims[table] = (info.name, Path(url + ".history") / info.name)
    assert db.verify() == []
    yield db, answers, victims, bool(request.param)
    db.close()


class _Flip:
    """XOR one byte of a file in place, and put it back."""

    def __init__(self, path: Path, offset: int, mask: int = 0xFF) -> None:
        self.path, self.offset, self.mask = path, offset, mask

    def _apply(self) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.offset)
            byte = f.read(1)[0]
            f.seek(self.offset)
            f.write(bytes([byte ^ self.mask]))

    def __enter__(self) -> _Flip:
        self._apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self._apply()  # XOR again: the original byte


def _regions(path: Path, table: str) -> dict[str, int]:
    """A byte inside each part of a segment file: column buffers, messages, footer, block table."""
    raw = path.read_bytes()
    whole = pa.py_buffer(raw)
    reader = pa.ipc.open_file(whole)
    data = reader.read_all()

    def buffer(column: str, which: int) -> int:
        buf = data.column(column).chunk(0).buffers()[which]
        assert buf is not None and buf.size > 0, (column, which)
        return int(buf.address - whole.address) + buf.size // 2

    schema_len = int.from_bytes(raw[12:16], "little")
    batch_at = 16 + schema_len
    batch_len = int.from_bytes(raw[batch_at + 4 : batch_at + 8], "little")
    footer_len = int.from_bytes(raw[-10:-6], "little")
    footer_at = len(raw) - 10 - footer_len
    digests = (reader.metadata or {}).get(b"diadb.block_xxh3_64")
    regions = {
        "ra data": buffer("ra", 1),
        "_healpix_29 data": buffer("_healpix_29", 1),
        "id data": buffer(IDS[table], 1),
        "file magic": 3,
        "schema message": 16 + schema_len // 2,
        "batch metadata": batch_at + 8 + batch_len // 2,
        "footer": footer_at + 8,
        "footer length": len(raw) - 9,
        "trailing magic": len(raw) - 2,
    }
    if digests is not None:  # (segments written before block checksums have none)
        regions["block table"] = raw.index(digests) + len(digests) // 2
    if table != "DiaObject":
        regions["band string bytes"] = buffer("band", 2)
        regions["band string offsets"] = buffer("band", 1)
    if table == "DiaSource":
        regions["ssObjectId validity bitmap"] = buffer("ssObjectId", 0)
    return regions


@pytest.mark.parametrize("table", list(READS))
def test_a_flipped_byte_in_any_part_of_a_segment_is_an_error_naming_it(damaged_db, table):
    db, answers, victims, _ = damaged_db
    name, path = victims[table]
    for region, offset in _regions(path, table).items():
        with _Flip(path, offset):
            assert db.tier is not None
            db.tier.release()  # a process's first read of the damaged file
            with pytest.raises(CorruptSegmentError, match=name):
                _read(db, table, EVERYWHERE)
            problems = db.verify()
            assert len(problems) == 1 and name in problems[0] and "checksum" in problems[0], region
        db.tier.release()
        assert _read(db, table, EVERYWHERE).equals(answers[(table, 0)]), region


def test_no_flipped_byte_anywhere_changes_an_answer(damaged_db):
    """Random single-bit flips over whole files: a field read either raises CorruptSegmentError
    naming the file or returns exactly the pristine rows; a whole-sky read (it uses every byte)
    always raises; verify always names the file."""
    db, answers, victims, small_blocks = damaged_db
    rng = np.random.default_rng(20261201)
    outcomes = {"field refused": 0, "field right": 0}
    for table, (name, path) in victims.items():
        size = path.stat().st_size
        for offset in rng.integers(0, size, 40).tolist():
            with _Flip(path, offset, 1 << int(rng.integers(8))):
                db.tier.release()
                with pytest.raises(CorruptSegmentError, match=name):
                    _read(db, table, EVERYWHERE)
                db.tier.release()
                try:
                    result = _read(db, table, FIELD)
                except CorruptSegmentError as e:
                    assert name in str(e)
                    outcomes["field refused"] += 1
                else:
                    assert result.equals(answers[(table, 1)]), (table, offset)
                    outcomes["field right"] += 1
                problems = db.verify()
                assert len(problems) == 1 and name in problems[0], (table, offset)
    assert outcomes["field refused"] > 0 and sum(outcomes.values()) == 120, outcomes
    if small_blocks:  # a field read touches only some blocks: flips elsewhere do not stop it
        assert outcomes["field right"] > 0, outcomes
    db.tier.release()
    for key, answer in _answers(db).items():
        assert answer.equals(answers[key]), key


def test_reads_check_only_the_blocks_they_touch(tmp_path):
    """A long-lived reader checks each block once; blocks no read touches are never checked, and
    damage there does not stop reads elsewhere (they return the right rows)."""
    n = 20_000
    data = pa.table(
        {
            "_healpix_29": pa.array(np.arange(n, dtype=np.int64) * 10),
            "t": pa.array(np.full(n, 0.5)),
            "x": pa.array(np.arange(n, dtype=np.float64)),
        }
    )
    info = write_segment(tmp_path, "DiaSource", data, "t", (0.0, 1.0), block_size=4096)
    segment = map_segment(tmp_path, info)
    near = np.array([[0, 1000]], np.int64)  # the first 100 rows
    rows = segment.locate(near)
    segment.check(["x"], rows)
    assert rows.tolist() == list(range(100)) and 0 < segment._verified.mean() < 0.1
    # Damage the last rows of x; a fresh map still reads the first rows, and refuses the last.
    x = segment.table.column("x").chunk(0).buffers()[1]
    at = int(x.address - segment._base) + x.size - 8
    del segment
    with _Flip(tmp_path / info.name, at):
        fresh = map_segment(tmp_path, info)
        rows = fresh.locate(near)
        fresh.check(["x"], rows)
        assert fresh.table.column("x").to_numpy()[rows].tolist() == list(range(100))
        far = fresh.locate(np.array([[10 * (n - 5), 10 * n]], np.int64))
        with pytest.raises(CorruptSegmentError, match=info.name):
            fresh.check(["x"], far)
        with pytest.raises(CorruptSegmentError, match="block"):
            verify_segment(tmp_path, info)


def _to_legacy(url: str) -> None:
    """Rewrite every segment as diadb wrote them before block checksums: a plain Arrow file
    whose manifest checksum is the blake2b-128 of the whole file."""
    import sqlite3

    directory = Path(url + ".history")
    conn = sqlite3.connect(url)
    for (name,) in conn.execute("SELECT name FROM diadb_segment").fetchall():
        path = directory / name
        data = pa.ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
            writer.write_table(data, max_chunksize=max(data.num_rows, 1))
        conn.execute(
            "UPDATE diadb_segment SET bytes = ?, checksum = ? WHERE name = ?",
            [path.stat().st_size, file_checksum(path), name],
        )
    conn.commit()
    conn.close()


def test_old_segments_are_checked_whole_on_first_open(tmp_path, official_schema):
    url = str(tmp_path / "old.db")
    db = diadb.Apdb.create(url, schema=official_schema, **SEGMENTS)
    for visit in range(1, 5):
        _store(db, visit, n=200)
    db.compact(boundary=1e9)
    answers = _answers(db)
    db.close()
    _to_legacy(url)
    with diadb.Apdb.open(url) as old:
        assert all(":" not in s.checksum for s in old.segments())
        assert _answers(old).keys() == answers.keys()
        for key, answer in _answers(old).items():
            assert answer.equals(answers[key]), key
        assert old.verify() == []
        # Per table, its biggest segment (the DiaObject snapshot has one per tile), which the
        # field's read touches.
        victims = {s.table: s.name for s in sorted(old.segments(), key=lambda s: s.rows)}
    directory = Path(url + ".history")
    for table, name in victims.items():
        size = (directory / name).stat().st_size
        for offset in (100, size // 2, size - 20, size - 3):  # schema, data, footer, magic
            with _Flip(directory / name, offset), diadb.Apdb.open(url) as old:
                with pytest.raises(CorruptSegmentError, match=name):
                    _read(old, table, FIELD)
                problems = old.verify()
                assert len(problems) == 1 and name in problems[0] and "checksum" in problems[0]


# ---- the engine's own file ----------------------------------------------------------------


def test_verify_reports_a_damaged_sqlite_file(tmp_path, official_schema):
    import sqlite3

    from typer.testing import CliRunner

    from diadb.cli import app

    url = str(tmp_path / "engine.db")
    db = diadb.Apdb.create(url, schema=official_schema, history_tier=False)
    for visit in range(1, 5):
        _store(db, visit, n=300)
    assert db.verify() == []
    db.close()
    conn = sqlite3.connect(url)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'diadb_DiaSource_pk'").fetchone()[0]
    conn.close()
    with open(url, "r+b") as f:  # scribble over the index's root page, past its header
        f.seek((root - 1) * page_size + 100)
        f.write(b"\x5a" * (page_size - 200))
    with diadb.Apdb.open(url) as damaged:
        problems = damaged.verify()
    assert problems and all(url in line for line in problems)
    result = CliRunner().invoke(app, ["verify", url])
    assert result.exit_code == 1 and url in result.output


# ---- order (issue "Never a wrong answer", class 8: no copy for rows already in order) -------


@settings(max_examples=200, deadline=None)
@given(
    pixels=st.lists(st.integers(0, 5), min_size=0, max_size=30),
    times=st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=30, max_size=30),
    presort=st.booleans(),
)
def test_a_segment_is_in_pixel_then_time_order_whether_or_not_its_rows_came_sorted(
    tmp_path_factory, pixels, times, presort
):
    """Rows already in (pixel, time) order are written as they are (no sorting copy); others
    are sorted; both give the same file rows as sorting always would (a stable sort)."""
    n = len(pixels)
    data = pa.table(
        {
            "_healpix_29": pa.array(pixels, pa.int64()),
            "midpointMjdTai": pa.array(times[:n], pa.float64()),
            "row": pa.array(np.arange(n), pa.int64()),
        }
    )
    keys = [("_healpix_29", "ascending"), ("midpointMjdTai", "ascending")]
    if presort and n:
        data = data.take(pc.sort_indices(data, keys))
    expected = data.take(pc.sort_indices(data, keys))
    assert segment_module._in_order(data, ["_healpix_29", "midpointMjdTai"]) == expected.equals(data)
    if not n:
        return
    where = tmp_path_factory.mktemp("order")
    info = write_segment(where, "DiaSource", data, "midpointMjdTai", (0.0, 4.0))
    assert map_segment(where, info).checked_table().equals(expected)
