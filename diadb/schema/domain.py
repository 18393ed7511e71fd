"""The domain of diadb's key and time values: what a store refuses although the type would hold it.

A value can fit its column's type and still be absurd: a visit time of 1e300, a visit of 1.5
truncated to visit 1, a detector column that disagrees with the store's ``detector`` argument,
an 8-character ``band``. Each is refused before anything is written, a catalog with a
:class:`~diadb.errors.CatalogError` naming table, column, problem and first offending rows, a
``store()`` argument with a :class:`~diadb.errors.ConfigError` naming the argument. Every check
is columnar (numpy / pyarrow.compute); the columns a rule applies to are derived from the Felis
table, not listed here.

Rules (README, "Validation"):

- **Times.** ``visit_time`` and every time column lie in ``[MJD_MIN, MJD_MAX]``, 1950-01-01 to
  2100-01-01 (MJD TAI). Time columns are the float columns whose name contains ``Mjd`` (the
  ``*MjdTai`` columns of the APDB schema) and the Felis ``timestamp`` columns (same window).
  NaN is refused there; null is allowed where the column is nullable.
- **Keys.** Integer key columns (primary-key columns, columns named ``*Id``, ``visit``,
  ``detector``) are ``>= 0``; ``detector`` is at most :func:`detector_max` (the column type's
  maximum, and at most ``2**31 - 1``, the visit table's ``INTEGER``).
- **store() arguments.** ``visit`` and ``detector`` are integers (``bool`` refused, floats only
  when integral); ``visit`` in ``[0, VISIT_MAX]``, ``detector`` in ``[0, detector_max]``, or
  ``None`` for the whole visit. ``-1`` is diadb's internal "whole visit" and refused as an
  argument. A keyed store (``key=...``) may use a negative visit when it carries no source rows:
  diadb's lsst.dax.apdb facade records such stores under a visit no real visit uses.
- **Rows belong to their store.** DiaSource and DiaForcedSource rows carry the store's
  ``visit``; with a ``detector`` they carry that detector too (a whole-visit store takes any
  valid detector). A keyed whole-visit store, whose change log lists its rows by key, may hold
  rows of several visits (the lsst.dax.apdb facade's stores of reference catalogs).
- **References.** The ``diaObjectId`` of every DiaSource and DiaForcedSource is in the same
  store's objects or already in the database.
- **Strings.** Valid UTF-8, and at most Felis ``length`` characters (bytes for binary).
- **Numbers.** A finite value that would overflow its float column (``1e300`` into a Felis
  ``float``, float32) is refused rather than stored as ``inf``; an integer column given floats
  takes only integral values within ``+-2**53`` (beyond that a float is not an exact integer).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from diadb.errors import CatalogError, ConfigError
from diadb.schema.model import ApdbSchema, ColumnSpec, TableSpec

#: Earliest plausible time, MJD (TAI): 1950-01-01T00:00.
MJD_MIN: Final = 33282.0
#: Latest plausible time, MJD (TAI): 2100-01-01T00:00.
MJD_MAX: Final = 88069.0
#: Largest visit: the visit tables hold it as a signed 64-bit integer.
VISIT_MAX: Final = 2**63 - 1
#: The internal detector value of a whole-visit store (``store(detector=None)``).
WHOLE_VISIT: Final = -1
#: The visit tables hold detectors as 32-bit integers; the Felis column may be narrower.
DETECTOR_LIMIT: Final = 2**31 - 1
#: Floats represent every integer up to this magnitude exactly, and no further.
FLOAT_EXACT_INTEGER: Final = 2**53

_MJD_UNIX_EPOCH = 40587.0  # MJD of 1970-01-01T00:00
_US_PER_DAY = 86_400_000_000
_WINDOW = f"[{MJD_MIN:g}, {MJD_MAX:g}] MJD (1950-01-01 to 2100-01-01)"
_SOURCE_TABLES = ("DiaSource", "DiaForcedSource")

BoolArray = npt.NDArray[np.bool_]


# ---- store() arguments ------------------------------------------------------------------
def check_time(name: str, mjd: float) -> float:
    """``mjd`` (a time argument called ``name``, MJD TAI) if it lies in the plausible window,
    else a ConfigError naming the argument."""
    if not MJD_MIN <= mjd <= MJD_MAX:
        raise ConfigError(f"{name} must lie in {_WINDOW}, got MJD {mjd!r}")
    return mjd


def check_visit_time(mjd: float) -> float:
    """``store()``'s ``visit_time`` (MJD TAI) if it lies in the plausible window."""
    return check_time("visit_time", mjd)


