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

import numpy as np
import pyarrow as pa

from diadb.backends.base import Int64Array, ReadTable, TimeWindow
from diadb.backends.cassandra.codec import groups, q, to_arrow
from diadb.backends.cassandra.layout import PART, TIME_COLUMN, Layout, partition_table
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.backends.cassandra.store import Registry
from diadb.backends.common.names import LATEST_TABLE
from diadb.schema.model import HEALPIX_COLUMN
from diadb.sky.healpix import coarsen_ranges


class Reader:
    """``select`` over the layout's tables."""

    def __init__(self, session: CassandraSession, layout: Layout, registry: Registry) -> None:
        self.session = session
        self.layout = layout
        self.registry = registry

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
    ) -> pa.Table:
        packer, prepare, t = self.layout.packer, self.session.prepare, self.session.t
        want = list(columns)
        extra = [HEALPIX_COLUMN]
        if table != "DiaObject":
            extra.append(TIME_COLUMN)
        if object_ids is not None:
            extra.append("diaObjectId")
        fetch = list(dict.fromkeys([*want, *extra]))
        select_list = ", ".join(q(c) for c in packer.physical(table, fetch))
        ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        ids = None if object_ids is None else np.unique(np.asarray(object_ids, dtype=np.int64))
        physical = [LATEST_TABLE] if table == "DiaObject" else self.read_partitions(table, window)
        statements: Statements = []
        slices = self.slices(ranges) if len(ranges) else None
        if len(ranges) and slices is None:
            # Large regions: scan the tables by token range (concurrently), filter below.
            for name in physical:
                stmt = prepare(
                    f"SELECT {select_list} FROM {t(name)} WHERE token({PART}) > ? AND token({PART}) <= ?"
                )
                statements += [(stmt, tr) for tr in self.token_ranges()]
        elif slices is not None:
            for name in physical:
                stmt = prepare(
                    f"SELECT {select_list} FROM {t(name)} WHERE {PART} = ? "
                    f"AND {q(HEALPIX_COLUMN)} >= ? AND {q(HEALPIX_COLUMN)} < ?"
                )
                statements += [(stmt, s) for s in slices]
        elif ids is not None and len(ids):
            if table == "DiaObject":
                # The key registry knows each object's pixel: read those exactly.
                keys = self.registry.lookup("DiaObject", pa.table({"diaObjectId": ids}))
                h = np.unique(np.asarray(keys.column(HEALPIX_COLUMN).to_numpy(), dtype=np.int64))
                if not len(h):
                    return to_arrow(self.layout.types(table), want, [])
                return self.select(table, np.stack([h, h + 1], axis=1), want, object_ids=ids)
            for name in physical:
                stmt = prepare(
                    f"SELECT {select_list} FROM {t(name)} WHERE {q('diaObjectId')} IN ? ALLOW FILTERING"
                )
                statements += [
                    (stmt, (chunk.tolist(),)) for chunk in np.array_split(ids, -(-len(ids) // 500))
                ]
        else:
            for name in physical:
                statements.append((prepare(f"SELECT {select_list} FROM {t(name)}"), ()))
        results = self.session.run(statements, write=False)
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
        return data.select(want)
