"""Values between Arrow and Cassandra: CQL types, the native protocol's binary form of a
column (writes), and Arrow tables out of the driver's row tuples (reads).

Both directions work a column at a time with NumPy and Arrow (C-level passes): the driver's
per-value Python binding costs about 1.5 us a value (3 s for a 10k-source visit), and a Python
loop over rows would cost as much again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.common.packing import PACKED, RowPacker
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN, TableSpec
from diadb.schema.types import arrow_type

_CQL_TYPES: dict[str, str] = {
    "boolean": "boolean",
    "byte": "tinyint",
    "short": "smallint",
    "int": "int",
    "long": "bigint",
    "float": "float",
    "double": "double",
    "char": "text",
    "string": "text",
    "unicode": "text",
    "text": "text",
    "binary": "blob",
    "timestamp": "bigint",  # microseconds since the Unix epoch, UTC (lossless; CQL timestamp is ms)
}
#: The big-endian NumPy form of fixed-width CQL types on the wire.
_NUMPY_WIRE = {
    "double": ">f8",
    "float": ">f4",
    "bigint": ">i8",
    "int": ">i4",
    "smallint": ">i2",
    "tinyint": "i1",
    "boolean": "u1",
}


def q(name: str) -> str:
    """Quote a CQL identifier (case-sensitive)."""
    return '"' + name.replace('"', '""') + '"'


def cql_type(datatype: str) -> str:
    try:
        return _CQL_TYPES[datatype]
    except KeyError:
        raise StorageError(f"Felis datatype {datatype!r} has no Cassandra mapping") from None


def storage_arrow_type(datatype: str) -> pa.DataType:
    """The Arrow type of a column as this backend reads it back (the facade casts to the schema)."""
    return pa.int64() if datatype == "timestamp" else arrow_type(datatype)


def width(datatype: str) -> int:
    """Bytes a value of ``datatype`` takes (an estimate for variable-width ones)."""
    return {"boolean": 1, "byte": 1, "short": 2, "int": 4, "float": 4}.get(datatype, 8)


def serialize(col: pa.ChunkedArray, cql: str, unset_nulls: bool) -> list[Any]:
    """A column's values in the native protocol's binary form (``bytes`` each; ``None`` for a
    null, or ``UNSET_VALUE`` with ``unset_nulls``), built with NumPy and Arrow: C-level passes."""
    from cassandra.query import UNSET_VALUE  # type: ignore[import-untyped]

    null = UNSET_VALUE if unset_nulls else None
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.int64())
    wire = _NUMPY_WIRE.get(cql)
    if wire is not None:
        if pa.types.is_boolean(col.type):
            col = col.cast(pa.uint8())
        arr = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False)).astype(wire)
        values: Any = arr.view(np.dtype(f"V{arr.dtype.itemsize}"))
        if not col.null_count:
            return list(values.tolist())
        values = np.array(values.tolist(), dtype=object)
    elif cql in ("text", "varchar", "ascii", "blob", "uuid"):
        # UTF-8 text is its own wire form: a cast to binary gives the bytes without encoding
        # (a uuid column is given as its 16 bytes).
        if pa.types.is_string(col.type):
            col = col.cast(pa.binary())
        elif pa.types.is_large_string(col.type):
            col = col.cast(pa.large_binary())
        values = np.array(col.to_pylist(), dtype=object)
        if not col.null_count:
            return list(values.tolist())
    else:
        raise StorageError(f"no serializer for CQL type {cql}")
    values[np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)] = null
    return list(values.tolist())


def groups(columns: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Group row positions by the values of integer ``columns``: ``[(key, positions)]``."""
    if not columns or not len(columns[0]):
        return []
    order = np.lexsort(columns[::-1])
    sorted_cols = [c[order] for c in columns]
    change = np.zeros(len(order), dtype=bool)
    change[0] = True
    for c in sorted_cols:
        change[1:] |= c[1:] != c[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], len(order))
    return [(tuple(int(c[s]) for c in sorted_cols), order[s:e]) for s, e in zip(starts, ends, strict=True)]


def to_arrow(spec_columns: Mapping[str, str], columns: Sequence[str], rows: list[Any]) -> pa.Table:
    """Rows (tuples in ``columns`` order; ``spec_columns`` gives each one's Felis datatype) -> an
    Arrow table, one C-level conversion per column."""
    types = [pa.int64() if c == HEALPIX_COLUMN else storage_arrow_type(spec_columns[c]) for c in columns]
    if not rows:
        return pa.table({c: pa.array([], type=t) for c, t in zip(columns, types, strict=True)})
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {c: pa.array(v, type=t, from_pandas=False) for c, v, t in zip(columns, cols, types, strict=True)}
    )


def decode(
    packer: RowPacker,
    spec: TableSpec,
    columns: Sequence[str],
    rows: list[Any],
    hidden: Mapping[str, str] | None = None,
) -> pa.Table:
    """Rows selected with ``packer.physical(spec.name, columns)`` -> an Arrow table of ``columns``
    (``hidden``: the Felis types of columns the engine adds to the schema's)."""
    types = {**(hidden or {}), **{c.name: c.datatype for c in spec.columns}}
    raw = to_arrow({**types, PACKED: "binary"}, packer.physical(spec.name, columns), rows)
    return packer.expand(spec.name, raw, columns)
