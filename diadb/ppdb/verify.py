"""Check a published export against its manifest and its Felis schema (``diadb verify DIR``).

Checks, per table: every file listed in the manifest exists with its size and checksum, and no
unlisted data file is present; the HATS metadata loads; the ``_common_metadata`` schema and every
partition file's schema match the Felis table (names, order, types, nullability, unit/UCD/description);
non-nullable columns hold no nulls (from the Parquet statistics); each file's ``_healpix_29`` lies
inside its pixel and is sorted; row counts agree between the files, ``_metadata``,
``hats.properties`` and the manifest. Then the rows themselves (:mod:`diadb.ppdb.qc`): references,
counts, unique keys, partitions and physical ranges, each with its counts in the report (text, or
JSON from :meth:`VerifyReport.to_json`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diadb.errors import Error
from diadb.ppdb import partition as part
from diadb.ppdb.layout import (
    MANIFEST,
    SCHEMA_FILE,
    TABLES,
    Manifest,
    PublicationError,
    catalog_dir,
    checksum,
    current_version,
    index_dir,
    margin_dir,
)
from diadb.ppdb.qc import CHECKS, Check, content_checks
from diadb.schema.felis import schema_from_yaml
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_export`: what was checked, and one line per problem."""

    root: Path
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    #: The content checks (:mod:`diadb.ppdb.qc`) by name, with their counts.
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: ``ok``, ``rows``, ``files_checked``, ``checks``
        (name -> checked, failed, examples) and ``problems``."""
        return {
            "root": str(self.root),
            "ok": self.ok,
            "files_checked": self.files_checked,
            "rows": dict(self.rows),
            "checks": {name: c.as_dict() for name, c in self.checks.items()},
            "problems": list(self.problems),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    def lines(self) -> list[str]:
        head = [f"{t}: {n:,} rows" for t, n in self.rows.items()]
        head += [
            f"check {c.name:18s} {c.checked:>12,d} checked {c.failed:>8,d} failed  ({CHECKS[c.name]})"
            for c in self.checks.values()
        ]
        if self.ok:
            return [*head, f"ok: {self.files_checked} file(s) verified in {self.root}"]
        return [
            *head,
            *(f"BAD {p}" for p in self.problems),
            f"{len(self.problems)} problem(s) in {self.root}",
        ]


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory (so an export, or a damaged or foreign one: not a database)."""
    return Path(path).is_dir()


def load_export(root: Path) -> tuple[Manifest, ApdbSchema]:
    """The manifest and Felis schema of an export; a one-line :class:`PublicationError` if absent."""
    manifest = Manifest.read(root)
    yaml_path = root / SCHEMA_FILE
    if not yaml_path.is_file():
        raise PublicationError(f"{root} is damaged: {SCHEMA_FILE} is missing")
    try:
        schema = schema_from_yaml(yaml_path.read_text(), origin=str(yaml_path))
    except Error as e:
        raise PublicationError(f"{yaml_path} is damaged: {e}") from None
    return manifest, schema


