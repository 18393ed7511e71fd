"""PostgreSQL: the change log (replica chunks) and the daytime updates of stored rows.

The same semantics as the SQLite backend (``diadb.backends.sqlite.changes``): every store and
every daytime call is one chunk, numbered in commit order. A store chunk's rows are found by
the ``visit``/``detector`` columns every source row carries, and by the object versions the
store wrote (``diadb_chunk_object``, keyed by the store's visit/detector); a daytime chunk
holds one update record (JSON). PostgreSQL has no history tier, so there is no overlay: every
source a daytime call changes is updated in place.

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
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array

if TYPE_CHECKING:
    from diadb.schema.model import ApdbSchema

# Helpers shared with SQLite's change log: the same code computes the new values, so the two
# backends cannot drift apart.
from diadb.backends.common.members import MEMBER_TABLES, member_key, member_match
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.common.packing import RowPacker
from diadb.errors import StorageError, UnknownIdError
from diadb.updates import (
    CURRENT_COLUMNS,
    MUTABLE_SOURCE_COLUMNS,
    closing_payload,
    merge_changes,
    normalise_current,
    object_counts,
    object_delta,
    unset_only,
    update_payload,
)

T = TypeVar("T")

#: The change-log tables (``{t}`` is replaced by the schema-qualified name of a table).
CHANGE_LOG_DDL = [
    "CREATE TABLE {diadb_chunk_counter} (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), "
    "last_id BIGINT NOT NULL)",
    "INSERT INTO {diadb_chunk_counter} (one, last_id) VALUES (true, 0)",
    "CREATE TABLE {diadb_chunk} (chunk_id BIGINT PRIMARY KEY, kind TEXT NOT NULL, visit BIGINT, "
    "detector INTEGER, visit_mjd_tai DOUBLE PRECISION, created_at TIMESTAMPTZ NOT NULL, "
    "published BOOLEAN NOT NULL DEFAULT false)",
    "CREATE INDEX {diadb_chunk_unpublished} ON {diadb_chunk} (chunk_id) WHERE NOT published",
    'CREATE TABLE {diadb_chunk_object} (visit BIGINT NOT NULL, detector INTEGER NOT NULL, "diaObjectId" '
    'BIGINT NOT NULL, "validityStartMjdTai" DOUBLE PRECISION NOT NULL, store_id BIGINT)',
    "CREATE INDEX {diadb_chunk_object_store} ON {diadb_chunk_object} (visit, detector)",
    "CREATE TABLE {diadb_update} (chunk_id BIGINT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, "
    "payload TEXT NOT NULL, PRIMARY KEY (chunk_id, seq))",
    "CREATE INDEX {diadb_DiaSource_visit} ON {DiaSource} (visit, detector)",
    "CREATE INDEX {diadb_DiaForcedSource_visit} ON {DiaForcedSource} (visit, detector)",
    # Keyed stores (Apdb.store(key=...)): the key registry (store_id is taken when the store
    # starts, chunk_id when it logs its chunk), and their rows by primary key.
    "CREATE TABLE {diadb_store_key} (key TEXT PRIMARY KEY, "
    "store_id BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, chunk_id BIGINT)",
    "CREATE INDEX {diadb_store_key_chunk} ON {diadb_store_key} (chunk_id)",
    "CREATE TABLE {diadb_chunk_member} (store_id BIGINT NOT NULL, table_name TEXT NOT NULL, "
    "k0 BIGINT NOT NULL, k1 BIGINT, k2 BIGINT)",
    "CREATE INDEX {diadb_chunk_member_store} ON {diadb_chunk_member} (store_id)",
    "CREATE INDEX {diadb_chunk_member_key} ON {diadb_chunk_member} (table_name, k0, k1, k2)",
    "CREATE INDEX {diadb_chunk_object_keyed} ON {diadb_chunk_object} (store_id) WHERE store_id IS NOT NULL",
]

#: ``created_at`` as SQLite writes it (``datetime.isoformat()`` in UTC).
_STORED_AT = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"

#: The PostgreSQL array type each mutable DiaSource column is bound as.
_MUTABLE_PG = {
    "diaObjectId": ("bigint", pa.int64()),
    "ssObjectId": ("bigint", pa.int64()),
    "ssObjectReassocTimeMjdTai": ("float8", pa.float64()),
    "timeWithdrawnMjdTai": ("float8", pa.float64()),
}


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ids(values: Any) -> tuple[pa.Array, pa.DataType]:
    """A bigint[] parameter (see ``postgres._params``)."""
    return pa.array(np.asarray(values, dtype=np.int64)), pa.int64()


def _int_array_text(values: Sequence[int] | np.ndarray) -> str:
    """A bigint[] literal for a transaction-local setting (``PostgresBackend.apply_settings``)."""
    return "{" + ",".join(map(str, np.asarray(values, dtype=np.int64).tolist())) + "}"


class PostgresChanges:
    """Mixed into ``PostgresBackend``; uses its connection helpers."""

    if TYPE_CHECKING:

        def _run(self, what: str, work: Callable[[Any], T]) -> T: ...

        def _t(self, name: str) -> str: ...

        @staticmethod
        def _bind(*values: Any) -> pa.RecordBatch: ...

        @staticmethod
        def apply_settings(cur: Any, settings: Mapping[str, str]) -> None: ...

        namespace: str
        _lock_space: int
        _packer: RowPacker

        @property
        def schema(self) -> ApdbSchema: ...

    def _change_log_ddl(self) -> list[str]:
        tables = (
            "diadb_chunk_counter",
            "diadb_chunk",
            "diadb_chunk_object",
            "diadb_update",
            "diadb_store_key",
            "diadb_chunk_member",
        )
        indexes = (  # not schema-qualified: an index lives in its table's schema
            "diadb_chunk_unpublished",
            "diadb_chunk_object_store",
            "diadb_DiaSource_visit",
            "diadb_DiaForcedSource_visit",
            "diadb_store_key_chunk",
            "diadb_chunk_member_store",
            "diadb_chunk_member_key",
            "diadb_chunk_object_keyed",
        )
        names = {n: self._t(n) for n in (*tables, "DiaSource", "DiaForcedSource")}
        names |= {n: f'"{n}"' for n in indexes}
        return [stmt.format(**names) for stmt in CHANGE_LOG_DDL]

    def _read(self, what: str, sql: str, settings: Mapping[str, str] | None = None) -> pa.Table:
        """One parameter-free read; its values are bound as transaction-local settings."""

        def work(cur: Any) -> pa.Table:
            self.apply_settings(cur, settings or {})
            cur.execute(sql)
            result: pa.Table = cur.fetch_arrow_table()
            return result

        return self._run(what, work)

    # ---- the change log ------------------------------------------------------------
    def _log_chunk(
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
        counter, chunks = self._t("diadb_chunk_counter"), self._t("diadb_chunk")
        take = f"WITH c AS (UPDATE {counter} SET last_id = last_id + 1 WHERE one RETURNING last_id)"
        if visit is None or detector is None:
            cur.execute(
                f"{take} INSERT INTO {chunks} (chunk_id, kind, visit, detector, visit_mjd_tai, created_at) "
                "SELECT last_id, $1, NULL, NULL, $2, clock_timestamp() FROM c RETURNING chunk_id",
                parameters=self._bind(kind, float(mjd)),
            )
        else:
            keyed = ""
            if store_id is not None:
                keyed = (
                    f", s AS (UPDATE {self._t('diadb_store_key')} SET chunk_id = (SELECT last_id FROM c) "
                    "WHERE store_id = $5)"
                )
            cur.execute(
                f"{take}, v AS (UPDATE {self._t('diadb_visit')} SET chunk_id = (SELECT last_id FROM c) "
                f"WHERE visit = $2 AND detector = $3){keyed} "
                f"INSERT INTO {chunks} (chunk_id, kind, visit, detector, visit_mjd_tai, created_at) "
                "SELECT last_id, $1, $2, $3, $4, clock_timestamp() FROM c RETURNING chunk_id",
                parameters=self._bind(
                    kind,
                    int(visit),
                    int(detector),
                    float(mjd),
                    *([] if store_id is None else [int(store_id)]),
                ),
            )
        rows = cur.fetchall()
        if not rows:
            raise StorageError(f"the change-log counter of schema {self.namespace} is missing")
        return int(rows[0][0])

    def _log_store_objects(
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
        cur.adbc_ingest("diadb_chunk_object", keys, mode="append", db_schema_name=self.namespace)

    def _log_update(self, cur: Any, kind: str, when_mjd: float, payload: dict[str, Any]) -> int:
        chunk = self._log_chunk(cur, "update", mjd=when_mjd)
        cur.execute(
            f"INSERT INTO {self._t('diadb_update')} (chunk_id, seq, kind, payload) VALUES ($1, 0, $2, $3)",
            parameters=self._bind(chunk, kind, json.dumps(payload)),
        )
        cur.fetchall()
        return chunk

    def list_chunks(self, published: bool | None = None) -> pa.Table:
        settings: dict[str, str] = {}
        where = ""
        if published is not None:
            settings["diadb.p1"] = "true" if published else "false"
            where = " WHERE published = current_setting('diadb.p1')::boolean"
        chunks: pa.Table = self._read(
            "change-log listing",
            f"SELECT chunk_id, kind, visit, detector, visit_mjd_tai, {_STORED_AT} AS stored_at, published "
            f"FROM {self._t('diadb_chunk')}{where} ORDER BY chunk_id",
            settings,
        )
        return chunks

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        ids = np.unique(np.asarray(chunk_ids, dtype=np.int64))
        if not len(ids):
            return

        def work(cur: Any) -> None:
            cur.execute(
                f"UPDATE {self._t('diadb_chunk')} SET published = true "
                "WHERE chunk_id = ANY($1::bigint[]) AND NOT published",
                parameters=self._bind(_ids(ids)),
            )

        self._run("change-log publication", work)

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        """The engine's rows written by these store chunks, each with a ``_chunk_id`` column first,
        and the update records of these daytime chunks; all read in one snapshot. A keyed
        store's rows are found by the primary keys it recorded; any other store's by its
        visit/detector (rows a keyed store recorded excepted)."""
        settings = {"diadb.p1": _int_array_text(np.unique(np.asarray(chunk_ids, dtype=np.int64)))}
        wanted = "ANY(current_setting('diadb.p1')::bigint[])"
        stores = (
            f"(SELECT c.chunk_id, c.visit, c.detector, s.store_id FROM {self._t('diadb_chunk')} c "
            f"LEFT JOIN {self._t('diadb_store_key')} s ON s.chunk_id = c.chunk_id "
            f"WHERE c.kind = 'store' AND c.chunk_id = {wanted})"
        )
        members = self._t("diadb_chunk_member")

        def work(cur: Any) -> dict[str, pa.Table]:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self.apply_settings(cur, settings)
            out: dict[str, pa.Table] = {}
            for table in MEMBER_TABLES:
                # A constant of this module, not a value: safe as a literal.
                name = "'" + table + "'"
                match = member_match(member_key(self.schema.table(table)), _q)
                cur.execute(
                    f"SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {self._t(table)} t "
                    "ON t.visit = k.visit AND (k.detector = -1 OR t.detector = k.detector) "
                    f"WHERE k.store_id IS NULL AND NOT EXISTS (SELECT 1 FROM {members} m "
                    f"WHERE m.table_name = {name} AND {match}) "
                    f"UNION ALL SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {members} m "
                    f"ON m.store_id = k.store_id AND m.table_name = {name} JOIN {self._t(table)} t ON {match}"
                )
                out[table] = self._packer.expand(table, cur.fetch_arrow_table())
            objects = self._t("DiaObject")
            chunk_objects = self._t("diadb_chunk_object")
            same = 't."diaObjectId" = o."diaObjectId" AND t."validityStartMjdTai" = o."validityStartMjdTai"'
            cur.execute(
                f"SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {chunk_objects} o "
                "ON o.visit = k.visit AND o.detector = k.detector AND o.store_id IS NULL "
                f"JOIN {objects} t ON {same} WHERE k.store_id IS NULL "
                f"UNION ALL SELECT k.chunk_id AS _chunk_id, t.* FROM {stores} k JOIN {chunk_objects} o "
                f"ON o.store_id = k.store_id JOIN {objects} t ON {same}"
            )
            out["DiaObject"] = self._packer.expand("DiaObject", cur.fetch_arrow_table())
            cur.execute(
                f"SELECT chunk_id, seq, kind, payload FROM {self._t('diadb_update')} "
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

        return self._run("change-log read", work)

    # ---- daytime updates -----------------------------------------------------------
    def update_sources(
        self,
        changes: pa.Table,
        *,
        kind: str,
        when_mjd: float,
        segment_lookup: Callable[[Int64Array], pa.Table],
        object_deltas: bool,
        remove_empty: bool,
        increment: bool = True,
        decrement: bool = True,
        only_null: str | None = None,
    ) -> int:
        """Set mutable columns of DiaSources, in one transaction; return the chunk id (0 when no
        row changed: no chunk then). As SQLite's (``diadb.backends.sqlite.changes``).
        Raises LookupError naming unknown DiaSource or DiaObject ids; nothing changes then.
        """
        ids = np.asarray(changes.column("diaSourceId").to_numpy(), dtype=np.int64)
        source = self._t("DiaSource")
        cols = ", ".join(f's."{c}"' for c in CURRENT_COLUMNS)

        def work(cur: Any) -> int:
            # The rows are locked (in the order given) so that two daytime calls moving the same
            # source serialise, and the second one sees the first one's values.
            cur.execute(
                f"SELECT {cols} FROM unnest($1::bigint[]) WITH ORDINALITY AS c(id, ord) "
                f'JOIN {source} s ON s."diaSourceId" = c.id ORDER BY c.ord FOR UPDATE OF s',
                parameters=self._bind(_ids(ids)),
            )
            in_engine = normalise_current(cur.fetch_arrow_table())
            rest = np.setdiff1d(ids, np.asarray(in_engine.column(0).to_numpy(), dtype=np.int64))
            if len(rest):
                # No history tier here: the lookup finds nothing, and what it found could not be updated.
                in_segments = segment_lookup(rest)
                missing = np.setdiff1d(
                    rest, np.asarray(in_segments.column("diaSourceId").to_numpy(), dtype=np.int64)
                )
                if len(missing):
                    raise UnknownIdError(f"unknown DiaSource ids: {missing[:20].tolist()}")
                raise StorageError("PostgreSQL has no history tier: sources in segments cannot be updated")
            current, kept = unset_only(in_engine, changes, only_null)
            if not current.num_rows:
                return 0
            new = merge_changes(current, kept)
            if "diaObjectId" in kept.column_names:
                self._check_targets(cur, kept)
            counts: list[dict[str, Any]] = []
            if object_deltas:
                delta = object_delta(current, new, increment, decrement)
                counts = self._apply_object_deltas(cur, delta, when_mjd, remove_empty)
            self._write_sources(cur, new)
            return self._log_update(cur, kind, when_mjd, update_payload(new, kept, when_mjd, counts))

        return self._run(kind, work)

    def _check_targets(self, cur: Any, changes: pa.Table) -> None:
        """LookupError unless every new DiaObject of ``changes`` is a current object."""
        targets = np.unique(pc.drop_null(changes.column("diaObjectId")).to_numpy()).astype(np.int64)
        if not len(targets):
            return
        cur.execute(
            f'SELECT "diaObjectId" FROM {self._t(LATEST_TABLE)} WHERE "diaObjectId" = ANY($1::bigint[])',
            parameters=self._bind(_ids(targets)),
        )
        found = np.asarray(cur.fetch_arrow_table().column(0).to_numpy(), dtype=np.int64)
        unknown = np.setdiff1d(targets, found)
        if len(unknown):
            raise UnknownIdError(f"unknown DiaObject ids: {unknown[:20].tolist()}")

    def _write_sources(self, cur: Any, new: pa.Table) -> None:
        if not new.num_rows:
            return
        names = ["diaSourceId", "_healpix_29", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS]
        pg = {"diaSourceId": "bigint", "_healpix_29": "bigint", "midpointMjdTai": "float8"}
        pg |= {c: t for c, (t, _) in _MUTABLE_PG.items()}
        arrays = ", ".join(f"${i + 1}::{pg[c]}[]" for i, c in enumerate(names))
        aliases = ", ".join(f"n{i}" for i in range(len(names)))
        sets = ", ".join(f'"{c}" = n.n{i + 3}' for i, c in enumerate(MUTABLE_SOURCE_COLUMNS))
        binds = [(new.column(c).combine_chunks(), new.schema.field(c).type) for c in names]
        # The whole primary key (pixel, time, id) is matched: one index probe per row, and
        # only the partitions of these times are touched.
        cur.execute(
            f"UPDATE {self._t('DiaSource')} s SET {sets} FROM unnest({arrays}) AS n({aliases}) "
            'WHERE s."diaSourceId" = n.n0 AND s."_healpix_29" = n.n1 AND s."midpointMjdTai" = n.n2',
            parameters=self._bind(*binds),
        )

    def _apply_object_deltas(
        self, cur: Any, delta: pa.Table, when_mjd: float, remove_empty: bool
    ) -> list[dict[str, Any]]:
        """Add ``delta`` (id, delta) to nDiaSources; return the objects' new counts and positions."""
        if not delta.num_rows:
            return []
        binds = self._bind(_ids(delta.column("id")), _ids(delta.column("delta")))
        history, latest = self._t("DiaObject"), self._t(LATEST_TABLE)
        for table, extra in ((latest, ""), (history, ' AND t."validityEndMjdTai" IS NULL')):
            cur.execute(
                f'UPDATE {table} t SET "nDiaSources" = t."nDiaSources" + d.delta FROM '
                f'unnest($1::bigint[], $2::bigint[]) AS d(id, delta) WHERE t."diaObjectId" = d.id{extra}',
                parameters=binds,
            )
        cur.execute(
            f'SELECT "diaObjectId", ra, dec, "nDiaSources" FROM {latest} '
            'WHERE "diaObjectId" = ANY($1::bigint[]) ORDER BY "diaObjectId"',
            parameters=self._bind(_ids(delta.column("id"))),
        )
        counts = object_counts(cur.fetch_arrow_table())
        if remove_empty:
            # An object left without sources leaves the latest table; its open version is closed.
            cur.execute(
                f'WITH gone AS (DELETE FROM {latest} WHERE "nDiaSources" <= 0 '
                'AND "diaObjectId" = ANY($1::bigint[]) RETURNING "diaObjectId") '
                f'UPDATE {history} t SET "validityEndMjdTai" = $2 FROM gone '
                'WHERE t."diaObjectId" = gone."diaObjectId" AND t."validityEndMjdTai" IS NULL',
                parameters=self._bind(_ids(delta.column("id")), float(when_mjd)),
            )
        return counts

    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        """Close the open version of these objects (they leave the latest table); return how many.
        Unknown ids raise LookupError, or are skipped with ``missing_ok``."""
        ids = np.unique(np.asarray(object_ids, dtype=np.int64))
        history, latest = self._t("DiaObject"), self._t(LATEST_TABLE)

        def work(cur: Any) -> int:
            cur.execute(
                f'SELECT DISTINCT "diaObjectId" FROM {history} WHERE "diaObjectId" = ANY($1::bigint[])',
                parameters=self._bind(_ids(ids)),
            )
            known = np.asarray(cur.fetch_arrow_table().column(0).to_numpy(), dtype=np.int64)
            unknown = np.setdiff1d(ids, known)
            if len(unknown) and not missing_ok:
                raise UnknownIdError(f"unknown DiaObject ids: {unknown[:20].tolist()}")
            cur.execute(
                f'WITH closed AS (UPDATE {history} SET "validityEndMjdTai" = $2 '
                'WHERE "validityEndMjdTai" IS NULL AND "diaObjectId" = ANY($1::bigint[]) '
                'RETURNING "diaObjectId", ra, dec), '
                f'gone AS (DELETE FROM {latest} WHERE "diaObjectId" = ANY($1::bigint[])) '
                'SELECT * FROM closed ORDER BY "diaObjectId"',
                parameters=self._bind(_ids(ids), float(when_mjd)),
            )
            closed = cur.fetch_arrow_table()
            if not closed.num_rows:
                return 0
            self._log_update(cur, "set_validity_end", when_mjd, closing_payload(closed, when_mjd))
            return int(closed.num_rows)

        return self._run("set_validity_end", work)

    def objects_since(self, since_mjd: float) -> pa.Table:
        """Latest versions of objects whose version started at or after ``since_mjd``."""
        rows = self._read(
            "dedup read",
            f"SELECT * FROM {self._t(LATEST_TABLE)} "
            "WHERE \"validityStartMjdTai\" >= current_setting('diadb.p1')::float8",
            {"diadb.p1": repr(float(since_mjd))},
        )
        return self._packer.expand("DiaObject", rows)

    # ---- schema evolution ----------------------------------------------------------
    def upgrade_layout(self, from_version: str) -> list[str]:
        """Migrate diadb's own tables from an older layout, in one transaction (as SQLite does)."""
        steps: list[str] = []
        if not from_version.startswith("1.0."):
            return steps
        visits, chunks = self._t("diadb_visit"), self._t("diadb_chunk")

        def work(cur: Any) -> None:
            # The lock partition DDL and retention take: no partition appears or goes meanwhile.
            cur.execute(
                "SELECT pg_advisory_xact_lock($1::integer, 0)", parameters=self._bind(self._lock_space)
            )
            cur.fetchall()
            for stmt in self._change_log_ddl():
                cur.execute(stmt)
            cur.execute(f"ALTER TABLE {visits} ADD COLUMN chunk_id BIGINT")
            # One store chunk per visit already stored, in the order they were stored.
            cur.execute(
                f"INSERT INTO {chunks} (chunk_id, kind, visit, detector, visit_mjd_tai, created_at, "
                "published) SELECT row_number() OVER (ORDER BY stored_at, visit, detector), 'store', visit, "
                f"detector, visit_mjd_tai, stored_at, false FROM {visits}"
            )
            cur.execute(
                f"UPDATE {visits} v SET chunk_id = c.chunk_id FROM {chunks} c "
                "WHERE c.visit = v.visit AND c.detector = v.detector"
            )
            cur.execute(
                f"UPDATE {self._t('diadb_chunk_counter')} "
                f"SET last_id = (SELECT COALESCE(max(chunk_id), 0) FROM {chunks})"
            )
            # Layout 1.0 did not record which store wrote an object version: a version that
            # started at a visit's time is attributed to that visit's chunk.
            cur.execute(
                f'INSERT INTO {self._t("diadb_chunk_object")} (visit, detector, "diaObjectId", '
                '"validityStartMjdTai") SELECT c.visit, c.detector, o."diaObjectId", o."validityStartMjdTai" '
                f'FROM {self._t("DiaObject")} o JOIN {chunks} c ON c.visit_mjd_tai = o."validityStartMjdTai"'
            )
            cur.execute(
                f"UPDATE {self._t('diadb_metadata')} SET value = 'partitioned-by-time-2' "
                "WHERE key = 'postgres.layout'"
            )

        self._run("layout upgrade", work)
        steps.append("layout 1.0 -> 1.1: change log tables (chunks backfilled from the visit registry)")
        return steps

    def count_unassociated(self) -> int:
        t = self._read("count", f'SELECT count(*) FROM {self._t(LATEST_TABLE)} WHERE "nDiaSources" = 1')
        return int(t.column(0)[0].as_py())
