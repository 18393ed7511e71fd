"""PostgreSQL stores: one visit (or detector) written in one transaction, idempotently.

Detector stores of one visit share an advisory lock on the visit and run concurrently; a
whole-visit store takes it exclusively. The visit registry row (``diadb_visit``) is inserted
first: a second writer of the same visit/detector waits on it and then finds it taken, so a
store retried after a lost connection whose first try had committed writes nothing twice.
Bulk rows go through ADBC's binary ``COPY``, built from the Arrow columns in C.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import VisitBatch
from diadb.backends.common.members import MEMBER_TABLES, member_rows
from diadb.backends.common.names import LATEST_TABLE, AlreadyStored
from diadb.backends.common.packing import PACKED, RowPacker
from diadb.backends.postgres.changelog import ChangeLog
from diadb.backends.postgres.connection import (
    MISSING_PARTITION_STATE,
    Connection,
    is_missing_partition,
    params,
)
from diadb.backends.postgres.layout import TIME_COLUMN, Layout, partition_bounds
from diadb.backends.postgres.read import stored_keys
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema


def sorted_by_pixel(data: pa.Table) -> pa.Table:
    """Rows in ``_healpix_29`` order, so each store appends clustered runs."""
    if data.num_rows < 2:
        return data
    return data.take(pc.sort_indices(data, sort_keys=[(HEALPIX_COLUMN, "ascending")]))


class Store:
    """Writes visits: the registry, the rows, and the store's chunk (logged last)."""

    def __init__(
        self,
        conn: Connection,
        layout: Layout,
        packer: RowPacker,
        changelog: ChangeLog,
        schema: Callable[[], ApdbSchema],
    ) -> None:
        self.conn = conn
        self.layout = layout
        self.packer = packer
        self.changelog = changelog
        self._schema = schema

    def store_visit(self, batch: VisitBatch) -> bool:
        days = self.layout.partition_days
        needed = {
            name: partition_bounds(data.column(TIME_COLUMN[name]).to_numpy(), days)
            for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources))
            if data.num_rows
        }
        sources = sorted_by_pixel(batch.sources)
        forced = sorted_by_pixel(batch.forced_sources)
        what = f"store of visit {batch.visit} detector {batch.detector}"
        for attempt in range(3):
            self.layout.ensure_partitions(needed)
            try:
                return self.conn.run(what, lambda cur: self._store(cur, batch, sources, forced))
            except AlreadyStored:
                return False
            except StorageError as e:
                # A partition dropped behind our cache (by retention, perhaps in another client):
                # forget what we believed, recreate it and store again.
                if is_missing_partition(e):
                    self.layout.forget_partitions()
                cause = e.__cause__
                if (
                    attempt < 2
                    and isinstance(cause, self.conn.errors)
                    and getattr(cause, "sqlstate", "") == MISSING_PARTITION_STATE
                ):
                    continue
                raise
        raise AssertionError("unreachable")

    def _store(self, cur: Any, batch: VisitBatch, sources: pa.Table, forced: pa.Table) -> bool:
        visits = self.conn.t("diadb_visit")
        schema = self._schema()
        # Detector stores of one visit share the visit's lock and run concurrently; a whole-visit
        # store takes it exclusively. The registry row is inserted first: a second writer of the
        # same visit/detector waits on it and then finds it taken.
        lock_key = f"({self.conn.lock_space}::bigint << 32) # (hashtextextended($1::text, 0) & 4294967295)"
        store_id: int | None = None
        if batch.key is not None:
            store_id = self._register_keyed(cur, batch, sources.num_rows, forced.num_rows)
        elif batch.detector == -1:
            cur.execute(f"SELECT pg_advisory_xact_lock({lock_key})", parameters=params(str(batch.visit)))
            cur.fetchall()
            cur.execute(f"SELECT 1 FROM {visits} WHERE visit = $1 LIMIT 1", parameters=params(batch.visit))
            if cur.fetchall():
                raise AlreadyStored
        else:
            cur.execute(
                f"SELECT pg_advisory_xact_lock_shared({lock_key})", parameters=params(str(batch.visit))
            )
            cur.fetchall()
            cur.execute(
                f"SELECT 1 FROM {visits} WHERE visit = $1 AND detector = -1 LIMIT 1",
                parameters=params(batch.visit),
            )
            if cur.fetchall():
                raise AlreadyStored
        if batch.key is None:
            cur.execute(
                f"INSERT INTO {visits} (visit, detector, visit_mjd_tai, n_objects, n_sources, "
                "n_forced_sources) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1",
                parameters=params(
                    batch.visit,
                    batch.detector,
                    float(batch.visit_mjd_tai),
                    batch.objects.num_rows,
                    sources.num_rows,
                    forced.num_rows,
                ),
            )
            if not cur.fetchall():
                raise AlreadyStored
        # Keys stored by another visit: the partitioned tables cannot have a global unique index.
        for name, data in (("DiaSource", sources), ("DiaForcedSource", forced)):
            pk = list(schema.table(name).primary_key)
            if data.num_rows and pk:
                self._check_new_keys(cur, name, data.select(pk))
        if batch.objects.num_rows:
            self._store_objects(cur, batch.objects)
        for name, data in (("DiaSource", sources), ("DiaForcedSource", forced)):
            if data.num_rows:
                rows = self._pg_ready(name, data)
                cur.adbc_ingest(name, rows, mode="append", db_schema_name=self.conn.namespace)
        # The change log: the object versions first, then (last, under the chunk counter's lock
        # held to commit) the chunk itself, so chunk ids follow commit order.
        self.changelog.log_store_objects(cur, batch.visit, batch.detector, batch.objects, store_id)
        if store_id is not None:
            for name, data in (("DiaSource", sources), ("DiaForcedSource", forced)):
                if data.num_rows and name in MEMBER_TABLES:
                    members = member_rows(schema.table(name), data, "store_id", store_id)
                    cur.adbc_ingest(
                        "diadb_chunk_member", members, mode="append", db_schema_name=self.conn.namespace
                    )
        self.changelog.log_chunk(
            cur, "store", batch.visit, batch.detector, float(batch.visit_mjd_tai), store_id
        )
        return True

    def _register_keyed(self, cur: Any, batch: VisitBatch, n_sources: int, n_forced: int) -> int:
        """A keyed store: take its key (a second writer of the key waits on it, then finds it
        taken) and record its visit/detector, shared with other keyed stores of it."""
        cur.execute(
            f"INSERT INTO {self.conn.t('diadb_store_key')} (key) VALUES ($1) ON CONFLICT DO NOTHING "
            "RETURNING store_id",
            parameters=params(str(batch.key)),
        )
        rows = cur.fetchall()
        if not rows:
            raise AlreadyStored
        cur.execute(
            f"INSERT INTO {self.conn.t('diadb_visit')} AS v (visit, detector, visit_mjd_tai, n_objects, "
            "n_sources, n_forced_sources) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (visit, detector) DO UPDATE SET "
            "visit_mjd_tai = GREATEST(v.visit_mjd_tai, excluded.visit_mjd_tai), "
            "n_objects = v.n_objects + excluded.n_objects, n_sources = v.n_sources + excluded.n_sources, "
            "n_forced_sources = v.n_forced_sources + excluded.n_forced_sources",
            parameters=params(
                batch.visit,
                batch.detector,
                float(batch.visit_mjd_tai),
                batch.objects.num_rows,
                n_sources,
                n_forced,
            ),
        )
        return int(rows[0][0])

    def _check_new_keys(self, cur: Any, table: str, keys: pa.Table) -> None:
        source, binds = stored_keys(self.conn.t, table, keys)
        cur.execute(f"SELECT 1 {source} LIMIT 1", parameters=params(*binds))
        if cur.fetchall():
            cols = ", ".join(keys.column_names)
            raise StorageError(f"{table}: primary key already stored by another visit ({cols})")

    def _pg_ready(self, table: str, data: pa.Table) -> pa.Table:
        """Rows of ``table`` as stored: packed columns in one blob, and Arrow types PostgreSQL's
        binary COPY takes as-is (it has no 1-byte integer; a visit's blobs fit 32-bit offsets)."""
        data = self.packer.pack(table, data)
        if PACKED in data.column_names:
            data = data.set_column(
                data.column_names.index(PACKED), PACKED, data.column(PACKED).cast(pa.binary())
            )
        casts = {i: pa.int16() for i, f in enumerate(data.schema) if f.type == pa.int8()}
        for i, t in casts.items():
            data = data.set_column(i, data.schema.field(i).name, data.column(i).cast(t))
        return data

    def _store_objects(self, cur: Any, objects: pa.Table) -> None:
        object_ids = objects.column("diaObjectId").combine_chunks()
        starts = objects.column("validityStartMjdTai").combine_chunks()
        history, latest = self.conn.t("DiaObject"), self.conn.t(LATEST_TABLE)
        new = "unnest($1::bigint[], $2::float8[]) AS n(id, start)"
        # Close the open version of each updated object at the new version's start.
        cur.execute(
            f'UPDATE {history} d SET "validityEndMjdTai" = n.start FROM {new} '
            'WHERE d."diaObjectId" = n.id AND d."validityEndMjdTai" IS NULL',
            parameters=params((object_ids, pa.int64()), (starts, pa.float64())),
        )
        # Re-storing the same version (same id and start) replaces it rather than failing.
        cur.execute(
            f'DELETE FROM {history} d USING {new} WHERE d."diaObjectId" = n.id '
            'AND d."validityStartMjdTai" = n.start',
            parameters=params((object_ids, pa.int64()), (starts, pa.float64())),
        )
        cur.execute(
            f'DELETE FROM {latest} d WHERE d."diaObjectId" = ANY($1::bigint[])',
            parameters=params((object_ids, pa.int64())),
        )
        data = self._pg_ready("DiaObject", sorted_by_pixel(objects))
        cur.adbc_ingest("DiaObject", data, mode="append", db_schema_name=self.conn.namespace)
        cur.adbc_ingest(LATEST_TABLE, data, mode="append", db_schema_name=self.conn.namespace)
