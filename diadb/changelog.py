"""The change log (replica chunks) that feeds the PPDB, and the user metadata.

Every store and every daytime call that changes something is one chunk, numbered in commit
order by the engine. A store chunk's rows are found by its visit/detector (or, for a keyed
store, by the primary keys it recorded); once compaction has moved them into history segments
they are found there (:meth:`ChangeLog.read_chunks`). A daytime chunk holds update records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import CHUNK_SCHEMA, Backend
from diadb.errors import ConfigError
from diadb.history.columns import gather
from diadb.history.manifest import HistoryEngine
from diadb.history.reader import empty_ranges
from diadb.history.tier import HISTORY_TABLES, HistoryTier
from diadb.schema.domain import check_time
from diadb.schema.model import ApdbSchema
from diadb.times import TimeWindow, mjd_tai

#: Metadata key prefixes of diadb and its engines (not user metadata).
RESERVED_PREFIXES = ("diadb.", "felis.", "postgres.", "cassandra.", "sqlite.")
#: Metadata key: the newest chunk id ever deleted (an incremental export that had not applied
#: it would miss chunks, so it is refused).
DELETED_THROUGH_KEY = "diadb.chunks_deleted_through"
#: Ids named in an error message, at most.
_NAMED = 20
#: The kinds of update record diadb's own daytime calls write.
NATIVE_UPDATE_KINDS = (
    "reassign_to_ssobjects",
    "reassign_sources",
    "withdraw_sources",
    "withdraw_forced_sources",
    "set_validity_end",
)


class ChangeLog:
    """The change log and user metadata of one database (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        schema: ApdbSchema,
        writable: Callable[[], None],
        tier: HistoryTier | None = None,
        history: HistoryEngine | None = None,
    ) -> None:
        self._backend = backend
        self._schema = schema
        self._writable = writable
        self._tier = tier if history is not None else None
        self._history = history

    # ---- chunks ----------------------------------------------------------------------
    def replica_chunks(self, published: bool | None = None) -> pa.Table:
        chunks: pa.Table = self._backend.list_chunks(published)
        return chunks.select(CHUNK_SCHEMA.names).cast(CHUNK_SCHEMA)

    def read_chunks(self, chunk_ids: Iterable[int]) -> dict[str, pa.Table]:
        ids = np.fromiter((int(i) for i in chunk_ids), dtype=np.int64)
        raw = self._backend.chunk_rows(ids.tolist())
        out: dict[str, pa.Table] = {"updates": raw["updates"]}
        chunks = self.replica_chunks().filter(pc.is_in(pc.field("chunk_id"), pa.array(ids)))
        for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
            table = raw[name]
            cols = [c for c in table.column_names if c != "_chunk_id"]
            typed = self._schema.table(name).cast(table.select(cols))
            typed = typed.add_column(0, "_chunk_id", table.column("_chunk_id").cast(pa.int64()))
            if name in HISTORY_TABLES:
                typed = self._with_segment_rows(name, typed, chunks, raw.get("members"))
            out[name] = typed
        return out

    def mark_published(self, chunk_ids: Iterable[int]) -> None:
        self._writable()
        self._backend.mark_published([int(i) for i in chunk_ids])

    def delete_chunks(
        self, chunk_ids: Iterable[int] | None, before: Any, *, dry_run: bool, where: str
    ) -> pa.Table:
        """Delete published chunks named by id or older than ``before`` (see ``Apdb.delete_chunks``)."""
        if (chunk_ids is None) == (before is None):
            raise ConfigError("delete_chunks: give either chunk ids or before=, not both or neither")
        chunks = self.replica_chunks()
        ids = chunks.column("chunk_id")
        if chunk_ids is not None:
            wanted = np.unique(np.fromiter((int(i) for i in chunk_ids), dtype=np.int64))
            missing = np.setdiff1d(wanted, ids.to_numpy())
            if len(missing):
                raise ConfigError(f"chunks {_name(missing.tolist())} are not in the change log of {where}")
            mask = pc.is_in(ids, pa.array(wanted))
        else:
            cutoff = check_time("before", mjd_tai(before))
            mask = pc.fill_null(pc.less(chunks.column("visit_mjd_tai"), cutoff), False)
        chosen = chunks.filter(mask)
        unpublished = chosen.filter(pc.invert(chosen.column("published"))).column("chunk_id").to_pylist()
        if unpublished:
            raise ConfigError(
                f"chunks {_name(unpublished)} of {where} are not published: only chunks the PPDB "
                "export has published can be deleted (export first, or choose fewer)"
            )
        # The newest chunk stays: it holds the change log's high-water mark (SQLite would hand
        # its id out again, and an incremental export would then skip the new chunk).
        newest = int(pc.max(ids).as_py()) if len(ids) else None
        candidates = [i for i in chosen.column("chunk_id").to_pylist() if i != newest]
        if not candidates:
            return chosen.slice(0, 0)
        if not dry_run:
            self._writable()
            meta = self._backend.read_metadata()
            through = max(int(meta.get(DELETED_THROUGH_KEY, 0)), max(candidates))
            # Recorded before anything goes: a deletion cut short still refuses stale exports.
            self._backend.set_metadata({DELETED_THROUGH_KEY: str(through)}, [])
        gone = self._backend.delete_chunks(candidates, dry_run=dry_run)
        return chosen.filter(pc.is_in(chosen.column("chunk_id"), pa.array(gone, pa.int64())))

    def deleted_through(self) -> int | None:
        value = self._backend.read_metadata().get(DELETED_THROUGH_KEY)
        return None if value is None else int(value)

    def log_updates(self, kind: str, payloads: list[dict[str, Any]], time: Any) -> int:
        if not kind or kind in NATIVE_UPDATE_KINDS:
            raise ConfigError(f"log_updates: kind {kind!r} is empty or one of diadb's own")
        for payload in payloads:  # refuse what cannot be recorded, before writing
            json.dumps(payload)
        self._writable()
        return self._backend.log_updates(kind, list(payloads), check_time("time", mjd_tai(time)))

    def _with_segment_rows(
        self, table: str, engine_rows: pa.Table, chunks: pa.Table, members: pa.Table | None
    ) -> pa.Table:
        """Add the rows of store chunks that compaction moved into segments: a keyed store's by
        the primary keys it recorded, any other store's by its visit/detector."""
        stores = chunks.filter(pc.equal(chunks.column("kind"), "store"))
        if self._tier is None or self._history is None or not stores.num_rows:
            return engine_rows
        parts = [engine_rows]
        segments = self._history.list_segments(table)
        pk = list(self._schema.table(table).primary_key)
        for chunk in stores.to_pylist():
            window = TimeWindow(chunk["visit_mjd_tai"] - 1.0, chunk["visit_mjd_tai"] + 1.0)
            pieces = self._tier.candidates(
                segments,
                empty_ranges(),
                engine_rows.column_names[1:],
                window=window,
                object_ids=None,
            )
            mine = _members_of(members, chunk["chunk_id"], table)
            for part in gather(pieces):
                if mine is not None:
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

    # ---- user metadata ---------------------------------------------------------------
    def user_metadata(self) -> dict[str, str]:
        meta = self._backend.read_metadata()
        return {k: v for k, v in sorted(meta.items()) if not k.startswith(RESERVED_PREFIXES)}

    def set_user_metadata(self, values: Mapping[str, str | None]) -> None:
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
            self._writable()
            self._backend.set_metadata(put, gone)


def _members_of(members: pa.Table | None, chunk_id: int, table: str) -> pa.Table | None:
    """The membership rows of one keyed store chunk for ``table`` (None: not a keyed store)."""
    if members is None or not members.num_rows:
        return None
    mine = members.filter(pc.equal(members.column("_chunk_id").cast(pa.int64()), chunk_id))
    if not mine.num_rows:
        return None
    return mine.filter(pc.equal(mine.column("table_name"), table))


def _name(ids: list[int]) -> str:
    """Chunk ids for an error message (the first few, and how many in all)."""
    shown = ", ".join(str(i) for i in ids[:_NAMED])
    return f"[{shown}{', ...' if len(ids) > _NAMED else ''}] ({len(ids)})" if len(ids) > 1 else f"[{shown}]"
