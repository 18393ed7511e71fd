"""Loading Felis YAML through ``lsst-felis``, Rubin's own parser and validator of the format."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path
from typing import Any

from diadb.errors import SchemaError
from diadb.schema.model import ApdbSchema, ColumnSpec, TableSpec

#: What diadb itself needs of each table it stores; a custom schema must provide these.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "DiaObject": ("diaObjectId", "validityStartMjdTai", "validityEndMjdTai", "ra", "dec"),
    "DiaSource": ("diaSourceId", "diaObjectId", "visit", "detector", "midpointMjdTai", "ra", "dec"),
    "DiaForcedSource": ("diaObjectId", "visit", "detector", "midpointMjdTai", "ra", "dec"),
}


def official_apdb_yaml() -> str:
    """The text of Rubin's ``apdb.yaml`` shipped by the ``lsst-sdm-schemas`` package."""
    try:
        return resources.files("lsst.sdm.schemas").joinpath("apdb.yaml").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise SchemaError("the official apdb.yaml needs the package: pip install lsst-sdm-schemas") from e


def load_schema(source: str | Path | None = None) -> ApdbSchema:
    """Load a Felis schema: ``None`` for Rubin's official APDB schema, else a path to a YAML file."""
    if source is None:
        text = official_apdb_yaml()
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SchemaError(f"cannot read Felis schema {path}: {e.strerror}") from e
    return schema_from_yaml(text, origin=str(source or "lsst-sdm-schemas:apdb.yaml"))


def schema_from_yaml(text: str, *, origin: str = "<text>") -> ApdbSchema:
    """Parse and validate Felis YAML text (ids generated, as Rubin's tools do)."""
    from felis.datamodel import Schema

    try:
        felis_schema = Schema.from_stream(io.StringIO(text), context={"id_generation": True})
    except Exception as e:  # felis raises pydantic and yaml errors; report them as one kind
        raise SchemaError(f"{origin} is not a valid Felis schema: {e}") from e
    tables = {t.name: _table_spec(t) for t in felis_schema.tables}
    _check_required(tables, origin)
    version = felis_schema.version
    version_text = getattr(version, "current", version) if version is not None else "0.0.0"
    return ApdbSchema(name=felis_schema.name, version=str(version_text), tables=tables, yaml_text=text)


def _table_spec(table: Any) -> TableSpec:
    columns = tuple(
        ColumnSpec(
            name=c.name,
            datatype=str(getattr(c.datatype, "value", c.datatype)),
            nullable=bool(c.nullable),
            length=c.length,
            unit=c.ivoa_unit or c.fits_tunit,
            ucd=c.ivoa_ucd,
            description=c.description,
        )
        for c in table.columns
    )
    pk = table.primary_key
    pk_ids = [pk] if isinstance(pk, str) else list(pk or [])
    by_id = {c.id: c.name for c in table.columns}
    primary_key = tuple(by_id[i] for i in pk_ids if i in by_id)
    return TableSpec(name=table.name, columns=columns, primary_key=primary_key, description=table.description)


def _check_required(tables: dict[str, TableSpec], origin: str) -> None:
    for table, needed in REQUIRED_COLUMNS.items():
        if table not in tables:
            raise SchemaError(
                f"{origin}: table {table} is missing; diadb stores DiaObject, DiaSource, DiaForcedSource"
            )
        missing = [c for c in needed if c not in tables[table]]
        if missing:
            raise SchemaError(f"{origin}: table {table} lacks required columns {missing}")