def integer_argument(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``: ints and numpy ints, floats only when integral;
    ``bool`` is refused (``True`` is not visit 1)."""
    result = _as_integer(name, value)
    if not lo <= result <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {result}")
    return result


def _as_integer(name: str, value: Any) -> int:
    if isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float | np.floating):
        number = float(value)
        if not (math.isfinite(number) and number.is_integer() and abs(number) <= FLOAT_EXACT_INTEGER):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(number)
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def detector_max(schema: ApdbSchema) -> int:
    """The largest detector the schema's DiaSource.detector column and the visit tables hold."""
    column = schema.table("DiaSource").column("detector")
    return min(_integer_bounds(column.arrow_type)[1], DETECTOR_LIMIT)


def visit_detector(visit: Any, detector: Any, schema: ApdbSchema, *, keyed: bool) -> tuple[int, int]:
    """The checked ``(visit, detector)`` of a store; ``detector=None`` gives :data:`WHOLE_VISIT`."""
    if keyed:
        # Only rows-free stores can use a negative visit: rows' visits are >= 0 and must match.
        visit_id = integer_argument("visit", visit, -VISIT_MAX - 1, VISIT_MAX)
    else:
        visit_id = integer_argument("visit", visit, 0, VISIT_MAX)
    if detector is None:
        return visit_id, WHOLE_VISIT
    top = detector_max(schema)
    if _as_integer("detector", detector) == WHOLE_VISIT:
        raise ConfigError(
            f"detector must be in [0, {top}]: -1 is reserved, give detector=None for the whole visit"
        )
    return visit_id, integer_argument("detector", detector, 0, top)


def check_rows_belong(catalogs: Mapping[str, pa.Table], visit: int, detector: int, *, keyed: bool) -> None:
    """Every row's ``visit`` (and, unless a whole-visit store, ``detector``) is the store's.

    A keyed whole-visit store is exempt: its change-log chunk lists its rows by primary key (not
    by visit/detector), and the lsst.dax.apdb facade stores the reference's catalogs, which may
    mix visits, that way."""
    if keyed and detector == WHOLE_VISIT:
        return
    checks = [("visit", visit)] + ([("detector", detector)] if detector != WHOLE_VISIT else [])
    for table, data in catalogs.items():
        if not data.num_rows:
            continue
        for name, expected in checks:
            if name not in data.column_names:
                continue
            column = data.column(name)
            if column.null_count == 0 and _bounds(column) == (expected, expected):
                continue
            bad = _mask(pc.not_equal(column, pa.scalar(expected, column.type)), True)
            if bad.any():
                found = np.unique(column.filter(pa.array(bad)).to_numpy())[:5].tolist()
                raise CatalogError(
                    table,
                    name,
                    f"rows of {name} {found} in a store of {name}={expected}: each store holds its own rows",
                    _first_rows(bad),
                )


def check_object_references(
    objects: pa.Table, catalogs: Mapping[str, pa.Table], known: Callable[[np.ndarray], np.ndarray]
) -> None:
    """Every ``diaObjectId`` of the ``catalogs`` is in ``objects`` or ``known`` (the database);
    one lookup for all catalogs together."""
    in_store = objects.column("diaObjectId").to_numpy()
    pending: dict[str, tuple[np.ndarray, BoolArray]] = {}
    for table, data in catalogs.items():
        if not data.num_rows:
            continue
        column = data.column("diaObjectId")
        ids = np.asarray(column.fill_null(0).to_numpy(), dtype=np.int64)
        outside = ~_mask(pc.is_null(column), False) & ~np.isin(ids, in_store)
        if outside.any():
            pending[table] = (ids, outside)
    if not pending:
        return
    candidates = np.unique(np.concatenate([ids[outside] for ids, outside in pending.values()]))
    missing = np.setdiff1d(candidates, known(candidates))
    for table, (ids, outside) in pending.items():
        bad = outside & np.isin(ids, missing)
        if bad.any():
            raise CatalogError(
                table,
                "diaObjectId",
                "refers to DiaObjects neither in this store nor in the database: "
                f"{np.unique(ids[bad])[:10].tolist()}",
                _first_rows(bad),
            )


# ---- catalog values ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Roles:
    """Which rules apply to which columns of one table (derived once per TableSpec)."""

    times: tuple[str, ...]
    keys: tuple[tuple[str, int], ...]  # (column, largest allowed value)
    lengths: tuple[tuple[str, int], ...]  # (column, Felis length)
    strings: tuple[str, ...]


_ROLES: dict[int, tuple[TableSpec, _Roles]] = {}


def is_time_column(column: ColumnSpec) -> bool:
    """Felis timestamps, and float columns named ``*Mjd*`` (``midpointMjdTai`` ...)."""
    t = column.arrow_type
    return pa.types.is_timestamp(t) or (pa.types.is_floating(t) and "mjd" in column.name.lower())


def is_key_column(spec: TableSpec, column: ColumnSpec) -> bool:
    """Integer primary-key columns, ``*Id`` columns, ``visit`` and ``detector``."""
    if not pa.types.is_integer(column.arrow_type):
        return False
    name = column.name
    return name in spec.primary_key or name.endswith("Id") or name in ("visit", "detector")


def _roles(spec: TableSpec) -> _Roles:
    cached = _ROLES.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    keys = []
    for c in spec.columns:
        if is_key_column(spec, c):
            top = _integer_bounds(c.arrow_type)[1]
            keys.append((c.name, min(top, DETECTOR_LIMIT) if c.name == "detector" else top))
    text = [c for c in spec.columns if _kind(c.arrow_type) in ("str", "bin")]
    roles = _Roles(
        times=tuple(c.name for c in spec.columns if is_time_column(c)),
        keys=tuple(keys),
        lengths=tuple((c.name, int(c.length)) for c in text if c.length is not None and c.length > 0),
        strings=tuple(c.name for c in text if _kind(c.arrow_type) == "str"),
    )
    _ROLES[id(spec)] = (spec, roles)
    return roles


def check_values(spec: TableSpec, data: pa.Table) -> None:
    """The domain rules of ``spec``'s columns on ``data`` (already cast to the schema's types)."""
    roles = _roles(spec)
    for name in roles.strings:
        _check_utf8(spec.name, name, data.column(name))
    for name, length in roles.lengths:
        _check_length(spec.name, name, data.column(name), length)
    for name in roles.times:
        _check_time(spec.name, name, data.column(name))
    for name, top in roles.keys:
        _check_key(spec.name, name, data.column(name), top)


def check_cast(table: str, column: ColumnSpec, original: pa.ChunkedArray, cast: pa.ChunkedArray) -> None:
    """What a float cast loses without an error: overflow to inf, inexact large integers."""
    if not pa.types.is_floating(original.type) or not len(original):
        return
    target = column.arrow_type
    if pa.types.is_floating(target):
        if target.bit_width >= original.type.bit_width:
            return
        largest = float(np.finfo(target.to_pandas_dtype()).max)
        lo, hi = _bounds(original)  # NaN and null are skipped
        if lo is None or (-largest <= lo and hi <= largest):
            return
        bad = _mask(pc.and_(pc.is_finite(original), pc.is_inf(cast)), False)
        if bad.any():
            raise CatalogError(
                table,
                column.name,
                f"finite values overflow Felis {column.datatype} ({largest:.4g} at most): it would store inf",
                _first_rows(bad),
            )
    elif pa.types.is_integer(target):
        lo, hi = _bounds(original)
        if lo is None or (lo >= -FLOAT_EXACT_INTEGER and hi <= FLOAT_EXACT_INTEGER):
            return
        bad = _mask(pc.greater(pc.abs(original), float(FLOAT_EXACT_INTEGER)), False)
        if bad.any():
            raise CatalogError(
                table,
                column.name,
                f"floats beyond +-2**53 are not exact integers: give {column.datatype} values as integers",
                _first_rows(bad),
            )


def _check_time(table: str, name: str, column: pa.ChunkedArray) -> None:
    if pa.types.is_timestamp(column.type):
        micros = column.cast(pa.int64())
        lo = int((MJD_MIN - _MJD_UNIX_EPOCH) * _US_PER_DAY)
        hi = int((MJD_MAX - _MJD_UNIX_EPOCH) * _US_PER_DAY)
        outside = pc.or_(pc.less(micros, lo), pc.greater(micros, hi))
        bad = _mask(outside, False)
        if bad.any():
            raise CatalogError(table, name, f"time outside {_WINDOW}", _first_rows(bad))
        return
    if column.null_count == len(column):
        return
    if column.null_count == 0:
        values = column.to_numpy()
        # min and max propagate NaN, which then fails both comparisons.
        if values.min() >= MJD_MIN and values.max() <= MJD_MAX:
            return
    else:
        lo, hi = _bounds(column)  # skips NaN as well as null
        nan = pc.any(pc.is_nan(column)).as_py()
        if not nan and lo is not None and lo >= MJD_MIN and hi <= MJD_MAX:
            return
    values = column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)  # nulls -> NaN
    with np.errstate(invalid="ignore"):
        bad = ~((values >= MJD_MIN) & (values <= MJD_MAX))
    bad &= ~_mask(pc.is_null(column), False)
    if bad.any():
        nan = bad & np.isnan(values)
        problem = "NaN time" if nan.any() else f"time outside {_WINDOW}"
        raise CatalogError(table, name, problem, _first_rows(nan if nan.any() else bad))


