"""Publish an APDB as HATS catalogs (DiaObject latest versions, DiaSource, DiaForcedSource).

A full export plans the partitions of each table from a counting pass (the ``_healpix_29`` of
every row, read one coarse sky block at a time), then reads, sorts and writes one partition at
a time, then its margin and index catalogs, then the dataset metadata (``hats`` writes
``_metadata``/``_common_metadata``, ``partition_info.csv``, the skymap and the properties).
Memory is bounded by the rows of one partition (``max_rows``) and the narrow rows of one
counting block, whatever the size of the database. (The resident size also counts the file pages
read through SQLite's memory map and the mapped history segments: page cache, reclaimable.) The
partitions and margins are independent jobs, run here or on Dask workers (``workers``,
``scheduler``; see :mod:`diadb.ppdb.parallel`).

A later export into the same directory is incremental when the APDB has a change log: only the
partitions that the new change-log chunks touch are read again and rewritten (new rows outside
every partition get new partitions), so the export then holds exactly the rows a full re-export
would hold. Partition boundaries stay as they were (a full re-export may balance them
differently).
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diadb.errors import BackendUnavailable, ConfigError
from diadb.ppdb import partition as part
from diadb.ppdb.layout import (
    INDEX_COLUMN,
    MANIFEST,
    SCHEMA_FILE,
    TABLES,
    Manifest,
    PublicationError,
    catalog_dir,
    index_dir,
    margin_dir,
)
from diadb.ppdb.parallel import Job, is_parallel, run_jobs
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.healpix import NPIX_29, ORDER
from diadb.sky.regions import Region, as_region

if TYPE_CHECKING:
    from diadb.apdb import Apdb
    from diadb.backends.base import ReadTable

Progress = Callable[[str], None]

_CATALOG_TYPE = {"DiaObject": "object", "DiaSource": "source", "DiaForcedSource": "source"}
#: Default partition sizes: about 150-250 MB of Parquet per partition at full width.
DEFAULT_MAX_ROWS = {"DiaObject": 300_000, "DiaSource": 300_000, "DiaForcedSource": 2_000_000}


def require_hats() -> None:
    """Raise a clear error when the ``ppdb`` extra is not installed."""
    try:
        import hats  # noqa: F401
    except ImportError:
        raise BackendUnavailable(
            "PPDB publication needs the hats library: pip install 'diadb[ppdb]'"
        ) from None


@dataclass(frozen=True)
class ExportOptions:
    """How an export is cut and run. Sizes in rows, angles in arcseconds, orders are HEALPix orders."""

    #: Most rows in one partition file, per table (adaptive tiling stops splitting below this).
    max_rows: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_ROWS))
    #: Width of the margin catalogs.
    margin_arcsec: float = 5.0
    #: The counting pass reads the sky in blocks of this order (12 * 4**k blocks over the sky).
    scan_order: int = 2
    #: Order of the skymap written beside each catalog.
    skymap_order: int = 8
    #: Processes for the per-partition work (more than 1 needs Dask); 1 runs it in this process.
    workers: int = 1
    #: A ``dask.distributed`` scheduler address (``tcp://host:8786``) to run that work on instead.
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if not (0.0 < self.margin_arcsec <= 3600.0):
            raise ConfigError(f"margin_arcsec must be in (0, 3600], got {self.margin_arcsec}")
        if not (0 <= self.scan_order <= 8):
            raise ConfigError(f"scan_order must be in [0, 8], got {self.scan_order}")
        if not (0 <= self.skymap_order <= part.MAX_ORDER):
            raise ConfigError(f"skymap_order must be in [0, {part.MAX_ORDER}], got {self.skymap_order}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        for table, n in self.max_rows.items():
            if n < 1:
                raise ConfigError(f"max_rows[{table}] must be >= 1, got {n}")


@dataclass
class ExportResult:
    """What an export did: rows and partitions per table, chunks applied, seconds taken."""

    root: Path
    incremental: bool
    tables: dict[str, dict[str, int]]
    chunks_applied: int
    last_chunk_id: int | None
    seconds: float
    rewritten_partitions: int = 0


def export_hats(
    apdb: Apdb,
    out_dir: str | Path,
    *,
    region: Any = None,
    options: ExportOptions | None = None,
    incremental: bool | None = None,
    mark_published: bool = True,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the APDB's DiaObjects (latest versions), DiaSources and DiaForcedSources as HATS catalogs.

    ``region`` (a diadb region or text like ``"circle 55 -30 3"``) restricts the export to that
    part of the sky. When ``out_dir`` already holds an export of this database, the export is
    incremental (``incremental=None`` or ``True``); ``incremental=False`` refuses a non-empty
    directory. A full-sky export marks the change-log chunks it covered as published
    (``mark_published``).
    """
    require_hats()
    opts = options or ExportOptions()
    root = Path(out_dir)
    reg = None if region is None else as_region(region)
    region_text = None if region is None else (region if isinstance(region, str) else repr(reg))
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    if root.exists() and (root / MANIFEST).exists():
        if incremental is False:
            raise PublicationError(f"{root} already holds an export; choose an empty directory")
        from diadb.ppdb.incremental import check_same_source, update_export

        manifest = Manifest.read(root)
        check_same_source(manifest, apdb, region_text)
        return update_export(apdb, root, manifest, reg, opts, mark_published, say, t0)
    if incremental:
        raise PublicationError(f"{root} holds no export to update (no {MANIFEST})")
    if root.exists() and any(root.iterdir()):
        raise PublicationError(f"{root} is not empty and holds no diadb export; choose an empty directory")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _full_export(apdb, root, reg, region_text, opts, mark_published, say, t0)
    except BaseException:
        # Everything in the directory is this export's (it was empty or absent): a failed export
        # leaves nothing that would block the next attempt.
        shutil.rmtree(root, ignore_errors=True)
        if not created:
            root.mkdir(parents=True, exist_ok=True)
        raise


