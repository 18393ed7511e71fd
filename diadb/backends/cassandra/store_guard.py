"""A compaction never passes a store in progress (Cassandra, history tier on).

A compaction moves the source rows older than its new boundary ``B`` into segments, and from
then on reads take engine rows only at or after ``B`` (:mod:`.history`). A store of a visit
older than ``B`` whose rows were not yet shown when the compaction read them (they are hidden
until the store registers, :mod:`.visibility`) would be lost: in no segment, and clipped from
the engine. Nothing serialises a store with a compaction (no multi-partition transactions), so
each side first writes what it is about to do, then reads what the other is doing (the
pattern of Dekker's mutual exclusion; both sides at the write and read consistency, so with
QUORUM the later of the two reads sees the earlier write):

- a store records its visit time in its ``diadb_pending`` record (written before any row),
  then reads the boundary and the *intent* of a compaction running (``diadb_compaction_intent``)
  and is refused (``CatalogError``, nothing written) if its visit is older than either;
- a compaction writes its intended boundary first, then reads the pending stores and holds its
  boundary back to the oldest one's visit time below it.

Whichever of the two reads comes later sees the other's write, so either the store is refused
before writing a row or the compaction leaves its rows in the engine. A pending record older
than :data:`STALE_STORE_S` is taken for a store that died (``diadb repair`` removes it) and does
not hold compactions back. A store still alive that long must not then complete with rows the
boundary hides: one that has run for half that age, and every retry, rewrites its record
(:func:`.undo.keep_alive`, so compactions wait for it again) and then checks the boundaries once more,
before its chunk; if a compaction passed its visit meanwhile it fails (``StorageError``; a retry
is refused with a ``CatalogError``),
never acknowledged, and its hidden rows are left to ``diadb repair``.
The intent carries a TTL (the compaction lease's), so a compactor that died does not refuse
stores for longer than its lease.
"""

from __future__ import annotations

import math
import time

from diadb.backends.cassandra.session import CassandraSession
from diadb.errors import CatalogError, StorageError

INTENT = "diadb_compaction_intent"
#: A store's pending record older than this (s) is a store that died, not one in progress:
#: stores take seconds; a record this old is left to ``diadb repair``.
STALE_STORE_S = 3600.0


def guard_ddl(session: CassandraSession) -> list[str]:
    return [f"CREATE TABLE IF NOT EXISTS {session.t(INTENT)} (bucket int PRIMARY KEY, boundary double)"]


class StoreGuard:
    """Both sides of the exchange (see the module docstring)."""

    def __init__(self, session: CassandraSession) -> None:
        self.session = session
        self._ready = False
        self.announced = False

    def ensure(self) -> None:
        """Keyspaces made before the guard get its table and the pending records' time column
        on first use (one schema query per process)."""
        if self._ready:
            return
        rows = self.session.execute(
            "SELECT table_name, column_name FROM system_schema.columns WHERE keyspace_name = %s "
            "AND table_name IN ('diadb_pending', %s)",
            [self.session.keyspace, INTENT],
        )
        found = {(r[0], r[1]) for r in rows}
        if ("diadb_pending", "visit_mjd_tai") not in found:
            try:
                self.session.ddl(f"ALTER TABLE {self.session.t('diadb_pending')} ADD visit_mjd_tai double")
            except Exception as e:  # another client added it first
                if "exist" not in str(e).lower():
                    raise
        if not any(table == INTENT for table, _ in found):
            for ddl in guard_ddl(self.session):
                self.session.ddl(ddl)
        self._ready = True

    # ---- the store's side ------------------------------------------------------------------
    def check_store(self, visit_mjd: float, boundary: float) -> None:
        """Refuse a store (whose pending record, with its visit time, is written) of a visit
        older than ``boundary`` or than a running compaction's intended boundary."""
        stmt = self.session.prepare(f"SELECT boundary FROM {self.session.t(INTENT)} WHERE bucket = 0")
        (rows,) = self.session.run([(stmt, ())], write=False)
        intent = -math.inf if not rows or rows[0][0] is None else float(rows[0][0])
        if visit_mjd < boundary:
            why = f"older than the compacted history (before MJD {boundary})"
        elif visit_mjd < intent:
            why = f"older than the boundary a compaction is moving history to (MJD {intent}); retry later"
        else:
            return
        raise CatalogError(
            "DiaSource",
            "midpointMjdTai",
            f"a visit at MJD {visit_mjd} is {why} in keyspace {self.session.keyspace}: "
            "visits are stored in time order",
        )

    def recheck_store(self, visit_mjd: float, boundary: float, began_s_ago: float) -> None:
        """:meth:`check_store` again, for a store whose record ``undo.keep_alive`` rewrote: a
        ``StorageError`` if a compaction has passed its visit since it began."""
        try:
            self.check_store(visit_mjd, boundary)
        except CatalogError as e:
            raise StorageError(
                f"a store that began {began_s_ago:.0f} s ago was taken for a dead one and passed by a "
                f"compaction: {e.problem}. It was not stored; its rows stay hidden until `diadb repair` "
                "removes them"
            ) from None

    # ---- the compaction's side ---------------------------------------------------------------
    def announce(self, boundary: float, ttl_s: int) -> None:
        """The boundary a compaction is about to move history to (before it reads anything)."""
        stmt = self.session.prepare(
            f"INSERT INTO {self.session.t(INTENT)} (bucket, boundary) VALUES (0, ?) USING TTL ?"
        )
        self.session.run([(stmt, (float(boundary), int(ttl_s)))], write=True)
        self.announced = True

    def withdraw(self) -> None:
        stmt = self.session.prepare(f"DELETE FROM {self.session.t(INTENT)} WHERE bucket = 0")
        self.session.run([(stmt, ())], write=True)
        self.announced = False

    def held_back(self, boundary: float) -> float:
        """``boundary``, or the visit time of the oldest store in progress below it."""
        stmt = self.session.prepare(
            f"SELECT op_key, visit_mjd_tai, writetime(op) FROM {self.session.t('diadb_pending')}"
        )
        (rows,) = self.session.run([(stmt, ())], write=False)
        now_us = time.time() * 1e6
        for op_key, visit_mjd, written_us in rows:
            if not str(op_key).startswith("store") or visit_mjd is None:
                continue  # a daytime call, or a store of a database without the tier
            if written_us is not None and now_us - float(written_us) > STALE_STORE_S * 1e6:
                continue  # a store that died (see the module docstring)
            boundary = min(boundary, float(visit_mjd))
        return boundary
