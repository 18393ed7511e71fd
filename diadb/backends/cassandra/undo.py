"""Settling a store that never completed (``diadb repair``, see :mod:`.repair`): completing it
when it took its chunk, removing every row it wrote otherwise.

A store that took its chunk had every row acknowledged before (:mod:`.changelog`): only its
registration is missing, and :meth:`.Store.register` writes it. One that did not may have
written any part of its rows, and is hidden from reads (:mod:`.visibility`); what lets a repair
find every one of them is the order a store writes in (:mod:`.store`):

- its pending record holds, before its first write, where it will write (:func:`where_written`):
  the (time partition, sky partition) pairs of its source rows, the partitions of its
  multi-column key claims (forced sources), its key, visit time and row counts;
- its object versions are listed (``diadb_chunk_object``; a keyed store's members) before any
  of them is written;
- its DiaSource key claims are written after their rows, so each is found through its row;
- every row records the store in its hidden columns, so a row of another store sharing a
  partition is never touched.

Removal runs in an order that a repair killed at any point can simply run again (each step looks
at what is still there, and writes absolute values):

1. objects: each listed object's versions are read. If the newest is the store's, the
   latest-object table and the object key registry get the newest other version (or lose the
   object, which the store made). The version before each of the store's is reopened if the
   store closed it (or closed at the next version left). The store's versions go last.
2. sources: the rows of the recorded partitions that record the store are found; their key
   claims are deleted, then the rows; then the forced-source claims that record the store.
3. the listing. The caller deletes the pending record last.

Row-by-row Python here is deliberate: a repair handles one dead store's rows, once.

Not undone: an object version the store rewrote in place (the same ``validityStartMjdTai`` as
the version before) lost its earlier values when it was written; the repair falls back to the
version before it, as reads did while the store was hidden.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from diadb.backends.base import VisitBatch
from diadb.backends.cassandra.changelog import ChangeLog
from diadb.backends.cassandra.codec import groups, q
from diadb.backends.cassandra.layout import (
    BUCKET,
    HISTORY_TABLE,
    PART,
    SOURCE_TABLES,
    STORED_DETECTOR,
    STORED_VISIT,
    TIME_COLUMN,
    Layout,
    partition_table,
)
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.backends.common.names import LATEST_TABLE
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN

#: Ids per ``IN ?`` query.
IDS_PER_QUERY = 500


def where_written(layout: Layout, batch: VisitBatch, store: tuple[int, int]) -> dict[str, Any]:
    """A store's plan (JSON-able), recorded before its first write: see the module docstring."""
    sources: dict[str, list[list[int]]] = {}
    claims: dict[str, list[list[int]]] = {}
    for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
        if not data.num_rows:
            continue
        tparts = np.asarray(layout.time_partition(data.column(TIME_COLUMN).to_numpy()), dtype=np.int64)
        pix = layout.pixel(data.column(HEALPIX_COLUMN).to_numpy()).astype(np.int64)
        sources[name] = np.unique(np.stack([tparts, pix], axis=1), axis=0).tolist()
        pk = layout.schema.table(name).primary_key
        if len(pk) > 1:
            keys = np.stack([np.asarray(data.column(c).to_numpy(), dtype=np.int64) for c in pk[1:]], axis=1)
            claims[name] = np.unique(keys, axis=0).tolist()
    return {
        "store": list(store),
        "visit": int(batch.visit),
        "detector": int(batch.detector),
        "key": batch.key,
        "mjd": float(batch.visit_mjd_tai),
        "counts": [batch.objects.num_rows, batch.sources.num_rows, batch.forced_sources.num_rows],
        "sources": sources,
        "claims": claims,
    }


def widened(recorded: str | None, plan: dict[str, Any]) -> dict[str, Any]:
    """A retry's plan: its own, plus every place the attempts before it recorded (a retry may
    be given other rows; what the earlier attempts wrote must still be found)."""
    if recorded is None:
        return plan
    old = json.loads(recorded)
    out = dict(plan)
    for part in ("sources", "claims"):
        merged = {k: list(v) for k, v in plan[part].items()}
        for name, places in old.get(part, {}).items():
            known = {tuple(p) for p in merged.get(name, [])}
            merged[name] = [*merged.get(name, []), *(p for p in places if tuple(p) not in known)]
        out[part] = merged
    return out


