"""PostgreSQL: the change log (replica chunks).

The same semantics as the SQLite engine's: every store and every daytime call is one chunk,
numbered in commit order. A store chunk's rows are found by the ``visit``/``detector`` columns
every source row carries, and by the object versions the store wrote (``diadb_chunk_object``,
keyed by the store's visit/detector); a keyed store's by the primary keys it recorded
(``diadb_chunk_member``); a daytime chunk holds update records (JSON).

Chunk ids follow commit order. A sequence alone would not do: two stores could take ids N and
N+1 and commit N+1 first, and a reader (an incremental export remembering the last chunk it
applied) would then skip N for ever. So the id is taken from a one-row counter,
``diadb_chunk_counter``, by an ``UPDATE ... RETURNING`` whose row lock is held until commit:
the next transaction that wants an id waits until this one has committed (or rolled back,
which also undoes the increment, so ids have no gaps) and then reads the new value. Any
snapshot that sees chunk N+1 therefore sees chunk N. The counter is the *last* lock every
writing transaction takes, after all its data is written: concurrent detector stores still
write their rows in parallel, and only the few statements that log the chunk (and the commit
itself) are serialised. Taking it last also means it can never be part of a deadlock cycle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.common.members import MEMBER_TABLES, member_key, member_match
from diadb.backends.common.packing import RowPacker
from diadb.backends.postgres.connection import Connection, apply_settings, ids, int_array_text, params, q
from diadb.errors import StorageError
from diadb.schema.model import ApdbSchema

#: ``created_at`` as SQLite writes it (``datetime.isoformat()`` in UTC).
STORED_AT = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"


class ChangeLog:
    """Writes chunks inside the callers' transactions, and reads them back."""

    def __init__(self, conn: Connection, packer: RowPacker, schema: Callable[[], ApdbSchema]) -> None:
        self.conn = conn
        self.packer = packer
        self._schema = schema

    # ---- writing (inside a caller's transaction) -----------------------------------
    def log_chunk(
        self,
        cur: Any,
        kind: str,
        visit: int | None = None,
        detector: int | None = None,
        mjd: float = 0.0,
        store_id: int | None = None,
    ) -> int:
        """Take the next chunk id (under the counter's row lock, held to commit: see the module
        docstring) and record the chunk; a store chunk is also written to its registry row.
        Call it as the last step of a writing transaction."""
        t = self.conn.t
        counter, chunks = t("diadb_chunk_counter"), t("diadb_chunk")
        take = f"WITH c AS (UPDATE {counter} SET last_id = last_id + 1 WHERE one RETURNING last_id)"
        if visit is None or detector is None:
            cur.execute(
                f"{take} INSERT INTO {chunks} (chunk_id, kind, visit, detector, visit_mjd_tai, created_at) "
                "SELECT last_id, $1, NULL, NULL, $2, clock_timestamp() FROM c RETURNING chunk_id",
                parameters=params(kind, float(mjd)),
            )
        else:
            keyed = ""
            if store_id is not None:
                keyed = (
                    f", s AS (UPDATE {t('diadb_store_key')} SET chunk_id = (SELECT last_id FROM c) "
                    "WHERE store_id = $5)"
                )
            cur.execute(
                f"{take}, v AS (UPDATE {t('diadb_visit')} SET chunk_id = (SELECT last_id FROM c) "
                f"WHERE visit = $2 AND detector = $3){keyed} "
                f"INSERT INTO {chunks} (chunk_id, kind, visit, detector, visit_mjd_tai, created_at) "
                "SELECT last_id, $1, $2, $3, $4, clock_timestamp() FROM c RETURNING chunk_id",
                parameters=params(
                    kind,
                    int(visit),
                    int(detector),
                    float(mjd),
                    *([] if store_id is None else [int(store_id)]),
                ),
            )
        rows = cur.fetchall()
        if not rows:
            raise StorageError(f"the change-log counter of schema {self.conn.namespace} is missing")
        return int(rows[0][0])

    def log_store_objects(
        self, cur: Any, visit: int, detector: int, objects: pa.Table, store_id: int | None = None
    ) -> None:
        """Record the object versions a store wrote (before its chunk is logged, outside the lock)."""
        n = objects.num_rows
        if not n:
            return
        keys = pa.table(
            {
                "visit": pa.array(np.full(n, visit, dtype=np.int64)),
                "detector": pa.array(np.full(n, detector, dtype=np.int32)),
                "diaObjectId": objects.column("diaObjectId").cast(pa.int64()),
                "validityStartMjdTai": objects.column("validityStartMjdTai").cast(pa.float64()),
                "store_id": pa.nulls(n, pa.int64())
                if store_id is None
                else pa.array(np.full(n, store_id, dtype=np.int64)),
            }
        )
        cur.adbc_ingest("diadb_chunk_object", keys, mode="append", db_schema_name=self.conn.namespace)

    def log_payloads(
        self, cur: Any, kind: str, when_mjd: float, payloads: Sequence[Mapping[str, Any]]
    ) -> int:
        """Log one daytime chunk holding these update records (last: see :meth:`log_chunk`)."""
        chunk = self.log_chunk(cur, "update", mjd=when_mjd)
        cur.execute(
            f"INSERT INTO {self.conn.t('diadb_update')} (chunk_id, seq, kind, payload) "
            "SELECT $1, s - 1, $2, p FROM unnest($3::text[]) WITH ORDINALITY AS u(p, s)",
            parameters=params(
                chunk, kind, (pa.array([json.dumps(dict(p)) for p in payloads], pa.string()), pa.string())
            ),
        )
        return chunk

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, Any]], when_mjd: float) -> int:
        """Record foreign update records as one daytime chunk."""
        return self.conn.run("change-log write", lambda cur: self.log_payloads(cur, kind, when_mjd, payloads))

    # ---- reading ---------------------------------------------------------------------
    def list_chunks(self, published: bool | None = None) -> pa.Table:
        settings: dict[str, str] = {}
        where = ""
        if published is not None:
            settings["diadb.p1"] = "true" if published else "false"
            where = " WHERE published = current_setting('diadb.p1')::boolean"
        return self.conn.read(
            "change-log listing",
            f"SELECT chunk_id, kind, visit, detector, visit_mjd_tai, {STORED_AT} AS stored_at, published "
            f"FROM {self.conn.t('diadb_chunk')}{where} ORDER BY chunk_id",
            settings,
        )

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        wanted = np.unique(np.asarray(chunk_ids, dtype=np.int64))
        if not len(wanted):
            return

        def work(cur: Any) -> None:
            cur.execute(
                f"UPDATE {self.conn.t('diadb_chunk')} SET published = true "
                "WHERE chunk_id = ANY($1::bigint[]) AND NOT published",
                parameters=params(ids(wanted)),
            )

        self.conn.run("change-log publication", work)

    def delete_chunks(self, chunk_ids: Sequence[int], *, dry_run: bool = False) -> list[int]:
        """Delete these published chunks, their update records and object-version lists in one
        transaction; the ids deleted (unpublished ids are left). Ids come from the counter and
        are never handed out again; the key registries (``diadb_store_key``,
        ``diadb_chunk_member``) and the stored rows stay."""
        wanted = np.unique(np.asarray(chunk_ids, dtype=np.int64))
        if not len(wanted):
            return []
        t = self.conn.t
        chunks, objects, keys = t("diadb_chunk"), t("diadb_chunk_object"), t("diadb_store_key")

        def work(cur: Any) -> list[int]:
            cur.execute(
                f"SELECT chunk_id FROM {chunks} WHERE chunk_id = ANY($1::bigint[]) AND published "
                "ORDER BY chunk_id FOR UPDATE",
                parameters=params(ids(wanted)),
            )
            gone = [int(r[0]) for r in cur.fetchall()]
            if dry_run or not gone:
                return gone
            these = params(ids(gone))
            cur.execute(
                f"DELETE FROM {t('diadb_update')} WHERE chunk_id = ANY($1::bigint[])", parameters=these
            )
            # A keyed store's object versions by its store id; a plain store's by visit/detector.
            cur.execute(
                f"DELETE FROM {objects} o USING {keys} s "
                "WHERE s.chunk_id = ANY($1::bigint[]) AND o.store_id = s.store_id",
                parameters=these,
            )
            cur.execute(
                f"DELETE FROM {objects} o USING {chunks} c WHERE c.chunk_id = ANY($1::bigint[]) "
                "AND c.kind = 'store' AND o.visit = c.visit AND o.detector = c.detector "
                "AND o.store_id IS NULL "
                f"AND NOT EXISTS (SELECT 1 FROM {keys} s WHERE s.chunk_id = c.chunk_id)",
                parameters=these,
            )
            cur.execute(f"DELETE FROM {chunks} WHERE chunk_id = ANY($1::bigint[])", parameters=these)
            return gone

        return self.conn.run("change-log deletion", work)

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        """The engine's rows written by these store chunks, each with a ``_chunk_id`` column first,
        and the update records of these daytime chunks; all read in one snapshot. A keyed
        store's rows are found by the primary keys it recorded; any other store's by its
        visit/detector (rows a keyed store recorded excepted)."""
        t = self.conn.t
        settings = {"diadb.p1": int_array_text(np.unique(np.asarray(chunk_ids, dtype=np.int64)))}
        wanted = "ANY(current_setting('diadb.p1')::bigint[])"
        stores = (
            f"(SELECT c.chunk_id, c.visit, c.detector, s.store_id FROM {t('diadb_chunk')} c "
            f"LEFT JOIN {t('diadb_store_key')} s ON s.chunk_id = c.chunk_id "
            f"WHERE c.kind = 'store' AND c.chunk_id = {wanted})"
        )
        members = t("diadb_chunk_member")
        schema = self._schema()

        def work(cur: Any) -> dict[str, pa.Table]:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            apply_settings(cur, settings)
            out: dict[str, pa.Table] = {}
            for table in MEMBER_TABLES:
                # A constant of diadb's, not a value: safe as a literal.
                name = "'" + table + "'"
                match = member_match(member_key(schema.table(table)), q)
                cur.execute(
                    f"SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {t(table)} t "
                    "ON t.visit = k.visit AND (k.detector = -1 OR t.detector = k.detector) "
                    f"WHERE k.store_id IS NULL AND NOT EXISTS (SELECT 1 FROM {members} m "
                    f"WHERE m.table_name = {name} AND {match}) "
                    f"UNION ALL SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {members} m "
                    f"ON m.store_id = k.store_id AND m.table_name = {name} JOIN {t(table)} t ON {match}"
                )
                out[table] = self.packer.expand(table, cur.fetch_arrow_table())
            objects, chunk_objects = t("DiaObject"), t("diadb_chunk_object")
            same = 't."diaObjectId" = o."diaObjectId" AND t."validityStartMjdTai" = o."validityStartMjdTai"'
            cur.execute(
                f"SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {chunk_objects} o "
                "ON o.visit = k.visit AND o.detector = k.detector AND o.store_id IS NULL "
                f"JOIN {objects} t ON {same} WHERE k.store_id IS NULL "
                f"UNION ALL SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {chunk_objects} o "
                f"ON o.store_id = k.store_id JOIN {objects} t ON {same}"
            )
            out["DiaObject"] = self.packer.expand("DiaObject", cur.fetch_arrow_table())
            cur.execute(
                f"SELECT chunk_id, seq, kind, payload FROM {t('diadb_update')} "
                f"WHERE chunk_id = {wanted} ORDER BY chunk_id, seq"
            )
            updates = cur.fetch_arrow_table()
            out["updates"] = pa.table(
                {
                    "chunk_id": updates.column(0).cast(pa.int64()),
                    "seq": updates.column(1).cast(pa.int64()),
                    "kind": updates.column(2).cast(pa.string()),
                    "payload": updates.column(3).cast(pa.string()),
                }
            )
            return out

        return self.conn.run("change-log read", work)
