"""One history segment: an immutable Arrow IPC file of one table's rows over one time span.

Rows are sorted by ``_healpix_29`` then time and written as a single uncompressed record
batch, so a memory-mapped segment is one contiguous array per column: a region's pixel ranges
become row ranges by binary search on the key, and only the pages of the rows (and columns)
a read takes are ever touched. Measured on 2 M DiaSource rows (0.65 GB): locating a 1.75 deg
field takes ~15 ms and gathering its 223 k rows, all 104 columns, ~80 ms (8 columns: ~10 ms).

Integrity: a read never returns a row from bytes that fail their checksum.

- The file is cut into 64 KiB blocks up to the end of its record batch; each block's xxh3-64
  is kept in the Arrow footer's custom metadata. The footer itself (from the end of the record
  batch to the end of the file: footer, block table, length, magic) is hashed into the
  manifest's ``checksum`` text, ``xxh3-64:<block size>:<footer offset>:<footer digest>``, so a
  flipped byte anywhere, the block table and the footer included, is caught.
- Opening a segment checks its size, the footer's digest (before Arrow parses it), then the
  blocks holding the schema and record-batch messages (before Arrow reads the batch).
- A read checks the blocks of the bytes it is about to use, each the first time it is touched
  in this process, and remembers them (a long-lived reader pays once): the key blocks a pixel
  range's binary search depends on (its rows and one neighbour each side, whose authentic keys
  must bracket the range, else the search was misled), the filter columns at the rows they
  filter, and the result columns (data, validity bitmap, string offsets and bytes) at the rows
  taken. Blocks a read never touches are not checked by it.
- Segments written before this (``checksum`` a bare blake2b-128 of the whole file) are checked
  whole on their first open in a process, before Arrow parses them; the result is remembered
  for the file (path, inode, size, times) so later opens in that process skip it. Such segments
  stop being read as retention drops them (the DiaObject snapshot is rewritten every compaction).
- ``verify_segment`` (``diadb verify``) checks every block and names each bad one.
- Limits: a block is checked once per process, so damage that appears later under a live
  mapping is found by ``verify`` or the next process; the manifest's own fields (times, pixel
  bounds) live in the engine and are as safe as it is (``verify`` runs SQLite's integrity check).

Cost (``.venv/bin/python scripts/bench_segment_read.py --baseline DIR``, DIR a checkout of
cb70adf, the tree before this; 2 M DiaSource rows in one 0.65 GB segment, a 1.75 deg field of
222 k rows; best of 3 fresh processes on this 2-core machine, load average 1-2; repeated
runs differ by 10-20%)::

    hash speed, 256 MB buffer    xxh3-64 11 GB/s, zlib.crc32 3.5 GB/s, blake2b-128 0.8 GB/s
    first read, 104 columns      129 ms (before: 100 ms); 23% of the blocks hashed, 24 ms in
      (page cache warm)          map/locate/check (the pixel searches included)
    first read, cache cold       1.01 s (before: 1.11 s): the checks fault the blocks in from
                                 disk, the gather then finds them cached
    first read, 4 columns        59 ms (before: 53 ms); 3% of the blocks hashed, 18 ms in checks
    later reads in the process   2-3 ms of checking (finding the blocks, all checked already)
    verify / write the segment   0.06 s / 6.6 s (before, whole-file blake2b: 1.28 s / 8.7 s)
    an old segment's first read  0.96 s (before: 0.12 s): its whole-file blake2b, once
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from diadb.errors import StorageError
from diadb.history.blocks import (
    BLOCK_SIZE,
    FILE_MAGIC,
    CorruptSegmentError,
    Int64Array,
    MappedSegment,
    footer_metadata,
    map_buffer,
    rows_of,
    seal_text,
)
from diadb.history.store import FileSegmentStore, SegmentStore
from diadb.schema.model import HEALPIX_COLUMN

__all__ = [
    "BLOCK_SIZE",
    "CorruptSegmentError",
    "Int64Array",
    "MappedSegment",
    "SegmentInfo",
    "file_checksum",
    "locate",
    "map_segment",
    "map_segments",
    "open_segment",
    "segment_name",
    "snapshot_span",
    "verify_segment",
    "write_segment",
]


@dataclass(frozen=True)
class SegmentInfo:
    """A manifest entry: where a segment is and what it holds."""

    table: str
    name: str  # file name inside the history directory
    t_min: float  # smallest time value in the file (MJD TAI)
    t_max: float  # largest time value in the file
    span_start: float  # the time span the segment stands for: [span_start, span_end)
    span_end: float
    pix_min: int
    pix_max: int
    rows: int
    bytes: int
    #: ``xxh3-64:<block size>:<footer offset>:<footer digest hex>`` (block digests in the
    #: footer, see the module docstring), or, for segments written before, the blake2b-128 of
    #: the whole file in hex.
    checksum: str
    segment_id: int = -1

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SegmentInfo:
        """An entry from a manifest row whose columns are named as the fields (the table's
        name in ``table_name``), as the engines' manifest tables store them."""
        return cls(
            table=row["table_name"],
            name=row["name"],
            t_min=row["t_min"],
            t_max=row["t_max"],
            span_start=row["span_start"],
            span_end=row["span_end"],
            pix_min=row["pix_min"],
            pix_max=row["pix_max"],
            rows=row["rows"],
            bytes=row["bytes"],
            checksum=row["checksum"],
            segment_id=row.get("segment_id", -1),
        )