def record_plan(session: CassandraSession, op_key: str, plan: dict[str, Any]) -> None:
    """Replace the plan of a pending store (a retry, :func:`widened`)."""
    stmt = session.prepare(f"UPDATE {session.t('diadb_pending')} SET plan = ? WHERE op_key = ?")
    session.run([(stmt, (json.dumps(plan), op_key))], write=True)


def confirm_pending(session: CassandraSession, op_key: str, op: uuid.UUID) -> None:
    """StorageError unless the store's pending record is still there: a repair removes a store
    whose record is older than its grace, and this store must not then complete with part of
    its rows gone (it may be stored again)."""
    stmt = session.prepare(f"SELECT op FROM {session.t('diadb_pending')} WHERE op_key = ?")
    (rows,) = session.run([(stmt, (op_key,))], write=False)
    if not rows or rows[0][0] != op:
        raise _removed(session, op_key)


def keep_alive(session: CassandraSession, op_key: str, op: uuid.UUID) -> None:
    """:func:`confirm_pending`, rewriting the record's ``op`` (whose write time a compaction
    ages, :mod:`.store_guard`) in the same lightweight transaction: conditional on the record
    being this store's, so a record a repair removed never comes back."""
    rows = list(
        session.execute(
            f"UPDATE {session.t('diadb_pending')} SET op = %s WHERE op_key = %s IF op = %s", [op, op_key, op]
        )
    )
    if not (rows and bool(rows[0][0])):
        raise _removed(session, op_key)


def _removed(session: CassandraSession, op_key: str) -> StorageError:
    return StorageError(
        f"Cassandra keyspace {session.keyspace}: {op_key} was removed by a repair while it ran "
        "(it took longer than the repair's grace); store it again"
    )


