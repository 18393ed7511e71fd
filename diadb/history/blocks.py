"""Block checksums of history segment files: computing them for a file about to be written,
and checking a memory-mapped segment's blocks before its bytes are used. The layout, what is
checked when, and what it costs: :mod:`diadb.history.segment`.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import xxhash

from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN

Int64Array = npt.NDArray[np.int64]

#: Bytes per checksummed block. Small enough that a field read hashes little beyond the rows it
#: takes, large enough that the per-block Python cost (~1 us) is noise beside hashing (~6 us).
BLOCK_SIZE = 1 << 16
ALGORITHM = "xxh3-64"
#: Footer metadata: the block digests (little-endian uint64) and the block size they use.
_META_DIGESTS = b"diadb.block_xxh3_64"
_META_BLOCK_SIZE = b"diadb.block_size"
#: An Arrow IPC file opens with these 8 bytes, then holds an IPC stream's messages.
FILE_MAGIC = b"ARROW1\x00\x00"
_CONTINUATION = 0xFFFFFFFF


class CorruptSegmentError(StorageError):
    """A history segment file is missing, truncated or fails its checksum."""


# ---- the format ---------------------------------------------------------------------


def footer_metadata(digests: Sequence[int], block_size: int) -> dict[bytes, bytes]:
    """The Arrow footer's custom metadata that carries the block digests."""
    return {
        _META_DIGESTS: np.asarray(digests, dtype="<u8").tobytes(),
        _META_BLOCK_SIZE: str(block_size).encode(),
    }


def seal_text(block_size: int, body_end: int, footer_digest: int) -> str:
    """The manifest's checksum text of a block-checksummed segment."""
    return f"{ALGORITHM}:{block_size}:{body_end}:{footer_digest:016x}"


# ---- reading: a mapped segment and the blocks checked so far ---------------------------


@dataclass(frozen=True)
class _Seal:
    """What the manifest's checksum text says of a block-checksummed segment."""

    block_size: int
    body_end: int  # where the record batch ends and the footer begins
    footer_digest: int


def _parse_seal(path: str, checksum: str) -> _Seal | None:
    """The seal, or None for a segment with a whole-file blake2b (written before block digests)."""
    if ":" not in checksum:
        if len(checksum) == 32 and all(c in "0123456789abcdef" for c in checksum):
            return None
        raise CorruptSegmentError(
            f"history segment {path}: the manifest's checksum {checksum!r} is unreadable"
        )
    try:
        algorithm, block, end, digest = checksum.split(":")
        if algorithm != ALGORITHM:
            raise ValueError(algorithm)
        seal = _Seal(int(block), int(end), int(digest, 16))
    except ValueError:
        raise CorruptSegmentError(
            f"history segment {path}: the manifest's checksum {checksum!r} is unreadable"
        ) from None
    if seal.block_size <= 0 or seal.body_end <= 0:
        raise CorruptSegmentError(
            f"history segment {path}: the manifest's checksum {checksum!r} is unreadable"
        )
    return seal


#: Whole-file checks of old segments already passed in this process: (the store's identity of
#: the copy: path, device, inode, size, times; checksum). Bounded; a rewritten file gets new times.
_LEGACY_VERIFIED: dict[tuple[Hashable, str], None] = {}
_LEGACY_LIMIT = 4096
_legacy_lock = threading.Lock()


#: A string or binary column: (offsets buffer at, bytes per offset, the offsets, data buffer at
#: or -1 when it has no bytes).
_Variable = tuple[int, int, npt.NDArray[Any], int]
#: Where some columns' bytes are: fixed-width offsets and widths (n, 1), bitmap offsets (n, 1),
#: string columns, buffers checked whole.
_Layout = tuple[Int64Array, Int64Array, Int64Array, list[_Variable], list[tuple[int, int]]]


