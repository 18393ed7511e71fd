"""The hardware floor of a read, measured in the benchmark's own run (``diadb bench``).

For each compared read (one table's result of one visit), two floors for its bytes:

``ram_s``
    One vectorised pass (a NumPy sum) over an anonymous buffer of the result's size
    (``pyarrow.Table.nbytes`` of diadb's result), already in memory: reading those bytes once at
    the machine's memory bandwidth.
``mapped_s``
    One pass over the same number of bytes in the memory-mapped history segments the rows live
    in: for each segment the read draws on and each column, a NumPy sum over a contiguous
    stretch of the mapped column of as many values as the segment contributes candidate rows
    (its rows in the pixel cover and the time window), starting at the first of them; string
    columns add their offsets and character bytes. One call per segment and column, none per
    pixel range. Rows still in the engine (not yet compacted) are not in it: ``mapped_bytes``
    says how much of the result it covers.

Each is the best of ``REPEATS`` passes (a floor is a lower bound; the first pass over freshly
mapped pages also pays their page faults). Neither filters, merges, sorts or copies anything:
diadb's read time over them is its distance from the hardware.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.apdb import Apdb
from diadb.history.segment import locate, open_segment
from diadb.sky.regions import Region

REPEATS = 3
TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")
_buffer: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class FloorReading:
    """One table's read at one visit, against its floors (seconds and bytes)."""

    visit: int
    table: str
    rows: int
    result_bytes: int
    diadb_s: float
    ram_s: float
    mapped_s: float
    mapped_bytes: int
    #: NumPy calls of one mapped pass (one per segment and column; none per pixel range).
    mapped_calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _best(run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def ram_pass_seconds(nbytes: int) -> float:
    """Seconds of one vectorised pass over ``nbytes`` of anonymous memory (best of REPEATS)."""
    global _buffer
    words = max(1, (int(nbytes) + 7) // 8)
    if len(_buffer) < words:
        _buffer = np.ones(words, dtype=np.uint64)  # written once: every page is resident
    view = _buffer[:words]
    return _best(lambda: view.sum())


def _stretches(data: pa.Table, rows: npt.NDArray[np.int64]) -> list[npt.NDArray[Any]]:
    """Per column, the contiguous stretch of mapped values (zero copy) a floor pass reads:
    ``len(rows)`` values from the first of ``rows``; a string column's offsets and characters."""
    first, count = int(rows[0]), len(rows)
    out: list[npt.NDArray[Any]] = []
    for column in data.columns:
        array = column.chunk(0)
        kind = array.type
        buffers = array.buffers()
        base = array.offset + first
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            dtype = np.dtype(kind.to_pandas_dtype())
            values = np.frombuffer(buffers[1], dtype=dtype, count=base + count)
            out.append(values[base : base + count])
        elif pa.types.is_string(kind) or pa.types.is_binary(kind):
            offsets = np.frombuffer(buffers[1], dtype=np.int32, count=array.offset + len(array) + 1)
            out.append(offsets[base : base + count])
            lengths = offsets[array.offset + rows + 1] - offsets[array.offset + rows]
            start = int(offsets[base])
            chars = np.frombuffer(buffers[2], dtype=np.uint8, count=start + int(lengths.sum()))
            out.append(chars[start:])
    return out


def mapped_pass(db: Apdb, table: str, region: Region, mjd: float, months: int) -> tuple[float, int, int]:
    """(seconds, bytes, NumPy calls) of the mapped floor of one read of ``table`` (see the module
    docstring)."""
    tier = db.tier
    if tier is None:
        return float("nan"), 0, 0
    ranges = region.pixel_ranges(db.config.region_refinement)
    start = mjd - 30.0 * months
    stretches: list[npt.NDArray[Any]] = []
    for info in db.segments():
        if info.table != table:
            continue
        if table != "DiaObject" and (info.t_max <= start or info.t_min > mjd):
            continue
        data = open_segment(tier.store, info)
        rows = locate(data, ranges)
        if table != "DiaObject" and len(rows):
            t = np.asarray(data.column("midpointMjdTai").chunk(0).to_numpy(), dtype=np.float64)[rows]
            rows = rows[(t > start) & (t <= mjd)]
        if len(rows):
            stretches += _stretches(data, rows)
    if not stretches:
        return float("nan"), 0, 0
    touched = int(sum(s.nbytes for s in stretches))
    return _best(lambda: [s.sum() for s in stretches]), touched, len(stretches)


def measure(
    db: Apdb,
    visit: int,
    region: Region,
    mjd: float,
    months: int,
    seconds: dict[str, float],
    nbytes: dict[str, int],
    rows: dict[str, int],
    tables: Sequence[str] = TABLES,
) -> list[FloorReading]:
    """The floors of one visit's reads (diadb's ``seconds``, result ``nbytes`` and ``rows`` per table)."""
    readings = []
    for table in tables:
        mapped_s, mapped_bytes, calls = mapped_pass(db, table, region, mjd, months)
        readings.append(
            FloorReading(
                visit=visit,
                table=table,
                rows=rows[table],
                result_bytes=nbytes[table],
                diadb_s=seconds[table],
                ram_s=ram_pass_seconds(nbytes[table]),
                mapped_s=mapped_s,
                mapped_bytes=mapped_bytes,
                mapped_calls=calls,
            )
        )
    return readings


def summarize_floor(readings: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Per table: the last measured read, and the median of diadb's time over each floor."""
    if not readings:
        return None
    out: dict[str, Any] = {}
    for table in TABLES:
        mine = [r for r in readings if r["table"] == table]
        if not mine:
            continue
        ram = [r["diadb_s"] / r["ram_s"] for r in mine if r["ram_s"] > 0]
        mapped = [r["diadb_s"] / r["mapped_s"] for r in mine if r["mapped_s"] > 0]
        out[table] = {
            "last": mine[-1],
            "reads": len(mine),
            "median_over_ram": float(np.median(ram)) if ram else float("nan"),
            "median_over_mapped": float(np.median(mapped)) if mapped else float("nan"),
        }
    return out


def render_floor(floor: dict[str, Any]) -> list[str]:
    """The floor's lines of the Markdown report."""
    lines = [
        "",
        "Distance to the floor: diadb's read time over one vectorised pass over its result's bytes in "
        "RAM, and over as many bytes of the mapped segments the rows live in (best of "
        f"{REPEATS}; rows still in the engine are in the RAM floor only; the mapped pass makes one "
        "NumPy call per segment and column, counted in brackets). Last measured read, and the median "
        "ratio over every measured read:",
        "",
        "| table | rows | result MB | RAM floor s | mapped floor s (MB, calls) | diadb s | diadb / RAM floor "
        "| diadb / mapped floor | medians (reads) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for table, f in floor.items():
        r = f["last"]
        over_ram = r["diadb_s"] / r["ram_s"] if r["ram_s"] > 0 else float("nan")
        over_mapped = r["diadb_s"] / r["mapped_s"] if r["mapped_s"] > 0 else float("nan")
        lines.append(
            f"| {table} (visit {r['visit']}) | {r['rows']:,} | {r['result_bytes'] / 1e6:,.1f} | "
            f"{r['ram_s']:.4f} | {r['mapped_s']:.4f} ({r['mapped_bytes'] / 1e6:,.1f}, {r['mapped_calls']}) | "
            f"{r['diadb_s']:.4f} | "
            f"{over_ram:.1f}x | {over_mapped:.1f}x | {f['median_over_ram']:.1f}x / "
            f"{f['median_over_mapped']:.1f}x ({f['reads']}) |"
        )
    return lines
