"""Names every engine gives diadb's own tables and signals, kept in one place."""

from __future__ import annotations

#: The latest version of each DiaObject (``DiaObject`` itself keeps every version).
LATEST_TABLE = "diadb_DiaObjectLatest"


class AlreadyStored(Exception):
    """Raised inside a store's transaction when its visit/detector (or key) is taken: the
    transaction rolls back and the store returns ``False``. Never leaves an engine."""
