"""Publish an APDB as HATS catalogs (DiaObject latest versions, DiaSource, DiaForcedSource).

A full export plans the partitions of each table from a counting pass (the ``_healpix_29`` of
every row, read one coarse sky block at a time), then reads, sorts and writes one partition at
a time, then its margin and index catalogs, then the dataset metadata (``hats`` writes
``_metadata``/``_common_metadata``, ``partition_info.csv``, the skymap and the properties).
Memory is bounded by the rows of one partition (``max_rows``) and the narrow rows of one
counting block, whatever the size of the database. (The resident size also counts the file pages
read through SQLite's memory map and the mapped history segments: page cache, reclaimable.) The
partitions and margins are independent jobs, run here or on Dask workers (``workers``,
``scheduler``; see :mod:`diadb.ppdb.parallel`). Each table's files are written by a
:class:`diadb.ppdb.writer.TableWriter`; the options and the result are in :mod:`diadb.ppdb.options`.

A later export into the same directory is incremental (:mod:`diadb.ppdb.incremental`): only the
partitions that the new change-log chunks touch are read again and rewritten (new rows outside
every partition get new partitions), so the export then holds exactly the rows a full re-export
would hold. Partition boundaries stay as they were (a full re-export may balance them
differently). Every export writes a new version of the directory and publishes it with one
atomic rename (:func:`diadb.ppdb.layout.publish`): a failed update leaves the previous
version published and valid; with no new chunk nothing is written at all.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diadb.errors import BackendUnavailable
from diadb.metrics import timed
from diadb.ppdb import partition as part
from diadb.ppdb.incremental import (
    check_same_source,
    chunk_ids,
    new_chunks,
    unchanged_result,
    update_export,
)
from diadb.ppdb.layout import (
    MANIFEST,
    SCHEMA_FILE,
    TABLES,
    Manifest,
    PublicationError,
    first_version,
    is_versioned,
    publish,
    stage,
)
from diadb.ppdb.nested import LIGHT_CURVES, writer_for
from diadb.ppdb.options import DEFAULT_MAX_ROWS, ExportOptions, ExportResult, Progress
from diadb.ppdb.parallel import Job, is_parallel, run_jobs
from diadb.ppdb.versions import VERSIONS, VersionsWriter, all_versions
from diadb.ppdb.writer import public_url, read_inside, scan_cover
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.healpix import ORDER
from diadb.sky.regions import Region, as_region

if TYPE_CHECKING:
    from diadb.apdb import Apdb


def require_hats() -> None:
    """Raise a clear error when the ``ppdb`` extra is not installed."""
    try:
        import hats  # noqa: F401
    except ImportError:
        raise BackendUnavailable(
            "PPDB publication needs the hats library: pip install 'diadb[ppdb]'"
        ) from None


def _exported_rows(args: Mapping[str, Any], result: ExportResult) -> int:
    return sum(int(t.get("rows", 0)) for t in result.tables.values())


@timed("export", rows=_exported_rows)
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
        manifest = Manifest.read(root)
        check_same_source(manifest, apdb, region_text)
        if not is_versioned(root):
            raise PublicationError(
                f"{root} is an export of format 1 (updated in place); re-export it into an empty "
                "directory to update it incrementally"
            )
        pending = new_chunks(apdb, manifest)
        if not len(pending):
            # Nothing new: the export stays exactly as it is (no new version).
            return unchanged_result(root, manifest, t0)
        version = stage(root)
        try:
            result = update_export(apdb, version, manifest, reg, opts, pending, say, t0)
            publish(root, version)
        except BaseException:
            # The published version is untouched: drop the unfinished one.
            shutil.rmtree(version, ignore_errors=True)
            raise
        if mark_published and manifest.region is None:
            apdb.mark_published(pending.tolist())
        return dataclasses.replace(result, root=root)
    if incremental:
        raise PublicationError(f"{root} holds no export to update (no {MANIFEST})")
    if root.exists() and any(root.iterdir()):
        raise PublicationError(f"{root} is not empty and holds no diadb export; choose an empty directory")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        version = first_version(root)
        result, chunks = _full_export(apdb, version, reg, region_text, opts, say, t0)
        publish(root, version)
    except BaseException:
        # Everything in the directory is this export's (it was empty or absent): a failed export
        # leaves nothing that would block the next attempt.
        shutil.rmtree(root, ignore_errors=True)
        if not created:
            root.mkdir(parents=True, exist_ok=True)
        raise
    if mark_published and reg is None and len(chunks):
        apdb.mark_published(chunks.tolist())
    return dataclasses.replace(result, root=root)


def _full_export(
    apdb: Apdb,
    root: Path,
    reg: Region | None,
    region_text: str | None,
    opts: ExportOptions,
    say: Progress,
    t0: float,
) -> tuple[ExportResult, np.ndarray]:
    chunks = chunk_ids(apdb)
    manifest = Manifest(
        source_url=public_url(apdb.url),
        schema_name=apdb.schema.name,
        schema_version=apdb.schema.version,
        region=region_text,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(),
        max_rows=0,
        margin_arcsec=opts.margin_arcsec,
        last_chunk_id=int(chunks.max()) if len(chunks) else None,
        apdb_config=apdb.config.to_json(),
    )
    manifest.max_rows = max(opts.rows_per_partition(t) for t in TABLES)
    (root / SCHEMA_FILE).write_text(apdb.schema.yaml_text)
    written: list[Path] = [root / SCHEMA_FILE]
    plans: dict[str, list[part.Pixel]] = {}
    for table in TABLES:
        say(f"{table}: counting")
        pixels, counts = _count(apdb, table, reg, opts.scan_order)
        plans[table] = [
            p for p, _ in part.plan_partitions(pixels, counts, max_rows=opts.rows_per_partition(table))
        ]
    catalogs = [*TABLES, *([LIGHT_CURVES] if opts.light_curves else [])]
    if opts.light_curves:
        plans[LIGHT_CURVES] = plans["DiaObject"]
    writers = {t: writer_for(apdb, root, t, reg, opts) for t in catalogs}
    # Every catalog's partitions and margins are one batch of independent jobs (one Dask pool).
    jobs = [Job(t, kind, tuple(plans[t])) for t in catalogs for kind in ("data", "margin")]
    if opts.object_versions:
        say(f"{VERSIONS}: reading the versions from {len(chunks)} chunk(s)")
        versions = all_versions(apdb, chunks, reg)
        pixels, counts = part.histogram(versions.column(HEALPIX_COLUMN).to_numpy())
        plans[VERSIONS] = [
            p for p, _ in part.plan_partitions(pixels, counts, max_rows=opts.rows_per_partition(VERSIONS))
        ]
        writers[VERSIONS] = VersionsWriter(apdb, root, reg, opts, versions)
        # From memory, in this process.
        serial = dataclasses.replace(opts, workers=1, scheduler=None)
        run_jobs(
            apdb,
            root,
            reg,
            serial,
            [Job(VERSIONS, k, tuple(plans[VERSIONS])) for k in ("data", "margin")],
            writers,
        )
        catalogs.append(VERSIONS)
    say(
        "writing "
        + ", ".join(f"{len(plans[t])} {t}" for t in catalogs)
        + " partition(s)"
        + (f" on Dask ({opts.scheduler or f'{opts.workers} processes'})" if is_parallel(opts) else "")
    )
    run_jobs(apdb, root, reg, opts, jobs, writers)
    for table in catalogs:
        say(f"{table}: metadata")
        written += writers[table].finish(plans[table])
        manifest.tables[table] = writers[table].summary(plans[table])
    manifest.record(root, written)
    manifest.write(root)
    result = ExportResult(
        root=root,
        incremental=False,
        tables={
            t: {k: int(v) for k, v in s.items() if k in ("rows", "partitions")}
            for t, s in manifest.tables.items()
        },
        chunks_applied=len(chunks),
        last_chunk_id=manifest.last_chunk_id,
        seconds=time.perf_counter() - t0,
    )
    return result, chunks


# ---- the counting pass ------------------------------------------------------------
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


def _count(
    apdb: Apdb, table: str, region: Region | None, scan_order: int
) -> tuple[part.Int64Array, part.Int64Array]:
    cover = scan_cover(region)
    columns = [HEALPIX_COLUMN] if region is None else [HEALPIX_COLUMN, "ra", "dec"]
    parts = []
    for ranges in _blocks(cover, scan_order):
        rows = read_inside(apdb, table, ranges, region, columns)
        if rows.num_rows:
            parts.append(part.histogram(rows.column(HEALPIX_COLUMN).to_numpy()))
    return part.merge_histograms(parts)


__all__ = ["DEFAULT_MAX_ROWS", "ExportOptions", "ExportResult", "export_hats", "require_hats"]
