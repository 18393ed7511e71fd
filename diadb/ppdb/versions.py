"""The DiaObject versions catalog of an export: every version, open and closed.

``DiaObject`` publishes the latest version of each object (what ``Apdb.read_pixels`` reads), so
the versions that later visits superseded, and the objects that daytime closed
(``set_validity_end``, a DiaObject emptied by ``reassign_to_ssobjects``), are not in it.
``DiaObjectVersion`` holds them all: one row per ``(diaObjectId, validityStartMjdTai)``, the
DiaObject columns of the Felis schema, each version at its own position, with its
``validityEndMjdTai`` as the database has it.

A full export takes the versions from the change log (``Apdb.read_chunks``: each store chunk's
DiaObject rows are its versions, with their current values), chunk batch by chunk batch. An
incremental export applies the new chunks in commit order to the exported versions
(:func:`apply_chunks`), as the engines do: a stored version closes the object's open version
at its own start; ``set_validity_end`` closes the open version; a source update's record sets
the open version's ``nDiaSources`` and ``reassign_to_ssobjects`` closes the objects it leaves
without sources. Applying the same chunks again gives the same rows (each rule only sets a
value from the record), so the result equals a full re-export. Update records of other kinds
(``log_updates``) do not change DiaObjects.

The whole catalog is held in memory while it is written (about the size of the DiaObject
versions in Arrow); the flat catalogs stay bounded by one partition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.ppdb import partition as part
from diadb.ppdb.layout import catalog_dir
from diadb.ppdb.options import ExportOptions
from diadb.ppdb.writer import TableWriter
from diadb.schema.model import HEALPIX_COLUMN

if TYPE_CHECKING:
    from diadb.apdb import Apdb
    from diadb.sky.regions import Region

VERSIONS = "DiaObjectVersion"
KEY = ("diaObjectId", "validityStartMjdTai")
#: Chunks read from the change log at a time by a full export.
CHUNK_BATCH = 64


class VersionsWriter(TableWriter):
    """A :class:`TableWriter` of ``DiaObjectVersion``, reading from the versions in memory."""

    def __init__(
        self, apdb: Apdb, root: Path, region: Region | None, opts: ExportOptions, versions: pa.Table
    ) -> None:
        super().__init__(apdb, root, "DiaObject", region, opts, name=VERSIONS)
        self.versions = versions.cast(self.schema)
        self.hp29 = np.asarray(self.versions.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)

    def read_rows(self, ranges: part.Int64Array) -> pa.Table:
        ranges = part.intersect_ranges(ranges, self.cover)
        return self.versions.filter(pa.array(part.in_ranges(self.hp29, ranges)))


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([(HEALPIX_COLUMN, "ascending"), *((k, "ascending") for k in KEY)])


def _inside(t: pa.Table, region: Region | None) -> pa.Table:
    if region is None or not t.num_rows:
        return t
    return t.filter(pa.array(region.contains(t.column("ra").to_numpy(), t.column("dec").to_numpy())))


def all_versions(apdb: Apdb, chunk_ids: np.ndarray, region: Region | None) -> pa.Table:
    """Every DiaObject version the change log's chunks stored, current values, sorted."""
    schema = apdb.schema.table("DiaObject").arrow_schema()
    parts = [schema.empty_table()]
    for i in range(0, len(chunk_ids), CHUNK_BATCH):
        rows = apdb.read_chunks(chunk_ids[i : i + CHUNK_BATCH].tolist())["DiaObject"]
        parts.append(_inside(rows.drop_columns(["_chunk_id"]).cast(schema), region))
    table = pa.concat_tables(parts)
    return _sorted(_unique(table))


def _unique(t: pa.Table) -> pa.Table:
    """One row per version key (the last one given)."""
    if not t.num_rows:
        return t
    idx = pa.array(np.arange(t.num_rows))
    last = t.append_column("_i", idx).group_by(list(KEY)).aggregate([("_i", "max")])
    return t.take(pa.array(np.sort(last.column("_i_max").to_numpy())))


def read_exported(root: Path, schema: pa.Schema) -> pa.Table:
    """The versions of an export (empty if it has none yet)."""
    import pyarrow.dataset as pds

    files = sorted(str(p) for p in (catalog_dir(root, VERSIONS) / "dataset").rglob("Npix=*.parquet"))
    if not files:
        return schema.empty_table()
    return pds.dataset(files, format="parquet", schema=schema).to_table()


def _events(updates: pa.Table | None) -> list[tuple[int, str, dict[str, object]]]:
    """The update records in commit order: (chunk id, kind, payload)."""
    if updates is None or not updates.num_rows:
        return []
    ordered = updates.sort_by([("chunk_id", "ascending"), ("seq", "ascending")])
    return [
        (int(c), str(k), json.loads(p))
        for c, k, p in zip(
            ordered.column("chunk_id").to_pylist(),
            ordered.column("kind").to_pylist(),
            ordered.column("payload").to_pylist(),
            strict=True,
        )
    ]


ObjectEvent = tuple[int, int, float | None, int | None]


