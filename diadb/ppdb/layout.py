"""The on-disk layout of a diadb PPDB export, its manifest and checksums.

An export is a series of immutable versions and one pointer::

    DIR/
      current -> versions/v000003  the published version (a symlink, swapped atomically)
      versions/v000002/            the one before (kept for readers that opened it)
      diadb_export.json, felis_schema.yaml, DiaObject, ... -> current/<name>
                                   the entry points, through ``current``

An update (:func:`stage`) builds the next version beside the published one: partition files
are hard-linked from it (every Parquet file is written to a temporary name and renamed, so a
rewrite replaces the link, never the shared file), the small metadata files are copied. Only
when the new version is complete does :func:`publish` swap ``current`` (``rename`` of a new
symlink over it); a failure before that leaves the published version as it was, and the next
update removes the unfinished one. Inside a version::

    vNNNNNN/
      diadb_export.json            the manifest: provenance, tables, rows, a checksum per file
      felis_schema.yaml            the Felis schema of the APDB, verbatim
      DiaObject/                   a HATS collection (collection.properties)
        DiaObject/                 the object catalog (latest versions): hats.properties,
                                   partition_info.csv, skymap.fits, dataset/_metadata,
                                   dataset/_common_metadata, dataset/Norder=k/Dir=d/Npix=n.parquet
        DiaObject_margin/          its margin catalog (rows near each partition's edge)
        DiaObject_diaObjectId/     its index catalog: diaObjectId -> Norder, Npix
      DiaSource/ ...               the same for DiaSource and DiaForcedSource
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diadb.errors import Error

MANIFEST = "diadb_export.json"
SCHEMA_FILE = "felis_schema.yaml"
FORMAT = "diadb-ppdb-hats"
FORMAT_VERSION = 2
CURRENT = "current"
VERSIONS = "versions"
#: Files a rewrite always replaces by renaming (safe to share between versions as hard links).
_LINKED = ("Npix=", "part_")
TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")
INDEX_COLUMN = "diaObjectId"


class PublicationError(Error):
    """A PPDB export directory is missing, foreign, damaged, or cannot be written."""


def is_versioned(root: Path) -> bool:
    """Whether ``root`` is an export of versions and a ``current`` pointer (format 2)."""
    return (root / CURRENT).is_symlink()


def current_version(root: Path) -> Path:
    """The directory of the published version (``root`` itself for a format-1 export)."""
    return (root / CURRENT).resolve() if is_versioned(root) else root


def _version_dirs(root: Path) -> list[Path]:
    base = root / VERSIONS
    return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("v")) if base.is_dir() else []


def stage(root: Path) -> Path:
    """A new version directory holding a copy of the published one (partition files hard-linked).

    Unfinished versions left by a failed update are removed first."""
    import shutil

    published = current_version(root)
    for old in _version_dirs(root):
        if old.name > published.name:
            shutil.rmtree(old)
    number = int(published.name[1:]) + 1 if published != root else 1
    new = root / VERSIONS / f"v{number:06d}"
    for src in sorted(published.rglob("*")):
        if src.is_symlink() or not src.is_file():
            continue
        dst = new / src.relative_to(published)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.name.startswith(_LINKED) and src.suffix == ".parquet":
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    new.mkdir(parents=True, exist_ok=True)
    return new


def first_version(root: Path) -> Path:
    """The directory of the first version of a new export at ``root``."""
    new = root / VERSIONS / "v000001"
    new.mkdir(parents=True)
    return new


def publish(root: Path, version: Path) -> None:
    """Make ``version`` the published one: fsync it, swap ``current`` atomically, link the entry
    points, and remove every version older than the one it replaces."""
    import shutil

    for path in sorted(version.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(version)
    previous = current_version(root) if is_versioned(root) else None
    for entry in version.iterdir():
        link = root / entry.name
        if not link.is_symlink():
            link.symlink_to(Path(CURRENT) / entry.name)
    tmp = root / (CURRENT + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version.relative_to(root))
    tmp.replace(root / CURRENT)
    _fsync(root)
    for old in _version_dirs(root):
        if old.name < version.name and (previous is None or old.name < previous.name):
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def catalog_dir(root: Path, table: str) -> Path:
    return root / table / table


def margin_dir(root: Path, table: str) -> Path:
    return root / table / f"{table}_margin"


def index_dir(root: Path, table: str) -> Path:
    return root / table / f"{table}_{INDEX_COLUMN}"


def checksum(path: Path) -> str:
    """blake2b (128-bit) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """What an export holds. ``files`` maps each path (relative to the export) to its size and checksum."""

    source_url: str
    schema_name: str
    schema_version: str
    region: str | None
    created_at: str
    max_rows: int
    margin_arcsec: float
    #: The newest change-log chunk the export holds; None when it was made before the first one.
    last_chunk_id: int | None
    apdb_config: str | None = None
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        """The manifest of the export at ``root``; a one-line :class:`PublicationError` otherwise."""
        path = root / MANIFEST
        if not root.is_dir():
            raise PublicationError(f"{root} is not a directory")
        if not path.is_file():
            raise PublicationError(f"{root} is not a diadb PPDB export (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise PublicationError(f"{path} is not a diadb PPDB manifest (format {data.get('format')!r})")
            if int(data.get("format_version", -1)) > FORMAT_VERSION:
                raise PublicationError(
                    f"{path} has format version {data['format_version']}; this diadb reads {FORMAT_VERSION}"
                )
            manifest = cls(**data)
            entries = [manifest.files, manifest.tables, *manifest.files.values(), *manifest.tables.values()]
            if not all(isinstance(e, dict) for e in entries):
                raise TypeError("'files' and 'tables' must map names to objects")
            return manifest
        except PublicationError:
            raise
        except (ValueError, TypeError, AttributeError) as e:
            raise PublicationError(f"{path} is damaged: {e}") from None

    def write(self, root: Path) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        tmp = root / (MANIFEST + ".tmp")
        with tmp.open("w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(root / MANIFEST)

    def record(self, root: Path, paths: list[Path]) -> None:
        """Record (or refresh) the size and checksum of these files."""
        for p in paths:
            key = str(p.relative_to(root))
            st = p.stat()
            old = self.files.get(key)
            if old and old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
                continue  # unchanged since it was hashed
            self.files[key] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": checksum(p)}

    def forget_missing(self, root: Path) -> None:
        self.files = {k: v for k, v in self.files.items() if (root / k).exists()}
