"""The embedded default engine: SQLite in WAL mode, Arrow in and out through ADBC."""

from diadb.backends.sqlite.backend import SqliteBackend

__all__ = ["SqliteBackend"]
