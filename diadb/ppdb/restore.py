"""Rebuild an APDB from a PPDB export (``diadb restore DIR URL``): disaster recovery.

The export is verified first (checksums, schema, counts); a damaged or foreign directory is a
one-line :class:`PublicationError` and nothing is written. The new database gets the export's
Felis schema and the source database's config, then one ``store`` per visit, in time order:
the visit's DiaSources and DiaForcedSources, and the DiaObjects its rows refer to for the first
time (objects no row refers to go with the last visit at or before their validity start).

The export is partitioned by sky position, the stores go by time, so restore streams in three
passes and never holds the export in memory:

1. *Plan* (narrow columns, one partition file at a time): each visit's time and row counts, and
   each DiaObject's first referring visit. Memory: a few int64 per visit and per DiaObject.
2. *Shuffle* (a slice of one partition file at a time): the rows are cut by time batch (runs of
   consecutive whole visits holding about ``batch_bytes`` of rows) and appended to one scratch
   Arrow file (lz4) per table and batch, beside the target.
3. *Store*: the target is created only now, when every row of the export has been read; each
   batch is read back and stored visit by visit. Memory: one batch and one visit's copy.

All or nothing: a damaged export fails verification or one of the first two passes, before the
target exists. Should a store fail later (full disk, a server error), the new SQLite database is
removed; a server database is named in the error, to be dropped by hand. The scratch files are
always removed.

What an export cannot give back: older DiaObject versions (only the latest is published; each
restored object has one version, with its original ``validityStartMjdTai``), DiaObjects closed
by daytime work (not published, so DiaSources still naming them cannot be restored), history
already pruned from the APDB before the export, and the exact visit/detector registry (each
visit is restored as one whole-visit store whose time is its latest source time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diadb.config import ApdbConfig
from diadb.errors import Error
from diadb.metrics import timed
from diadb.ppdb.layout import TABLES, PublicationError, catalog_dir
from diadb.ppdb.verify import load_export, verify_export
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema

Int64Array = npt.NDArray[np.int64]

#: Rows held in memory while storing: about this many bytes of Arrow data per time batch.
DEFAULT_BATCH_BYTES = 64 * 2**20

_SOURCE_TABLES = ("DiaSource", "DiaForcedSource")


@dataclass
class RestoreResult:
    url: str
    visits: int
    rows: dict[str, int]
    batches: int = 0


def _restored_rows(args: Mapping[str, Any], result: RestoreResult) -> int:
    return sum(result.rows.values())


@timed("restore", rows=_restored_rows)
def restore_export(
    root: str | Path,
    url: str | Path,
    *,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    scratch: str | Path | None = None,
    **config: Any,
) -> RestoreResult:
    """Create a new APDB at ``url`` holding every row of the export at ``root``.

    ``config`` overrides fields of the exported :class:`ApdbConfig` (e.g. ``history_tier``).
    ``batch_bytes`` bounds the rows held in memory at once; ``scratch`` is where the time-sorted
    scratch files go (default: beside a SQLite target, else the system's temporary directory).
    """
    from diadb.apdb import Apdb
    from diadb.backends import locate

    base = Path(root)
    url = str(url)
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
    # A new SQLite database is a few files (and the directories above it that do not exist yet):
    # what does not exist now is removed on failure.
    owned: list[Path] = []
    paths = list(locate(url).files)
    if paths:
        if paths[0].exists():
            raise PublicationError(f"{paths[0]} already exists; restore makes a new database")
        missing = [d for d in paths[0].parents if not d.exists()]
        owned = [p for p in paths if not p.exists()] + missing[-1:]
    settings: dict[str, Any] = {}
    if manifest.apdb_config:
        try:
            settings = dataclasses.asdict(ApdbConfig.from_json(manifest.apdb_config))
        except (Error, ValueError, TypeError):
            settings = {}
    settings.update(config)
    files = {t: _partition_files(base, t) for t in TABLES}
    # Scratch beside a SQLite target (same file system, sized like the database), else the
    # system's temporary directory; nothing is created before the export has been read.
    where = Path(scratch) if scratch is not None else (owned[0].parent if owned else None)
    if where is not None and not where.is_dir():
        if scratch is None:
            where = None
        else:
            where.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="diadb-restore-", dir=where) as tmp:
        # Passes 1 and 2 read every row of the export: a damaged file fails here, before the
        # target exists.
        plan = _plan(files, batch_bytes)
        spill = _shuffle(files, plan, Path(tmp))
        try:
            with Apdb.create(url, schema=schema, **settings) as db:
                for batch in range(plan.n_batches):
                    for visit, mjd, objects, sources, forced in _visits_of(spill, plan, batch, schema):
                        db.store(mjd, objects, sources, forced, visit=visit)
        except BaseException as e:
            if owned:
                _remove(owned)
            if not isinstance(e, Error | OSError | pa.ArrowException):
                raise
            if owned:
                raise PublicationError(f"restore into {url} failed, nothing kept: {e}") from None
            raise PublicationError(
                f"restore into {url} failed part way: {e}; drop that database before trying again"
            ) from None
    return RestoreResult(url, plan.n_visits, plan.rows, plan.n_batches)


# ---- the plan: visit times, object placement, time batches ----------------------------
@dataclass
class _Plan:
    """Where every row goes: visits by time rank, objects by their first visit, ranks by batch."""

    visits: Int64Array  # visit ids, sorted (np.unique order)
    rank_of_visit: Int64Array  # time rank of visits[i]
    visit_by_rank: Int64Array  # visit id at each time rank
    time_by_rank: npt.NDArray[np.float64]  # visit time at each time rank
    object_ids: Int64Array  # every exported DiaObject id, sorted
    object_rank: Int64Array  # time rank of the visit each object is stored with
    batch_of_rank: Int64Array
    n_batches: int
    rows: dict[str, int]

    @property
    def n_visits(self) -> int:
        return len(self.visit_by_rank)

    def source_ranks(self, visit: Int64Array) -> Int64Array:
        result: Int64Array = self.rank_of_visit[np.searchsorted(self.visits, visit)]
        return result

    def object_ranks(self, ids: Int64Array) -> Int64Array:
        result: Int64Array = self.object_rank[np.searchsorted(self.object_ids, ids)]
        return result


def _partition_files(base: Path, table: str) -> list[Path]:
    return sorted((catalog_dir(base, table) / "dataset").rglob("Npix=*.parquet"))


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One partition file; an unreadable one is a one-line error (the export changed after verify)."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: BaseException) -> PublicationError:
    return PublicationError(f"{path} is unreadable: {' '.join(str(e).split())[:200]}")


def _np(column: pa.ChunkedArray, dtype: Any) -> Any:
    return np.asarray(column.to_numpy(), dtype=dtype)


def _mean_width(paths: list[Path]) -> float:
    """Bytes per row of these files once in Arrow: fixed-width columns at their width (Parquet's
    encodings make them far smaller on disk), the others at their uncompressed Parquet size."""
    nbytes = rows = 0.0
    for path in paths:
        f = pq.ParquetFile(path)
        meta, schema = f.metadata, f.schema_arrow
        rows += meta.num_rows
        for c in range(meta.num_columns):
            name = meta.schema.column(c).path.split(".")[0]
            width = _bit_width(schema.field(name).type) if name in schema.names else 0
            if width > 0:
                nbytes += (width / 8 + 1 / 8) * meta.num_rows  # values and validity bits
            else:
                nbytes += sum(
                    meta.row_group(g).column(c).total_uncompressed_size for g in range(meta.num_row_groups)
                )
    return nbytes / max(rows, 1)


def _bit_width(t: pa.DataType) -> int:
    try:
        return int(t.bit_width)
    except ValueError:  # strings, binary: no fixed width
        return 0


def _plan(files: dict[str, list[Path]], batch_bytes: int) -> _Plan:
    """Pass 1: narrow columns only, one file at a time."""
    rows = dict.fromkeys(TABLES, 0)
    width = {t: _mean_width(files[t]) for t in TABLES}
    # Per visit: latest time and bytes of rows; a group-by per file, then one over those.
    summaries: list[pa.Table] = []
    for table in _SOURCE_TABLES:
        for path in files[table]:
            t = _read(path, ["visit", "midpointMjdTai"])
            rows[table] += t.num_rows
            s = t.group_by("visit").aggregate([("midpointMjdTai", "max"), ("visit", "count")])
            nbytes = pc.multiply(s.column("visit_count").cast(pa.float64()), width[table])
            summaries.append(pa.table({"visit": s["visit"], "t": s["midpointMjdTai_max"], "b": nbytes}))
    # DiaObjects: ids and validity starts, sorted by id (one int64 and one float64 per object).
    ids_parts: list[Int64Array] = [np.zeros(0, np.int64)]
    start_parts: list[npt.NDArray[np.float64]] = [np.zeros(0, np.float64)]
    for path in files["DiaObject"]:
        t = _read(path, ["diaObjectId", "validityStartMjdTai"])
        ids_parts.append(_np(t.column("diaObjectId"), np.int64))
        start_parts.append(_np(t.column("validityStartMjdTai"), np.float64))
    object_ids, starts = np.concatenate(ids_parts), np.concatenate(start_parts)
    del ids_parts, start_parts
    rows["DiaObject"] = len(object_ids)
    sorter = np.argsort(object_ids, kind="stable")
    object_ids, starts = object_ids[sorter], starts[sorter]
    if len(object_ids) > 1 and bool(np.any(object_ids[1:] == object_ids[:-1])):
        raise PublicationError("the export holds a DiaObject id twice; it is not a diadb export")
    if not summaries:
        # No source rows: all objects in one store at the latest validity start.
        n = 1 if len(object_ids) else 0
        mjd = float(starts.max()) if n else 0.0
        zeros = np.zeros(n, np.int64)
        return _Plan(
            visits=zeros,
            rank_of_visit=zeros,
            visit_by_rank=zeros,
            time_by_rank=np.full(n, mjd),
            object_ids=object_ids,
            object_rank=np.zeros(len(object_ids), np.int64),
            batch_of_rank=zeros,
            n_batches=n,
            rows=rows,
        )
    per_visit = (
        pa.concat_tables(summaries).group_by("visit").aggregate([("t", "max"), ("b", "sum")]).sort_by("visit")
    )
    visits = _np(per_visit.column("visit"), np.int64)
    vtime = _np(per_visit.column("t_max"), np.float64)
    vbytes = _np(per_visit.column("b_sum"), np.float64)
    order = np.argsort(vtime, kind="stable")  # the visit at each time rank
    rank_of_visit = np.empty(len(visits), np.int64)
    rank_of_visit[order] = np.arange(len(visits))
    # Each object goes with the first visit (in time) whose rows refer to it.
    first = np.full(len(object_ids), len(visits), dtype=np.int64)
    unknown: list[Int64Array] = []
    for table in _SOURCE_TABLES:
        for path in files[table]:
            t = _read(path, ["visit", "diaObjectId"])
            ref = _np(t.column("diaObjectId").fill_null(-1), np.int64)
            rank = rank_of_visit[np.searchsorted(visits, _np(t.column("visit"), np.int64))]
            pos = np.clip(np.searchsorted(object_ids, ref), 0, max(len(object_ids) - 1, 0))
            hit = object_ids[pos] == ref if len(object_ids) else np.zeros(len(ref), bool)
            np.minimum.at(first, pos[hit], rank[hit])
            if table == "DiaSource":
                unknown.append(np.unique(ref[~hit & (ref >= 0)]))
    missing = np.unique(np.concatenate(unknown)) if unknown else np.zeros(0, np.int64)
    if len(missing):
        raise PublicationError(
            f"the export's DiaSources refer to {len(missing)} DiaObject(s) it does not hold "
            f"(closed by daytime work?), e.g. {missing[:5].tolist()}; such sources cannot be restored"
        )
    # Objects nobody refers to: the last visit at or before their validity start (else the first).
    lonely = first == len(visits)
    if lonely.any():
        first[lonely] = np.clip(np.searchsorted(vtime[order], starts[lonely], side="right") - 1, 0, None)
    # Time batches: runs of consecutive ranks holding about batch_bytes (at least one visit each).
    size = vbytes[order] + np.bincount(first, minlength=len(visits)) * width["DiaObject"]
    before = np.cumsum(size) - size
    # Dense numbering: a visit larger than batch_bytes would otherwise skip numbers.
    _, batch_of_rank = np.unique((before // max(batch_bytes, 1)).astype(np.int64), return_inverse=True)
    batch_of_rank = np.asarray(batch_of_rank, np.int64).reshape(-1)
    return _Plan(
        visits=visits,
        rank_of_visit=rank_of_visit,
        visit_by_rank=visits[order],
        time_by_rank=vtime[order],
        object_ids=object_ids,
        object_rank=first,
        batch_of_rank=batch_of_rank,
        n_batches=int(batch_of_rank.max()) + 1,
        rows=rows,
    )


def _ranks(plan: _Plan, table: str, data: pa.Table) -> Int64Array:
    if table == "DiaObject":
        return plan.object_ranks(_np(data.column("diaObjectId"), np.int64))
    return plan.source_ranks(_np(data.column("visit"), np.int64))


# ---- the shuffle: partition files -> time-batch scratch files ----------------------------
_SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def _spill_path(tmp: Path, table: str, batch: int) -> Path:
    return tmp / f"{table}-{batch:06d}.arrow"


#: Rows read from a partition file at a time while shuffling.
_READ_ROWS = 65_536


def _shuffle(files: dict[str, list[Path]], plan: _Plan, tmp: Path) -> Path:
    """Pass 2: each partition file's rows, a slice at a time, sorted by time rank and appended to
    their batches' files."""
    for table in TABLES:
        writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        schema: pa.Schema | None = None
        try:
            for path in files[table]:
                for data in _slices(path):
                    # Verified files share one schema up to metadata: the first's is the spill's.
                    schema = data.schema if schema is None else schema
                    rank = _ranks(plan, table, data)
                    order = np.argsort(rank, kind="stable")
                    batch = plan.batch_of_rank[rank[order]]
                    data = data.take(pa.array(order)).cast(schema)
                    cuts = np.flatnonzero(np.r_[True, batch[1:] != batch[:-1], True])
                    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
                        b = int(batch[lo])
                        if b not in writers:
                            writers[b] = pa.ipc.new_file(
                                str(_spill_path(tmp, table, b)), schema, options=_SPILL_OPTIONS
                            )
                        writers[b].write_table(data.slice(lo, hi - lo))
        finally:
            for w in writers.values():
                w.close()
    return tmp


def _slices(path: Path) -> Iterator[pa.Table]:
    """A partition file's rows without ``_healpix_29``, ``_READ_ROWS`` at a time."""
    try:
        f = pq.ParquetFile(path)
        columns = [n for n in f.schema_arrow.names if n != HEALPIX_COLUMN]
        for batch in f.iter_batches(batch_size=_READ_ROWS, columns=columns):
            yield pa.Table.from_batches([batch])
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None


def _visits_of(tmp: Path, plan: _Plan, batch: int, schema: ApdbSchema) -> Iterator[Batch]:
    """Pass 3: one batch read back, one store's rows per visit, in time order."""
    ranks = np.flatnonzero(plan.batch_of_rank == batch)
    parts: dict[str, pa.Table] = {}
    orders: dict[str, Int64Array] = {}
    cuts: dict[str, Int64Array] = {}
    for table in TABLES:
        path = _spill_path(tmp, table, batch)
        if path.exists():
            with pa.memory_map(str(path)) as source:
                data = pa.ipc.open_file(source).read_all()
        else:
            data = schema.table(table).arrow_schema(with_healpix=False).empty_table()
        rank = _ranks(plan, table, data)
        order = np.argsort(rank, kind="stable")
        # Rows are taken visit by visit below: one copy of a visit, not of the whole batch.
        parts[table], orders[table] = data, order
        cuts[table] = np.asarray(np.searchsorted(rank[order], np.r_[ranks, ranks[-1] + 1]), np.int64)
    for i, r in enumerate(ranks.tolist()):
        objects, sources, forced = (
            parts[t].take(pa.array(orders[t][cuts[t][i] : cuts[t][i + 1]])) for t in TABLES
        )
        yield int(plan.visit_by_rank[r]), float(plan.time_by_rank[r]), objects, sources, forced


Batch = tuple[int, float, pa.Table, pa.Table, pa.Table]


# ---- the target -----------------------------------------------------------------------------
def _remove(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


__all__ = ["DEFAULT_BATCH_BYTES", "RestoreResult", "restore_export"]
