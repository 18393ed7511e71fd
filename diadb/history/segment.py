"""One history segment: an immutable Arrow IPC file of one table's rows over one time span.

Rows are sorted by ``_healpix_29`` then time and written as a single uncompressed record
batch, so a memory-mapped segment is one contiguous array per column: a region's pixel ranges
become row ranges by binary search on the key, and only the pages of the rows (and columns)
a read takes are ever touched. Measured on 2 M DiaSource rows (0.65 GB): locating a 1.75 deg
field takes ~15 ms and gathering its 223 k rows, all 104 columns, ~80 ms (8 columns: ~10 ms).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN

Int64Array = npt.NDArray[np.int64]


class CorruptSegmentError(StorageError):
    """A history segment file is missing, truncated or fails its checksum."""


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
    checksum: str  # blake2b-128 of the whole file, hex
    segment_id: int = -1


def file_checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- names and spans --------------------------------------------------------------------


def _label(value: float) -> str:
    """A span bound for a file name, at most 12 characters whatever its magnitude."""
    if abs(value) < 1e6:
        return f"{value:.5f}"
    return f"{value:.4e}"


def segment_name(table: str, span: tuple[float, float]) -> str:
    """``<table>-<start>-<end>-<random>.arrow``: the bounds are only labels (the manifest holds
    the values), so the name's length does not depend on their magnitude."""
    return f"{table}-{_label(span[0])}-{_label(span[1])}-{os.urandom(6).hex()}.arrow"


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


def write_segment(
    directory: Path,
    table: str,
    data: pa.Table,
    time_column: str,
    span: tuple[float, float],
    *,
    fault: object = None,
    order: tuple[str, ...] | None = None,
) -> SegmentInfo:
    """Sort ``data`` (by ``_healpix_29`` then ``order``, default ``time_column``) and write it
    durably: temporary name, fsync, rename, fsync of the directory. ``span`` must be finite.

    ``fault`` (tests only) is called with the step name before each step, to crash there.
    """
    _check_span(table, span)
    hook = fault if callable(fault) else (lambda step: None)
    directory.mkdir(parents=True, exist_ok=True)
    keys = [(c, "ascending") for c in (HEALPIX_COLUMN, *(order or (time_column,)))]
    ordered = data.take(pc.sort_indices(data, keys))
    ordered = ordered.combine_chunks()
    name = segment_name(table, span)
    final = directory / name
    tmp = directory / (name + ".tmp")
    hook("write_tmp")
    with open(tmp, "wb") as raw:
        with pa.ipc.new_file(raw, ordered.schema) as writer:
            writer.write_table(ordered, max_chunksize=max(ordered.num_rows, 1))
        raw.flush()
        os.fsync(raw.fileno())
    hook("rename")
    os.replace(tmp, final)
    _fsync_dir(directory)
    hook("renamed")
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
        bytes=final.stat().st_size,
        checksum=file_checksum(final),
    )


def open_segment(directory: Path, info: SegmentInfo) -> pa.Table:
    """Memory-map a segment (zero copy). Checks existence, size and the Arrow file structure."""
    path = directory / info.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptSegmentError(f"history segment {path} is missing") from None
    if size != info.bytes:
        raise CorruptSegmentError(f"history segment {path} has {size} bytes, the manifest says {info.bytes}")
    try:
        source = pa.memory_map(str(path), "r")
        data = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptSegmentError(f"history segment {path} is not a readable Arrow file: {e}") from e
    if data.num_rows != info.rows:
        raise CorruptSegmentError(
            f"history segment {path} holds {data.num_rows} rows, the manifest says {info.rows}"
        )
    return data


def verify_segment(directory: Path, info: SegmentInfo) -> None:
    """Full check of one segment, including its checksum (reads the whole file)."""
    open_segment(directory, info)
    actual = file_checksum(directory / info.name)
    if actual != info.checksum:
        raise CorruptSegmentError(
            f"history segment {directory / info.name}: checksum {actual} "
            f"does not match the manifest's {info.checksum}"
        )


def locate(data: pa.Table, ranges: Int64Array) -> Int64Array:
    """Row numbers of ``data`` (sorted by ``_healpix_29``) inside the ``[lo, hi)`` pixel ranges."""
    key = data.column(HEALPIX_COLUMN)
    if data.num_rows == 0 or len(ranges) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = key.chunk(0).to_numpy() if key.num_chunks == 1 else key.to_numpy()
    lo = np.searchsorted(keys, ranges[:, 0], side="left")
    hi = np.searchsorted(keys, ranges[:, 1], side="left")
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
