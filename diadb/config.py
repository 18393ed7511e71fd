"""The configuration of an APDB, frozen into the database when it is created."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from diadb.errors import ConfigError

#: Version of diadb's own table layout; the major part must match to open a database.
LAYOUT_VERSION = "1.1.0"  # 1.1: the change log (replica chunks) and the source overlay
#: The one pixelization diadb uses everywhere.
PIXELIZATION = "healpix_nested_29"

DuplicatePolicy = Literal["ignore", "error"]


@dataclass(frozen=True)
class ApdbConfig:
    """What shapes the data. Set once by ``Apdb.create``; checked again by ``Apdb.open``."""

    #: Default length of the history window of ``get_sources`` / ``get_forced_sources``,
    #: in months of 30 days (the reference's convention).
    history_months: int = 12
    #: Refinement of the HEALPix cover of a region: its cells are ~size / 2**refinement across.
    #: Higher means fewer rows read and filtered, but more ranges in each query.
    region_refinement: int = 4
    #: What ``store`` does with a visit/detector that is already stored: ``ignore`` it
    #: (idempotent retries) or raise ``DuplicateVisitError``.
    on_duplicate_visit: DuplicatePolicy = "ignore"
    #: SQLite only: ``FULL`` makes every acknowledged store survive power loss;
    #: ``NORMAL`` survives process crashes only (WAL mode) and is faster.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    #: Keep source history in immutable, sky-sorted, memory-mapped segments (``diadb.history``).
    #: ``None``: on wherever the backend supports it (the embedded SQLite backend).
    history_tier: bool | None = None
    #: Time span of one history segment, in days: one night by default, so that each night's
    #: rows are compacted soon after it and the engine holds about one night (merges then make
    #: weeks and months of them, ``history_merge_spans``).
    history_span_days: float = 1.0
    #: Span edges lie this many days past multiples of ``history_span_days`` (MJD). 0.5: at noon
    #: UTC, where Rubin's observing day (dayObs) rolls over, so that a night in Chile is never cut
    #: in two. Databases made before this option keep 0 (their segments' edges) when opened.
    history_span_offset_days: float = 0.5
    #: A span is compacted into segments once it ended at least this many days before the
    #: newest stored visit: 0.25 compacts a night at the first store 6 h after its end (the
    #: next night's first), and a store of a visit 6 h older than the newest is still accepted
    #: where late stores are refused (Cassandra).
    history_compact_lag_days: float = 0.25
    #: Once this many consecutive spans (aligned on multiples of their total width) are compacted,
    #: a later compaction merges their segments of each table and tile into one
    #: (``diadb.history.merging``): a 12-month read then touches ~16 segments per tile, not ~52.
    #: 1: never merge. Databases made before this option get the default when opened.
    history_merge_spans: int = 4
    #: Compact automatically after a store when a span closes (else: ``Apdb.compact``).
    history_auto_compact: bool = True
    #: Segments are cut by HEALPix tiles of this order as well as by time span, so that one
    #: detector's read fetches only the few segments its region touches (what a server engine's
    #: blobs need; files are memory-mapped and gain little). ``None``: the engine's choice when
    #: the database is created; ``-1``: by time span only.
    history_tile_order: int | None = None
    #: Megabytes of fetched segment blobs a reading process keeps between reads (server
    #: engines; segment files are mapped and cost no anonymous memory, so they are not bounded).
    history_cache_mb: float = 0.0
    #: Retention keeps ``history_months`` plus this many days; older data may be pruned.
    retention_grace_days: float = 30.0

    def __post_init__(self) -> None:
        if not (1 <= self.history_months <= 120):
            raise ConfigError(f"history_months must be in [1, 120], got {self.history_months}")
        if not (0 <= self.region_refinement <= 10):
            raise ConfigError(f"region_refinement must be in [0, 10], got {self.region_refinement}")
        if self.on_duplicate_visit not in ("ignore", "error"):
            raise ConfigError(
                f"on_duplicate_visit must be 'ignore' or 'error', got {self.on_duplicate_visit!r}"
            )
        if not (0.0 < self.history_span_days <= 366.0):
            raise ConfigError(f"history_span_days must be in (0, 366], got {self.history_span_days}")
        if not (0.0 <= self.history_span_offset_days < self.history_span_days):
            raise ConfigError(
                "history_span_offset_days must be in [0, history_span_days), got "
                f"{self.history_span_offset_days}"
            )
        if self.history_compact_lag_days < 0.0 or self.retention_grace_days < 0.0:
            raise ConfigError("history_compact_lag_days and retention_grace_days must be >= 0")
        if isinstance(self.history_merge_spans, bool) or not isinstance(self.history_merge_spans, int):
            raise ConfigError(f"history_merge_spans must be an integer, got {self.history_merge_spans!r}")
        if not (1 <= self.history_merge_spans <= 64):
            raise ConfigError(f"history_merge_spans must be in [1, 64], got {self.history_merge_spans}")
        if self.history_tile_order is not None and not (-1 <= self.history_tile_order <= 12):
            raise ConfigError(
                f"history_tile_order must be in [-1, 12] or None, got {self.history_tile_order}"
            )
        if not (0.0 <= self.history_cache_mb <= 1e6):
            raise ConfigError(f"history_cache_mb must be in [0, 1e6], got {self.history_cache_mb}")
        if self.sqlite_synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(
                f"sqlite_synchronous must be 'FULL' or 'NORMAL', got {self.sqlite_synchronous!r}"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ApdbConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown config option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ApdbConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        # Databases made before span offsets existed have their span edges at multiples.
        data.setdefault("history_span_offset_days", 0.0)
        # Options added by later diadb versions are ignored by older ones only if unknown here.
        return cls(**{k: v for k, v in data.items() if k in known})
