"""``DiadbApdb``: Rubin's ``lsst.dax.apdb.Apdb`` interface on top of :class:`diadb.Apdb`.

The Alert Production pipeline keeps its calls (``getDiaObjects``, ``getDiaSources``,
``store``...), its pandas frames and its exceptions; diadb does the work. This module only
translates: names (``getDiaSources`` -> ``get_sources``), regions (``lsst.sphgeom`` is accepted
by diadb as is), times (``astropy.time.Time`` -> MJD TAI), frames (Arrow -> pandas with the
reference's dtypes) and errors.

Importing it registers diadb with the reference's factory (see :mod:`diadb.compat.dax_config`), so
``lsst.dax.apdb.Apdb.from_uri("apdb-diadb.yaml")`` returns a :class:`DiadbApdb`.

Where the semantics differ from the reference (``lsst.dax.apdb.sql.ApdbSql``), on purpose:

- **Regions are exact**: ``getDiaObjects`` and region reads return only rows inside the region
  (the reference returns the superset of its HTM pixel cover).
- **store() is idempotent against exact retries**: each call is stored under a key hashed from
  its visit time and every id it carries (``diadb.Apdb.store(key=...)``). The same call again
  writes nothing (a retried store after a crash is harmless) and logs a warning; any other store
  appends, as the reference's does, even of a visit/detector already stored.
- **DiaForcedSources can be read by region** (``object_ids=None``), as Cassandra's can.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import astropy.time
import numpy as np
import pandas as pd
import pyarrow as pa
from lsst.dax.apdb import (
    Apdb,
    DiaForcedSourceId,
    DiaObjectId,
    DiaSourceId,
    IncompatibleVersionError,
    VersionTuple,
)
from lsst.dax.apdb.apdbAdmin import ApdbAdmin
from lsst.dax.apdb.apdbMetadata import ApdbMetadata
from lsst.dax.apdb.apdbSchema import ApdbSchema, ApdbTables
from lsst.dax.apdb.schema_model import Table
from lsst.dax.apdb.timer import Timer

import diadb
from diadb.compat.dax_admin import DiadbApdbAdmin, DiadbApdbMetadata
from diadb.compat.dax_config import DEFAULT_SCHEMA, DiadbApdbConfig, register
from diadb.compat.dax_monitor import store_records, timer
from diadb.compat.dax_replica import DiadbApdbReplica, whole_microseconds
from diadb.errors import UnknownIdError
from diadb.schema.felis import schema_from_yaml
from diadb.sky.regions import as_region
from diadb.times import DAYS_PER_MONTH

if TYPE_CHECKING:
    from lsst.dax.apdb import ApdbUpdateRecord

#: Logged under the reference's logger hierarchy, so a pipeline's logging config applies.
_LOG = logging.getLogger("lsst.dax.apdb.diadb")

#: Version of this facade's use of the database (its metadata keys and their meaning).
FACADE_VERSION = VersionTuple(1, 0, 0)

_META_FACADE_VERSION = "version:DiadbApdb"
_META_CONFIG = "config:apdb-diadb.json"
_META_DEDUP = "status:deduplication.json"
#: Config fields frozen into the database at creation; a later config cannot change them.
_FROZEN = ("enable_replica", "replica_chunk_seconds")

#: Arrow -> pandas dtypes as the reference returns them: integers and booleans are nullable
#: extension types, floats stay numpy (NaN for null), strings are objects.
_PANDAS_TYPES: dict[pa.DataType, Any] = {
    pa.int64(): pd.Int64Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int8(): pd.Int8Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}

_SOURCE_TABLES = ("DiaSource", "DiaForcedSource")


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as the reference's frame: its dtypes, a default RangeIndex."""
    frame: pd.DataFrame = table.to_pandas(types_mapper=_PANDAS_TYPES.get)
    return frame


def _mjd(when: astropy.time.Time) -> float:
    return float(when.tai.mjd)