def _full_export(
    apdb: Apdb,
    root: Path,
    reg: Region | None,
    region_text: str | None,
    opts: ExportOptions,
    mark_published: bool,
    say: Progress,
    t0: float,
) -> ExportResult:
    from diadb.ppdb.incremental import chunk_ids as _chunk_ids

    chunk_ids = _chunk_ids(apdb)
    last_chunk = int(chunk_ids.max()) if chunk_ids is not None and len(chunk_ids) else None
    manifest = Manifest(
        source_url=_public_url(apdb.url),
        schema_name=apdb.schema.name,
        schema_version=apdb.schema.version,
        region=region_text,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(),
        max_rows=0,
        margin_arcsec=opts.margin_arcsec,
        last_chunk_id=last_chunk if chunk_ids is not None else None,
        apdb_config=apdb.config.to_json(),
    )
    manifest.max_rows = max(opts.max_rows.get(t, DEFAULT_MAX_ROWS[t]) for t in TABLES)
    (root / SCHEMA_FILE).write_text(apdb.schema.yaml_text)
    written: list[Path] = [root / SCHEMA_FILE]
    plans: dict[str, list[part.Pixel]] = {}
    for table in TABLES:
        say(f"{table}: counting")
        pixels, counts = _count(apdb, table, reg, opts.scan_order)
        plans[table] = [p for p, _ in part.plan_partitions(pixels, counts, max_rows=_max_rows(opts, table))]
    writers = {t: _TableWriter(apdb, root, t, reg, opts) for t in TABLES}
    # Every table's partitions and margins are one batch of independent jobs (one Dask pool).
    jobs = [Job(t, kind, tuple(plans[t])) for t in TABLES for kind in ("data", "margin")]
    say(
        "writing "
        + ", ".join(f"{len(plans[t])} {t}" for t in TABLES)
        + " partition(s)"
        + (f" on Dask ({opts.scheduler or f'{opts.workers} processes'})" if is_parallel(opts) else "")
    )
    run_jobs(apdb, root, reg, opts, jobs, writers)
    for table in TABLES:
        say(f"{table}: metadata")
        written += writers[table].finish(plans[table])
        manifest.tables[table] = writers[table].summary(plans[table])
    manifest.record(root, written)
    manifest.write(root)
    if mark_published and reg is None and chunk_ids is not None and len(chunk_ids):
        apdb.mark_published(chunk_ids)
    return ExportResult(
        root=root,
        incremental=False,
        tables={
            t: {k: int(v) for k, v in s.items() if k in ("rows", "partitions")}
            for t, s in manifest.tables.items()
        },
        chunks_applied=0 if chunk_ids is None else len(chunk_ids),
        last_chunk_id=manifest.last_chunk_id,
        seconds=time.perf_counter() - t0,
    )


