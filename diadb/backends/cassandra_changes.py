"""Cassandra: the change log (replica chunks), the daytime updates and schema evolution.

The same semantics as the SQLite and PostgreSQL backends (``diadb.backends.sqlite.changes``):
every store and every daytime call is one chunk, and chunk ids follow commit order. Cassandra
has no multi-partition transactions, so this is how it holds:

Chunk ids
    ``diadb_chunk`` is partitioned by ``bucket = chunk_id >> CHUNK_BITS`` and carries a static
    column ``last_id`` (the bucket's newest id). An id is taken by one lightweight transaction
    (Paxos) on the bucket's partition: a conditional batch ``UPDATE ... SET last_id = N + 1 IF
    last_id = N`` together with the INSERT of chunk row N + 1. Allocation and the chunk row are
    thus one atomic, linearizable step, and taking N + 2 needs N + 1 committed first: a reader
    that sees chunk N + 1 sees chunk N. The LWT is the *last* write of an operation (its rows are
    written, at the write consistency, before it), so a visible chunk's rows are all there.
Idempotency (a retry after a failure converges)
    Before its first write an operation records itself in ``diadb_pending`` (keyed by the store's
    visit/detector, or by a hash of a daytime call's arguments) with a fresh operation id, the
    newest chunk id at that moment and, for daytime calls, the complete plan of what it will
    write (absolute values: new source columns, new ``nDiaSources``, objects closed). A retry
    finds that record, re-applies the recorded plan (upserts of the same values), and looks for
    a chunk carrying its operation id (``op``) after the recorded id before taking a new one: a
    crash at any point leaves at most one chunk per operation. The record is deleted last.
Validation
    Every id is looked up (key registries, latest-object table) and the whole plan is computed
    before anything is written: unknown ids raise ``LookupError`` and nothing changes.
Not atomic
    Readers can see part of a daytime update's rows (or a store's) before its chunk exists; an
    operation that fails and is never retried leaves its partial writes (and its pending
    record); two concurrent daytime calls that touch the same objects race (last write wins).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array
from diadb.backends.common.members import member_keys
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.common.packing import RowPacker
from diadb.errors import StorageError, UnknownIdError
from diadb.schema.model import HEALPIX_COLUMN, ColumnSpec
from diadb.updates import (
    CURRENT_COLUMNS,
    FORCED_CURRENT,
    FORCED_KEY,
    MUTABLE_SOURCE_COLUMNS,
    closing_payload,
    empty_current,
    forced_payload,
    merge_changes,
    missing_keys,
    normalise_current,
    normalise_forced,
    object_counts,
    object_delta,
    require_known_forced,
    unset_only,
    update_payload,
)

if TYPE_CHECKING:
    from diadb.schema.model import ApdbSchema

#: Chunk ids per ``diadb_chunk`` partition (bucket); ids start at 1.
CHUNK_BITS = 18
HISTORY_TABLE = "DiaObject"
TIME_COLUMN = "midpointMjdTai"
PART = "apdb_part"
BUCKET = "apdb_bucket"
#: Columns of daytime changes that carry the call's time (left out of its idempotency key).
_TIME_CHANGES = ("ssObjectReassocTimeMjdTai", "timeWithdrawnMjdTai")

Statements = list[tuple[Any, Sequence[Any]]]


def change_log_ddl(t: Callable[[str], str]) -> list[str]:
    """The change-log tables (``t`` qualifies a table name)."""
    return [
        f"CREATE TABLE IF NOT EXISTS {t('diadb_chunk')} (bucket int, chunk_id bigint, last_id bigint static, "
        "kind text, visit bigint, detector int, visit_mjd_tai double, stored_at text, op uuid, "
        "published boolean, PRIMARY KEY ((bucket), chunk_id))",
        f"CREATE TABLE IF NOT EXISTS {t('diadb_update')} (op uuid, seq int, kind text, payload text, "
        "PRIMARY KEY ((op), seq))",
        f'CREATE TABLE IF NOT EXISTS {t("diadb_chunk_object")} (visit bigint, detector int, "diaObjectId" '
        'bigint, "validityStartMjdTai" double, PRIMARY KEY ((visit, detector), "diaObjectId", '
        '"validityStartMjdTai"))',
        f"CREATE TABLE IF NOT EXISTS {t('diadb_pending')} (op_key text PRIMARY KEY, op uuid, from_id bigint, "
        "plan text)",
        *keyed_ddl(t),
    ]


def keyed_ddl(t: Callable[[str], str]) -> list[str]:
    """The tables of keyed stores: the store keys, and the rows each keyed store wrote (its
    members: ``tbl`` names the table, ``k1..k3`` the primary key, ``start`` an object version's
    start; one row with ``tbl = ''`` marks the operation as keyed), by visit/detector."""
    return [
        f"CREATE TABLE IF NOT EXISTS {t('diadb_store_key')} (key text PRIMARY KEY, chunk_id bigint, op uuid)",
        f"CREATE TABLE IF NOT EXISTS {t('diadb_chunk_member')} (visit bigint, detector int, op uuid, "
        "tbl text, k1 bigint, k2 bigint, k3 bigint, start double, "
        "PRIMARY KEY ((visit, detector), op, tbl, k1, k2, k3))",
    ]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _changes_key(kind: str, changes: pa.Table) -> str:
    """A daytime call's idempotency key: its kind and changes, without the call's time."""
    cols = sorted(c for c in changes.column_names if c not in _TIME_CHANGES)
    t = changes.select(cols).sort_by([("diaSourceId", "ascending")])
    return f"{kind}:" + _digest(cols, [t.column(c).to_pylist() for c in cols])


class CassandraChanges:
    """Mixed into ``CassandraBackend``; uses its helpers."""

    if TYPE_CHECKING:
        keyspace: str
        _session: Any
        _read_cl: Any
        _write_cl: Any
        _cl: Any
        _chunk_bucket: int | None
        _keyed_ready: bool

        @property
        def schema(self) -> ApdbSchema: ...

        def _t(self, table: str) -> str: ...
        def _prepare(self, cql: str) -> Any: ...
        def _ddl(self, cql: str) -> None: ...
        def _run(
            self, statements: Sequence[tuple[Any, Sequence[Any]]], *, write: bool
        ) -> list[list[Any]]: ...
        def _writes(
            self, table: str, data: pa.Table, partition: Sequence[str], *, unset_nulls: bool
        ) -> Statements: ...
        def _lookup_keys(self, table: str, keys: pa.Table) -> pa.Table: ...
        def _bucket(self, ids: np.ndarray) -> np.ndarray: ...
        def _pixel(self, h29: np.ndarray) -> np.ndarray: ...
        def time_partition(self, mjd: float | np.ndarray) -> Any: ...
        def time_partitions(self) -> dict[str, list[int]]: ...
        def _table_names(self) -> set[str]: ...
        def _to_arrow(
            self, spec_columns: Mapping[str, str], columns: Sequence[str], rows: list[Any]
        ) -> pa.Table: ...
        def _read_metadata_raw(self) -> dict[str, str]: ...

        _packer: RowPacker

        def _decode(self, table: str, columns: Sequence[str], rows: list[Any]) -> pa.Table: ...

    @staticmethod
    def _partition_table(table: str, part: int) -> str:
        return f"{table}_{int(part)}"

    # ---- chunk ids -----------------------------------------------------------------
    def _chunk_head(self) -> tuple[int, int | None]:
        """(newest bucket, its ``last_id`` or None when it has no chunk yet)."""
        if self._chunk_bucket is None:
            (rows,) = self._run(
                [(self._prepare(f"SELECT DISTINCT bucket FROM {self._t('diadb_chunk')}"), ())], write=False
            )
            self._chunk_bucket = max((int(r[0]) for r in rows), default=0)
        b = self._chunk_bucket
        stmt = self._prepare(f"SELECT last_id FROM {self._t('diadb_chunk')} WHERE bucket = ? LIMIT 1")
        stmt.consistency_level = self._cl.SERIAL
        while True:
            rows = list(self._session.execute(stmt, (b,), timeout=60))
            last = None if not rows or rows[0][0] is None else int(rows[0][0])
            if last is not None and last >= ((b + 1) << CHUNK_BITS) - 1:
                b += 1
                continue
            self._chunk_bucket = b
            return b, last

    def _last_chunk_id(self) -> int:
        b, last = self._chunk_head()
        return last if last is not None else max(0, (b << CHUNK_BITS) - 1)

    def _find_chunk(self, op: uuid.UUID, after: int) -> int | None:
        """The chunk taken by operation ``op`` (id > ``after``), if any."""
        head, _ = self._chunk_head()
        stmt = self._prepare(
            f"SELECT chunk_id FROM {self._t('diadb_chunk')} WHERE bucket = ? AND chunk_id > ? AND op = ? "
            "ALLOW FILTERING"
        )
        stmt.consistency_level = self._cl.SERIAL
        for b in range((after + 1) >> CHUNK_BITS, head + 1):
            rows = list(self._session.execute(stmt, (b, after, op), timeout=60))
            if rows:
                return int(rows[0][0])
        return None

    def _take_chunk(
        self,
        op: uuid.UUID,
        after: int,
        kind: str,
        visit: int | None,
        detector: int | None,
        mjd: float | None,
        *,
        retry: bool,
    ) -> int:
        """The operation's chunk: the one it already took (a retry), or a new one taken by an
        LWT on the newest bucket together with the chunk row (see the module docstring)."""
        from cassandra.query import BatchStatement  # type: ignore[import-untyped]

        if retry:
            found = self._find_chunk(op, after)
            if found is not None:
                return found
        take = self._prepare(
            f"UPDATE {self._t('diadb_chunk')} SET last_id = ? WHERE bucket = ? IF last_id = ?"
        )
        row = self._prepare(
            f"INSERT INTO {self._t('diadb_chunk')} (bucket, chunk_id, kind, visit, detector, visit_mjd_tai, "
            "stored_at, op) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        b, last = self._chunk_head()
        stored_at = _dt.datetime.now(_dt.UTC).isoformat()
        for _ in range(10_000):
            new = max(1, b << CHUNK_BITS) if last is None else last + 1
            if new >> CHUNK_BITS != b:  # the bucket is full: the next one starts
                b, last = b + 1, None
                continue
            batch = BatchStatement(serial_consistency_level=self._cl.SERIAL, consistency_level=self._write_cl)
            batch.add(take, (new, b, last))
            batch.add(row, (b, new, kind, visit, detector, mjd, stored_at, op))
            try:
                result = self._session.execute(batch, timeout=60)
            except Exception as e:  # a timed-out LWT may still have been applied
                found = self._find_chunk(op, after)
                if found is not None:
                    return found
                raise StorageError(
                    f"Cassandra change-log write failed in keyspace {self.keyspace}: {e}"
                ) from e
            first = result.one()
            if first is not None and bool(first[0]):
                self._chunk_bucket = b
                return new
            # Another writer took it: continue from the id it wrote.
            names = list(getattr(result, "column_names", None) or [])
            current = first[names.index("last_id")] if first is not None and "last_id" in names else None
            if current is None:
                b, last = self._chunk_head()
            else:
                last = int(current)
        raise StorageError(f"Cassandra change log of {self.keyspace}: no chunk id after 10000 attempts")

    # ---- pending operations --------------------------------------------------------
    def _begin(self, op_key: str, plan: str | None) -> tuple[uuid.UUID, int, str | None, bool]:
        """(operation id, newest chunk id before it, its recorded plan, whether it is a retry)."""
        stmt = self._prepare(f"SELECT op, from_id, plan FROM {self._t('diadb_pending')} WHERE op_key = ?")
        (rows,) = self._run([(stmt, (op_key,))], write=False)
        if rows:
            op, after, recorded = rows[0]
            return op, int(after), recorded, True
        op = uuid.uuid4()
        after = self._last_chunk_id()
        ins = self._prepare(
            f"INSERT INTO {self._t('diadb_pending')} (op_key, op, from_id, plan) VALUES (?, ?, ?, ?)"
        )
        self._run([(ins, (op_key, op, after, plan))], write=True)
        return op, after, plan, False

    def _pending(self, op_key: str) -> bool:
        stmt = self._prepare(f"SELECT op FROM {self._t('diadb_pending')} WHERE op_key = ?")
        (rows,) = self._run([(stmt, (op_key,))], write=False)
        return bool(rows)

    def _end(self, op_key: str) -> None:
        stmt = self._prepare(f"DELETE FROM {self._t('diadb_pending')} WHERE op_key = ?")
        self._run([(stmt, (op_key,))], write=True)

    def _ensure_keyed_tables(self) -> None:
        """Keyspaces made before keyed stores get their two tables on the first keyed store."""
        if getattr(self, "_keyed_ready", False):
            return
        if not {"diadb_store_key", "diadb_chunk_member"} <= self._table_names():
            for ddl in keyed_ddl(self._t):
                self._ddl(ddl)
        self._keyed_ready = True

    def _member_writes(self, batch: Any, op: uuid.UUID) -> Statements:
        """The membership rows of a keyed store (see ``keyed_ddl``), one partition."""
        pieces: list[pa.Table] = [pa.table({"tbl": [""], "k1": [0], "k2": [0], "k3": [0], "start": [None]})]
        for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
            if not data.num_rows:
                continue
            # Unused key columns are 0: a Cassandra clustering column cannot be null.
            keys = [pc.fill_null(k, 0) for k in member_keys(self.schema.table(name), data)]
            pieces.append(
                pa.table(
                    {
                        "tbl": pa.repeat(pa.scalar(name), data.num_rows),
                        "k1": keys[0],
                        "k2": keys[1],
                        "k3": keys[2],
                        "start": pa.nulls(data.num_rows, pa.float64()),
                    }
                )
            )
        objs = batch.objects
        if objs.num_rows:
            zeros = pa.array(np.zeros(objs.num_rows, dtype=np.int64))
            pieces.append(
                pa.table(
                    {
                        "tbl": pa.repeat(pa.scalar(HISTORY_TABLE), objs.num_rows),
                        "k1": objs.column("diaObjectId").cast(pa.int64()),
                        "k2": zeros,
                        "k3": zeros,
                        "start": objs.column("validityStartMjdTai").cast(pa.float64()),
                    }
                )
            )
        schema = pa.schema(
            [
                ("tbl", pa.string()),
                ("k1", pa.int64()),
                ("k2", pa.int64()),
                ("k3", pa.int64()),
                ("start", pa.float64()),
            ]
        )
        members = pa.concat_tables([p.cast(schema) for p in pieces])
        n = members.num_rows
        head = pa.table(
            {
                "visit": pa.array(np.full(n, batch.visit, dtype=np.int64)),
                "detector": pa.array(np.full(n, batch.detector, dtype=np.int32)),
                "op": pa.repeat(pa.scalar(op.bytes, pa.binary()), n),
            }
        )
        for c in members.column_names:
            head = head.append_column(c, members.column(c))
        return self._writes("diadb_chunk_member", head, ["visit", "detector"], unset_nulls=True)

    def _members(self, stores: list[dict[str, Any]]) -> dict[int, pa.Table | None]:
        """Per store chunk: the rows it wrote (``tbl, k1, k2, k3, start``) when it is a keyed store;
        for a plain store, ``None`` and, under key ``-chunk_id - 1``, the members of every keyed
        store of its visit/detector (rows a plain store did not write)."""
        out: dict[int, pa.Table | None] = {}
        if not stores or "diadb_chunk_member" not in self._table_names():
            return out
        cols = ["tbl", "k1", "k2", "k3", "start"]
        types = {"tbl": "string", "k1": "long", "k2": "long", "k3": "long", "start": "double"}
        mine = self._prepare(
            f"SELECT {', '.join(cols)} FROM {self._t('diadb_chunk_member')} WHERE visit = ? AND detector = ? "
            "AND op = ?"
        )
        every = self._prepare(
            f"SELECT {', '.join(cols)} FROM {self._t('diadb_chunk_member')} WHERE visit = ? AND detector = ?"
        )
        results = self._run(
            [(mine, (int(c["visit"]), int(c["detector"]), uuid.UUID(c["op"]))) for c in stores]
            + [(every, (int(c["visit"]), int(c["detector"]))) for c in stores],
            write=False,
        )
        for i, c in enumerate(stores):
            own = self._to_arrow(types, cols, results[i])
            if own.num_rows:
                out[int(c["chunk_id"])] = own
            else:
                out[int(c["chunk_id"])] = None
                out[-int(c["chunk_id"]) - 1] = self._to_arrow(types, cols, results[len(stores) + i])
        return out

    def _chunk_object_writes(self, visit: int, detector: int, objects: pa.Table) -> Statements:
        n = objects.num_rows
        if not n:
            return []
        keys = pa.table(
            {
                "visit": pa.array(np.full(n, visit, dtype=np.int64)),
                "detector": pa.array(np.full(n, detector, dtype=np.int32)),
                "diaObjectId": objects.column("diaObjectId").cast(pa.int64()),
                "validityStartMjdTai": objects.column("validityStartMjdTai").cast(pa.float64()),
            }
        )
        return self._writes("diadb_chunk_object", keys, ["visit", "detector"], unset_nulls=False)

    def _run_update(
        self, op_key: str, kind: str, when_mjd: float, plan: dict[str, Any] | None
    ) -> tuple[int, dict[str, Any] | None]:
        """Record (or find) the pending plan, apply it, take the chunk; (chunk, plan applied)."""
        if plan is None and not self._pending(op_key):
            return 0, None
        op, after, recorded, retry = self._begin(op_key, None if plan is None else json.dumps(plan))
        if recorded is None:
            self._end(op_key)
            return 0, None
        done: dict[str, Any] = json.loads(recorded)
        self._apply_plan(op, done)
        chunk = self._take_chunk(op, after, "update", None, None, float(done["when"]), retry=retry)
        self._end(op_key)
        return chunk, done

    def _apply_plan(self, op: uuid.UUID, plan: dict[str, Any]) -> None:
        """Write a daytime plan: its update records, then the rows (absolute values: idempotent)."""
        records = self._prepare(
            f"INSERT INTO {self._t('diadb_update')} (op, seq, kind, payload) VALUES (?, ?, ?, ?)"
        )
        self._run(
            [(records, (op, i, plan["kind"], json.dumps(p))) for i, p in enumerate(plan["payloads"])],
            write=True,
        )
        statements: Statements = []
        sets = ", ".join(f"{_q(c)} = ?" for c in MUTABLE_SOURCE_COLUMNS)
        for tpart, part, h29, t, sid, *values in plan.get("sources", []):
            stmt = self._prepare(
                f"UPDATE {self._t(self._partition_table('DiaSource', tpart))} SET {sets} WHERE {PART} = ? "
                f"AND {_q(HEALPIX_COLUMN)} = ? AND {_q(TIME_COLUMN)} = ? AND {_q('diaSourceId')} = ?"
            )
            statements.append((stmt, (*values, part, h29, t, sid)))
        for tpart, part, h29, t, oid, visit, det, when in plan.get("forced", []):
            stmt = self._prepare(
                f"UPDATE {self._t(self._partition_table('DiaForcedSource', tpart))} "
                f"SET {_q('timeWithdrawnMjdTai')} = ? WHERE {PART} = ? AND {_q(HEALPIX_COLUMN)} = ? "
                f"AND {_q(TIME_COLUMN)} = ? AND {_q('diaObjectId')} = ? AND visit = ? AND detector = ?"
            )
            statements.append((stmt, (when, part, h29, t, oid, visit, det)))
        latest_where = f"WHERE {PART} = ? AND {_q(HEALPIX_COLUMN)} = ? AND {_q('diaObjectId')} = ?"
        history_where = f"WHERE {BUCKET} = ? AND {_q('diaObjectId')} = ? AND {_q('validityStartMjdTai')} = ?"
        count_latest = self._prepare(
            f"UPDATE {self._t(LATEST_TABLE)} SET {_q('nDiaSources')} = ? {latest_where}"
        )
        count_history = self._prepare(
            f"UPDATE {self._t(HISTORY_TABLE)} SET {_q('nDiaSources')} = ? {history_where}"
        )
        close = self._prepare(
            f"UPDATE {self._t(HISTORY_TABLE)} SET {_q('validityEndMjdTai')} = ? {history_where}"
        )
        gone = self._prepare(f"DELETE FROM {self._t(LATEST_TABLE)} {latest_where}")
        for oid, start, part, h29, count, closed_at in plan.get("objects", []):
            bucket = int(self._bucket(np.array([oid]))[0])
            if count is not None:
                statements.append((count_history, (count, bucket, oid, start)))
            if closed_at is not None:
                statements.append((close, (closed_at, bucket, oid, start)))
                statements.append((gone, (part, h29, oid)))
            elif count is not None:
                statements.append((count_latest, (count, part, h29, oid)))
        self._run(statements, write=True)

    # ---- the change log ------------------------------------------------------------
    def _chunk_table(
        self, buckets: Sequence[int] | None = None, ids: Sequence[int] | None = None
    ) -> pa.Table:
        cols = ["chunk_id", "kind", "visit", "detector", "visit_mjd_tai", "stored_at", "published", "op"]
        sel = ", ".join(cols)
        if ids is not None:
            arr = np.unique(np.asarray(ids, dtype=np.int64))
            stmt = self._prepare(
                f"SELECT {sel} FROM {self._t('diadb_chunk')} WHERE bucket = ? AND chunk_id IN ?"
            )
            statements: Statements = []
            for b in np.unique(arr >> CHUNK_BITS).tolist():
                members = arr[(arr >> CHUNK_BITS) == b]
                for part in np.array_split(members, -(-len(members) // 1000)):
                    statements.append((stmt, (int(b), part.tolist())))
        else:
            if buckets is None:
                (rows,) = self._run(
                    [(self._prepare(f"SELECT DISTINCT bucket FROM {self._t('diadb_chunk')}"), ())],
                    write=False,
                )
                buckets = sorted(int(r[0]) for r in rows)
            stmt = self._prepare(f"SELECT {sel} FROM {self._t('diadb_chunk')} WHERE bucket = ?")
            statements = [(stmt, (b,)) for b in buckets]
        rows = [r for rs in self._run(statements, write=False) for r in rs if r[0] is not None]
        rows.sort(key=lambda r: r[0])
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [() for _ in cols]
        return pa.table(
            {
                "chunk_id": pa.array(columns[0], pa.int64()),
                "kind": pa.array(columns[1], pa.string()),
                "visit": pa.array(columns[2], pa.int64()),
                "detector": pa.array(columns[3], pa.int64()),
                "visit_mjd_tai": pa.array(columns[4], pa.float64()),
                "stored_at": pa.array(columns[5], pa.string()),
                "published": pa.array([bool(p) for p in columns[6]], pa.bool_()),
                "op": pa.array([str(o) for o in columns[7]], pa.string()),
            }
        )

    def list_chunks(self, published: bool | None = None) -> pa.Table:
        t = self._chunk_table()
        if published is not None:
            t = t.filter(pc.equal(t.column("published"), published))
        return t.drop_columns(["op"])

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        ids = np.unique(np.asarray(chunk_ids, dtype=np.int64))
        if not len(ids):
            return
        # Only existing chunks (an UPDATE would create a row for an id never taken).
        found = self._chunk_table(ids=ids.tolist()).column("chunk_id").to_numpy()
        stmt = self._prepare(
            f"UPDATE {self._t('diadb_chunk')} SET published = true WHERE bucket = ? AND chunk_id = ?"
        )
        self._run([(stmt, (int(i) >> CHUNK_BITS, int(i))) for i in found.tolist()], write=True)

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        """Rows written by these store chunks (``_chunk_id`` first; sources found through the SAI
        index on ``visit``, object versions through ``diadb_chunk_object``) and update records."""
        chunks = self._chunk_table(ids=list(chunk_ids))
        stores = chunks.filter(pc.equal(chunks.column("kind"), "store")).to_pylist()
        updates = chunks.filter(pc.equal(chunks.column("kind"), "update")).to_pylist()
        out: dict[str, pa.Table] = {}
        parts = self.time_partitions()
        members = self._members(stores)
        for table in ("DiaSource", "DiaForcedSource"):
            spec = self.schema.table(table)
            types = {c.name: c.datatype for c in spec.columns}
            cols = [*spec.column_names, HEALPIX_COLUMN]
            physical = self._packer.physical(table, cols)
            sel = ", ".join(_q(c) for c in physical)
            statements: Statements = []
            owners: list[tuple[int, int]] = []
            for p in parts[table]:
                stmt = self._prepare(
                    f"SELECT {sel} FROM {self._t(self._partition_table(table, p))} WHERE visit = ?"
                )
                for c in stores:
                    statements.append((stmt, (int(c["visit"]),)))
                    owners.append((int(c["chunk_id"]), int(c["detector"])))
            pieces = []
            det_at = physical.index("detector")
            for (chunk, det), rows in zip(owners, self._run(statements, write=False), strict=True):
                mine = [r for r in rows if det == -1 or r[det_at] == det]
                if mine:
                    t = self._only_members(table, self._decode(table, cols, mine), members, chunk)
                    pieces.append(
                        t.add_column(0, "_chunk_id", pa.array(np.full(t.num_rows, chunk), pa.int64()))
                    )
            out[table] = self._concat(pieces, types, cols)
        out[HISTORY_TABLE] = self._chunk_objects(stores, members)
        out["updates"] = self._update_records(updates)
        return out

    def _concat(self, pieces: list[pa.Table], types: Mapping[str, str], cols: Sequence[str]) -> pa.Table:
        if pieces:
            return pa.concat_tables(pieces)
        empty = self._to_arrow(types, cols, [])
        return empty.add_column(0, "_chunk_id", pa.array([], pa.int64()))

    def _only_members(
        self, table: str, rows: pa.Table, members: Mapping[int, pa.Table | None], chunk: int
    ) -> pa.Table:
        """The rows of ``chunk`` among its visit/detector's ``rows``: a keyed store's own members;
        for a plain store, all but the members of keyed stores."""
        own = members.get(chunk)
        listed = own if own is not None else members.get(-chunk - 1)
        if listed is None:
            return rows
        listed = listed.filter(pc.equal(listed.column("tbl"), table))
        if own is None and not listed.num_rows:
            return rows
        pk = list(self.schema.table(table).primary_key)
        keys = pa.table(
            {
                c: listed.column(k).cast(rows.schema.field(c).type)
                for c, k in zip(pk, ("k1", "k2", "k3"), strict=False)
            }
        )
        kind = "left semi" if own is not None else "left anti"
        return rows.join(keys, keys=pk, join_type=kind)

    def _chunk_objects(
        self, stores: list[dict[str, Any]], members: Mapping[int, pa.Table | None] | None = None
    ) -> pa.Table:
        spec = self.schema.table(HISTORY_TABLE)
        types = {c.name: c.datatype for c in spec.columns}
        cols = [*spec.column_names, HEALPIX_COLUMN]
        keys_stmt = self._prepare(
            f'SELECT "diaObjectId", "validityStartMjdTai" FROM {self._t("diadb_chunk_object")} '
            "WHERE visit = ? AND detector = ?"
        )
        found = self._run([(keys_stmt, (int(c["visit"]), int(c["detector"]))) for c in stores], write=False)
        for i, c in enumerate(stores):
            own = (members or {}).get(int(c["chunk_id"]))
            if own is not None:  # a keyed store: its own object versions
                objs = own.filter(pc.equal(own.column("tbl"), HISTORY_TABLE))
                found[i] = list(
                    zip(objs.column("k1").to_pylist(), objs.column("start").to_pylist(), strict=True)
                )
        physical = self._packer.physical(HISTORY_TABLE, cols)
        sel = ", ".join(_q(c) for c in physical)
        stmt = self._prepare(
            f'SELECT {sel} FROM {self._t(HISTORY_TABLE)} WHERE {BUCKET} = ? AND "diaObjectId" IN ?'
        )
        pieces = []
        start_at = physical.index("validityStartMjdTai")
        for c, keys in zip(stores, found, strict=True):
            if not keys:
                continue
            wanted = {(int(i), float(s)) for i, s in keys}
            ids = np.unique(np.asarray([k[0] for k in wanted], dtype=np.int64))
            buckets = self._bucket(ids)
            statements: Statements = []
            for b in np.unique(buckets).tolist():
                in_bucket = ids[buckets == b]
                for part in np.array_split(in_bucket, -(-len(in_bucket) // 500)):
                    statements.append((stmt, (int(b), part.tolist())))
            rows = [r for rs in self._run(statements, write=False) for r in rs]
            id_at = physical.index("diaObjectId")
            mine = [r for r in rows if (int(r[id_at]), float(r[start_at])) in wanted]
            if mine:
                t = self._decode(HISTORY_TABLE, cols, mine)
                n = t.num_rows
                pieces.append(t.add_column(0, "_chunk_id", pa.array(np.full(n, c["chunk_id"]), pa.int64())))
        return self._concat(pieces, types, cols)

    def _update_records(self, updates: list[dict[str, Any]]) -> pa.Table:
        stmt = self._prepare(f"SELECT seq, kind, payload FROM {self._t('diadb_update')} WHERE op = ?")
        found = self._run([(stmt, (uuid.UUID(c["op"]),)) for c in updates], write=False)
        out: dict[str, list[Any]] = {"chunk_id": [], "seq": [], "kind": [], "payload": []}
        for c, rows in zip(updates, found, strict=True):
            for seq, kind, payload in sorted(rows, key=lambda r: int(r[0])):
                out["chunk_id"].append(int(c["chunk_id"]))
                out["seq"].append(int(seq))
                out["kind"].append(str(kind))
                out["payload"].append(str(payload))
        return pa.table(
            {
                "chunk_id": pa.array(out["chunk_id"], pa.int64()),
                "seq": pa.array(out["seq"], pa.int64()),
                "kind": pa.array(out["kind"], pa.string()),
                "payload": pa.array(out["payload"], pa.string()),
            }
        )

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, Any]], when_mjd: float) -> int:
        records = [dict(p) for p in payloads]
        op_key = "log:" + _digest(kind, records, when_mjd)
        plan = {"kind": kind, "when": when_mjd, "payloads": records}
        chunk, _ = self._run_update(op_key, kind, when_mjd, plan)
        return chunk

    # ---- reading current values ----------------------------------------------------
    def _current_sources(self, ids: Int64Array) -> pa.Table:
        """``CURRENT_COLUMNS`` of the stored DiaSources among ``ids`` (found through the key
        registry, which records where each one lives)."""
        keys = self._lookup_keys("DiaSource", pa.table({"diaSourceId": np.unique(ids)}))
        if not keys.num_rows:
            return empty_current()
        sel = ", ".join(_q(c) for c in CURRENT_COLUMNS)
        h29 = np.asarray(keys.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        t = np.asarray(keys.column(TIME_COLUMN).to_numpy(), dtype=np.float64)
        sid = np.asarray(keys.column("diaSourceId").to_numpy(), dtype=np.int64)
        tparts = self.time_partition(t)
        pix = self._pixel(h29)
        existing = set(self.time_partitions()["DiaSource"])
        statements: Statements = []
        for i in range(len(sid)):
            if int(tparts[i]) not in existing:
                continue
            physical = self._t(self._partition_table("DiaSource", tparts[i]))
            stmt = self._prepare(
                f"SELECT {sel} FROM {physical} WHERE {PART} = ? "
                f"AND {_q(HEALPIX_COLUMN)} = ? AND {_q(TIME_COLUMN)} = ? AND {_q('diaSourceId')} = ?"
            )
            statements.append((stmt, (int(pix[i]), int(h29[i]), float(t[i]), int(sid[i]))))
        rows = [r for rs in self._run(statements, write=False) for r in rs]
        types = {c.name: c.datatype for c in self.schema.table("DiaSource").columns}
        return normalise_current(self._to_arrow(types, list(CURRENT_COLUMNS), rows))

    def _latest_objects(self, ids: Int64Array) -> pa.Table:
        """Current (latest-table) rows of these objects: id, ra, dec, nDiaSources, start, part, h29."""
        keys = self._lookup_keys("DiaObject", pa.table({"diaObjectId": np.unique(ids)}))
        cols = ["diaObjectId", "ra", "dec", "nDiaSources", "validityStartMjdTai", PART, HEALPIX_COLUMN]
        stmt = self._prepare(
            f"SELECT {', '.join(_q(c) for c in cols)} FROM {self._t(LATEST_TABLE)} WHERE {PART} = ? "
            f"AND {_q(HEALPIX_COLUMN)} = ? AND {_q('diaObjectId')} = ?"
        )
        statements: Statements = [
            (stmt, (int(p), int(h), int(i)))
            for i, p, h in zip(
                keys.column("diaObjectId").to_pylist(),
                keys.column(PART).to_pylist(),
                keys.column(HEALPIX_COLUMN).to_pylist(),
                strict=True,
            )
        ]
        rows = [r for rs in self._run(statements, write=False) for r in rs]
        types = {c.name: c.datatype for c in self.schema.table("DiaObject").columns}
        types[PART] = "int"
        return self._to_arrow(types, cols, rows)

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
        """Set mutable DiaSource columns; return the chunk id (0 when nothing changed). Every id
        is checked and the whole plan computed before the first write (LookupError naming unknown
        ids: nothing changes); see the module docstring for what is atomic and how a retry converges."""
        ids = np.asarray(changes.column("diaSourceId").to_numpy(), dtype=np.int64)
        op_key = _changes_key(kind, changes)
        current = self._current_sources(ids)
        rest = np.setdiff1d(ids, np.asarray(current.column("diaSourceId").to_numpy(), dtype=np.int64))
        if len(rest):
            in_segments = segment_lookup(rest)  # no history tier here: nothing is found
            missing = np.setdiff1d(
                rest, np.asarray(in_segments.column("diaSourceId").to_numpy(), dtype=np.int64)
            )
            if len(missing):
                raise UnknownIdError(f"unknown DiaSource ids: {missing[:20].tolist()}")
            raise StorageError("Cassandra has no history tier: sources in segments cannot be updated")
        if "diaObjectId" in changes.column_names:
            targets = np.unique(pc.drop_null(changes.column("diaObjectId")).to_numpy()).astype(np.int64)
            if len(targets):
                found = self._latest_objects(targets)
                unknown = np.setdiff1d(targets, np.asarray(found.column(0).to_numpy(), dtype=np.int64))
                if len(unknown):
                    raise UnknownIdError(f"unknown DiaObject ids: {unknown[:20].tolist()}")
        current, changed = unset_only(current, changes, only_null)
        plan: dict[str, Any] | None = None
        if current.num_rows:
            new = merge_changes(current, changed)
            counts: list[dict[str, Any]] = []
            objects: list[list[Any]] = []
            if object_deltas:
                delta = object_delta(current, new, increment, decrement)
                if delta.num_rows:
                    latest = self._latest_objects(np.asarray(delta.column("id").to_numpy(), dtype=np.int64))
                    pos = pc.index_in(latest.column("diaObjectId"), value_set=delta.column("id"))
                    d = np.asarray(delta.column("delta").take(pos).to_numpy(), dtype=np.int64)
                    n_new = np.asarray(latest.column("nDiaSources").to_numpy(), dtype=np.int64) + d
                    latest = latest.set_column(3, "nDiaSources", pa.array(n_new))
                    counts = object_counts(latest.select([0, 1, 2, 3]).sort_by("diaObjectId"))
                    for row in latest.to_pylist():
                        empty = remove_empty and row["nDiaSources"] <= 0
                        objects.append(
                            [
                                row["diaObjectId"],
                                row["validityStartMjdTai"],
                                row[PART],
                                row[HEALPIX_COLUMN],
                                row["nDiaSources"],
                                when_mjd if empty else None,
                            ]
                        )
            tparts = self.time_partition(np.asarray(new.column(TIME_COLUMN).to_numpy(), dtype=np.float64))
            h29 = np.asarray(new.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
            pix = self._pixel(h29)
            cols = [
                new.column(c).to_pylist() for c in ("midpointMjdTai", "diaSourceId", *MUTABLE_SOURCE_COLUMNS)
            ]
            sources = [
                [int(tparts[i]), int(pix[i]), int(h29[i]), *(c[i] for c in cols)] for i in range(new.num_rows)
            ]
            payload = update_payload(new, changed, when_mjd, counts)
            plan = {
                "kind": kind,
                "when": when_mjd,
                "payloads": [payload],
                "sources": sources,
                "objects": objects,
            }
        chunk, _ = self._run_update(op_key, kind, when_mjd, plan)
        return chunk

    def withdraw_forced_sources(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None = None,
    ) -> int:
        """Set ``timeWithdrawnMjdTai`` of these forced sources where it is not set yet; return the
        chunk (logged at ``logged_mjd``, default ``when_mjd``; 0 when none changed). LookupError
        for unknown keys, before any write."""
        logged = when_mjd if logged_mjd is None else logged_mjd
        keys = pa.table([keys.column(c).cast(pa.int64()) for c in FORCED_KEY], names=list(FORCED_KEY))
        op_key = "withdraw_forced:" + _digest([keys.column(c).to_pylist() for c in FORCED_KEY])
        spec = self.schema.table("DiaForcedSource")
        pk = list(spec.primary_key)
        typed = pa.table({c: keys.column(c).cast(spec.arrow_schema().field(c).type) for c in pk})
        found = self._lookup_keys("DiaForcedSource", typed)
        sel = ", ".join(_q(c) for c in FORCED_CURRENT)
        existing = set(self.time_partitions()["DiaForcedSource"])
        statements: Statements = []
        for r in found.to_pylist():
            tp = int(self.time_partition(r[TIME_COLUMN]))
            if tp not in existing:
                continue
            stmt = self._prepare(
                f"SELECT {sel} FROM {self._t(self._partition_table('DiaForcedSource', tp))} WHERE {PART} = ? "
                f"AND {_q(HEALPIX_COLUMN)} = ? AND {_q(TIME_COLUMN)} = ? AND {_q('diaObjectId')} = ? "
                "AND visit = ? AND detector = ?"
            )
            part = int(self._pixel(np.array([r[HEALPIX_COLUMN]]))[0])
            statements.append(
                (stmt, (part, r[HEALPIX_COLUMN], r[TIME_COLUMN], r["diaObjectId"], r["visit"], r["detector"]))
            )
        rows = [r for rs in self._run(statements, write=False) for r in rs]
        types = {c.name: c.datatype for c in spec.columns}
        in_engine = normalise_forced(self._to_arrow(types, list(FORCED_CURRENT), rows))
        rest = missing_keys(keys, in_engine)
        if rest.num_rows:
            in_segments = normalise_forced(segment_lookup(rest))
            require_known_forced(missing_keys(rest, in_segments))
            raise StorageError("Cassandra has no history tier: sources in segments cannot be updated")
        todo = in_engine.filter(pc.is_null(in_engine.column("timeWithdrawnMjdTai")))
        plan: dict[str, Any] | None = None
        if todo.num_rows:
            forced = [
                [
                    int(self.time_partition(r[TIME_COLUMN])),
                    int(self._pixel(np.array([r[HEALPIX_COLUMN]]))[0]),
                    r[HEALPIX_COLUMN],
                    r[TIME_COLUMN],
                    r["diaObjectId"],
                    r["visit"],
                    r["detector"],
                    when_mjd,
                ]
                for r in todo.to_pylist()
            ]
            payload = forced_payload(todo, when_mjd, logged)
            plan = {
                "kind": "withdraw_forced_sources",
                "when": logged,
                "payloads": [payload],
                "forced": forced,
            }
        chunk, _ = self._run_update(op_key, "withdraw_forced_sources", logged, plan)
        return chunk

    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        """Close the open versions of these objects (they leave the latest table); return how
        many. Unknown ids raise LookupError (unless ``missing_ok``) before any write."""
        ids = np.unique(np.asarray(object_ids, dtype=np.int64))
        known = self._lookup_keys("DiaObject", pa.table({"diaObjectId": ids}))
        unknown = np.setdiff1d(ids, np.asarray(known.column("diaObjectId").to_numpy(), dtype=np.int64))
        if len(unknown) and not missing_ok:
            raise UnknownIdError(f"unknown DiaObject ids: {unknown[:20].tolist()}")
        op_key = "set_validity_end:" + _digest(ids.tolist())
        latest = self._latest_objects(ids).sort_by("diaObjectId")
        plan: dict[str, Any] | None = None
        if latest.num_rows:
            objects = [
                [r["diaObjectId"], r["validityStartMjdTai"], r[PART], r[HEALPIX_COLUMN], None, when_mjd]
                for r in latest.to_pylist()
            ]
            payload = closing_payload(latest.select([0, 1, 2]), when_mjd)
            plan = {"kind": "set_validity_end", "when": when_mjd, "payloads": [payload], "objects": objects}
        _, done = self._run_update(op_key, "set_validity_end", when_mjd, plan)
        return 0 if done is None else len(done.get("objects", []))

    def objects_since(self, since_mjd: float) -> pa.Table:
        """Latest versions of objects whose version started at or after ``since_mjd`` (a scan)."""
        spec = self.schema.table(HISTORY_TABLE)
        cols = [*spec.column_names, HEALPIX_COLUMN]
        stmt = self._prepare(
            f"SELECT {', '.join(_q(c) for c in self._packer.physical(HISTORY_TABLE, cols))} FROM "
            f"{self._t(LATEST_TABLE)} WHERE {_q('validityStartMjdTai')} >= ? ALLOW FILTERING"
        )
        (rows,) = self._run([(stmt, (float(since_mjd),))], write=False)
        return self._decode(HISTORY_TABLE, cols, rows)

    def count_unassociated(self) -> int:
        stmt = self._prepare(
            f"SELECT count(*) FROM {self._t(LATEST_TABLE)} WHERE {_q('nDiaSources')} = 1 ALLOW FILTERING"
        )
        (rows,) = self._run([(stmt, ())], write=False)
        return int(rows[0][0])

    # ---- schema evolution ----------------------------------------------------------
    def upgrade_layout(self, from_version: str) -> list[str]:
        """Layout 1.0 had no change log: create its tables (the chunks of earlier stores are not
        backfilled; stores made from now on are logged)."""
        if not from_version.startswith("1.0."):
            return []
        for stmt in change_log_ddl(self._t):
            self._ddl(stmt)
        with_chunk = f"ALTER TABLE {self._t('diadb_visit')} ADD chunk_id bigint"
        try:
            self._ddl(with_chunk)
        except StorageError as e:
            if "conflicts with an existing column" not in str(e) and "already exist" not in str(e):
                raise
        return ["layout 1.0 -> 1.1: change log tables (earlier stores are not in the log)"]

    def add_columns(self, table: str, columns: Sequence[ColumnSpec]) -> None:
        """Add nullable columns to every physical table of ``table`` (each time partition)."""
        from diadb.backends.cassandra import cql_type

        if table == HISTORY_TABLE:
            physical = [HISTORY_TABLE, LATEST_TABLE]
        else:
            physical = [self._partition_table(table, p) for p in self.time_partitions()[table]]
        for name in physical:
            for c in columns:
                try:
                    self._ddl(f"ALTER TABLE {self._t(name)} ADD {_q(c.name)} {cql_type(c.datatype)}")
                except StorageError as e:  # a retried upgrade: the column is there
                    if "conflicts with an existing column" not in str(e):
                        raise

    def set_metadata(self, values: Mapping[str, str], delete: Sequence[str] = ()) -> None:
        """Set and delete metadata keys in one logged batch (applied all-or-nothing, eventually)."""
        from cassandra.query import BatchStatement, BatchType

        if not values and not delete:
            return
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        batch.is_idempotent = True
        ins = self._prepare(f"INSERT INTO {self._t('diadb_metadata')} (key, value) VALUES (?, ?)")
        rm = self._prepare(f"DELETE FROM {self._t('diadb_metadata')} WHERE key = ?")
        for k, v in values.items():
            batch.add(ins, (str(k), str(v)))
        for k in delete:
            batch.add(rm, (str(k),))
        self._run([(batch, ())], write=True)
