"""Drives the reference implementation, ``lsst-dax-apdb`` (extra ``diadb[compare]``), with the
same visits as diadb, the way the Alert Production pipeline calls it, for side-by-side runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.errors import BackendUnavailable, ConfigError
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
    #: Bytes of each table's result (``pyarrow.Table.nbytes``; diadb's reads only).
    nbytes: dict[str, int] = field(default_factory=dict)


def forced_key(object_ids: npt.ArrayLike, visits: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """One int64 per forced source: unique within a run whose visits are < 2**20."""
    return np.asarray(object_ids, dtype=np.int64) * (1 << 20) + np.asarray(visits, dtype=np.int64)


def reference_postgres_url(url: str) -> tuple[str, str]:
    """The SQLAlchemy URL and namespace for the reference on the PostgreSQL server of ``url``, a
    diadb-style URL; diadb's own query options are dropped, libpq's kept. The driver is psycopg2:
    SQLAlchemy's psycopg (3) dialect casts every bound value to its column's pandas-derived type,
    and the reference binds an all-None object column (``validityEndMjdTai``) that becomes
    ``::VARCHAR`` against a double column; psycopg2 sends an untyped NULL.
    A URL carrying a password is refused (as diadb refuses it): libpq reads it from
    ``PGPASSWORD``, ``~/.pgpass`` or a service file."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    from diadb.backends import locate

    location = locate(url)  # refuses a password
    parts = urlsplit(location.uri or "")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "application_name"]
    query.append(("application_name", "dax_apdb"))
    sa_url = urlunsplit(
        ("postgresql+psycopg2", parts.netloc, parts.path, urlencode(query, quote_via=quote), "")
    )
    # Not location.namespace: that is diadb's default schema when none is named, and the
    # reference keeps its own default namespace.
    return sa_url, location.options.get("schema") or "dax_apdb"


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


def reference_cassandra_location(url: str) -> tuple[tuple[str, ...], int, str]:
    """(hosts, port, keyspace) of a diadb-style ``cassandra://`` URL (its options are diadb's own
    and are not passed on)."""
    from diadb.backends import locate

    where = locate(url)
    if where.scheme != "cassandra" or where.port is None or where.namespace is None:
        raise ConfigError(f"not a Cassandra URL: {url!r}")
    return where.hosts, where.port, where.namespace


def _dax_cassandra(url: str, months: int, create: bool) -> Any:
    """lsst-dax-apdb's ``ApdbCassandra`` in the keyspace of ``url``, with its own defaults but the
    replication factor (as diadb's default: the nodes seen, at most 3) and the history window."""
    from lsst.dax.apdb import Apdb as DaxApdb
    from lsst.dax.apdb.cassandra import ApdbCassandra

    hosts, port, keyspace = reference_cassandra_location(url)
    config = ApdbCassandra.init_database(
        hosts=hosts,
        keyspace=keyspace,
        port=port,
        read_sources_months=months,
        read_forced_sources_months=months,
        replication_factor=min(3, _cassandra_query(hosts, port, None)),
        # One table per source kind, time in the partition key (the config's default): the
        # per-partition-table layout would create a table per 30 days from 2018 to 2030 ahead.
        time_partition_tables=False,
        drop=create,
    )
    return DaxApdb.from_config(config)


def _cassandra_query(hosts: tuple[str, ...], port: int, keyspace: str | None) -> int:
    """The number of nodes (``keyspace`` None), or the keyspace's bytes on disk
    (``system_views.disk_usage``: flushed SSTables only)."""
    from cassandra.cluster import Cluster  # type: ignore[import-untyped]

    cluster = Cluster(list(hosts), port=port, protocol_version=5)
    try:
        session = cluster.connect()
        if keyspace is None:
            return max(1, len(cluster.metadata.all_hosts()))
        rows = session.execute(
            "SELECT mebibytes FROM system_views.disk_usage WHERE keyspace_name = %s ALLOW FILTERING",
            [keyspace],
        )
        return sum(int(r[0]) for r in rows) << 20
    finally:
        cluster.shutdown()


class ReferenceApdb:
    """``lsst.dax.apdb``'s SQL backend, configured as Rubin runs it (a DiaObjectLast table), on
    SQLite (a file path) or on PostgreSQL (a ``postgresql://`` URL in diadb's form: its
    ``schema=`` names the namespace the reference's tables go in, ``dax_apdb`` by default);
    or its Cassandra backend (a ``cassandra://hosts:port/keyspace`` URL in diadb's form)."""

    def __init__(self, path: Path | str, *, months: int = 12, create: bool = True) -> None:
        try:
            from lsst.dax.apdb import Apdb as DaxApdb
            from lsst.dax.apdb.sql import ApdbSql
        except ImportError as e:
            raise BackendUnavailable(
                "the comparison needs lsst-dax-apdb: pip install 'diadb[compare]'"
            ) from e
        self.path = path
        self.namespace: str | None = None
        #: (hosts, port, keyspace) when the reference runs on Cassandra.
        self.cassandra: tuple[tuple[str, ...], int, str] | None = None
        #: The reference's SQL configuration (its ``ApdbSqlConfig``; None on Cassandra).
        self.config: Any = None
        if isinstance(path, str) and path.startswith("cassandra"):
            self._apdb = _dax_cassandra(path, months, create)
            self.cassandra = reference_cassandra_location(path)
            return
        if isinstance(path, str) and path.startswith("postgresql"):
            db_url, self.namespace = reference_postgres_url(path)
        else:
            db_url = f"sqlite:///{path}"
        self._url = db_url
        config = ApdbSql.init_database(
            db_url=db_url,
            dia_object_index="last_object_table",
            read_sources_months=months,
            read_forced_sources_months=months,
            namespace=self.namespace,
            drop=create,
        )
        self.config = config
        self._apdb = DaxApdb.from_config(config)

    def size_bytes(self) -> int:
        """Bytes on disk: the SQLite file, the PostgreSQL namespace's tables with their indexes, or
        the Cassandra keyspace's SSTables (``system_views.disk_usage``: flushed data only)."""
        if self.cassandra is not None:
            return _cassandra_query(*self.cassandra)
        if self.namespace is None:
            return Path(self.path).stat().st_size
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(self._url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                value = conn.execute(
                    sqlalchemy.text(
                        "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = :ns AND c.relkind IN ('r', 'p')"
                    ),
                    {"ns": self.namespace},
                ).scalar_one()
        finally:
            engine.dispose()
        return int(value)

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
