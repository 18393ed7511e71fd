"""SQLite: the change log (replica chunks).

Every store and every daytime call is one chunk, numbered in commit order (the write lock
serialises them). A store chunk's rows are found by the ``visit``/``detector`` columns that
every source row carries, and by a list of the object versions it wrote; a daytime chunk
holds update records (JSON).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.common.members import MEMBER_TABLES, member_key, member_match
from diadb.backends.sqlite.connection import SqliteConnection, q
from diadb.backends.sqlite.layout import SqliteLayout
from diadb.errors import StorageError


def now_iso() -> str:
    """The chunk and visit registry's timestamp: UTC, ISO 8601."""
    return _dt.datetime.now(_dt.UTC).isoformat()


class SqliteChangeLog:
    """Chunks: opened inside the writers' transactions (``log_chunk``/``write_updates``),
    listed, read back and marked published by the replication side."""

    def __init__(self, conn: SqliteConnection, layout: SqliteLayout) -> None:
        self._conn = conn
        self._layout = layout  # for the schema: the primary keys of keyed stores' members

    def log_chunk(
        self, cur: Any, kind: str, visit: int | None, detector: int | None, mjd: float | None
    ) -> int:
        """A new chunk in the transaction of ``cur``; its id."""
        cur.execute(
            "INSERT INTO diadb_chunk (kind, visit, detector, visit_mjd_tai, created_at) "
            "VALUES (?, ?, ?, ?, ?) RETURNING chunk_id",
            [kind, visit, detector, mjd, now_iso()],
        )
        return int(cur.fetchall()[0][0])

    def write_updates(self, cur: Any, chunk_id: int, kind: str, payloads: Sequence[dict[str, Any]]) -> None:
        """The update records of the daytime chunk ``chunk_id``, in the transaction of ``cur``."""
        if payloads:
            records = pa.table(
                {
                    "chunk_id": pa.array([chunk_id] * len(payloads), pa.int64()),
                    "seq": pa.array(np.arange(len(payloads)), pa.int64()),
                    "kind": pa.array([kind] * len(payloads)),
                    "payload": pa.array([json.dumps(p) for p in payloads]),
                }
            )
            cur.adbc_ingest("diadb_update", records, mode="append")

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, Any]], when_mjd: float) -> int:
        """Record foreign update records as one daytime chunk."""
        try:
            with self._conn.transaction() as cur:
                chunk = self.log_chunk(cur, "update", None, None, when_mjd)
                self.write_updates(cur, chunk, kind, [dict(p) for p in payloads])
        except self._conn.errors as e:
            raise StorageError(f"SQLite change-log write failed on {self._conn.path}: {e}") from e
        return chunk

    def list_chunks(self, published: bool | None = None) -> pa.Table:
        sql = (
            "SELECT chunk_id, kind, visit, detector, visit_mjd_tai, created_at AS stored_at, published "
            "FROM diadb_chunk"
            + ("" if published is None else f" WHERE published = {int(published)}")
            + " ORDER BY chunk_id"
        )
        return self._conn.fetch(sql)

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        ids = pa.table({"id": np.asarray(chunk_ids, dtype=np.int64)})
        with self._conn.transaction() as cur:
            self._conn.temp_table(cur, "diadb_publish", ids)
            cur.execute(
                "UPDATE diadb_chunk SET published = 1 WHERE chunk_id IN (SELECT id FROM temp.diadb_publish)"
            )

    def delete_chunks(self, chunk_ids: Sequence[int], *, dry_run: bool = False) -> list[int]:
        """Delete these published chunks, their update records and object-version lists in one
        write transaction; the ids deleted. Unpublished ids, and the newest chunk (``INTEGER
        PRIMARY KEY`` would hand its id out again), are left. The key registries
        (``diadb_store_key``, ``diadb_chunk_member``) and the stored rows stay."""
        ids = pa.table({"id": np.unique(np.asarray(chunk_ids, dtype=np.int64))})
        if not ids.num_rows:
            return []
        try:
            with self._conn.transaction() as cur:
                self._conn.temp_table(cur, "diadb_forget", ids)
                cur.execute(
                    "SELECT chunk_id FROM diadb_chunk WHERE published = 1 "
                    "AND chunk_id IN (SELECT id FROM temp.diadb_forget) "
                    "AND chunk_id < (SELECT max(chunk_id) FROM diadb_chunk) ORDER BY chunk_id"
                )
                gone = [int(r[0]) for r in cur.fetchall()]
                if dry_run or not gone:
                    return gone
                self._conn.temp_table(cur, "diadb_forget", pa.table({"id": pa.array(gone, pa.int64())}))
                for table in ("diadb_update", "diadb_chunk_object", "diadb_chunk"):
                    cur.execute(f"DELETE FROM {table} WHERE chunk_id IN (SELECT id FROM temp.diadb_forget)")
                return gone
        except self._conn.errors as e:
            raise StorageError(f"SQLite change-log deletion failed on {self._conn.path}: {e}") from e

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        """The engine's rows written by these store chunks, each with a ``_chunk_id`` column first,
        the update records of these daytime chunks, and (``members``) the primary keys that keyed
        stores recorded. A keyed store's rows are found by those keys; any other store's by its
        visit/detector (rows that a keyed store recorded excepted)."""
        ids = pa.table({"id": np.asarray(chunk_ids, dtype=np.int64)})
        cur = self._conn.cursor()
        try:
            self._conn.temp_table(cur, "diadb_chunks", ids)
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS diadb_chunk_keys AS SELECT chunk_id, visit, detector, "
                "0 AS keyed FROM diadb_chunk WHERE 0"
            )
            cur.execute("DELETE FROM temp.diadb_chunk_keys")
            cur.execute(
                "INSERT INTO temp.diadb_chunk_keys SELECT c.chunk_id, c.visit, c.detector, "
                "EXISTS (SELECT 1 FROM diadb_store_key s WHERE s.chunk_id = c.chunk_id) FROM diadb_chunk c "
                "WHERE c.kind = 'store' AND c.chunk_id IN (SELECT id FROM temp.diadb_chunks)"
            )
            out: dict[str, pa.Table] = {}
            for table in MEMBER_TABLES:
                match = member_match(member_key(self._layout.schema.table(table)), q)
                cur.execute(
                    f'SELECT k.chunk_id AS _chunk_id, t.* FROM temp.diadb_chunk_keys k JOIN "{table}" t '
                    "ON t.visit = k.visit AND (k.detector = -1 OR t.detector = k.detector) WHERE NOT k.keyed "
                    f"AND NOT EXISTS (SELECT 1 FROM diadb_chunk_member m WHERE m.table_name = ? AND {match}) "
                    "UNION ALL "
                    "SELECT k.chunk_id AS _chunk_id, t.* FROM temp.diadb_chunk_keys k "
                    "JOIN diadb_chunk_member m ON m.chunk_id = k.chunk_id AND m.table_name = ? "
                    f'JOIN "{table}" t ON {match} WHERE k.keyed',
                    [table, table],
                )
                out[table] = cur.fetch_arrow_table()
            cur.execute(
                'SELECT o.chunk_id AS _chunk_id, t.* FROM diadb_chunk_object o JOIN "DiaObject" t '
                'ON t."diaObjectId" = o.diaObjectId AND t."validityStartMjdTai" = o.validityStartMjdTai '
                "WHERE o.chunk_id IN (SELECT id FROM temp.diadb_chunks)"
            )
            out["DiaObject"] = cur.fetch_arrow_table()
            cur.execute(
                "SELECT chunk_id, seq, kind, payload FROM diadb_update "
                "WHERE chunk_id IN (SELECT id FROM temp.diadb_chunks) ORDER BY chunk_id, seq"
            )
            out["updates"] = cur.fetch_arrow_table()
            cur.execute(
                "SELECT chunk_id AS _chunk_id, table_name, k0, k1, k2 FROM diadb_chunk_member "
                "WHERE chunk_id IN (SELECT id FROM temp.diadb_chunks)"
            )
            out["members"] = cur.fetch_arrow_table()
            return out
        except self._conn.errors as e:
            raise StorageError(f"SQLite change-log read failed on {self._conn.path}: {e}") from e
        finally:
            cur.close()
