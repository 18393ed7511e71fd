"""Never a wrong answer: keys unique across tiers, a store's outcome is what happened to it,
read-only means read-only, a full disk is a StorageError (issue "Never a wrong answer",
classes 1, 4 and 5)."""

from __future__ import annotations

import errno
import logging
import sqlite3

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import diadb
from diadb.cli import app
from diadb.errors import CatalogError, ConfigError, SchemaVersionError, StorageError
from diadb.history import segment as segment_module
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)
SEGMENTS = {"history_span_days": 1.0, "history_span_offset_days": 0.0, "history_compact_lag_days": 0.0}


def _visit(db: diadb.Apdb, v: int, ids: np.ndarray, mjd: float | None = None):  # type: ignore[no-untyped-def]
    ra, dec = random_positions(len(ids), 7)
    return make_visit(db.schema, v, 60000.0 + 2 * v if mjd is None else mjd, ids, ra, dec, seed=v)


@pytest.fixture
def tiered(tmp_path, official_schema):  # type: ignore[no-untyped-def]
    db = diadb.Apdb.create(str(tmp_path / "apdb.db"), schema=official_schema, **SEGMENTS)
    yield db
    db.close()


def test_source_key_in_a_segment_is_refused_again(tiered):
    first = _visit(tiered, 1, np.arange(1, 51))
    assert tiered.store(first.mjd, first.objects, first.sources, first.forced, visit=1)
    later = _visit(tiered, 2, np.arange(1, 51))
    tiered.store(later.mjd, later.objects, later.sources, later.forced, visit=2)
    tiered.compact(boundary=later.mjd + 1)
    assert tiered.stats()["DiaSource"]["rows"] == 0, "every source row is in a segment now"
    # Visit 3 reuses three DiaSource ids of visit 1 (now in a segment).
    third = _visit(tiered, 3, np.arange(1, 51))
    reused = third.sources.set_column(
        third.sources.schema.get_field_index("diaSourceId"),
        "diaSourceId",
        pa.array(
            np.concatenate([first.sources.column("diaSourceId").to_numpy()[:3], np.arange(10**9, 10**9 + 47)])
        ),
    )
    with pytest.raises(CatalogError, match="already stored by another visit") as err:
        tiered.store(third.mjd, third.objects, reused, third.forced, visit=3)
    assert err.value.table == "DiaSource" and err.value.rows == [0, 1, 2]
    assert not tiered.contains_visit_detector(3), "nothing was written"
    rows = tiered.get_sources(EVERYWHERE, third.mjd + 1)
    assert len(np.unique(rows.column("diaSourceId").to_numpy())) == rows.num_rows == 100


def test_forced_key_in_a_segment_is_refused_for_another_keyed_store(tiered):
    first = _visit(tiered, 1, np.arange(1, 21))
    assert tiered.store(first.mjd, first.objects, first.sources, first.forced, visit=1, key="a")
    tiered.compact(boundary=first.mjd + 1)
    # Another keyed store of the same visit/detector carries the same forced-source keys.
    again = _visit(tiered, 1, np.arange(1, 21))
    sources = again.sources.set_column(
        again.sources.schema.get_field_index("diaSourceId"), "diaSourceId", pa.array(np.arange(5000, 5020))
    )
    with pytest.raises(CatalogError, match="already stored") as err:
        tiered.store(again.mjd, again.objects, sources, again.forced, visit=1, key="b")
    assert err.value.table == "DiaForcedSource"
    # The retry of a store that did land (same key) is still a no-op, not an error.
    assert tiered.store(first.mjd, first.objects, first.sources, first.forced, visit=1, key="a") is False


def test_a_retried_store_after_compaction_is_a_no_op(tiered):
    first = _visit(tiered, 1, np.arange(1, 21))
    assert tiered.store(first.mjd, first.objects, first.sources, first.forced, visit=1)
    tiered.compact(boundary=first.mjd + 1)
    assert tiered.store(first.mjd, first.objects, first.sources, first.forced, visit=1) is False
    assert tiered.get_sources(EVERYWHERE, first.mjd).num_rows == 20


def test_a_failing_automatic_compaction_does_not_change_the_store_outcome(tiered, monkeypatch, caplog):
    visits = [_visit(tiered, v, np.arange(1, 31)) for v in range(1, 5)]
    real_write = segment_module.write_segment
    full = {"on": True}

    def no_space(*args, **kwargs):  # type: ignore[no-untyped-def]
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr("diadb.history.tier.write_segment", no_space)
    with caplog.at_level(logging.WARNING, logger="diadb.history"):
        for v in visits[:3]:
            assert tiered.store(v.mjd, v.objects, v.sources, v.forced, visit=v.visit) is True
    assert isinstance(tiered.compaction_error, StorageError)
    assert "No space left" in str(tiered.compaction_error)
    assert any("automatic compaction" in r.message for r in caplog.records)
    # The retried store (the caller saw True, but a careful one retries) is a no-op.
    assert (
        tiered.store(visits[2].mjd, visits[2].objects, visits[2].sources, visits[2].forced, visit=3) is False
    )
    assert tiered.segments() == [] and tiered.get_sources(EVERYWHERE, visits[2].mjd).num_rows == 90
    # Space again: the next store's compaction catches up.
    full["on"] = False
    v = visits[3]
    assert tiered.store(v.mjd, v.objects, v.sources, v.forced, visit=4) is True
    assert tiered.compaction_error is None and tiered.segments()
    assert tiered.get_sources(EVERYWHERE, v.mjd).num_rows == 120


