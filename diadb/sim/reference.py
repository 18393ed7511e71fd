"""Drives the reference implementation, ``lsst-dax-apdb`` (extra ``diadb[compare]``), with the
same visits as diadb, the way the Alert Production pipeline calls it, for side-by-side runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.errors import BackendUnavailable
from diadb.sky.regions import Circle, Polygon, Region


@dataclass
class ReadResult:
    """IDs read per table (for comparisons) and the seconds each read took."""

    object_ids: npt.NDArray[np.int64]
    source_ids: npt.NDArray[np.int64]
    forced_keys: npt.NDArray[np.int64]  # diaObjectId * 2**20 + visit, as a comparable key
    seconds: dict[str, float]
    #: (ra, dec) of the objects and sources read, to check where rows differ.
    object_radec: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
    source_radec: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None


def forced_key(object_ids: npt.ArrayLike, visits: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """One int64 per forced source: unique within a run whose visits are < 2**20."""
    return np.asarray(object_ids, dtype=np.int64) * (1 << 20) + np.asarray(visits, dtype=np.int64)


def to_sphgeom(region: Region) -> Any:
    """The ``lsst.sphgeom`` region the reference takes."""
    from lsst import sphgeom

    if isinstance(region, Circle):
        centre = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(region.ra_deg, region.dec_deg))
        return sphgeom.Circle(centre, sphgeom.Angle.fromDegrees(region.radius_deg))
    if isinstance(region, Polygon):
        return sphgeom.ConvexPolygon(
            [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec)) for ra, dec in region.vertices]
        )
    raise TypeError(f"no lsst.sphgeom equivalent for {type(region).__name__}")


class ReferenceApdb:
    """``lsst.dax.apdb`` on SQLite, configured as Rubin runs it (a DiaObjectLast table)."""

    def __init__(self, path: Path, *, months: int = 12, create: bool = True) -> None:
        try:
            from lsst.dax.apdb import Apdb as DaxApdb
            from lsst.dax.apdb.sql import ApdbSql
        except ImportError as e:
            raise BackendUnavailable(
                "the comparison needs lsst-dax-apdb: pip install 'diadb[compare]'"
            ) from e
        self.path = path
        config = ApdbSql.init_database(
            db_url=f"sqlite:///{path}",
            dia_object_index="last_object_table",
            read_sources_months=months,
            read_forced_sources_months=months,
            drop=create,
        )
        self._apdb = DaxApdb.from_config(config)

    @staticmethod
    def _time(mjd_tai: float) -> Any:
        import astropy.time

        return astropy.time.Time(mjd_tai, format="mjd", scale="tai")

    def read(self, region: Region, visit_mjd_tai: float) -> ReadResult:
        """The pipeline's read: objects in the region, then sources by region and forced
        sources of those objects (the reference's SQL backend selects forced sources by object id)."""
        sph = to_sphgeom(region)
        when = self._time(visit_mjd_tai)
        seconds = {}
        t0 = time.perf_counter()
        objects = self._apdb.getDiaObjects(sph)
        seconds["DiaObject"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sources = self._apdb.getDiaSources(sph, None, when)
        seconds["DiaSource"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = objects["diaObjectId"].to_numpy()
        forced = self._apdb.getDiaForcedSources(sph, ids, when)
        seconds["DiaForcedSource"] = time.perf_counter() - t0
        forced_keys = (
            forced_key(forced["diaObjectId"].to_numpy(), forced["visit"].to_numpy())
            if forced is not None and len(forced)
            else np.zeros(0, np.int64)
        )
        empty = np.zeros(0, np.float64)
        if sources is not None and len(sources):
            source_ids = sources["diaSourceId"].to_numpy()
            source_radec = (sources["ra"].to_numpy(np.float64), sources["dec"].to_numpy(np.float64))
        else:
            source_ids, source_radec = np.zeros(0, np.int64), (empty, empty)
        object_radec = (
            (objects["ra"].to_numpy(np.float64), objects["dec"].to_numpy(np.float64))
            if len(objects)
            else (empty, empty)
        )
        return ReadResult(
            np.asarray(ids, np.int64),
            np.asarray(source_ids, np.int64),
            forced_keys,
            seconds,
            object_radec=object_radec,
            source_radec=source_radec,
        )

    def store(self, visit_mjd_tai: float, objects: pa.Table, sources: pa.Table, forced: pa.Table) -> float:
        """Store one visit through the reference's API (pandas in); returns seconds."""
        frames = [t.to_pandas() for t in (objects, sources, forced)]
        t0 = time.perf_counter()
        self._apdb.store(self._time(visit_mjd_tai), frames[0], frames[1], frames[2])
        return time.perf_counter() - t0