# ---- the counting pass ------------------------------------------------------------
def _scan_cover(region: Region | None) -> part.Int64Array:
    if region is None:
        return np.array([[0, NPIX_29]], dtype=np.int64)
    return np.asarray(region.pixel_ranges(), dtype=np.int64)


def _blocks(cover: part.Int64Array, scan_order: int) -> Iterator[part.Int64Array]:
    """The cover cut into the order-``scan_order`` pixels it touches, one range list per block."""
    shift = 2 * (ORDER - scan_order)
    first = cover[:, 0] >> shift
    last = (cover[:, 1] - 1) >> shift
    blocks = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last, strict=True)]))
    for b in blocks.tolist():
        block = np.array([[b << shift, (b + 1) << shift]], dtype=np.int64)
        ranges = part.intersect_ranges(cover, block)
        if len(ranges):
            yield ranges


def _inside(region: Region | None, data: pa.Table) -> pa.Table:
    if region is None or not data.num_rows:
        return data
    mask = region.contains(data.column("ra").to_numpy(), data.column("dec").to_numpy())
    return data if mask.all() else data.filter(pa.array(mask))


def _count(
    apdb: Apdb, table: str, region: Region | None, scan_order: int
) -> tuple[part.Int64Array, part.Int64Array]:
    cover = _scan_cover(region)
    columns = [HEALPIX_COLUMN] if region is None else [HEALPIX_COLUMN, "ra", "dec"]
    parts = []
    for ranges in _blocks(cover, scan_order):
        rows = _inside(region, apdb.read_pixels(_read_table(table), ranges, columns=columns))
        if rows.num_rows:
            parts.append(part.histogram(rows.column(HEALPIX_COLUMN).to_numpy()))
    return part.merge_histograms(parts)


def _read_table(table: str) -> ReadTable:
    return cast("ReadTable", table)


def _max_rows(opts: ExportOptions, table: str) -> int:
    return int(opts.max_rows.get(table, DEFAULT_MAX_ROWS[table]))


