"""Columnar helpers of the tier: gathering rows of segment tables (on a thread pool when large)
and selecting columns, with the fast paths a sky-sorted segment allows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.history.segment import Int64Array

#: Below this many rows a read gathers in the calling thread (a pool's hand-off costs more).
PARALLEL_MIN_ROWS = 50_000
_pool: tuple[int, ThreadPoolExecutor] | None = None


def thread_pool() -> ThreadPoolExecutor:
    """The threads that gather rows (Arrow's take releases the GIL): one per core, up to 4.
    Made again in a forked child, where the parent's threads do not exist."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)))
    return _pool[1]


def take_rows(data: pa.Table, indices: pa.Array) -> pa.Table:
    """``data.take(indices)``, column by column on the thread pool when it is large."""
    if len(indices) < PARALLEL_MIN_ROWS or data.num_columns < 2:
        return data.take(indices)
    columns = list(thread_pool().map(lambda c: c.take(indices), data.columns))
    return pa.Table.from_arrays(columns, schema=data.schema)


def gather(pieces: Sequence[tuple[pa.Table, Int64Array]]) -> list[pa.Table]:
    """The rows ``idx`` (ascending) of each piece's table, on the thread pool when there are many."""
    if sum(len(idx) for _, idx in pieces) < PARALLEL_MIN_ROWS:
        return [_gather_one(data, idx) for data, idx in pieces]
    # Segments are gathered in parallel: measured ~20% faster for a 12-month field read
    # (390k rows from 48 segments) on 2 cores.
    return list(thread_pool().map(lambda piece: _gather_one(*piece), pieces))


def _gather_one(data: pa.Table, idx: Int64Array) -> pa.Table:
    """``data.take(idx)``; when the rows are dense in their span (a region's rows of a
    sky-sorted segment come in long runs), a slice and a filter instead: Arrow's filter copies
    runs of selected rows whole. Measured on a 12-month field read (457k DiaSources from 50
    segments, 37% of the rows between each segment's first and last taken): 66 ms against 99 ms."""
    if not idx.size:
        return data.slice(0, 0)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if hi - lo > 4 * idx.size:
        return data.take(pa.array(idx))
    if hi - lo == idx.size:
        return data.slice(lo, hi - lo)  # every row of the span: no copy
    mask = np.zeros(hi - lo, dtype=bool)
    mask[idx - lo] = True
    return data.slice(lo, hi - lo).filter(pa.array(mask))


def select_columns(data: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``columns`` of a segment; a column added to the schema after it was written reads as nulls."""
    present = set(data.schema.names)
    missing = [c for c in columns if c not in present]
    if not missing:
        return data.select(list(columns))
    for name in missing:
        data = data.append_column(name, pa.nulls(data.num_rows))
    return data.select(list(columns))


def column_values(data: pa.Table, name: str) -> npt.NDArray[Any]:
    """A column as numpy: zero copy for a segment's single chunk."""
    col = data.column(name)
    values: npt.NDArray[Any] = col.chunk(0).to_numpy() if col.num_chunks == 1 else col.to_numpy()
    return values


def matching(data: pa.Table, name: str, idx: Int64Array, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Whether column ``name`` at rows ``idx`` is one of ``ids``; a null never is (a DiaSource
    of a solar-system object has no ``diaObjectId``). Numpy has no nullable integers, so nulls
    are masked, not converted (as floats, 64-bit ids would lose their low bits)."""
    col = data.column(name)
    if not col.null_count:
        found: npt.NDArray[np.bool_] = np.isin(column_values(data, name)[idx], ids)
        return found
    chunk = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    values = chunk.fill_null(0).to_numpy()[idx]
    valid: npt.NDArray[np.bool_] = chunk.is_valid().to_numpy(zero_copy_only=False)[idx]
    found = np.isin(values, ids)
    return found & valid
