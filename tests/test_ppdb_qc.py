"""Automated QC of the Parquet products (issue 20, item 4): ``diadb verify DIR`` checks the rows.

A valid export passes every check with rows counted; each kind of damage makes its check fail,
in the report, the JSON report and the exit status."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import diadb
from diadb.cli import app
from diadb.ppdb.hats_export import ExportOptions, export_hats
from diadb.ppdb.layout import current_version
from diadb.ppdb.qc import CHECKS, KEYS, partition_files
from diadb.ppdb.verify import verify_export
from diadb.schema import ApdbSchema
from diadb.sky.healpix import radec_to_healpix29
from tests.helpers import sliding_visits

pytest.importorskip("hats")
pytestmark = [
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SMALL = ExportOptions(max_rows={"DiaObject": 60, "DiaSource": 150, "DiaForcedSource": 150}, light_curves=True)


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory, official_schema: ApdbSchema) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("qc")
    db = diadb.Apdb.create(base / "apdb.db", schema=official_schema)
    for v in sliding_visits(official_schema, range(1, 5)):
        db.store(v.mjd, v.objects, v.sources, v.forced, visit=v.visit)
    export_hats(db, base / "ppdb", options=SMALL, mark_published=False)
    db.close()
    yield base / "ppdb"


def _copy(product: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ppdb"
    shutil.copytree(product, out, symlinks=True)
    return out


def _set(t: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = t.column(column).to_pylist()
    values[row] = value
    f = t.schema.field(column)
    return t.set_column(t.schema.get_field_index(column), f, pa.array(values, f.type))


def _edit(root: Path, table: str, fn: Callable[[pa.Table], pa.Table], which: int = 0) -> None:
    """Rewrite one partition file of ``table`` (the ``which``-th) through ``fn``."""
    _, path = partition_files(current_version(root), table)[which]
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def test_a_valid_product_passes_every_check(product: Path) -> None:
    report = verify_export(product)
    assert report.ok, report.problems
    assert list(report.checks) == list(CHECKS)
    for name, check in report.checks.items():
        assert check.checked > 0 and check.failed == 0, name
    assert report.checks["object_exists"].checked == report.rows["DiaSource"] + report.rows["DiaForcedSource"]
    assert report.checks["n_dia_sources"].checked == report.rows["DiaObject"]
    assert report.checks["unique_ids"].checked == sum(report.rows[t] for t in KEYS)
    assert report.rows["DiaObjectLightCurve"] == report.rows["DiaObject"]


def _other_partition_id(root: Path) -> int:
    _, path = partition_files(current_version(root), "DiaObject")[1]
    return int(pq.read_table(path, columns=["diaObjectId"]).column(0)[0].as_py())


def _foreign_pixel(t: pa.Table) -> int:
    """An order-29 pixel far from this file's rows (the other side of the sky)."""
    return int(radec_to_healpix29([235.0], [30.0])[0])


DAMAGE: dict[str, tuple[str, Callable[[Path], Callable[[pa.Table], pa.Table]]]] = {
    "object_exists": ("DiaSource", lambda root: lambda t: _set(t, "diaObjectId", 0, 987_654_321)),
    "n_dia_sources": (
        "DiaObject",
        lambda root: lambda t: _set(t, "nDiaSources", 0, t.column("nDiaSources")[0].as_py() + 1),
    ),
    "unique_ids": ("DiaObject", lambda root: lambda t: _set(t, "diaObjectId", 0, _other_partition_id(root))),
    "healpix_partition": (
        "DiaForcedSource",
        lambda root: lambda t: _set(t, "_healpix_29", 0, _foreign_pixel(t)),
    ),
    "ra_range": ("DiaSource", lambda root: lambda t: _set(t, "ra", 0, 360.0)),
    "dec_range": ("DiaObject", lambda root: lambda t: _set(t, "dec", 0, -91.0)),
    "time_window": ("DiaForcedSource", lambda root: lambda t: _set(t, "midpointMjdTai", 0, 1.0e5)),
    # A source moved to another object in the flat catalog only: the light curves disagree.
    "light_curves": ("DiaSource", lambda root: lambda t: _set(t, "diaObjectId", 0, _other_object(t))),
}


def _other_object(t: pa.Table) -> int:
    ids = t.column("diaObjectId").to_pylist()
    return int(next(i for i in ids if i != ids[0]))


@pytest.mark.parametrize("check", list(DAMAGE))
def test_each_damage_fails_its_check(product: Path, tmp_path: Path, check: str) -> None:
    root = _copy(product, tmp_path)
    table, damage = DAMAGE[check]
    _edit(root, table, damage(root))
    report = verify_export(root)
    assert not report.ok
    assert report.checks[check].failed >= 1, report.checks[check]
    assert any(p.startswith(f"check {check}:") for p in report.problems), report.problems
    # The unique-id damage also breaks the object's count (its own sources now point elsewhere);
    # every other check of these rows stays clean when its column was not touched.
    untouched = {"ra_range", "dec_range", "time_window"} - {check}
    for other in untouched:
        assert report.checks[other].failed == 0, (other, report.checks[other])
    result = CliRunner().invoke(app, ["verify", str(root), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["checks"][check]["failed"] >= 1
    assert data["checks"][check]["checked"] == report.checks[check].checked
    text = CliRunner().invoke(app, ["verify", str(root)])
    assert text.exit_code == 1 and f"BAD check {check}:" in text.stderr


def test_verify_json_of_a_valid_product(product: Path) -> None:
    result = CliRunner().invoke(app, ["verify", str(product), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and set(data["checks"]) == set(CHECKS)
    assert all(c["failed"] == 0 and c["checked"] > 0 for c in data["checks"].values())
    text = CliRunner().invoke(app, ["verify", str(product)])
    assert text.exit_code == 0 and "check n_dia_sources" in text.stdout
