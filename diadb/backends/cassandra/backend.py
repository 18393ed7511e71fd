"""The distributed engine: Apache Cassandra (4.1 / 5.0) through the DataStax Python driver.

``CassandraBackend`` implements the Backend protocol (and ``TimePartitioned``) by delegating to
its parts, each made here with what it needs:

- :class:`.session.CassandraSession`: the connection, prepared statements, concurrent execution;
- :class:`.layout.Layout`: the keyspace's tables, time partitions, retention, stats, evolution;
- :class:`.store.Registry` and :class:`.store.Store`: key registries and ``store_visit``;
- :class:`.read.Reader`: ``select``, showing each store wholly or not at all
  (:class:`.visibility.Visibility`);
- :class:`.changelog.ChangeLog` and :class:`.chunk_rows.ChunkReader`: the replica chunks;
- :class:`.daytime.Daytime`: the daytime updates.

The driver is imported only when a backend is made (``diadb.backends.cassandra.url`` reads URLs
without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import (
    Int64Array,
    ReadTable,
    RepairReport,
    TableStats,
    TimePartition,
    TimeWindow,
    VisitBatch,
)
from diadb.backends.cassandra.changelog import ChangeLog
from diadb.backends.cassandra.chunk_rows import ChunkReader
from diadb.backends.cassandra.daytime import Daytime
from diadb.backends.cassandra.history import CassandraHistory
from diadb.backends.cassandra.layout import Layout
from diadb.backends.cassandra.read import Reader
from diadb.backends.cassandra.repair import repair
from diadb.backends.cassandra.session import CassandraSession
from diadb.backends.cassandra.store import Registry, Store
from diadb.backends.cassandra.url import parse_options, parse_url
from diadb.backends.cassandra.visibility import Visibility
from diadb.config import ApdbConfig
from diadb.history.manifest import (
    FaultHook,
    ObjectSnapshotWriter,
    SegmentMerger,
    SegmentSweeper,
    SegmentWriter,
)
from diadb.history.pieces import WHOLE_SKY, Piece
from diadb.history.segment import SegmentInfo
from diadb.history.store import SegmentStore
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, ColumnSpec


class CassandraBackend:
    """Cassandra through the DataStax driver. See :mod:`.layout` for the tables."""

    def __init__(self, url: str, *, create: bool, **options: Any) -> None:
        self.url = url
        parsed = parse_url(url)
        self.keyspace = parsed.keyspace
        self._opts = parse_options({**parsed.params, **options})
        self.session = CassandraSession(parsed, self._opts)
        try:
            self.layout = Layout.open(self.session, self._opts, url, create=create)
        except BaseException:
            self.session.close()
            raise
        self.session.use_consistency(self.layout.rf)
        self.registry = Registry(self.session, self.layout)
        self.log = ChangeLog(self.session, self.layout)
        self.visibility = Visibility(self.session, self.log)
        self.store = Store(self.session, self.layout, self.registry, self.log, self.visibility)
        self.reader = Reader(self.session, self.layout, self.registry, self.visibility)
        self.chunks = ChunkReader(self.session, self.layout, self.log)
        self.history = CassandraHistory(self.session, self.layout, self.reader)
        self.daytime = Daytime(self.session, self.layout, self.registry, self.log, self.history)
        # What tests and tools inspect (the frozen layout, the levels in use).
        self.rf = self.layout.rf
        self.pixel_order = self.layout.pixel_order
        self.time_partition_days = self.layout.time_partition_days
        self.id_bucket_bits = self.layout.id_bucket_bits
        self.read_consistency = self.session.read_consistency
        self.write_consistency = self.session.write_consistency

    @property
    def schema(self) -> ApdbSchema:
        return self.layout.schema

    # ---- set-up --------------------------------------------------------------------
    def initialize(self, schema: ApdbSchema, metadata: Mapping[str, str]) -> None:
        self.layout.initialize(schema, metadata, packed=self._opts.packed)
        if self.history.enabled:
            self.history.create_tables()

    def read_metadata(self) -> dict[str, str]:
        return self.layout.read_metadata()

    def attach_schema(self, schema: ApdbSchema) -> None:
        self.layout.attach(schema)

    def configure(self, config: ApdbConfig) -> None:
        """Whether the history tier is on, and its cache bound (the engine's own options are
        in the URL)."""
        self.history.configure(config)
        on = self.history.enabled
        self.store.time_check = self.history.check_store_time if on else None
        self.store.time_recheck = self.history.recheck_store_time if on else None

    def repair(self, min_age_s: float) -> RepairReport:
        return repair(self.session, self.layout, self.log, self.registry, self.store, min_age_s)

    def counters(self) -> dict[str, int]:
        """Event counters since open: none (neither the driver's retries nor the re-sends of
        ``CassandraSession.run`` are counted)."""
        return {}

    # ---- reads and stores ----------------------------------------------------------
    def select(
        self,
        table: ReadTable,
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None = None,
        object_ids: Int64Array | None = None,
    ) -> pa.Table:
        if table != "DiaObject":
            window = self.history.clip(window)  # older rows are read from segments
        return self.reader.select(table, ranges, columns, window=window, object_ids=object_ids)

    def known_object_ids(self, ids: Int64Array) -> Int64Array:
        return self.registry.known_object_ids(ids)

    def existing_keys(self, table: str, keys: pa.Table) -> pa.Table:
        return self.store.existing_keys(table, keys)

    def store_visit(self, batch: VisitBatch) -> bool:
        if self.history.enabled:
            self.history.guard.ensure()  # a keyspace made before it gets its column and table
        return self.store.store_visit(batch)

    def contains_visit_detector(self, visit: int, detector: int) -> bool:
        return self.registry.contains_visit_detector(visit, detector)

    def latest_visit_mjd(self) -> float | None:
        return self.registry.latest_visit_mjd()

    # ---- retention and time partitions ---------------------------------------------
    def count_before(self, table: str, cutoff_mjd: float) -> int:
        """Engine rows older than ``cutoff_mjd``, not counting the copies below the tier's
        boundary (those rows are in segments, and counted there) that wait to be dropped."""
        boundary = self.history.boundary()
        n = self.layout.count_before(table, cutoff_mjd)
        if math.isfinite(boundary):
            n -= self.layout.count_before(table, min(boundary, cutoff_mjd))
        return n

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        return self.layout.delete_before(table, cutoff_mjd)

    def time_partitions(self) -> list[TimePartition]:
        return self.layout.time_partitions()

    def create_time_partitions(self, start_mjd: float, end_mjd: float) -> list[str]:
        return self.layout.create_time_partitions(start_mjd, end_mjd)

    def drop_time_partitions(self, before_mjd: float) -> list[str]:
        return self.layout.drop_time_partitions(before_mjd)

    def table_stats(self) -> dict[str, TableStats]:
        return self.layout.table_stats()

    # ---- change log ----------------------------------------------------------------
    def list_chunks(self, published: bool | None = None) -> pa.Table:
        return self.log.list_chunks(published)

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        rows = self.chunks.chunk_rows(chunk_ids)
        boundary = self.history.boundary()
        if math.isfinite(boundary):
            # Source rows older than the boundary are read from segments (the facade adds them);
            # their engine copies, until dropped, are not read twice.
            for table in ("DiaSource", "DiaForcedSource"):
                data = rows.get(table)
                if data is not None and data.num_rows:
                    rows[table] = data.filter(pc.greater_equal(data.column("midpointMjdTai"), boundary))
        return rows

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        self.log.mark_published(chunk_ids)

    def delete_chunks(self, chunk_ids: Sequence[int], *, dry_run: bool = False) -> list[int]:
        return self.log.delete_chunks(chunk_ids, dry_run=dry_run)

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, object]], when_mjd: float) -> int:
        return self.log.log_updates(kind, payloads, when_mjd)

    # ---- daytime updates -----------------------------------------------------------
    def update_sources(
        self,
        changes: pa.Table,
        *,
        kind: str,
        when_mjd: float,
        segment_lookup: Callable[[Int64Array], pa.Table],
        object_deltas: bool,
        remove_empty: bool,
        increment: bool = True,
        decrement: bool = True,
        only_null: str | None = None,
    ) -> int:
        return self.daytime.update_sources(
            changes,
            kind=kind,
            when_mjd=when_mjd,
            segment_lookup=segment_lookup,
            object_deltas=object_deltas,
            remove_empty=remove_empty,
            increment=increment,
            decrement=decrement,
            only_null=only_null,
        )

    def withdraw_forced_sources(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None = None,
    ) -> int:
        return self.daytime.withdraw_forced_sources(keys, when_mjd, segment_lookup, logged_mjd)

    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        return self.daytime.set_validity_end(object_ids, when_mjd, missing_ok)

    def objects_since(self, since_mjd: float) -> pa.Table:
        """Latest versions that started at or after ``since_mjd``, each store's wholly or not
        at all (through the reader's visibility filter)."""
        cols = [*self.layout.schema.table("DiaObject").column_names, HEALPIX_COLUMN]
        found = self.reader.select(
            "DiaObject", np.zeros((0, 2), np.int64), cols, started_since=float(since_mjd)
        )
        # A hidden store's object shows its previous version, which may have started earlier.
        return found.filter(pc.greater_equal(found.column("validityStartMjdTai"), float(since_mjd)))

    def count_unassociated(self) -> int:
        return self.daytime.count_unassociated()

    # ---- schema evolution ----------------------------------------------------------
    def upgrade_layout(self, from_version: str) -> list[str]:
        return self.layout.upgrade_layout(from_version)

    def add_columns(self, table: str, columns: Sequence[ColumnSpec]) -> None:
        self.layout.add_columns(table, columns)

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        self.layout.set_metadata(values, delete)

    def drop(self) -> None:
        """Drop this APDB's keyspace (tests and tear-down)."""
        self.layout.drop()

    # ---- history tier (HistoryEngine; see .history) -------------------------------------
    def segment_store(self) -> SegmentStore:
        return self.history.segment_store()

    def tier_by_default(self) -> bool:
        """Off until the benchmark at depth shows the blobs win here (README)."""
        return False

    def preferred_tile_order(self) -> int | None:
        return self.history.preferred_tile_order()

    def read_snapshot(self) -> AbstractContextManager[None]:
        return self.history.read_snapshot()

    def list_segments(self, table: str | None = None) -> list[SegmentInfo]:
        return self.history.list_segments(table)

    def compact_history(
        self,
        tables: Sequence[str],
        boundary: float,
        write: SegmentWriter,
        sweep: SegmentSweeper,
        fault: FaultHook | None = None,
        objects: ObjectSnapshotWriter | None = None,
        wait: bool = True,
        pieces: Sequence[Piece] = WHOLE_SKY,
        object_pieces: Sequence[Piece] | None = None,
        merge: SegmentMerger | None = None,
    ) -> list[SegmentInfo]:
        return self.history.compact_history(
            tables, boundary, write, sweep, fault, objects, wait, pieces, object_pieces, merge
        )

    def select_changed_objects(
        self, ranges: Int64Array, columns: Sequence[str]
    ) -> tuple[Int64Array, pa.Table]:
        return self.history.select_changed_objects(ranges, columns)

    def drop_segments(self, segment_ids: Sequence[int]) -> None:
        self.history.drop_segments(segment_ids)

    def select_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        return self.history.select_overlay(ranges, window)

    def select_forced_overlay(self, ranges: Int64Array, window: TimeWindow | None) -> pa.Table:
        return self.history.select_forced_overlay(ranges, window)

    def contains_store_key(self, key: str) -> bool:
        return self.store.contains_store_key(key)

    def drop_overlay_before(self, cutoff_mjd: float) -> None:
        self.history.drop_overlay_before(cutoff_mjd)

    def close(self) -> None:
        self.session.close()
