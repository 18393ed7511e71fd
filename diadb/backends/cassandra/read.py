"""Reads: the rows in order-29 pixel ranges and a time window, or of some objects.

A region is cut into (coarse pixel, ``_healpix_29`` slice) pairs: each is one Cassandra
partition of each time-partition table, read by one prepared slice query, all issued
concurrently and routed to a replica (token-aware). Regions too large for that are read by
token-range scans. The driver's Cython row parser builds the tuples, the columns are assembled
into Arrow arrays with one ``pyarrow.array`` call each and the packed blobs with one
``numpy.frombuffer`` (no Python loop over rows in diadb); the exact filter runs on the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.base import Int64Array, ReadTable, TimeWindow
from diadb.backends.cassandra.codec import groups, q, to_arrow
from diadb.backends.cassandra.layout import (
    BUCKET,
    HISTORY_TABLE,
    PART,
    STORED_DETECTOR,
    STORED_VISIT,
    TIME_COLUMN,
    Layout,
    partition_table,
)
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.backends.cassandra.store import Registry
from diadb.backends.cassandra.visibility import Visibility, rows_shown, unmark_moved
from diadb.backends.common.names import LATEST_TABLE
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.healpix import coarsen_ranges

#: What a node that has not received a new table yet answers.
SCHEMA_LAG = ("does not exist", "INCOMPATIBLE_SCHEMA", "unconfigured table")


class Reader:
    """``select`` over the layout's tables."""

    def __init__(
        self, session: CassandraSession, layout: Layout, registry: Registry, visibility: Visibility
    ) -> None:
        self.session = session
        self.layout = layout
        self.registry = registry
        self.visibility = visibility

    def slices(self, ranges: Int64Array) -> list[tuple[int, int, int]] | None:
        """(coarse pixel, lo, hi) slices covering ``ranges``, at most ``max_slices`` per pixel;
        ``None`` when they touch more than ``scan_pixels`` pixels (a token-range scan is cheaper)."""
        opts = self.session.opts
        shift = 2 * (29 - self.layout.pixel_order)
        r = np.asarray(ranges, dtype=np.int64)
        first = r[:, 0] >> shift
        last = (r[:, 1] - 1) >> shift
        counts = last - first + 1
        if (
            int(counts.sum()) > 4 * opts.scan_pixels
            or len(np.unique(np.concatenate([first, last]))) > opts.scan_pixels
        ):
            return None
        # Split ranges at pixel boundaries: one row per (range, pixel) pair.
        idx = np.repeat(np.arange(len(r)), counts)
        offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        pix = first[idx] + offs
        if len(np.unique(pix)) > opts.scan_pixels:
            return None
        lo = np.maximum(r[idx, 0], pix << shift)
        hi = np.minimum(r[idx, 1], (pix + 1) << shift)
        out: list[tuple[int, int, int]] = []
        for (p,), members in groups([pix]):
            merged = coarsen_ranges(np.stack([lo[members], hi[members]], axis=1), opts.max_slices)
            out.extend((p, int(a), int(b)) for a, b in merged)
        return out

    def token_ranges(self) -> list[tuple[int, int]]:
        """``(lo, hi]`` Murmur3 token ranges splitting the ring into ``scan_splits`` pieces."""
        n = self.session.opts.scan_splits
        edges = [-(2**63) + (2**64 * i) // n for i in range(n + 1)]
        edges[-1] = 2**63 - 1
        # Murmur3 never yields -2**63 as a token, so (-2**63, 2**63 - 1] is the whole ring.
        return [(edges[i], edges[i + 1]) for i in range(n)]

    def read_partitions(self, table: str, window: TimeWindow | None) -> list[str]:
        """The partition tables of ``table`` that may hold rows of ``window``."""
        parts = self.layout.partition_numbers()[table]
        if window is not None:
            tp = self.layout.time_partition
            lo = tp(window.start) if math.isfinite(window.start) else None
            hi = tp(window.end) if math.isfinite(window.end) else None
            parts = [p for p in parts if (lo is None or p >= lo) and (hi is None or p <= hi)]
        return [partition_table(table, p) for p in parts]

    def select(
        self,
        table: ReadTable,
        ranges: Int64Array,
        columns: Sequence[str],
        *,
        window: TimeWindow | None = None,
        object_ids: Int64Array | None = None,
        any_place: bool = False,
        started_since: float | None = None,
    ) -> pa.Table:
        """Rows of ``table`` in ``ranges`` (or of ``object_ids``), each store's wholly or not at
        all (``any_place``: the ranges only locate ``object_ids``' latest rows, so a previous
        version may lie elsewhere). ``started_since`` (DiaObject, no ranges nor ids): only
        versions whose validity started then or later, filtered by the server (a scan)."""
        packer, prepare, t = self.layout.packer, self.session.prepare, self.session.t
        want = list(columns)
        extra = [HEALPIX_COLUMN]
        # Which store wrote each row, to show each store wholly or not at all (.visibility);
        # the horizon is taken before any row is read.
        stores = (STORED_VISIT, STORED_DETECTOR)
        filtered = self.layout.store_columns
        horizon = self.visibility.horizon() if filtered else 0
        if table != "DiaObject":
            extra.append(TIME_COLUMN)
        if object_ids is not None or (filtered and table == "DiaObject"):
            extra.append("diaObjectId")
        if filtered:
            extra += [*stores, *(["validityStartMjdTai"] if table == "DiaObject" else [])]
        fetch = list(dict.fromkeys([*want, *extra]))
        select_list = ", ".join(q(c) for c in packer.physical(table, fetch))
        ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        ids = None if object_ids is None else np.unique(np.asarray(object_ids, dtype=np.int64))
        # Source tables are time partitions, which another client may have made just now.
        partitioned = table != "DiaObject"
        physical = self.read_partitions(table, window) if partitioned else [LATEST_TABLE]
        statements: Statements = []
        slices = self.slices(ranges) if len(ranges) else None
        if len(ranges) and slices is None:
            # Large regions: scan the tables by token range (concurrently), filter below.
            for name in physical:
                stmt = prepare(
                    f"SELECT {select_list} FROM {t(name)} WHERE token({PART}) > ? AND token({PART}) <= ?",
                    table_may_be_new=partitioned,
                )
                statements += [(stmt, tr) for tr in self.token_ranges()]
        elif slices is not None:
            for name in physical:
                stmt = prepare(
                    f"SELECT {select_list} FROM {t(name)} WHERE {PART} = ? "
                    f"AND {q(HEALPIX_COLUMN)} >= ? AND {q(HEALPIX_COLUMN)} < ?",
                    table_may_be_new=partitioned,
                )
                statements += [(stmt, s) for s in slices]
        elif ids is not None and len(ids):
            if table == "DiaObject":
                # The key registry knows each object's pixel: read those exactly.
                keys = self.registry.lookup("DiaObject", pa.table({"diaObjectId": ids}))
                h = np.unique(np.asarray(keys.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64))
                if not len(h):
                    return to_arrow(self.layout.types(table), want, [])
                return self.select(table, np.stack([h, h + 1], axis=1), want, object_ids=ids, any_place=True)
            for name in physical:
                stmt = prepare(
                    f"SELECT {select_list} FROM {t(name)} WHERE {q('diaObjectId')} IN ? ALLOW FILTERING",
                    table_may_be_new=True,
                )
                statements += [
                    (stmt, (chunk.tolist(),)) for chunk in np.array_split(ids, -(-len(ids) // 500))
                ]
        elif started_since is not None and table == "DiaObject":
            where = f"WHERE {q('validityStartMjdTai')} >= ? ALLOW FILTERING"
            statements.append(
                (prepare(f"SELECT {select_list} FROM {t(LATEST_TABLE)} {where}"), (started_since,))
            )
        else:
            for name in physical:
                stmt = prepare(f"SELECT {select_list} FROM {t(name)}", table_may_be_new=partitioned)
                statements.append((stmt, ()))
        results = self._run(statements, new_tables=partitioned)
        rows = [row for rs in results for row in rs] if len(results) > 1 else (results[0] if results else [])
        data = self.layout.decode(table, fetch, rows)
        mask = None
        if len(ranges) and data.num_rows:
            h = data.column(HEALPIX_COLUMN).to_numpy()
            pos = np.searchsorted(ranges[:, 0], h, side="right") - 1
            mask = (pos >= 0) & (h < ranges[np.clip(pos, 0, None), 1])
        if window is not None and data.num_rows:
            tm = data.column(TIME_COLUMN).to_numpy()
            inside = (tm > window.start) & (tm <= window.end)
            mask = inside if mask is None else mask & inside
        if ids is not None and data.num_rows:
            inside = np.isin(data.column("diaObjectId").to_numpy(), ids)
            mask = inside if mask is None else mask & inside
        if mask is not None and not mask.all():
            data = data.filter(pa.array(mask))
        if filtered and data.num_rows:
            moved = None
            if table == "DiaObject":  # old rows of moved objects, marked by their store
                data, moved = unmark_moved(data, STORED_DETECTOR)
            shown = rows_shown(self.visibility, data, *stores, horizon)
            if shown is not None or moved is not None:
                ok = np.ones(data.num_rows, dtype=bool) if shown is None else shown
                hidden = data.filter(pa.array(~ok))
                # A marked row of a store shown is gone: its object lives at its new place.
                data = data.filter(pa.array(ok if moved is None else ok & ~moved))
                if table == "DiaObject" and hidden.num_rows:
                    data = self._with_previous_versions(
                        data, hidden, fetch, np.zeros((0, 2), np.int64) if any_place else ranges, ids, horizon
                    )
        return data.select(want)

    def _run(self, statements: Statements, *, new_tables: bool) -> list[list[Any]]:
        """``session.run``; with ``new_tables``, a time partition another client has just made
        that some node does not know yet is waited for (schema agreement), then read again."""
        for attempt in range(5):
            try:
                return self.session.run(statements, write=False)
            except StorageError as e:
                lagging = any(m in str(e) for m in SCHEMA_LAG)
                if not new_tables or not lagging or attempt == 4:
                    raise
                self.session.await_schema_agreement()
        raise AssertionError("unreachable")

    def _with_previous_versions(
        self,
        data: pa.Table,
        hidden: pa.Table,
        fetch: Sequence[str],
        ranges: Int64Array,
        ids: Int64Array | None,
        horizon: int,
    ) -> pa.Table:
        """``data`` plus, for each object whose latest row is a store not shown, the version
        before it as of ``horizon`` (from the table of every version), if it lies in ``ranges``
        and is not in ``data`` already (an object moved by that store keeps its old row until
        the store is complete)."""
        hidden_ids = np.asarray(hidden.column("diaObjectId").to_numpy(), dtype=np.int64)
        have = np.asarray(data.column("diaObjectId").to_numpy(), dtype=np.int64)
        wanted = np.unique(hidden_ids[~np.isin(hidden_ids, have)])
        if not len(wanted):
            return data
        columns = list(dict.fromkeys([*fetch, "validityEndMjdTai"]))
        stmt = self.session.prepare(
            f"SELECT {', '.join(q(c) for c in self.layout.packer.physical(HISTORY_TABLE, columns))} "
            f"FROM {self.session.t(HISTORY_TABLE)} WHERE {BUCKET} = ? AND {q('diaObjectId')} IN ?"
        )
        statements: Statements = [
            (stmt, (b, members.tolist()))
            for (b,), idx in groups([self.layout.bucket(wanted)])
            for members in np.array_split(wanted[idx], -(-len(idx) // 500))
        ]
        rows = [r for rs in self.session.run(statements, write=False) for r in rs]
        versions = self.layout.decode(HISTORY_TABLE, columns, rows)
        if not versions.num_rows:
            return data
        shown = rows_shown(self.visibility, versions, STORED_VISIT, STORED_DETECTOR, horizon)
        vid = np.asarray(versions.column("diaObjectId").to_numpy(), dtype=np.int64)
        start = np.asarray(versions.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
        ok = np.ones(len(vid), dtype=bool) if shown is None else shown
        # The newest version shown of each object: sorted by id, shown last, then by start.
        order = np.lexsort((start, ok, vid))
        last = np.ones(len(order), dtype=bool)
        last[:-1] = vid[order][1:] != vid[order][:-1]
        pick = order[last & ok[order]]
        if not len(pick):
            return data
        prev = versions.take(pa.array(pick))
        # Its end was set by the hidden store that closed it: as of the horizon it is open.
        end = np.asarray(prev.column("validityEndMjdTai").to_numpy(zero_copy_only=False), dtype=np.float64)
        hidden_start = np.asarray(hidden.column("validityStartMjdTai").to_numpy(), dtype=np.float64)
        not_shown = set(zip(vid[~ok].tolist(), start[~ok].tolist(), strict=True))
        not_shown.update(zip(hidden_ids.tolist(), hidden_start.tolist(), strict=True))
        pairs = zip(vid[pick].tolist(), end.tolist(), strict=True)
        # One test per object of a store not shown (a few), not per row read.
        reopened = np.fromiter((p in not_shown for p in pairs), dtype=bool, count=len(pick))
        if reopened.any():
            col = prev.schema.get_field_index("validityEndMjdTai")
            values = pa.array(np.where(reopened, np.nan, end), mask=reopened | np.isnan(end))
            prev = prev.set_column(col, "validityEndMjdTai", values.cast(prev.schema.field(col).type))
        h = np.asarray(prev.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64)
        # A version closed otherwise (a daytime set_validity_end shown) has no open version.
        inside = reopened | np.isnan(end)
        if len(ranges):
            pos = np.searchsorted(ranges[:, 0], h, side="right") - 1
            inside &= (pos >= 0) & (h < ranges[np.clip(pos, 0, None), 1])
        if ids is not None:
            inside &= np.isin(prev.column("diaObjectId").to_numpy(), ids)
        prev = prev.filter(pa.array(inside)).select(data.column_names)
        return pa.concat_tables([data, prev.cast(data.schema)]) if prev.num_rows else data
