"""Rebuild an APDB from a PPDB export (``diadb restore DIR URL``): disaster recovery.

The export is verified first (checksums, schema, counts); a damaged or foreign directory is a
one-line :class:`PublicationError` and nothing is written. The new database gets the export's
Felis schema and the source database's config, then one ``store`` per visit, in time order:
the visit's DiaSources and DiaForcedSources, and the DiaObjects its rows refer to for the first
time (objects no row refers to go with the last visit at or before their validity start).

What an export cannot give back: older DiaObject versions (only the latest is published; each
restored object has one version, with its original ``validityStartMjdTai``), DiaObjects closed
by daytime work (not published, so DiaSources still naming them cannot be restored), history
already pruned from the APDB before the export, and the exact visit/detector registry (each
visit is restored as one whole-visit store whose time is its latest source time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds

from diadb.config import ApdbConfig
from diadb.errors import Error
from diadb.ppdb.layout import TABLES, PublicationError, catalog_dir
from diadb.ppdb.verify import load_export, verify_export
from diadb.schema.model import HEALPIX_COLUMN


@dataclass
class RestoreResult:
    url: str
    visits: int
    rows: dict[str, int]


def restore_export(root: str | Path, url: str | Path, **config: Any) -> RestoreResult:
    """Create a new APDB at ``url`` holding every row of the export at ``root``.

    ``config`` overrides fields of the exported :class:`ApdbConfig` (e.g. ``history_tier``).
    """
    from diadb.apdb import Apdb

    base = Path(root)
    manifest, schema = load_export(base)
    report = verify_export(base)
    if not report.ok:
        raise PublicationError(
            f"{base} is damaged ({len(report.problems)} problem(s); run 'diadb verify {base}'): "
            f"{report.problems[0]}"
        )
    if manifest.region is not None:
        raise PublicationError(
            f"{base} is a region extract ({manifest.region}); restore needs a full-sky export"
        )
    data = {t: _read_catalog(base, t) for t in TABLES}
    batches = _plan_visits(data["DiaObject"], data["DiaSource"], data["DiaForcedSource"])
    settings: dict[str, Any] = {}
    if manifest.apdb_config:
        try:
            settings = dataclasses.asdict(ApdbConfig.from_json(manifest.apdb_config))
        except (Error, ValueError, TypeError):
            settings = {}
    settings.update(config)
    with Apdb.create(url, schema=schema, **settings) as db:
        for visit, mjd, objects, sources, forced in batches:
            db.store(mjd, objects, sources, forced, visit=visit)
        rows = {t: data[t].num_rows for t in TABLES}
    return RestoreResult(str(url), len(batches), rows)


def _read_catalog(base: Path, table: str) -> pa.Table:
    files = sorted(str(p) for p in (catalog_dir(base, table) / "dataset").rglob("Npix=*.parquet"))
    if not files:
        from diadb.ppdb.layout import SCHEMA_FILE
        from diadb.schema.felis import schema_from_yaml

        spec = schema_from_yaml((base / SCHEMA_FILE).read_text()).table(table)
        return spec.arrow_schema(with_healpix=False).empty_table()
    data = pds.dataset(files, format="parquet").to_table()
    return data.drop_columns([HEALPIX_COLUMN]) if HEALPIX_COLUMN in data.column_names else data


Batch = tuple[int, float, pa.Table, pa.Table, pa.Table]


def _plan_visits(objects: pa.Table, sources: pa.Table, forced: pa.Table) -> list[Batch]:
    """One batch per visit, in time order; each object goes with the first visit that refers to it."""
    visit_col = np.concatenate(
        [
            np.asarray(sources.column("visit").to_numpy(), np.int64),
            np.asarray(forced.column("visit").to_numpy(), np.int64),
        ]
    )
    time_col = np.concatenate(
        [
            np.asarray(sources.column("midpointMjdTai").to_numpy(), np.float64),
            np.asarray(forced.column("midpointMjdTai").to_numpy(), np.float64),
        ]
    )
    if not len(visit_col):
        if not objects.num_rows:
            return []
        mjd = float(np.max(objects.column("validityStartMjdTai").to_numpy()))
        return [(0, mjd, objects, sources, forced)]
    visits, inverse = np.unique(visit_col, return_inverse=True)
    vtime = np.full(len(visits), -np.inf)
    np.maximum.at(vtime, inverse, time_col)
    order = np.argsort(vtime, kind="stable")  # position of each visit in time order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    row_rank = rank[inverse]
    n_src = sources.num_rows
    # The first visit (in time order) referring to each object.
    obj_ids = np.asarray(objects.column("diaObjectId").to_numpy(), np.int64)
    ref_ids = np.concatenate(
        [
            np.asarray(sources.column("diaObjectId").fill_null(-1).to_numpy(), np.int64),
            np.asarray(forced.column("diaObjectId").to_numpy(), np.int64),
        ]
    )
    first = np.full(len(obj_ids), len(visits), dtype=np.int64)
    sorter = np.argsort(obj_ids)
    pos = np.searchsorted(obj_ids, ref_ids, sorter=sorter)
    pos = np.clip(pos, 0, max(len(obj_ids) - 1, 0))
    hit = (
        (len(obj_ids) > 0) & (obj_ids[sorter[pos]] == ref_ids)
        if len(obj_ids)
        else np.zeros(len(ref_ids), bool)
    )
    np.minimum.at(first, sorter[pos[hit]], row_rank[hit])
    unknown = np.setdiff1d(ref_ids[:n_src][ref_ids[:n_src] >= 0], obj_ids)
    if len(unknown):
        raise PublicationError(
            f"the export's DiaSources refer to {len(unknown)} DiaObject(s) it does not hold "
            f"(closed by daytime work?), e.g. {unknown[:5].tolist()}; such sources cannot be restored"
        )
    # Objects nobody refers to: the last visit at or before their validity start (else the first).
    lonely = first == len(visits)
    if lonely.any():
        start = np.asarray(objects.column("validityStartMjdTai").to_numpy(), np.float64)[lonely]
        sorted_times = vtime[order]
        first[lonely] = np.clip(np.searchsorted(sorted_times, start, side="right") - 1, 0, None)
    src_groups = _groups(row_rank[:n_src], len(visits))
    forced_groups = _groups(row_rank[n_src:], len(visits))
    obj_groups = _groups(first, len(visits))
    batches: list[Batch] = []
    for r in range(len(visits)):
        v = order[r]
        batches.append(
            (
                int(visits[v]),
                float(vtime[v]),
                objects.take(obj_groups[r]),
                sources.take(src_groups[r]),
                forced.take(forced_groups[r]),
            )
        )
    return batches


def _groups(keys: np.ndarray, n: int) -> list[pa.Array]:
    """Row positions for each key 0..n-1 (vectorised: one sort, then slices)."""
    idx = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[idx], np.arange(n + 1))
    return [pa.array(idx[bounds[i] : bounds[i + 1]]) for i in range(n)]


__all__ = ["RestoreResult", "restore_export"]