# ---- writing one table ------------------------------------------------------------
class _TableWriter:
    """Writes the partitions, margins, index, metadata and properties of one table's catalogs."""

    def __init__(self, apdb: Apdb, root: Path, table: str, region: Region | None, opts: ExportOptions):
        self.apdb = apdb
        self.root = root
        self.table = table
        self.region = region
        self.opts = opts
        self.cover = _scan_cover(region)
        spec = apdb.schema.table(table)
        meta = dict(spec.arrow_schema().metadata or {})
        meta.update(
            {
                b"felis.schema_name": apdb.schema.name.encode(),
                b"felis.schema_version": apdb.schema.version.encode(),
            }
        )
        self.schema: pa.Schema = spec.arrow_schema().with_metadata(meta)
        self.index_schema = pa.schema(
            [
                pa.field(INDEX_COLUMN, pa.int64(), nullable=False),
                pa.field("Norder", pa.uint8(), nullable=False),
                pa.field("Dir", pa.uint64(), nullable=False),
                pa.field("Npix", pa.uint64(), nullable=False),
            ]
        )
        from hats.io.file_io.file_io import get_parquet_write_table_kwargs

        self.write_kwargs = get_parquet_write_table_kwargs(self.schema)
        self.index_kwargs = get_parquet_write_table_kwargs(self.index_schema)
        self.margin_order = part.margin_order_for(opts.margin_arcsec)

    # -- reads
    def _read(self, ranges: part.Int64Array) -> pa.Table:
        ranges = part.intersect_ranges(ranges, self.cover)
        rows = _inside(self.region, self.apdb.read_pixels(_read_table(self.table), ranges))
        return rows.cast(self.schema)

    # -- partitions
    def data_path(self, pixel: part.Pixel) -> Path:
        return catalog_dir(self.root, self.table) / "dataset" / pixel.relative_path()

    def margin_path(self, pixel: part.Pixel) -> Path:
        return margin_dir(self.root, self.table) / "dataset" / pixel.relative_path()

    def index_path(self, pixel: part.Pixel) -> Path:
        return (
            index_dir(self.root, self.table)
            / "dataset"
            / "index"
            / f"part_{pixel.order}_{pixel.npix}.parquet"
        )

    def write_partition(self, pixel: part.Pixel) -> int:
        """Read the pixel's rows (sorted by ``_healpix_29``) and write its data and index files."""
        rows = self._read(np.array([pixel.range29()], dtype=np.int64))
        if not rows.num_rows:
            # Nothing left here (an incremental export after a daytime removal): drop the files.
            for p in (self.data_path(pixel), self.index_path(pixel)):
                p.unlink(missing_ok=True)
            return 0
        _write_parquet(rows, self.data_path(pixel), self.write_kwargs)
        ids = pc.unique(pc.drop_null(rows.column(INDEX_COLUMN))).cast(pa.int64())
        ids = pc.take(ids, pc.sort_indices(ids))
        n = len(ids)
        index = pa.Table.from_arrays(
            [
                ids,
                pa.array(np.full(n, pixel.order, dtype=np.uint8)),
                pa.array(np.full(n, pixel.dir, dtype=np.uint64)),
                pa.array(np.full(n, pixel.npix, dtype=np.uint64)),
            ],
            schema=self.index_schema,
        )
        _write_parquet(index, self.index_path(pixel), self.index_kwargs)
        return int(rows.num_rows)

    def write_margins(self, plan: list[part.Pixel], changed: part.Int64Array | None) -> int:
        """Write the margin file of each partition (only those whose margin holds a ``changed``
        order-29 value, when given). Returns how many were written."""
        count = 0
        for pixel in plan:
            ranges = part.intersect_ranges(part.margin_ranges(pixel, self.margin_order), self.cover)
            if changed is not None and not part.in_ranges(changed, ranges).any():
                continue
            rows = self._read(ranges)
            path = self.margin_path(pixel)
            if rows.num_rows:
                _write_parquet(rows, path, self.write_kwargs)
            else:
                path.unlink(missing_ok=True)
            count += 1
        return count

    # -- metadata
    def finish(self, plan: list[part.Pixel]) -> list[Path]:
        """Write metadata, partition info, skymaps and properties; return every file of the catalogs."""
        from hats.catalog.dataset.collection_properties import CollectionProperties
        from hats.catalog.dataset.table_properties import TableProperties
        from hats.catalog.partition_info import PartitionInfo
        from hats.io.parquet_metadata import write_parquet_metadata
        from hats.io.skymap import write_skymap
        from hats.pixel_math.healpix_pixel import HealpixPixel

        import diadb

        main = catalog_dir(self.root, self.table)
        margin = margin_dir(self.root, self.table)
        index = index_dir(self.root, self.table)
        present = [p for p in plan if self.data_path(p).exists()]
        rows = _dataset_metadata(main, self.schema, write_parquet_metadata, healpix=True)
        margin_pixels = [p for p in present if self.margin_path(p).exists()]
        margin_rows = _dataset_metadata(margin, self.schema, write_parquet_metadata, healpix=True)
        index_rows = _dataset_metadata(index, self.index_schema, write_parquet_metadata, healpix=False)
        for directory, pixels in ((main, present), (margin, margin_pixels)):
            info = PartitionInfo.from_healpix([HealpixPixel(p.order, p.npix) for p in pixels])
            info.write_to_file(catalog_path=directory)
        # The skymap: row counts per order-`skymap_order` pixel, from the files' _healpix_29.
        sky = np.zeros(12 * 4**self.opts.skymap_order, dtype=np.int64)
        shift = 2 * (ORDER - self.opts.skymap_order)
        for p in present:
            hp29 = pq.read_table(self.data_path(p), columns=[HEALPIX_COLUMN]).column(0).to_numpy()
            np.add.at(sky, hp29 >> shift, 1)
        write_skymap(sky, main)
        builder = f"diadb {diadb.__version__}"
        max_rows = max((_file_rows(self.data_path(p)) for p in present), default=0)
        common: dict[str, Any] = {
            "ra_column": "ra",
            "dec_column": "dec",
            "healpix_column": HEALPIX_COLUMN,
            "healpix_order": ORDER,
            "obs_description": f"{self.table} from the diadb APDB {_public_url(self.apdb.url)}",
            "diadb_felis_schema": f"{self.apdb.schema.name} {self.apdb.schema.version}",
        }
        properties: list[tuple[Path, dict[str, Any]]] = [
            (
                main,
                {
                    **common,
                    "catalog_name": self.table,
                    "catalog_type": _CATALOG_TYPE[self.table],
                    "total_rows": rows,
                    "hats_max_rows": max_rows,
                    "skymap_order": self.opts.skymap_order,
                    "moc_sky_fraction": float(np.mean(sky > 0)),
                },
            ),
            (
                margin,
                {
                    **common,
                    "catalog_name": margin.name,
                    "catalog_type": "margin",
                    "total_rows": margin_rows,
                    "primary_catalog": self.table,
                    "margin_threshold": self.opts.margin_arcsec,
                },
            ),
            (
                index,
                {
                    "catalog_name": index.name,
                    "catalog_type": "index",
                    "total_rows": index_rows,
                    "primary_catalog": self.table,
                    "indexing_column": INDEX_COLUMN,
                },
            ),
        ]
        for directory, values in properties:
            provenance = TableProperties.new_provenance_dict(directory, builder=builder)
            TableProperties(**values, **provenance).to_properties_file(directory)
        collection: dict[str, Any] = {
            "name": self.table,
            "hats_primary_table_url": self.table,
            "all_margins": [margin.name],
            "default_margin": margin.name,
            "all_indexes": {INDEX_COLUMN: index.name},
            "default_index": INDEX_COLUMN,
        }
        CollectionProperties(**collection).to_properties_file(self.root / self.table)
        self._counts = {"rows": rows, "margin_rows": margin_rows, "index_rows": index_rows}
        self._partitions = len(present)
        return sorted(p for p in (self.root / self.table).rglob("*") if p.is_file())

    def summary(self, plan: list[part.Pixel]) -> dict[str, Any]:
        present = [p for p in plan if self.data_path(p).exists()]
        return {
            **self._counts,
            "partitions": len(present),
            "max_rows": _max_rows(self.opts, self.table),
            "margin_order": self.margin_order,
            "pixels": [[p.order, p.npix] for p in present],
        }


def _write_parquet(table: pa.Table, path: Path, kwargs: dict[str, Any]) -> None:
    """Write one Parquet file atomically: to a temporary name, then renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, **kwargs)
    tmp.replace(path)


def _file_rows(path: Path) -> int:
    return int(pq.ParquetFile(path).metadata.num_rows)


def _dataset_metadata(directory: Path, schema: pa.Schema, writer: Any, *, healpix: bool) -> int:
    """``_metadata`` and ``_common_metadata`` of a catalog (``hats`` writes them from the file
    footers); an empty catalog gets both from the schema alone. Returns the rows."""
    dataset = directory / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    for stale in ("_metadata", "_common_metadata"):
        (dataset / stale).unlink(missing_ok=True)
    if any(dataset.rglob("*.parquet")):
        return int(writer(directory, order_by_healpix=healpix))
    pq.write_metadata(schema, dataset / "_common_metadata")
    pq.write_metadata(schema, dataset / "_metadata")
    return 0


def _public_url(url: str) -> str:
    """The URL as recorded in an export (diadb refuses URLs that carry passwords)."""
    return str(url)
