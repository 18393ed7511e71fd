"""PostgreSQL: withdrawing DiaForcedSources and logging foreign update records (daytime calls).

As SQLite's (``diadb.backends.sqlite.forced``), without history segments: every forced source
is in the engine and is updated in place, in one transaction that also logs the chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from diadb.updates import (
    FORCED_CURRENT,
    FORCED_KEY,
    forced_payload,
    missing_keys,
    normalise_forced,
    require_known_forced,
)

T = TypeVar("T")


class PostgresForced:
    """Mixed into ``PostgresBackend``; uses its connection helpers."""

    if TYPE_CHECKING:

        def _run(self, what: str, work: Callable[[Any], T]) -> T: ...

        def _t(self, name: str) -> str: ...

        @staticmethod
        def _bind(*values: Any) -> pa.RecordBatch: ...

        def _log_chunk(
            self,
            cur: Any,
            kind: str,
            visit: int | None = None,
            detector: int | None = None,
            mjd: float = 0.0,
            store_id: int | None = None,
        ) -> int: ...

    def withdraw_forced_sources(
        self,
        keys: pa.Table,
        when_mjd: float,
        segment_lookup: Callable[[pa.Table], pa.Table],
        logged_mjd: float | None = None,
    ) -> int:
        """Set ``timeWithdrawnMjdTai`` of these forced sources where it is not set yet, in one
        transaction; return the chunk (0 when none changed). LookupError for unknown keys."""
        keys = pa.table([keys.column(c).cast(pa.int64()) for c in FORCED_KEY], names=list(FORCED_KEY))
        table = self._t("DiaForcedSource")
        cols = ", ".join(f'f."{c}"' for c in FORCED_CURRENT)
        match = " AND ".join(f'f."{c}" = k.{c}' for c in FORCED_KEY)
        binds = [(keys.column(c).combine_chunks(), pa.int64()) for c in FORCED_KEY]
        keyset = f"unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k({', '.join(FORCED_KEY)})"

        def work(cur: Any) -> int:
            cur.execute(
                f"SELECT {cols} FROM {keyset} JOIN {table} f ON {match} FOR UPDATE OF f",
                parameters=self._bind(*binds),
            )
            found = normalise_forced(cur.fetch_arrow_table())
            require_known_forced(missing_keys(keys, found))
            rows = found.filter(pc.is_null(found.column("timeWithdrawnMjdTai")))
            if not rows.num_rows:
                return 0
            # The whole primary key and the time: one index probe, only these partitions.
            cur.execute(
                f'UPDATE {table} f SET "timeWithdrawnMjdTai" = $5 FROM unnest($1::bigint[], $2::bigint[], '
                "$3::bigint[], $4::float8[]) AS k(diaObjectId, visit, detector, t) "
                f'WHERE {match} AND f."midpointMjdTai" = k.t',
                parameters=self._bind(
                    *[(rows.column(c).combine_chunks(), pa.int64()) for c in FORCED_KEY],
                    (rows.column("midpointMjdTai").combine_chunks(), pa.float64()),
                    float(when_mjd),
                ),
            )
            logged = when_mjd if logged_mjd is None else logged_mjd
            return self._log_payloads(
                cur, "withdraw_forced_sources", logged, [forced_payload(rows, when_mjd, logged)]
            )

        return self._run("withdraw_forced_sources", work)

    def _log_payloads(
        self, cur: Any, kind: str, when_mjd: float, payloads: Sequence[Mapping[str, Any]]
    ) -> int:
        """Log one daytime chunk holding these update records (last: see ``_log_chunk``)."""
        chunk = self._log_chunk(cur, "update", mjd=when_mjd)
        cur.execute(
            f"INSERT INTO {self._t('diadb_update')} (chunk_id, seq, kind, payload) "
            "SELECT $1, s - 1, $2, p FROM unnest($3::text[]) WITH ORDINALITY AS u(p, s)",
            parameters=self._bind(
                chunk, kind, (pa.array([json.dumps(dict(p)) for p in payloads], pa.string()), pa.string())
            ),
        )
        return chunk

    def log_updates(self, kind: str, payloads: Sequence[Mapping[str, Any]], when_mjd: float) -> int:
        """Record foreign update records as one daytime chunk."""
        return self._run("change-log write", lambda cur: self._log_payloads(cur, kind, when_mjd, payloads))