def _object_events(events: list[tuple[int, str, dict[str, object]]]) -> list[ObjectEvent]:
    """Per object changed by the records, in order: (chunk, id, closing time or None, count or None)."""
    out: list[ObjectEvent] = []
    for chunk, kind, payload in events:
        when = payload.get("when_mjd_tai")
        if kind == "set_validity_end":
            ids = payload.get("diaObjectIds")
            for i in ids if isinstance(ids, list) else []:
                out.append((chunk, int(i), float(when), None))  # type: ignore[arg-type]
        elif kind in ("reassign_sources", "reassign_to_ssobjects"):
            objects = payload.get("objects")
            for o in objects if isinstance(objects, list) else []:
                n = int(o["nDiaSources"])
                out.append((chunk, int(o["diaObjectId"]), None, n))
                if kind == "reassign_to_ssobjects" and n <= 0:
                    out.append((chunk, int(o["diaObjectId"]), float(when), None))  # type: ignore[arg-type]
    return out


def apply_chunks(
    exported: pa.Table, changes: dict[str, pa.Table], region: Region | None
) -> tuple[pa.Table, np.ndarray]:
    """The versions after the chunks of ``changes`` (``Apdb.read_chunks``), and the order-29
    pixels of the versions whose rows may have changed."""
    schema = exported.schema
    stored = changes.get("DiaObject")
    new = _inside(stored, region) if stored is not None else None
    events = _object_events(_events(changes.get("updates")))
    new_ids = (
        np.zeros(0, np.int64) if new is None else np.asarray(new.column("diaObjectId").to_numpy(), np.int64)
    )
    touched = np.unique(np.concatenate([new_ids, np.array([e[1] for e in events], dtype=np.int64)]))
    mine = pc.is_in(exported.column("diaObjectId"), pa.array(touched, pa.int64()))
    kept = exported.filter(pc.invert(mine))
    old = exported.filter(mine)
    if new is not None and new.num_rows and old.num_rows:
        # Versions these chunks stored that the export already holds (the same chunks applied
        # again): the chunk's row is the one replayed.
        old = old.join(new.select(list(KEY)), keys=list(KEY), join_type="left anti")
        old = old.select(exported.schema.names).cast(exported.schema)
    work = [old.append_column("_chunk", pa.array(np.full(old.num_rows, -1, np.int64)))]
    if new is not None and new.num_rows:
        # Their closing is replayed below, in order: start from the stored (open) version.
        fresh = new.drop_columns(["_chunk_id"]).cast(schema)
        fresh = fresh.set_column(
            fresh.schema.get_field_index("validityEndMjdTai"),
            schema.field("validityEndMjdTai"),
            pa.nulls(fresh.num_rows, schema.field("validityEndMjdTai").type),
        )
        work.append(fresh.append_column("_chunk", new.column("_chunk_id").cast(pa.int64())))
    rows = pa.concat_tables(work).sort_by(
        [("diaObjectId", "ascending"), ("validityStartMjdTai", "ascending")]
    )
    ids = np.asarray(rows.column("diaObjectId").to_numpy(), dtype=np.int64)
    starts = np.asarray(rows.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
    chunk = np.asarray(rows.column("_chunk").to_numpy(), dtype=np.int64)
    old_end = np.asarray(pc.fill_null(rows.column("validityEndMjdTai"), np.nan).to_numpy(), dtype=np.float64)
    no_count = np.asarray(pc.is_null(rows.column("nDiaSources")).to_numpy(zero_copy_only=False), dtype=bool)
    counts = np.asarray(pc.fill_null(rows.column("nDiaSources"), 0).to_numpy(), dtype=np.int64)
    closed = np.full(len(ids), np.nan)
    lo = np.searchsorted(ids, touched, side="left")
    hi = np.searchsorted(ids, touched, side="right")
    span = {int(i): (int(a), int(b)) for i, a, b in zip(touched, lo, hi, strict=True)}
    for k, oid, when, n in events:
        a, b = span.get(oid, (0, 0))
        # The object's latest version stored by then, if it is still open.
        t = a + int(np.searchsorted(chunk[a:b], k, side="right")) - 1
        if t < a or not (np.isnan(old_end[t]) and np.isnan(closed[t])):
            continue
        if n is not None:
            counts[t] = n
            no_count[t] = False
        if when is not None:
            closed[t] = when
    same_next = np.r_[ids[1:] == ids[:-1], False]
    next_start = np.where(same_next, np.r_[starts[1:], np.nan], np.nan)
    end = np.where(~np.isnan(old_end), old_end, np.where(~np.isnan(closed), closed, next_start))
    end_field = schema.field("validityEndMjdTai")
    rows = rows.drop_columns(["_chunk"])
    rows = rows.set_column(
        rows.schema.get_field_index("validityEndMjdTai"),
        end_field,
        pa.array(end, end_field.type, mask=np.isnan(end)),
    )
    n_field = schema.field("nDiaSources")
    rows = rows.set_column(
        rows.schema.get_field_index("nDiaSources"),
        n_field,
        pa.array(counts, mask=no_count).cast(n_field.type),
    )
    changed = np.asarray(rows.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
    return _sorted(pa.concat_tables([kept, rows.cast(schema)])), changed


__all__ = ["KEY", "VERSIONS", "VersionsWriter", "all_versions", "apply_chunks", "read_exported"]