def _check_key(table: str, name: str, column: pa.ChunkedArray, top: int) -> None:
    lo, hi = _bounds(column)
    if lo is None or (lo >= 0 and hi <= top):
        return
    outside = pc.less(column, pa.scalar(0, column.type))
    if top < _integer_bounds(column.type)[1]:
        outside = pc.or_(outside, pc.greater(column, pa.scalar(top, column.type)))
    bad = _mask(outside, False)
    if bad.any():
        raise CatalogError(table, name, f"key value out of range [0, {top}]", _first_rows(bad))


def _check_length(table: str, name: str, column: pa.ChunkedArray, length: int) -> None:
    is_text = _kind(column.type) == "str"
    sizes = pc.utf8_length(column) if is_text else pc.binary_length(column)
    longest = pc.max(sizes).as_py()
    if longest is None or longest <= length:
        return
    bad = _mask(pc.greater(sizes, length), False)
    if bad.any():
        unit = "characters" if is_text else "bytes"
        raise CatalogError(
            table, name, f"longer than the schema's length of {length} {unit}", _first_rows(bad)
        )


def _check_utf8(table: str, name: str, column: pa.ChunkedArray) -> None:
    start = 0
    bad: list[int] = []
    for chunk in column.chunks:
        if not _valid(chunk):
            bad.extend(start + i for i in _invalid_rows(chunk, 0, len(chunk), 10 - len(bad)))
        start += len(chunk)
        if len(bad) >= 10:
            break
    if bad:
        raise CatalogError(table, name, "invalid UTF-8", bad)


