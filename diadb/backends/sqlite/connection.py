"""The one ADBC connection to the database file, shared by every part of the SQLite engine.

Its state is the file's path, the driver connection and the driver's error types; the parts
get this object in their constructors and use its public methods: cursors, the write
transaction, a read transaction, Arrow fetches and temporary tables.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from diadb.backends.sqlite.url import is_foreign_file
from diadb.errors import ConfigError, StorageError

# ADBC's SQLite driver infers column types from the first batch; one batch for the whole
# result makes a column that starts with NULLs come back with its real type.
_BATCH_ROWS = str(2**30)


def q(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


class SqliteConnection:
    """The database file ``path`` opened through ADBC in WAL mode (autocommit between transactions)."""

    def __init__(self, path: str, *, create: bool) -> None:
        # The driver is imported on connect, not with the module: ``diadb.backends.locate``
        # imports this package (for its url module) and promises no driver import.
        import adbc_driver_manager
        import adbc_driver_sqlite.dbapi as dbapi

        #: The driver's error types: the parts turn them into StorageError with their context.
        self.errors: tuple[type[BaseException], ...] = (adbc_driver_manager.Error,)
        self.path = path
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        if create and exists:
            raise ConfigError(f"{path} already exists; use Apdb.open to use it")
        if not create and not exists:
            raise ConfigError(f"no APDB at {path}; use Apdb.create to make one")
        if not create and is_foreign_file(path):
            raise ConfigError(f"{path} is neither a PPDB export directory nor a SQLite database")
        if create:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = dbapi.connect(path, autocommit=True)
        except self.errors as e:
            raise StorageError(f"cannot open SQLite database {path}: {e}") from e
        cur = self._conn.cursor()
        if create:
            # Large pages keep 100-column rows on one page; must be set before WAL is enabled.
            cur.execute("PRAGMA page_size = 32768")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")  # until configure() says otherwise
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA temp_store = MEMORY")
        cur.execute("PRAGMA mmap_size = 4294967296")
        cur.close()

    def set_synchronous(self, level: str) -> None:
        """``PRAGMA synchronous``: ``NORMAL``, anything else is ``FULL``."""
        level = "NORMAL" if level == "NORMAL" else "FULL"
        cur = self._conn.cursor()
        try:
            cur.execute(f"PRAGMA synchronous = {level}")
        finally:
            cur.close()

    def cursor(self) -> Any:
        """A cursor that fetches a whole result as one Arrow batch (see ``_BATCH_ROWS``)."""
        cur = self._conn.cursor()
        cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": _BATCH_ROWS})
        return cur

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction: ``BEGIN IMMEDIATE`` takes the write lock at once, so a check
        made inside it (is this visit stored?) holds until the commit.

        The cursor is always closed. A failed COMMIT (a full disk) is a StorageError after a
        ROLLBACK; a ROLLBACK that fails too never hides the error that caused it (it is added
        to that error as a note: SQLite has then rolled back by itself or the connection is
        unusable, and either way nothing of the transaction is committed)."""
        cur = self.cursor()
        try:
            try:
                cur.execute("BEGIN IMMEDIATE")
            except self.errors as e:
                raise StorageError(f"SQLite could not start a write transaction on {self.path}: {e}") from e
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException as e:
                self._rollback(cur, e)
                if isinstance(e, self.errors):
                    error = StorageError(f"SQLite transaction failed on {self.path}: {e}")
                    for note in getattr(e, "__notes__", []):
                        error.add_note(note)
                    raise error from e
                raise
        finally:
            with contextlib.suppress(Exception):
                cur.close()

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Reads inside see one consistent state (one SQLite read transaction in WAL mode)."""
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN")
            try:
                yield
            except BaseException as e:
                self._rollback(cur, e)
                raise
            cur.execute("COMMIT")
        except self.errors as e:
            raise StorageError(f"SQLite read transaction failed on {self.path}: {e}") from e
        finally:
            with contextlib.suppress(Exception):
                cur.close()

    @staticmethod
    def _rollback(cur: Any, cause: BaseException) -> None:
        try:
            cur.execute("ROLLBACK")
        except Exception as e:  # the cause is what the caller must see
            cause.add_note(f"(the ROLLBACK that followed failed too: {e})")

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        """The result of one query as an Arrow table; driver errors become StorageError."""
        cur = self.cursor()
        try:
            cur.execute(sql, list(params) if params else None)
            result: pa.Table = cur.fetch_arrow_table()
            return result
        except self.errors as e:
            raise StorageError(f"SQLite read failed on {self.path}: {e}") from e
        finally:
            cur.close()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row of one query."""
        return self.fetch(sql, params).column(0)[0].as_py()

    @staticmethod
    def temp_table(cur: Any, name: str, data: pa.Table) -> None:
        """(Re)create the temporary table ``name`` holding ``data``, on ``cur``'s connection."""
        cur.execute(f"DROP TABLE IF EXISTS temp.{q(name)}")
        cur.adbc_ingest(name, data, mode="create", temporary=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