def _schema_text(uri: str) -> str:
    from lsst.resources import ResourcePath

    data: bytes = ResourcePath(uri).read()
    return data.decode("utf-8")


def _store_key(
    visit_time_mjd: float, objects: pd.DataFrame, catalogs: Sequence[pd.DataFrame | None]
) -> tuple[str, int, int | None]:
    """The key, visit and detector under which diadb records one reference ``store`` call.

    The key is a hash of the visit time and every id the call carries: a retried identical call
    is a no-op, while other stores of the same visit/detector append, as the reference's do.
    The visit/detector recorded (for ``containsVisitDetector``) is the one all source rows share;
    rows of several make a whole-visit store of the first catalog's (smallest) visit, and a call
    without source rows gets a negative visit that no real visit uses.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.float64(visit_time_mjd).tobytes())
    for frame, columns in (
        (objects, ("diaObjectId",)),
        (catalogs[0], ("diaSourceId",)),
        (catalogs[1], ("diaObjectId", "visit", "detector")),
    ):
        digest.update(b"|")
        if frame is not None and len(frame):
            for column in columns:
                if column in frame:
                    digest.update(np.asarray(frame[column], dtype=np.int64).tobytes())
    key = "dax:" + digest.hexdigest()
    # Every catalog's (visit, detector) pairs: one pair is a per-detector store; several (the
    # reference takes rows of any visit in one call) a whole-visit store, which may mix visits.
    frames = [f for f in catalogs if f is not None and len(f) and "visit" in f and "detector" in f]
    if frames:
        visits = np.concatenate([np.asarray(f["visit"], dtype=np.int64) for f in frames])
        detectors = np.concatenate([np.asarray(f["detector"], dtype=np.int64) for f in frames])
        pairs = np.unique(np.stack([visits, detectors], axis=1), axis=0)
        if len(pairs) == 1:
            return key, int(pairs[0, 0]), int(pairs[0, 1])
        return key, int(np.asarray(frames[0]["visit"], dtype=np.int64).min()), None
    return key, -1 - (int.from_bytes(digest.digest()[:8], "little") >> 2), None


def _window_start(visit_time: Any, start_time: Any, months: int) -> float | None:
    """Start of the reference's history window (MJD TAI), or None when it reads nothing."""
    if start_time is not None:
        return _mjd(start_time)
    if months == 0:
        return None
    return _mjd(visit_time) - DAYS_PER_MONTH * months


