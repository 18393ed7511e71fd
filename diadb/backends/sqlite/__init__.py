"""The embedded default engine: SQLite in WAL mode, Arrow in and out through ADBC."""

from diadb.backends.sqlite.backend import SqliteBackend, path_from_url

__all__ = ["SqliteBackend", "path_from_url"]
