"""``diadb.Apdb``: the API the Alert Production pipeline calls for each visit.

Reads
    ``get_objects(region)`` returns the latest version of every DiaObject whose position is
    inside ``region`` (exactly: rows of the pixel cover that fall outside are removed).
    ``get_sources`` / ``get_forced_sources(region, visit_time, months=12)`` return the rows
    with ``visit_time - 30 * months < midpointMjdTai <= visit_time`` (MJD TAI): the start is
    exclusive, as in the reference implementation; the end is inclusive, so a visit re-read
    after a retried store sees its own rows. An explicit window overrides it: ``start=t``
    gives ``t < midpointMjdTai`` (``t <= midpointMjdTai`` with ``start_inclusive=True``) and
    ``end=u`` gives ``midpointMjdTai <= u``; ``start=-inf`` or ``end=inf`` leaves that side
    open (the lsst.dax.apdb facade reads ``start`` to ``inf``). All results are Arrow tables
    (``as_pandas=True`` for pandas) with the schema's columns in schema order plus
    ``_healpix_29`` last, or the ``columns`` asked for in the order given, sorted by
    ``_healpix_29``, then time, then key.

Writes
    ``store(visit_time, objects, sources, forced_sources, visit=, detector=)`` validates every
    catalog against the Felis schema, then writes all of it in one transaction. The
    visit/detector pair is recorded; storing it again is a no-op returning ``False`` (or a
    ``DuplicateVisitError`` when created with ``on_duplicate_visit="error"``). With
    ``key="..."`` the store is idempotent by that text instead: stores of one visit/detector
    under different keys all append, and each one's change-log chunk lists its rows by
    primary key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends import Backend, ReadTable, TimeWindow, VisitBatch, open_backend
from diadb.backends.base import FaultHook, HistoryCapable
from diadb.backends.sqlite.forced import apply_forced_overlay
from diadb.config import LAYOUT_VERSION, PIXELIZATION, ApdbConfig
from diadb.daytime import DaytimeMixin
from diadb.errors import CatalogError, ConfigError, DuplicateVisitError, SchemaVersionError, StorageError
from diadb.evolution import upgrade, version_tuple
from diadb.history.segment import SegmentInfo
from diadb.history.tier import HISTORY_TABLES, OBJECT_TABLE, HistoryTier, compaction_boundary, take_rows
from diadb.schema import domain
from diadb.schema.felis import load_schema, schema_from_yaml
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, TableSpec
from diadb.schema.validate import to_arrow, validate_catalog
from diadb.sky.healpix import radec_to_healpix29
from diadb.sky.regions import Region, as_region
from diadb.times import DAYS_PER_MONTH, mjd_tai

_TIME_COLUMN = {"DiaSource": "midpointMjdTai", "DiaForcedSource": "midpointMjdTai"}


class Apdb(DaytimeMixin):
    """An Alert Production Database. Make one with :meth:`create`, reopen it with :meth:`open`."""

    def __init__(
        self, url: str, backend: Backend, schema: ApdbSchema, config: ApdbConfig, *, read_only: bool
    ) -> None:
        self.url = url
        self._backend = backend
        self.schema = schema
        self.config = config
        self.read_only = read_only
        self._tier: HistoryTier | None = None
        # The backend as a history engine, checked once: a runtime Protocol check costs ~ms.
        self._history: HistoryCapable | None = None
        self._compacted_to = -np.inf
        if config.history_tier:
            if not isinstance(backend, HistoryCapable):
                raise ConfigError(
                    f"the backend of {url} does not support the history tier (history_tier=True)"
                )
            self._history = backend
            self._tier = HistoryTier(backend.history_directory(), config.history_span_days)

    # ---- life cycle ----------------------------------------------------------------
    @classmethod
    def create(cls, url: str | Path, schema: str | Path | ApdbSchema | None = None, **config: Any) -> Apdb:
        """Make a new, empty APDB at ``url`` (a SQLite path or URL).

        ``schema`` is a Felis YAML path (default: Rubin's official ``apdb.yaml``); ``config``
        takes the fields of :class:`ApdbConfig`, all frozen into the database.
        """
        cfg = ApdbConfig.from_kwargs(**config)
        felis = schema if isinstance(schema, ApdbSchema) else load_schema(schema)
        url = str(url)
        backend = open_backend(url, create=True, options=cls._backend_options(url, cfg))
        if cfg.history_tier is None:
            cfg = dataclasses.replace(cfg, history_tier=isinstance(backend, HistoryCapable))
        metadata = {
            "diadb.layout_version": LAYOUT_VERSION,
            "diadb.pixelization": PIXELIZATION,
            "diadb.config": cfg.to_json(),
            "felis.schema_name": felis.name,
            "felis.schema_version": felis.version,
            "felis.schema_yaml": felis.yaml_text,
        }
        try:
            backend.initialize(felis, metadata)
        except BaseException:
            backend.close()
            raise
        return cls(url, backend, felis, cfg, read_only=False)

    @classmethod
    def open(cls, url: str | Path) -> Apdb:
        """Open an existing APDB; its frozen schema and config are checked and used."""
        url = str(url)
        backend = open_backend(url, create=False)
        try:
            meta = backend.read_metadata()
            read_only = cls._check_versions(url, meta)
            schema = schema_from_yaml(meta["felis.schema_yaml"], origin=f"{url} (frozen schema)")
            cfg = ApdbConfig.from_json(meta["diadb.config"])
        except BaseException:
            backend.close()
            raise
        backend.attach_schema(schema)
        return cls(url, backend, schema, cfg, read_only=read_only)

    @staticmethod
    def _backend_options(url: str, cfg: ApdbConfig) -> dict[str, Any]:
        from diadb.backends import scheme_of

        return {"synchronous": cfg.sqlite_synchronous} if scheme_of(url) == "sqlite" else {}

    @staticmethod
    def _check_versions(url: str, meta: dict[str, str]) -> bool:
        """Refuse an incompatible layout; return True when the database must be opened read-only."""
        if "diadb.layout_version" not in meta:
            raise SchemaVersionError(f"{url} is not a diadb APDB (no diadb metadata)")
        if meta.get("diadb.pixelization") != PIXELIZATION:
            raise SchemaVersionError(
                f"{url} uses pixelization {meta.get('diadb.pixelization')!r}, not {PIXELIZATION}"
            )
        have = version_tuple(meta["diadb.layout_version"])
        mine = version_tuple(LAYOUT_VERSION)
        if have[0] != mine[0]:
            raise SchemaVersionError(
                f"{url} has diadb layout {meta['diadb.layout_version']}; this diadb reads layout {mine[0]}.x "
                "(run 'diadb upgrade' with a diadb that knows both)"
            )
        if have[1] < mine[1]:
            raise SchemaVersionError(
                f"{url} has diadb layout {meta['diadb.layout_version']}, older than {LAYOUT_VERSION}: "
                f"run 'diadb upgrade {url}' first"
            )
        return have[1] > mine[1]

    @staticmethod
    def upgrade(url: str | Path, schema: str | Path | None = None) -> list[str]:
        """Migrate an older database in place (layout and, with ``schema``, the Felis schema);
        see :mod:`diadb.evolution`. Returns the steps taken."""
        return upgrade(str(url), schema)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Apdb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reads ---------------------------------------------------------------------
    @overload
    def get_objects(
        self, region: Any, *, columns: Sequence[str] | None = None, as_pandas: Literal[False] = False
    ) -> pa.Table: ...
    @overload
    def get_objects(
        self, region: Any, *, columns: Sequence[str] | None = None, as_pandas: Literal[True]
    ) -> pd.DataFrame: ...
    def get_objects(
        self, region: Any, *, columns: Sequence[str] | None = None, as_pandas: bool = False
    ) -> pa.Table | pd.DataFrame:
        """The latest version of each DiaObject inside ``region``."""
        return self._read("DiaObject", as_region(region), columns, None, None, as_pandas)

    def get_sources(
        self,
        region: Any,
        visit_time: Any,
        *,
        object_ids: Sequence[int] | np.ndarray | None = None,
        months: int | None = None,
        start: Any = None,
        start_inclusive: bool = False,
        end: Any = None,
        columns: Sequence[str] | None = None,
        as_pandas: bool = False,
    ) -> Any:
        """DiaSources inside ``region`` (or of ``object_ids`` when ``region`` is None) in the
        history window before ``visit_time``, or in the ``start``/``end`` window given (see the
        module docstring for the exact bounds)."""
        window = self._window(visit_time, months, start, start_inclusive, end)
        return self._read_history("DiaSource", region, window, object_ids, columns, as_pandas)

    def get_forced_sources(
        self,
        region: Any,
        visit_time: Any,
        *,
        object_ids: Sequence[int] | np.ndarray | None = None,
        months: int | None = None,
        start: Any = None,
        start_inclusive: bool = False,
        end: Any = None,
        columns: Sequence[str] | None = None,
        as_pandas: bool = False,
    ) -> Any:
        """DiaForcedSources, as :meth:`get_sources`."""
        window = self._window(visit_time, months, start, start_inclusive, end)
        return self._read_history("DiaForcedSource", region, window, object_ids, columns, as_pandas)

    def _window(
        self, visit_time: Any, months: int | None, start: Any, inclusive: bool, end: Any
    ) -> TimeWindow:
        """The time window of a source read (bounds: see the module docstring)."""
        months = self.config.history_months if months is None else int(months)
        if months < 0:
            raise ConfigError(f"months must be >= 0, got {months}")
        hi = mjd_tai(visit_time) if end is None else _bound(end)
        lo = hi - DAYS_PER_MONTH * months if start is None else _bound(start)
        if inclusive and np.isfinite(lo):
            lo = float(np.nextafter(lo, -np.inf))
        return TimeWindow(lo, hi)

    def _read_history(
        self,
        table: ReadTable,
        region: Any,
        window: TimeWindow,
        object_ids: Any,
        columns: Sequence[str] | None,
        as_pandas: bool,
    ) -> Any:
        if region is None and object_ids is None:
            raise ConfigError(f"{table}: give a region, object_ids, or both")
        ids = None if object_ids is None else np.asarray(object_ids, dtype=np.int64)
        reg = None if region is None else as_region(region)
        return self._read(table, reg, columns, window, ids, as_pandas)

    def _read(
        self,
        table: ReadTable,
        region: Region | None,
        columns: Sequence[str] | None,
        window: TimeWindow | None,
        object_ids: np.ndarray | None,
        as_pandas: bool,
    ) -> Any:
        spec = self.schema.table(table)
        wanted = self._check_columns(spec, columns)
        order = (
            [HEALPIX_COLUMN]
            + ([_TIME_COLUMN[table]] if table in _TIME_COLUMN else [])
            + list(spec.primary_key)
        )
        extra = ["diaObjectId"] if object_ids is not None else []
        needed = list(dict.fromkeys([*wanted, "ra", "dec", *order, *extra]))
        if object_ids is not None and len(object_ids) == 0:
            return self._finish(spec.arrow_schema().empty_table().select(wanted), as_pandas)
        ranges = (
            region.pixel_ranges(self.config.region_refinement)
            if region is not None
            else np.zeros((0, 2), np.int64)
        )
        if region is not None and len(ranges) == 0:
            return self._finish(spec.arrow_schema().empty_table().select(wanted), as_pandas)
        segments: list[SegmentInfo] = []
        overlay: pa.Table | None = None
        forced_overlay: pa.Table | None = None
        changed: np.ndarray | None = None
        if self._history is not None and (table in HISTORY_TABLES or table == OBJECT_TABLE):
            history = self._history
            # The manifest, the overlays and the engine rows are read in one snapshot: a
            # concurrent compaction or daytime update is seen wholly or not at all.
            with history.read_snapshot():
                segments = history.list_segments(table)
                if table == "DiaSource":
                    overlay = history.select_overlay(ranges, window)
                elif table == "DiaForcedSource" and segments:
                    forced_overlay = history.select_forced_overlay(ranges, window)
                if table == OBJECT_TABLE and segments:
                    # Objects: the snapshot's rows of unchanged ids, the engine's of the rest.
                    changed, raw = history.select_changed_objects(ranges, needed)
                else:
                    raw = self._backend.select(table, ranges, needed, window=window, object_ids=object_ids)
        else:
            raw = self._backend.select(table, ranges, needed, window=window, object_ids=object_ids)
        data = self._cast_to_schema(spec, raw, needed)
        if region is not None and data.num_rows:
            inside = region.contains(data.column("ra").to_numpy(), data.column("dec").to_numpy())
            if not inside.all():
                data = data.filter(pa.array(inside))
        if self._tier is not None and (table in HISTORY_TABLES or table == OBJECT_TABLE):
            self._tier.forget(table, segments)
            if segments:
                data = self._with_segments(
                    table, data, segments, ranges, needed, order, region, window, object_ids,
                    overlay, forced_overlay, changed,
                )  # fmt: skip
                return self._finish(data.select(wanted), as_pandas)
        if data.num_rows > 1:
            data = data.take(pc.sort_indices(data, sort_keys=[(c, "ascending") for c in order]))
        return self._finish(data.select(wanted), as_pandas)

    def _with_segments(
        self,
        table: ReadTable,
        data: pa.Table,
        segments: Sequence[SegmentInfo],
        ranges: np.ndarray,
        needed: Sequence[str],
        order: Sequence[str],
        region: Region | None,
        window: TimeWindow | None,
        object_ids: np.ndarray | None,
        overlay: pa.Table | None,
        forced_overlay: pa.Table | None,
        changed: np.ndarray | None,
    ) -> pa.Table:
        """The engine's rows ``data`` and the matching segment rows, as one table sorted by
        ``order``, with daytime overlays applied."""
        assert self._tier is not None
        include = None
        if overlay is not None and overlay.num_rows and object_ids is not None:
            # Rows an overlay moved to one of these objects, though stored under another.
            moved = pc.is_in(overlay.column("diaObjectId").cast(pa.int64()), pa.array(object_ids))
            include = overlay.filter(moved).column("diaSourceId").to_numpy().astype(np.int64)
        parts = self._tier.select(
            segments,
            ranges,
            needed,
            region=region,
            window=window,
            object_ids=object_ids,
            include_ids=include,
            exclude_ids=changed,
        )
        if forced_overlay is not None and forced_overlay.num_rows:
            parts = [apply_forced_overlay(p, forced_overlay) for p in parts]
        schema = data.schema
        # One concatenation and one sorted take (Arrow's take is faster here than a hand-made
        # gather of each piece into its final place; measured on a 12-month field read).
        merged = pa.concat_tables([data, *(p if p.schema == schema else p.cast(schema) for p in parts)])
        if merged.num_rows > 1:
            order_keys = [(c, "ascending") for c in order]
            merged = take_rows(merged, pc.sort_indices(merged, sort_keys=order_keys))
        if overlay is not None and overlay.num_rows:
            # Order-preserving; engine rows are never in the overlay (each row lives once).
            merged = self._apply_overlay(merged, overlay)
            if object_ids is not None:
                keep = pc.fill_null(pc.is_in(merged.column("diaObjectId"), pa.array(object_ids)), False)
                merged = merged.filter(keep)
        return merged

    @staticmethod
    def _finish(data: pa.Table, as_pandas: bool) -> Any:
        return data.to_pandas() if as_pandas else data

    @staticmethod
    def _check_columns(spec: TableSpec, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return [*spec.column_names, HEALPIX_COLUMN]
        unknown = [c for c in columns if c not in spec and c != HEALPIX_COLUMN]
        if unknown:
            raise ConfigError(f"{spec.name}: unknown column(s) {unknown}")
        return list(dict.fromkeys(columns))

    @staticmethod
    def _cast_to_schema(spec: TableSpec, raw: pa.Table, names: Sequence[str]) -> pa.Table:
        full = spec.arrow_schema()
        target = pa.schema([full.field(n) for n in names], metadata=full.metadata)
        # One cast of the whole table (per-column casts cost ~40 us each in Python, x104).
        return raw.rename_columns(list(names)).cast(target)

    # ---- writes --------------------------------------------------------------------
    def store(
        self,
        visit_time: Any,
        objects: Any,
        sources: Any = None,
        forced_sources: Any = None,
        *,
        visit: int,
        detector: int | None = None,
        key: str | None = None,
    ) -> bool:
        """Validate and store one visit (``detector=None``: the whole visit) in one transaction.

        Returns ``True`` when written, ``False`` when this visit/detector was already stored
        (nothing is written then). ``validityStartMjdTai`` of objects defaults to the visit time;
        the previous version of each updated object is closed at the new version's start.

        With ``key``, idempotency is by that text instead of by visit/detector: a key already
        stored writes nothing, and stores of one visit/detector under other keys append (the
        visit/detector is still recorded for :meth:`contains_visit_detector`). The change log
        then records the store's rows by primary key.
        """
        if self.read_only:
            raise SchemaVersionError(f"{self.url} was written by a newer diadb; it is open read-only")
        if key is not None and not getattr(self._backend, "supports_store_key", False):
            raise ConfigError(f"the backend of {self.url} does not support keyed stores (store(key=...))")
        mjd = domain.check_visit_time(mjd_tai(visit_time))
        visit_id, det = domain.visit_detector(visit, detector, self.schema, keyed=key is not None)
        obj_spec = self.schema.table("DiaObject")
        obj_in = to_arrow("DiaObject", objects)
        objs = validate_catalog(
            obj_spec, obj_in, defaults={"validityStartMjdTai": pa.array(np.full(obj_in.num_rows, mjd))}
        )
        self._check_objects(objs)
        srcs = self._validate_optional("DiaSource", sources)
        forced = self._validate_optional("DiaForcedSource", forced_sources)
        catalogs = {"DiaSource": srcs, "DiaForcedSource": forced}
        domain.check_rows_belong(catalogs, visit_id, det, keyed=key is not None)
        domain.check_object_references(objs, catalogs, self._backend.known_object_ids)
        batch = VisitBatch(
            visit=visit_id,
            detector=det,
            visit_mjd_tai=mjd,
            objects=self._with_healpix(objs),
            sources=self._with_healpix(srcs),
            forced_sources=self._with_healpix(forced),
            key=None if key is None else str(key),
        )
        try:
            stored = self._backend.store_visit(batch)
        except StorageError:
            self._diagnose_key_conflicts(batch)
            raise
        if not stored and self.config.on_duplicate_visit == "error":
            what = (
                f"key {key!r}" if key is not None else "the whole visit" if det == -1 else f"detector {det}"
            )
            raise DuplicateVisitError(f"visit {visit_id} {what} is already stored in {self.url}")
        if stored and self._tier is not None and self.config.history_auto_compact:
            boundary = compaction_boundary(
                mjd, self.config.history_span_days, self.config.history_compact_lag_days
            )
            if boundary > self._compacted_to:
                self.compact(boundary=boundary)
        return stored

    # ---- history tier --------------------------------------------------------------
    def compact(self, *, boundary: float | None = None, fault: FaultHook | None = None) -> list[SegmentInfo]:
        """Move source rows older than ``boundary`` (default: the newest closed span) into
        history segments. Safe to run while other processes read and write."""
        if self._tier is None:
            raise ConfigError(f"{self.url} has no history tier (history_tier is off)")
        assert isinstance(self._backend, HistoryCapable)
        if boundary is None:
            latest = self._latest_visit_mjd()
            if latest is None:
                return []
            boundary = compaction_boundary(
                latest, self.config.history_span_days, self.config.history_compact_lag_days
            )
        tier = self._tier

        def write(table: str, rows: pa.Table) -> list[SegmentInfo]:
            spec = self.schema.table(table)
            typed = self._cast_to_schema(spec, rows, rows.column_names)
            return tier.write(table, typed, fault)

        def write_objects(old: SegmentInfo | None, changed: np.ndarray | None, rows: pa.Table) -> SegmentInfo:
            spec = self.schema.table(OBJECT_TABLE)
            return tier.write_objects(
                old, changed, self._cast_to_schema(spec, rows, rows.column_names), fault
            )

        created = self._backend.compact_history(
            HISTORY_TABLES, boundary, write, tier.sweep, fault, objects=write_objects
        )
        self._compacted_to = max(self._compacted_to, boundary)
        return created

    @property
    def tier(self) -> HistoryTier | None:
        """The history tier, or None when it is off."""
        return self._tier

    def segments(self) -> list[SegmentInfo]:
        """The live history segments (empty when the tier is off)."""
        if self._tier is None:
            return []
        assert isinstance(self._backend, HistoryCapable)
        return self._backend.list_segments()

    def verify(self) -> list[str]:
        """Check every history segment against its manifest entry (size, structure, checksum).

        Returns one line per problem; an empty list means all is well."""
        if self._tier is None:
            return []
        return self._tier.verify(self.segments())

    def _latest_visit_mjd(self) -> float | None:
        return self._backend.latest_visit_mjd()

    def prune(self, now: Any = None, *, dry_run: bool = False) -> dict[str, dict[str, int]]:
        """Drop source history older than ``history_months`` plus ``retention_grace_days`` before
        ``now`` (default: the newest stored visit): whole history segments, and engine rows.

        Returns, per table, the rows and segments that went (or would go, with ``dry_run``)."""
        if self.read_only and not dry_run:
            raise SchemaVersionError(f"{self.url} is open read-only")
        latest = self._latest_visit_mjd() if now is None else mjd_tai(now)
        report: dict[str, dict[str, int]] = {t: {"rows": 0, "segments": 0} for t in HISTORY_TABLES}
        if latest is None:
            return report
        cutoff = latest - DAYS_PER_MONTH * self.config.history_months - self.config.retention_grace_days
        old = [s for s in self.segments() if s.table in HISTORY_TABLES and s.span_end <= cutoff]
        for info in old:
            report[info.table]["rows"] += info.rows
            report[info.table]["segments"] += 1
        for table in HISTORY_TABLES:
            report[table]["rows"] += self._backend.count_before(table, cutoff)
        if not dry_run:
            if isinstance(self._backend, HistoryCapable):
                self._backend.drop_overlay_before(cutoff)
            if old:
                assert isinstance(self._backend, HistoryCapable)
                self._backend.drop_segments([s.segment_id for s in old])
            for table in HISTORY_TABLES:
                self._backend.delete_before(table, cutoff)
        return report

    def _validate_optional(self, table: str, data: Any) -> pa.Table:
        spec = self.schema.table(table)
        if data is None:
            return spec.arrow_schema(with_healpix=False).empty_table()
        return validate_catalog(spec, data)

    @staticmethod
    def _check_objects(objs: pa.Table) -> None:
        ends = objs.column("validityEndMjdTai")
        if ends.null_count != len(ends):
            set_rows = np.flatnonzero(~np.asarray(ends.is_null().to_numpy(zero_copy_only=False), dtype=bool))
            raise CatalogError(
                "DiaObject",
                "validityEndMjdTai",
                "must be null: diadb closes versions itself",
                set_rows.tolist(),
            )
        ids = objs.column("diaObjectId").to_numpy()
        order = np.argsort(ids, kind="stable")
        dup = ids[order][1:] == ids[order][:-1]
        if dup.any():
            rows = sorted(int(order[i + 1]) for i in np.flatnonzero(dup)[:10])
            raise CatalogError(
                "DiaObject", "diaObjectId", "more than one version of an object in one store", rows
            )

    @staticmethod
    def _with_healpix(data: pa.Table) -> pa.Table:
        pix = radec_to_healpix29(data.column("ra").to_numpy(), data.column("dec").to_numpy())
        return data.append_column(pa.field(HEALPIX_COLUMN, pa.int64(), nullable=False), pa.array(pix))

    def _diagnose_key_conflicts(self, batch: VisitBatch) -> None:
        """After a failed store, name rows whose keys another visit already stored."""
        for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
            pk = list(self.schema.table(name).primary_key)
            if not data.num_rows or not pk:
                continue
            try:
                found = self._backend.existing_keys(name, data.select(pk))
            except StorageError:
                return
            if found.num_rows:
                taken = set(zip(*(found.column(c).to_pylist() for c in pk), strict=True))
                keys = zip(*(data.column(c).to_pylist() for c in pk), strict=True)
                rows = [i for i, k in enumerate(keys) if k in taken]
                raise CatalogError(name, ", ".join(pk), "primary key already stored by another visit", rows)

    # ---- bookkeeping ---------------------------------------------------------------
    def contains_visit_detector(self, visit: int, detector: int | None = None) -> bool:
        """Whether this visit/detector (``None``: any part of the visit) was stored."""
        return self._backend.contains_visit_detector(int(visit), -1 if detector is None else int(detector))

    def stats(self) -> dict[str, dict[str, int]]:
        """Rows and bytes of each stored table (with its indexes), and of the history segments."""
        result = {k: {"rows": v.rows, "bytes": v.bytes} for k, v in self._backend.table_stats().items()}
        for info in self.segments():
            entry = result.setdefault(f"{info.table} (history)", {"rows": 0, "bytes": 0, "segments": 0})
            entry["rows"] += info.rows
            entry["bytes"] += info.bytes
            entry["segments"] += 1
        return result

    # ---- PPDB publication support (issue 6: diadb.ppdb) -----------------------------
    def read_pixels(
        self, table: ReadTable, ranges: np.ndarray, *, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Every stored row of ``table`` whose ``_healpix_29`` lies in ``ranges`` (an ``(n, 2)``
        array of sorted, disjoint ``[lo, hi)`` order-29 ranges), whatever its time; for
        ``DiaObject`` the latest versions. Columns and order as the other reads."""
        cover = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        if len(cover) == 0:
            spec = self.schema.table(table)
            return spec.arrow_schema().empty_table().select(self._check_columns(spec, columns))
        result: pa.Table = self._read(table, _PixelCover(cover), columns, None, None, False)
        if self._tier is not None:
            # A bulk scan (the PPDB export) visits each segment once per partition: keeping them
            # all mapped would grow the process's resident size with the catalogue.
            self._tier.release()
        return result


def _bound(value: Any) -> float:
    """A window bound: a time, or +-inf for an open side."""
    if isinstance(value, (int, float, np.floating)) and not np.isfinite(value):
        return float(value)
    return mjd_tai(value)


class _PixelCover(Region):
    """Internal: a set of order-29 pixel ranges read as they are (for :meth:`Apdb.read_pixels`)."""

    def __init__(self, ranges: np.ndarray) -> None:
        self._ranges = ranges

    def contains(self, ra_deg: Any, dec_deg: Any) -> Any:
        # The backends return exactly the rows inside the ranges: nothing to remove.
        return np.ones(np.shape(ra_deg), dtype=bool)

    def size_deg(self) -> float:
        return 180.0

    def _cover(self, depth: int) -> np.ndarray:
        return self._ranges

    def pixel_ranges(self, refinement: int = 0) -> np.ndarray:
        return self._ranges
