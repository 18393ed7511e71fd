"""Storage engines, chosen by URL scheme and imported lazily.

Adding an engine is one line in ``_BACKENDS``: the scheme, the module and the factory name,
plus the optional extra that installs its driver.
"""

from __future__ import annotations

import importlib
from typing import Any

from diadb.backends.base import Backend, ReadTable, TableStats, TimeWindow, VisitBatch
from diadb.errors import BackendUnavailable, ConfigError

# scheme -> (module, factory, extra that installs the driver)
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "sqlite": ("diadb.backends.sqlite", "SqliteBackend", None),
    "postgresql": ("diadb.backends.postgres", "PostgresBackend", "postgres"),
    "cassandra": ("diadb.backends.cassandra", "CassandraBackend", "cassandra"),
}


def scheme_of(url: str) -> str:
    if "://" not in url:
        return "sqlite"  # a bare path is a SQLite file
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def open_backend(url: str, *, create: bool, options: dict[str, Any] | None = None) -> Backend:
    """Connect to the engine named by ``url``'s scheme (a bare path means SQLite)."""
    scheme = scheme_of(url)
    if scheme not in _BACKENDS:
        raise ConfigError(f"unknown database URL scheme {scheme!r} in {url!r}; known: {sorted(_BACKENDS)}")
    module_name, factory_name, extra = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f"pip install 'diadb[{extra}]'" if extra else "reinstall diadb"
        raise BackendUnavailable(
            f"the {scheme} backend needs a driver that is not installed ({e.name}): {hint}"
        ) from e
    factory = getattr(module, factory_name)
    backend: Backend = factory(url, create=create, **(options or {}))
    return backend


__all__ = ["Backend", "ReadTable", "TableStats", "TimeWindow", "VisitBatch", "open_backend", "scheme_of"]
