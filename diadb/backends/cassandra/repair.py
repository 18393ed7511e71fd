"""Finishing what failed operations left behind (``Apdb.repair``, ``diadb repair``).

Every store and daytime call first records itself in ``diadb_pending`` and removes that record
as its last step (:mod:`.changelog`), so the records still there name the operations that did
not finish: their process died, or its call raised and was never retried. Those older than a
grace (an operation in progress is left alone) are settled here:

- a daytime call's record holds its whole plan (absolute values): it is applied again and its
  chunk taken, exactly as the call's own retry would, so the update is then complete;
- a store that registered its visit (or key) but died before removing its record is complete:
  the record goes;
- a store that took its chunk but died before registering had every row written: it is
  registered (:mod:`.undo`), and is then shown;
- a store that took no chunk is hidden from every read (:mod:`.visibility`), and only its input
  could complete it: every row it wrote is removed (:mod:`.undo`), so that the database is as if
  it had never been called, and it is reported, to be stored again;
- a store recorded by a diadb from before stores recorded where they write (or in a keyspace
  without the hidden store columns) cannot be removed: it is reported, hidden, to be stored again.
"""

from __future__ import annotations

import json
import time

from diadb.backends.base import RepairReport
from diadb.backends.cassandra.changelog import ChangeLog
from diadb.backends.cassandra.layout import Layout
from diadb.backends.cassandra.session import CassandraSession
from diadb.backends.cassandra.store import Registry, Store
from diadb.backends.cassandra.undo import StoreUndo


def repair(
    session: CassandraSession,
    layout: Layout,
    log: ChangeLog,
    registry: Registry,
    store: Store,
    min_age_s: float,
) -> RepairReport:
    """Settle the pending operations older than ``min_age_s`` (see the module docstring)."""
    stmt = session.prepare(
        f"SELECT op_key, op, from_id, plan, writetime(from_id) FROM {session.t('diadb_pending')}"
    )
    (rows,) = session.run([(stmt, ())], write=False)
    now_us = time.time() * 1e6
    completed: list[str] = []
    finished: list[str] = []
    removed: list[str] = []
    incomplete: list[str] = []
    young = 0
    for op_key, op, after, plan, written_us in sorted(rows, key=lambda r: str(r[0])):
        if written_us is not None and now_us - float(written_us) < min_age_s * 1e6:
            young += 1  # perhaps still running
            continue
        if op_key.startswith("store:"):
            visit, detector = (int(x) for x in op_key.split(":")[1:3])
            done = registry.contains_visit_detector(visit, detector)
        elif op_key.startswith("store-key:"):
            done = store.contains_store_key(op_key[len("store-key:") :])
        else:
            log.run_update(op_key, "repair", float("nan"), None)  # applies the recorded plan
            completed.append(op_key)
            continue
        if done:
            log.end(op_key)
            finished.append(op_key)
            continue
        if plan is None or not layout.store_columns:
            incomplete.append(op_key)
            continue
        recorded = json.loads(plan)
        chunk = log.find_chunk(op, int(after))
        if chunk is not None:
            counts = tuple(int(n) for n in recorded["counts"])
            store.register(
                int(recorded["visit"]),
                int(recorded["detector"]),
                recorded["key"],
                op,
                chunk,
                float(recorded["mjd"]),
                (counts[0], counts[1], counts[2]),
            )
            finished.append(op_key)
        else:
            StoreUndo(session, layout, log).remove(op, recorded)
            removed.append(op_key)
        log.end(op_key)
    return RepairReport(
        completed_updates=completed,
        finished_stores=finished,
        removed_stores=removed,
        incomplete_stores=incomplete,
        in_progress=young,
    )
