"""What a PPDB export is asked to do (:class:`ExportOptions`) and what it did (:class:`ExportResult`).

Shared by the full export (:mod:`diadb.ppdb.hats_export`), the incremental one
(:mod:`diadb.ppdb.incremental`), the partition writer (:mod:`diadb.ppdb.writer`) and the job runner
(:mod:`diadb.ppdb.parallel`); it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diadb.errors import ConfigError
from diadb.ppdb import partition as part

#: Called with one line of progress text.
Progress = Callable[[str], None]

#: Default partition sizes: about 150-250 MB of Parquet per partition at full width.
DEFAULT_MAX_ROWS = {"DiaObject": 300_000, "DiaSource": 300_000, "DiaForcedSource": 2_000_000}

#: Catalogs cut into the partitions of a table's: the light curves and versions of DiaObjects.
_CUT_AS = {"DiaObjectLightCurve": "DiaObject", "DiaObjectVersion": "DiaObject"}


@dataclass(frozen=True)
class ExportOptions:
    """How an export is cut and run. Sizes in rows, angles in arcseconds, orders are HEALPix orders."""

    #: Most rows in one partition file, per table (adaptive tiling stops splitting below this).
    max_rows: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_ROWS))
    #: Width of the margin catalogs.
    margin_arcsec: float = 5.0
    #: The counting pass reads the sky in blocks of this order (12 * 4**k blocks over the sky).
    scan_order: int = 2
    #: Order of the skymap written beside each catalog.
    skymap_order: int = 8
    #: Processes for the per-partition work (more than 1 needs Dask); 1 runs it in this process.
    workers: int = 1
    #: A ``dask.distributed`` scheduler address (``tcp://host:8786``) to run that work on instead.
    scheduler: str | None = None
    #: Also publish ``DiaObjectLightCurve``: each DiaObject with its DiaSources and
    #: DiaForcedSources nested, sorted by time (:mod:`diadb.ppdb.nested`). An incremental
    #: export keeps what the first export chose.
    light_curves: bool = False
    #: Also publish ``DiaObjectVersion``: every DiaObject version, superseded and closed ones
    #: included (:mod:`diadb.ppdb.versions`). An incremental export keeps what the first chose.
    object_versions: bool = True

    def __post_init__(self) -> None:
        if not (0.0 < self.margin_arcsec <= 3600.0):
            raise ConfigError(f"margin_arcsec must be in (0, 3600], got {self.margin_arcsec}")
        if not (0 <= self.scan_order <= 8):
            raise ConfigError(f"scan_order must be in [0, 8], got {self.scan_order}")
        if not (0 <= self.skymap_order <= part.MAX_ORDER):
            raise ConfigError(f"skymap_order must be in [0, {part.MAX_ORDER}], got {self.skymap_order}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        for table, n in self.max_rows.items():
            if n < 1:
                raise ConfigError(f"max_rows[{table}] must be >= 1, got {n}")

    def rows_per_partition(self, table: str) -> int:
        """Most rows in one of ``table``'s partition files (``max_rows``, else the default)."""
        table = _CUT_AS.get(table, table)
        return int(self.max_rows.get(table, DEFAULT_MAX_ROWS[table]))


@dataclass
class ExportResult:
    """What an export did: rows and partitions per table, chunks applied, seconds taken."""

    root: Path
    incremental: bool
    tables: dict[str, dict[str, int]]
    chunks_applied: int
    last_chunk_id: int | None
    seconds: float
    rewritten_partitions: int = 0


__all__ = ["DEFAULT_MAX_ROWS", "ExportOptions", "ExportResult", "Progress"]
