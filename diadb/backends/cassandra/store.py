"""Storing a visit, and the key registries that stand in for unique constraints.

A store writes the key claims, then the rows, then the deletes of moved objects' old rows, then
the object key registry, then its change-log chunk (one lightweight transaction, see
:mod:`.changelog`) and finally the visit registry entry: a store that failed half-way is
completed by storing the same visit again (every write is an idempotent upsert, and the retry
reuses the chunk the failed attempt may have taken). There are no multi-partition transactions:
a store that is never retried leaves its partial rows in place, and readers hide them until it
is complete (:mod:`.visibility`: that order is what lets them); ``diadb repair`` then removes
them, found through where the store recorded it would write (:mod:`.undo`).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array, VisitBatch
from diadb.backends.cassandra import store_guard
from diadb.backends.cassandra.changelog import ChangeLog
from diadb.backends.cassandra.codec import groups, q, to_arrow
from diadb.backends.cassandra.layout import (
    BUCKET,
    HISTORY_TABLE,
    KEYED_STORES,
    PART,
    STORED_DETECTOR,
    STORED_VISIT,
    TIME_COLUMN,
    Layout,
    partition_table,
)
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.backends.cassandra.undo import confirm_pending, keep_alive, record_plan, where_written, widened
from diadb.backends.cassandra.visibility import (
    KEYED_STORE,
    Visibility,
    keyed_store_id,
    moved_mark,
    recorded_store,
)
from diadb.backends.common.names import LATEST_TABLE, AlreadyStored
from diadb.errors import CatalogError, StorageError
from diadb.schema.model import HEALPIX_COLUMN


class Registry:
    """Lookups in the key registries (``diadb_<table>_keys``) and the visit registry."""

    def __init__(self, session: CassandraSession, layout: Layout) -> None:
        self.session = session
        self.layout = layout

    def key_types(self, table: str) -> dict[str, str]:
        types = self.layout.types(table)
        types.update({STORED_VISIT: "long", STORED_DETECTOR: "int", PART: "int", HEALPIX_COLUMN: "long"})
        return types

    def lookup(self, table: str, keys: pa.Table) -> pa.Table:
        """Rows of the ``table`` key registry matching ``keys`` (its primary-key columns): the
        keys, which store wrote them, and where the row lives."""
        key = list(keys.column_names)
        reg = self.session.t(f"diadb_{table}_keys")
        extra = [STORED_VISIT, STORED_DETECTOR]
        if table == "DiaObject":
            extra += [PART, HEALPIX_COLUMN, "validityStartMjdTai"]
        else:
            extra += [HEALPIX_COLUMN, TIME_COLUMN]
        out_cols = [*key, *extra]
        sel = ", ".join(q(c) for c in out_cols)
        if not keys.num_rows:
            return to_arrow(self.key_types(table), out_cols, [])
        first = np.asarray(keys.column(key[0]).to_numpy(), dtype=np.int64)
        if len(key) == 1:
            stmt = self.session.prepare(f"SELECT {sel} FROM {reg} WHERE {BUCKET} = ? AND {q(key[0])} IN ?")
            group_cols = [self.layout.bucket(first)]
        else:
            where = " AND ".join(f"{q(c)} = ?" for c in key[1:])
            stmt = self.session.prepare(f"SELECT {sel} FROM {reg} WHERE {where} AND {q(key[0])} IN ?")
            group_cols = [np.asarray(keys.column(c).to_numpy(), dtype=np.int64) for c in key[1:]]
        statements: Statements = []
        for group, members in groups(group_cols):
            values = np.unique(first[members])
            for chunk in np.array_split(values, -(-len(values) // 500)):
                statements.append((stmt, (*group, chunk.tolist())))
        rows = [r for rs in self.session.run(statements, write=False) for r in rs]
        found = to_arrow(self.key_types(table), out_cols, rows)
        if len(key) > 1 and found.num_rows:
            found = found.join(keys, keys=key, join_type="left semi")
        return found

    def known_object_ids(self, ids: Int64Array) -> Int64Array:
        found = self.lookup("DiaObject", pa.table({"diaObjectId": np.unique(ids)}))
        return np.asarray(found.column("diaObjectId").to_numpy(), dtype=np.int64)

    def contains_visit_detector(self, visit: int, detector: int) -> bool:
        stmt = self.session.prepare(f"SELECT detector FROM {self.session.t('diadb_visit')} WHERE visit = ?")
        (rows,) = self.session.run([(stmt, (int(visit),))], write=False)
        dets = {r[0] for r in rows}
        return bool(dets) if detector == -1 else bool(dets & {int(detector), -1})

    def latest_visit_mjd(self) -> float | None:
        """The newest registered visit time (an aggregate over the whole registry)."""
        stmt = self.session.prepare(f"SELECT max(visit_mjd_tai) FROM {self.session.t('diadb_visit')}")
        (rows,) = self.session.run([(stmt, ())], write=False)
        value = rows[0][0] if rows else None
        return None if value is None else float(value)


class Store:
    """``store_visit`` and the key checks before it."""

    def __init__(
        self,
        session: CassandraSession,
        layout: Layout,
        registry: Registry,
        log: ChangeLog,
        visibility: Visibility,
    ) -> None:
        self.session = session
        self.layout = layout
        self.registry = registry
        self.log = log
        self.visibility = visibility
        # The visit/detector of the store in progress, or of the last one that failed: its key
        # claims are its own, so that it may be retried (see existing_keys).
        self._storing: tuple[int, int] | None = None
        # With the history tier on: refuses a visit that a compaction passes (.store_guard),
        # called once the store's pending record, which then holds its visit time, is written.
        self.time_check: Callable[[float], None] | None = None
        #: ``(visit time, seconds since the store began)``: the check again, before the chunk.
        self.time_recheck: Callable[[float, float], None] | None = None

    def existing_keys(self, table: str, keys: pa.Table) -> pa.Table:
        """Keys already stored, except those claimed by the store in progress (or that last
        failed) in this process: a store that failed half-way owns its keys and may be retried."""
        name = "DiaObject" if table in ("DiaObjectLatest", "DiaObject") else table
        found = self.registry.lookup(name, keys)
        if self._storing is not None and found.num_rows:
            mine = pc.and_(
                pc.equal(found.column(STORED_VISIT), self._storing[0]),
                pc.equal(found.column(STORED_DETECTOR), self._storing[1]),
            )
            found = found.filter(pc.invert(mine))
        return found.select(keys.column_names)

    def store_visit(self, batch: VisitBatch) -> bool:
        """Validate, then write: key claims, rows, object key registry, the change-log chunk
        and the visit registry, in that order; a retry after a failure completes the same store
        (one chunk, same rows)."""
        began = time.monotonic()
        keyed = batch.key is not None
        if keyed:
            self.log.ensure_keyed_tables()
        try:
            self._check_registry(batch)
        except AlreadyStored:
            return False
        # The store its rows and key claims record (a keyed store its own id: several keyed
        # stores share a visit/detector).
        shown_as = recorded_store(batch.visit, batch.detector, batch.key)
        self._storing = shown_as
        # 0. every check (keys another store owns), and every statement built, before any write.
        first_claims, source_claims = self._claims(batch, shown_as)
        rows = self._source_writes("DiaSource", batch.sources, shown_as)
        rows += self._source_writes("DiaForcedSource", batch.forced_sources, shown_as)
        obj_rows, obj_moves, obj_keys, obj_gone = self._object_writes(batch.objects, *shown_as)
        op_key = f"store-key:{batch.key}" if keyed else f"store:{batch.visit}:{batch.detector}"
        timed = self.time_check is not None
        # The record says where the store writes, so that a repair can remove a store that
        # never completes (.undo).
        plan = where_written(self.layout, batch, shown_as)
        op, after, recorded, retry = self.log.begin(
            op_key, json.dumps(plan), batch.visit_mjd_tai if timed else None
        )
        if retry:
            record_plan(self.session, op_key, widened(recorded, plan))
            if timed:  # its record may be old enough for compactions to take it for dead
                keep_alive(self.session, op_key, op)
        if self.time_check is not None:
            try:
                self.time_check(batch.visit_mjd_tai)
            except CatalogError:
                if not retry:
                    self.log.end(op_key)  # nothing of it was written
                self._storing = None
                raise
        # Its object versions are listed before any is written: for the replica, and for a
        # repair that removes the store.
        if keyed:
            # Other keyed stores share this visit/detector: the chunk lists its own rows.
            listing = self.log.member_writes(batch, op)
        else:
            listing = self.log.chunk_object_writes(batch.visit, batch.detector, batch.objects)
        # 1. the listing and the multi-column key claims; 2. the rows; 3. where the latest
        # object versions now live, and the DiaSource key claims (after their rows: their
        # uniqueness is checked on the rows, and a repair finds the claims through the rows);
        # 4. the chunk (its id taken last, in commit order); 5. the visit registry (and the
        # store key, last: its presence means the keyed store is complete).
        run = self.session.run
        run(first_claims + listing, write=True)
        run(rows + obj_rows, write=True)
        # Moved objects' old rows are marked as this store's once their new rows are
        # acknowledged, and deleted once it is complete: until then a read shows the old
        # version, after it the new one (see .visibility).
        run(obj_moves + source_claims, write=True)
        run(obj_keys, write=True)
        # A repair that removed this store (it took too long) deleted its record: stop here.
        # A store running for half the age at which compactions take it for dead rewrites its
        # record, then checks that none passed its visit meanwhile (.store_guard).
        ran_s = time.monotonic() - began
        if self.time_recheck is not None and ran_s > store_guard.STALE_STORE_S / 2:
            keep_alive(self.session, op_key, op)
            self.time_recheck(batch.visit_mjd_tai, ran_s)
        else:
            confirm_pending(self.session, op_key, op)
        chunk = self.log.take_chunk(
            op, after, "store", batch.visit, batch.detector, batch.visit_mjd_tai, retry=retry
        )
        counts = (batch.objects.num_rows, batch.sources.num_rows, batch.forced_sources.num_rows)
        self.register(batch.visit, batch.detector, batch.key, op, chunk, batch.visit_mjd_tai, counts)
        # A crash before this leaves marked rows, which reads drop (their store is shown).
        run(obj_gone, write=True)
        self.log.end(op_key)
        self._storing = None
        return True

    def register(
        self,
        visit: int,
        detector: int,
        key: str | None,
        op: uuid.UUID,
        chunk: int,
        mjd: float,
        counts: tuple[int, int, int],
    ) -> None:
        """The last steps of a store whose rows are all written and whose chunk is taken: the
        visit registry (and, keyed, the keyed-store and store-key registries). A repair
        completes a store that died after taking its chunk with this too (.undo)."""
        run, prepare, t = self.session.run, self.session.prepare, self.session.t
        first_chunk = chunk
        if key is not None:
            # Keyed stores of one visit/detector add up (read, then write: not atomic; a
            # crash between this and the key registry below counts a retried store twice).
            stmt = prepare(
                f"SELECT visit_mjd_tai, n_objects, n_sources, n_forced_sources, chunk_id FROM "
                f"{t('diadb_visit')} WHERE visit = ? AND detector = ?"
            )
            (prev,) = run([(stmt, (visit, detector))], write=False)
            if prev:
                mjd = max(mjd, float(prev[0][0]))
                counts = (
                    counts[0] + int(prev[0][1] or 0),
                    counts[1] + int(prev[0][2] or 0),
                    counts[2] + int(prev[0][3] or 0),
                )
                # The registry keeps the first store's chunk: readers show a visit/detector
                # once that one is complete (see .visibility), and do not hide it again.
                first_chunk = chunk if prev[0][4] is None else min(chunk, int(prev[0][4]))
        reg = prepare(
            f"INSERT INTO {t('diadb_visit')} (visit, detector, visit_mjd_tai, stored_at, n_objects, "
            "n_sources, n_forced_sources, chunk_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        values = (visit, detector, mjd, _dt.datetime.now(_dt.UTC), *counts, first_chunk)
        run([(reg, values)], write=True)
        self.visibility.remember(visit, detector, first_chunk)
        if key is not None:
            # Its rows are shown from now on (.visibility), then its key is known as stored.
            store_id = keyed_store_id(key)
            shown = prepare(f"INSERT INTO {t(KEYED_STORES)} (store_id, chunk_id) VALUES (?, ?)")
            run([(shown, (store_id, chunk))], write=True)
            self.visibility.remember(store_id, KEYED_STORE, chunk)
            key_reg = prepare(f"INSERT INTO {t('diadb_store_key')} (key, chunk_id, op) VALUES (?, ?, ?)")
            run([(key_reg, (key, chunk, op))], write=True)

    def contains_store_key(self, key: str) -> bool:
        """Whether a store was made with this idempotency key."""
        if "diadb_store_key" not in self.session.table_names():
            return False
        stmt = self.session.prepare(f"SELECT chunk_id FROM {self.session.t('diadb_store_key')} WHERE key = ?")
        (rows,) = self.session.run([(stmt, (key,))], write=False)
        return bool(rows)

    def _check_registry(self, batch: VisitBatch) -> None:
        """AlreadyStored when the batch's key, or its visit/detector, is registered."""
        if batch.key is not None:
            stmt = self.session.prepare(
                f"SELECT chunk_id FROM {self.session.t('diadb_store_key')} WHERE key = ?"
            )
            (rows,) = self.session.run([(stmt, (batch.key,))], write=False)
            if rows:
                raise AlreadyStored
            return
        if self.registry.contains_visit_detector(batch.visit, batch.detector):
            raise AlreadyStored

    def _claims(self, batch: VisitBatch, shown_as: tuple[int, int]) -> tuple[Statements, Statements]:
        """Key-registry rows for the batch's sources, owned by ``shown_as`` (the store its rows
        record): (those of multi-column keys, those of DiaSource's one-column key); StorageError
        if another store owns one."""
        out: Statements = []
        one_column: Statements = []
        for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
            if not data.num_rows:
                continue
            pk = list(self.layout.schema.table(name).primary_key)
            keys = data.select(pk)
            if len(pk) == 1:
                # One key column (DiaSource): looked up where the rows go (one query per
                # partition) rather than in the registry (one query per key bucket: sparse ids
                # made that one query per row, ~3 s for 10k sources).
                if self._taken_in_place(name, data, batch, shown_as):
                    raise StorageError(
                        f"{name}: primary key already stored by another visit (visit {batch.visit})"
                    )
                found = keys.slice(0, 0)
            else:
                found = self.registry.lookup(name, keys)
            if found.num_rows:
                mine = pc.and_(
                    pc.equal(found.column(STORED_VISIT), shown_as[0]),
                    pc.equal(found.column(STORED_DETECTOR), shown_as[1]),
                )
                if not pc.all(mine).as_py():
                    raise StorageError(
                        f"{name}: primary key already stored by another visit (visit {batch.visit})"
                    )
            n = keys.num_rows
            claims = keys.append_column(STORED_VISIT, pa.array(np.full(n, shown_as[0], np.int64)))
            claims = claims.append_column(STORED_DETECTOR, pa.array(np.full(n, shown_as[1], np.int32)))
            claims = claims.append_column(HEALPIX_COLUMN, data.column(HEALPIX_COLUMN))
            claims = claims.append_column(TIME_COLUMN, data.column(TIME_COLUMN))
            if len(pk) == 1:
                bucket = self.layout.bucket(keys.column(0).to_numpy())
                claims = claims.append_column(BUCKET, pa.array(bucket))
                part = [BUCKET]
            else:
                part = pk[1:]
            claimed = self.session.writes(f"diadb_{name}_keys", claims, part, unset_nulls=False)
            if len(pk) == 1:
                one_column += claimed
            else:
                out += claimed
        return out, one_column

    def _taken_in_place(self, name: str, data: pa.Table, batch: VisitBatch, mine: tuple[int, int]) -> bool:
        """Whether a row of ``data`` has a key already stored by another visit at the same place
        (time partition, order-29 pixel): one ``IN`` query per Cassandra partition written."""
        key = self.layout.schema.table(name).primary_key[0]
        # Rows name their store where the layout has the columns: a keyed store of the same
        # visit (which may mix visits) is then told from this store's own earlier attempt.
        hidden = f", {STORED_VISIT}, {STORED_DETECTOR}" if self.layout.store_columns else ""
        tparts = self.layout.time_partition(data.column(TIME_COLUMN).to_numpy())
        h29 = np.asarray(data.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        pix = self.layout.pixel(h29)
        known = self.layout.known_partitions()
        statements: Statements = []
        for (tp, p), members in groups([tparts, pix.astype(np.int64)]):
            table = partition_table(name, tp)
            if table not in known:  # the partition table is new: nothing stored there yet
                continue
            stmt = self.session.prepare(
                f"SELECT {q(key)}, visit, detector{hidden} FROM {self.session.t(table)} WHERE {PART} = ? "
                f"AND {q(HEALPIX_COLUMN)} IN ?"
            )
            values = np.unique(h29[members])
            for chunk in np.array_split(values, -(-len(values) // 1000)):
                statements.append((stmt, (p, chunk.tolist())))
        ids = set(np.asarray(data.column(key).to_numpy(), dtype=np.int64).tolist())
        for rows in self.session.run(statements, write=False):
            for k, visit, detector, *store in rows:
                if k not in ids:
                    continue
                if store and store[0] is not None:
                    if (store[0], store[1]) != mine:
                        return True
                elif visit != batch.visit or (batch.detector != -1 and detector != batch.detector):
                    return True
        return False

    def _source_writes(self, name: str, data: pa.Table, shown_as: tuple[int, int]) -> Statements:
        if not data.num_rows:
            return []
        data = self._with_store(data, *shown_as)
        tparts = self.layout.time_partition(data.column(TIME_COLUMN).to_numpy())
        self.layout.ensure_partitions_or_fail(name, np.unique(tparts))
        data = data.append_column(PART, pa.array(self.layout.pixel(data.column(HEALPIX_COLUMN).to_numpy())))
        data = self.layout.packer.pack(name, data)
        out: Statements = []
        for (tp,), members in groups([tparts]):
            sub = data.take(pa.array(members))
            out += self.session.writes(partition_table(name, tp), sub, [PART], unset_nulls=True)
        return out

    def _with_store(self, data: pa.Table, visit: int, detector: int) -> pa.Table:
        """``data`` with the hidden columns naming the store that writes it (see .visibility)."""
        if not self.layout.store_columns:
            return data
        n = data.num_rows
        data = data.append_column(STORED_VISIT, pa.array(np.full(n, visit, np.int64)))
        return data.append_column(STORED_DETECTOR, pa.array(np.full(n, detector, np.int32)))

    def _object_writes(
        self, objs: pa.Table, visit: int, detector: int
    ) -> tuple[Statements, Statements, Statements, Statements]:
        """(row writes, marks of moved objects' old latest rows, key-registry writes, deletes of
        those old rows) of the new object versions, which record the store that wrote them.
        Where the layout has no such columns (older keyspaces), the old rows are deleted in
        the marks' place (see .visibility)."""
        if not objs.num_rows:
            return [], [], [], []
        layout, session = self.layout, self.session
        ids = np.asarray(objs.column("diaObjectId").to_numpy(), dtype=np.int64)
        start = np.asarray(objs.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
        h29 = np.asarray(objs.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        part = layout.pixel(h29)
        prev = self.registry.lookup("DiaObject", pa.table({"diaObjectId": ids}))
        out: Statements = []
        moves: Statements = []
        gone: Statements = []
        if prev.num_rows:
            prev_ids = np.asarray(prev.column("diaObjectId").to_numpy(), dtype=np.int64)
            order = np.argsort(ids)
            at = order[np.searchsorted(ids[order], prev_ids)]
            prev_start = np.asarray(prev.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
            prev_h = np.asarray(prev.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
            prev_part = np.asarray(prev.column(PART).to_numpy(), dtype=np.int32)
            # Close the previous version at the new one's start (same start: it is replaced).
            closing = prev_start != start[at]
            if closing.any():
                close = pa.table(
                    {
                        "end": start[at][closing],
                        BUCKET: layout.bucket(prev_ids[closing]),
                        "diaObjectId": prev_ids[closing],
                        "validityStartMjdTai": prev_start[closing],
                    }
                )
                # Batched by bucket: one request per row cost ~1 ms of server CPU each.
                stmt = session.prepare(
                    f"UPDATE {session.t(HISTORY_TABLE)} SET {q('validityEndMjdTai')} = ? "
                    f"WHERE {BUCKET} = ? AND {q('diaObjectId')} = ? AND {q('validityStartMjdTai')} = ?"
                )
                out += session.batches(stmt, close, [BUCKET], unset_nulls=False)
            moved = prev_h != h29[at]
            if moved.any():
                old_rows = pa.table(
                    {PART: prev_part[moved], HEALPIX_COLUMN: prev_h[moved], "diaObjectId": prev_ids[moved]}
                )
                where = f"WHERE {PART} = ? AND {q(HEALPIX_COLUMN)} = ? AND {q('diaObjectId')} = ?"
                delete = session.prepare(f"DELETE FROM {session.t(LATEST_TABLE)} {where}")
                deletes = session.batches(delete, old_rows, [PART], unset_nulls=False)
                if layout.store_columns:
                    marked = f"SET {STORED_VISIT} = ?, {STORED_DETECTOR} = ?"
                    mark = session.prepare(f"UPDATE {session.t(LATEST_TABLE)} {marked} {where}")
                    n = old_rows.num_rows
                    marks = pa.table(
                        {
                            STORED_VISIT: np.full(n, visit, np.int64),
                            STORED_DETECTOR: np.full(n, moved_mark(detector), np.int32),
                            **{c: old_rows.column(c) for c in old_rows.column_names},
                        }
                    )
                    moves += session.batches(mark, marks, [PART], unset_nulls=False)
                    gone += deletes
                else:
                    moves += deletes
        # Object tables are written with explicit nulls: a replaced row must lose old values.
        packed = self._with_store(layout.packer.pack("DiaObject", objs), visit, detector)
        out += session.writes(
            HISTORY_TABLE,
            packed.append_column(BUCKET, pa.array(layout.bucket(ids))),
            [BUCKET],
            unset_nulls=False,
        )
        out += session.writes(
            LATEST_TABLE, packed.append_column(PART, pa.array(part)), [PART], unset_nulls=False
        )
        keys = pa.table(
            {
                BUCKET: layout.bucket(ids),
                "diaObjectId": ids,
                PART: part,
                HEALPIX_COLUMN: h29,
                "validityStartMjdTai": start,
            }
        )
        return out, moves, session.writes("diadb_DiaObject_keys", keys, [BUCKET], unset_nulls=False), gone
