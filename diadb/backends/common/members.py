"""Chunk membership by primary key, shared by the backends.

A store made with a key (``Apdb.store(..., key=...)``) records which rows it wrote: one row
``(chunk, table_name, k0, k1, k2)`` per DiaSource and DiaForcedSource, the row's primary key
(at most three integer columns; unused ones NULL). The change log then finds the store's rows
by these keys instead of by the rows' ``visit``/``detector``, so several keyed stores may share
a visit/detector. Stores without a key write nothing here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from diadb.errors import ConfigError
from diadb.schema.model import TableSpec

MEMBER_TABLES = ("DiaSource", "DiaForcedSource")
_INTEGER_TYPES = ("long", "int", "short", "byte")


def member_key(spec: TableSpec) -> list[str]:
    """The primary-key columns of ``spec`` a membership row holds (ConfigError if unsuitable)."""
    pk = list(spec.primary_key)
    if not pk or len(pk) > 3 or any(spec.column(c).datatype not in _INTEGER_TYPES for c in pk):
        raise ConfigError(
            f"{spec.name}: a keyed store needs a primary key of 1 to 3 integer columns, not {pk}"
        )
    return pk


def member_keys(spec: TableSpec, data: pa.Table) -> list[pa.Array]:
    """The primary key of each row of ``data`` (rows of ``spec``) as three int64 columns, the
    unused ones null."""
    pk = member_key(spec)
    n = data.num_rows
    return [
        data.column(pk[i]).cast(pa.int64()).combine_chunks() if i < len(pk) else pa.nulls(n, pa.int64())
        for i in range(3)
    ]


def member_rows(spec: TableSpec, data: pa.Table, owner: str, owner_id: int) -> pa.Table:
    """Membership rows of ``data`` (rows of ``spec``) for the chunk or store ``owner_id``."""
    n = data.num_rows
    columns: dict[str, pa.Array] = {
        owner: pa.array(np.full(n, owner_id, dtype=np.int64)),
        "table_name": pa.array([spec.name] * n, pa.string()),
    }
    for i, keys in enumerate(member_keys(spec, data)):
        columns[f"k{i}"] = keys
    return pa.table(columns)


def member_match(pk: Sequence[str], quote: Callable[[str], str], t: str = "t", m: str = "m") -> str:
    """The join condition of table alias ``t`` on membership alias ``m``."""
    return " AND ".join(f"{t}.{quote(c)} = {m}.k{i}" for i, c in enumerate(pk))
