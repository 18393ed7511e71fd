"""Plausible values for every column of a Felis table, so synthetic rows have production width."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.schema.model import ColumnSpec, TableSpec

BANDS = np.array(list("ugrizy"))


def _column(col: ColumnSpec, n: int, rng: np.random.Generator) -> pa.Array:
    t = col.arrow_type
    name = col.name.lower()
    if pa.types.is_boolean(t):
        return pa.array(rng.random(n) < 0.05)
    if pa.types.is_integer(t):
        hi = 100 if pa.types.is_int8(t) or pa.types.is_int16(t) else 1000
        return pa.array(rng.integers(0, hi, n).astype(t.to_pandas_dtype()))
    if pa.types.is_floating(t):
        if "err" in name:
            values = np.abs(rng.normal(0.0, 1.0, n))
        elif "mjd" in name:
            values = 60000.0 + rng.random(n)
        else:
            values = rng.normal(0.0, 100.0, n)
        return pa.array(values.astype(t.to_pandas_dtype()))
    if pa.types.is_string(t):
        if col.length == 1 or name == "band":
            return pa.array(BANDS[rng.integers(0, 6, n)].astype(object))
        width = min(col.length or 8, 8)
        return pa.array(np.full(n, "x" * width, dtype=object))
    if pa.types.is_timestamp(t):
        return pa.array(np.full(n, 1_700_000_000_000_000, dtype="int64")).cast(t)
    if pa.types.is_binary(t):
        return pa.array([b""] * n, type=t)
    return pa.nulls(n, t)


def fill_table(
    spec: TableSpec, n: int, rng: np.random.Generator, given: Mapping[str, npt.ArrayLike | pa.Array]
) -> pa.Table:
    """A table with every column of ``spec``: ``given`` columns as they are, the others plausible."""
    arrays = []
    for col in spec.columns:
        if col.name in given:
            value = given[col.name]
            arrays.append(value if isinstance(value, pa.Array) else pa.array(np.asarray(value)))
        else:
            arrays.append(_column(col, n, rng))
    fields = [pa.field(c.name, a.type) for c, a in zip(spec.columns, arrays, strict=True)]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
