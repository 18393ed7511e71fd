"""The memory of one reader: a fresh process opens the database and reads one whole field
(objects, sources and forced sources, all columns), as one detector's pipeline process would.

Reported from the process itself (``/proc/self/status``): the peak resident size, and how much
of the resident size at the end is anonymous memory (results, copies) and how much is file
pages mapped from SQLite and the history segments (the shared page cache, not a copy). A reader
that loaded whole segments would show their size here; one that reads by row range does not.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from typing import Any

from diadb.sky.regions import Region


def _status() -> dict[str, float]:
    """VmHWM, RssAnon and RssFile of this process, in MB (Linux)."""
    values: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    values[key] = float(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return values


def _read_once(url: str, region: Region, mjd: float, queue: Any) -> None:
    from diadb.apdb import Apdb

    before = _status()
    with Apdb.open(url) as db:
        tables = [db.get_objects(region), db.get_sources(region, mjd), db.get_forced_sources(region, mjd)]
        after = _status()
        queue.put(
            {
                "rows": [t.num_rows for t in tables],
                "result_mb": sum(t.nbytes for t in tables) / 1e6,
                "segment_mb": sum(s.bytes for s in db.segments()) / 1e6,
                "baseline_peak_mb": before.get("VmHWM", float("nan")),
                "peak_mb": after.get("VmHWM", float("nan")),
                "anon_mb": after.get("RssAnon", float("nan")),
                "file_mb": after.get("RssFile", float("nan")),
            }
        )


def reader_memory(url: str, region: Region, mjd: float) -> dict[str, Any]:
    """One whole-field read in a new (spawned) process; see the module docstring."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_read_once, args=(url, region, mjd, queue))
    process.start()
    try:
        while True:
            try:
                result: dict[str, Any] = queue.get(timeout=1.0)
                return result
            except queue_module.Empty:
                if not process.is_alive():
                    raise RuntimeError(
                        f"the reader process ended (exit code {process.exitcode}) without a result"
                    ) from None
    finally:
        process.join(timeout=60)


def describe(memory: dict[str, Any]) -> str:
    """One Markdown paragraph for the benchmark report."""
    objects, sources, forced = memory["rows"]
    return (
        f"A reader's memory (a fresh process, one whole-field read of the last visit: {objects:,} "
        f"objects, {sources:,} sources, {forced:,} forced sources, {memory['result_mb']:,.0f} MB of "
        f"results): peak {memory['peak_mb']:,.0f} MB resident (the process held "
        f"{memory['baseline_peak_mb']:,.0f} MB before the read); at the end {memory['anon_mb']:,.0f} MB "
        f"anonymous and {memory['file_mb']:,.0f} MB of mapped file pages"
        + (f", of {memory['segment_mb']:,.0f} MB of history segments." if memory["segment_mb"] else ".")
    )
