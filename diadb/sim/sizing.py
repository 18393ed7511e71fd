"""Capacity planning from a benchmark run: measured bytes per visit, projected linearly.

Rows per visit scale with the simulator's ``scale`` (the source density), so a run at
``scale < 1`` is projected to full density by dividing by it. Projections assume every
visit adds the same rows (true once the simulated population is in steady state) and count
one copy; ``replication`` multiplies it (e.g. Cassandra's replication factor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diadb.errors import ConfigError

VISITS_PER_NIGHT = 1000.0  # LSST: ~800-1,000 visits a night (DOMAIN.md)
NIGHTS_PER_YEAR = 300.0


@dataclass(frozen=True)
class Projection:
    table: str
    bytes_per_visit: float  # at full density, one copy
    total_bytes: float  # for the projected visits, times replication


def load_summary(path: Path) -> dict[str, Any]:
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read benchmark summary {path}: {e}") from e
    if "sizes" not in summary or "diadb" not in summary["sizes"]:
        raise ConfigError(f"{path} is not a diadb bench summary.json (no diadb sizes)")
    return summary


def project(
    summary: dict[str, Any],
    *,
    visits: float | None = None,
    nights: float | None = None,
    years: float | None = None,
    replication: int = 1,
) -> list[Projection]:
    """Storage for ``visits`` (or ``nights`` or ``years`` of LSST operations) at full density."""
    given = [v for v in (visits, nights, years) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of visits, nights, years")
    if replication < 1:
        raise ConfigError(f"replication must be >= 1, got {replication}")
    n = visits if visits is not None else (nights or 0.0) * VISITS_PER_NIGHT
    if years is not None:
        n = years * NIGHTS_PER_YEAR * VISITS_PER_NIGHT
    if n < 0:
        raise ConfigError("the number of visits must be >= 0")
    measured_visits = float(summary["visits"])
    scale = float(summary.get("sim", {}).get("scale", 1.0))
    rows = []
    for table, size in summary["sizes"]["diadb"].items():
        per_visit = float(size["bytes"]) / measured_visits / scale
        rows.append(Projection(table, per_visit, per_visit * n * replication))
    total = sum(p.bytes_per_visit for p in rows)
    rows.append(Projection("total", total, total * n * replication))
    return rows
