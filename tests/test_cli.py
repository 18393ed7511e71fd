"""The command line: every diadb error is one line on stderr and exit 2, for every command; the
``partitions`` command through the public Apdb calls (SQLite refuses it; PostgreSQL and Cassandra
list, create ahead and drop)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

import diadb
from diadb.backends.base import TimePartition
from diadb.cli import app
from diadb.schema import ApdbSchema
from diadb.times import mjd_tai
from tests.conftest import make_url
from tests.helpers import make_visit, random_positions

SOURCE_TABLES = ("DiaSource", "DiaForcedSource")


def _invoke(args: list[object]) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _assert_one_line_error(result: Result, message: str = "") -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    assert not result.stdout.strip(), result.stdout  # (a progress bar may leave a newline)
    err = result.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    """A file that is not a diadb database (as /etc/hostname is not)."""
    path = tmp_path / "hostname"
    path.write_text("some-host\n")
    return path


#: Each command, run on a file that is not a diadb database (or with input diadb refuses).
FOREIGN_FILE_CALLS = {
    "create": lambda f, t: ["create", f],
    "stats": lambda f, t: ["stats", f],
    "stats --json": lambda f, t: ["stats", "--json", f],
    "compact": lambda f, t: ["compact", f],
    "verify": lambda f, t: ["verify", f],
    "upgrade": lambda f, t: ["upgrade", f],
    "prune": lambda f, t: ["prune", f],
    "prune --dry-run": lambda f, t: ["prune", "--dry-run", f],
    "simulate --after": lambda f, t: ["simulate", f, "--after", "1", "--visits", "1"],
    "export": lambda f, t: ["export", f, t / "export"],
    "restore": lambda f, t: ["restore", f, t / "new.db"],
    "partitions show": lambda f, t: ["partitions", "show", f],
    "partitions create": lambda f, t: ["partitions", "create", f, "--ahead", "2"],
    "partitions drop": lambda f, t: ["partitions", "drop", f, "--before", "60000"],
    "repair": lambda f, t: ["repair", f, "--min-age", "0"],
    "status": lambda f, t: ["status", f],
    "status --json": lambda f, t: ["status", "--json", f],
    "metadata show": lambda f, t: ["metadata", "show", f],
    "metadata get": lambda f, t: ["metadata", "get", f, "k"],
    "metadata set": lambda f, t: ["metadata", "set", f, "k", "v"],
    "metadata delete": lambda f, t: ["metadata", "delete", f, "k"],
    "chunks list": lambda f, t: ["chunks", "list", f],
    "chunks delete": lambda f, t: ["chunks", "delete", f, "--all-published"],
    "index list": lambda f, t: ["index", "list"],
    "sizing": lambda f, t: ["sizing", "--summary", f, "--years", "1"],
    "bench": lambda f, t: ["bench", "--profile", "ci", "--visits", "1", "--url", f, "--out", t / "b"],
    "demo": lambda f, t: ["demo", "--out", t / "d", "--visits", "0"],
    "build": lambda f, t: ["build", f, "--profile", "ci", "--months", "0.1"],
    "bench --after": lambda f, t: ["bench", "--profile", "ci", "--after", f, "--out", t / "b"],
}


def _commands() -> dict[str, object]:
    """Every command by its full name (``partitions show``), with its callback."""
    found: dict[str, object] = {}
    for c in app.registered_commands:
        assert c.callback is not None
        found[c.name or c.callback.__name__] = c.callback
    for group in app.registered_groups:
        assert group.typer_instance is not None
        for c in group.typer_instance.registered_commands:
            assert c.callback is not None and c.name
            found[f"{group.name} {c.name}"] = c.callback
    return found


def test_every_command_is_covered_and_maps_errors() -> None:
    """Every command goes through the CLI's error mapping, and the test below runs each one."""
    commands = _commands()
    covered = {" ".join(w for w in call.split() if not w.startswith("-")) for call in FOREIGN_FILE_CALLS}
    assert set(commands) == covered
    for callback in commands.values():
        # Registered through diadb.cli_support.command, which maps diadb.Error to one line and exit 2.
        assert hasattr(callback, "__wrapped__"), callback


