"""PostgreSQL: the daytime updates of stored rows, each one transaction that logs one chunk.

What the new values are is computed by :mod:`diadb.updates`, the same for every engine; this
module only reads the stored values (locking them), checks what must exist, and writes.
Rows still in the engine are updated in place; rows the history tier already moved into
segments (found by the caller's ``segment_lookup``) get their new values in the overlay tables
(``diadb_source_overlay``, ``diadb_forced_overlay``) that reads apply on top, as on SQLite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.base import Int64Array
from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.common.packing import RowPacker
from diadb.backends.postgres.changelog import ChangeLog
from diadb.backends.postgres.connection import Connection, ids, params, q
from diadb.updates import (
    CURRENT_COLUMNS,
    FORCED_CURRENT,
    FORCED_KEY,
    MUTABLE_SOURCE_COLUMNS,
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

#: The PostgreSQL array type each column a source update writes is bound as.
_WRITE_PG = {
    "diaSourceId": "bigint",
    "_healpix_29": "bigint",
    "midpointMjdTai": "float8",
    "diaObjectId": "bigint",
    "ssObjectId": "bigint",
    "ssObjectReassocTimeMjdTai": "float8",
    "timeWithdrawnMjdTai": "float8",
}


class Daytime:
    """Source moves, withdrawals, closed object versions, and the reads the daytime code needs."""

    def __init__(self, conn: Connection, changelog: ChangeLog, packer: RowPacker) -> None:
        self.conn = conn
        self.changelog = changelog
        self.packer = packer

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
        """Set mutable columns of DiaSources, in one transaction; return the chunk id (0 when no
        row changed: no chunk then). The plan is :func:`diadb.updates.plan_source_update`'s.
        Raises UnknownIdError naming unknown DiaSource or DiaObject ids; nothing changes then.
        """
        wanted = np.asarray(changes.column("diaSourceId").to_numpy(), dtype=np.int64)
        cols = ", ".join(f"s.{q(c)}" for c in CURRENT_COLUMNS)

        def work(cur: Any) -> int:
            self.conn.hold_off_compaction(cur)
            # The rows are locked (in the order given) so that two daytime calls moving the same
            # source serialise, and the second one sees the first one's values.
            cur.execute(
                f"SELECT {cols} FROM unnest($1::bigint[]) WITH ORDINALITY AS c(id, ord) "
                f'JOIN {self.conn.t("DiaSource")} s ON s."diaSourceId" = c.id ORDER BY c.ord FOR UPDATE OF s',
                parameters=params(ids(wanted)),
            )
            in_engine = normalise_current(cur.fetch_arrow_table())
            engine_ids = np.asarray(in_engine.column(0).to_numpy(), dtype=np.int64)
            rest = np.setdiff1d(wanted, engine_ids)
            # Sources already in history segments: their current values are the overlay's.
            in_segments = normalise_current(segment_lookup(rest)) if len(rest) else empty_current()
            if in_segments.num_rows:
                in_segments = normalise_current(self._with_source_overlay(cur, in_segments))
            plan = plan_source_update(
                pa.concat_tables([in_engine, in_segments]),
                changes,
                object_deltas=object_deltas,
                increment=increment,
                decrement=decrement,
                only_null=only_null,
            )
            if plan is None:
                return 0
            if len(plan.targets):
                cur.execute(
                    f'SELECT "diaObjectId" FROM {self.conn.t(LATEST_TABLE)} '
                    'WHERE "diaObjectId" = ANY($1::bigint[])',
                    parameters=params(ids(plan.targets)),
                )
                require_known("DiaObject", plan.targets, cur.fetch_arrow_table().column(0).to_numpy())
            counts = self._apply_object_deltas(cur, plan.delta, when_mjd, remove_empty)
            new = plan.new
            is_engine = np.isin(np.asarray(new.column("diaSourceId").to_numpy(), dtype=np.int64), engine_ids)
            self._write_sources(cur, new.filter(pa.array(is_engine)))
            self._write_overlay(cur, new.filter(pa.array(~is_engine)))
            return self.changelog.log_payloads(cur, kind, when_mjd, [plan.payload(when_mjd, counts)])

        return self.conn.run(kind, work)

    def _write_sources(self, cur: Any, new: pa.Table) -> None:
        if not new.num_rows:
            return
        names = ["diaSourceId", "_healpix_29", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS]
        arrays = ", ".join(f"${i + 1}::{_WRITE_PG[c]}[]" for i, c in enumerate(names))
        aliases = ", ".join(f"n{i}" for i in range(len(names)))
        sets = ", ".join(f"{q(c)} = n.n{i + 3}" for i, c in enumerate(MUTABLE_SOURCE_COLUMNS))
        binds = [(new.column(c).combine_chunks(), new.schema.field(c).type) for c in names]
        # The whole primary key (pixel, time, id) is matched: one index probe per row, and
        # only the partitions of these times are touched.
        cur.execute(
            f"UPDATE {self.conn.t('DiaSource')} s SET {sets} FROM unnest({arrays}) AS n({aliases}) "
            'WHERE s."diaSourceId" = n.n0 AND s."_healpix_29" = n.n1 AND s."midpointMjdTai" = n.n2',
            parameters=params(*binds),
        )

    def _with_source_overlay(self, cur: Any, rows: pa.Table) -> pa.Table:
        """``rows`` (sources in segments) with the current values the overlay holds."""
        cur.execute(
            f"SELECT {', '.join(q(c) for c in ('diaSourceId', *MUTABLE_SOURCE_COLUMNS))} "
            f'FROM {self.conn.t("diadb_source_overlay")} WHERE "diaSourceId" = ANY($1::bigint[])',
            parameters=params(ids(rows.column("diaSourceId"))),
        )
        return apply_source_overlay(rows, cur.fetch_arrow_table())

    def _write_overlay(self, cur: Any, new: pa.Table) -> None:
        """The new values of sources in segments, into the overlay reads apply."""
        if not new.num_rows:
            return
        names = ["diaSourceId", "_healpix_29", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS]
        arrays = ", ".join(f"${i + 1}::{_WRITE_PG[c]}[]" for i, c in enumerate(names))
        sets = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in MUTABLE_SOURCE_COLUMNS)
        binds = [(new.column(c).combine_chunks(), new.schema.field(c).type) for c in names]
        cur.execute(
            f"INSERT INTO {self.conn.t('diadb_source_overlay')} ({', '.join(q(c) for c in names)}) "
            f'SELECT * FROM unnest({arrays}) ON CONFLICT ("diaSourceId") DO UPDATE SET {sets}',
            parameters=params(*binds),
        )

    def _apply_object_deltas(
        self, cur: Any, delta: pa.Table, when_mjd: float, remove_empty: bool
    ) -> list[dict[str, Any]]:
        """Add ``delta`` (id, delta) to nDiaSources; return the objects' new counts and positions."""
        if not delta.num_rows:
            return []
        binds = params(ids(delta.column("id")), ids(delta.column("delta")))
        history, latest = self.conn.t("DiaObject"), self.conn.t(LATEST_TABLE)
        for table, extra in ((latest, ""), (history, ' AND t."validityEndMjdTai" IS NULL')):
            cur.execute(
                f'UPDATE {table} t SET "nDiaSources" = t."nDiaSources" + d.delta FROM '
                f'unnest($1::bigint[], $2::bigint[]) AS d(id, delta) WHERE t."diaObjectId" = d.id{extra}',
                parameters=binds,
            )
        cur.execute(
            f'SELECT "diaObjectId", ra, dec, "nDiaSources" FROM {latest} '
            'WHERE "diaObjectId" = ANY($1::bigint[]) ORDER BY "diaObjectId"',
            parameters=params(ids(delta.column("id"))),
        )
        counts = object_counts(cur.fetch_arrow_table())
        if remove_empty:
            # An object left without sources leaves the latest table; its open version is closed.
            cur.execute(
                f'WITH gone AS (DELETE FROM {latest} WHERE "nDiaSources" <= 0 '
                'AND "diaObjectId" = ANY($1::bigint[]) RETURNING "diaObjectId") '
                f'UPDATE {history} t SET "validityEndMjdTai" = $2 FROM gone '
                'WHERE t."diaObjectId" = gone."diaObjectId" AND t."validityEndMjdTai" IS NULL',
                parameters=params(ids(delta.column("id")), float(when_mjd)),
            )
        return counts

    def set_validity_end(self, object_ids: Int64Array, when_mjd: float, missing_ok: bool = False) -> int:
        """Close the open version of these objects (they leave the latest table); return how many.
        Unknown ids raise UnknownIdError, or are skipped with ``missing_ok``."""
        wanted = np.unique(np.asarray(object_ids, dtype=np.int64))
        history, latest = self.conn.t("DiaObject"), self.conn.t(LATEST_TABLE)

        def work(cur: Any) -> int:
            if not missing_ok:
                cur.execute(
                    f'SELECT DISTINCT "diaObjectId" FROM {history} WHERE "diaObjectId" = ANY($1::bigint[])',
                    parameters=params(ids(wanted)),
                )
                require_known("DiaObject", wanted, cur.fetch_arrow_table().column(0).to_numpy())
            cur.execute(
                f'WITH closed AS (UPDATE {history} SET "validityEndMjdTai" = $2 '
                'WHERE "validityEndMjdTai" IS NULL AND "diaObjectId" = ANY($1::bigint[]) '
                'RETURNING "diaObjectId", ra, dec), '
                f'gone AS (DELETE FROM {latest} WHERE "diaObjectId" = ANY($1::bigint[])) '
                'SELECT * FROM closed ORDER BY "diaObjectId"',
                parameters=params(ids(wanted), float(when_mjd)),
            )
            closed = cur.fetch_arrow_table()
            if not closed.num_rows:
                return 0
            payload = closing_payload(closed, when_mjd)
            self.changelog.log_payloads(cur, "set_validity_end", when_mjd, [payload])
            return int(closed.num_rows)

        return self.conn.run("set_validity_end", work)

    def withdraw_forced_sources(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None = None,
    ) -> int:
        """Set ``timeWithdrawnMjdTai`` of these forced sources where it is not set yet, in one
        transaction; return the chunk (0 when none changed). UnknownIdError for unknown keys
        (there are no segments here, so ``segment_lookup`` is not asked)."""
        keys = pa.table([keys.column(c).cast(pa.int64()) for c in FORCED_KEY], names=list(FORCED_KEY))
        table = self.conn.t("DiaForcedSource")
        cols = ", ".join(f"f.{q(c)}" for c in FORCED_CURRENT)
        match = " AND ".join(f"f.{q(c)} = k.{c}" for c in FORCED_KEY)
        binds = [(keys.column(c).combine_chunks(), pa.int64()) for c in FORCED_KEY]
        keyset = f"unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k({', '.join(FORCED_KEY)})"

        def work(cur: Any) -> int:
            self.conn.hold_off_compaction(cur)
            cur.execute(
                f"SELECT {cols} FROM {keyset} JOIN {table} f ON {match} FOR UPDATE OF f",
                parameters=params(*binds),
            )
            found = normalise_forced(cur.fetch_arrow_table())
            rest = missing_keys(keys, found)
            in_segments = normalise_forced(segment_lookup(rest)) if rest.num_rows else found.slice(0, 0)
            if in_segments.num_rows:
                in_segments = self._with_forced_overlay(cur, in_segments)
            require_known_forced(missing_keys(rest, in_segments))
            rows = found.filter(pc.is_null(found.column("timeWithdrawnMjdTai")))
            segment = in_segments.filter(pc.is_null(in_segments.column("timeWithdrawnMjdTai")))
            if not rows.num_rows and not segment.num_rows:
                return 0
            if segment.num_rows:
                self._write_forced_overlay(cur, segment, when_mjd)
            # The whole primary key and the time: one index probe, only these partitions.
            cur.execute(
                f'UPDATE {table} f SET "timeWithdrawnMjdTai" = $5 FROM unnest($1::bigint[], $2::bigint[], '
                "$3::bigint[], $4::float8[]) AS k(diaObjectId, visit, detector, t) "
                f'WHERE {match} AND f."midpointMjdTai" = k.t',
                parameters=params(
                    *[(rows.column(c).combine_chunks(), pa.int64()) for c in FORCED_KEY],
                    (rows.column("midpointMjdTai").combine_chunks(), pa.float64()),
                    float(when_mjd),
                ),
            )
            logged = when_mjd if logged_mjd is None else logged_mjd
            payload = forced_payload(pa.concat_tables([rows, segment]), when_mjd, logged)
            return self.changelog.log_payloads(cur, "withdraw_forced_sources", logged, [payload])

        return self.conn.run("withdraw_forced_sources", work)

    def _with_forced_overlay(self, cur: Any, rows: pa.Table) -> pa.Table:
        """``rows`` (forced sources in segments) with the withdrawal times the overlay holds."""
        match = " AND ".join(f"o.{q(c)} = k.{c}" for c in FORCED_KEY)
        cur.execute(
            'SELECT o."diaObjectId", o.visit, o.detector, o."timeWithdrawnMjdTai" AS _w '
            f"FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k({', '.join(FORCED_KEY)}) "
            f"JOIN {self.conn.t('diadb_forced_overlay')} o ON {match}",
            parameters=params(*[(rows.column(c).combine_chunks(), pa.int64()) for c in FORCED_KEY]),
        )
        return apply_forced_overlay(rows, cur.fetch_arrow_table())

    def _write_forced_overlay(self, cur: Any, rows: pa.Table, when_mjd: float) -> None:
        """Withdrawal times of forced sources in segments, into the overlay reads apply."""
        cur.execute(
            f'INSERT INTO {self.conn.t("diadb_forced_overlay")} ("diaObjectId", visit, detector, '
            '"_healpix_29", "midpointMjdTai", "timeWithdrawnMjdTai") SELECT *, $6::float8 FROM '
            "unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::float8[]) "
            'ON CONFLICT ("diaObjectId", visit, detector) DO UPDATE SET '
            '"timeWithdrawnMjdTai" = excluded."timeWithdrawnMjdTai"',
            parameters=params(
                *[(rows.column(c).combine_chunks(), pa.int64()) for c in (*FORCED_KEY, "_healpix_29")],
                (rows.column("midpointMjdTai").combine_chunks(), pa.float64()),
                float(when_mjd),
            ),
        )

    def objects_since(self, since_mjd: float) -> pa.Table:
        """Latest versions of objects whose version started at or after ``since_mjd``."""
        rows = self.conn.read(
            "dedup read",
            f"SELECT * FROM {self.conn.t(LATEST_TABLE)} "
            "WHERE \"validityStartMjdTai\" >= current_setting('diadb.p1')::float8",
            {"diadb.p1": repr(float(since_mjd))},
        )
        return self.packer.expand("DiaObject", rows)

    def count_unassociated(self) -> int:
        t = self.conn.read(
            "count", f'SELECT count(*) FROM {self.conn.t(LATEST_TABLE)} WHERE "nDiaSources" = 1'
        )
        return int(t.column(0)[0].as_py())
