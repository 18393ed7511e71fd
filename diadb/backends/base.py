"""The small protocol every storage engine implements.

The facade (``diadb.Apdb``) validates, computes ``_healpix_29``, filters regions exactly and
orders results; a backend only stores Arrow tables atomically and returns the rows that
fall in order-29 pixel ranges and a time window. Engine-specific code stays in its module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.config import ApdbConfig
from diadb.history.segment import SegmentInfo
from diadb.schema.model import ApdbSchema, ColumnSpec
from diadb.times import TimeWindow as TimeWindow  # re-exported: part of the protocol

#: The tables a read addresses. "DiaObject" reads the latest version of each object.
ReadTable = Literal["DiaObject", "DiaSource", "DiaForcedSource"]
Int64Array = npt.NDArray[np.int64]

#: The change log's chunk listing as the facade returns it; backends may return any column
#: types that cast to these, under these names.
CHUNK_SCHEMA = pa.schema(
    [
        pa.field("chunk_id", pa.int64()),
        pa.field("kind", pa.string()),
        pa.field("visit", pa.int64()),
        pa.field("detector", pa.int64()),
        pa.field("visit_mjd_tai", pa.float64()),
        pa.field("stored_at", pa.string()),
        pa.field("published", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class VisitBatch:
    """Everything one ``store`` call writes, already validated and carrying ``_healpix_29``."""

    visit: int
    detector: int  # -1 means "the whole visit"
    visit_mjd_tai: float
    objects: pa.Table
    sources: pa.Table
    forced_sources: pa.Table
    #: When set, the store's idempotency key (instead of visit/detector): a store of a key
    #: already stored writes nothing, and the chunk records its rows by primary key.
    key: str | None = None


@dataclass(frozen=True)
class HistoryBatch:
    """Many visits for one bulk load (``Apdb.load_history``), validated, carrying ``_healpix_29``.

    ``visits``: ``visit``, ``visit_mjd_tai``, ``n_objects``, ``n_sources``, ``n_forced_sources``
    (one row per visit, in time order). ``objects``: every DiaObject version, sorted by
    (``diaObjectId``, ``validityStartMjdTai``), each version's ``validityEndMjdTai`` already the
    next one's start (null for the latest); ``object_visit`` is each version's row in
    ``visits``. ``first_versions``: (``id``, ``start``) of each object's first version here,
    which closes its open version in the database. ``latest``: the latest version of each
    object. ``sources``/``forced_sources``: the rows the engine keeps; ``segment_rows``: rows
    of closed spans, which go straight into history segments (empty without the tier)."""

    visits: pa.Table
    objects: pa.Table
    object_visit: Int64Array
    first_versions: pa.Table
    latest: pa.Table
    sources: pa.Table
    forced_sources: pa.Table
    segment_rows: Mapping[str, pa.Table] = field(default_factory=dict)


#: Writes one table's rows as history segments and returns their manifest entries
#: (:class:`diadb.history.segment.SegmentInfo`); the bulk load records them in its transaction.
BulkSegmentWriter = Callable[[str, pa.Table], list[SegmentInfo]]


@dataclass(frozen=True)
class Location:
    """Where a database lives, as far as code outside the engine may know (never a secret).

    ``files`` are the local paths an embedded database consists of (empty for a server);
    ``hosts``/``port``/``database``/``namespace`` name a server's database (``namespace``: the
    PostgreSQL schema or the Cassandra keyspace); ``uri`` is a driver URI without diadb's own
    options, ``options`` those options."""

    scheme: str
    files: tuple[Path, ...] = ()
    hosts: tuple[str, ...] = ()
    port: int | None = None
    database: str | None = None
    namespace: str | None = None
    uri: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TimePartition:
    """One time-partition table of an engine that partitions sources by time."""

    table: str  # the logical table (DiaSource, DiaForcedSource)
    name: str  # the engine's name of the partition
    start_mjd: float  # [start, end) in MJD TAI
    end_mjd: float


@dataclass(frozen=True)
class TableStats:
    rows: int
    bytes: int


class Backend(Protocol):
    """A storage engine behind ``diadb.Apdb``."""

    def initialize(self, schema: ApdbSchema, metadata: Mapping[str, str]) -> None:
        """Create the tables of ``schema`` in an empty database and record ``metadata``."""

    def read_metadata(self) -> dict[str, str]:
        """The key/value metadata recorded by ``initialize``; empty if the database is new."""

    def attach_schema(self, schema: ApdbSchema) -> None:
        """Give an opened backend the schema read from its metadata."""

    def configure(self, config: ApdbConfig) -> None:
        """Apply the frozen config's options that concern this engine (after create and open)."""

    def select(
        self,
        table: ReadTable,
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None = None,
        object_ids: Int64Array | None = None,
    ) -> pa.Table:
        """Rows whose ``_healpix_29`` is in one of ``ranges`` (``[lo, hi)``, sorted, disjoint),
        or every row when ``ranges`` is ``None``-like empty and ``object_ids`` is given; within
        ``window`` on the table's time column; restricted to ``object_ids`` when given.
        Column types may be any that cast losslessly to the schema's."""

    def known_object_ids(self, ids: Int64Array) -> Int64Array:
        """The subset of ``ids`` that has a stored DiaObject."""

    def existing_keys(self, table: str, keys: pa.Table) -> pa.Table:
        """The rows of ``keys`` (primary-key columns of ``table``) already stored."""

    def store_visit(self, batch: VisitBatch) -> bool:
        """Write the batch in one transaction. ``False`` (nothing written) if the
        visit/detector, or its whole visit, is already stored."""

    def contains_visit_detector(self, visit: int, detector: int) -> bool: ...

    def latest_visit_mjd(self) -> float | None:
        """The visit time of the newest stored visit, or None when nothing is stored."""

    def count_before(self, table: str, cutoff_mjd: float) -> int:
        """Rows of a source table with time < ``cutoff_mjd`` (what ``delete_before`` would remove)."""

    def delete_before(self, table: str, cutoff_mjd: float) -> int:
        """Delete a source table's rows with time < ``cutoff_mjd``; return how many went."""

    def table_stats(self) -> dict[str, TableStats]: ...

    def counters(self) -> dict[str, int]:
        """Engine event counters since open (e.g. ``retries``); empty when the engine has none."""

    # ---- change log (replica chunks) -----------------------------------------------
    def list_chunks(self, published: bool | None = None) -> pa.Table:
        """Chunks in commit order: chunk_id, kind, visit, detector, visit_mjd_tai, stored_at, published."""

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        """Engine rows written by store chunks (``_chunk_id`` first) and update records."""

    def mark_published(self, chunk_ids: Sequence[int]) -> None: ...

    def delete_chunks(self, chunk_ids: Sequence[int], *, dry_run: bool = False) -> list[int]:
        """Forget these published chunks: their chunk rows, update records and object-version
        lists (never the stored rows, nor the keys that catch duplicate keyed stores), in one
        transaction where the engine has them. Chunks the engine still needs (an operation
        whose retry would look for its chunk) are kept; the ids deleted (or that would be)."""

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
        """Set mutable DiaSource columns atomically (UnknownIdError for unknown ids); return the
        chunk (0 when nothing changed). ``increment``/``decrement`` choose which side of a move
        ``nDiaSources`` follows; rows whose ``only_null`` column is already set are left alone."""

    def withdraw_forced_sources(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None = None,
    ) -> int:
        """Set ``timeWithdrawnMjdTai`` of the DiaForcedSources ``keys`` (diaObjectId, visit,
        detector) that have none, atomically (UnknownIdError for unknown keys); return the chunk
        (logged at ``logged_mjd``, default ``when_mjd``; 0 when nothing changed)."""

    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        """Close the open versions (UnknownIdError for unknown ids unless ``missing_ok``)."""

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, object]], when_mjd: float) -> int:
        """Record foreign update records as one daytime chunk; return its id."""

    def objects_since(self, since_mjd: float) -> pa.Table: ...

    def count_unassociated(self) -> int: ...

    # ---- schema evolution (diadb.evolution) -----------------------------------------
    def upgrade_layout(self, from_version: str) -> list[str]:
        """Migrate diadb's own tables from an older layout; return the steps taken."""

    def add_columns(self, table: str, columns: Sequence[ColumnSpec]) -> None:
        """Add nullable columns to a stored table."""

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        """Set ``values`` and remove the ``delete`` keys, in one transaction."""

    def close(self) -> None: ...