@pytest.mark.parametrize("call", sorted(FOREIGN_FILE_CALLS))
def test_a_diadb_error_is_one_line_and_exit_2(call: str, foreign: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _assert_one_line_error(_invoke(FOREIGN_FILE_CALLS[call](foreign, tmp_path)))


def test_the_installed_command_on_a_foreign_file(foreign: Path) -> None:
    """``diadb stats <a text file>`` as a shell runs it: one line on stderr, exit 2."""
    script = Path(sys.executable).with_name("diadb")
    done = subprocess.run([str(script), "stats", str(foreign)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert str(foreign) in done.stderr


# ---- partitions ----------------------------------------------------------------------
def test_repair_on_sqlite_has_nothing_to_do(tmp_path: Path, official_schema: ApdbSchema) -> None:
    """Each store and daytime call is one transaction there (Cassandra's repair is tested in
    tests/test_cassandra_visibility.py); a negative age is refused."""
    url = tmp_path / "a.db"
    diadb.Apdb.create(str(url), schema=official_schema).close()
    result = _invoke(["repair", url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "completed_updates": [],
        "finished_stores": [],
        "removed_stores": [],
        "incomplete_stores": [],
        "in_progress": 0,
    }
    _assert_one_line_error(_invoke(["repair", url, "--min-age", "-1"]), "min_age_s must be >= 0")


def test_partitions_on_sqlite_is_a_clear_error(tmp_path: Path, official_schema: ApdbSchema) -> None:
    url = str(tmp_path / "apdb.db")
    diadb.Apdb.create(url, schema=official_schema).close()
    for args in (["show"], ["create", "--ahead", "2"], ["drop", "--before", "60000"]):
        _assert_one_line_error(_invoke(["partitions", args[0], url, *args[1:]]), "no time-partition tables")


def test_partitions_refuses_a_negative_count(tmp_path: Path, official_schema: ApdbSchema) -> None:
    url = str(tmp_path / "apdb.db")
    diadb.Apdb.create(url, schema=official_schema).close()
    _assert_one_line_error(_invoke(["partitions", "create", url, "--ahead", "-1"]), "--ahead")


@pytest.fixture(params=["postgresql", "cassandra"])
def partitioned_url(request: pytest.FixtureRequest, tmp_path: Path, official_schema: ApdbSchema) -> str:
    """A new, empty APDB on an engine with time partitions."""
    url = make_url(str(request.param), tmp_path, request)
    diadb.Apdb.create(url, schema=official_schema).close()
    return url


def _partitions(url: str) -> list[TimePartition]:
    with diadb.Apdb.open(url) as db:
        return db.time_partitions()


def _width(parts: list[TimePartition]) -> float:
    newest = max(parts, key=lambda p: p.end_mjd)
    return newest.end_mjd - newest.start_mjd


def _names(output: str, verb: str) -> set[str]:
    return {line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(f"{verb} ")}


def test_partitions_create_ahead_of_now_list_and_drop(partitioned_url: str) -> None:
    url = partitioned_url
    now = mjd_tai(dt.datetime.now(dt.UTC).replace(tzinfo=None))
    result = _invoke(["partitions", "create", url, "--ahead", "3"])
    assert result.exit_code == 0, result.output
    parts = _partitions(url)
    assert {p.table for p in parts} == set(SOURCE_TABLES)
    width = _width(parts)
    assert width > 0
    for table in SOURCE_TABLES:
        mine = [p for p in parts if p.table == table]
        assert any(p.start_mjd <= now < p.end_mjd for p in mine), (table, now, mine)
        assert max(p.end_mjd for p in mine) >= now + 3 * width, (table, now, width, mine)
    # What it created exists; the listing names every partition, one line per table.
    assert _names(result.stdout, "created") <= {p.name for p in parts}
    listing = [line for line in result.stdout.splitlines() if not line.startswith("created ")]
    assert [line.split(":", 1)[0] for line in listing] == list(SOURCE_TABLES)
    for p in parts:
        assert f"{p.name} [{p.start_mjd:g}, {p.end_mjd:g})" in result.stdout
    # Again: nothing new to make.
    again = _invoke(["partitions", "create", url, "--ahead", "3"])
    assert again.exit_code == 0, again.output
    assert not _names(again.stdout, "created")
    # Drop those that end at or before the first one's end.
    cutoff = min(p.end_mjd for p in parts)
    gone = {p.name for p in parts if p.end_mjd <= cutoff}
    dropped = _invoke(["partitions", "drop", url, "--before", f"{cutoff!r}"])
    assert dropped.exit_code == 0, dropped.output
    assert _names(dropped.stdout, "dropped") == gone
    assert {p.name for p in _partitions(url)} == {p.name for p in parts} - gone


def test_partitions_create_ahead_of_the_newest_visit(
    partitioned_url: str, official_schema: ApdbSchema
) -> None:
    url = partitioned_url
    mjd = 60000.5
    with diadb.Apdb.open(url) as db:
        db.create_time_partitions(mjd, mjd + 1e-3)
        ra, dec = random_positions(3, 1)
        v = make_visit(official_schema, 1, mjd, np.arange(1, 4), ra, dec)
        db.store(v.mjd, v.objects, v.sources, v.forced, visit=1)
    width = _width(_partitions(url))
    result = _invoke(["partitions", "create", url, "--ahead", "2"])
    assert result.exit_code == 0, result.output
    assert _names(result.stdout, "created"), result.output
    parts = _partitions(url)
    for table in SOURCE_TABLES:
        mine = [p for p in parts if p.table == table]
        # The partitions holding the visit and the one after it, and some reaching 2 widths on.
        assert any(p.start_mjd <= mjd < p.end_mjd for p in mine), mine
        assert any(p.start_mjd <= mjd + width < p.end_mjd for p in mine), mine
        assert max(p.end_mjd for p in mine) >= mjd + 2 * width, mine
