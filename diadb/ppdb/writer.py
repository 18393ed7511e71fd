"""Writing one table's HATS catalogs: :class:`TableWriter`, and the reads it shares with the export.

A table's export is three catalogs side by side: the partitions (``dataset/Norder=k/...``,
rows sorted by ``_healpix_29``), their margins, and the ``diaObjectId`` index; then each
catalog's ``_metadata``, partition info, skymap and properties. The writer does all of it for one
table; the full and the incremental export (:mod:`diadb.ppdb.hats_export`,
:mod:`diadb.ppdb.incremental`) plan which partitions it writes, and :mod:`diadb.ppdb.parallel`
runs that work here or on Dask workers. Every Parquet file is written atomically (to a temporary
name, then renamed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diadb.ppdb import partition as part
from diadb.ppdb.layout import INDEX_COLUMN, catalog_dir, index_dir, margin_dir
from diadb.ppdb.options import ExportOptions
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.healpix import NPIX_29, ORDER
from diadb.sky.regions import Region

if TYPE_CHECKING:
    from diadb.apdb import Apdb
    from diadb.backends.base import ReadTable

_CATALOG_TYPE = {"DiaObject": "object", "DiaSource": "source", "DiaForcedSource": "source"}


def scan_cover(region: Region | None) -> part.Int64Array:
    """The order-29 ranges an export of ``region`` reads (the whole sky for None)."""
    if region is None:
        return np.array([[0, NPIX_29]], dtype=np.int64)
    return np.asarray(region.pixel_ranges(), dtype=np.int64)


def read_inside(
    apdb: Apdb,
    table: str,
    ranges: part.Int64Array,
    region: Region | None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """The rows of ``table`` in the order-29 ``ranges`` that lie inside ``region`` (all of them for
    None); ``columns``, when given, must then include ``ra`` and ``dec``."""
    rows = apdb.read_pixels(cast("ReadTable", table), ranges, columns=columns)
    if region is None or not rows.num_rows:
        return rows
    mask = region.contains(rows.column("ra").to_numpy(), rows.column("dec").to_numpy())
    return rows if mask.all() else rows.filter(pa.array(mask))


def public_url(url: str) -> str:
    """The database URL as an export records it (diadb refuses URLs that carry passwords)."""
    return str(url)


class TableWriter:
    """Writes the partitions, margins, index, metadata and properties of one table's catalogs.

    ``write_partition`` and ``write_margins`` are the independent per-partition work (any
    process may run them, see :mod:`diadb.ppdb.parallel`); ``finish`` then writes the catalogs'
    metadata from the files, and ``summary`` describes them for the manifest.
    """

    def __init__(
        self,
        apdb: Apdb,
        root: Path,
        table: str,
        region: Region | None,
        opts: ExportOptions,
        *,
        name: str | None = None,
    ):
        self.apdb = apdb
        self.root = root
        #: The APDB table read, and the name of the catalogs written (the table's, by default).
        self.table = table
        self.name = name or table
        self.region = region
        self.opts = opts
        self.cover = scan_cover(region)
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
        self.set_schema(self.schema)
        from hats.io.file_io.file_io import get_parquet_write_table_kwargs

        self.index_kwargs = get_parquet_write_table_kwargs(self.index_schema)
        self.margin_order = part.margin_order_for(opts.margin_arcsec)

    def set_schema(self, schema: pa.Schema) -> None:
        """The schema of the catalog's files (a subclass writing other columns sets its own)."""
        from hats.io.file_io.file_io import get_parquet_write_table_kwargs

        self.schema = schema
        self.write_kwargs = get_parquet_write_table_kwargs(schema)

    # -- reads
    def read_rows(self, ranges: part.Int64Array) -> pa.Table:
        """The APDB table's rows in the order-29 ``ranges`` (inside the export's region)."""
        ranges = part.intersect_ranges(ranges, self.cover)
        return read_inside(self.apdb, self.table, ranges, self.region)

    def _read(self, ranges: part.Int64Array) -> pa.Table:
        return self.read_rows(ranges).cast(self.schema)

    # -- partitions
    def data_path(self, pixel: part.Pixel) -> Path:
        return catalog_dir(self.root, self.name) / "dataset" / pixel.relative_path()

    def margin_path(self, pixel: part.Pixel) -> Path:
        return margin_dir(self.root, self.name) / "dataset" / pixel.relative_path()

    def index_path(self, pixel: part.Pixel) -> Path:
        return (
            index_dir(self.root, self.name) / "dataset" / "index" / f"part_{pixel.order}_{pixel.npix}.parquet"
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

        main = catalog_dir(self.root, self.name)
        margin = margin_dir(self.root, self.name)
        index = index_dir(self.root, self.name)
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
            "obs_description": f"{self.name} from the diadb APDB {public_url(self.apdb.url)}",
            "diadb_felis_schema": f"{self.apdb.schema.name} {self.apdb.schema.version}",
        }
        properties: list[tuple[Path, dict[str, Any]]] = [
            (
                main,
                {
                    **common,
                    "catalog_name": self.name,
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
                    "primary_catalog": self.name,
                    "margin_threshold": self.opts.margin_arcsec,
                },
            ),
            (
                index,
                {
                    "catalog_name": index.name,
                    "catalog_type": "index",
                    "total_rows": index_rows,
                    "primary_catalog": self.name,
                    "indexing_column": INDEX_COLUMN,
                },
            ),
        ]
        for directory, values in properties:
            provenance = TableProperties.new_provenance_dict(directory, builder=builder)
            TableProperties(**values, **provenance).to_properties_file(directory)
        collection: dict[str, Any] = {
            "name": self.name,
            "hats_primary_table_url": self.name,
            "all_margins": [margin.name],
            "default_margin": margin.name,
            "all_indexes": {INDEX_COLUMN: index.name},
            "default_index": INDEX_COLUMN,
        }
        CollectionProperties(**collection).to_properties_file(self.root / self.name)
        self._counts = {"rows": rows, "margin_rows": margin_rows, "index_rows": index_rows}
        return sorted(p for p in (self.root / self.name).rglob("*") if p.is_file())

    def summary(self, plan: list[part.Pixel]) -> dict[str, Any]:
        present = [p for p in plan if self.data_path(p).exists()]
        return {
            **self._counts,
            "partitions": len(present),
            "max_rows": self.opts.rows_per_partition(self.table),
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


__all__ = ["TableWriter", "public_url", "read_inside", "scan_cover"]
