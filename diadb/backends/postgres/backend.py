"""``PostgresBackend``: the composition root of the PostgreSQL engine.

It parses the URL, opens the :class:`~diadb.backends.postgres.connection.Connection` and
hands it, with what else each part needs, to the parts that do the work: the layout (tables,
partitions, maintenance), the store, the reader, the change log and the daytime updates. Each
protocol method is one delegation; the only state kept here is the attached schema.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import pyarrow as pa

from diadb.backends.base import Int64Array, ReadTable, TableStats, TimePartition, TimeWindow, VisitBatch
from diadb.backends.common.packing import RowPacker
from diadb.backends.postgres.changelog import ChangeLog
from diadb.backends.postgres.connection import Connection
from diadb.backends.postgres.daytime import Daytime
from diadb.backends.postgres.history import PostgresHistory, history_ddl
from diadb.backends.postgres.layout import DEFAULT_PARTITION_DAYS, Layout
from diadb.backends.postgres.read import Reader
from diadb.backends.postgres.store import Store
from diadb.backends.postgres.url import parse
from diadb.config import ApdbConfig
from diadb.errors import ConfigError, StorageError
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
from diadb.schema.model import ApdbSchema, ColumnSpec


class PostgresBackend:
    """PostgreSQL (>= 15) through ADBC's libpq driver; see the package docstring."""

    def __init__(
        self,
        url: str,
        *,
        create: bool,
        schema: str | None = None,
        partition_days: float | None = None,
        pool_size: int | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        parsed = parse(
            url,
            schema=schema,
            partition_days=partition_days,
            pool_size=pool_size,
            retry_seconds=retry_seconds,
        )
        self.namespace = parsed.schema
        self._where = parsed.where
        self._schema: ApdbSchema | None = None
        self._pack_new = parsed.packed
        self.conn = Connection(
            parsed.uri, parsed.schema, parsed.pool_size, parsed.retry_seconds, parsed.where
        )
        # One packer for every part: the packed columns are frozen per APDB (set at create or open).
        self._packer = RowPacker(lambda: self.schema)
        self.layout = Layout(self.conn, self._packer)
        self.changelog = ChangeLog(self.conn, self._packer, lambda: self.schema)
        self.reader = Reader(self.conn, self._packer)
        self.writer = Store(self.conn, self.layout, self._packer, self.changelog, lambda: self.schema)
        self.daytime = Daytime(self.conn, self.changelog, self._packer)
        self.history = PostgresHistory(self.conn, self.reader, self._packer, lambda: self.schema)
        exists = self.conn.exists()
        if create and exists:
            self.close()
            raise ConfigError(
                f"{self._where} already exists (an APDB is in that schema); use Apdb.open to use it"
            )
        if not create and not exists:
            self.close()
            raise ConfigError(f"no APDB at {self._where}; use Apdb.create to make one")
        if create:
            self.layout.partition_days = parsed.partition_days or DEFAULT_PARTITION_DAYS
        else:
            self.layout.open(self.read_metadata())

    # ---- state kept here ------------------------------------------------------------
    @property
    def schema(self) -> ApdbSchema:
        if self._schema is None:
            raise StorageError("backend used before its schema was attached")
        return self._schema

    @property
    def partition_days(self) -> float:
        """Days per time partition (frozen at create)."""
        return self.layout.partition_days

    @property
    def retry_seconds(self) -> float:
        return self.conn.retry_seconds

    @property
    def retries(self) -> int:
        """Transactions run again after a transient failure (read by the simulator's metrics)."""
        return self.conn.retries

    def _fetch(self, sql: str, values: Sequence[Any] = ()) -> pa.Table:
        """One read-only statement's rows (kept for the tests that look at the stored tables)."""
        return self.conn.fetch(sql, values)

    # ---- set-up ----------------------------------------------------------------------
    def initialize(self, schema: ApdbSchema, metadata: Mapping[str, str]) -> None:
        self._schema = schema
        self.layout.initialize(schema, metadata, self._pack_new, history_ddl(self.conn))

    def read_metadata(self) -> dict[str, str]:
        return self.layout.read_metadata()

    def attach_schema(self, schema: ApdbSchema) -> None:
        self._schema = schema

    def configure(self, config: ApdbConfig) -> None:
        """The history tier's cache bound (the engine's own options are in the URL)."""
        self.history.configure(config)

    def counters(self) -> dict[str, int]:
        """Event counters since open."""
        return {"retries": self.conn.retries}

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        self.layout.set_metadata(values, delete)

    def upgrade_layout(self, from_version: str) -> list[str]:
        return self.layout.upgrade_layout(from_version)

    def add_columns(self, table: str, columns: Sequence[ColumnSpec]) -> None:
        self.layout.add_columns(table, columns)

    # ---- time partitions (TimePartitioned) and maintenance -----------------------------
    def time_partitions(self) -> list[TimePartition]:
        return self.layout.time_partitions()

    def create_time_partitions(self, start_mjd: float, end_mjd: float) -> list[str]:
        return self.layout.create_time_partitions(start_mjd, end_mjd)

    def drop_time_partitions(self, before_mjd: float) -> list[str]:
        return self.layout.drop_time_partitions(before_mjd)

    def count_before(self, table: str, cutoff_mjd: float) -> int:
        return self.reader.count_before(table, cutoff_mjd)

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        return self.layout.delete_before(table, cutoff_mjd)

    def cluster(self) -> None:
        self.layout.cluster()

    def grant_read_only(self, role: str) -> None:
        self.layout.grant_read_only(role)

    def table_stats(self) -> dict[str, TableStats]:
        return self.layout.table_stats()

    # ---- writes and reads ----------------------------------------------------------------
    def store_visit(self, batch: VisitBatch) -> bool:
        return self.writer.store_visit(batch)

    def select(
        self,
        table: ReadTable,
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None = None,
        object_ids: Int64Array | None = None,
    ) -> pa.Table:
        return self.reader.select(table, ranges, columns, window=window, object_ids=object_ids)

    def select_sql(
        self,
        table: ReadTable,
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None = None,
        object_ids: Int64Array | None = None,
    ) -> tuple[str, dict[str, str]]:
        """The statement a :meth:`select` runs and the settings it reads (to EXPLAIN it)."""
        return self.reader.select_sql(table, ranges, columns, window=window, object_ids=object_ids)

    def existing_keys(self, table: str, keys: pa.Table) -> pa.Table:
        return self.reader.existing_keys(table, keys)

    def known_object_ids(self, ids: Int64Array) -> Int64Array:
        return self.reader.known_object_ids(ids)

    def contains_visit_detector(self, visit: int, detector: int) -> bool:
        return self.reader.contains_visit_detector(visit, detector)

    def latest_visit_mjd(self) -> float | None:
        return self.reader.latest_visit_mjd()

    # ---- change log --------------------------------------------------------------------
    def list_chunks(self, published: bool | None = None) -> pa.Table:
        return self.changelog.list_chunks(published)

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        return self.changelog.chunk_rows(chunk_ids)

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        self.changelog.mark_published(chunk_ids)

    def delete_chunks(self, chunk_ids: Sequence[int], *, dry_run: bool = False) -> list[int]:
        return self.changelog.delete_chunks(chunk_ids, dry_run=dry_run)

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, object]], when_mjd: float) -> int:
        return self.changelog.log_updates(kind, payloads, when_mjd)

    # ---- daytime updates -----------------------------------------------------------------
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
        return self.daytime.objects_since(since_mjd)

    def count_unassociated(self) -> int:
        return self.daytime.count_unassociated()

    # ---- history tier (HistoryEngine) ----------------------------------------------------
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
        return self.history.contains_store_key(key)

    def drop_overlay_before(self, cutoff_mjd: float) -> None:
        self.history.drop_overlay_before(cutoff_mjd)

    def close(self) -> None:
        self.conn.close()
