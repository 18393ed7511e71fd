from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from diadb.errors import SchemaError
from diadb.schema import arrow_type, load_schema, official_apdb_yaml, sql_type
from diadb.schema.types import SQL_TYPES

FELIS_TYPES = [
    "boolean",
    "byte",
    "short",
    "int",
    "long",
    "float",
    "double",
    "char",
    "string",
    "unicode",
    "text",
    "binary",
    "timestamp",
]


def test_official_apdb_yaml_loads_unmodified(official_schema):
    assert official_schema.yaml_text == official_apdb_yaml()
    assert official_schema.name == "ApdbSchema"
    assert official_schema.version.split(".")[0] == "10"
    assert len(official_schema.table("DiaObject").columns) == 83
    assert len(official_schema.table("DiaSource").columns) == 103
    assert len(official_schema.table("DiaForcedSource").columns) == 14
    assert official_schema.table("DiaSource").primary_key == ("diaSourceId",)
    assert official_schema.table("DiaObject").primary_key == ("diaObjectId", "validityStartMjdTai")


def test_every_felis_datatype_maps_to_arrow_and_sql():
    for t in FELIS_TYPES:
        assert isinstance(arrow_type(t), pa.DataType)
        for dialect in SQL_TYPES:
            assert sql_type(t, dialect)
    with pytest.raises(SchemaError, match="nope"):
        arrow_type("nope")


def test_every_column_of_official_schema_has_types(official_schema):
    for table in official_schema.tables.values():
        schema = table.arrow_schema()
        assert schema.names[-1] == "_healpix_29"
        for col in table.columns:
            assert sql_type(col.datatype, "sqlite")


def test_units_ucds_descriptions_kept_as_field_metadata(official_schema):
    field = official_schema.table("DiaSource").arrow_schema().field("psfFlux")
    assert field.metadata[b"unit"] == b"nJy"
    assert field.metadata[b"ucd"] == b"phot.count"
    assert field.metadata[b"description"]
    assert field.type == pa.float32()
    assert official_schema.table("DiaSource").arrow_schema().field("diaSourceId").nullable is False


MINI = """
name: mini
version: "1.2.3"
"@id": "#mini"
tables:
- name: DiaObject
  "@id": "#DiaObject"
  primaryKey: ["#DiaObject.diaObjectId", "#DiaObject.validityStartMjdTai"]
  columns:
  - {name: diaObjectId, "@id": "#DiaObject.diaObjectId", datatype: long, nullable: false}
  - {name: validityStartMjdTai, "@id": "#DiaObject.validityStartMjdTai", datatype: double, nullable: false}
  - {name: validityEndMjdTai, "@id": "#DiaObject.validityEndMjdTai", datatype: double}
  - {name: ra, "@id": "#DiaObject.ra", datatype: double, nullable: false, ivoa:unit: deg}
  - {name: dec, "@id": "#DiaObject.dec", datatype: double, nullable: false}
- name: DiaSource
  "@id": "#DiaSource"
  primaryKey: "#DiaSource.diaSourceId"
  columns:
  - {name: diaSourceId, "@id": "#DiaSource.diaSourceId", datatype: long, nullable: false}
  - {name: diaObjectId, "@id": "#DiaSource.diaObjectId", datatype: long}
  - {name: visit, "@id": "#DiaSource.visit", datatype: long, nullable: false}
  - {name: detector, "@id": "#DiaSource.detector", datatype: short, nullable: false}
  - {name: midpointMjdTai, "@id": "#DiaSource.midpointMjdTai", datatype: double, nullable: false}
  - {name: ra, "@id": "#DiaSource.ra", datatype: double, nullable: false}
  - {name: dec, "@id": "#DiaSource.dec", datatype: double, nullable: false}
- name: DiaForcedSource
  "@id": "#DiaForcedSource"
  primaryKey: ["#DiaForcedSource.diaObjectId", "#DiaForcedSource.visit", "#DiaForcedSource.detector"]
  columns:
  - {name: diaObjectId, "@id": "#DiaForcedSource.diaObjectId", datatype: long, nullable: false}
  - {name: visit, "@id": "#DiaForcedSource.visit", datatype: long, nullable: false}
  - {name: detector, "@id": "#DiaForcedSource.detector", datatype: short, nullable: false}
  - {name: midpointMjdTai, "@id": "#DiaForcedSource.midpointMjdTai", datatype: double, nullable: false}
  - {name: ra, "@id": "#DiaForcedSource.ra", datatype: double, nullable: false}
  - {name: dec, "@id": "#DiaForcedSource.dec", datatype: double, nullable: false}
"""


def test_custom_felis_file_by_path(tmp_path: Path):
    path = tmp_path / "mini.yaml"
    path.write_text(MINI)
    schema = load_schema(path)
    assert (schema.name, schema.version) == ("mini", "1.2.3")
    assert schema.table("DiaSource").column_names == [
        "diaSourceId",
        "diaObjectId",
        "visit",
        "detector",
        "midpointMjdTai",
        "ra",
        "dec",
    ]


def test_schema_missing_required_column_is_refused(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        MINI.replace(
            '  - {name: midpointMjdTai, "@id": "#DiaSource.midpointMjdTai", '
            "datatype: double, nullable: false}\n",
            "",
        )
    )
    with pytest.raises(SchemaError, match="DiaSource lacks required columns \\['midpointMjdTai'\\]"):
        load_schema(path)


def test_not_a_felis_file(tmp_path: Path):
    path = tmp_path / "junk.yaml"
    path.write_text("tables: 3\n")
    with pytest.raises(SchemaError, match="not a valid Felis schema"):
        load_schema(path)
    with pytest.raises(SchemaError, match="cannot read"):
        load_schema(tmp_path / "missing.yaml")