@runtime_checkable
class TimePartitioned(Protocol):
    """A backend whose source tables are partitioned by time (PostgreSQL, Cassandra)."""

    def time_partitions(self) -> list[TimePartition]:
        """Every partition, ordered by table then start."""

    def create_time_partitions(self, start_mjd: float, end_mjd: float) -> list[str]:
        """Make the partitions covering ``[start_mjd, end_mjd)`` that do not exist; their names."""

    def drop_time_partitions(self, before_mjd: float) -> list[str]:
        """Drop the partitions that end at or before ``before_mjd``; their names."""


@dataclass(frozen=True)
class RepairReport:
    """What ``Apdb.repair`` found of operations that did not finish (their ``op`` keys)."""

    #: Daytime calls applied again from their recorded plan: complete now.
    completed_updates: list[str] = field(default_factory=list)
    #: Stores that had registered, or taken their chunk, but not cleared their record: complete now.
    finished_stores: list[str] = field(default_factory=list)
    #: Stores that never took their chunk: every row they wrote is removed; store them again.
    removed_stores: list[str] = field(default_factory=list)
    #: Stores recorded by an older diadb that never registered: hidden from reads, their rows
    #: left in place; store them again to complete them.
    incomplete_stores: list[str] = field(default_factory=list)
    #: Records younger than the grace, left alone (perhaps still running).
    in_progress: int = 0


@runtime_checkable
class Repairable(Protocol):
    """A backend whose stores and daytime calls are not single transactions (Cassandra)."""

    def repair(self, min_age_s: float) -> RepairReport:
        """Settle the operations that did not finish, recorded at least ``min_age_s`` ago."""


@runtime_checkable
class BulkLoading(Protocol):
    """A backend that loads many visits in one transaction (``Apdb.load_history``)."""

    def load_history(self, batch: HistoryBatch, write: BulkSegmentWriter | None) -> list[SegmentInfo]:
        """Write the batch in one transaction: its visits (refused with ``DuplicateVisitError``
        if one is stored), one change-log chunk per visit, the object versions (closing the
        open ones), the latest-object table, the engine rows, and the segments ``write`` makes of
        ``segment_rows`` (their manifest entries, returned)."""
