"""Daytime updates on Cassandra: moving DiaSources between objects, withdrawing forced
sources, closing object versions, and the reads the daytime tools make.

The new values come from :mod:`diadb.updates` (the engine-neutral algebra); here they are read
and written. Every id is looked up (key registries, latest-object table) and the whole plan is
computed before the first write; the plan is then recorded and applied through the change log's
idempotent operations (:meth:`.changelog.ChangeLog.run_update`), so a retried call converges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array
from diadb.backends.cassandra.changelog import ChangeLog, digest
from diadb.backends.cassandra.codec import q, to_arrow
from diadb.backends.cassandra.history import CassandraHistory
from diadb.backends.cassandra.layout import (
    PART,
    TIME_COLUMN,
    Layout,
    partition_table,
)
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.backends.cassandra.store import Registry
from diadb.backends.common.names import LATEST_TABLE
from diadb.schema.model import HEALPIX_COLUMN
from diadb.updates import (
    CURRENT_COLUMNS,
    FORCED_CURRENT,
    FORCED_KEY,
    MUTABLE_SOURCE_COLUMNS,
    SourceUpdatePlan,
    apply_forced_overlay,
    apply_source_overlay,
    closing_payload,
    empty_current,
    forced_payload,
    missing_keys,
    normalise_current,
    normalise_forced,
    object_counts,
    plan_source_update,
    require_known,
    require_known_forced,
)

#: Columns of daytime changes that carry the call's time (left out of its idempotency key).
_TIME_CHANGES = ("ssObjectReassocTimeMjdTai", "timeWithdrawnMjdTai")


def _changes_key(kind: str, changes: pa.Table) -> str:
    """A daytime call's idempotency key: its kind and changes, without the call's time (a retry
    made later is the same call)."""
    cols = sorted(c for c in changes.column_names if c not in _TIME_CHANGES)
    t = changes.select(cols).sort_by([("diaSourceId", "ascending")])
    return f"{kind}:" + digest(cols, [t.column(c).to_pylist() for c in cols])


class Daytime:
    """The daytime calls of the Backend protocol."""

    def __init__(
        self,
        session: CassandraSession,
        layout: Layout,
        registry: Registry,
        log: ChangeLog,
        history: CassandraHistory,
    ) -> None:
        self.session = session
        self.layout = layout
        self.registry = registry
        self.log = log
        self.history = history

    @contextmanager
    def _no_compaction(self) -> Iterator[float]:
        """Hold the compaction lease (with the tier on), so that no compaction copies a row while
        this update changes it; yields the history boundary: rows older than it live in
        segments (their engine copies, until dropped, are no longer read)."""
        if not self.history.enabled:
            yield -math.inf
            return
        lease = self.history.lease()
        lease.acquire(wait_s=300.0)
        try:
            yield self.history.boundary()
        finally:
            lease.release()

    @staticmethod
    def _split_moved(rows: pa.Table, boundary: float) -> tuple[pa.Table, pa.Table]:
        """``rows`` found in the engine: (still the engine's, already in segments)."""
        if not math.isfinite(boundary) or not rows.num_rows:
            return rows, rows.slice(0, 0)
        old = pc.less(rows.column(TIME_COLUMN), boundary)
        return rows.filter(pc.invert(old)), rows.filter(old)

    # ---- reading current values ----------------------------------------------------
    def _current_sources(self, ids: Int64Array) -> pa.Table:
        """``CURRENT_COLUMNS`` of the stored DiaSources among ``ids`` (found through the key
        registry, which records where each one lives)."""
        keys = self.registry.lookup("DiaSource", pa.table({"diaSourceId": np.unique(ids)}))
        if not keys.num_rows:
            return empty_current()
        sel = ", ".join(q(c) for c in CURRENT_COLUMNS)
        h29 = np.asarray(keys.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        t = np.asarray(keys.column(TIME_COLUMN).to_numpy(), dtype=np.float64)
        sid = np.asarray(keys.column("diaSourceId").to_numpy(), dtype=np.int64)
        tparts = self.layout.time_partition(t)
        pix = self.layout.pixel(h29)
        existing = set(self.layout.partition_numbers()["DiaSource"])
        statements: Statements = []
        for i in range(len(sid)):
            if int(tparts[i]) not in existing:
                continue
            physical = self.session.t(partition_table("DiaSource", tparts[i]))
            stmt = self.session.prepare(
                f"SELECT {sel} FROM {physical} WHERE {PART} = ? "
                f"AND {q(HEALPIX_COLUMN)} = ? AND {q(TIME_COLUMN)} = ? AND {q('diaSourceId')} = ?"
            )
            statements.append((stmt, (int(pix[i]), int(h29[i]), float(t[i]), int(sid[i]))))
        rows = [r for rs in self.session.run(statements, write=False) for r in rs]
        types = self.layout.types("DiaSource")
        return normalise_current(to_arrow(types, list(CURRENT_COLUMNS), rows))

    def _latest_objects(self, ids: Int64Array) -> pa.Table:
        """Current (latest-table) rows of these objects: id, ra, dec, nDiaSources, start, part, h29."""
        keys = self.registry.lookup("DiaObject", pa.table({"diaObjectId": np.unique(ids)}))
        cols = ["diaObjectId", "ra", "dec", "nDiaSources", "validityStartMjdTai", PART, HEALPIX_COLUMN]
        stmt = self.session.prepare(
            f"SELECT {', '.join(q(c) for c in cols)} FROM {self.session.t(LATEST_TABLE)} WHERE {PART} = ? "
            f"AND {q(HEALPIX_COLUMN)} = ? AND {q('diaObjectId')} = ?"
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
        rows = [r for rs in self.session.run(statements, write=False) for r in rs]
        types = {**self.layout.types("DiaObject"), PART: "int"}
        return to_arrow(types, cols, rows)

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
        is checked and the whole plan computed before the first write (UnknownIdError naming
        unknown ids: nothing changes); see :mod:`.changelog` for what is atomic and how a retry
        converges."""
        with self._no_compaction() as boundary:
            return self._update_sources(
                changes, kind, when_mjd, segment_lookup, object_deltas, remove_empty, increment, decrement,
                only_null, boundary,
            )  # fmt: skip

    def _update_sources(
        self,
        changes: pa.Table,
        kind: str,
        when_mjd: float,
        segment_lookup: Callable[[Int64Array], pa.Table],
        object_deltas: bool,
        remove_empty: bool,
        increment: bool,
        decrement: bool,
        only_null: str | None,
        boundary: float,
    ) -> int:
        ids = np.asarray(changes.column("diaSourceId").to_numpy(), dtype=np.int64)
        op_key = _changes_key(kind, changes)
        stored, moved = self._split_moved(self._current_sources(ids), boundary)
        found = np.concatenate(
            [np.asarray(t.column("diaSourceId").to_numpy(), np.int64) for t in (stored, moved)]
        )
        elsewhere = np.setdiff1d(ids, found)
        in_segments = moved
        if len(elsewhere):
            in_segments = pa.concat_tables([moved, normalise_current(segment_lookup(elsewhere))])
        if in_segments.num_rows:  # their current values: the overlay's, where it has them
            overlay = self.history.source_overlay_of(in_segments)
            in_segments = normalise_current(apply_source_overlay(in_segments, overlay))
        segment_ids = np.asarray(in_segments.column("diaSourceId").to_numpy(), dtype=np.int64)
        stored = pa.concat_tables([stored, in_segments])
        plan = plan_source_update(
            stored,
            changes,
            object_deltas=object_deltas,
            increment=increment,
            decrement=decrement,
            only_null=only_null,
        )
        recorded: dict[str, Any] | None = None
        if plan is not None:
            if len(plan.targets):
                latest = self._latest_objects(plan.targets)
                require_known("DiaObject", plan.targets, latest.column("diaObjectId").to_numpy())
            recorded = self._source_plan(plan, kind, when_mjd, remove_empty, segment_ids)
        # Called even without a plan: a pending record of an earlier failed attempt is finished.
        chunk, _ = self.log.run_update(op_key, kind, when_mjd, recorded)
        return chunk

    def _source_plan(
        self, plan: SourceUpdatePlan, kind: str, when_mjd: float, remove_empty: bool, segment_ids: Int64Array
    ) -> dict[str, Any]:
        """The operation's recorded plan (absolute values, JSON): the sources' new columns where
        they live, and the objects' new ``nDiaSources`` (closed when emptied, with ``remove_empty``)."""
        counts: list[dict[str, Any]] = []
        objects: list[list[Any]] = []
        delta = plan.delta
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
        new = plan.new
        tparts = self.layout.time_partition(np.asarray(new.column(TIME_COLUMN).to_numpy(), dtype=np.float64))
        h29 = np.asarray(new.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        pix = self.layout.pixel(h29)
        cols = [new.column(c).to_pylist() for c in (TIME_COLUMN, "diaSourceId", *MUTABLE_SOURCE_COLUMNS)]
        in_segments = np.isin(np.asarray(new.column("diaSourceId").to_numpy(), dtype=np.int64), segment_ids)
        sources = [
            [int(tparts[i]), int(pix[i]), int(h29[i]), *(c[i] for c in cols)]
            for i in range(new.num_rows)
            if not in_segments[i]
        ]
        # Sources in segments: (part, h29, time, id, *mutable values) into the overlay.
        overlay = [
            [int(pix[i]), int(h29[i]), *(c[i] for c in cols)] for i in range(new.num_rows) if in_segments[i]
        ]
        payload = plan.payload(when_mjd, counts)
        return {
            "kind": kind,
            "when": when_mjd,
            "payloads": [payload],
            "sources": sources,
            "overlay_sources": overlay,
            "objects": objects,
        }

    def withdraw_forced_sources(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None = None,
    ) -> int:
        """Set ``timeWithdrawnMjdTai`` of these forced sources where it is not set yet; return the
        chunk (logged at ``logged_mjd``, default ``when_mjd``; 0 when none changed). UnknownIdError
        for unknown keys, before any write."""
        with self._no_compaction() as boundary:
            return self._withdraw_forced(keys, when_mjd, segment_lookup, logged_mjd, boundary)

    def _withdraw_forced(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None,
        boundary: float,
    ) -> int:
        logged = when_mjd if logged_mjd is None else logged_mjd
        keys = pa.table([keys.column(c).cast(pa.int64()) for c in FORCED_KEY], names=list(FORCED_KEY))
        op_key = "withdraw_forced:" + digest([keys.column(c).to_pylist() for c in FORCED_KEY])
        spec = self.layout.schema.table("DiaForcedSource")
        pk = list(spec.primary_key)
        typed = pa.table({c: keys.column(c).cast(spec.arrow_schema().field(c).type) for c in pk})
        found = self.registry.lookup("DiaForcedSource", typed)
        sel = ", ".join(q(c) for c in FORCED_CURRENT)
        existing = set(self.layout.partition_numbers()["DiaForcedSource"])
        statements: Statements = []
        for r in found.to_pylist():
            tp = int(self.layout.time_partition(r[TIME_COLUMN]))
            if tp not in existing:
                continue
            stmt = self.session.prepare(
                f"SELECT {sel} FROM {self.session.t(partition_table('DiaForcedSource', tp))} "
                f"WHERE {PART} = ? "
                f"AND {q(HEALPIX_COLUMN)} = ? AND {q(TIME_COLUMN)} = ? AND {q('diaObjectId')} = ? "
                "AND visit = ? AND detector = ?"
            )
            part = int(self.layout.pixel(np.array([r[HEALPIX_COLUMN]]))[0])
            statements.append(
                (stmt, (part, r[HEALPIX_COLUMN], r[TIME_COLUMN], r["diaObjectId"], r["visit"], r["detector"]))
            )
        rows = [r for rs in self.session.run(statements, write=False) for r in rs]
        types = {c.name: c.datatype for c in spec.columns}
        in_engine, moved = self._split_moved(
            normalise_forced(to_arrow(types, list(FORCED_CURRENT), rows)), boundary
        )
        rest = missing_keys(keys, pa.concat_tables([in_engine, moved]))
        in_segments = moved
        if rest.num_rows:
            looked_up = normalise_forced(segment_lookup(rest))
            require_known_forced(missing_keys(rest, looked_up))
            in_segments = pa.concat_tables([moved, looked_up])
        if in_segments.num_rows:  # their withdrawal times: the overlay's, where it has them
            in_segments = apply_forced_overlay(in_segments, self.history.forced_overlay_of(in_segments))
        todo = in_engine.filter(pc.is_null(in_engine.column("timeWithdrawnMjdTai")))
        todo_segments = in_segments.filter(pc.is_null(in_segments.column("timeWithdrawnMjdTai")))
        plan: dict[str, Any] | None = None
        if todo.num_rows or todo_segments.num_rows:
            forced = [
                [
                    int(self.layout.time_partition(r[TIME_COLUMN])),
                    int(self.layout.pixel(np.array([r[HEALPIX_COLUMN]]))[0]),
                    r[HEALPIX_COLUMN],
                    r[TIME_COLUMN],
                    r["diaObjectId"],
                    r["visit"],
                    r["detector"],
                    when_mjd,
                ]
                for r in todo.to_pylist()
            ]
            overlay = [
                [
                    int(self.layout.pixel(np.array([r[HEALPIX_COLUMN]]))[0]),
                    r[HEALPIX_COLUMN],
                    r[TIME_COLUMN],
                    r["diaObjectId"],
                    r["visit"],
                    r["detector"],
                    when_mjd,
                ]
                for r in todo_segments.to_pylist()
            ]
            payload = forced_payload(pa.concat_tables([todo, todo_segments]), when_mjd, logged)
            plan = {
                "kind": "withdraw_forced_sources",
                "when": logged,
                "payloads": [payload],
                "forced": forced,
                "overlay_forced": overlay,
            }
        chunk, _ = self.log.run_update(op_key, "withdraw_forced_sources", logged, plan)
        return chunk

    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        """Close the open versions of these objects (they leave the latest table); return how
        many. Unknown ids raise UnknownIdError (unless ``missing_ok``) before any write."""
        ids = np.unique(np.asarray(object_ids, dtype=np.int64))
        known = self.registry.lookup("DiaObject", pa.table({"diaObjectId": ids}))
        if not missing_ok:
            require_known("DiaObject", ids, known.column("diaObjectId").to_numpy())
        op_key = "set_validity_end:" + digest(ids.tolist())
        latest = self._latest_objects(ids).sort_by("diaObjectId")
        plan: dict[str, Any] | None = None
        if latest.num_rows:
            objects = [
                [r["diaObjectId"], r["validityStartMjdTai"], r[PART], r[HEALPIX_COLUMN], None, when_mjd]
                for r in latest.to_pylist()
            ]
            payload = closing_payload(latest.select([0, 1, 2]), when_mjd)
            plan = {"kind": "set_validity_end", "when": when_mjd, "payloads": [payload], "objects": objects}
        _, done = self.log.run_update(op_key, "set_validity_end", when_mjd, plan)
        return 0 if done is None else len(done.get("objects", []))

    def count_unassociated(self) -> int:
        stmt = self.session.prepare(
            f"SELECT count(*) FROM {self.session.t(LATEST_TABLE)} WHERE {q('nDiaSources')} = 1 "
            "ALLOW FILTERING"
        )
        (rows,) = self.session.run([(stmt, ())], write=False)
        return int(rows[0][0])
