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

This module is the public API and nothing else: one method per call, each with its numpydoc
docstring, shaping the request and delegating (reads to :mod:`diadb.history.reader`, store
checks to :mod:`diadb.ingest`, daytime calls to :mod:`diadb.daytime`, the change log to
:mod:`diadb.changelog`, compaction to :mod:`diadb.history.compaction`, bulk loads to
:mod:`diadb.bulk`). The docstrings are why it is over 500 lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import pyarrow as pa

from diadb.backends import Backend, Location, ReadTable, VisitBatch, locate, open_backend
from diadb.backends.base import Repairable, RepairReport, TimePartition, TimePartitioned
from diadb.bulk import BulkLoader
from diadb.changelog import ChangeLog
from diadb.config import LAYOUT_VERSION, PIXELIZATION, ApdbConfig
from diadb.daytime import Daytime
from diadb.errors import ConfigError, DuplicateVisitError, SchemaVersionError, StorageError
from diadb.evolution import upgrade, version_tuple
from diadb.history.compaction import Compactor
from diadb.history.manifest import FaultHook, HistoryEngine
from diadb.history.reader import Reader, ReadRequest, empty_ranges
from diadb.history.segment import SegmentInfo
from diadb.history.tier import HISTORY_TABLES, HistoryTier
from diadb.ingest import (
    check_history_keys,
    check_objects,
    diagnose_key_conflicts,
    with_healpix,
)
from diadb.metrics import argument_rows, report_rows, timed, timed_pieces
from diadb.schema import domain
from diadb.schema.felis import load_schema, schema_from_yaml
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema, TableSpec
from diadb.schema.validate import to_arrow, validate_catalog
from diadb.sky.regions import Region, as_region
from diadb.times import DAYS_PER_MONTH, TimeWindow, mjd_tai


