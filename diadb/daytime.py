"""Daytime operations: what happens to stored rows between nights.

The solar-system pipeline moves DiaSources from DiaObjects to SSObjects, deduplication moves
them between DiaObjects, and objects' validity intervals get closed. Each call is one atomic
engine transaction and one chunk of the change log that feeds the PPDB (no chunk when nothing
changed). The new values are computed by :mod:`diadb.updates`, the same for every engine;
sources already in history segments are found here (the engine cannot see inside segments)
and changed through an overlay the reader applies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.backends.base import Backend
from diadb.history.manifest import HistoryEngine
from diadb.history.tier import HistoryTier
from diadb.schema.domain import check_time
from diadb.schema.model import ApdbSchema
from diadb.times import mjd_tai
from diadb.updates import (
    CURRENT_COLUMNS,
    FORCED_CURRENT,
    FORCED_KEY,
    empty_current,
    empty_forced,
    forced_keys,
    mapping_table,
    missing_keys,
    normalise_forced,
)


def now_mjd_tai() -> float:
    """The current time as MJD TAI."""
    from astropy.time import Time

    return float(Time(time.time(), format="unix").tai.mjd)


class Daytime:
    """The daytime calls of one database (see the module docstring).

    ``writable`` raises when the database is open read-only; ``tier`` and ``history`` are the
    history tier and its engine, or None when the tier is off."""

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

    # ---- DiaSources ------------------------------------------------------------------
    def reassign_to_ssobjects(self, mapping: Mapping[int, int], time: Any = None) -> None:
        when = now_mjd_tai() if time is None else check_time("time", mjd_tai(time))
        changes = mapping_table(mapping, "diaSourceId", "ssObjectId")
        n = changes.num_rows
        changes = changes.append_column("diaObjectId", pa.nulls(n, pa.int64()))
        changes = changes.append_column("ssObjectReassocTimeMjdTai", pa.array(np.full(n, when)))
        self._update_sources(changes, "reassign_to_ssobjects", when, object_deltas=True, remove_empty=True)

    def reassign_sources(
        self, mapping: Mapping[int, int], time: Any = None, increment: bool = True, decrement: bool = True
    ) -> None:
        when = now_mjd_tai() if time is None else check_time("time", mjd_tai(time))
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

    def withdraw_sources(self, source_ids: Iterable[int], time: Any = None, update_time: Any = None) -> None:
        when = now_mjd_tai() if time is None else check_time("time", mjd_tai(time))
        logged = when if update_time is None else check_time("update_time", mjd_tai(update_time))
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
        self._writable()
        if not changes.num_rows:
            return
        self._backend.update_sources(
            changes,
            kind=kind,
            when_mjd=when,
            segment_lookup=self.sources_in_segments,
            object_deltas=object_deltas,
            remove_empty=remove_empty,
            increment=increment,
            decrement=decrement,
            only_null=only_null,
        )

    # ---- DiaForcedSources and DiaObjects -----------------------------------------------
    def withdraw_forced_sources(
        self, keys: Iterable[tuple[int, int, int]], time: Any = None, update_time: Any = None
    ) -> None:
        when = now_mjd_tai() if time is None else check_time("time", mjd_tai(time))
        logged = when if update_time is None else check_time("update_time", mjd_tai(update_time))
        table = forced_keys([(int(a), int(b), int(c)) for a, b, c in keys])
        self._writable()
        if table.num_rows:
            self._backend.withdraw_forced_sources(table, when, self.forced_in_segments, logged)

    def set_validity_end(self, object_ids: Iterable[int], time: Any, missing_ok: bool = False) -> int:
        ids = np.fromiter((int(i) for i in object_ids), dtype=np.int64)
        self._writable()
        if not len(ids):
            return 0
        return self._backend.set_validity_end(ids, check_time("time", mjd_tai(time)), missing_ok)

    def objects_for_dedup(self, since: Any, columns: Sequence[str] | None = None) -> pa.Table:
        data = self._schema.table("DiaObject").cast(self._backend.objects_since(mjd_tai(since)))
        return data.select(list(columns)) if columns is not None else data

    def count_unassociated_objects(self) -> int:
        return self._backend.count_unassociated()

    # ---- rows in history segments (the engine's lookups) -----------------------------
    def sources_in_segments(self, ids: npt.NDArray[np.int64]) -> pa.Table:
        """Stored values (:data:`~diadb.updates.CURRENT_COLUMNS`) of DiaSources found in the
        history segments, newest segment first."""
        if self._tier is None or self._history is None or not len(ids):
            return empty_current()
        segments = sorted(self._history.list_segments("DiaSource"), key=lambda s: -s.t_max)
        return self._tier.find_rows(segments, "diaSourceId", ids, list(CURRENT_COLUMNS))

    def forced_in_segments(self, keys: pa.Table) -> pa.Table:
        """Stored values of DiaForcedSources (``keys``: diaObjectId, visit, detector) found in the
        history segments, newest segment first; one search per segment."""
        if self._tier is None or self._history is None or not keys.num_rows:
            return empty_forced()
        segments = sorted(self._history.list_segments("DiaForcedSource"), key=lambda s: -s.t_max)
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
        return pa.concat_tables(parts) if parts else empty_forced()
