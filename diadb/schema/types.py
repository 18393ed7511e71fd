"""Felis datatypes mapped to Arrow and to the SQL types of each engine."""

from __future__ import annotations

import pyarrow as pa

from diadb.errors import SchemaError

_ARROW: dict[str, pa.DataType] = {
    "boolean": pa.bool_(),
    "byte": pa.int8(),
    "short": pa.int16(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "char": pa.string(),
    "string": pa.string(),
    "unicode": pa.string(),
    "text": pa.string(),
    "binary": pa.binary(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}

# SQLite has five storage classes; declared types only set the column affinity.
_SQLITE: dict[str, str] = {
    "boolean": "INTEGER",
    "byte": "INTEGER",
    "short": "INTEGER",
    "int": "INTEGER",
    "long": "INTEGER",
    "float": "REAL",
    "double": "REAL",
    "char": "TEXT",
    "string": "TEXT",
    "unicode": "TEXT",
    "text": "TEXT",
    "binary": "BLOB",
    "timestamp": "INTEGER",  # microseconds since the Unix epoch, UTC
}

_POSTGRESQL: dict[str, str] = {
    "boolean": "BOOLEAN",
    "byte": "SMALLINT",
    "short": "SMALLINT",
    "int": "INTEGER",
    "long": "BIGINT",
    "float": "REAL",
    "double": "DOUBLE PRECISION",
    "char": "TEXT",
    "string": "TEXT",
    "unicode": "TEXT",
    "text": "TEXT",
    "binary": "BYTEA",
    "timestamp": "TIMESTAMPTZ",
}

SQL_TYPES: dict[str, dict[str, str]] = {"sqlite": _SQLITE, "postgresql": _POSTGRESQL}


def arrow_type(datatype: str) -> pa.DataType:
    """The Arrow type of a Felis datatype."""
    try:
        return _ARROW[datatype]
    except KeyError:
        raise SchemaError(f"Felis datatype {datatype!r} has no Arrow mapping") from None


def sql_type(datatype: str, dialect: str) -> str:
    """The SQL column type of a Felis datatype in one engine's dialect."""
    try:
        return SQL_TYPES[dialect][datatype]
    except KeyError:
        raise SchemaError(f"Felis datatype {datatype!r} has no {dialect} mapping") from None