class _Columns:
    """Where a column's bytes are in the file: what a read of some rows must check."""

    __slots__ = ("bitmaps", "fixed", "variable", "whole")

    def __init__(self) -> None:
        self.fixed: list[tuple[int, int]] = []  # (offset, bytes per value)
        self.bitmaps: list[int] = []  # offsets of validity bitmaps and boolean values
        self.variable: list[_Variable] = []
        self.whole: list[tuple[int, int]] = []  # (offset, size): checked whole (other types)


class MappedSegment:
    """A memory-mapped segment and the blocks of it checked so far in this process.

    ``table`` is the zero-copy Arrow table: read its rows only after ``check``-ing them (or use
    ``locate``/``values``/``checked_table``, which check first)."""

    def __init__(
        self,
        path: str,
        buffer: pa.Buffer,
        seal: _Seal | None,
        digests: list[int],
    ) -> None:
        self.path = path
        self.table: pa.Table = pa.table({})
        self._buffer = buffer  # keeps the mapping alive
        self._view = memoryview(buffer)
        self._base = buffer.address
        self._block = seal.block_size if seal else 1
        self._body_end = seal.body_end if seal else 0
        self._digests = digests
        self._verified = np.zeros(len(digests), dtype=bool)
        self.complete = seal is None  # every block checked (an old segment: checked whole)
        self._columns: dict[str, _Columns] = {}
        self._layouts: dict[tuple[str, ...], _Layout] = {}
        #: Tables of some of its columns, kept for the reader (``tier.select_columns``).
        self.selections: dict[tuple[str, ...], pa.Table] = {}
        self._names: set[str] = set()
        self._head_end = 0

    # -- set-up (map_segment) --
    def _check_head(self) -> None:
        """Check the blocks of the schema message and the record batch's metadata message, whose
        lengths are read only from bytes already checked."""
        pos = len(FILE_MAGIC)
        for _ in range(2):
            if pos == self._body_end:  # a file of no record batch
                break
            self._check_range(0, pos + 8)
            marker, length = struct.unpack_from("<Ii", self._view, pos)
            if marker != _CONTINUATION or length <= 0 or pos + 8 + length > self._body_end:
                raise CorruptSegmentError(f"history segment {self.path}: its message framing is not diadb's")
            pos += 8 + length
            self._check_range(0, pos)
        self._head_end = pos

    def _bind(self, table: pa.Table) -> None:
        """Take the table (its columns are described on first use, see ``_spec``)."""
        self.table = table
        self._names = set(table.column_names)
        if self.complete:
            return
        if any(column.num_chunks > 1 for column in table.columns):
            self.check_all()  # never written so by diadb: check it whole, once
            return
        # Each column's buffers are located (and checked to lie inside the record batch) the
        # first time that column is checked (``_spec``): a read of a few columns of a freshly
        # fetched blob does not pay for describing all ~100 (measured: 1.7 ms per segment).

    def _spec(self, name: str) -> _Columns | None:
        """Where column ``name``'s bytes are (None: the file has no such column)."""
        spec = self._columns.get(name)
        if spec is None:
            if name not in self._names:
                return None
            spec = _Columns()
            for array in self.table.column(name).chunks:
                self._describe(array, spec)
            self._columns[name] = spec
        return spec

    def _offset(self, buffer: pa.Buffer) -> int:
        offset = int(buffer.address - self._base)
        if offset < self._head_end or offset + buffer.size > self._body_end:
            raise CorruptSegmentError(
                f"history segment {self.path}: a column buffer lies outside its record batch"
            )
        return offset

    def _describe(self, array: pa.Array, spec: _Columns) -> None:
        buffers = array.buffers()
        kind = array.type
        if array.offset:  # never written so by diadb
            spec.whole += [(self._offset(b), b.size) for b in buffers if b is not None]
            return
        if buffers and buffers[0] is not None:
            spec.bitmaps.append(self._offset(buffers[0]))
        if pa.types.is_null(kind):
            return
        if pa.types.is_boolean(kind):
            spec.bitmaps.append(self._offset(buffers[1]))
        elif pa.types.is_string(kind) or pa.types.is_binary(kind) or _is_large_variable(kind):
            width = 8 if _is_large_variable(kind) else 4
            offsets = np.frombuffer(buffers[1], dtype=np.int64 if width == 8 else np.int32)
            data_at = -1 if buffers[2] is None else self._offset(buffers[2])  # -1: no bytes at all
            spec.variable.append((self._offset(buffers[1]), width, offsets, data_at))
        else:
            try:
                bits = kind.bit_width
            except ValueError:
                bits = 0
            if bits >= 8 and bits % 8 == 0 and len(buffers) == 2 and buffers[1] is not None:
                spec.fixed.append((self._offset(buffers[1]), bits // 8))
            else:
                spec.whole += [(self._offset(b), b.size) for b in buffers[1:] if b is not None]

    # -- checking --
    def _fail(self, blocks: Sequence[int]) -> CorruptSegmentError:
        first = blocks[0]
        start = first * self._block
        end = min(start + self._block, self._body_end)
        more = f" and {len(blocks) - 1} more of {len(self._digests)}" if len(blocks) > 1 else ""
        return CorruptSegmentError(
            f"history segment {self.path}: block {first} (bytes {start}-{end}){more} fails its checksum"
        )

    def _check_blocks(self, blocks: npt.NDArray[np.intp]) -> None:
        view, size, end, digests = self._view, self._block, self._body_end, self._digests
        for k in blocks.tolist():
            start = k * size
            if xxhash.xxh3_64_intdigest(view[start : min(start + size, end)]) != digests[k]:
                raise self._fail([k])
            self._verified[k] = True
        if len(blocks):
            self.complete = bool(self._verified.all())

    def _check_ranges(self, starts: Int64Array, stops: Int64Array) -> None:
        """Check every block holding a byte of the ``[start, stop)`` byte ranges."""
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        if not starts.size:
            return
        n = len(self._digests)
        first = np.clip(starts // self._block, 0, n - 1)
        last = np.clip((stops - 1) // self._block, 0, n - 1)
        edges = np.bincount(first, minlength=n + 1)[: n + 1] - np.bincount(last + 1, minlength=n + 1)[: n + 1]
        needed = np.cumsum(edges[:n]) > 0
        self._check_blocks(np.flatnonzero(needed & ~self._verified))

    def _check_range(self, start: int, stop: int) -> None:
        self._check_ranges(np.array([start], np.int64), np.array([stop], np.int64))

    def _check_runs(self, columns: Sequence[str], a: Int64Array, b: Int64Array) -> None:
        """Check ``columns`` at the row runs ``[a, b)``."""
        if self.complete or not a.size:
            return
        at, widths, bits_at, variable, whole = self._layout(columns)
        starts: list[Int64Array] = []
        stops: list[Int64Array] = []
        if at.size:
            starts.append((at + a * widths).ravel())
            stops.append((at + b * widths).ravel())
        if bits_at.size:
            starts.append((bits_at + (a >> 3)).ravel())
            stops.append((bits_at + ((b - 1) >> 3) + 1).ravel())
        for offsets_at, width, _, _ in variable:
            starts.append(offsets_at + a * width)
            stops.append(offsets_at + (b + 1) * width)
        for at_, size in whole:
            starts.append(np.array([at_], np.int64))
            stops.append(np.array([at_ + size], np.int64))
        if starts:
            self._check_ranges(np.concatenate(starts), np.concatenate(stops))
        strings = [(offsets, at_) for _, _, offsets, at_ in variable if at_ >= 0]
        if strings:  # the offsets are checked: now the bytes they point at
            data_starts = [at_ + offsets[a].astype(np.int64) for offsets, at_ in strings]
            data_stops = [at_ + offsets[b].astype(np.int64) for offsets, at_ in strings]
            self._check_ranges(np.concatenate(data_starts), np.concatenate(data_stops))

    def _layout(self, columns: Sequence[str]) -> _Layout:
        """Where the bytes of ``columns`` are, as arrays (kept per column list: a reader asks for
        the same few lists, and building them cost more than the checks on small reads)."""
        key = tuple(columns)
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        fixed: list[tuple[int, int]] = []
        bitmaps: list[int] = []
        variable: list[_Variable] = []
        whole: list[tuple[int, int]] = []
        for name in dict.fromkeys(columns):
            spec = self._spec(name)
            if spec is not None:
                fixed += spec.fixed
                bitmaps += spec.bitmaps
                variable += spec.variable
                whole += spec.whole
        pairs = np.array(fixed, dtype=np.int64).reshape(-1, 2)
        layout = (pairs[:, :1], pairs[:, 1:], np.array(bitmaps, dtype=np.int64)[:, None], variable, whole)
        if len(self._layouts) < 16:
            self._layouts[key] = layout
        return layout

    def check(self, columns: Sequence[str], rows: Int64Array) -> None:
        """Check the bytes of ``columns`` (those the file has) at ``rows`` before they are read.

        Rows closer than a block's worth of the widest values are taken as one run: the same
        blocks, and few runs to vectorise over."""
        if self.complete or not len(rows) or not columns:
            return
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size > 1 and not bool(np.all(rows[1:] > rows[:-1])):
            rows = np.unique(rows)
        if rows[0] < 0 or rows[-1] >= self.table.num_rows:
            raise IndexError(f"rows outside {self.path}")
        breaks = np.flatnonzero(np.diff(rows) > self._block // 8) + 1
        a = rows[np.concatenate([[0], breaks])]
        b = rows[np.concatenate([breaks - 1, [rows.size - 1]])] + 1
        self._check_runs(columns, a, b)

    def bad_blocks(self) -> list[int]:
        """Every block whose digest differs, each hashed afresh (a full read of the file)."""
        view, size, end = self._view, self._block, self._body_end
        return [
            k
            for k, digest in enumerate(self._digests)
            if xxhash.xxh3_64_intdigest(view[k * size : min((k + 1) * size, end)]) != digest
        ]

    def failure(self, blocks: Sequence[int]) -> CorruptSegmentError:
        """The error naming the file and its bad ``blocks``."""
        return self._fail(blocks)

    def check_all(self) -> None:
        """Check every block (a full read of the file, once)."""
        if not self.complete:
            self._check_blocks(np.flatnonzero(~self._verified))

    def checked_table(self) -> pa.Table:
        """The whole table, every block checked."""
        self.check_all()
        return self.table

    def values(self, name: str) -> npt.NDArray[Any]:
        """A whole column as numpy (zero copy), checked."""
        n = self.table.num_rows
        self._check_runs([name], np.array([0], np.int64), np.array([n], np.int64))
        col = self.table.column(name)
        values: npt.NDArray[Any] = col.chunk(0).to_numpy() if col.num_chunks == 1 else col.to_numpy()
        return values

    def locate(self, ranges: Int64Array) -> Int64Array:
        """Row numbers inside the ``[lo, hi)`` pixel ranges (``locate``), with the key blocks the
        answer depends on checked: each range's rows and the row each side of them."""
        data = self.table
        if data.num_rows == 0 or len(ranges) == 0:
            return np.zeros(0, dtype=np.int64)
        key = data.column(HEALPIX_COLUMN)
        keys = key.chunk(0).to_numpy() if key.num_chunks == 1 else key.to_numpy()
        lo = np.searchsorted(keys, ranges[:, 0], side="left")
        hi = np.searchsorted(keys, ranges[:, 1], side="left")
        if not self.complete:
            n = len(keys)
            self._check_runs([HEALPIX_COLUMN], np.maximum(lo - 1, 0), np.minimum(hi + 1, n))
            # Authentic keys bracket each range exactly as a search of the authentic (sorted)
            # column would; if not, a damaged key misled the search.
            if not (_brackets(keys, lo, ranges[:, 0]) and _brackets(keys, hi, ranges[:, 1])):
                self._check_runs([HEALPIX_COLUMN], np.array([0], np.int64), np.array([n], np.int64))
                raise CorruptSegmentError(f"history segment {self.path}: its {HEALPIX_COLUMN} is not sorted")
        return rows_of(lo, hi)


def _is_large_variable(kind: pa.DataType) -> bool:
    return bool(pa.types.is_large_string(kind) or pa.types.is_large_binary(kind))


def _brackets(keys: Int64Array, at: npt.NDArray[np.intp], values: Int64Array) -> bool:
    """Whether each ``at`` is where ``values`` go in sorted ``keys`` (side='left')."""
    n = len(keys)
    before = at > 0
    inside = at < n
    return bool(np.all(keys[at[before] - 1] < values[before]) and np.all(keys[at[inside]] >= values[inside]))


def map_buffer(
    path: str, buffer: pa.Buffer, identity: Hashable, rows: int, checksum: str, *, remember: bool
) -> MappedSegment:
    """Open a segment from its bytes (a memory map or a fetched blob: zero copy) and check its
    structure and its ``rows``: the footer against ``checksum`` (the manifest's text), the schema
    and batch messages against their blocks. ``path`` names it in messages; ``identity`` names
    this exact copy. Old segments (``checksum`` a whole-file blake2b) are checked whole here,
    once per process and copy unless ``remember`` is False."""
    size = buffer.size
    seal = _parse_seal(path, checksum)
    view = memoryview(buffer)
    digests: list[int] = []
    if seal is None:
        key = (identity, checksum)
        if not (remember and key in _LEGACY_VERIFIED):
            actual = hashlib.blake2b(view, digest_size=16).hexdigest()
            if actual != checksum:
                raise CorruptSegmentError(
                    f"history segment {path}: checksum {actual} does not match the manifest's {checksum}"
                )
            if remember:
                with _legacy_lock:
                    _LEGACY_VERIFIED[key] = None
                    while len(_LEGACY_VERIFIED) > _LEGACY_LIMIT:
                        del _LEGACY_VERIFIED[next(iter(_LEGACY_VERIFIED))]
    else:
        if seal.body_end > size or xxhash.xxh3_64_intdigest(view[seal.body_end :]) != seal.footer_digest:
            raise CorruptSegmentError(f"history segment {path}: its footer fails its checksum")
    try:
        reader = pa.ipc.open_file(buffer)
        if seal is not None:
            meta = reader.metadata or {}
            if meta.get(_META_BLOCK_SIZE) != str(seal.block_size).encode():
                raise CorruptSegmentError(
                    f"history segment {path}: its block table does not match the manifest"
                )
            digests = np.frombuffer(meta[_META_DIGESTS], dtype="<u8").tolist()
            if len(digests) != -(-seal.body_end // seal.block_size):
                raise CorruptSegmentError(
                    f"history segment {path}: its block table does not match the manifest"
                )
        segment = MappedSegment(path, buffer, seal, digests)
        if seal is not None:
            segment._check_head()
        data = reader.read_all()
    except (pa.ArrowException, OSError, KeyError, ValueError, struct.error) as e:
        raise CorruptSegmentError(f"history segment {path} is not a readable Arrow file: {e}") from e
    if data.num_rows != rows:
        raise CorruptSegmentError(
            f"history segment {path} holds {data.num_rows} rows, the manifest says {rows}"
        )
    segment._bind(data)
    return segment


def rows_of(lo: npt.NDArray[np.intp], hi: npt.NDArray[np.intp]) -> Int64Array:
    """The rows of the runs ``[lo, hi)``, concatenated."""
    lengths = hi - lo
    nonempty = lengths > 0
    lo, lengths = lo[nonempty], lengths[nonempty]
    if lo.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Concatenated aranges without a Python loop: offsets within each run plus its start.
    total = int(lengths.sum())
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    rows: Int64Array = (np.arange(total, dtype=np.int64) + starts).astype(np.int64)
    return rows