class Apdb:
    """An Alert Production Database. Make one with :meth:`create`, reopen it with :meth:`open`.

    Use it as a context manager, or call :meth:`close`. One ``Apdb`` serves one thread at a
    time; open one per thread or process (the engines serialise writers themselves)."""

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
        history: HistoryEngine | None = None
        if config.history_tier:
            if not isinstance(backend, HistoryEngine):
                raise ConfigError(
                    f"the backend of {url} does not support the history tier (history_tier=True)"
                )
            history = backend
            tiles = config.history_tile_order
            self._tier = HistoryTier(
                backend.segment_store(),
                config.history_span_days,
                None if tiles is None or tiles < 0 else tiles,
                span_offset=config.history_span_offset_days,
            )
        self._history = history
        self._reader = Reader(backend, schema, self._tier, history)
        self._daytime = Daytime(backend, schema, self._writable, self._tier, history)
        self._changelog = ChangeLog(backend, schema, self._writable, self._tier, history)
        self._compactor = (
            Compactor(history, self._tier, schema, config) if history is not None and self._tier else None
        )
        self._bulk = BulkLoader(
            backend, schema, config, self._writable, self._tier, history, self._compactor, self.store
        )

    # ---- life cycle ----------------------------------------------------------------
    @classmethod
    def create(cls, url: str | Path, schema: str | Path | ApdbSchema | None = None, **config: Any) -> Apdb:
        """Make a new, empty APDB.

        Parameters
        ----------
        url
            A SQLite path or URL, ``postgresql://...`` or ``cassandra://...`` (see the README).
        schema
            A Felis YAML path or a loaded schema; default: Rubin's official ``apdb.yaml``.
        **config
            Fields of :class:`ApdbConfig`, all frozen into the database.

        Raises
        ------
        ConfigError
            A bad URL or option, or a database that already exists there.
        """
        cfg = ApdbConfig.from_kwargs(**config)
        felis = schema if isinstance(schema, ApdbSchema) else load_schema(schema)
        url = str(url)
        backend = open_backend(url, create=True)
        if cfg.history_tier is None:
            cfg = dataclasses.replace(
                cfg, history_tier=isinstance(backend, HistoryEngine) and backend.tier_by_default()
            )
        if cfg.history_tier and cfg.history_tile_order is None and isinstance(backend, HistoryEngine):
            preferred = backend.preferred_tile_order()
            cfg = dataclasses.replace(cfg, history_tile_order=-1 if preferred is None else preferred)
        metadata = {
            "diadb.layout_version": LAYOUT_VERSION,
            "diadb.pixelization": PIXELIZATION,
            "diadb.config": cfg.to_json(),
            "felis.schema_name": felis.name,
            "felis.schema_version": felis.version,
            "felis.schema_yaml": felis.yaml_text,
        }
        try:
            backend.configure(cfg)
            backend.initialize(felis, metadata)
        except BaseException:
            backend.close()
            raise
        return cls(url, backend, felis, cfg, read_only=False)

    @classmethod
    def open(cls, url: str | Path) -> Apdb:
        """Open an existing APDB; its frozen schema, config, pixelization and layout are checked.

        A database written by a newer diadb of the same major layout opens read-only.

        Raises
        ------
        SchemaVersionError
            Not a diadb database, or a layout this diadb cannot read.
        """
        url = str(url)
        backend = open_backend(url, create=False)
        try:
            meta = backend.read_metadata()
            read_only = cls._check_versions(url, meta)
            schema = schema_from_yaml(meta["felis.schema_yaml"], origin=f"{url} (frozen schema)")
            cfg = ApdbConfig.from_json(meta["diadb.config"])
            backend.attach_schema(schema)
            backend.configure(cfg)
        except BaseException:
            backend.close()
            raise
        return cls(url, backend, schema, cfg, read_only=read_only)

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
        """Migrate an older database in place (see :mod:`diadb.evolution`).

        Parameters
        ----------
        url
            The database.
        schema
            A newer Felis schema to evolve to (columns added), or None for the layout only.

        Returns
        -------
        list of str
            The steps taken.
        """
        return upgrade(str(url), schema)

    def close(self) -> None:
        """Close the engine's connections."""
        self._backend.close()

    def __enter__(self) -> Apdb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writable(self) -> None:
        if self.read_only:
            raise SchemaVersionError(f"{self.url} was written by a newer diadb; it is open read-only")

    # ---- reads ---------------------------------------------------------------------
    @overload
    def get_objects(
        self,
        region: Any,
        *,
        columns: Sequence[str] | None = None,
        as_pandas: Literal[False] = False,
        sort: bool = True,
    ) -> pa.Table: ...
    @overload
    def get_objects(
        self,
        region: Any,
        *,
        columns: Sequence[str] | None = None,
        as_pandas: Literal[True],
        sort: bool = True,
    ) -> pd.DataFrame: ...
    @timed("get_objects", table="DiaObject")
    def get_objects(
        self, region: Any, *, columns: Sequence[str] | None = None, as_pandas: bool = False, sort: bool = True
    ) -> pa.Table | pd.DataFrame:
        """The latest version of each DiaObject inside ``region``.

        Parameters
        ----------
        region
            A :class:`diadb.Circle`, :class:`diadb.Box`, :class:`diadb.Polygon`, an
            ``lsst.sphgeom`` region or text such as ``"circle 55 -30 3"``. Exact: rows of the
            pixel cover outside the region are removed.
        columns
            The columns returned, in this order (default: all, schema order, ``_healpix_29`` last).
        as_pandas
            Return a pandas DataFrame instead of an Arrow table.
        sort
            Sort the rows (the default). False skips the sort's gather of every column, about a
            third of a whole-field read at depth: rows then come in storage order (history
            segments oldest first, each in pixel order, then the engine's), which a compaction
            may change.

        Returns
        -------
        pyarrow.Table or pandas.DataFrame
            Sorted by ``_healpix_29``, then ``diaObjectId``; Felis types and metadata.
        """
        return self._read("DiaObject", as_region(region), columns, None, None, as_pandas, sort)

    @timed("get_sources", table="DiaSource")
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
        sort: bool = True,
    ) -> Any:
        """DiaSources inside ``region`` in a time window.

        Parameters
        ----------
        region
            As for :meth:`get_objects`, or None to select by ``object_ids`` alone.
        visit_time
            MJD TAI (float), ``astropy.time.Time`` or ``datetime``; the window is
            ``visit_time - 30 * months < midpointMjdTai <= visit_time``.
        object_ids
            Only sources of these DiaObjects (with a region: the intersection).
        months
            The window's length (default: the frozen ``history_months``).
        start, start_inclusive, end
            An explicit window: ``start < t`` (``<=`` with ``start_inclusive``), ``t <= end``;
            ``float("-inf")`` / ``float("inf")`` leave a side open.
        columns, as_pandas, sort
            As for :meth:`get_objects`.

        Returns
        -------
        pyarrow.Table or pandas.DataFrame
            Sorted by ``_healpix_29``, then ``midpointMjdTai``, then ``diaSourceId``.
        """
        window = self._window(visit_time, months, start, start_inclusive, end)
        return self._read_history("DiaSource", region, window, object_ids, columns, as_pandas, sort)

    @timed("get_forced_sources", table="DiaForcedSource")
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
        sort: bool = True,
    ) -> Any:
        """DiaForcedSources inside ``region`` in a time window; parameters as :meth:`get_sources`.

        Returns
        -------
        pyarrow.Table or pandas.DataFrame
            Sorted by ``_healpix_29``, then ``midpointMjdTai``, then the primary key.
        """
        window = self._window(visit_time, months, start, start_inclusive, end)
        return self._read_history("DiaForcedSource", region, window, object_ids, columns, as_pandas, sort)

    @timed("read_pixels")
    def read_pixels(
        self, table: ReadTable, ranges: np.ndarray, *, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Every stored row of ``table`` whose ``_healpix_29`` lies in ``ranges``, whatever its
        time (for ``DiaObject``: the latest versions); for the PPDB export.

        Parameters
        ----------
        table
            ``DiaObject``, ``DiaSource`` or ``DiaForcedSource``.
        ranges
            An ``(n, 2)`` array of sorted, disjoint ``[lo, hi)`` order-29 ranges.
        columns
            As for :meth:`get_objects`.
        """
        cover = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        wanted = self._check_columns(self.schema.table(table), columns)
        if len(cover) == 0:
            return self.schema.table(table).arrow_schema().empty_table().select(wanted)
        result = self._reader.read(ReadRequest(table, None, cover, wanted))
        # A bulk scan (the PPDB export) visits each segment once per partition: keeping them
        # all mapped would grow the process's resident size with the catalogue.
        self._reader.release()
        return result

    def read_batches(
        self,
        table: ReadTable,
        region: Any,
        visit_time: Any = None,
        *,
        rows_per_batch: int = 500_000,
        object_ids: Sequence[int] | np.ndarray | None = None,
        months: int | None = None,
        start: Any = None,
        start_inclusive: bool = False,
        end: Any = None,
        columns: Sequence[str] | None = None,
    ) -> pa.RecordBatchReader:
        """:meth:`get_objects`, :meth:`get_sources` or :meth:`get_forced_sources` as a stream,
        so that a caller need not hold a whole field: the region is read a piece of its pixel
        cover at a time, each piece of about ``rows_per_batch`` rows (sized from the density of
        the last), in the order of the whole read. Each piece is one consistent read; a store
        or daytime change made while the stream is consumed may show in later pieces only.
        Arguments as those methods (``visit_time`` and the window: sources only)."""
        if rows_per_batch < 1:
            raise ConfigError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        spec = self.schema.table(table)
        wanted = self._check_columns(spec, columns)
        window = None
        if table != "DiaObject":
            if visit_time is None and end is None:
                raise ConfigError(f"{table}: give visit_time or end")
            window = self._window(visit_time, months, start, start_inclusive, end)
        if region is None and object_ids is None:
            raise ConfigError(f"{table}: give a region, object_ids, or both")
        reg = None if region is None else as_region(region)
        ids = None if object_ids is None else np.asarray(object_ids, dtype=np.int64)
        ranges, inner = self._cover(reg)
        schema = spec.arrow_schema().empty_table().select(wanted).schema
        if (ids is not None and len(ids) == 0) or (reg is not None and len(ranges) == 0):
            return pa.RecordBatchReader.from_batches(schema, iter(()))
        pieces = timed_pieces(
            "read_batches",
            table,
            self._reader.stream(
                ReadRequest(table, reg, ranges, wanted, window, ids, inner=inner), rows_per_batch
            ),
        )
        batches = (b for piece in pieces for b in piece.cast(schema).to_batches(rows_per_batch))
        return pa.RecordBatchReader.from_batches(schema, batches)

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
        sort: bool = True,
    ) -> Any:
        if region is None and object_ids is None:
            raise ConfigError(f"{table}: give a region, object_ids, or both")
        ids = None if object_ids is None else np.asarray(object_ids, dtype=np.int64)
        reg = None if region is None else as_region(region)
        return self._read(table, reg, columns, window, ids, as_pandas, sort)

    def _read(
        self,
        table: ReadTable,
        region: Region | None,
        columns: Sequence[str] | None,
        window: TimeWindow | None,
        object_ids: np.ndarray | None,
        as_pandas: bool,
        sort: bool = True,
    ) -> Any:
        """Shape the request (columns, cover) and hand it to the reader."""
        spec = self.schema.table(table)
        wanted = self._check_columns(spec, columns)
        ranges, inner = self._cover(region)
        if (object_ids is not None and len(object_ids) == 0) or (region is not None and len(ranges) == 0):
            data = spec.arrow_schema().empty_table().select(wanted)
        else:
            request = ReadRequest(table, region, ranges, wanted, window, object_ids, inner=inner, sort=sort)
            data = self._reader.read(request)
        return data.to_pandas() if as_pandas else data

    def _cover(self, region: Region | None) -> tuple[np.ndarray, np.ndarray | None]:
        """A region's pixel cover and its inner part (no spatial restriction without one)."""
        if region is None:
            return empty_ranges(), None
        refinement = self.config.region_refinement
        return region.pixel_ranges(refinement), region.inner_ranges(refinement)

    @staticmethod
    def _check_columns(spec: TableSpec, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return [*spec.column_names, HEALPIX_COLUMN]
        unknown = [c for c in columns if c not in spec and c != HEALPIX_COLUMN]
        if unknown:
            raise ConfigError(f"{spec.name}: unknown column(s) {unknown}")
        return list(dict.fromkeys(columns))

    # ---- writes --------------------------------------------------------------------
    @timed("store", rows=argument_rows("objects", "sources", "forced_sources"))
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
        """Validate and store one visit (or one detector of it) in one transaction.

        Parameters
        ----------
        visit_time
            The visit's time (MJD TAI, ``astropy.time.Time`` or ``datetime``);
            ``validityStartMjdTai`` of objects defaults to it.
        objects, sources, forced_sources
            Arrow tables or pandas DataFrames of DiaObject, DiaSource, DiaForcedSource rows.
        visit, detector
            The visit, and the detector (None: the whole visit).
        key
            Idempotency by this text instead of by visit/detector: a key already stored writes
            nothing; stores of one visit/detector under other keys append, and each one's
            change-log chunk lists its rows by primary key.

        Returns
        -------
        bool
            True when written; False when this visit/detector (or key) was already stored (nothing
            is written then). Exactly what happened to the visit: an automatic compaction after
            the commit never changes it (its trouble is logged and retried later).

        Raises
        ------
        CatalogError
            A catalog does not fit the schema (nothing is written).
        DuplicateVisitError
            Already stored, when created with ``on_duplicate_visit="error"``.
        """
        self._writable()
        mjd = domain.check_visit_time(mjd_tai(visit_time))
        visit_id, det = domain.visit_detector(visit, detector, self.schema, keyed=key is not None)
        obj_spec = self.schema.table("DiaObject")
        obj_in = to_arrow("DiaObject", objects)
        objs = validate_catalog(
            obj_spec, obj_in, defaults={"validityStartMjdTai": pa.array(np.full(obj_in.num_rows, mjd))}
        )
        check_objects(objs)
        srcs = self._validate_optional("DiaSource", sources)
        forced = self._validate_optional("DiaForcedSource", forced_sources)
        catalogs = {"DiaSource": srcs, "DiaForcedSource": forced}
        domain.check_rows_belong(catalogs, visit_id, det, keyed=key is not None)
        domain.check_object_references(objs, catalogs, self._backend.known_object_ids)
        batch = VisitBatch(
            visit=visit_id,
            detector=det,
            visit_mjd_tai=mjd,
            objects=with_healpix(objs),
            sources=with_healpix(srcs),
            forced_sources=with_healpix(forced),
            key=None if key is None else str(key),
        )
        if self._tier is not None and self._history is not None:
            check_history_keys(self._tier, self._history, self.schema, batch)
        try:
            stored = self._backend.store_visit(batch)
        except StorageError:
            diagnose_key_conflicts(self._backend, self.schema, batch)
            raise
        if not stored and self.config.on_duplicate_visit == "error":
            what = (
                f"key {key!r}" if key is not None else "the whole visit" if det == -1 else f"detector {det}"
            )
            raise DuplicateVisitError(f"visit {visit_id} {what} is already stored in {self.url}")
        if stored and self._compactor is not None and self.config.history_auto_compact:
            # The store's own copies of its catalogs are not needed by the compaction: let them go
            # before it reads a span's rows and rewrites the DiaObject snapshot.
            del batch, objs, srcs, forced, obj_in
            self._compactor.after_store(mjd)
        return stored

    def load_history(
        self, visits: Any, objects: Any, sources: Any = None, forced_sources: Any = None
    ) -> dict[str, int]:
        """Load many whole visits at once: what storing them one by one, in time order, with
        automatic compaction, would leave (see :mod:`diadb.bulk`), in one engine transaction.

        Parameters
        ----------
        visits
            An Arrow table, DataFrame or mapping with ``visit`` (ids) and ``visit_time`` (MJD TAI),
            one row per visit, times strictly increasing and after the newest stored visit.
        objects
            Every DiaObject version the visits write; ``validityStartMjdTai`` is its visit's time
            (at most one version of an object per visit), ``validityEndMjdTai`` null (versions
            are closed here, each at the next one's start).
        sources, forced_sources
            The visits' DiaSources and DiaForcedSources (their ``visit`` among ``visits``).

        Returns
        -------
        dict
            Rows loaded per table, ``visits``, and ``segments`` written.

        Raises
        ------
        CatalogError, ConfigError
            Bad catalogs or visits (nothing is written). ``DuplicateVisitError``: a visit is
            already stored (nothing is written).
        """
        return self._bulk.load(visits, objects, sources, forced_sources)

    def _validate_optional(self, table: str, data: Any) -> pa.Table:
        spec = self.schema.table(table)
        if data is None:
            return spec.arrow_schema(with_healpix=False).empty_table()
        return validate_catalog(spec, data)

    # ---- history tier --------------------------------------------------------------
    @timed("compact")
    def compact(self, *, boundary: float | None = None, fault: FaultHook | None = None) -> list[SegmentInfo]:
        """Move source rows older than ``boundary`` into history segments and refresh the
        DiaObject snapshot. Safe while other processes read and write.

        Parameters
        ----------
        boundary
            MJD TAI; default: the newest span edge at least ``history_compact_lag_days`` before
            the newest stored visit.
        fault
            Tests only: called with each step's name, to crash there.

        Returns
        -------
        list of SegmentInfo
            The segments written.

        Raises
        ------
        ConfigError
            The tier is off. ``SchemaVersionError``: the database is open read-only.
        """
        if self._compactor is None:
            raise ConfigError(f"{self.url} has no history tier (history_tier is off)")
        self._writable()
        if boundary is None:
            latest = self._backend.latest_visit_mjd()
            if latest is None:
                return []
            boundary = self._compactor.boundary(latest)
        return self._compactor.run(boundary, fault)

    @property
    def tier(self) -> HistoryTier | None:
        """The history tier, or None when it is off."""
        return self._tier

    @property
    def compaction_error(self) -> BaseException | None:
        """Why the last automatic compaction failed (None when it did not); it is retried after
        the next store, or by :meth:`compact`."""
        return None if self._compactor is None else self._compactor.last_error

    def segments(self) -> list[SegmentInfo]:
        """The live history segments (empty when the tier is off)."""
        return [] if self._history is None else self._history.list_segments()

    @timed("verify")
    def verify(self) -> list[str]:
        """Check the engine's own files where it can (SQLite: ``PRAGMA integrity_check``) and
        every history segment against its manifest entry (size, structure, every block checksum).

        Returns
        -------
        list of str
            One line per problem, naming the file; empty when all is well.
        """
        check_engine = getattr(self._backend, "check_integrity", None)
        problems: list[str] = list(check_engine()) if callable(check_engine) else []
        if self._tier is None:
            return problems
        return problems + self._tier.verify(self.segments())

    @timed("repair")
    def repair(self, *, min_age_s: float = 600.0) -> RepairReport:
        """Settle the operations that did not finish and were recorded at least ``min_age_s``
        ago (an operation still running is left alone).

        On Cassandra, where a store or a daytime call is many writes, a daytime call that
        failed and was never retried is applied again from its recorded plan (complete then);
        a store that had registered is marked finished; a store that never registered is hidden
        from reads and reported, to be stored again (only its input can complete it). On
        SQLite and PostgreSQL each operation is one transaction: there is nothing to repair.
        """
        if not min_age_s >= 0:
            raise ConfigError(f"min_age_s must be >= 0, got {min_age_s}")
        if not isinstance(self._backend, Repairable):
            return RepairReport()
        self._writable()
        return self._backend.repair(float(min_age_s))

    @timed("prune", rows=report_rows)
    def prune(self, now: Any = None, *, dry_run: bool = False) -> dict[str, dict[str, int]]:
        """Drop source history older than ``history_months`` plus ``retention_grace_days``.

        Parameters
        ----------
        now
            The time retention counts from (default: the newest stored visit).
        dry_run
            Only count what would go.

        Returns
        -------
        dict
            Per table, the ``rows`` and ``segments`` that went (or would go).
        """
        if not dry_run:
            self._writable()
        latest = self._backend.latest_visit_mjd() if now is None else mjd_tai(now)
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
            if self._history is not None:
                self._history.drop_overlay_before(cutoff)
                if old:
                    self._history.drop_segments([s.segment_id for s in old])
            for table in HISTORY_TABLES:
                self._backend.delete_before(table, cutoff)
        return report

    # ---- daytime -------------------------------------------------------------------
    @timed("reassign_to_ssobjects", table="DiaSource", rows=argument_rows("mapping"))
    def reassign_to_ssobjects(self, mapping: Mapping[int, int], *, time: Any = None) -> None:
        """Move DiaSources to solar-system objects, atomically.

        Parameters
        ----------
        mapping
            ``{diaSourceId: ssObjectId}``. Each source leaves its DiaObject, whose
            ``nDiaSources`` drops; a DiaObject left with no sources is closed.
        time
            When (default: now); recorded as ``ssObjectReassocTimeMjdTai`` and in the change log.

        Raises
        ------
        UnknownIdError
            Unknown ``diaSourceId`` (named; nothing changes).
        """
        self._daytime.reassign_to_ssobjects(mapping, time)

    @timed("reassign_sources", table="DiaSource", rows=argument_rows("mapping"))
    def reassign_sources(
        self,
        mapping: Mapping[int, int],
        *,
        time: Any = None,
        increment: bool = True,
        decrement: bool = True,
    ) -> None:
        """Move DiaSources to other DiaObjects (deduplication), atomically.

        Parameters
        ----------
        mapping
            ``{diaSourceId: diaObjectId}``.
        time
            When (default: now).
        increment, decrement
            Whether ``nDiaSources`` of the new object grows and of the old one drops; the change
            log records each object's new count.

        Raises
        ------
        UnknownIdError
            Unknown source or target object ids (named; nothing changes).
        """
        self._daytime.reassign_sources(mapping, time, increment, decrement)

    @timed("withdraw_sources", table="DiaSource", rows=argument_rows("source_ids"))
    def withdraw_sources(
        self, source_ids: Iterable[int], *, time: Any = None, update_time: Any = None
    ) -> None:
        """Mark DiaSources withdrawn; one already withdrawn keeps its first time.

        Parameters
        ----------
        source_ids
            ``diaSourceId`` values.
        time
            ``timeWithdrawnMjdTai`` (default: now).
        update_time
            The time the change log records (default: ``time``).

        Raises
        ------
        UnknownIdError
            Unknown ids (named; nothing changes).
        """
        self._daytime.withdraw_sources(source_ids, time, update_time)

    @timed("withdraw_forced_sources", table="DiaForcedSource", rows=argument_rows("keys"))
    def withdraw_forced_sources(
        self, keys: Iterable[tuple[int, int, int]], *, time: Any = None, update_time: Any = None
    ) -> None:
        """Mark DiaForcedSources withdrawn; parameters as :meth:`withdraw_sources`.

        Parameters
        ----------
        keys
            ``(diaObjectId, visit, detector)`` tuples.

        Raises
        ------
        UnknownIdError
            Unknown keys (named; nothing changes).
        """
        self._daytime.withdraw_forced_sources(keys, time, update_time)

    @timed("set_validity_end", table="DiaObject")
    def set_validity_end(self, object_ids: Iterable[int], time: Any, *, missing_ok: bool = False) -> int:
        """Close the open version of these DiaObjects at ``time``; they leave :meth:`get_objects`.

        Parameters
        ----------
        object_ids
            ``diaObjectId`` values.
        time
            The versions' ``validityEndMjdTai``.
        missing_ok
            Skip ids never stored instead of raising.

        Returns
        -------
        int
            How many versions were closed (0: no chunk is logged).

        Raises
        ------
        UnknownIdError
            Ids never stored, unless ``missing_ok`` (nothing changes).
        """
        return self._daytime.set_validity_end(object_ids, time, missing_ok)

    @timed("get_objects_for_dedup", table="DiaObject")
    def get_objects_for_dedup(self, since: Any, *, columns: Sequence[str] | None = None) -> pa.Table:
        """Latest DiaObject versions that started at or after ``since`` (the last deduplication).

        Parameters
        ----------
        since
            A time.
        columns
            The columns returned (default: all).
        """
        return self._daytime.objects_for_dedup(since, columns)

    @timed("count_unassociated_objects", table="DiaObject")
    def count_unassociated_objects(self) -> int:
        """How many current DiaObjects have exactly one DiaSource."""
        return self._daytime.count_unassociated_objects()

    # ---- the change log ------------------------------------------------------------
    @timed("replica_chunks")
    def replica_chunks(self, *, published: bool | None = None) -> pa.Table:
        """The change log's chunks in commit order.

        Parameters
        ----------
        published
            Only published (True) or unpublished (False) chunks; default: all.

        Returns
        -------
        pyarrow.Table
            ``chunk_id``, ``kind`` (``store`` or ``update``), ``visit``, ``detector``,
            ``visit_mjd_tai``, ``stored_at``, ``published``.
        """
        return self._changelog.replica_chunks(published)

    @timed("read_chunks")
    def read_chunks(self, chunk_ids: Iterable[int]) -> dict[str, pa.Table]:
        """What these chunks wrote, wherever the rows live now (engine or history segments).

        Returns
        -------
        dict of str to pyarrow.Table
            ``DiaObject`` (versions), ``DiaSource``, ``DiaForcedSource`` (each with
            ``_chunk_id`` first, schema types) and ``updates`` (daytime records, JSON text).
        """
        return self._changelog.read_chunks(chunk_ids)

    @timed("mark_published", rows=argument_rows("chunk_ids"))
    def mark_published(self, chunk_ids: Iterable[int]) -> None:
        """Record that these chunks reached the PPDB."""
        self._changelog.mark_published(chunk_ids)

    @timed("delete_chunks")
    def delete_chunks(
        self, chunk_ids: Iterable[int] | None = None, *, before: Any = None, dry_run: bool = False
    ) -> pa.Table:
        """Forget published change-log chunks (after the PPDB has them), as the reference's
        ``ApdbReplica.deleteReplicaChunks`` does.

        The chunk records go, with their update records and lists of object versions; the
        stored rows are APDB data and stay, and so do the keys that catch a keyed store made
        twice. All in one transaction on SQLite and PostgreSQL. An incremental PPDB export
        that had not applied a deleted chunk is then refused (make a full export).

        Parameters
        ----------
        chunk_ids
            The chunks to delete (all must exist and be published).
        before
            Instead of ids: every chunk whose visit (or daytime) time is before this (MJD TAI,
            ``datetime`` or ``astropy.time.Time``); all of them must be published.
        dry_run
            Only say what would be deleted.

        Returns
        -------
        pyarrow.Table
            The chunks deleted (or that would be), as :meth:`replica_chunks` lists them. Never
            the newest chunk (it marks how far the ids have gone, so none is handed out
            twice), nor on Cassandra a chunk whose operation is still pending (its retry
            looks for it).

        Raises
        ------
        ConfigError
            Neither or both of ``chunk_ids`` and ``before``; an id not in the change log; a
            chosen chunk not published (the message names them, and nothing is deleted).
        """
        return self._changelog.delete_chunks(chunk_ids, before, dry_run=dry_run, where=self.url)

    def deleted_chunks_through(self) -> int | None:
        """The newest chunk id :meth:`delete_chunks` ever deleted (None: none was)."""
        return self._changelog.deleted_through()

    @timed("log_updates", rows=argument_rows("payloads"))
    def log_updates(self, kind: str, payloads: list[dict[str, Any]], time: Any) -> int:
        """Record update records made elsewhere as one daytime chunk.

        Parameters
        ----------
        kind
            The records' kind; not empty and not one of diadb's own.
        payloads
            JSON-serialisable dicts, read back by :meth:`read_chunks`.
        time
            The chunk's time.

        Returns
        -------
        int
            The chunk id.
        """
        return self._changelog.log_updates(kind, payloads, time)

    # ---- metadata and bookkeeping --------------------------------------------------
    def user_metadata(self) -> dict[str, str]:
        """The key/value metadata kept for users (diadb's and the engines' own keys left out)."""
        return self._changelog.user_metadata()

    def set_user_metadata(self, values: Mapping[str, str | None]) -> None:
        """Set (or, with ``None``, delete) user metadata, in one transaction.

        Raises
        ------
        ConfigError
            A key starting with ``diadb.``, ``felis.``, ``postgres.``, ``cassandra.`` or
            ``sqlite.`` (diadb's own), an empty key or a value that is not a string.
        """
        self._changelog.set_user_metadata(values)

    def latest_visit_mjd(self) -> float | None:
        """The visit time (MJD TAI) of the newest stored visit, or None when nothing is stored."""
        return self._backend.latest_visit_mjd()

    @timed("contains_visit_detector")
    def contains_visit_detector(self, visit: int, detector: int | None = None) -> bool:
        """Whether this visit/detector (``None``: any part of the visit) was stored.

        Raises
        ------
        ConfigError
            ``visit`` or ``detector`` is not an integer of its range (``1.5`` is not visit 1).
        """
        visit_id, det = domain.visit_detector(visit, detector, self.schema, keyed=True)
        return self._backend.contains_visit_detector(visit_id, det)

    def stats(self) -> dict[str, dict[str, int]]:
        """Rows and bytes of each stored table (with its indexes), and of the history segments."""
        result = {k: {"rows": v.rows, "bytes": v.bytes} for k, v in self._backend.table_stats().items()}
        for info in self.segments():
            entry = result.setdefault(f"{info.table} (history)", {"rows": 0, "bytes": 0, "segments": 0})
            entry["rows"] += info.rows
            entry["bytes"] += info.bytes
            entry["segments"] += 1
        return result

    def counters(self) -> dict[str, int]:
        """The engine's event counters since this APDB was opened (e.g. ``retries``)."""
        return self._backend.counters()

    def location(self) -> Location:
        """Where this database lives: its files, or the server, database and namespace it is
        connected to (never a password)."""
        return locate(self.url)

    def frozen_metadata(self) -> dict[str, str]:
        """diadb's own metadata frozen at creation (layout version, pixelization, config, schema
        name and version; the schema's YAML text left out)."""
        meta = self._backend.read_metadata()
        return {
            k: v for k, v in meta.items() if k.startswith(("diadb.", "felis.")) and k != "felis.schema_yaml"
        }

    def compaction_backlog(self) -> dict[str, Any] | None:
        """What a compaction run now would move: the boundary it would use and, per source
        table, the engine rows older than it. None when the history tier is off.

        Returns
        -------
        dict or None
            ``boundary_mjd`` (None when nothing is stored) and ``rows`` ``{table: count}``.
        """
        if self._compactor is None:
            return None
        latest = self._backend.latest_visit_mjd()
        if latest is None:
            return {"boundary_mjd": None, "rows": dict.fromkeys(HISTORY_TABLES, 0)}
        boundary = self._compactor.boundary(latest)
        rows = {t: self._backend.count_before(t, boundary) for t in HISTORY_TABLES}
        return {"boundary_mjd": boundary, "rows": rows}

    # ---- time partitions (PostgreSQL, Cassandra) -----------------------------------
    def time_partitions(self) -> list[TimePartition]:
        """The source tables' time partitions, by table then start.

        Raises
        ------
        ConfigError
            The engine has no time partitions (SQLite).
        """
        return self._partitioned().time_partitions()

    def create_time_partitions(self, start: Any, end: Any) -> list[str]:
        """Make the partitions that cover ``[start, end)`` and do not exist yet; their names."""
        self._writable()
        return self._partitioned().create_time_partitions(mjd_tai(start), mjd_tai(end))

    def drop_time_partitions(self, before: Any) -> list[str]:
        """Drop the partitions (and their rows) that end at or before ``before``; their names."""
        self._writable()
        return self._partitioned().drop_time_partitions(mjd_tai(before))

    def _partitioned(self) -> TimePartitioned:
        if not isinstance(self._backend, TimePartitioned):
            raise ConfigError(f"{self.url}: this engine has no time-partition tables")
        return self._backend


def _bound(value: Any) -> float:
    """A window bound: a time, or +-inf for an open side."""
    if isinstance(value, (int, float, np.floating)) and not np.isfinite(value):
        return float(value)
    return mjd_tai(value)
