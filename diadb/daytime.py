"""Daytime operations and the change log of ``diadb.Apdb`` (mixed into the facade).

Between nights the solar-system pipeline moves DiaSources from DiaObjects to SSObjects and
deduplication moves them between DiaObjects; objects' validity intervals get closed. Each
call is one atomic engine transaction and one chunk of the change log that feeds the PPDB.
Sources already in history segments are changed through an overlay the reads apply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import CHUNK_SCHEMA, TimeWindow
from diadb.errors import ConfigError, SchemaVersionError
from diadb.history.manifest import HistoryEngine as HistoryCapable
from diadb.history.tier import HISTORY_TABLES
from diadb.times import mjd_tai
from diadb.updates import (
    FORCED_CURRENT,
    FORCED_KEY,
    MUTABLE_SOURCE_COLUMNS,
    empty_forced,
    forced_keys,
    mapping_table,
    missing_keys,
    normalise_forced,
)

if TYPE_CHECKING:
    from diadb.backends import Backend
    from diadb.config import ApdbConfig
    from diadb.history.tier import HistoryTier
    from diadb.schema.model import ApdbSchema, TableSpec

#: Metadata key prefixes of diadb and its engines (not user metadata).
RESERVED_PREFIXES = ("diadb.", "felis.", "postgres.", "cassandra.", "sqlite.")
#: The kinds of update record diadb's own daytime calls write.
NATIVE_UPDATE_KINDS = (
    "reassign_to_ssobjects",
    "reassign_sources",
    "withdraw_sources",
    "withdraw_forced_sources",
    "set_validity_end",
)


def _now_mjd_tai() -> float:
    from astropy.time import Time

    return float(Time(time.time(), format="unix").tai.mjd)


def _members_of(members: pa.Table | None, chunk_id: int, table: str) -> pa.Table | None:
    """The membership rows of one keyed store chunk for ``table`` (None: not a keyed store)."""
    if members is None or not members.num_rows:
        return None
    mine = members.filter(pc.equal(members.column("_chunk_id").cast(pa.int64()), chunk_id))
    if not mine.num_rows:
        return None
    return mine.filter(pc.equal(mine.column("table_name"), table))


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
        changes = mapping_table(mapping, "diaSourceId", "ssObjectId")
        n = changes.num_rows
        changes = changes.append_column("diaObjectId", pa.nulls(n, pa.int64()))
        changes = changes.append_column("ssObjectReassocTimeMjdTai", pa.array(np.full(n, when)))
        self._update_sources(changes, "reassign_to_ssobjects", when, object_deltas=True, remove_empty=True)

    def reassign_sources(
        self,
        mapping: Mapping[int, int],
        *,
        time: Any = None,
        increment: bool = True,
        decrement: bool = True,
    ) -> None:
        """Move DiaSources to other DiaObjects (``{diaSourceId: diaObjectId}``, deduplication).
        ``nDiaSources`` of the new object grows (``increment``) and of the old one drops
        (``decrement``); the change log records each object's new count."""
        when = _now_mjd_tai() if time is None else mjd_tai(time)
        changes = mapping_table(mapping, "diaSourceId", "diaObjectId")
        changes = changes.append_column("ssObjectId", pa.nulls(changes.num_rows, pa.int64()))
        self._update_sources(
            changes,
            "reassign_sources",
            when,
            object_deltas=increment or decrement,
            remove_empty=False,
            increment=increment,
            decrement=decrement,
        )

    def withdraw_sources(
        self, source_ids: Iterable[int], *, time: Any = None, update_time: Any = None
    ) -> None:
        """Mark DiaSources withdrawn (``timeWithdrawnMjdTai`` = ``time``, default now); a source
        already withdrawn keeps its time. ``update_time`` (default ``time``) is the time the
        change log records for this update."""
        when = _now_mjd_tai() if time is None else mjd_tai(time)
        logged = when if update_time is None else mjd_tai(update_time)
        ids = np.unique(np.fromiter((int(i) for i in source_ids), dtype=np.int64))
        changes = pa.table({"diaSourceId": ids, "timeWithdrawnMjdTai": np.full(len(ids), when)})
        self._update_sources(
            changes,
            "withdraw_sources",
            logged,
            object_deltas=False,
            remove_empty=False,
            only_null="timeWithdrawnMjdTai",
        )

    def withdraw_forced_sources(
        self, keys: Iterable[tuple[int, int, int]], *, time: Any = None, update_time: Any = None
    ) -> None:
        """Mark DiaForcedSources, named by ``(diaObjectId, visit, detector)``, withdrawn (at
        ``time``, default now); one already withdrawn keeps its time. Unknown keys raise
        ``LookupError``, and nothing changes. ``update_time`` as for :meth:`withdraw_sources`."""
        when = _now_mjd_tai() if time is None else mjd_tai(time)
        logged = when if update_time is None else mjd_tai(update_time)
        table = forced_keys([tuple(int(x) for x in k) for k in keys])  # type: ignore[misc]
        if not table.num_rows:
            return
        self._writable().withdraw_forced_sources(table, when, self._segment_forced, logged)

    def _update_sources(
        self,
        changes: pa.Table,
        kind: str,
        when: float,
        *,
        object_deltas: bool,
        remove_empty: bool,
        increment: bool = True,
        decrement: bool = True,
        only_null: str | None = None,
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
            increment=increment,
            decrement=decrement,
            only_null=only_null,
        )

    def set_validity_end(self, object_ids: Iterable[int], time: Any, *, missing_ok: bool = False) -> int:
        """Close the validity of these DiaObjects' current versions at ``time``; they are no
        longer returned by ``get_objects``. Returns how many versions were closed. Ids never
        stored raise ``LookupError`` (nothing changes), or are skipped with ``missing_ok``."""
        ids = np.fromiter((int(i) for i in object_ids), dtype=np.int64)
        if not len(ids):
            return 0
        count: int = self._writable().set_validity_end(ids, mjd_tai(time), missing_ok)
        return count

    def log_updates(self, kind: str, payloads: list[dict[str, Any]], time: Any) -> int:
        """Record update records made elsewhere (JSON-serialisable dicts) in the change log, as
        one daytime chunk of ``kind`` at ``time``; they are read back by :meth:`read_chunks`.
        Returns the chunk id."""
        if not kind or kind in NATIVE_UPDATE_KINDS:
            raise ConfigError(f"log_updates: kind {kind!r} is empty or one of diadb's own")
        text = [json.dumps(p) for p in payloads]  # refuse what cannot be recorded, before writing
        del text
        chunk: int = self._writable().log_updates(kind, list(payloads), mjd_tai(time))
        return chunk

    # ---- user metadata -------------------------------------------------------------
    def user_metadata(self) -> dict[str, str]:
        """The key/value metadata kept for users (diadb's and the engines' own keys left out)."""
        meta = self._backend.read_metadata()
        return {k: v for k, v in sorted(meta.items()) if not k.startswith(RESERVED_PREFIXES)}

    def set_user_metadata(self, values: Mapping[str, str | None]) -> None:
        """Set (or, with ``None``, delete) user metadata, in one transaction. Keys that start
        with ``diadb.``, ``felis.``, ``postgres.``, ``cassandra.`` or ``sqlite.`` are diadb's own:
        ``ConfigError``."""
        reserved = sorted(k for k in values if str(k).startswith(RESERVED_PREFIXES))
        if reserved:
            raise ConfigError(f"metadata keys {reserved} are diadb's own and cannot be changed")
        if any(not isinstance(k, str) or not k for k in values):
            raise ConfigError("metadata keys must be non-empty strings")
        bad = sorted(k for k, v in values.items() if v is not None and not isinstance(v, str))
        if bad:
            raise ConfigError(f"metadata values must be strings or None: {bad}")
        put = {k: v for k, v in values.items() if v is not None}
        gone = [k for k, v in values.items() if v is None]
        if put or gone:
            self._writable().set_metadata(put, gone)

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
        return chunks.select(CHUNK_SCHEMA.names).cast(CHUNK_SCHEMA)

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
                typed = self._with_segment_chunk_rows(name, typed, chunks, raw.get("members"))
            out[name] = typed
        return out

    def mark_published(self, chunk_ids: Iterable[int]) -> None:
        """Record that these chunks reached the PPDB."""
        self._writable().mark_published([int(i) for i in chunk_ids])

    # ---- history segments ----------------------------------------------------------
    def _segment_sources(self, ids: npt.NDArray[np.int64]) -> pa.Table:
        """Current stored values of DiaSources found in the history segments (newest first)."""
        keys = ["diaSourceId", "_healpix_29", "ra", "dec", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS]
        if self._tier is None or not len(ids):
            spec = self.schema.table("DiaSource").arrow_schema()
            return spec.empty_table().select(keys)
        assert isinstance(self._backend, HistoryCapable)
        segments = sorted(self._backend.list_segments("DiaSource"), key=lambda s: -s.t_max)
        return self._tier.find_rows(segments, "diaSourceId", ids, keys)

    def _segment_forced(self, keys: pa.Table) -> pa.Table:
        """Current stored values of DiaForcedSources (``keys``: diaObjectId, visit, detector)
        found in the history segments, newest segment first; one search per segment."""
        if self._tier is None or not keys.num_rows:
            return empty_forced()
        assert isinstance(self._backend, HistoryCapable)
        segments = sorted(self._backend.list_segments("DiaForcedSource"), key=lambda s: -s.t_max)
        parts: list[pa.Table] = []
        rest = keys
        for info in segments:
            if not rest.num_rows:
                break
            ids = np.asarray(rest.column("diaObjectId").to_numpy(), dtype=np.int64)
            rows = normalise_forced(self._tier.find_rows([info], "diaObjectId", ids, list(FORCED_CURRENT)))
            rows = rows.join(rest, keys=list(FORCED_KEY), join_type="left semi")
            if rows.num_rows:
                parts.append(rows)
                rest = missing_keys(rest, rows)
        if not parts:
            return empty_forced()
        return pa.concat_tables(parts)

    def _with_segment_chunk_rows(
        self, table: str, engine_rows: pa.Table, chunks: pa.Table, members: pa.Table | None
    ) -> pa.Table:
        """Add the rows of store chunks that compaction moved into segments: a keyed store's by
        the primary keys it recorded, any other store's by its visit/detector."""
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
            mine = _members_of(members, chunk["chunk_id"], table)
            for part in found:
                if mine is not None:
                    pk = list(self.schema.table(table).primary_key)
                    keys = pa.table(
                        {c: mine.column(f"k{i}").cast(part.schema.field(c).type) for i, c in enumerate(pk)}
                    )
                    rows = part.join(keys, keys=pk, join_type="left semi")
                else:
                    mask = pc.equal(part.column("visit"), chunk["visit"])
                    if chunk["detector"] != -1:
                        mask = pc.and_(mask, pc.equal(part.column("detector"), chunk["detector"]))
                    rows = part.filter(mask)
                if rows.num_rows:
                    ids = pa.array(np.full(rows.num_rows, chunk["chunk_id"], dtype=np.int64))
                    parts.append(rows.add_column(0, "_chunk_id", ids).cast(engine_rows.schema))
        return pa.concat_tables(parts)
