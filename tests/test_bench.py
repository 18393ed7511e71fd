"""The benchmark and its CLI, on the tiny `ci` profile (no timing is asserted)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

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
