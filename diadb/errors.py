"""Every exception diadb raises on purpose derives from :class:`Error`."""

from __future__ import annotations

from collections.abc import Sequence


class Error(Exception):
    """Base class of all diadb errors."""


class ConfigError(Error, ValueError):
    """A configuration value, URL or argument is invalid."""


class SchemaError(Error):
    """A Felis schema cannot be loaded or lacks what diadb needs."""


class SchemaVersionError(Error):
    """The database was made with a schema or layout this diadb cannot use."""


class BackendUnavailable(Error):
    """A backend's driver or server is missing; the message names the fix."""


class DuplicateVisitError(Error):
    """A visit/detector was stored before and the config says duplicates are errors."""


class UnknownIdError(Error, LookupError):
    """A daytime call named ids (DiaSources, DiaObjects, forced-source keys) that are not
    stored; the message names them. Nothing was changed."""


class StorageError(Error):
    """The engine failed while reading or writing; the original error is chained."""


class CatalogError(Error, ValueError):
    """An input catalog does not match the schema. Nothing was written.

    Attributes name the table, the column (``None`` for row-level problems), the
    problem and the positions (0-based, in the caller's catalog) of the first
    offending rows.
    """

    def __init__(self, table: str, column: str | None, problem: str, rows: Sequence[int] = ()) -> None:
        self.table = table
        self.column = column
        self.problem = problem
        self.rows = list(rows)[:10]
        where = f"{table}.{column}" if column else table
        text = f"{where}: {problem}"
        if self.rows:
            text += f" (first offending rows: {self.rows})"
        super().__init__(text)
