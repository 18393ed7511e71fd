"""The benchmark and its CLI, on the tiny `ci` profile (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import diadb
from diadb.cli import app
from diadb.sim.bench import PROFILES, run_bench
from diadb.sim.sizing import project


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return run_bench("ci", out, compare=("dax_apdb", "facade"), engine_only=True, association_view=True)


def test_side_by_side_run_writes_metrics_report_and_plot(ci_run):
    metrics = pq.read_table(ci_run.out / "metrics.parquet")
    systems = {
        "diadb",
        "diadb-engine-only",
        "dax_apdb",
        "diadb-association-columns",
        "diadb via lsst.dax.apdb facade",
    }
    assert set(metrics.column("system").to_pylist()) == systems
    assert set(metrics.column("op").to_pylist()) == {"select", "store"}
    stores = metrics.filter(metrics.column("op").to_numpy(zero_copy_only=False) == "store")
    assert stores.num_rows == 4 * PROFILES["ci"].visits  # the association view only reads
    assert "diadb-association-columns" in ci_run.summary["ratio_reference_over_system"]
    report = ci_run.summary_path.read_text()
    assert "| dax_apdb |" in report and "Speed-up over lsst-dax-apdb" in report
    assert ci_run.plot_path is not None and ci_run.plot_path.stat().st_size > 10_000
    # A fresh reader process measured its own memory on the last visit's whole-field read.
    memory = ci_run.summary["reader_memory"]
    assert memory["rows"][1] > 0 and memory["peak_mb"] >= memory["baseline_peak_mb"] > 0
    assert memory["anon_mb"] > 0 and "A reader's memory" in report
    # The cost of metrics on the same read: every mode measured, and the wrapper's own cost.
    cost = ci_run.summary["metrics_cost"]
    assert {"read_off_s", "read_memory_s", "read_prometheus_s"} <= set(cost)
    assert all(cost[k] > 0 for k in ("read_off_s", "read_memory_s", "read_prometheus_s"))
    assert "Metrics cost on a read" in report


def test_reads_agree_with_the_reference_up_to_its_superset(ci_run):
    checks = ci_run.summary["id_checks"]
    # diadb with and without its history tier: identical IDs on every visit.
    engine = checks["diadb-engine-only"]
    assert engine["identical"] == engine["visits"] == PROFILES["ci"].visits
    # The reference returns its pixel cover's superset: never fewer rows, and every extra
    # object or source lies outside the region.
    ref = checks["dax_apdb"]
    for table in ("DiaObject", "DiaSource"):
        assert ref["missing"][table] == 0
        assert ref["extra_outside_region"][table] == ref["extra"][table]


def test_sizing_projects_from_the_summary(ci_run):
    summary = json.loads((ci_run.out / "summary.json").read_text())
    one = {p.table: p for p in project(summary, visits=1000)}
    three = {p.table: p for p in project(summary, visits=1000, replication=3)}
    assert one["total"].total_bytes > 0
    assert three["total"].total_bytes == pytest.approx(3 * one["total"].total_bytes)
    result = CliRunner().invoke(
        app, ["sizing", "--summary", str(ci_run.out / "summary.json"), "--years", "1"]
    )
    assert result.exit_code == 0 and "total" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--profile", "decade"], "unknown profile 'decade'"),
        (["bench", "--profile", "ci", "--compare", "oracle"], "unknown --compare"),
        (["bench", "--profile", "ci", "--visits", "0"], "visits must be >= 1"),
        (["bench", "--profile", "ci", "--url", "postgresql://nobody@127.0.0.1:1/x"], "error:"),
        (["sizing", "--summary", "/nonexistent.json", "--years", "1"], "cannot read benchmark summary"),
        (["simulate", "x.db", "--mode", "galaxy"], "mode must be field or detector"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    if args[0] == "bench":
        args = [*args, "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_simulate_command_field_mode(tmp_path):
    metrics = tmp_path / "m.csv"
    result = CliRunner().invoke(
        app, ["simulate", str(tmp_path / "s.db"), "--visits", "3", "--metrics", str(metrics)]
    )
    assert result.exit_code == 0, result.output
    assert "visits" in result.output and metrics.stat().st_size > 0


def test_reference_runs_on_postgresql_beside_diadb(tmp_path, request):
    """--url on PostgreSQL: lsst-dax-apdb runs on the same server in a namespace of its own."""
    from tests.service_postgres import postgres_server

    server = postgres_server(request)
    url = server.fresh_url()
    out = tmp_path / "pg"
    args = ["bench", "--profile", "ci", "--visits", "3", "--compare", "dax_apdb", "--url", url]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["medians_s"]) == {"diadb", "dax_apdb"}
    ref = summary["id_checks"]["dax_apdb"]
    assert ref["visits"] == 3
    for table in ("DiaObject", "DiaSource"):
        assert ref["missing"][table] == 0 and ref["extra_outside_region"][table] == ref["extra"][table]
    assert summary["sizes"]["dax_apdb"]["file_bytes"] > 0
    assert not list(out.glob("*.db"))  # nothing on SQLite
    schema = url.rsplit("schema=", 1)[1]
    import psycopg

    with psycopg.connect(server.url) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (f"{schema}_dax_apdb",),
            )
        }
    assert {"DiaObject", "DiaObjectLast", "DiaSource", "DiaForcedSource"} <= tables


def test_reference_postgresql_url_keeps_libpq_options_and_refuses_passwords():
    from diadb.errors import ConfigError
    from diadb.sim.bench import _reference_location
    from diadb.sim.reference import reference_postgres_url

    sa_url, namespace = reference_postgres_url("postgresql://u@h:5/db?schema=x&sslmode=disable&pool_size=2")
    assert namespace == "x" and sa_url.startswith("postgresql+psycopg2://u@h:5/db?")
    assert "sslmode=disable" in sa_url and "pool_size" not in sa_url and "schema" not in sa_url
    assert reference_postgres_url("postgresql://u@h/db")[1] == "dax_apdb"
    with pytest.raises(ConfigError, match="password") as e:
        reference_postgres_url("postgresql://u:hunter2@h/db")
    assert "hunter2" not in str(e.value)
    derived = _reference_location(Path("o"), "postgresql://u@h/db?schema=run1&sslmode=disable", None)
    assert derived == "postgresql://u@h/db?sslmode=disable&schema=run1_dax_apdb"
    assert _reference_location(Path("o"), None, None) == Path("o") / "dax_apdb.db"
    with pytest.raises(ConfigError):
        _reference_location(Path("o"), None, "sqlite:///x.db")


def test_simulate_command_with_concurrent_clients(tmp_path):
    args = ["--visits", "2", "--scale", "0.01", "--mode", "detector", "--clients", "3", "--workers", "1"]
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "c.db"), *args])
    assert result.exit_code == 0, result.output
    assert "errors" in result.output and "retries" in result.output
    lines = [line.split() for line in result.output.splitlines() if line.startswith("rows ")]
    assert len(lines) == 3
    for words in lines:  # rows <table> stored N added to database M
        assert words[3] == words[7], words


def test_simulate_continues_a_database_after_its_first_visits(tmp_path):
    """--after replays the model's first visits and stores the ones that follow: new ids only
    (a repeated source id would be refused), and the rows added are the rows stored."""
    url = str(tmp_path / "c.db")
    common = ["--scale", "0.01", "--visits", "2"]
    assert CliRunner().invoke(app, ["simulate", url, *common]).exit_code == 0
    result = CliRunner().invoke(app, ["simulate", url, *common, "--after", "2", "--mode", "detector"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines() if line.startswith("rows ")]
    assert len(lines) == 3 and all(int(w[3].replace(",", "")) > 0 for w in lines[:2])
    for words in lines:
        assert words[3] == words[7], words
    with diadb.Apdb.open(url) as db:
        assert db.contains_visit_detector(4) and db.contains_visit_detector(1)
        assert not db.contains_visit_detector(5)
    again = CliRunner().invoke(app, ["simulate", str(tmp_path / "none.db"), "--after", "2"])
    assert again.exit_code != 0