def file_checksum(path: Path) -> str:
    """blake2b-128 of a whole file, hex (the checksum of segments written before block digests)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---- names and spans --------------------------------------------------------------------


def _label(value: float) -> str:
    """A span bound for a file name, at most 12 characters whatever its magnitude."""
    if abs(value) < 1e6:
        return f"{value:.5f}"
    return f"{value:.4e}"


def segment_name(table: str, span: tuple[float, float], tile: str = "") -> str:
    """``<table>-<start>-<end>[-<tile>]-<random>.arrow``: the bounds are only labels (the
    manifest holds the values), so the name's length does not depend on their magnitude."""
    tile = f"-{tile}" if tile else ""
    return f"{table}-{_label(span[0])}-{_label(span[1])}{tile}-{os.urandom(6).hex()}.arrow"


def snapshot_span(values: pa.ChunkedArray | pa.Array) -> tuple[float, float]:
    """The whole days covering the finite ``values`` (a DiaObject snapshot's validity starts),
    ``[0, 1)`` when there are none; always finite and non-empty."""
    array = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
    finite = array[np.isfinite(array)]
    if not finite.size:
        return 0.0, 1.0
    lo = math.floor(float(finite.min()))
    hi = float(math.floor(float(finite.max())))
    return float(lo), max(hi + 1.0, float(np.nextafter(hi, np.inf)))


def _check_span(table: str, span: tuple[float, float]) -> None:
    start, end = span
    if not (math.isfinite(start) and math.isfinite(end)):
        raise StorageError(
            f"refusing to write a {table} history segment for the span [{start}, {end}): "
            "span bounds must be finite (a time column holds a non-finite value?)"
        )
    if not start < end:
        raise StorageError(f"refusing to write a {table} history segment for the empty span [{start}, {end})")


# ---- writing ----------------------------------------------------------------------------


class _BlockHasher:
    """A write-only file object that digests what it is given in fixed-size blocks."""

    closed = False

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.position = 0
        self.digests: list[int] = []
        self._hash = xxhash.xxh3_64()
        self._filled = 0
        self._done = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        if self._done:
            return size
        while view.nbytes:
            take = min(view.nbytes, self.block_size - self._filled)
            self._hash.update(view[:take])
            self._filled += take
            self.position += take
            view = view[take:]
            if self._filled == self.block_size:
                self.digests.append(self._hash.intdigest())
                self._hash.reset()
                self._filled = 0
        return size

    def finish(self) -> list[int]:
        """The digests of everything written so far (the last block may be short)."""
        if self._filled:
            self.digests.append(self._hash.intdigest())
        self._done = True
        return self.digests

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.position

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _stream_digests(table: pa.Table, block_size: int) -> tuple[list[int], int]:
    """The block digests of the file ``table`` becomes, up to the end of its record batch, and
    that end's offset, without writing it: an IPC file is its magic followed by the same
    messages as an IPC stream (checked after the real write by ``_check_written``)."""
    sink = _BlockHasher(block_size)
    sink.write(FILE_MAGIC)
    writer = pa.ipc.new_stream(sink, table.schema)
    writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    end = sink.position
    digests = sink.finish()
    writer.close()
    return digests, end


def _check_written(
    where: str, data: pa.Buffer, digests: Sequence[int], body_end: int, block_size: int
) -> int:
    """Every block of the segment just written against the digests computed before writing it;
    returns the digest of its footer. A mismatch is a bug (the two serialisations differ)."""
    view = memoryview(data)
    try:
        blocks = range(0, body_end, block_size)
        actual = [xxhash.xxh3_64_intdigest(view[a : min(a + block_size, body_end)]) for a in blocks]
        if actual != list(digests):
            raise StorageError(f"history segment {where}: the written bytes differ from their block digests")
        footer: int = xxhash.xxh3_64_intdigest(view[body_end:])
        return footer
    finally:
        view.release()


def _in_order(data: pa.Table, columns: Sequence[str]) -> bool:
    """Whether ``data`` is already sorted by the two ``columns`` (one vectorised pass): its sort
    (a stable one) would then only copy it. Nulls, or other key shapes, answer False."""
    if len(columns) != 2 or data.num_rows < 2:
        return bool(data.num_rows < 2)
    first, second = (data.column(c) for c in columns)
    if first.null_count or second.null_count:
        return False
    a = np.asarray(first.to_numpy())
    step = np.diff(a)
    if (step < 0).any():
        return False
    tied = step == 0
    return not tied.any() or not bool((np.diff(np.asarray(second.to_numpy()))[tied] < 0).any())


