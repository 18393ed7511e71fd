"""Checking an incoming catalog against its Felis table before anything is written.

Every check is columnar (pyarrow compute / numpy); the error names the table, the column,
the problem and the first offending rows (0-based positions in the caller's catalog).
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.errors import CatalogError
from diadb.schema import domain
from diadb.schema.model import HEALPIX_COLUMN, ColumnSpec, TableSpec


def to_arrow(table: str, data: Any) -> pa.Table:
    """An Arrow table from an Arrow table/batch or a pandas DataFrame (its index is dropped)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        # from_pandas turns NaN in float columns into nulls, as pandas users mean them.
        try:
            return pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowException, UnicodeError, TypeError, ValueError) as e:
            _raise_conversion_error(table, data, e)
    raise CatalogError(
        table, None, f"expected a pyarrow.Table or pandas.DataFrame, got {type(data).__name__}"
    )


def _raise_conversion_error(table: str, data: Any, error: Exception) -> NoReturn:
    """Name the first column pandas cannot give Arrow (lone surrogates, mixed objects...)."""
    for name in data.columns:
        try:
            pa.Table.from_pandas(data[[name]], preserve_index=False)
        except (pa.ArrowException, UnicodeError, TypeError, ValueError) as e:
            raise CatalogError(table, str(name), f"cannot be converted to Arrow: {e}") from e
    raise CatalogError(table, None, f"cannot be converted to Arrow: {error}") from error


def _kind(t: pa.DataType) -> str:
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bin"
    if pa.types.is_timestamp(t):
        return "ts"
    return str(t)


# Casts that can keep every value; float narrowing (double -> float) is accepted because the
# schema declares the stored precision, and float -> int only when every value is integral.
_ALLOWED = {
    "bool": {"bool"},
    "int": {"int", "float"},
    "float": {"int", "float"},
    "str": {"str"},
    "bin": {"bin"},
    "ts": {"ts"},
}


def _first_rows(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:10]]


def _cast_column(table: str, col: ColumnSpec, arr: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    target = col.arrow_type
    if arr.type == target:
        return arr
    src_kind, dst_kind = _kind(arr.type), _kind(target)
    if src_kind != "null" and src_kind not in _ALLOWED.get(dst_kind, set()):
        raise CatalogError(table, col.name, f"type {arr.type} cannot be stored as {col.datatype} ({target})")
    if src_kind == "float" and dst_kind == "float":
        narrowed = arr.cast(target, safe=False)
        domain.check_cast(table, col, arr, narrowed)
        return narrowed
    try:
        cast = arr.cast(target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    else:
        domain.check_cast(table, col, arr, cast)
        return cast
    # Find the values that do not survive the round trip, to name them.
    lossy = arr.cast(target, safe=False).cast(arr.type, safe=False)
    bad = pc.fill_null(pc.invert(pc.equal(lossy, arr)), False)
    if src_kind == "float":
        bad = pc.or_(bad, pc.fill_null(pc.is_nan(arr), False))
    rows = _first_rows(np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool))
    raise CatalogError(
        table, col.name, f"values of type {arr.type} do not fit {col.datatype} ({target})", rows
    )


def validate_catalog(spec: TableSpec, data: Any, *, defaults: dict[str, pa.Array] | None = None) -> pa.Table:
    """Check ``data`` against ``spec``; return it cast to the schema's columns and types.

    ``defaults`` supplies whole columns used when the caller did not give them.
    ``_healpix_29`` may be given (it is recomputed on store) but is not returned.
    """
    table = to_arrow(spec.name, data)
    names = table.column_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CatalogError(spec.name, dup[0], f"column given more than once: {dup}")
    unknown = [n for n in names if n not in spec and n != HEALPIX_COLUMN]
    if unknown:
        raise CatalogError(spec.name, unknown[0], f"unknown column(s) not in the schema: {unknown}")
    defaults = defaults or {}
    n = table.num_rows
    arrays: list[pa.ChunkedArray] = []
    for col in spec.columns:
        if col.name in names:
            arr = table.column(col.name)
        elif col.name in defaults:
            arr = pa.chunked_array([defaults[col.name]])
        elif col.nullable:
            arr = pa.chunked_array([pa.nulls(n, col.arrow_type)])
        else:
            raise CatalogError(spec.name, col.name, "required (non-nullable) column is missing")
        arr = _cast_column(spec.name, col, arr)
        if not col.nullable and arr.null_count:
            rows = _first_rows(np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool))
            raise CatalogError(
                spec.name, col.name, f"{arr.null_count} null value(s) in a non-nullable column", rows
            )
        arrays.append(arr)
    result = pa.Table.from_arrays(arrays, schema=spec.arrow_schema(with_healpix=False))
    _check_radec(spec.name, result)
    domain.check_values(spec, result)
    _check_unique(spec, result)
    return result


def _check_radec(table: str, data: pa.Table) -> None:
    for name in ("ra", "dec"):
        if name not in data.column_names:
            continue
        column = data.column(name)
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
        present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        nan = np.isnan(values) & present
        if nan.any():
            raise CatalogError(table, name, "NaN position", _first_rows(nan))
        with np.errstate(invalid="ignore"):
            if name == "ra":
                out = (values < 0.0) | (values >= 360.0)
            else:
                out = (values < -90.0) | (values > 90.0)
        out &= present
        if out.any():
            interval = "[0, 360)" if name == "ra" else "[-90, 90]"
            raise CatalogError(table, name, f"value out of range {interval} degrees", _first_rows(out))


def _check_unique(spec: TableSpec, data: pa.Table) -> None:
    pk = list(spec.primary_key)
    if not pk or data.num_rows < 2:
        return
    if len(pk) == 1:
        keys = data.column(pk[0]).to_numpy(zero_copy_only=False)
        order = np.argsort(keys, kind="stable")
        dup_sorted = keys[order][1:] == keys[order][:-1]
        if dup_sorted.any():
            rows = sorted(int(order[i + 1]) for i in np.flatnonzero(dup_sorted)[:10])
            raise CatalogError(spec.name, pk[0], "duplicate primary key values in the catalog", rows)
        return
    indexed = data.select(pk).append_column("__row", pa.array(np.arange(data.num_rows)))
    groups = indexed.group_by(pk, use_threads=False).aggregate([("__row", "list"), ("__row", "count")])
    dups = groups.filter(pc.greater(groups.column("__row_count"), 1))
    if dups.num_rows:
        rows = sorted(r for lst in dups.column("__row_list").to_pylist()[:10] for r in lst[1:])[:10]
        raise CatalogError(spec.name, ", ".join(pk), "duplicate primary key values in the catalog", rows)
