"""SQLite URLs and the files a database consists of (no driver import: see ``diadb.backends.locate``)."""

from __future__ import annotations

import os
from pathlib import Path

from diadb.backends.base import Location
from diadb.errors import ConfigError

#: What SQLite writes beside the database file (WAL mode).
SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
#: The history tier's segment directory beside the database file.
HISTORY_SUFFIX = ".history"


#: The forms a SQLite database is named by, for the error messages.
_FORMS = "a file path, sqlite:///relative.db or sqlite:////abs/path.db"


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` or ``sqlite:////abs.db`` (SQLAlchemy's convention), or a bare path.

    Refused with ConfigError: an empty path and ``:memory:`` (SQLite would make a temporary
    database that vanishes on close, and the history tier a stray directory; neither can be
    reopened), and a string with a ``:`` before any ``/`` that is not a ``scheme://`` URL
    (``sqlite:/x.db`` would otherwise be a relative path in a directory named ``sqlite:``).
    """
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if not scheme.startswith("sqlite"):
            raise ConfigError(f"not a SQLite URL: {url!r}")
        if not rest.startswith("/") or rest == "/":
            raise ConfigError(f"SQLite URL {url!r} needs a path: {_FORMS}")
        path = rest[1:]
    else:
        if url != ":memory:" and ":" in url.split("/", 1)[0]:
            raise ConfigError(f"{url!r} is neither a path nor a SQLite URL; expected {_FORMS}")
        path = url
    if path in ("", ":memory:"):
        raise ConfigError(
            f"{url!r} names no database file (SQLite would make a temporary one that vanishes); "
            f"expected {_FORMS}"
        )
    if path.endswith("/") or os.path.basename(path) in (".", "..") or os.path.isdir(path):
        raise ConfigError(f"{url!r} names a directory, not a database file; expected {_FORMS}")
    return path


def history_directory(path: str) -> Path:
    """Where the segments of the database file ``path`` live."""
    return Path(os.path.abspath(path) + HISTORY_SUFFIX)


def is_foreign_file(url: str) -> bool:
    """A path to a file that is not SQLite (a damaged export's file, a stray file), told by
    the SQLite header: the driver would fail on it with a multi-line error."""
    path = Path(path_from_url(url))
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        return f.read(16) != b"SQLite format 3\x00"


def locate(url: str) -> Location:
    """The database file, its sidecars and its history directory, as absolute paths."""
    db = Path(os.path.abspath(path_from_url(url)))
    files = (db, *(db.with_name(db.name + s) for s in SIDECAR_SUFFIXES), history_directory(str(db)))
    return Location(scheme="sqlite", files=files, database=str(db))
