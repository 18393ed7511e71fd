"""The change log (replica chunks): chunk ids, idempotent operations and their plans.

The same semantics as the SQLite and PostgreSQL backends: every store and every daytime call
is one chunk, and chunk ids follow commit order. Cassandra has no multi-partition transactions,
so this is how it holds:

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
    before anything is written (see :mod:`.daytime`): unknown ids raise ``UnknownIdError`` and
    nothing changes.
Not atomic
    Readers can see part of a daytime update's rows (or a store's) before its chunk exists; an
    operation that fails and is never retried leaves its partial writes (and its pending
    record); two concurrent daytime calls that touch the same objects race (last write wins).

What the replica reads back (``chunk_rows``) is in :mod:`.chunk_rows`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import VisitBatch
from diadb.backends.cassandra.codec import q
from diadb.backends.cassandra.layout import (
    BUCKET,
    HISTORY_TABLE,
    KEYED_STORES,
    PART,
    TIME_COLUMN,
    Layout,
    keyed_ddl,
    partition_table,
)
from diadb.backends.cassandra.segments import (
    FORCED_OVERLAY,
    FORCED_OVERLAY_ENTRY,
    SOURCE_OVERLAY,
    SOURCE_OVERLAY_ENTRY,
)
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.backends.common.members import member_keys
from diadb.backends.common.names import LATEST_TABLE
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN
from diadb.updates import MUTABLE_SOURCE_COLUMNS

#: Chunk ids per ``diadb_chunk`` partition (bucket); ids start at 1.
CHUNK_BITS = 18


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able values (an operation's idempotency key)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


class ChangeLog:
    """Chunks and pending operations of one keyspace (see the module docstring)."""

    def __init__(self, session: CassandraSession, layout: Layout) -> None:
        self.session = session
        self.layout = layout
        # The newest chunk bucket seen (ids only grow: it is looked up once, then followed).
        self._chunk_bucket: int | None = None
        # Whether the keyed-store tables are known to exist (older keyspaces lack them).
        self._keyed_ready = False

    # ---- chunk ids -----------------------------------------------------------------
    def _chunk_head(self) -> tuple[int, int | None]:
        """(newest bucket, its ``last_id`` or None when it has no chunk yet)."""
        if self._chunk_bucket is None:
            (rows,) = self.session.run(
                [(self.session.prepare(f"SELECT DISTINCT bucket FROM {self.session.t('diadb_chunk')}"), ())],
                write=False,
            )
            self._chunk_bucket = max((int(r[0]) for r in rows), default=0)
        b = self._chunk_bucket
        stmt = self.session.prepare(
            f"SELECT last_id FROM {self.session.t('diadb_chunk')} WHERE bucket = ? LIMIT 1"
        )
        stmt.consistency_level = self.session.levels.SERIAL
        while True:
            rows = list(self.session.execute(stmt, (b,), timeout=60))
            last = None if not rows or rows[0][0] is None else int(rows[0][0])
            if last is not None and last >= ((b + 1) << CHUNK_BITS) - 1:
                b += 1
                continue
            self._chunk_bucket = b
            return b, last

    def newest_bucket(self) -> int:
        """The newest chunk bucket this process knows of (looked up once, then followed)."""
        return self._chunk_head()[0] if self._chunk_bucket is None else self._chunk_bucket

    def _last_chunk_id(self) -> int:
        b, last = self._chunk_head()
        return last if last is not None else max(0, (b << CHUNK_BITS) - 1)

    def find_chunk(self, op: uuid.UUID, after: int) -> int | None:
        """The chunk taken by operation ``op`` (id > ``after``), if any."""
        head, _ = self._chunk_head()
        stmt = self.session.prepare(
            f"SELECT chunk_id FROM {self.session.t('diadb_chunk')} WHERE bucket = ? AND chunk_id > ? "
            "AND op = ? ALLOW FILTERING"
        )
        stmt.consistency_level = self.session.levels.SERIAL
        for b in range((after + 1) >> CHUNK_BITS, head + 1):
            rows = list(self.session.execute(stmt, (b, after, op), timeout=60))
            if rows:
                return int(rows[0][0])
        return None

    def take_chunk(
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
            found = self.find_chunk(op, after)
            if found is not None:
                return found
        take = self.session.prepare(
            f"UPDATE {self.session.t('diadb_chunk')} SET last_id = ? WHERE bucket = ? IF last_id = ?"
        )
        row = self.session.prepare(
            f"INSERT INTO {self.session.t('diadb_chunk')} (bucket, chunk_id, kind, visit, detector, "
            "visit_mjd_tai, stored_at, op) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        b, last = self._chunk_head()
        stored_at = _dt.datetime.now(_dt.UTC).isoformat()
        for _ in range(10_000):
            new = max(1, b << CHUNK_BITS) if last is None else last + 1
            if new >> CHUNK_BITS != b:  # the bucket is full: the next one starts
                b, last = b + 1, None
                continue
            batch = BatchStatement(
                serial_consistency_level=self.session.levels.SERIAL, consistency_level=self.session.write_cl
            )
            batch.add(take, (new, b, last))
            batch.add(row, (b, new, kind, visit, detector, mjd, stored_at, op))
            try:
                result = self.session.execute(batch, timeout=60)
            except Exception as e:  # a timed-out LWT may still have been applied
                found = self.find_chunk(op, after)
                if found is not None:
                    return found
                raise StorageError(
                    f"Cassandra change-log write failed in keyspace {self.session.keyspace}: {e}"
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
        raise StorageError(
            f"Cassandra change log of {self.session.keyspace}: no chunk id after 10000 attempts"
        )

    # ---- pending operations --------------------------------------------------------
    def begin(
        self, op_key: str, plan: str | None, visit_mjd_tai: float | None = None
    ) -> tuple[uuid.UUID, int, str | None, bool]:
        """(operation id, newest chunk id before it, its recorded plan, whether it is a retry)."""
        stmt = self.session.prepare(
            f"SELECT op, from_id, plan FROM {self.session.t('diadb_pending')} WHERE op_key = ?"
        )
        (rows,) = self.session.run([(stmt, (op_key,))], write=False)
        if rows:
            op, after, recorded = rows[0]
            return op, int(after), recorded, True
        op = uuid.uuid4()
        after = self._last_chunk_id()
        cols, values = ["op_key", "op", "from_id", "plan"], [op_key, op, after, plan]
        if visit_mjd_tai is not None:  # a store, tier on (.store_guard)
            cols, values = [*cols, "visit_mjd_tai"], [*values, float(visit_mjd_tai)]
        table, marks = self.session.t("diadb_pending"), ", ".join("?" * len(cols))
        ins = self.session.prepare(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})")
        self.session.run([(ins, tuple(values))], write=True)
        return op, after, plan, False

    def _pending(self, op_key: str) -> bool:
        stmt = self.session.prepare(f"SELECT op FROM {self.session.t('diadb_pending')} WHERE op_key = ?")
        (rows,) = self.session.run([(stmt, (op_key,))], write=False)
        return bool(rows)

    def end(self, op_key: str) -> None:
        stmt = self.session.prepare(f"DELETE FROM {self.session.t('diadb_pending')} WHERE op_key = ?")
        self.session.run([(stmt, (op_key,))], write=True)

    def ensure_keyed_tables(self) -> None:
        """Keyspaces made before keyed stores get their two tables on the first keyed store."""
        if self._keyed_ready:
            return
        if not {"diadb_store_key", "diadb_chunk_member", KEYED_STORES} <= self.session.table_names():
            for ddl in keyed_ddl(self.session.t):
                self.session.ddl(ddl)
        self._keyed_ready = True

    def member_writes(self, batch: VisitBatch, op: uuid.UUID) -> Statements:
        """The membership rows of a keyed store (see ``keyed_ddl``), one partition."""
        pieces: list[pa.Table] = [pa.table({"tbl": [""], "k1": [0], "k2": [0], "k3": [0], "start": [None]})]
        for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
            if not data.num_rows:
                continue
            # Unused key columns are 0: a Cassandra clustering column cannot be null.
            keys = [pc.fill_null(k, 0) for k in member_keys(self.layout.schema.table(name), data)]
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
        return self.session.writes("diadb_chunk_member", head, ["visit", "detector"], unset_nulls=True)

    def chunk_object_writes(self, visit: int, detector: int, objects: pa.Table) -> Statements:
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
        return self.session.writes("diadb_chunk_object", keys, ["visit", "detector"], unset_nulls=False)

    def run_update(
        self, op_key: str, kind: str, when_mjd: float, plan: dict[str, Any] | None
    ) -> tuple[int, dict[str, Any] | None]:
        """Record (or find) the pending plan, apply it, take the chunk; (chunk, plan applied)."""
        if plan is None and not self._pending(op_key):
            return 0, None
        op, after, recorded, retry = self.begin(op_key, None if plan is None else json.dumps(plan))
        if recorded is None:
            self.end(op_key)
            return 0, None
        done: dict[str, Any] = json.loads(recorded)
        self._apply_plan(op, done)
        chunk = self.take_chunk(op, after, "update", None, None, float(done["when"]), retry=retry)
        self.end(op_key)
        return chunk, done

    def _apply_plan(self, op: uuid.UUID, plan: dict[str, Any]) -> None:
        """Write a daytime plan: its update records, then the rows (absolute values: idempotent)."""
        records = self.session.prepare(
            f"INSERT INTO {self.session.t('diadb_update')} (op, seq, kind, payload) VALUES (?, ?, ?, ?)"
        )
        self.session.run(
            [(records, (op, i, plan["kind"], json.dumps(p))) for i, p in enumerate(plan["payloads"])],
            write=True,
        )
        statements: Statements = []
        sets = ", ".join(f"{q(c)} = ?" for c in MUTABLE_SOURCE_COLUMNS)
        for tpart, part, h29, t, sid, *values in plan.get("sources", []):
            stmt = self.session.prepare(
                f"UPDATE {self.session.t(partition_table('DiaSource', tpart))} SET {sets} WHERE {PART} = ? "
                f"AND {q(HEALPIX_COLUMN)} = ? AND {q(TIME_COLUMN)} = ? AND {q('diaSourceId')} = ?"
            )
            statements.append((stmt, (*values, part, h29, t, sid)))
        for tpart, part, h29, t, oid, visit, det, when in plan.get("forced", []):
            stmt = self.session.prepare(
                f"UPDATE {self.session.t(partition_table('DiaForcedSource', tpart))} "
                f"SET {q('timeWithdrawnMjdTai')} = ? WHERE {PART} = ? AND {q(HEALPIX_COLUMN)} = ? "
                f"AND {q(TIME_COLUMN)} = ? AND {q('diaObjectId')} = ? AND visit = ? AND detector = ?"
            )
            statements.append((stmt, (when, part, h29, t, oid, visit, det)))
        for name, entry, rows in (
            (
                SOURCE_OVERLAY,
                (*SOURCE_OVERLAY_ENTRY, *MUTABLE_SOURCE_COLUMNS),
                plan.get("overlay_sources", []),
            ),
            (FORCED_OVERLAY, FORCED_OVERLAY_ENTRY, plan.get("overlay_forced", [])),
        ):
            if rows:  # sources already in history segments: their new values go to the overlay
                insert = self.session.prepare(
                    f"INSERT INTO {self.session.t(name)} ({', '.join(q(c) for c in entry)}) "
                    f"VALUES ({', '.join('?' * len(entry))})"
                )
                statements += [(insert, tuple(r)) for r in rows]
        latest_where = f"WHERE {PART} = ? AND {q(HEALPIX_COLUMN)} = ? AND {q('diaObjectId')} = ?"
        history_where = f"WHERE {BUCKET} = ? AND {q('diaObjectId')} = ? AND {q('validityStartMjdTai')} = ?"
        count_latest = self.session.prepare(
            f"UPDATE {self.session.t(LATEST_TABLE)} SET {q('nDiaSources')} = ? {latest_where}"
        )
        count_history = self.session.prepare(
            f"UPDATE {self.session.t(HISTORY_TABLE)} SET {q('nDiaSources')} = ? {history_where}"
        )
        close = self.session.prepare(
            f"UPDATE {self.session.t(HISTORY_TABLE)} SET {q('validityEndMjdTai')} = ? {history_where}"
        )
        gone = self.session.prepare(f"DELETE FROM {self.session.t(LATEST_TABLE)} {latest_where}")
        for oid, start, part, h29, count, closed_at in plan.get("objects", []):
            bucket = int(self.layout.bucket(np.array([oid]))[0])
            if count is not None:
                statements.append((count_history, (count, bucket, oid, start)))
            if closed_at is not None:
                statements.append((close, (closed_at, bucket, oid, start)))
                statements.append((gone, (part, h29, oid)))
            elif count is not None:
                statements.append((count_latest, (count, part, h29, oid)))
        self.session.run(statements, write=True)

    # ---- the change log ------------------------------------------------------------
    def chunk_table(self, buckets: Sequence[int] | None = None, ids: Sequence[int] | None = None) -> pa.Table:
        cols = ["chunk_id", "kind", "visit", "detector", "visit_mjd_tai", "stored_at", "published", "op"]
        sel = ", ".join(cols)
        if ids is not None:
            arr = np.unique(np.asarray(ids, dtype=np.int64))
            stmt = self.session.prepare(
                f"SELECT {sel} FROM {self.session.t('diadb_chunk')} WHERE bucket = ? AND chunk_id IN ?"
            )
            statements: Statements = []
            for b in np.unique(arr >> CHUNK_BITS).tolist():
                members = arr[(arr >> CHUNK_BITS) == b]
                for part in np.array_split(members, -(-len(members) // 1000)):
                    statements.append((stmt, (int(b), part.tolist())))
        else:
            if buckets is None:
                (rows,) = self.session.run(
                    [
                        (
                            self.session.prepare(
                                f"SELECT DISTINCT bucket FROM {self.session.t('diadb_chunk')}"
                            ),
                            (),
                        )
                    ],
                    write=False,
                )
                buckets = sorted(int(r[0]) for r in rows)
            stmt = self.session.prepare(f"SELECT {sel} FROM {self.session.t('diadb_chunk')} WHERE bucket = ?")
            statements = [(stmt, (b,)) for b in buckets]
        rows = [r for rs in self.session.run(statements, write=False) for r in rs if r[0] is not None]
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
        t = self.chunk_table()
        if published is not None:
            t = t.filter(pc.equal(t.column("published"), published))
        return t.drop_columns(["op"])

    def mark_published(self, chunk_ids: Sequence[int]) -> None:
        ids = np.unique(np.asarray(chunk_ids, dtype=np.int64))
        if not len(ids):
            return
        # Only existing chunks (an UPDATE would create a row for an id never taken).
        found = self.chunk_table(ids=ids.tolist()).column("chunk_id").to_numpy()
        stmt = self.session.prepare(
            f"UPDATE {self.session.t('diadb_chunk')} SET published = true WHERE bucket = ? AND chunk_id = ?"
        )
        self.session.run([(stmt, (int(i) >> CHUNK_BITS, int(i))) for i in found.tolist()], write=True)

    def delete_chunks(self, chunk_ids: Sequence[int], *, dry_run: bool = False) -> list[int]:
        """Delete these published chunks' rows, then their update records (by ``op``) and a plain
        store's object versions (by visit/detector); the ids deleted. Left: unpublished ids,
        chunks of an operation still pending (its retry looks for its chunk: see the module
        docstring), keyed stores' members and key registries, the stored rows. A row delete
        keeps the bucket's static ``last_id``, so ids are never handed out again."""
        if not len(chunk_ids):
            return []
        found = self.chunk_table(ids=list(chunk_ids))
        (pending,) = self.session.run(
            [(self.session.prepare(f"SELECT op FROM {self.session.t('diadb_pending')}"), ())], write=False
        )
        busy = {str(r[0]) for r in pending}
        gone = [c for c in found.to_pylist() if c["published"] and c["op"] not in busy]
        if dry_run or not gone:
            return [int(c["chunk_id"]) for c in gone]
        t, prepare = self.session.t, self.session.prepare
        row = prepare(f"DELETE FROM {t('diadb_chunk')} WHERE bucket = ? AND chunk_id = ?")
        self.session.run([(row, (c["chunk_id"] >> CHUNK_BITS, c["chunk_id"])) for c in gone], write=True)
        stores = [c for c in gone if c["kind"] == "store"]
        keyed: list[list[Any]] = [[] for _ in stores]
        if stores and "diadb_chunk_member" in self.session.table_names():
            member = prepare(
                f"SELECT op FROM {t('diadb_chunk_member')} WHERE visit = ? AND detector = ? "
                "AND op = ? LIMIT 1"
            )
            keyed = self.session.run(
                [(member, (c["visit"], c["detector"], _op(c) or uuid.UUID(int=0))) for c in stores],
                write=False,
            )
        objects = prepare(f"DELETE FROM {t('diadb_chunk_object')} WHERE visit = ? AND detector = ?")
        updates = prepare(f"DELETE FROM {t('diadb_update')} WHERE op = ?")
        aux: Statements = [(updates, (uuid.UUID(c["op"]),)) for c in gone if c["kind"] != "store" and _op(c)]
        aux += [(objects, (c["visit"], c["detector"])) for c, k in zip(stores, keyed, strict=True) if not k]
        self.session.run(aux, write=True)
        return [int(c["chunk_id"]) for c in gone]

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, Any]], when_mjd: float) -> int:
        records = [dict(p) for p in payloads]
        op_key = "log:" + digest(kind, records, when_mjd)
        plan = {"kind": kind, "when": when_mjd, "payloads": records}
        chunk, _ = self.run_update(op_key, kind, when_mjd, plan)
        return chunk


def _op(chunk: Mapping[str, Any]) -> uuid.UUID | None:
    """The operation id of a listed chunk (None for a chunk written without one)."""
    return None if chunk["op"] in (None, "None") else uuid.UUID(chunk["op"])
