"""Packed rows (diadb.backends.common.packing): any values and nulls of the packable types come back."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diadb.backends.common.packing import PACKED, RowPacker, packed_columns
from diadb.errors import StorageError
from diadb.schema import load_schema
from diadb.schema.model import ApdbSchema
from diadb.schema.types import arrow_type
from diadb.sim.fill import fill_table


@functools.cache
def _schema() -> ApdbSchema:
    return load_schema()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 60), seed=st.integers(0, 2**31 - 1), every=st.integers(1, 5))
def test_pack_then_unpack_gives_the_rows_back(rows, seed, every):
    official_schema = _schema()
    spec = official_schema.table("DiaSource")
    packer = RowPacker(lambda: official_schema)
    packer.set({"DiaSource": packed_columns(spec)})
    rng = np.random.default_rng(seed)
    data = fill_table(spec, rows, rng, {})
    # Nulls in every packed column (a different pattern each), NaN and infinities kept as values.
    for i, name in enumerate(packer.packed["DiaSource"]):
        col = data.column(name)
        mask = (np.arange(rows) + i) % (every + 1) == 0
        if pa.types.is_floating(col.type) and rows:
            values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=float).copy()
            values[rng.integers(0, rows)] = rng.choice([np.nan, np.inf, -np.inf, -0.0])
            col = pa.array(values, col.type)
        data = data.set_column(
            data.column_names.index(name), name, pa.array(col.to_pylist(), col.type, mask=mask)
        )
    stored = packer.pack("DiaSource", data)
    assert PACKED in stored.column_names and not set(packer.packed["DiaSource"]) & set(stored.column_names)
    back = packer.expand("DiaSource", stored, data.column_names)
    assert back.column_names == data.column_names
    for name in data.column_names:
        got, sent = back.column(name).cast(data.column(name).type), data.column(name)
        assert got.is_null().equals(sent.is_null()), name
        if name not in packer.packed["DiaSource"]:
            assert got.equals(sent), name
            continue
        # NaN is a value (not a null) and must come back as NaN, -0.0 as -0.0: compare bits.
        zero = pa.scalar(False) if pa.types.is_boolean(sent.type) else pa.scalar(0, sent.type)
        got_v = np.asarray(got.fill_null(zero).to_numpy(zero_copy_only=False))
        sent_v = np.asarray(sent.fill_null(zero).to_numpy(zero_copy_only=False))
        assert got_v.tobytes() == sent_v.tobytes(), name


def test_a_blob_of_another_layout_is_refused(official_schema: ApdbSchema):
    packer = RowPacker(lambda: official_schema)
    packer.set({"DiaSource": packed_columns(official_schema.table("DiaSource"))})
    with pytest.raises(StorageError, match="DiaSource: a packed row does not match"):
        packer.unpack("DiaSource", pa.array([b"\x00" * 7], pa.binary()), ["psfFlux"])


def test_column_types_follow_the_schema(official_schema: ApdbSchema):
    spec = official_schema.table("DiaObject")
    packer = RowPacker(lambda: official_schema)
    packer.set({"DiaObject": packed_columns(spec)})
    data = fill_table(spec, 5, np.random.default_rng(1), {})
    back = packer.expand("DiaObject", packer.pack("DiaObject", data))
    for name in packer.packed["DiaObject"]:
        assert back.column(name).type == arrow_type(spec.column(name).datatype), name
