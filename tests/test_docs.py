"""The README's example runs as written, and every CLI command is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diadb.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README, re.S)
    assert block is not None
    code = block.group(1)
    assert len(code.strip().splitlines()) == 5
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "False"]


def test_readme_names_the_two_commands():
    assert "make demo" in README and "make test" in README


def _all_commands() -> list[str]:
    """Every command's full name (``partitions show`` for a group's)."""
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    for group in app.registered_groups:
        names += [f"{group.name} {c.name}" for c in group.typer_instance.registered_commands]
    return sorted(names)


@pytest.mark.parametrize("command", _all_commands())
def test_every_cli_command_has_help_and_is_in_readme(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert f"diadb {command}" in README


def test_cli_create_stats_and_errors(tmp_path):
    runner = CliRunner()
    url = str(tmp_path / "x.db")
    assert runner.invoke(app, ["create", url]).exit_code == 0
    again = runner.invoke(app, ["create", url])
    assert again.exit_code == 2 and "already exists" in again.output
    result = runner.invoke(app, ["stats", url, "--json"])
    assert result.exit_code == 0 and '"DiaSource"' in result.output
    missing = runner.invoke(app, ["stats", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2 and "no APDB" in missing.output
    assert "Traceback" not in missing.output


def test_cli_demo_runs_the_demo_profile(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--visits", "3"])
    assert result.exit_code == 0, result.output
    assert "diadb bench: profile `demo`, 3 visits, source density x0.05" in result.output
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    assert (tmp_path / "diadb.db").exists()
    assert (tmp_path / "hats" / "DiaSource").is_dir() and "HATS DiaSource" in result.output
