"""Quality checks of an export's contents: what a Parquet schema cannot say (``diadb verify DIR``).

:mod:`diadb.ppdb.verify` checks that the files are the ones published and that their schemas,
nullability and row counts match the Felis schema. This module checks the rows themselves, one
narrow column scan per table (``pyarrow.dataset`` over the partition files, only the columns a
check needs), each check with how many rows (or objects) it examined and how many failed:

- ``object_exists``: every DiaSource's and DiaForcedSource's ``diaObjectId`` (when set) is a
  DiaObject of the export: its latest versions, their margin (a region extract), or an older
  version (the ``DiaObjectVersion`` catalog, where exported);
- ``n_dia_sources``: each DiaObject's ``nDiaSources`` equals the DiaSources that name it (full-sky
  exports only: a region extract holds only the sources inside the region);
- ``unique_ids``: primary keys unique across all partitions of a catalog;
- ``healpix_partition``: each row lies in the partition its ``_healpix_29`` names, and that
  ``_healpix_29`` is the pixel of the row's ``ra``/``dec``;
- ``ra_range``, ``dec_range``: ``0 <= ra < 360``, ``-90 <= dec <= 90``;
- ``light_curves`` (full-sky exports with ``DiaObjectLightCurve``): its objects are the
  DiaObject catalog's, each nested list holds exactly the rows of the flat catalog that name
  the object, sorted by ``midpointMjdTai``;
- ``time_window``: every time column (:func:`diadb.schema.domain.is_time_column`) inside diadb's
  window, ``[MJD_MIN, MJD_MAX]`` of :mod:`diadb.schema.domain`.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.ppdb import partition as part
from diadb.ppdb.layout import catalog_dir, margin_dir
from diadb.ppdb.nested import LIGHT_CURVES, NESTED
from diadb.schema.domain import MJD_MAX, MJD_MIN, is_time_column
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema
from diadb.sky.healpix import radec_to_healpix29

#: The checks, in report order, with what each one checks.
CHECKS = {
    "object_exists": "every source's diaObjectId is an exported DiaObject",
    "n_dia_sources": "each DiaObject's nDiaSources equals its DiaSources",
    "unique_ids": "primary keys unique across partitions",
    "healpix_partition": "rows in the partition their _healpix_29 names, _healpix_29 from ra/dec",
    "ra_range": "0 <= ra < 360",
    "dec_range": "-90 <= dec <= 90",
    "time_window": f"time columns in [{MJD_MIN:g}, {MJD_MAX:g}] MJD",
    "light_curves": "each light curve holds exactly its object's sources, sorted by time",
}
#: The primary key of each catalog (a DiaObject catalog holds one version per object).
KEYS = {
    "DiaObject": ("diaObjectId",),
    "DiaObjectVersion": ("diaObjectId", "validityStartMjdTai"),
    "DiaSource": ("diaSourceId",),
    "DiaForcedSource": ("diaObjectId", "visit", "detector"),
}
_EXAMPLES = 5
_NPIX = re.compile(r"Norder=(\d+)/Dir=\d+/Npix=(\d+)\.parquet$")


@dataclass
class Check:
    """One check's outcome: rows (or objects) examined, how many failed, a few examples."""

    name: str
    checked: int = 0
    failed: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, count: int, example: str) -> None:
        if count <= 0:
            return
        self.failed += count
        if len(self.examples) < _EXAMPLES:
            self.examples.append(example)

    def as_dict(self) -> dict[str, object]:
        return {"checked": self.checked, "failed": self.failed, "examples": list(self.examples)}


def partition_files(base: Path, table: str) -> list[tuple[part.Pixel, Path]]:
    """The partition files of ``table``'s main catalog with the pixel each one's path names."""
    out = []
    for path in sorted((catalog_dir(base, table) / "dataset").rglob("Npix=*.parquet")):
        m = _NPIX.search(path.as_posix())
        if m:
            out.append((part.Pixel(int(m.group(1)), int(m.group(2))), path))
    return out


def _read(files: Sequence[Path], columns: list[str]) -> pa.Table:
    import pyarrow.dataset as pds

    if not files:
        return pa.table({c: pa.array([], pa.int64()) for c in columns})
    return pds.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)


