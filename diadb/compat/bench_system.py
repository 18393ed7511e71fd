"""diadb driven through its ``lsst.dax.apdb`` facade, for ``diadb bench --compare``.

:class:`FacadeSystem` follows the ``System`` protocol of :mod:`diadb.sim.bench` and makes the
same calls as the reference's adapter (:class:`diadb.sim.reference.ReferenceApdb`): objects by
region, sources by region, forced sources by the ids of the objects read, pandas frames out,
pandas frames in. Its timings are what a pipeline sees when it switches its APDB config to
diadb without changing code; the difference from ``DiadbSystem`` is the facade's cost (pandas
conversion, reference dtypes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import astropy.time
import numpy as np

from diadb.compat.dax import DiadbApdb
from diadb.sim.reference import ReadResult, forced_key, to_sphgeom
from diadb.sim.visit import Visit
from diadb.sky.regions import Region


class FacadeSystem:
    """``lsst.dax.apdb.Apdb`` calls on a diadb SQLite database (Rubin's official schema)."""

    name = "diadb via lsst.dax.apdb facade"

    def __init__(self, path: Path, months: int = 12, diadb_config: Mapping[str, Any] | None = None) -> None:
        config = DiadbApdb.init_database(
            f"sqlite:///{path}",
            read_sources_months=months,
            read_forced_sources_months=months,
            diadb_config=diadb_config,
        )
        self.path = path
        self.apdb = DiadbApdb(config)

    @staticmethod
    def _time(mjd_tai: float) -> astropy.time.Time:
        return astropy.time.Time(mjd_tai, format="mjd", scale="tai")

    def read(self, region: Region, mjd: float) -> ReadResult:
        sph = to_sphgeom(region)
        when = self._time(mjd)
        seconds = {}
        t0 = time.perf_counter()
        objects = self.apdb.getDiaObjects(sph)
        seconds["DiaObject"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sources = self.apdb.getDiaSources(sph, None, when)
        seconds["DiaSource"] = time.perf_counter() - t0
        ids = np.asarray(objects["diaObjectId"].to_numpy(), dtype=np.int64)
        t0 = time.perf_counter()
        forced = self.apdb.getDiaForcedSources(sph, ids, when)
        seconds["DiaForcedSource"] = time.perf_counter() - t0
        source_ids = (
            np.asarray(sources["diaSourceId"].to_numpy(), dtype=np.int64)
            if sources is not None
            else np.zeros(0, np.int64)
        )
        keys = (
            forced_key(forced["diaObjectId"].to_numpy(np.int64), forced["visit"].to_numpy(np.int64))
            if forced is not None
            else np.zeros(0, np.int64)
        )
        return ReadResult(ids, source_ids, keys, seconds)

    def store(self, visit: Visit) -> float:
        """Store one visit through ``Apdb.store`` (pandas in, converted before the clock starts)."""
        frames = [t.to_pandas() for t in (visit.objects, visit.sources, visit.forced_sources)]
        when = self._time(visit.mjd_tai)
        t0 = time.perf_counter()
        self.apdb.store(when, frames[0], frames[1], frames[2])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.apdb.close()
