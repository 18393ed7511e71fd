"""Packed rows: many fixed-width columns stored as one binary value per row.

Both server engines pay per value, not per byte: Cassandra per cell, PostgreSQL per field that its
binary ``COPY`` sends (a call of the type's send function on the server, a length word on the
wire, a decode on the client). A DiaSource row has 103 columns, most of them doubles that no
query filters on and no update changes. Those go into one blob per row: their little-endian
values followed by a null bitmap, built and taken apart with NumPy a column at a time (no Python
per row). A source row becomes ~20 values instead of 103.

Hand-written because no library does it: Arrow has no fixed-layout row encoding, and the
engines' own composite types still cost per field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, TableSpec
from diadb.schema.types import arrow_type

#: The binary column holding a row's packed columns.
PACKED = "apdb_packed"
#: Felis datatypes that can be packed, with their little-endian NumPy form in the blob.
PACKABLE = {
    "double": "<f8",
    "float": "<f4",
    "long": "<i8",
    "int": "<i4",
    "short": "<i2",
    "byte": "i1",
    "boolean": "u1",
}
#: Never packed: what queries filter on, what daytime updates change, what the change log and
#: the key checks read back (and every primary-key column).
UNPACKED = frozenset(
    {
        HEALPIX_COLUMN,
        "diaObjectId",
        "diaSourceId",
        "diaForcedSourceId",
        "ssObjectId",
        "parentDiaSourceId",
        "visit",
        "detector",
        "ra",
        "dec",
        "midpointMjdTai",
        "validityStartMjdTai",
        "validityEndMjdTai",
        "nDiaSources",
        "ssObjectReassocTimeMjdTai",
        "timeWithdrawnMjdTai",
    }
)


def packed_columns(spec: TableSpec) -> list[str]:
    """The columns of ``spec`` to store packed: fixed-width, not filtered on, not updated."""
    return [
        c.name
        for c in spec.columns
        if c.datatype in PACKABLE and c.name not in UNPACKED and c.name not in spec.primary_key
    ]


class RowPacker:
    """Packs and unpacks the columns a layout froze as packed (``{table: [column, ...]}``)."""

    def __init__(self, schema: Callable[[], ApdbSchema]) -> None:
        self._schema = schema
        self.packed: dict[str, list[str]] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}

    def set(self, packed: Mapping[str, Sequence[str]]) -> None:
        self.packed = {t: list(cols) for t, cols in packed.items() if cols}
        self._dtypes = {}  # built when first used (the schema may not be attached yet)

    def dtype(self, table: str) -> np.dtype[Any]:
        dtype = self._dtypes.get(table)
        if dtype is None:
            spec = self._schema().table(table)
            cols = self.packed[table]
            dtype = np.dtype(
                [(c, PACKABLE[spec.column(c).datatype]) for c in cols]
                + [("__valid", "u1", ((len(cols) + 7) // 8,))]
            )
            self._dtypes[table] = dtype
        return dtype

    def pack(self, table: str, data: pa.Table) -> pa.Table:
        """``data`` with ``table``'s packed columns replaced by the ``PACKED`` blob column."""
        names = self.packed.get(table)
        if not names:
            return data
        n = data.num_rows
        dtype = self.dtype(table)
        rec = np.zeros(n, dtype=dtype)
        valid = np.ones((n, len(names)), dtype=bool)
        present = set(data.column_names)
        for j, c in enumerate(names):  # one NumPy pass per column
            if c not in present:
                valid[:, j] = False
                continue
            col = data.column(c)
            if pa.types.is_boolean(col.type):
                col = col.cast(pa.uint8())
            rec[c] = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False))
            if col.null_count:
                valid[:, j] = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        rec["__valid"] = np.packbits(valid, axis=1, bitorder="little")
        size = dtype.itemsize
        # Built from the record array's bytes directly (64-bit offsets: no 2 GiB limit).
        offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int64) * size).tobytes())
        blob = pa.Array.from_buffers(pa.large_binary(), n, [None, offsets, pa.py_buffer(rec.tobytes())])
        return data.drop_columns([c for c in names if c in present]).append_column(PACKED, blob)

    def unpack(
        self, table: str, blobs: pa.ChunkedArray | pa.Array, wanted: Sequence[str]
    ) -> dict[str, pa.Array]:
        """The ``wanted`` packed columns of ``table`` out of the ``PACKED`` blobs of some rows."""
        names = self.packed[table]
        dtype = self.dtype(table)
        size = dtype.itemsize
        n = len(blobs)
        # A row without a blob (only ever written by a partial update) has every packed value null.
        arr = blobs.cast(pa.large_binary()).fill_null(pa.scalar(bytes(size), pa.large_binary()))
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if n and not pc.all(pc.equal(pc.binary_length(arr), size)).as_py():
            raise StorageError(f"{table}: a packed row does not match the layout's packed columns")
        rec = np.zeros(0, dtype=dtype)
        if n:
            # Every blob has the same size and the values are contiguous: one view of them all.
            first = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=1, offset=arr.offset * 8)[0]
            rec = np.frombuffer(arr.buffers()[2], dtype=dtype, count=n, offset=int(first))
        valid = np.unpackbits(rec["__valid"], axis=1, count=len(names), bitorder="little").astype(bool)
        spec = self._schema().table(table)
        out: dict[str, pa.Array] = {}
        for c in wanted:
            j = names.index(c)
            datatype = spec.column(c).datatype
            values = np.ascontiguousarray(rec[c])
            if datatype == "boolean":
                values = values.astype(bool)
            mask = ~valid[:, j]
            out[c] = pa.array(values, type=arrow_type(datatype), mask=mask if mask.any() else None)
        return out

    def physical(self, table: str, columns: Sequence[str]) -> list[str]:
        """The stored columns to select for ``columns`` of logical ``table`` (packed ones: the blob)."""
        packed = set(self.packed.get(table, ()))
        out = [c for c in columns if c not in packed]
        if packed.intersection(columns):
            out.append(PACKED)
        return out

    def expand(self, table: str, raw: pa.Table, columns: Sequence[str] | None = None) -> pa.Table:
        """Stored rows -> logical ``columns`` (default: every stored column, the packed ones in
        their schema place and the ``PACKED`` blob gone)."""
        if PACKED not in raw.column_names:
            return raw if columns is None else raw.select(list(columns))
        packed = self.packed[table]
        if columns is None:
            order = [c.name for c in self._schema().table(table).columns]
            known, stored = set(order), set(raw.column_names)
            # The schema's columns in schema order where the first of them stood; any other
            # column (a key a query added, the pixel) keeps its place.
            columns = []
            for c in raw.column_names:
                if c in known and c not in columns:
                    columns += [s for s in order if s in stored or s in packed]
                elif c not in known and c != PACKED:
                    columns.append(c)
        want = set(columns)
        unpacked = self.unpack(table, raw.column(PACKED), [c for c in packed if c in want])
        return pa.table({c: unpacked[c] if c in unpacked else raw.column(c) for c in columns})
