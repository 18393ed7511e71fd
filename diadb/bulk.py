"""Bulk loading of many visits at once (``Apdb.load_history``), engine-neutral.

A bulk load leaves what storing its visits one by one, in time order, with automatic
compaction, would leave: the same rows in every table, the same object versions (each closed
at the next one's start), the same visit registry and one change-log chunk per visit. Only
how the history tier groups rows into segment files may differ (a closed span loaded in one
batch is one segment per table; a span spread over two batches, two).

Everything is columnar: catalogs are validated once for the whole batch, versions are chained
with one sort, rows of closed spans (older than the compaction boundary after the batch) go
straight into history segments in the engine's transaction, and the rest into the engine.
Then the ordinary compaction runs, moving engine rows of spans that this batch closed and
refreshing the DiaObject snapshot. Engines without a bulk path store the visits one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Backend, BulkLoading, HistoryBatch
from diadb.config import ApdbConfig
from diadb.errors import CatalogError, ConfigError
from diadb.history.compaction import Compactor
from diadb.history.manifest import HistoryEngine
from diadb.history.segment import SegmentInfo
from diadb.history.tier import HISTORY_TABLES, TIME_COLUMN, HistoryTier, compaction_boundary
from diadb.ingest import with_healpix
from diadb.schema import domain
from diadb.schema.model import ApdbSchema
from diadb.schema.validate import to_arrow, validate_catalog
from diadb.times import mjd_tai

Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def version_chains(objects: pa.Table) -> tuple[pa.Table, Int64Array, BoolArray, BoolArray]:
    """``objects`` (versions of DiaObjects) sorted by (``diaObjectId``,
    ``validityStartMjdTai``), each version's ``validityEndMjdTai`` set to the next version's
    start (null for the last); the sort's order (positions in ``objects``); and masks of the
    sorted rows: the latest version of each object, and its first."""
    ids = np.asarray(objects.column("diaObjectId").to_numpy(), dtype=np.int64)
    start = np.asarray(objects.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
    order = np.lexsort((start, ids))
    ids, start = ids[order], start[order]
    same_next = np.zeros(len(ids), dtype=bool)
    same_next[:-1] = ids[1:] == ids[:-1]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ~same_next[:-1]
    end_values = np.zeros(len(ids), dtype=np.float64)
    end_values[:-1] = start[1:]
    sorted_objects = objects.take(pa.array(order))
    position = sorted_objects.schema.get_field_index("validityEndMjdTai")
    field = sorted_objects.schema.field(position)
    ends = pa.array(end_values, type=field.type, mask=~same_next)
    return sorted_objects.set_column(position, field, ends), order, ~same_next, first


def _in_key_order(data: pa.Table, table: str, schema: ApdbSchema) -> pa.Table:
    """``data`` sorted as the engines cluster ``table``: by ``_healpix_29``, then time (sources),
    then the primary key (for DiaObject: the latest-object table's key)."""
    if data.num_rows < 2:
        return data
    keys = ["_healpix_29"] + ([TIME_COLUMN] if table in HISTORY_TABLES else [])
    keys += [k for k in schema.table(table).primary_key if k not in keys and k != "validityStartMjdTai"]
    return data.take(pc.sort_indices(data, [(k, "ascending") for k in keys]))


def _visits_table(visits: Any) -> tuple[Int64Array, npt.NDArray[np.float64]]:
    """The ``visit`` ids and ``visit_time`` (MJD TAI) of the batch's visits, checked."""
    if isinstance(visits, pa.Table):
        columns = {name: visits.column(name).to_numpy() for name in visits.column_names}
    elif hasattr(visits, "to_dict") and hasattr(visits, "columns"):  # pandas
        columns = {str(c): np.asarray(visits[c]) for c in visits.columns}
    else:
        columns = {str(k): np.asarray(v) for k, v in dict(visits).items()}
    missing = [c for c in ("visit", "visit_time") if c not in columns]
    if missing:
        raise ConfigError(
            f"load_history: visits need the columns 'visit' and 'visit_time'; missing {missing}"
        )
    ids = np.asarray(columns["visit"])
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"load_history: visit ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    times = np.asarray([mjd_tai(t) for t in columns["visit_time"]], dtype=np.float64)
    if not len(ids):
        raise ConfigError("load_history: no visits given")
    for t in (float(times.min()), float(times.max())):
        domain.check_visit_time(t)
    if (ids < 0).any():
        raise ConfigError(f"load_history: visit ids must be >= 0, got {ids[ids < 0][:5].tolist()}")
    if len(np.unique(ids)) != len(ids):
        raise ConfigError("load_history: a visit appears twice in the batch")
    if (np.diff(times) <= 0).any():
        raise ConfigError("load_history: visit times must increase strictly, in the order given")
    return ids, times


class BulkLoader:
    """``Apdb.load_history``: see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        schema: ApdbSchema,
        config: ApdbConfig,
        writable: Callable[[], None],
        tier: HistoryTier | None,
        history: HistoryEngine | None,
        compactor: Compactor | None,
        store: Callable[..., bool],
    ) -> None:
        self._backend = backend
        self._schema = schema
        self._config = config
        self._writable = writable
        self._tier = tier
        self._history = history
        self._compactor = compactor
        #: ``Apdb.store``, for engines without a bulk path.
        self._store = store

    def load(self, visits: Any, objects: Any, sources: Any, forced_sources: Any) -> dict[str, int]:
        self._writable()
        visit_ids, times = _visits_table(visits)
        latest = self._backend.latest_visit_mjd()
        if latest is not None and times[0] <= latest:
            raise ConfigError(
                f"load_history: the batch starts at MJD {times[0]}, not after the newest stored visit "
                f"({latest}); a bulk load appends newer visits"
            )
        objs = validate_catalog(self._schema.table("DiaObject"), to_arrow("DiaObject", objects))
        catalogs = {
            name: validate_catalog(self._schema.table(name), to_arrow(name, data))
            if data is not None
            else self._schema.table(name).arrow_schema(with_healpix=False).empty_table()
            for name, data in (("DiaSource", sources), ("DiaForcedSource", forced_sources))
        }
        object_visit = self._check_objects(objs, times)
        for name, data in catalogs.items():
            if data.num_rows:
                pos = np.searchsorted(np.sort(visit_ids), data.column("visit").to_numpy())
                own = (
                    np.sort(visit_ids)[np.clip(pos, 0, len(visit_ids) - 1)] == data.column("visit").to_numpy()
                )
                if not own.all():
                    raise CatalogError(
                        name, "visit", "not one of the batch's visits", np.flatnonzero(~own).tolist()
                    )
        domain.check_object_references(objs, catalogs, self._backend.known_object_ids)
        if not isinstance(self._backend, BulkLoading):
            return self._one_by_one(visit_ids, times, objs, object_visit, catalogs)
        chained, order, is_latest, is_first = version_chains(with_healpix(objs))
        object_visit = object_visit[order]
        counts = {
            "n_objects": np.bincount(object_visit, minlength=len(visit_ids)),
            **{
                key: np.bincount(self._visit_rows(visit_ids, catalogs[name]), minlength=len(visit_ids))
                for key, name in (("n_sources", "DiaSource"), ("n_forced_sources", "DiaForcedSource"))
            },
        }
        boundary = float("-inf")
        if self._tier is not None and self._compactor is not None and self._config.history_auto_compact:
            c = self._config
            boundary = compaction_boundary(
                float(times[-1]), c.history_span_days, c.history_compact_lag_days, c.history_span_offset_days
            )
        schema = self._schema
        engine_rows: dict[str, pa.Table] = {}
        segment_rows: dict[str, pa.Table] = {}
        for name in HISTORY_TABLES:
            data = with_healpix(catalogs[name])
            old = np.asarray(data.column(TIME_COLUMN).to_numpy(), dtype=np.float64) < boundary
            # In the engine table's key order, so the inserts append to its B-tree in order.
            engine_rows[name] = _in_key_order(
                data.filter(pa.array(~old)) if old.any() else data, name, schema
            )
            if old.any():
                segment_rows[name] = data.filter(pa.array(old))
        self._check_segment_keys(segment_rows)
        batch = HistoryBatch(
            visits=pa.table(
                {
                    "visit": visit_ids,
                    "visit_mjd_tai": times,
                    **{k: v.astype(np.int64) for k, v in counts.items()},
                }
            ),
            objects=chained,
            object_visit=object_visit,
            first_versions=pa.table(
                {
                    "id": chained.column("diaObjectId").filter(pa.array(is_first)),
                    "start": chained.column("validityStartMjdTai").filter(pa.array(is_first)),
                }
            ),
            latest=_in_key_order(chained.filter(pa.array(is_latest)), "DiaObject", schema),
            sources=engine_rows["DiaSource"],
            forced_sources=engine_rows["DiaForcedSource"],
            segment_rows=segment_rows,
        )
        tier = self._tier
        write = None
        if tier is not None:

            def write(table: str, rows: pa.Table) -> list[SegmentInfo]:
                return tier.write(table, schema.table(table).cast(rows))

        created = self._backend.load_history(batch, write)
        result = {
            "visits": len(visit_ids),
            "DiaObject": chained.num_rows,
            "DiaSource": catalogs["DiaSource"].num_rows,
            "DiaForcedSource": catalogs["DiaForcedSource"].num_rows,
            "segments": len(created),
        }
        del batch, engine_rows, segment_rows, chained, catalogs, objs
        if self._compactor is not None and np.isfinite(boundary):
            # The ordinary compaction: engine rows of spans this batch closed, and the snapshot.
            result["segments"] += len(self._compactor.run(boundary))
        return result

    @staticmethod
    def _visit_rows(visit_ids: Int64Array, data: pa.Table) -> Int64Array:
        """Each row's position in the batch's visits (rows were checked to belong to one)."""
        order = np.argsort(visit_ids)
        pos = np.searchsorted(visit_ids[order], np.asarray(data.column("visit").to_numpy(), np.int64))
        found: Int64Array = order[pos]
        return found

    @staticmethod
    def _check_objects(objs: pa.Table, times: npt.NDArray[np.float64]) -> Int64Array:
        """Each version starts at one of the batch's visits, at most once per object and visit,
        with no end (diadb closes versions); returns each version's visit position."""
        start_col = objs.column("validityStartMjdTai")
        if start_col.null_count:
            rows = np.flatnonzero(np.asarray(start_col.is_null().to_numpy(zero_copy_only=False), bool))
            raise CatalogError(
                "DiaObject", "validityStartMjdTai", "must be the time of its visit", rows.tolist()
            )
        ends = objs.column("validityEndMjdTai")
        if ends.null_count != len(ends):
            rows = np.flatnonzero(~np.asarray(ends.is_null().to_numpy(zero_copy_only=False), dtype=bool))
            raise CatalogError(
                "DiaObject", "validityEndMjdTai", "must be null: diadb closes versions itself", rows.tolist()
            )
        start = np.asarray(start_col.to_numpy(), dtype=np.float64)
        pos = np.clip(np.searchsorted(times, start), 0, len(times) - 1)
        bad = times[pos] != start
        if bad.any():
            raise CatalogError(
                "DiaObject",
                "validityStartMjdTai",
                "is not the time of one of the batch's visits",
                np.flatnonzero(bad).tolist(),
            )
        ids = np.asarray(objs.column("diaObjectId").to_numpy(), dtype=np.int64)
        key = pa.table({"i": ids, "p": pos})
        if key.group_by(["i", "p"]).aggregate([]).num_rows != objs.num_rows:
            raise CatalogError(
                "DiaObject", "diaObjectId", "more than one version of an object in one visit", []
            )
        return pos.astype(np.int64)

    def _check_segment_keys(self, segment_rows: dict[str, pa.Table]) -> None:
        """Rows going straight into segments skip the engine's unique indexes: their keys are
        checked against the engine's rows and the segments here (engine rows are checked by
        the engine's indexes in the load's transaction)."""
        if self._tier is None or self._history is None:
            return
        for name in HISTORY_TABLES:
            pk = list(self._schema.table(name).primary_key)
            data = segment_rows.get(name)
            if data is None or not data.num_rows or not pk:
                continue
            keys = data.select(pk)
            found = self._tier.stored_keys(self._history.list_segments(name), keys)
            if not found.size:
                existing = self._backend.existing_keys(name, keys)
                if existing.num_rows:
                    existing = existing.cast(keys.schema)
                    probe = keys.append_column("_pos", pa.array(np.arange(keys.num_rows, dtype=np.int64)))
                    hit = probe.join(existing, keys=pk, join_type="left semi").column("_pos").to_numpy()
                    found = np.sort(np.asarray(hit, dtype=np.int64))
            if found.size:
                raise CatalogError(name, ", ".join(pk), "primary key already stored", found.tolist())

    def _one_by_one(
        self,
        visit_ids: Int64Array,
        times: npt.NDArray[np.float64],
        objs: pa.Table,
        object_visit: Int64Array,
        catalogs: dict[str, pa.Table],
    ) -> dict[str, int]:
        """An engine without a bulk path: the visits stored in order, one ``store`` each."""
        source_visit = {name: self._visit_rows(visit_ids, data) for name, data in catalogs.items()}
        for i, (visit, when) in enumerate(zip(visit_ids.tolist(), times.tolist(), strict=True)):
            parts = [data.filter(pa.array(source_visit[name] == i)) for name, data in catalogs.items()]
            self._store(when, objs.filter(pa.array(object_visit == i)), *parts, visit=visit)
        return {
            "visits": len(visit_ids),
            "DiaObject": objs.num_rows,
            **{name: data.num_rows for name, data in catalogs.items()},
            "segments": 0,
        }