def _valid(array: pa.Array) -> bool:
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _invalid_rows(array: pa.Array, lo: int, hi: int, limit: int) -> list[int]:
    """The first ``limit`` rows of ``array[lo:hi]`` (known invalid) that fail full validation:
    halving, so a few bad rows in a long column cost a few dozen C++ validations."""
    if limit <= 0:
        return []
    if hi - lo == 1:
        return [lo]
    mid = (lo + hi) // 2
    found: list[int] = []
    if not _valid(array.slice(lo, mid - lo)):
        found = _invalid_rows(array, lo, mid, limit)
    if len(found) < limit and not _valid(array.slice(mid, hi - mid)):
        found += _invalid_rows(array, mid, hi, limit - len(found))
    return found


# ---- helpers ----------------------------------------------------------------------------
def _integer_bounds(t: pa.DataType) -> tuple[int, int]:
    info = np.iinfo(t.to_pandas_dtype())
    return int(info.min), int(info.max)


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bin"
    return "other"


def _bounds(column: pa.ChunkedArray) -> tuple[Any, Any]:
    """(min, max) of a column, nulls (and NaN) skipped; ``(None, None)`` when nothing is left."""
    extremes = pc.min_max(column)
    return extremes["min"].as_py(), extremes["max"].as_py()


def _mask(values: Any, null: bool) -> BoolArray:
    """A numpy bool mask of a boolean (chunked) array, nulls as ``null``."""
    return np.asarray(pc.fill_null(values, null).to_numpy(zero_copy_only=False), dtype=bool)


def _first_rows(mask: BoolArray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:10]]
