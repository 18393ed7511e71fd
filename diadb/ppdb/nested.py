"""The light-curve catalog of an export: each DiaObject with its sources nested in it.

``DiaObjectLightCurve`` (an export option, :attr:`ExportOptions.light_curves`) holds the latest
version of every DiaObject, as the ``DiaObject`` catalog does and in the same partitions, plus
two nested columns: ``diaSource`` and ``diaForcedSource``, each a list of structs holding every
column of the object's DiaSources (DiaForcedSources), sorted by ``midpointMjdTai`` (then by
key). LSDB and nested-pandas read a list-of-structs column as a nested column
(``lsdb.open_catalog(DIR / "DiaObjectLightCurve")``; ``catalog["diaSource.psfFlux"]``), as
LINCC's ``ppdb_hats`` publishes the PPDB.

The sources of a partition's objects are read from the APDB by object id (``get_sources`` and
``get_forced_sources`` with an open time window), wherever they lie on the sky: a source moved
to an object far away (``reassign_sources``) is still in its light curve. The catalog has its
margin and ``diaObjectId`` index like the flat ones; an incremental export rewrites the
partitions whose objects or sources changed (:mod:`diadb.ppdb.incremental`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.ppdb import partition as part
from diadb.ppdb.options import ExportOptions
from diadb.ppdb.writer import TableWriter
from diadb.schema.domain import MJD_MAX

if TYPE_CHECKING:
    from diadb.apdb import Apdb
    from diadb.sky.regions import Region

LIGHT_CURVES = "DiaObjectLightCurve"
#: The nested columns: name -> (APDB table, sort key after ``midpointMjdTai``).
NESTED = {
    "diaSource": ("DiaSource", ("diaSourceId",)),
    "diaForcedSource": ("DiaForcedSource", ("visit", "detector")),
}


def light_curve_schema(apdb: Apdb, base: pa.Schema) -> pa.Schema:
    """The DiaObject schema ``base`` with the nested columns appended."""
    fields = list(base)
    for column, (table, _) in NESTED.items():
        inner = apdb.schema.table(table).arrow_schema()
        struct = pa.struct(list(inner))  # every column of the table, its _healpix_29 included
        fields.append(pa.field(column, pa.list_(pa.field("element", struct, nullable=False)), nullable=False))
    return pa.schema(fields, metadata=base.metadata)


class LightCurveWriter(TableWriter):
    """A :class:`TableWriter` of ``DiaObjectLightCurve``: DiaObject rows with nested sources."""

    def __init__(self, apdb: Apdb, root: Path, region: Region | None, opts: ExportOptions):
        super().__init__(apdb, root, "DiaObject", region, opts, name=LIGHT_CURVES)
        self.object_schema = self.schema
        self.set_schema(light_curve_schema(apdb, self.schema))

    def _read(self, ranges: part.Int64Array) -> pa.Table:
        objects = self.read_rows(ranges).cast(self.object_schema)
        ids = np.asarray(objects.column("diaObjectId").to_numpy(), dtype=np.int64)
        columns = [objects.column(i) for i in range(objects.num_columns)]
        for column, (table, key) in NESTED.items():
            columns.append(self._nested(table, ids, key, self.schema.field(column).type))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _nested(self, table: str, ids: np.ndarray, key: tuple[str, ...], type_: pa.DataType) -> pa.Array:
        """One list per object (in ``ids``' order) of its rows of ``table``, sorted by time."""
        read = self.apdb.get_sources if table == "DiaSource" else self.apdb.get_forced_sources
        struct_type = type_.value_type
        if len(ids):
            rows = read(None, MJD_MAX, object_ids=ids, start=float("-inf"), end=float("inf"))
        else:
            rows = pa.schema(list(struct_type)).empty_table()
        # Each row's object, as its position in ``ids``; then the object's rows by time and key.
        order = np.argsort(ids, kind="stable")
        owner = np.asarray(rows.column("diaObjectId").to_numpy(), dtype=np.int64)
        where = order[np.clip(np.searchsorted(ids[order], owner), 0, max(len(ids) - 1, 0))]
        rows = rows.append_column("_owner", pa.array(where, pa.int64()))
        rows = rows.sort_by(
            [("_owner", "ascending"), ("midpointMjdTai", "ascending"), *((k, "ascending") for k in key)]
        )
        counts = np.bincount(np.asarray(rows.column("_owner").to_numpy(), dtype=np.int64), minlength=len(ids))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        fields = list(struct_type)
        inner = pa.StructArray.from_arrays(
            [rows.column(f.name).combine_chunks().cast(f.type) for f in fields], fields=fields
        )
        return pa.ListArray.from_arrays(pa.array(offsets), inner, type=type_)


def writer_for(apdb: Apdb, root: Path, name: str, region: Region | None, opts: ExportOptions) -> TableWriter:
    """The writer of the catalog ``name`` (a table's, or the light curves)."""
    if name == LIGHT_CURVES:
        return LightCurveWriter(apdb, root, region, opts)
    return TableWriter(apdb, root, name, region, opts)


def light_curve_ids(rows: pa.Table | None) -> np.ndarray:
    """The DiaObjects whose light curves these stored or changed source rows touch."""
    if rows is None or not rows.num_rows or "diaObjectId" not in rows.column_names:
        return np.zeros(0, np.int64)
    return np.asarray(pc.drop_null(rows.column("diaObjectId")).to_numpy(), dtype=np.int64)


__all__ = ["LIGHT_CURVES", "LightCurveWriter", "light_curve_schema", "writer_for"]