class StoreUndo:
    """Removal of a store that never completed (see the module docstring)."""

    def __init__(self, session: CassandraSession, layout: Layout, log: ChangeLog) -> None:
        self.session = session
        self.layout = layout
        self.log = log

    def remove(self, op: uuid.UUID, plan: dict[str, Any]) -> None:
        """Delete every row the store of ``plan`` wrote, restoring the object versions before it."""
        store = (int(plan["store"][0]), int(plan["store"][1]))
        self._objects(self._listed_objects(op, plan), store)
        self._sources(plan, store)
        self._drop_listing(op, plan)

    # ---- objects -------------------------------------------------------------------
    def _listed_objects(self, op: uuid.UUID, plan: dict[str, Any]) -> np.ndarray:
        t, prepare = self.session.t, self.session.prepare
        visit, detector = int(plan["visit"]), int(plan["detector"])
        if plan["key"] is None:
            stmt = prepare(
                f'SELECT "diaObjectId" FROM {t("diadb_chunk_object")} WHERE visit = ? AND detector = ?'
            )
            values: tuple[Any, ...] = (visit, detector)
        else:
            stmt = prepare(
                f"SELECT k1 FROM {t('diadb_chunk_member')} WHERE visit = ? AND detector = ? AND op = ? "
                "AND tbl = ?"
            )
            values = (visit, detector, op, HISTORY_TABLE)
        (rows,) = self.session.run([(stmt, values)], write=False)
        return np.unique(np.asarray([r[0] for r in rows], dtype=np.int64))

    def _objects(self, ids: np.ndarray, store: tuple[int, int]) -> None:
        if not len(ids):
            return
        spec = self.layout.schema.table(HISTORY_TABLE)
        physical = [
            *self.layout.packer.physical(HISTORY_TABLE, [*spec.column_names, HEALPIX_COLUMN]),
            STORED_VISIT,
            STORED_DETECTOR,
        ]
        select = self.session.prepare(
            f"SELECT {', '.join(q(c) for c in physical)} FROM {self.session.t(HISTORY_TABLE)} "
            f"WHERE {BUCKET} = ? AND {q('diaObjectId')} IN ?"
        )
        rows = [r for rs in self.session.run(self._by_bucket(select, ids), write=False) for r in rs]
        versions: dict[int, list[Any]] = {}
        at = _Row(physical)
        for r in rows:
            versions.setdefault(int(r[at.id]), []).append(r)
        writes = _ObjectWrites(self.session, physical)
        fixes: Statements = []
        deletes: Statements = []
        for oid, found in versions.items():
            found.sort(key=lambda r: float(r[at.start]))
            mine = [(r[at.stored_visit], r[at.stored_detector]) == store for r in found]
            if not any(mine):
                continue
            bucket = int(self.layout.bucket(np.asarray([oid]))[0])
            kept = [r for r, m in zip(found, mine, strict=True) if not m]
            starts = [float(r[at.start]) for r in kept]
            ends: dict[float, Any] = {}  # the new end of a version left, by its start
            # Latest rows the store may have left: at its versions' places, and the marked
            # rows at the places of the versions before them (objects it moved).
            stale: set[int] = set()
            for r in (r for r, m in zip(found, mine, strict=True) if m):
                start = float(r[at.start])
                stale.add(int(r[at.h29]))
                before = [k for k, s in zip(kept, starts, strict=True) if s < start]
                if before:
                    stale.add(int(before[-1][at.h29]))
                # The version before it, if this store closed it, ends where the next one left
                # starts.
                if before and before[-1][at.end] == start:
                    prev_start = float(before[-1][at.start])
                    # With none left after it, it takes the store's version's end: a daytime
                    # set_validity_end made while the store was hidden closed that one.
                    ends[prev_start] = next((s for s in starts if s > start), r[at.end])
                    fixes.append((writes.set_end, (ends[prev_start], bucket, oid, prev_start)))
                deletes.append((writes.version_delete, (bucket, oid, start)))
            # The one latest row left is the newest version's, at its place.
            place = int(kept[-1][at.h29]) if kept else None
            for h29 in sorted(stale - {place} if place is not None else stale):
                fixes.append((writes.latest_delete, (int(self.layout.pixel(np.asarray([h29]))[0]), h29, oid)))
            if not kept:  # an object the store made
                fixes.append((writes.key_delete, (bucket, oid)))
            elif mine[-1]:  # the newest version was the store's: the latest tables get the one before
                new = list(kept[-1])
                new[at.end] = ends.get(starts[-1], new[at.end])
                part = int(self.layout.pixel(np.asarray([place]))[0])
                if new[at.end] is None:
                    fixes.append((writes.latest, (*new, part)))
                else:  # closed (by that daytime call): no latest row, as set_validity_end leaves it
                    fixes.append((writes.latest_delete, (part, place, oid)))
                fixes.append((writes.key, (bucket, oid, part, place, new[at.start])))
        # No fix writes a row another one deletes; the store's versions go once all are written.
        self.session.run(fixes, write=True)
        self.session.run(deletes, write=True)

    def _by_bucket(self, stmt: Any, ids: np.ndarray) -> Statements:
        return [
            (stmt, (b, members.tolist()))
            for (b,), idx in groups([self.layout.bucket(ids)])
            for members in np.array_split(ids[idx], -(-len(idx) // IDS_PER_QUERY))
        ]

    # ---- sources -------------------------------------------------------------------
    def _sources(self, plan: dict[str, Any], store: tuple[int, int]) -> None:
        t, prepare = self.session.t, self.session.prepare
        known = self.layout.known_partitions() | self.session.table_names()
        claims: Statements = []
        rows_gone: Statements = []
        for name in SOURCE_TABLES:
            pk = list(self.layout.schema.table(name).primary_key)
            row_key = [HEALPIX_COLUMN, TIME_COLUMN, *pk]
            by_part: dict[int, list[int]] = {}
            for tp, p in plan["sources"].get(name, []):
                by_part.setdefault(int(tp), []).append(int(p))
            for tp, parts in sorted(by_part.items()):
                table = partition_table(name, tp)
                if table not in known:
                    continue
                sel = prepare(
                    f"SELECT {', '.join(q(c) for c in row_key)}, {STORED_VISIT}, {STORED_DETECTOR} "
                    f"FROM {t(table)} WHERE {PART} = ?"
                )
                where = " AND ".join(f"{q(c)} = ?" for c in row_key)
                delete = prepare(f"DELETE FROM {t(table)} WHERE {PART} = ? AND {where}")
                results = self.session.run([(sel, (p,)) for p in parts], write=False)
                for p, found in zip(parts, results, strict=True):
                    for r in found:
                        if (r[-2], r[-1]) != store:
                            continue
                        rows_gone.append((delete, (p, *r[:-2])))
                        if len(pk) == 1:
                            oid = int(r[2])
                            bucket = int(self.layout.bucket(np.asarray([oid]))[0])
                            claims.append((self._claim_delete(name, pk), (bucket, oid)))
            if len(pk) > 1:
                claims += self._multi_claims(name, pk, plan["claims"].get(name, []), store)
        # Claims first: a DiaSource claim is found only through its row.
        self.session.run(claims, write=True)
        self.session.run(rows_gone, write=True)

    def _claim_delete(self, name: str, pk: Sequence[str]) -> Any:
        table = self.session.t(f"diadb_{name}_keys")
        if len(pk) == 1:
            return self.session.prepare(f"DELETE FROM {table} WHERE {BUCKET} = ? AND {q(pk[0])} = ?")
        where = " AND ".join(f"{q(c)} = ?" for c in pk)
        return self.session.prepare(f"DELETE FROM {table} WHERE {where}")

    def _multi_claims(
        self, name: str, pk: Sequence[str], partitions: list[list[int]], store: tuple[int, int]
    ) -> Statements:
        """Deletes of the claims of a multi-column key, in the recorded partitions, that record the store."""
        if not partitions:
            return []
        table = self.session.t(f"diadb_{name}_keys")
        where = " AND ".join(f"{q(c)} = ?" for c in pk[1:])
        sel = self.session.prepare(
            f"SELECT {q(pk[0])}, {STORED_VISIT}, {STORED_DETECTOR} FROM {table} WHERE {where}"
        )
        delete = self._claim_delete(name, pk)
        out: Statements = []
        results = self.session.run([(sel, tuple(p)) for p in partitions], write=False)
        for p, found in zip(partitions, results, strict=True):
            out += [(delete, (r[0], *p)) for r in found if (r[1], r[2]) == store]
        return out

    def _drop_listing(self, op: uuid.UUID, plan: dict[str, Any]) -> None:
        t, prepare = self.session.t, self.session.prepare
        visit, detector = int(plan["visit"]), int(plan["detector"])
        if plan["key"] is None:
            stmt = prepare(f"DELETE FROM {t('diadb_chunk_object')} WHERE visit = ? AND detector = ?")
            self.session.run([(stmt, (visit, detector))], write=True)
        else:
            stmt = prepare(
                f"DELETE FROM {t('diadb_chunk_member')} WHERE visit = ? AND detector = ? AND op = ?"
            )
            self.session.run([(stmt, (visit, detector, op))], write=True)


class _Row:
    """Positions of the columns :meth:`StoreUndo._objects` reads, in its rows."""

    def __init__(self, physical: Sequence[str]) -> None:
        at = {c: i for i, c in enumerate(physical)}
        self.id, self.h29 = at["diaObjectId"], at[HEALPIX_COLUMN]
        self.start, self.end = at["validityStartMjdTai"], at["validityEndMjdTai"]
        self.stored_visit, self.stored_detector = at[STORED_VISIT], at[STORED_DETECTOR]


class _ObjectWrites:
    """The statements that put an object's latest row, key and versions back."""

    def __init__(self, session: CassandraSession, physical: Sequence[str]) -> None:
        t, prepare = session.t, session.prepare
        oid, start, end = q("diaObjectId"), q("validityStartMjdTai"), q("validityEndMjdTai")
        version = f"WHERE {BUCKET} = ? AND {oid} = ? AND {start} = ?"
        marks = ", ".join("?" * (len(physical) + 1))
        self.latest = prepare(
            f"INSERT INTO {t(LATEST_TABLE)} ({', '.join(q(c) for c in physical)}, {PART}) VALUES ({marks})"
        )
        self.latest_delete = prepare(
            f"DELETE FROM {t(LATEST_TABLE)} WHERE {PART} = ? AND {q(HEALPIX_COLUMN)} = ? AND {oid} = ?"
        )
        keys = t("diadb_DiaObject_keys")
        self.key = prepare(
            f"INSERT INTO {keys} ({BUCKET}, {oid}, {PART}, {q(HEALPIX_COLUMN)}, {start}) "
            "VALUES (?, ?, ?, ?, ?)"
        )
        self.key_delete = prepare(f"DELETE FROM {keys} WHERE {BUCKET} = ? AND {oid} = ?")
        self.set_end = prepare(f"UPDATE {t(HISTORY_TABLE)} SET {end} = ? {version}")
        self.version_delete = prepare(f"DELETE FROM {t(HISTORY_TABLE)} {version}")
