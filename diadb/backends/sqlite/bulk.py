"""SQLite: a bulk load of many visits (``Apdb.load_history``) in one write transaction.

What the transaction writes is what storing the visits one by one would leave: the visit
registry, one ``store`` chunk per visit with its object versions, the DiaObject versions (the
open version of each object closed at its first new one), the latest-object table, the source
rows the engine keeps, and the manifest entries of the segments written from closed spans
(files written durably while the write lock is held, as compaction does: a crash before the
commit leaves only orphan files, which the next compaction's sweep deletes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import BulkSegmentWriter, HistoryBatch
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.sqlite.changelog import now_iso
from diadb.backends.sqlite.connection import SqliteConnection, q
from diadb.backends.sqlite.history import record_segment
from diadb.errors import DuplicateVisitError, StorageError
from diadb.history.segment import SegmentInfo


class SqliteBulk:
    """``load_history`` of the SQLite engine."""

    def __init__(self, conn: SqliteConnection) -> None:
        self._conn = conn

    def load_history(self, batch: HistoryBatch, write: BulkSegmentWriter | None) -> list[SegmentInfo]:
        created: list[SegmentInfo] = []
        visits = batch.visits
        n = visits.num_rows
        try:
            with self._conn.transaction() as cur:
                self._conn.temp_table(cur, "diadb_bulk_visit", visits.select(["visit"]))
                cur.execute(
                    "SELECT DISTINCT v.visit FROM diadb_visit v JOIN temp.diadb_bulk_visit b "
                    "ON v.visit = b.visit LIMIT 10"
                )
                taken = [int(r[0]) for r in cur.fetchall()]
                if taken:
                    raise DuplicateVisitError(
                        f"visits {taken} are already stored in {self._conn.path}: "
                        "a bulk load takes new visits only"
                    )
                cur.execute("SELECT COALESCE(MAX(chunk_id), 0) FROM diadb_chunk")
                first_chunk = int(cur.fetchall()[0][0]) + 1
                chunk_ids = np.arange(first_chunk, first_chunk + n, dtype=np.int64)
                stamp = now_iso()
                cur.adbc_ingest(
                    "diadb_chunk",
                    pa.table(
                        {
                            "chunk_id": chunk_ids,
                            "kind": pa.array(["store"] * n),
                            "visit": visits.column("visit"),
                            "detector": pa.array(np.full(n, -1, dtype=np.int64)),
                            "visit_mjd_tai": visits.column("visit_mjd_tai"),
                            "created_at": pa.array([stamp] * n),
                            "published": pa.array(np.zeros(n, dtype=np.int64)),
                        }
                    ),
                    mode="append",
                )
                if batch.objects.num_rows:
                    self._objects(cur, batch, chunk_ids)
                for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
                    if data.num_rows:
                        cur.adbc_ingest(name, data, mode="append")
                cur.adbc_ingest(
                    "diadb_visit",
                    pa.table(
                        {
                            "visit": visits.column("visit"),
                            "detector": pa.array(np.full(n, -1, dtype=np.int64)),
                            "visit_mjd_tai": visits.column("visit_mjd_tai"),
                            "stored_at": pa.array([stamp] * n),
                            "n_objects": visits.column("n_objects"),
                            "n_sources": visits.column("n_sources"),
                            "n_forced_sources": visits.column("n_forced_sources"),
                            "chunk_id": chunk_ids,
                        }
                    ),
                    mode="append",
                )
                for table, rows in batch.segment_rows.items():
                    if not rows.num_rows:
                        continue
                    if write is None:
                        raise StorageError(f"a bulk load of {table} segment rows needs the history tier")
                    infos = write(table, rows)
                    for info in infos:
                        record_segment(cur, info)
                    created += infos
        except self._conn.errors as e:
            raise StorageError(f"SQLite bulk load of {n} visits failed on {self._conn.path}: {e}") from e
        return created

    def _objects(self, cur: Any, batch: HistoryBatch, chunk_ids: np.ndarray) -> None:
        """The versions and their chunks; the open versions in the database closed at each
        object's first new version; the latest-object table's rows replaced."""
        objects = batch.objects
        keys = pa.table(
            {
                "chunk_id": pa.array(chunk_ids[batch.object_visit]),
                "diaObjectId": objects.column("diaObjectId"),
                "validityStartMjdTai": objects.column("validityStartMjdTai"),
            }
        )
        cur.adbc_ingest("diadb_chunk_object", keys, mode="append")
        self._conn.temp_table(cur, "diadb_new_versions", batch.first_versions)
        cur.execute("CREATE UNIQUE INDEX temp.diadb_new_versions_id ON diadb_new_versions (id)")
        cur.execute(
            'UPDATE "DiaObject" SET "validityEndMjdTai" = (SELECT n.start FROM temp.diadb_new_versions n '
            'WHERE n.id = "DiaObject"."diaObjectId") '
            'WHERE "diaObjectId" IN (SELECT id FROM temp.diadb_new_versions) AND "validityEndMjdTai" IS NULL'
        )
        cur.adbc_ingest("DiaObject", objects, mode="append")
        cur.execute(
            f"DELETE FROM {q(LATEST_TABLE)} WHERE diaObjectId IN (SELECT id FROM temp.diadb_new_versions)"
        )
        cur.adbc_ingest(LATEST_TABLE, batch.latest, mode="append")