def test_a_full_disk_during_compact_is_a_storage_error_and_loses_nothing(tiered, monkeypatch):
    for v in range(1, 4):
        visit = _visit(tiered, v, np.arange(1, 31))
        tiered.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)
    before = tiered.get_sources(EVERYWHERE, 60010.0)

    def no_space(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("diadb.history.tier.write_segment", no_space)
    with pytest.raises(StorageError, match="No space left"):
        tiered.compact(boundary=60100.0)
    monkeypatch.undo()
    assert tiered.get_sources(EVERYWHERE, 60010.0).equals(before)


def _newer_layout(url: str) -> None:
    con = sqlite3.connect(url)
    con.execute("UPDATE diadb_metadata SET value = '1.9.0' WHERE key = 'diadb.layout_version'")
    con.commit()
    con.close()


def test_read_only_means_read_only(tmp_path, official_schema):
    url = str(tmp_path / "apdb.db")
    with diadb.Apdb.create(url, schema=official_schema, **SEGMENTS) as db:
        for v in (1, 2):
            visit = _visit(db, v, np.arange(1, 11))
            db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)
        sources = db.get_sources(EVERYWHERE, 60010.0)
    _newer_layout(url)
    with diadb.Apdb.open(url) as db:
        assert db.read_only
        before = sorted(db.tier.store.names())
        for call in (
            lambda: db.compact(),
            lambda: db.compact(boundary=60100.0),
            lambda: db.prune(now=70000.0),
            lambda: db.withdraw_sources([int(sources.column("diaSourceId")[0].as_py())]),
            lambda: db.set_validity_end([1], 60010.0),
            lambda: db.mark_published([1]),
            lambda: db.set_user_metadata({"a": "b"}),
        ):
            with pytest.raises(SchemaVersionError, match="read-only"):
                call()
        after = sorted(db.tier.store.names())
        assert before == after, "no segment file was written"
        assert db.get_sources(EVERYWHERE, 60010.0).equals(sources)
    result = CliRunner().invoke(app, ["compact", url])
    assert result.exit_code == 2 and "read-only" in result.output


class _FailingCursor:
    """A cursor whose ROLLBACK (and optionally COMMIT) fail: what a dying disk does."""

    def __init__(self, real, fail: set[str]):  # type: ignore[no-untyped-def]
        self._real, self._fail, self.closed = real, fail, False

    def execute(self, sql, *args, **kwargs):  # type: ignore[no-untyped-def]
        import adbc_driver_manager

        if sql.strip().upper() in self._fail:
            raise adbc_driver_manager.OperationalError(
                f"{sql}: disk I/O error", status_code=adbc_driver_manager.AdbcStatusCode.IO
            )
        return self._real.execute(sql, *args, **kwargs)

    def close(self) -> None:
        self.closed = True
        self._real.close()

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._real, name)


@pytest.mark.parametrize("fail", [{"ROLLBACK"}, {"COMMIT", "ROLLBACK"}])
def test_a_failed_rollback_neither_hides_the_error_nor_leaks_the_cursor(tmp_path, monkeypatch, fail):
    from diadb.backends.sqlite.connection import SqliteConnection

    conn = SqliteConnection(str(tmp_path / "x.db"), create=True)
    made: list[_FailingCursor] = []
    real_cursor = SqliteConnection.cursor

    def cursor(self):  # type: ignore[no-untyped-def]
        made.append(_FailingCursor(real_cursor(self), fail))
        return made[-1]

    monkeypatch.setattr(SqliteConnection, "cursor", cursor)
    if "COMMIT" in fail:
        # The commit fails: a StorageError, whose note says the rollback failed too.
        with pytest.raises(StorageError, match="COMMIT") as err, conn.transaction() as cur:
            cur.execute("CREATE TABLE t (x INTEGER)")
    else:
        # The body fails: that error is the one raised, the rollback's failure is a note on it.
        with pytest.raises(ValueError, match="the real error") as err, conn.transaction() as cur:
            cur.execute("CREATE TABLE t (x INTEGER)")
            raise ValueError("the real error")
    assert any("ROLLBACK that followed failed" in note for note in err.value.__notes__)
    assert made and all(c.closed for c in made)
    conn.close()


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failing_fsync_or_rename_during_compaction_loses_nothing(tiered, monkeypatch, step):
    import os

    for v in range(1, 4):
        visit = _visit(tiered, v, np.arange(1, 31))
        tiered.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v)
    before = tiered.get_sources(EVERYWHERE, 60010.0)
    live = tiered.segments()
    assert tiered.stats()["DiaSource"]["rows"] > 0, "rows left to compact"

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EIO, f"{step}: Input/output error")

    monkeypatch.setattr(os, step, broken)
    with pytest.raises(StorageError, match="Input/output error"):
        tiered.compact(boundary=60100.0)
    monkeypatch.undo()
    assert tiered.segments() == live
    assert tiered.get_sources(EVERYWHERE, 60010.0).equals(before)
    assert tiered.compact(boundary=60100.0), "a later compaction succeeds"
    assert tiered.stats()["DiaSource"]["rows"] == 0
    assert tiered.get_sources(EVERYWHERE, 60010.0).equals(before)


def test_contains_visit_detector_refuses_what_is_not_a_visit(tiered):
    visit = _visit(tiered, 1, np.arange(1, 6))
    tiered.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=1)
    assert tiered.contains_visit_detector(1) and tiered.contains_visit_detector(np.int64(1), 0)
    assert tiered.contains_visit_detector(1.0)
    for bad in (1.5, True, "1"):
        with pytest.raises(ConfigError, match="visit"):
            tiered.contains_visit_detector(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="detector"):
        tiered.contains_visit_detector(1, -1)
