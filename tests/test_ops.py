"""The operators' commands on every engine (SQLite, the session's PostgreSQL and Cassandra):
``status`` (text, JSON, exit status), ``metadata``, ``chunks list``, ``partitions``, the label
index (``@label`` in place of a URL), ``create``'s server options, and the progress of long
commands (shown in a terminal only)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

import diadb
from diadb.cli import app
from diadb.schema import ApdbSchema
from tests.conftest import make_url
from tests.helpers import make_visit, random_positions

ENGINES = ["sqlite", "postgresql", "cassandra"]


def _invoke(args: list[object], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def _fill(url: str, schema: ApdbSchema, visits: int, *, start_mjd: float = 60000.5) -> None:
    """``visits`` visits a day apart, 5 objects each."""
    with diadb.Apdb.open(url) as db:
        if db.location().scheme != "sqlite":
            db.create_time_partitions(start_mjd, start_mjd + visits + 1)
        for i in range(visits):
            ra, dec = random_positions(5, seed=i)
            ids = np.arange(1 + 5 * i, 6 + 5 * i)
            # One source each, counted so: an export of these passes its content checks.
            one = np.ones(5, np.int64)
            v = make_visit(schema, i + 1, start_mjd + i, ids, ra, dec, n_dia_sources=one)
            db.store(v.mjd, v.objects, v.sources, v.forced, visit=i + 1)


@pytest.fixture(params=ENGINES)
def url(request: pytest.FixtureRequest, tmp_path: Path, official_schema: ApdbSchema) -> str:
    """A new APDB on each engine."""
    made = make_url(str(request.param), tmp_path, request)
    diadb.Apdb.create(made, schema=official_schema).close()
    return made


# ---- status ----------------------------------------------------------------------------
def test_status_of_a_filled_database(url: str, official_schema: ApdbSchema) -> None:
    _fill(url, official_schema, 3)
    result = _invoke(["status", url, "--json", "--partition-days", "0"])
    report = json.loads(result.stdout)
    # Three unpublished store chunks, the oldest two days before the newest visit: a backlog.
    log = report["changelog"]
    assert (log["chunks"], log["unpublished"]) == (3, 3)
    assert log["oldest_unpublished"]["chunk_id"] == min(
        c["chunk_id"] for c in json.loads(_invoke(["chunks", "list", url, "--json"]).stdout)
    )
    assert log["oldest_unpublished_age_days"] == pytest.approx(2.0)
    assert log["backlog"] and result.exit_code == 1, result.output
    assert any("change-log backlog" in a for a in report["actions"])
    assert report["latest_visit_mjd"] == pytest.approx(60002.5)
    assert report["versions"]["schema"] == f"{official_schema.name} {official_schema.version}"
    assert report["versions"]["layout"] == diadb.Apdb.open(url).frozen_metadata()["diadb.layout_version"]
    assert report["config"]["history_months"] == 12
    stored = sum(report["tables"].get(t, {}).get("rows", 0) for t in ("DiaSource", "DiaSource (history)"))
    assert stored == 15
    engine = report["connection"]["engine"]
    assert engine == diadb.Apdb.open(url).location().scheme
    if engine == "sqlite":
        assert report["partitions"] is None
        assert report["connection"]["database"] == url
    else:
        assert report["connection"]["hosts"] and report["connection"]["namespace"]
        assert set(report["partitions"]["tables"]) == {"DiaSource", "DiaForcedSource"}
    # Publish everything: with a lenient partition check nothing needs action.
    with diadb.Apdb.open(url) as db:
        db.mark_published(db.replica_chunks().column("chunk_id").to_pylist())
    ok = _invoke(["status", url, "--partition-days", "0"])
    assert ok.exit_code == 0, ok.output
    assert "ok: nothing needs action" in ok.stdout
    assert "3 chunk(s), 0 unpublished" in ok.stdout


@pytest.fixture(params=["postgresql", "cassandra"])
def server_url(request: pytest.FixtureRequest, tmp_path: Path, official_schema: ApdbSchema) -> str:
    """A new APDB on each server engine (those with time partitions)."""
    made = make_url(str(request.param), tmp_path, request)
    diadb.Apdb.create(made, schema=official_schema).close()
    return made


def test_status_warns_when_the_newest_partition_is_about_to_be_outgrown(
    server_url: str, official_schema: ApdbSchema
) -> None:
    url = server_url
    _fill(url, official_schema, 1)
    with diadb.Apdb.open(url) as db:
        newest = max(p.end_mjd for p in db.time_partitions())
    near = _invoke(["status", url, "--json", "--now", newest - 1.0])
    assert near.exit_code == 1, near.output
    assert "time partitions" in " ".join(json.loads(near.stdout)["actions"])
    far = _invoke(["status", url, "--json", "--now", newest - 30.0, "--backlog-days", "100"])
    assert far.exit_code == 0, far.output
    # 'partitions create' then reaches past the check again.
    assert _invoke(["partitions", "create", url, "--ahead", "3"]).exit_code == 0
    with diadb.Apdb.open(url) as db:
        assert max(p.end_mjd for p in db.time_partitions()) > newest


def test_status_compaction_overdue_on_sqlite(tmp_path: Path, official_schema: ApdbSchema) -> None:
    path = str(tmp_path / "lag.db")
    diadb.Apdb.create(path, schema=official_schema, history_auto_compact=False).close()
    _fill(path, official_schema, 12)
    report = json.loads(_invoke(["status", path, "--json", "--backlog-days", "100"]).stdout)
    overdue = report["compaction"]["overdue_rows"]
    assert overdue["DiaSource"] > 0 and report["compaction"]["compacted_through_mjd"] is None
    assert any("compaction overdue" in a for a in report["actions"])
    assert _invoke(["compact", path]).exit_code == 0
    after = _invoke(["status", path, "--json", "--backlog-days", "100"])
    assert after.exit_code == 0, after.output
    report = json.loads(after.stdout)
    assert sum(report["compaction"]["overdue_rows"].values()) == 0
    assert report["history"]["DiaSource"]["segments"] >= 1
    assert report["compaction"]["lag_days"] >= 0


# ---- metadata --------------------------------------------------------------------------
def test_metadata_commands(url: str) -> None:
    assert _invoke(["metadata", "set", url, "owner", "night-ops"]).exit_code == 0
    assert _invoke(["metadata", "get", url, "owner"]).stdout.strip() == "night-ops"
    # Already set: refused without --force.
    again = _invoke(["metadata", "set", url, "owner", "x"])
    assert again.exit_code == 2 and "--force" in again.stderr
    assert _invoke(["metadata", "set", url, "owner", "day-ops", "--force"]).exit_code == 0
    assert json.loads(_invoke(["metadata", "show", url, "--json"]).stdout) == {"owner": "day-ops"}
    # diadb's own keys are neither shown nor changed.
    refused = _invoke(["metadata", "set", url, "diadb.layout_version", "9.9.9", "--force"])
    assert refused.exit_code == 2 and "diadb." in refused.stderr
    assert _invoke(["metadata", "get", url, "diadb.config"]).exit_code == 1
    assert _invoke(["metadata", "delete", url, "owner"]).exit_code == 0
    assert _invoke(["metadata", "delete", url, "owner"]).exit_code == 1
    assert _invoke(["metadata", "show", url]).stdout == ""
    with diadb.Apdb.open(url) as db:
        assert db.user_metadata() == {}
        assert db.frozen_metadata()["diadb.layout_version"] != "9.9.9"


# ---- chunks ----------------------------------------------------------------------------
def test_chunks_list(url: str, official_schema: ApdbSchema) -> None:
    _fill(url, official_schema, 2)
    rows = json.loads(_invoke(["chunks", "list", url, "--json"]).stdout)
    assert [r["visit"] for r in rows] == [1, 2] and not any(r["published"] for r in rows)
    with diadb.Apdb.open(url) as db:
        db.mark_published([rows[0]["chunk_id"]])
    pending = json.loads(_invoke(["chunks", "list", url, "--json", "--unpublished"]).stdout)
    assert [r["chunk_id"] for r in pending] == [rows[1]["chunk_id"]]
    text = _invoke(["chunks", "list", url]).stdout.splitlines()
    assert len(text) == 3 and text[1].split()[:3] == [str(rows[0]["chunk_id"]), "store", "1"]
    assert "yes" in text[1].split() and "no" in text[2].split()


# ---- partitions ------------------------------------------------------------------------
def test_partitions_show_create_drop(url: str, official_schema: ApdbSchema) -> None:
    if not url.startswith(("postgresql", "cassandra")):
        for args in (["show", url], ["create", url], ["drop", url, "--before", "60000"]):
            result = _invoke(["partitions", *args])
            assert result.exit_code == 2 and "no time-partition tables" in result.stderr
        return
    _fill(url, official_schema, 1)
    created = _invoke(["partitions", "create", url, "--ahead", "2"])
    assert created.exit_code == 0, created.output
    parts = json.loads(_invoke(["partitions", "show", url, "--json"]).stdout)
    assert {p["table"] for p in parts} == {"DiaSource", "DiaForcedSource"}
    cutoff = min(p["end_mjd"] for p in parts)
    dropped = _invoke(["partitions", "drop", url, "--before", repr(cutoff)])
    assert dropped.exit_code == 0, dropped.output
    gone = {line.split()[1] for line in dropped.stdout.splitlines() if line.startswith("dropped ")}
    assert gone == {p["name"] for p in parts if p["end_mjd"] <= cutoff}
    left = json.loads(_invoke(["partitions", "show", url, "--json"]).stdout)
    assert {p["name"] for p in left} == {p["name"] for p in parts} - gone


# ---- the label index -------------------------------------------------------------------
def test_labels_stand_for_urls_in_every_command(url: str, tmp_path: Path) -> None:
    index = tmp_path / "index.yaml"
    index.write_text(f'prod: "{url}"\nother: "/nowhere/x.db"\n')
    env = {"DIADB_INDEX_URI": str(index)}
    assert _invoke(["metadata", "set", "@prod", "k", "v"], env).exit_code == 0
    with diadb.Apdb.open(url) as db:
        assert db.user_metadata() == {"k": "v"}
    result = _invoke(["status", "@prod", "--json"], env)
    assert json.loads(result.stdout)["url"] == url
    assert _invoke(["stats", "@prod"], env).exit_code == 0
    listing = _invoke(["index", "list"], {"DIADB_INDEX_URI": index.as_uri()})
    assert listing.stdout.splitlines() == ["@other: /nowhere/x.db", f"@prod: {url}"]
    unknown = _invoke(["stats", "@nope"], env)
    assert unknown.exit_code == 2 and "'nope'" in unknown.stderr and "other, prod" in unknown.stderr
    unset = _invoke(["stats", "@prod"], {"DIADB_INDEX_URI": ""})
    assert unset.exit_code == 2 and "DIADB_INDEX_URI" in unset.stderr


def test_a_bad_index_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    for env in ({"DIADB_INDEX_URI": str(bad)}, {"DIADB_INDEX_URI": str(tmp_path / "missing.yaml")}):
        result = _invoke(["status", "@prod"], env)
        assert result.exit_code == 2 and result.stderr.startswith("error: ")
        assert "label index" in result.stderr


# ---- create's server options -----------------------------------------------------------
def test_create_with_server_options(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = make_url("cassandra", tmp_path, request)
    result = _invoke(["create", url, "--replication-factor", "1", "--option", "time_partition_days=10"])
    assert result.exit_code == 0, result.output
    with diadb.Apdb.open(url) as db:
        db.create_time_partitions(60000.0, 60000.001)
        (part,) = {p.end_mjd - p.start_mjd for p in db.time_partitions()}
        assert part == pytest.approx(10.0)


def test_create_with_postgres_partition_days(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = make_url("postgresql", tmp_path, request)
    assert _invoke(["create", url, "--option", "partition_days=10"]).exit_code == 0
    with diadb.Apdb.open(url) as db:
        db.create_time_partitions(60000.0, 60000.001)
        (part,) = {p.end_mjd - p.start_mjd for p in db.time_partitions()}
        assert part == pytest.approx(10.0)


def test_create_options_are_refused_where_they_do_not_apply(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    rf = _invoke(["create", path, "--replication-factor", "3"])
    assert rf.exit_code == 2 and "Cassandra" in rf.stderr
    opt = _invoke(["create", path, "--option", "partition_days=3"])
    assert opt.exit_code == 2 and "server URLs" in opt.stderr
    bad = _invoke(["create", "postgresql://h/db?schema=s", "--option", "novalue"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.stderr
    assert not path.exists()


# ---- progress ----------------------------------------------------------------------------
def _in_pty(args: list[str]) -> tuple[int, str]:
    """Run ``diadb args`` with a pseudo-terminal as stdout and stderr; its status and output."""
    master, slave = pty.openpty()
    script = str(Path(sys.executable).with_name("diadb"))
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    proc = subprocess.Popen([script, *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_long_commands_show_progress_only_in_a_terminal(tmp_path: Path, official_schema: ApdbSchema) -> None:
    pytest.importorskip("hats")
    path = str(tmp_path / "p.db")
    diadb.Apdb.create(path, schema=official_schema, history_auto_compact=False).close()
    _fill(path, official_schema, 9)
    status, shown = _in_pty(["compact", path])
    assert status == 0 and "compacting" in shown and "compacted" in shown, shown
    status, shown = _in_pty(["export", path, str(tmp_path / "tty")])
    assert status == 0 and "exporting" in shown and "full export" in shown, shown
    # In a script (pipes, not a terminal) only the result lines: no spinner, nothing on stderr.
    script = str(Path(sys.executable).with_name("diadb"))
    done = subprocess.run(
        [script, "export", path, str(tmp_path / "pipe")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "exporting" not in done.stdout and "full export" in done.stdout
    restored = subprocess.run(
        [script, "restore", str(tmp_path / "pipe"), str(tmp_path / "r.db")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert restored.returncode == 0 and restored.stderr == "", restored.stderr
    assert restored.stdout.startswith("restored ") and len(restored.stdout.splitlines()) == 1
