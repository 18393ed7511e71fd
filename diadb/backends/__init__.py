"""Storage engines, chosen by URL scheme and imported lazily.

Each engine is a package of the same shape (``diadb.backends.<engine>``) that exports its
backend class and has a ``url`` module (URL parsing only, no driver import) with
``locate(url) -> Location``. Adding an engine is one line in ``_ENGINES``: the scheme, the
package, the class name, and the optional extra that installs its driver.
"""

from __future__ import annotations

import importlib
from typing import Any

from diadb.backends.base import Backend, Location, ReadTable, TableStats, TimeWindow, VisitBatch
from diadb.errors import BackendUnavailable, ConfigError

# scheme -> (package, backend class, extra that installs the driver)
_ENGINES: dict[str, tuple[str, str, str | None]] = {
    "sqlite": ("diadb.backends.sqlite", "SqliteBackend", None),
    "postgresql": ("diadb.backends.postgres", "PostgresBackend", "postgres"),
    "cassandra": ("diadb.backends.cassandra", "CassandraBackend", "cassandra"),
}


def scheme_of(url: str) -> str:
    """The engine's scheme of ``url`` (a bare path means SQLite)."""
    if "://" not in url:
        return "sqlite"
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def _engine(url: str) -> tuple[str, str, str | None]:
    scheme = scheme_of(url)
    if scheme not in _ENGINES:
        # The URL itself is not echoed: it may carry a password.
        raise ConfigError(f"unknown database URL scheme {scheme!r}; known: {sorted(_ENGINES)}")
    return _ENGINES[scheme]


def _import(module_name: str, scheme: str, extra: str | None) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        hint = f"pip install 'diadb[{extra}]'" if extra else "reinstall diadb"
        raise BackendUnavailable(
            f"the {scheme} backend needs a driver that is not installed ({e.name}): {hint}"
        ) from e


def open_backend(url: str, *, create: bool) -> Backend:
    """Connect to the engine named by ``url``'s scheme (a bare path means SQLite)."""
    package, factory_name, extra = _engine(url)
    module = _import(package, scheme_of(url), extra)
    backend: Backend = getattr(module, factory_name)(url, create=create)
    return backend


def locate(url: str) -> Location:
    """Where the database at ``url`` lives (files of an embedded one, host and namespace of a
    server's), without connecting and without importing the engine's driver."""
    package, _, extra = _engine(url)
    location: Location = _import(package + ".url", scheme_of(url), extra).locate(url)
    return location


__all__ = [
    "Backend",
    "Location",
    "ReadTable",
    "TableStats",
    "TimeWindow",
    "VisitBatch",
    "locate",
    "open_backend",
    "scheme_of",
]