def verify_export(root: str | Path, *, schema: ApdbSchema | None = None) -> VerifyReport:
    """Verify the export at ``root`` (against ``schema``, default: the Felis schema it carries)."""
    top = Path(root)
    Manifest.read(top)  # a one-line error for a directory that is not an export
    # One version throughout, even if an update publishes the next one meanwhile.
    base = current_version(top)
    manifest, own = load_export(base)
    felis = schema or own
    report = VerifyReport(top)
    bad = report.problems
    # 1. Every listed file: present, same size, same checksum.
    for rel, entry in sorted(manifest.files.items()):
        path = base / rel
        report.files_checked += 1
        try:
            if not path.is_file():
                bad.append(f"{rel}: missing")
            elif path.stat().st_size != entry.get("bytes"):
                bad.append(f"{rel}: {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
            elif checksum(path) != entry.get("blake2b"):
                bad.append(f"{rel}: checksum mismatch (the file changed after the export)")
        except OSError as e:  # unreadable (permissions, I/O error)
            bad.append(f"{rel}: unreadable: {e.strerror or e}")
    extra = [t for t in manifest.tables if t not in TABLES]
    for table in (*TABLES, *extra):
        for directory in (catalog_dir(base, table), margin_dir(base, table), index_dir(base, table)):
            for p in directory.rglob("*.parquet") if directory.is_dir() else []:
                if str(p.relative_to(base)) not in manifest.files:
                    bad.append(f"{p.relative_to(base)}: not in the manifest")
    # 2. Per table: schema, partitions, rows.
    for table in TABLES:
        if table not in manifest.tables:
            bad.append(f"{table}: not in the manifest")
            continue
        try:
            _verify_table(base, table, manifest, felis, report)
        except (KeyError, TypeError, ValueError, Error) as e:
            # A manifest entry of the wrong shape (hand-edited or foreign): a problem, not a crash.
            bad.append(f"{table}: the manifest's entry is malformed ({type(e).__name__}: {e})")
    for name in extra:
        _verify_extra(base, name, manifest, report)
    # 3. The rows: what the schema cannot say.
    try:
        report.checks = content_checks(base, felis, full_sky=manifest.region is None)
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        bad.append(f"content checks: the files do not read: {' '.join(str(e).split())[:200]}")
    for c in report.checks.values():
        bad += [f"check {c.name}: {x}" for x in c.examples]
        if c.failed > len(c.examples):
            bad.append(f"check {c.name}: {c.failed} failure(s) in all")
    return report


def _verify_table(
    base: Path, table: str, manifest: Manifest, felis: ApdbSchema, report: VerifyReport
) -> None:
    bad = report.problems
    info = manifest.tables[table]
    if table not in felis.tables:
        bad.append(f"{table}: not a table of the Felis schema {felis.name} {felis.version}")
        return
    expected = felis.table(table).arrow_schema()
    main = catalog_dir(base, table)
    try:
        from hats.catalog.healpix_dataset.healpix_dataset import HealpixDataset
        from hats.loaders.read_hats import read_hats

        with warnings.catch_warnings():
            # Without partition_info.csv hats falls back to the files and warns: reported below.
            warnings.simplefilter("ignore")
            catalog = read_hats(main)
        if not isinstance(catalog, HealpixDataset):
            raise ValueError(f"{main} is not a HEALPix catalog")
        pixels = [part.Pixel(int(p.order), int(p.pixel)) for p in catalog.get_healpix_pixels()]
        total = int(catalog.catalog_info.total_rows or 0)
        common = pq.read_schema(main / "dataset" / "_common_metadata")
    except (OSError, ValueError, TypeError, KeyError, pa.ArrowException) as e:
        bad.append(f"{table}: the HATS catalog does not load: {' '.join(str(e).split())[:200]}")
        return
    bad += [f"{table} _common_metadata: {p}" for p in _schema_problems(common, expected)]
    listed = sorted(part.Pixel(int(o), int(n)) for o, n in info.get("pixels", []))
    if sorted(pixels) != listed:
        bad.append(
            f"{table}: partition_info.csv lists {len(pixels)} partition(s), the manifest {len(listed)}"
        )
    rows = 0
    for pixel in pixels:
        path = main / "dataset" / pixel.relative_path()
        rel = path.relative_to(base)
        if not path.is_file():
            bad.append(f"{rel}: missing")
            continue
        try:
            meta = pq.ParquetFile(path).metadata
            file_schema = meta.schema.to_arrow_schema()
            bad += [f"{rel}: {p}" for p in _schema_problems(file_schema, expected)]
            bad += [f"{rel}: {p}" for p in _null_problems(meta, expected)]
            hp = pq.read_table(path, columns=[HEALPIX_COLUMN]).column(0).to_numpy()
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            bad.append(f"{rel}: unreadable: {' '.join(str(e).split())[:200]}")
            continue
        rows += meta.num_rows
        lo, hi = pixel.range29()
        if len(hp) and (hp.min() < lo or hp.max() >= hi):
            outside = int(((hp < lo) | (hp >= hi)).sum())
            bad.append(f"{rel}: {outside} row(s) outside pixel {pixel.order}/{pixel.npix}")
        if len(hp) > 1 and bool(np.any(hp[1:] < hp[:-1])):
            bad.append(f"{rel}: rows are not sorted by {HEALPIX_COLUMN}")
    report.rows[table] = rows
    for what, value in (("hats.properties", total), ("the manifest", int(info.get("rows", -1)))):
        if value != rows:
            bad.append(f"{table}: {rows} rows in the files, {value} in {what}")
    for label, directory, key in (
        ("margin", margin_dir(base, table), "margin_rows"),
        ("index", index_dir(base, table), "index_rows"),
    ):
        try:
            n = pq.ParquetFile(directory / "dataset" / "_metadata").metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            bad.append(f"{table} {label} catalog: unreadable _metadata: {' '.join(str(e).split())[:200]}")
            continue
        if n != int(info.get(key, -1)):
            bad.append(f"{table} {label} catalog: {n} rows, the manifest says {info.get(key)}")


def _verify_extra(base: Path, name: str, manifest: Manifest, report: VerifyReport) -> None:
    """A catalog beside the tables' (light curves, versions): it loads, and its rows agree."""
    from hats.catalog.healpix_dataset.healpix_dataset import HealpixDataset
    from hats.loaders.read_hats import read_hats

    bad = report.problems
    main = catalog_dir(base, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            catalog = read_hats(main)
        if not isinstance(catalog, HealpixDataset):
            raise ValueError(f"{main} is not a HEALPix catalog")
        total = int(catalog.catalog_info.total_rows or 0)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (main / "dataset").rglob("Npix=*.parquet"))
    except (OSError, ValueError, TypeError, KeyError, pa.ArrowException) as e:
        bad.append(f"{name}: the HATS catalog does not load: {' '.join(str(e).split())[:200]}")
        return
    report.rows[name] = rows
    for what, value in (
        ("hats.properties", total),
        ("the manifest", int(manifest.tables[name].get("rows", -1))),
    ):
        if value != rows:
            bad.append(f"{name}: {rows} rows in the files, {value} in {what}")


def _schema_problems(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    problems: list[str] = []
    if actual.names != expected.names:
        missing = [n for n in expected.names if n not in actual.names]
        extra = [n for n in actual.names if n not in expected.names]
        if missing or extra:
            return [f"columns differ from the Felis schema: missing {missing[:10]}, extra {extra[:10]}"]
        return ["columns are not in the Felis schema's order"]
    for want in expected:
        have = actual.field(want.name)
        if have.type != want.type:
            problems.append(f"column {want.name}: type {have.type}, Felis says {want.type}")
        if have.nullable != want.nullable:
            problems.append(
                f"column {want.name}: {'nullable' if have.nullable else 'not nullable'}, Felis says "
                f"{'nullable' if want.nullable else 'not nullable'}"
            )
        for key in (b"unit", b"ucd", b"description"):
            a = (have.metadata or {}).get(key)
            b = (want.metadata or {}).get(key)
            if a != b:
                problems.append(f"column {want.name}: {key.decode()} {a!r}, Felis says {b!r}")
    return problems


def _null_problems(meta: pq.FileMetaData, expected: pa.Schema) -> list[str]:
    problems = []
    names = meta.schema.names
    for want in expected:
        if want.nullable or want.name not in names:
            continue
        col = names.index(want.name)
        nulls = 0
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(col).statistics
            if stats is None or not stats.has_null_count:
                problems.append(f"column {want.name}: no null-count statistics to check")
                break
            nulls += stats.null_count
        if nulls:
            problems.append(f"column {want.name}: {nulls} null(s) in a non-nullable column")
    return problems


__all__ = ["MANIFEST", "VerifyReport", "is_export", "load_export", "verify_export"]
