"""Incremental export: apply the APDB change-log chunks newer than an export to it.

The partitions whose rows the new chunks stored or changed are read again from the APDB and
rewritten whole; daytime updates name rows by id, so their partitions are found through the
export's own index catalog (DiaObjects) and DiaSource files. New rows outside every partition get
new partitions. Margins whose pixels hold a changed row are rewritten, then metadata and checksums.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.ppdb import partition as part
from diadb.ppdb.layout import FORMAT_VERSION, TABLES, Manifest, PublicationError, catalog_dir
from diadb.ppdb.nested import LIGHT_CURVES, writer_for
from diadb.ppdb.options import ExportOptions, ExportResult, Progress
from diadb.ppdb.parallel import Job, run_jobs
from diadb.ppdb.versions import VERSIONS, VersionsWriter, apply_chunks, read_exported
from diadb.ppdb.writer import public_url, scan_cover
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.regions import Region, as_region

if TYPE_CHECKING:
    from diadb.apdb import Apdb


def chunk_ids(apdb: Apdb) -> np.ndarray:
    """All change-log chunk ids, in commit order."""
    chunks = apdb.replica_chunks()
    return np.asarray(chunks.column("chunk_id").to_numpy(), dtype=np.int64)


def check_same_source(manifest: Manifest, apdb: Apdb, region_text: str | None) -> None:
    if manifest.source_url != public_url(apdb.url):
        raise PublicationError(
            f"the export was made from {manifest.source_url}, not {public_url(apdb.url)}; "
            "use an empty directory for a new export"
        )
    if region_text is not None and region_text != manifest.region:
        raise PublicationError(
            f"the export covers region {manifest.region!r}, not {region_text!r}; use an empty directory"
        )


def new_chunks(apdb: Apdb, manifest: Manifest) -> np.ndarray:
    """The change-log chunks newer than the export, in commit order.

    An export made before the first chunk (of an empty database) takes every chunk: the
    partitions they touch are read again whole, so rows already exported are not doubled."""
    ids = chunk_ids(apdb)
    through = apdb.deleted_chunks_through()
    if through is not None and (manifest.last_chunk_id is None or manifest.last_chunk_id < through):
        applied = "none" if manifest.last_chunk_id is None else f"up to {manifest.last_chunk_id}"
        raise PublicationError(
            f"chunks up to {through} were deleted from {public_url(apdb.url)} and this export applied "
            f"{applied}: it cannot be brought up to date; make a full export into an empty directory"
        )
    return ids if manifest.last_chunk_id is None else ids[ids > manifest.last_chunk_id]


def unchanged_result(root: Path, manifest: Manifest, t0: float) -> ExportResult:
    """The result of an update that found no new chunk (nothing written)."""
    return ExportResult(
        root=root,
        incremental=True,
        tables={
            t: {"rows": int(s["rows"]), "partitions": int(s["partitions"])}
            for t, s in manifest.tables.items()
        },
        chunks_applied=0,
        last_chunk_id=manifest.last_chunk_id,
        seconds=time.perf_counter() - t0,
    )


def update_export(
    apdb: Apdb,
    root: Path,
    manifest: Manifest,
    region: Region | None,
    opts: ExportOptions,
    new_ids: np.ndarray,
    say: Progress,
    t0: float,
) -> ExportResult:
    """Apply the chunks ``new_ids`` to the export version at ``root`` (a staged copy)."""
    if manifest.region is not None and region is None:
        region = as_region(manifest.region)
    result_tables: dict[str, dict[str, int]] = {}
    rewritten = 0
    if len(new_ids):
        say(f"applying {len(new_ids)} change-log chunk(s)")
        changes = apdb.read_chunks(new_ids.tolist())
        touched = _touched(root, manifest, changes)
        written: list[Path] = []
        catalogs = [t for t in (*TABLES, LIGHT_CURVES, VERSIONS) if t in manifest.tables]
        writers = {t: writer_for(apdb, root, t, region, opts) for t in catalogs if t != VERSIONS}
        plans: dict[str, list[part.Pixel]] = {}
        stale: dict[str, set[part.Pixel]] = {}
        jobs: list[Job] = []
        version_jobs: list[Job] = []
        if VERSIONS in manifest.tables:
            catalogs.remove(VERSIONS)
            schema = writers["DiaObject"].schema
            versions, touched[VERSIONS] = apply_chunks(read_exported(root, schema), changes, region)
            writers[VERSIONS] = VersionsWriter(apdb, root, region, opts, versions)
            catalogs.append(VERSIONS)
        changed = np.unique(np.concatenate([touched["all"], touched.get(VERSIONS, np.zeros(0, np.int64))]))
        for table in catalogs:
            old = [part.Pixel(int(o), int(n)) for o, n in manifest.tables[table]["pixels"]]
            # A light curve changes with its object and with its sources (their objects' pixels).
            hp29 = touched["DiaObject" if table == LIGHT_CURVES else table]
            target = version_jobs if table == VERSIONS else jobs
            where = part.partition_of(hp29, old)
            affected = sorted(
                {old[i] for i in np.unique(where[where >= 0]).tolist()}, key=lambda p: p.range29()
            )
            # New rows outside every partition get new partitions, planned from their counts.
            outside = hp29[where < 0]
            if region is not None and len(outside):
                outside = outside[part.in_ranges(outside, scan_cover(region))]
            fresh: list[part.Pixel] = []
            if len(outside):
                pixels, counts = part.histogram(np.unique(outside))
                fresh = [
                    p
                    for p, _ in part.plan_partitions(
                        pixels, counts, max_rows=opts.rows_per_partition(table), forbidden=old
                    )
                ]
            plans[table] = sorted(set(old) | set(fresh), key=lambda p: p.range29())
            stale[table] = set(old)
            # Data files of the touched and new partitions; margins of the old partitions near a
            # changed row, and of every new one.
            target += [
                Job(table, "data", (*affected, *fresh)),
                Job(
                    table, "margin", tuple(sorted(set(old) - set(fresh), key=lambda p: p.range29())), changed
                ),
                Job(table, "margin", tuple(fresh)),
            ]
            rewritten += len(affected) + len(fresh)
        run_jobs(apdb, root, region, opts, jobs, writers)
        # The versions are in this process's memory: their jobs run here.
        run_jobs(
            apdb, root, region, dataclasses.replace(opts, workers=1, scheduler=None), version_jobs, writers
        )
        for table in catalogs:
            writer = writers[table]
            for gone in stale[table] - {p for p in plans[table] if writer.data_path(p).exists()}:
                writer.margin_path(gone).unlink(missing_ok=True)
            written += writer.finish(plans[table])
            manifest.tables[table] = writer.summary(plans[table])
        manifest.forget_missing(root)
        manifest.record(root, written)
    manifest.last_chunk_id = int(new_ids.max()) if len(new_ids) else manifest.last_chunk_id
    manifest.created_at = _dt.datetime.now(_dt.UTC).isoformat()
    manifest.format_version = FORMAT_VERSION
    manifest.write(root)
    for table, s in manifest.tables.items():
        result_tables[table] = {"rows": int(s["rows"]), "partitions": int(s["partitions"])}
    return ExportResult(
        root=root,
        incremental=True,
        tables=result_tables,
        chunks_applied=len(new_ids),
        last_chunk_id=manifest.last_chunk_id,
        seconds=time.perf_counter() - t0,
        rewritten_partitions=rewritten,
    )


def _touched(root: Path, manifest: Manifest, changes: dict[str, pa.Table]) -> dict[str, np.ndarray]:
    """The order-29 pixels whose rows the chunks may have changed, per table (and ``all``).

    Stored rows carry their ``_healpix_29`` (or ra/dec). Daytime updates name DiaSources and
    DiaObjects by id: their pixels come from the export itself (the index catalog for objects,
    the DiaSource files for sources) and from the rows the chunks carry.
    """
    from diadb.sky.healpix import radec_to_healpix29

    def pixels_of(t: pa.Table | None) -> np.ndarray:
        if t is None or not t.num_rows:
            return np.zeros(0, np.int64)
        if HEALPIX_COLUMN in t.column_names:
            return np.asarray(t.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        return radec_to_healpix29(t.column("ra").to_numpy(), t.column("dec").to_numpy())

    out = {t: pixels_of(changes.get(t)) for t in TABLES}
    source_ids, object_ids = _ids_in_updates(changes.get("updates"))
    object_ids = np.concatenate(
        [
            object_ids,
            _column_ids(changes.get("DiaObject"), "diaObjectId"),
            _column_ids(changes.get("DiaSource"), "diaObjectId"),
            _column_ids(changes.get("DiaForcedSource"), "diaObjectId"),
        ]
    )
    if len(source_ids):
        found = _lookup(root, "DiaSource", "diaSourceId", source_ids, [HEALPIX_COLUMN, "diaObjectId"])
        out["DiaSource"] = np.concatenate([out["DiaSource"], pixels_of(found)])
        object_ids = np.concatenate([object_ids, _column_ids(found, "diaObjectId")])
    if len(object_ids):
        found = _lookup(root, "DiaObject", "diaObjectId", np.unique(object_ids), [HEALPIX_COLUMN])
        out["DiaObject"] = np.concatenate([out["DiaObject"], pixels_of(found)])
    out["all"] = np.concatenate([out[t] for t in TABLES])
    return out


def _column_ids(t: pa.Table | None, column: str) -> np.ndarray:
    if t is None or not t.num_rows or column not in t.column_names:
        return np.zeros(0, np.int64)
    return np.asarray(pc.drop_null(t.column(column)).to_numpy(), dtype=np.int64)


def _ids_in_updates(updates: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """DiaSource and DiaObject ids named anywhere in the update records' JSON payloads."""
    sources: list[int] = []
    objects: list[int] = []
    if updates is None or not updates.num_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    def walk(node: Any, key: str | None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, int) and not isinstance(node, bool):
            if key == "diaSourceId":
                sources.append(node)
            elif key in ("diaObjectId", "diaObjectIds"):
                objects.append(node)

    for payload in updates.column("payload").to_pylist():
        walk(json.loads(payload), None)
    return np.asarray(sources, dtype=np.int64), np.asarray(objects, dtype=np.int64)


def _lookup(root: Path, table: str, column: str, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows of the exported ``table`` whose ``column`` is in ``ids`` (only ``columns``)."""
    import pyarrow.dataset as pds

    data = catalog_dir(root, table) / "dataset"
    files = sorted(str(p) for p in data.rglob("Npix=*.parquet"))
    if not files:
        return pa.table({c: pa.array([], pa.int64()) for c in columns})
    ds = pds.dataset(files, format="parquet")
    return ds.to_table(columns=columns, filter=pc.field(column).isin(pa.array(ids, pa.int64())))
