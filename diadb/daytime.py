"""Daytime operations and the change log of ``diadb.Apdb`` (mixed into the facade).

Between nights the solar-system pipeline moves DiaSources from DiaObjects to SSObjects and
deduplication moves them between DiaObjects; objects' validity intervals get closed. Each
call is one atomic engine transaction and one chunk of the change log that feeds the PPDB.
Sources already in history segments are changed through an overlay the reads apply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import HistoryCapable, TimeWindow
from diadb.errors import SchemaVersionError
from diadb.history.tier import HISTORY_TABLES
from diadb.times import mjd_tai

if TYPE_CHECKING:
    from diadb.backends import Backend
    from diadb.config import ApdbConfig
    from diadb.history.tier import HistoryTier
    from diadb.schema.model import ApdbSchema, TableSpec

#: The DiaSource columns daytime operations change.
MUTABLE_SOURCE_COLUMNS = ("diaObjectId", "ssObjectId", "ssObjectReassocTimeMjdTai", "timeWithdrawnMjdTai")


def _now_mjd_tai() -> float:
    from astropy.time import Time

    return float(Time(time.time(), format="unix").tai.mjd)


def _mapping_table(mapping: Mapping[int, int | None], key: str, value: str) -> pa.Table:
    keys = np.fromiter((int(k) for k in mapping), dtype=np.int64, count=len(mapping))
    values = pa.array([None if v is None else int(v) for v in mapping.values()], pa.int64())
    return pa.table({key: keys, value: values})


class DaytimeMixin:
    """The daytime API; see the module docstring. Each call is atomic; unknown IDs raise
    ``LookupError`` naming them, and nothing changes."""

    # Provided by Apdb.
    url: str
    read_only: bool
    schema: ApdbSchema
    config: ApdbConfig
    _backend: Backend
    _tier: HistoryTier | None

    def _cast_to_schema(self, spec: TableSpec, raw: pa.Table, names: Sequence[str]) -> pa.Table:
        raise NotImplementedError  # provided by Apdb

    def _writable(self) -> Any:
        if self.read_only:
            raise SchemaVersionError(f"{self.url} is open read-only")
        return self._backend

    # ---- daytime updates -----------------------------------------------------------
    def reassign_to_ssobjects(self, mapping: Mapping[int, int], *, time: Any = None) -> None:
        """Move DiaSources (``{diaSourceId: ssObjectId}``) to solar-system objects: each leaves its
        DiaObject, whose ``nDiaSources`` drops; a DiaObject left with no sources is removed."""
        when = _now_mjd_tai() if time is None else mjd_tai(time)
        changes = _mapping_table(mapping, "diaSourceId", "ssObjectId")
        n = changes.num_rows
        changes = changes.append_column("diaObjectId", pa.nulls(n, pa.int64()))
        changes = changes.append_column("ssObjectReassocTimeMjdTai", pa.array(np.full(n, when)))
        self._update_sources(changes, "reassign_to_ssobjects", when, object_deltas=True, remove_empty=True)

    def reassign_sources(self, mapping: Mapping[int, int], *, time: Any = None) -> None:
        """Move DiaSources to other DiaObjects (``{diaSourceId: diaObjectId}``, deduplication);
        ``nDiaSources`` of both objects follows."""
        when = _now_mjd_tai() if time is None else mjd_tai(time)
        changes = _mapping_table(mapping, "diaSourceId", "diaObjectId")
        changes = changes.append_column("ssObjectId", pa.nulls(changes.num_rows, pa.int64()))
        self._update_sources(changes, "reassign_sources", when, object_deltas=True, remove_empty=False)

    def withdraw_sources(self, source_ids: Iterable[int], *, time: Any = None) -> None:
        """Mark DiaSources withdrawn (``timeWithdrawnMjdTai``)."""
        when = _now_mjd_tai() if time is None else mjd_tai(time)
        ids = np.unique(np.fromiter((int(i) for i in source_ids), dtype=np.int64))
        changes = pa.table({"diaSourceId": ids, "timeWithdrawnMjdTai": np.full(len(ids), when)})
        self._update_sources(changes, "withdraw_sources", when, object_deltas=False, remove_empty=False)

    def _update_sources(
        self, changes: pa.Table, kind: str, when: float, *, object_deltas: bool, remove_empty: bool
    ) -> None:
        backend = self._writable()
        if not changes.num_rows:
            return
        backend.update_sources(
            changes,
            kind=kind,
            when_mjd=when,
            segment_lookup=self._segment_sources,
            object_deltas=object_deltas,
            remove_empty=remove_empty,
        )

    def set_validity_end(self, object_ids: Iterable[int], time: Any) -> int:
        """Close the validity of these DiaObjects' current versions at ``time``; they are no
        longer returned by ``get_objects``. Returns how many versions were closed."""
        ids = np.fromiter((int(i) for i in object_ids), dtype=np.int64)
        if not len(ids):
            return 0
        count: int = self._writable().set_validity_end(ids, mjd_tai(time))
        return count

    def get_objects_for_dedup(self, since: Any, *, columns: Sequence[str] | None = None) -> pa.Table:
        """Latest DiaObject versions written at or after ``since`` (the previous deduplication)."""
        spec = self.schema.table("DiaObject")
        raw = self._backend.objects_since(mjd_tai(since))
        names = [c for c in raw.column_names]
        data = self._cast_to_schema(spec, raw, names)
        return data.select(list(columns)) if columns is not None else data

    def count_unassociated_objects(self) -> int:
        """How many current DiaObjects have exactly one DiaSource."""
        count: int = self._backend.count_unassociated()
        return count

    # ---- the change log ------------------------------------------------------------
    def replica_chunks(self, *, published: bool | None = None) -> pa.Table:
        """The change log's chunks in commit order: ``chunk_id``, ``kind`` (store or update),
        ``visit``, ``detector``, ``visit_mjd_tai``, ``stored_at``, ``published``."""
        chunks: pa.Table = self._backend.list_chunks(published)
        return chunks

    def read_chunks(self, chunk_ids: Iterable[int]) -> dict[str, pa.Table]:
        """What these chunks wrote: ``DiaObject`` (versions), ``DiaSource``, ``DiaForcedSource``
        (each with ``_chunk_id`` first, schema types) and ``updates`` (daytime records, JSON)."""
        ids = np.fromiter((int(i) for i in chunk_ids), dtype=np.int64)
        raw: dict[str, pa.Table] = self._backend.chunk_rows(ids.tolist())
        out: dict[str, pa.Table] = {"updates": raw["updates"]}
        chunks = self.replica_chunks().filter(pc.is_in(pc.field("chunk_id"), pa.array(ids)))
        for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
            spec = self.schema.table(name)
            table = raw[name]
            cols = [c for c in table.column_names if c != "_chunk_id"]
            typed = self._cast_to_schema(spec, table.select(cols), cols)
            typed = typed.add_column(0, "_chunk_id", table.column("_chunk_id").cast(pa.int64()))
            if name in HISTORY_TABLES:
                typed = self._with_segment_chunk_rows(name, typed, chunks)
            out[name] = typed
        return out

    def mark_published(self, chunk_ids: Iterable[int]) -> None:
        """Record that these chunks reached the PPDB."""
        self._writable().mark_published([int(i) for i in chunk_ids])

    # ---- history segments ----------------------------------------------------------
    def _segment_sources(self, ids: npt.NDArray[np.int64]) -> pa.Table:
        """Current stored values of DiaSources found in the history segments (newest first)."""
        keys = ["diaSourceId", "_healpix_29", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS]
        if self._tier is None or not len(ids):
            spec = self.schema.table("DiaSource").arrow_schema()
            return spec.empty_table().select(keys)
        assert isinstance(self._backend, HistoryCapable)
        segments = sorted(self._backend.list_segments("DiaSource"), key=lambda s: -s.t_max)
        return self._tier.find_rows(segments, "diaSourceId", ids, keys)

    def _with_segment_chunk_rows(self, table: str, engine_rows: pa.Table, chunks: pa.Table) -> pa.Table:
        """Add the rows of store chunks that compaction moved into segments."""
        stores = chunks.filter(pc.equal(chunks.column("kind"), "store"))
        if self._tier is None or not stores.num_rows:
            return engine_rows
        assert isinstance(self._backend, HistoryCapable)
        parts = [engine_rows]
        segments = self._backend.list_segments(table)
        for chunk in stores.to_pylist():
            window = TimeWindow(chunk["visit_mjd_tai"] - 1.0, chunk["visit_mjd_tai"] + 1.0)
            found = self._tier.select(
                segments,
                np.zeros((0, 2), np.int64),
                engine_rows.column_names[1:],
                region=None,
                window=window,
                object_ids=None,
            )
            for part in found:
                mask = pc.equal(part.column("visit"), chunk["visit"])
                if chunk["detector"] != -1:
                    mask = pc.and_(mask, pc.equal(part.column("detector"), chunk["detector"]))
                rows = part.filter(mask)
                if rows.num_rows:
                    ids = pa.array(np.full(rows.num_rows, chunk["chunk_id"], dtype=np.int64))
                    parts.append(rows.add_column(0, "_chunk_id", ids).cast(engine_rows.schema))
        return pa.concat_tables(parts)

    def _apply_overlay(self, data: pa.Table, overlay: pa.Table) -> pa.Table:
        """Replace mutable columns of segment rows by the overlay's current values."""
        if not overlay.num_rows or not data.num_rows or "diaSourceId" not in data.column_names:
            return data
        pos = pc.index_in(
            data.column("diaSourceId"), value_set=overlay.column("diaSourceId").cast(pa.int64())
        )
        hit = pc.is_valid(pos)
        if not pc.any(hit).as_py():
            return data
        take = pc.fill_null(pos, 0)
        for name in MUTABLE_SOURCE_COLUMNS:
            if name in data.column_names:
                field = data.schema.field(name)
                values = overlay.column(name).cast(field.type).take(take)
                data = data.set_column(
                    data.schema.get_field_index(name), field, pc.if_else(hit, values, data.column(name))
                )
        return data
