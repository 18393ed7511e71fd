"""Felis schema loading, Arrow schemas and catalog validation."""

from diadb.schema.felis import load_schema, official_apdb_yaml, schema_from_yaml
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, ColumnSpec, TableSpec
from diadb.schema.types import arrow_type, sql_type

__all__ = [
    "HEALPIX_COLUMN",
    "ApdbSchema",
    "ColumnSpec",
    "TableSpec",
    "arrow_type",
    "load_schema",
    "official_apdb_yaml",
    "schema_from_yaml",
    "sql_type",
]
