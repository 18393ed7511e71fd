"""What the metrics of :mod:`diadb.metrics` cost on a read, as the benchmark measures it.

The same whole-field read (objects, sources, forced sources of the last visit) is repeated with
no sink (the default: measuring is off), with an in-memory sink and, when ``prometheus_client``
is installed, with the Prometheus sink; the modes take turns so that a drift of the machine
touches each alike. The medians, and the wrapper's own cost per call measured directly on a
call that does nothing (off and on), go into the benchmark's summary.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from diadb import metrics
from diadb.apdb import Apdb
from diadb.sky.regions import Region


def _read(db: Apdb, region: Region, mjd: float) -> None:
    db.get_objects(region)
    db.get_sources(region, mjd)
    db.get_forced_sources(region, mjd)


def _wrapper_cost_us(calls: int = 20000) -> float:
    """Microseconds the :func:`diadb.metrics.timed` wrapper adds to one call, as it is now."""

    def bare() -> None:
        return None

    wrapped = metrics.timed("noop")(bare)
    t0 = time.perf_counter()
    for _ in range(calls):
        bare()
    t1 = time.perf_counter()
    for _ in range(calls):
        wrapped()
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / calls * 1e6


def metrics_cost(db: Apdb, region: Region, mjd: float, *, rounds: int = 31) -> dict[str, Any]:
    """Median seconds of one read (3 calls) per mode, and the wrapper's cost per call."""
    sinks: dict[str, Callable[[metrics.Measurement], None] | None] = {
        "off": None,
        "memory": metrics.MemorySink(),
    }
    try:
        import prometheus_client

        sinks["prometheus"] = metrics.prometheus_sink(prometheus_client.CollectorRegistry())
    except ImportError:
        pass
    times: dict[str, list[float]] = {name: [] for name in sinks}
    _read(db, region, mjd)  # warm the caches once
    for _ in range(rounds):
        for name, sink in sinks.items():
            if sink is not None:
                metrics.add_sink(sink)
            try:
                t0 = time.perf_counter()
                _read(db, region, mjd)
                times[name].append(time.perf_counter() - t0)
            finally:
                if sink is not None:
                    metrics.remove_sink(sink)
    result: dict[str, Any] = {f"read_{k}_s": statistics.median(v) for k, v in times.items()}
    result["wrapper_off_us"] = _wrapper_cost_us()
    memory = sinks["memory"]
    assert memory is not None
    metrics.add_sink(memory)
    try:
        result["wrapper_on_us"] = _wrapper_cost_us()
    finally:
        metrics.remove_sink(memory)
    result["rounds"] = rounds
    return result


def describe(cost: dict[str, Any]) -> str:
    """One paragraph of the benchmark's report."""
    reads = ", ".join(
        f"{k.removeprefix('read_').removesuffix('_s')} {v * 1e3:.2f} ms"
        for k, v in cost.items()
        if k.startswith("read_")
    )
    return (
        f"Metrics cost on a read (objects + sources + forced sources of the last visit, median of "
        f"{cost['rounds']}): {reads}. The wrapper of each Apdb call adds "
        f"{cost['wrapper_off_us']:.2f} us when no sink listens, {cost['wrapper_on_us']:.2f} us with one."
    )


__all__ = ["describe", "metrics_cost"]