def content_checks(base: Path, felis: ApdbSchema, *, full_sky: bool) -> dict[str, Check]:
    """Run every check on the export version at ``base``; keyed by check name (:data:`CHECKS`)."""
    checks = {name: Check(name) for name in CHECKS}
    tables = [t for t in KEYS if t in felis.tables or t == "DiaObjectVersion"]
    tables = [t for t in tables if catalog_dir(base, t).is_dir()]
    for table in tables:
        spec = felis.table("DiaObject" if table == "DiaObjectVersion" else table)
        files = partition_files(base, table)
        _per_file(table, files, checks)
        times = [c.name for c in spec.columns if is_time_column(c)]
        rows = _read([f for _, f in files], list(dict.fromkeys([*KEYS[table], "ra", "dec", *times])))
        _unique(table, rows, checks["unique_ids"])
        _ranges(table, rows, checks)
        _times(table, rows, times, checks["time_window"])
    _references(base, tables, checks["object_exists"])
    if full_sky and {"DiaObject", "DiaSource"} <= set(tables):
        _counts(base, checks["n_dia_sources"])
    if full_sky and catalog_dir(base, LIGHT_CURVES).is_dir():
        _light_curves(base, checks["light_curves"])
    return checks


def _per_file(table: str, files: list[tuple[part.Pixel, Path]], checks: dict[str, Check]) -> None:
    import pyarrow.parquet as pq

    check = checks["healpix_partition"]
    for pixel, path in files:
        t = pq.read_table(path, columns=[HEALPIX_COLUMN, "ra", "dec"])
        hp = np.asarray(t.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        check.checked += len(hp)
        lo, hi = pixel.range29()
        outside = int(((hp < lo) | (hp >= hi)).sum())
        check.fail(outside, f"{table} {pixel.order}/{pixel.npix}: {outside} row(s) outside the partition")
        ra = np.asarray(t.column("ra").to_numpy(zero_copy_only=False), dtype=np.float64)
        dec = np.asarray(t.column("dec").to_numpy(zero_copy_only=False), dtype=np.float64)
        ok = np.isfinite(ra) & np.isfinite(dec) & (dec >= -90.0) & (dec <= 90.0)
        expected = np.full(len(hp), -1, dtype=np.int64)
        if ok.any():
            expected[ok] = radec_to_healpix29(np.mod(ra[ok], 360.0), dec[ok])
        wrong = int((expected != hp).sum())
        check.fail(
            wrong,
            f"{table} {pixel.order}/{pixel.npix}: {wrong} bad {HEALPIX_COLUMN} for ra, dec",
        )


def _unique(table: str, rows: pa.Table, check: Check) -> None:
    keys = list(KEYS[table])
    check.checked += rows.num_rows
    if not rows.num_rows:
        return
    grouped = rows.select(keys).group_by(keys).aggregate([([], "count_all")])
    dup = grouped.filter(pc.greater(grouped.column("count_all"), 1))
    if dup.num_rows:
        extra = int(pc.sum(dup.column("count_all")).as_py()) - dup.num_rows
        first = {k: dup.column(k)[0].as_py() for k in keys}
        check.fail(extra, f"{table}: {dup.num_rows} key(s) in more than one row, e.g. {first}")


def _ranges(table: str, rows: pa.Table, checks: dict[str, Check]) -> None:
    ra = np.asarray(rows.column("ra").to_numpy(zero_copy_only=False), dtype=np.float64)
    dec = np.asarray(rows.column("dec").to_numpy(zero_copy_only=False), dtype=np.float64)
    bad_ra = ~((ra >= 0.0) & (ra < 360.0))
    bad_dec = ~((dec >= -90.0) & (dec <= 90.0))
    for name, bad, values in (("ra_range", bad_ra, ra), ("dec_range", bad_dec, dec)):
        checks[name].checked += len(values)
        n = int(bad.sum())
        if n:
            checks[name].fail(n, f"{table}: {n} row(s), e.g. {name[:-6]} = {values[bad][0]!r}")


def _times(table: str, rows: pa.Table, times: list[str], check: Check) -> None:
    epoch = _dt.datetime(1858, 11, 17)
    lo_ts = epoch + _dt.timedelta(days=MJD_MIN)
    hi_ts = epoch + _dt.timedelta(days=MJD_MAX)
    for name in times:
        column = pc.drop_null(rows.column(name))
        check.checked += len(column)
        if not len(column):
            continue
        if pa.types.is_timestamp(column.type):
            lo, hi = pa.scalar(lo_ts, column.type), pa.scalar(hi_ts, column.type)
            bad_mask = pc.or_(pc.less(column, lo), pc.greater(column, hi))
        else:
            values = pc.cast(column, pa.float64())
            inside = pc.and_(pc.greater_equal(values, MJD_MIN), pc.less_equal(values, MJD_MAX))
            bad_mask = pc.invert(inside)  # NaN compares false: outside
        bad = pc.filter(column, bad_mask)
        if len(bad):
            check.fail(
                len(bad), f"{table}.{name}: {len(bad)} value(s) outside the window, e.g. {bad[0].as_py()!r}"
            )


def _ids(files: Sequence[Path]) -> np.ndarray:
    t = _read(files, ["diaObjectId"])
    return np.unique(np.asarray(pc.drop_null(t.column(0)).to_numpy(), dtype=np.int64))


def _references(base: Path, tables: list[str], check: Check) -> None:
    objects = [
        f for t in ("DiaObject", "DiaObjectVersion") if t in tables for _, f in partition_files(base, t)
    ]
    objects += sorted((margin_dir(base, "DiaObject") / "dataset").rglob("Npix=*.parquet"))
    known = _ids(objects)
    for table in ("DiaSource", "DiaForcedSource"):
        if table not in tables:
            continue
        ids = _read([f for _, f in partition_files(base, table)], ["diaObjectId"]).column(0)
        values = np.asarray(pc.drop_null(ids).to_numpy(), dtype=np.int64)
        check.checked += len(values)
        missing = ~np.isin(values, known)
        n = int(missing.sum())
        if n:
            check.fail(n, f"{table}: {n} row(s) name unknown DiaObjects, e.g. {int(values[missing][0])}")


def _counts(base: Path, check: Check) -> None:
    objects = _read([f for _, f in partition_files(base, "DiaObject")], ["diaObjectId", "nDiaSources"])
    sources = _read([f for _, f in partition_files(base, "DiaSource")], ["diaObjectId"])
    check.checked += objects.num_rows
    if not objects.num_rows:
        return
    src = np.asarray(pc.drop_null(sources.column(0)).to_numpy(), dtype=np.int64)
    uniq, n = np.unique(src, return_counts=True)
    ids = np.asarray(objects.column("diaObjectId").to_numpy(), dtype=np.int64)
    stated = np.asarray(pc.fill_null(objects.column("nDiaSources"), -1).to_numpy(), dtype=np.int64)
    found = np.zeros(len(ids), dtype=np.int64)
    if len(uniq):
        at = np.clip(np.searchsorted(uniq, ids), 0, len(uniq) - 1)
        hit = uniq[at] == ids
        found[hit] = n[at[hit]]
    wrong = stated != found
    k = int(wrong.sum())
    if k:
        i = int(np.flatnonzero(wrong)[0])
        check.fail(
            k,
            f"DiaObject: {k} object(s) whose nDiaSources is not their sources' count, e.g. "
            f"{int(ids[i])}: nDiaSources {int(stated[i])}, {int(found[i])} DiaSource(s)",
        )


def _light_curves(base: Path, check: Check) -> None:
    files = [f for _, f in partition_files(base, LIGHT_CURVES)]
    lc = _read(files, ["diaObjectId", *NESTED])
    ids = np.asarray(lc.column("diaObjectId").to_numpy(), dtype=np.int64)
    objects = np.sort(_ids([f for _, f in partition_files(base, "DiaObject")]))
    check.checked += len(ids)
    if not np.array_equal(np.sort(ids), objects):
        n = len(np.setxor1d(ids, objects)) or 1
        check.fail(n, f"{LIGHT_CURVES}: {n} object(s) not the DiaObject catalog's")
    for column, (table, _) in NESTED.items():
        nested = lc.column(column).combine_chunks()
        inner = pc.list_flatten(nested)
        owner = ids[np.asarray(pc.list_parent_indices(nested).to_numpy(), dtype=np.int64)]
        named = np.asarray(inner.field("diaObjectId").to_numpy(zero_copy_only=False), dtype=np.int64)
        t = np.asarray(inner.field("midpointMjdTai").to_numpy(zero_copy_only=False), dtype=np.float64)
        same = owner[1:] == owner[:-1]
        unsorted = int((t[1:][same] < t[:-1][same]).sum())
        check.fail(unsorted, f"{LIGHT_CURVES}.{column}: {unsorted} row(s) out of time order")
        wrong = int((named != owner).sum())
        check.fail(wrong, f"{LIGHT_CURVES}.{column}: {wrong} row(s) of another object")
        flat = _read([f for _, f in partition_files(base, table)], ["diaObjectId"]).column(0)
        flat_ids = np.asarray(pc.drop_null(flat).to_numpy(), dtype=np.int64)
        flat_ids = flat_ids[np.isin(flat_ids, ids)]
        n = _count_mismatch(owner, flat_ids)
        check.fail(n, f"{LIGHT_CURVES}.{column}: {n} object(s) whose light curve is not their {table} rows")


def _count_mismatch(a: np.ndarray, b: np.ndarray) -> int:
    """How many ids occur a different number of times in ``a`` and in ``b``."""
    ua, ca = np.unique(a, return_counts=True)
    ub, cb = np.unique(b, return_counts=True)
    every = np.union1d(ua, ub)
    na = np.zeros(len(every), dtype=np.int64)
    nb = np.zeros(len(every), dtype=np.int64)
    na[np.searchsorted(every, ua)] = ca
    nb[np.searchsorted(every, ub)] = cb
    return int((na != nb).sum())


__all__ = ["CHECKS", "Check", "content_checks", "partition_files"]
