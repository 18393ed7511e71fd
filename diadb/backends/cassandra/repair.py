"""Finishing what failed operations left behind (``Apdb.repair``, ``diadb repair``).

Every store and daytime call first records itself in ``diadb_pending`` and removes that record
as its last step (:mod:`.changelog`), so the records still there name the operations that did
not finish: their process died, or its call raised and was never retried. Those older than a
grace (an operation in progress is left alone) are settled here:

- a daytime call's record holds its whole plan (absolute values): it is applied again and its
  chunk taken, exactly as the call's own retry would, so the update is then complete;
- a store that registered its visit (or key) but died before removing its record is complete:
  the record goes;
- a store that never registered is hidden from every read (:mod:`.visibility`), and only its
  input can complete it: it is reported, to be stored again. Its rows stay (hidden).
"""

from __future__ import annotations

import time

from diadb.backends.base import RepairReport
from diadb.backends.cassandra.changelog import ChangeLog
from diadb.backends.cassandra.session import CassandraSession
from diadb.backends.cassandra.store import Registry, Store


def repair(
    session: CassandraSession, log: ChangeLog, registry: Registry, store: Store, min_age_s: float
) -> RepairReport:
    """Settle the pending operations older than ``min_age_s`` (see the module docstring)."""
    stmt = session.prepare(f"SELECT op_key, writetime(from_id) FROM {session.t('diadb_pending')}")
    (rows,) = session.run([(stmt, ())], write=False)
    now_us = time.time() * 1e6
    completed: list[str] = []
    finished: list[str] = []
    incomplete: list[str] = []
    young = 0
    for op_key, written_us in sorted(rows, key=lambda r: str(r[0])):
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
        else:
            incomplete.append(op_key)
    return RepairReport(
        completed_updates=completed, finished_stores=finished, incomplete_stores=incomplete, in_progress=young
    )
