"""Versions: a database made by the previous layout is upgraded in place; schemas evolve by new
nullable columns; incompatible versions are refused with a clear message."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import diadb
from diadb.cli import app
from diadb.errors import SchemaVersionError
from diadb.schema import official_apdb_yaml
from tests.helpers import make_visit, random_positions
from tests.test_history import SEGMENTS

FIXTURE = Path(__file__).parent / "data" / "layout-1.0"
EVERYWHERE = diadb.Box(0, 360, -90, 90)


@pytest.fixture
def old_db(tmp_path: Path) -> str:
    """A copy of a database written by diadb's layout 1.0 (3 visits of 30 objects, 2 in segments)."""
    shutil.copy(FIXTURE / "apdb.db", tmp_path / "apdb.db")
    shutil.copytree(FIXTURE / "apdb.db.history", tmp_path / "apdb.db.history")
    return str(tmp_path / "apdb.db")


def test_previous_layout_must_be_upgraded_then_works(old_db):
    with pytest.raises(SchemaVersionError, match=r"layout 1\.0\.0, older than 1\.1\.0: run 'diadb upgrade"):
        diadb.Apdb.open(old_db)
    result = CliRunner().invoke(app, ["upgrade", old_db])
    assert result.exit_code == 0, result.output
    assert "layout 1.0 -> 1.1" in result.output
    with diadb.Apdb.open(old_db) as db:
        assert db.get_sources(EVERYWHERE, 60010.0).num_rows == 90  # 60 of them in segments
        assert db.get_forced_sources(EVERYWHERE, 60010.0).num_rows == 90
        chunks = db.replica_chunks()
        assert chunks.column("visit").to_pylist() == [1, 2, 3]  # backfilled from the registry
        assert db.read_chunks(chunks.column("chunk_id").to_pylist()[:1])["DiaObject"].num_rows == 30
        # Writes and daytime updates work on the upgraded database, old segment rows included.
        ra, dec = random_positions(30, 1)
        v = make_visit(db.schema, 4, 60006.0, np.arange(1, 31), ra, dec)
        assert db.store(v.mjd, v.objects, v.sources, v.forced, visit=4)
        db.reassign_sources({1 * 100_000 + 1: 2})
        moved = db.get_sources(None, 60010.0, object_ids=[2], columns=["diaSourceId"]).column(0).to_pylist()
        assert 100_001 in moved
        assert db.verify() == []
    assert CliRunner().invoke(app, ["upgrade", old_db]).output.strip() == "already up to date"


def _schema_with_new_column(tmp_path: Path, version: str, *, nullable: bool = True) -> Path:
    text = official_apdb_yaml()
    text = text.replace('version: "10.0.0"', f'version: "{version}"') if 'version: "10.0.0"' in text else text
    # The first midpointMjdTai column of the official file is DiaSource's.
    anchor = "  - name: midpointMjdTai\n"
    assert anchor in text
    column = (
        "  - name: isGlint\n    datatype: boolean\n"
        f"    nullable: {'true' if nullable else 'false'}\n    description: Added by a newer schema.\n"
    )
    path = tmp_path / f"apdb-{version}.yaml"
    path.write_text(text.replace(anchor, column + anchor, 1))
    return path


def test_schema_evolves_by_a_new_nullable_column(tmp_path, official_schema):
    url = str(tmp_path / "e.db")
    db = diadb.Apdb.create(url, schema=official_schema, **SEGMENTS)
    ra, dec = random_positions(10, 2)
    for visit, day in [(1, 0.0), (2, 2.0)]:
        v = make_visit(db.schema, visit, 60000.0 + day, np.arange(1, 11), ra, dec)
        db.store(v.mjd, v.objects, v.sources, v.forced, visit=visit)
    db.close()
    newer = _schema_with_new_column(tmp_path, "10.1.0")
    steps = diadb.Apdb.upgrade(url, schema=newer)
    assert steps == ["DiaSource: added nullable column(s) ['isGlint']"]
    with diadb.Apdb.open(url) as again:
        assert again.schema.version == "10.1.0"
        got = again.get_sources(EVERYWHERE, 60010.0, columns=["diaSourceId", "isGlint"])
        assert got.num_rows == 20 and got.column("isGlint").null_count == 20  # segment rows too
        v = make_visit(again.schema, 3, 60004.0, np.arange(1, 11), ra, dec)
        sources = v.sources.set_column(
            v.sources.schema.get_field_index("isGlint"), "isGlint", pa.array(np.arange(10) % 2 == 0)
        )
        again.store(v.mjd, v.objects, sources, v.forced, visit=3)
        flags = again.get_sources(EVERYWHERE, 60010.0, columns=["visit", "isGlint"]).to_pylist()
        assert sum(1 for r in flags if r["visit"] == 3 and r["isGlint"]) == 5


def test_incompatible_schemas_and_layouts_are_refused(tmp_path, official_schema):
    url = str(tmp_path / "r.db")
    diadb.Apdb.create(url, schema=official_schema).close()
    with pytest.raises(SchemaVersionError, match="adds non-nullable columns"):
        diadb.Apdb.upgrade(url, schema=_schema_with_new_column(tmp_path, "10.2.0", nullable=False))
    with pytest.raises(SchemaVersionError, match="changes the major version"):
        diadb.Apdb.upgrade(url, schema=_schema_with_new_column(tmp_path, "11.0.0"))
    # A newer minor layout (written by a later diadb) opens read-only.
    con = sqlite3.connect(url)
    con.execute("UPDATE diadb_metadata SET value = '1.9.0' WHERE key = 'diadb.layout_version'")
    con.commit()
    con.close()
    with diadb.Apdb.open(url) as db:
        assert db.read_only
        assert db.get_sources(EVERYWHERE, 60010.0).num_rows == 0
        with pytest.raises(SchemaVersionError, match="read-only"):
            db.store(
                60000.0,
                db.schema.table("DiaObject").arrow_schema().empty_table().drop_columns(["_healpix_29"]),
                visit=1,
            )
    with pytest.raises(SchemaVersionError, match="newer than this diadb"):
        diadb.Apdb.upgrade(url)