class DiadbApdb(Apdb):
    """The ``lsst.dax.apdb.Apdb`` interface, served by diadb. Make one with
    ``Apdb.from_config(DiadbApdbConfig(...))`` or ``Apdb.from_uri(yaml)`` once the database exists
    (:meth:`init_database` creates it)."""

    def __init__(self, config: DiadbApdbConfig) -> None:
        self._db = diadb.Apdb.open(config.db_url)
        self._table_schema = ApdbSchema(config.schema_file, config.ss_schema_file)
        self._check_schema_version()
        self.config = self._apply_frozen(config)

    # ---- creation and configuration ---------------------------------------------------
    @classmethod
    def init_database(
        cls,
        db_url: str,
        *,
        schema_file: str | None = None,
        ss_schema_file: str | None = None,
        read_sources_months: int | None = None,
        read_forced_sources_months: int | None = None,
        enable_replica: bool = False,
        replica_chunk_seconds: int | None = None,
        dia_object_columns: Sequence[str] | None = None,
        diadb_config: Mapping[str, Any] | None = None,
    ) -> DiadbApdbConfig:
        """Create a new diadb APDB and return the configuration that opens it.

        ``diadb_config`` takes the options of :class:`diadb.ApdbConfig` (frozen into the database).
        Save the result with ``config.save("apdb.yaml")`` for ``Apdb.from_uri``.
        """
        fields: dict[str, Any] = {"db_url": db_url, "enable_replica": enable_replica}
        optional = {
            "schema_file": schema_file,
            "ss_schema_file": ss_schema_file,
            "read_sources_months": read_sources_months,
            "read_forced_sources_months": read_forced_sources_months,
            "replica_chunk_seconds": replica_chunk_seconds,
            "dia_object_columns": list(dia_object_columns) if dia_object_columns is not None else None,
            "diadb_config": dict(diadb_config) if diadb_config is not None else None,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        config = DiadbApdbConfig(**fields)
        schema = None
        if config.schema_file != DEFAULT_SCHEMA:
            schema = schema_from_yaml(_schema_text(config.schema_file), origin=config.schema_file)
        db = diadb.Apdb.create(config.db_url, schema, **config.diadb_config)
        try:
            frozen = {name: getattr(config, name) for name in _FROZEN}
            items = {
                _META_FACADE_VERSION: str(FACADE_VERSION),
                _META_CONFIG: json.dumps(frozen, sort_keys=True),
            }
            db.set_user_metadata(items)
        finally:
            db.close()
        return config

    def _check_schema_version(self) -> None:
        """The configured schema must be compatible with the one frozen in the database, by the
        reference's rules (same major; the code's minor not older)."""
        frozen = self._db.schema.version
        # diadb records a schema without a version as 0.0.0; the reference calls it 0.1.0.
        stored = VersionTuple(0, 1, 0) if frozen == "0.0.0" else VersionTuple.fromString(frozen)
        configured = self._table_schema.schemaVersion()
        if not configured.checkCompatibility(stored):
            raise IncompatibleVersionError(
                f"Configured schema version {configured} is not compatible with database version {stored}"
            )
        meta = self._user_metadata()
        if _META_FACADE_VERSION in meta:
            facade = VersionTuple.fromString(meta[_META_FACADE_VERSION])
            if not FACADE_VERSION.checkCompatibility(facade):
                raise IncompatibleVersionError(
                    f"diadb facade version {FACADE_VERSION} is not compatible with database version {facade}"
                )

    def _user_metadata(self) -> dict[str, str]:
        return self._db.user_metadata()

    def _apply_frozen(self, config: DiadbApdbConfig) -> DiadbApdbConfig:
        text = self._user_metadata().get(_META_CONFIG)
        if text is None:
            return config
        frozen = json.loads(text)
        return config.model_copy(update={k: v for k, v in frozen.items() if k in _FROZEN})

    def getConfig(self) -> DiadbApdbConfig:
        return self.config

    def tableDef(self, table: ApdbTables) -> Table | None:
        return self._table_schema.tableSchemas.get(table)

    @property
    def schema(self) -> ApdbSchema:
        return self._table_schema

    @property
    def metadata(self) -> ApdbMetadata:
        return DiadbApdbMetadata(self._db)

    @property
    def admin(self) -> ApdbAdmin:
        return DiadbApdbAdmin(self._db)

    @property
    def native(self) -> diadb.Apdb:
        """The :class:`diadb.Apdb` behind this facade (its Arrow API is faster than pandas)."""
        return self._db

    def get_replica(self) -> DiadbApdbReplica:
        """The ``ApdbReplica`` view of this database's change log."""
        return DiadbApdbReplica(self)

    def close(self) -> None:
        self._db.close()

    # ---- reads ---------------------------------------------------------------------
    def _columns(self, table: str) -> list[str]:
        return list(self._db.schema.table(table).column_names)

    def getDiaObjects(self, region: Any) -> pd.DataFrame:
        columns = list(self.config.dia_object_columns) or self._columns("DiaObject")
        with timer("select_time", "DiaObject", "getDiaObjects") as t:
            frame = to_pandas(self._db.get_objects(region, columns=columns))
            t.add_values(row_count=len(frame))
        return frame

    def _read_sources(
        self, table: str, region: Any, object_ids: Iterable[int] | None, start: float, inclusive: bool
    ) -> pd.DataFrame:
        """Rows after ``start`` (``>=`` when ``inclusive``), with no upper time bound, as the
        reference reads them: by ``object_ids`` alone when given, else by region."""
        ids = None if object_ids is None else np.fromiter((int(i) for i in object_ids), dtype=np.int64)
        reg = None if ids is not None else as_region(region)
        read = self._db.get_sources if table == "DiaSource" else self._db.get_forced_sources
        with timer("select_time", table, "_getSources") as t:
            data = read(
                reg,
                start,
                object_ids=ids,
                start=start,
                start_inclusive=inclusive,
                end=np.inf,
                columns=self._columns(table),
            )
            frame = to_pandas(data)
            t.add_values(row_count=len(frame))
        return frame

    def getDiaSources(
        self,
        region: Any,
        object_ids: Iterable[int] | None,
        visit_time: astropy.time.Time,
        start_time: astropy.time.Time | None = None,
    ) -> pd.DataFrame | None:
        start = _window_start(visit_time, start_time, self.config.read_sources_months)
        if start is None:
            return None
        # The reference selects ``> start`` by region and ``>= start`` by object ids.
        return self._read_sources("DiaSource", region, object_ids, start, object_ids is not None)

    def getDiaForcedSources(
        self,
        region: Any,
        object_ids: Iterable[int] | None,
        visit_time: astropy.time.Time,
        start_time: astropy.time.Time | None = None,
    ) -> pd.DataFrame | None:
        start = _window_start(visit_time, start_time, self.config.read_forced_sources_months)
        if start is None:
            return None
        return self._read_sources("DiaForcedSource", region, object_ids, start, object_ids is not None)

    def getDiaObjectsForDedup(self, since: astropy.time.Time | None = None) -> pd.DataFrame:
        if since is None:
            text = self._user_metadata().get(_META_DEDUP)
            if text is not None:
                since = astropy.time.Time(json.loads(text)["dedup_time_iso_tai"], format="iso", scale="tai")
        since_mjd = 0.0 if since is None else _mjd(since)
        return to_pandas(self._db.get_objects_for_dedup(since_mjd, columns=self._columns("DiaObject")))

    def getDiaSourcesForDiaObjects(
        self, objects: list[DiaObjectId], start_time: astropy.time.Time, max_dist_arcsec: float = 1.0
    ) -> pd.DataFrame:
        ids = sorted({o.diaObjectId for o in objects})
        return self._read_sources("DiaSource", None, ids, _mjd(start_time), True)

    def containsVisitDetector(
        self,
        visit: int,
        detector: int,
        region: Any = None,
        visit_time: astropy.time.Time | None = None,
    ) -> bool:
        with timer("contains_visit_detector_time", "diadb_visit"):
            return self._db.contains_visit_detector(int(visit), int(detector))

    def countUnassociatedObjects(self) -> int:
        return self._db.count_unassociated_objects()

    # ---- writes --------------------------------------------------------------------
    def store(
        self,
        visit_time: astropy.time.Time,
        objects: pd.DataFrame,
        sources: pd.DataFrame | None = None,
        forced_sources: pd.DataFrame | None = None,
    ) -> None:
        mjd = _mjd(visit_time)
        if len(objects) == 0:
            _LOG.debug("No objects to write to database.")
        # The reference sets the validity interval itself: the visit time, and open.
        objects = objects.drop(columns=["validityStartMjdTai", "validityEndMjdTai"], errors="ignore")
        key, visit, detector = _store_key(mjd, objects, (sources, forced_sources))
        with Timer("insert_time") as done:
            stored = self._db.store(
                mjd, objects, sources, forced_sources, visit=visit, detector=detector, key=key
            )
        tables = ("DiaObject", "DiaSource", "DiaForcedSource")
        counts = zip(tables, (objects, sources, forced_sources), strict=True)
        store_records(done, {t: len(f) for t, f in counts if f is not None})
        if not stored:
            _LOG.warning("this store (visit %d, key %s) is already stored: nothing written", visit, key)

    def reassignDiaSourcesToDiaObjects(
        self,
        idMap: Mapping[DiaSourceId, int],
        *,
        increment_nDiaSources: bool = True,
        decrement_nDiaSources: bool = True,
    ) -> None:
        mapping = {int(k.diaSourceId): int(v) for k, v in idMap.items()}
        if not mapping:
            return
        with timer("source_reassign_time") as t:
            self._db.reassign_sources(
                mapping,
                time=self._current_time(),
                increment=increment_nDiaSources,
                decrement=decrement_nDiaSources,
            )
            t.add_values(source_count=len(mapping))

    def setValidityEnd(
        self, objects: list[DiaObjectId], validityEnd: astropy.time.Time, raise_on_missing_id: bool = False
    ) -> int:
        ids = sorted({int(o.diaObjectId) for o in objects})
        if not ids:
            return 0
        # The reference skips unknown ids unless asked to raise.
        with timer("update_time", "DiaObject", "setValidityEnd") as t:
            closed = self._db.set_validity_end(ids, validityEnd, missing_ok=not raise_on_missing_id)
            t.add_values(row_count=closed)
        return closed

    def resetDedup(self, dedup_time: astropy.time.Time | None = None) -> None:
        if dedup_time is None:
            dedup_time = self._current_time()
        text = json.dumps({"dedup_time_iso_tai": dedup_time.tai.to_value("iso")})
        self._db.set_user_metadata({_META_DEDUP: text})

    def reassignDiaSources(self, idMap: Mapping[int, int]) -> None:
        mapping = {int(k): int(v) for k, v in idMap.items()}
        if not mapping:
            return
        try:
            with timer("update_time", "DiaSource", "reassignDiaSources") as t:
                self._db.reassign_to_ssobjects(mapping, time=self._current_time())
                t.add_values(row_count=len(mapping))
        except UnknownIdError as e:
            # The reference's callers expect ValueError here.
            raise ValueError(f"Following DiaSource IDs do not exist in the database: {e}") from e

    def withdrawDiaSources(
        self, diaSourceIds: Iterable[DiaSourceId], *, timeWithdrawn: astropy.time.Time | None = None
    ) -> None:
        ids = sorted({int(s.diaSourceId) for s in diaSourceIds})
        when = self._current_time() if timeWithdrawn is None else timeWithdrawn
        if ids:
            with timer("update_time", "DiaSource", "withdrawDiaSources") as t:
                self._db.withdraw_sources(ids, time=when, update_time=self._current_time())
                t.add_values(row_count=len(ids))

    def withdrawDiaForcedSources(
        self,
        diaForcedSourceIds: Iterable[DiaForcedSourceId],
        *,
        timeWithdrawn: astropy.time.Time | None = None,
    ) -> None:
        keys = sorted({(int(s.diaObjectId), int(s.visit), int(s.detector)) for s in diaForcedSourceIds})
        when = self._current_time() if timeWithdrawn is None else timeWithdrawn
        if keys:
            with timer("update_time", "DiaForcedSource", "withdrawDiaForcedSources") as t:
                self._db.withdraw_forced_sources(keys, time=when, update_time=self._current_time())
                t.add_values(row_count=len(keys))

    def _current_time(self) -> astropy.time.Time:
        """Now, to the whole microsecond: the time of a daytime update, which diadb records as a
        float MJD and its replica reports exactly (``update_time_ns``, chunk times)."""
        return whole_microseconds(astropy.time.Time.now())

    def _store_update_records(
        self, records: Sequence[ApdbUpdateRecord], update_time: astropy.time.Time
    ) -> None:
        """Record reference update records in diadb's change log (the reference's tests use this)."""
        if not self.config.enable_replica:
            raise TypeError("Replication is not enabled for this APDB instance.")
        payloads = [
            {"update_time_ns": r.update_time_ns, "update_order": r.update_order, "record": r.to_json()}
            for r in records
        ]
        self._db.log_updates("dax_apdb", payloads, _mjd(update_time))


register(DiadbApdb)

__all__ = ["DiadbApdb", "DiadbApdbAdmin", "DiadbApdbConfig", "DiadbApdbMetadata", "to_pandas"]