def as_store(where: SegmentStore | Path) -> SegmentStore:
    """A store, or a directory of segment files as one (tests and tools)."""
    return FileSegmentStore(where) if isinstance(where, Path) else where


def write_segment(
    where: SegmentStore | Path,
    table: str,
    data: pa.Table,
    time_column: str,
    span: tuple[float, float],
    *,
    fault: object = None,
    order: tuple[str, ...] | None = None,
    block_size: int | None = None,
    presorted: bool = False,
    tile: str = "",
) -> SegmentInfo:
    """Sort ``data`` (by ``_healpix_29`` then ``order``, default ``time_column``) and write it
    durably into ``store`` (a file: temporary name, fsync, rename, fsync of the directory; a
    blob: checked in memory, then uploaded). ``span`` must be finite. ``block_size``: bytes per
    checksummed block (default ``BLOCK_SIZE``). ``presorted``: the caller has sorted ``data``
    already (the sort's copy is skipped). ``tile``: the sky tile's label in the name.

    ``fault`` (tests only) is called with the step name before each step, to crash there.
    """
    _check_span(table, span)
    store = as_store(where)
    block_size = block_size or BLOCK_SIZE
    hook = fault if callable(fault) else (lambda step: None)
    columns = (HEALPIX_COLUMN, *(order or (time_column,)))
    if presorted or _in_order(data, columns):
        ordered = data  # no copy (a range scan of SQLite's clustered key comes in this order)
    else:
        ordered = data.take(pc.sort_indices(data, [(c, "ascending") for c in columns]))
    ordered = ordered.combine_chunks()
    name = segment_name(table, span, tile)
    digests, body_end = _stream_digests(ordered, block_size)
    metadata = footer_metadata(digests, block_size)
    footer: list[int] = []

    def produce(sink: Any) -> None:
        with pa.ipc.new_file(sink, ordered.schema, metadata=metadata) as writer:
            writer.write_table(ordered, max_chunksize=max(ordered.num_rows, 1))

    def check(written: pa.Buffer) -> None:
        footer.append(_check_written(store.location(name), written, digests, body_end, block_size))

    size = store.write(name, produce, check, hook)
    times = ordered.column(time_column)
    pix = ordered.column(HEALPIX_COLUMN)
    return SegmentInfo(
        table=table,
        name=name,
        t_min=float(pc.min(times).as_py()),
        t_max=float(pc.max(times).as_py()),
        span_start=span[0],
        span_end=span[1],
        pix_min=int(pix[0].as_py()),
        pix_max=int(pix[-1].as_py()),
        rows=ordered.num_rows,
        bytes=size,
        checksum=seal_text(block_size, body_end, footer[0]),
    )


# ---- reading ----------------------------------------------------------------------------


def map_segments(
    where: SegmentStore | Path, infos: Sequence[SegmentInfo], *, remember: bool = True
) -> list[MappedSegment]:
    """Open segments (a memory map or fetched blobs, all fetched in one round; zero copy),
    their size, structure and row count checked against the manifest entries
    (:func:`diadb.history.blocks.map_buffer`); their rows are read only after their ``check``.
    Old segments (whole-file blake2b) are checked whole, once per process unless ``remember``
    is False."""
    store = as_store(where)
    opened = []
    for info, (buffer, identity) in zip(infos, store.read([(i.name, i.bytes) for i in infos]), strict=True):
        label = store.location(info.name)
        opened.append(map_buffer(label, buffer, identity, info.rows, info.checksum, remember=remember))
    return opened


def map_segment(where: SegmentStore | Path, info: SegmentInfo, *, remember: bool = True) -> MappedSegment:
    """One segment of :func:`map_segments`."""
    return map_segments(where, [info], remember=remember)[0]


def open_segment(where: SegmentStore | Path, info: SegmentInfo) -> pa.Table:
    """A segment's table, its size and structure checked (``map_segment``) but not the blocks
    of its rows: for measuring (diadb.sim.bench); reads use ``MappedSegment``."""
    return map_segment(where, info).table


def verify_segment(where: SegmentStore | Path, info: SegmentInfo) -> None:
    """Full check of one segment: size, structure and every block (reads all of it)."""
    segment = map_segment(where, info, remember=False)
    if segment.complete:
        return
    bad = segment.bad_blocks()
    if bad:
        raise segment.failure(bad)


def locate(data: pa.Table, ranges: Int64Array) -> Int64Array:
    """Row numbers of ``data`` (sorted by ``_healpix_29``) inside the ``[lo, hi)`` pixel ranges.
    Unchecked: reads use ``MappedSegment.locate``."""
    key = data.column(HEALPIX_COLUMN)
    if data.num_rows == 0 or len(ranges) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = key.chunk(0).to_numpy() if key.num_chunks == 1 else key.to_numpy()
    lo = np.searchsorted(keys, ranges[:, 0], side="left")
    hi = np.searchsorted(keys, ranges[:, 1], side="left")
    return rows_of(lo, hi)
