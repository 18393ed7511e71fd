"""``DiadbApdbReplica``: the reference's ``ApdbReplica`` (what PPDB ingestion calls) on diadb's
change log.

diadb logs one chunk per store and per daytime update, numbered in commit order. The reference
groups everything stored within ``replica_chunk_seconds`` (600 s) of visit time into one
replica chunk whose id is the start of that window in seconds (TAI, Unix epoch). This view does
the same grouping over diadb's unpublished chunks: ``getReplicaChunks`` lists the windows,
``getTableDataChunks`` / ``getUpdateRecordChunks`` read the diadb chunks of the windows asked for,
and ``deleteReplicaChunks`` marks them published and deletes them (``Apdb.delete_chunks``: the
stored rows stay; published chunks are no longer listed or read here).
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import astropy.time
import felis.datamodel
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from lsst.dax.apdb import (
    ApdbCloseDiaObjectValidityRecord,
    ApdbReassignDiaSourceToDiaObjectRecord,
    ApdbReassignDiaSourceToSSObjectRecord,
    ApdbReplica,
    ApdbTableData,
    ApdbUpdateNDiaSourcesRecord,
    ApdbUpdateRecord,
    ApdbWithdrawDiaForcedSourceRecord,
    ApdbWithdrawDiaSourceRecord,
    ReplicaChunk,
    VersionTuple,
)
from lsst.dax.apdb.apdbSchema import ApdbTables

if TYPE_CHECKING:
    from diadb.compat.dax import DiadbApdb

#: Version of this view's mapping of diadb's change log onto replica chunks.
REPLICA_VERSION = VersionTuple(1, 0, 0)
_CHUNK_COLUMN = "apdb_replica_chunk"
_DATA_TABLES = {
    ApdbTables.DiaObject: "DiaObject",
    ApdbTables.DiaSource: "DiaSource",
    ApdbTables.DiaForcedSource: "DiaForcedSource",
}
#: uuid5 namespace of replica chunks' unique ids (a chunk's id is derived from its diadb chunks).
_UUID_NAMESPACE = uuid.UUID("5f0b7c1e-3d4a-4c2b-9a55-6f1d2e8b9c10")


class ArrowTableData(ApdbTableData):
    """``ApdbTableData`` over an Arrow table and the Felis types of its columns."""

    def __init__(self, table: pa.Table, types: Sequence[felis.datamodel.DataType]) -> None:
        self._table = table
        self._types = list(types)

    def column_names(self) -> Sequence[str]:
        return list(self._table.column_names)

    def column_defs(self) -> Sequence[tuple[str, felis.datamodel.DataType]]:
        return list(zip(self._table.column_names, self._types, strict=True))

    def rows(self) -> Collection[tuple[Any, ...]]:
        columns = [c.to_pylist() for c in self._table.columns]
        return list(zip(*columns, strict=True)) if columns else []

    def to_arrow(self) -> pa.Table:
        """The rows as Arrow (diadb's native form)."""
        return self._table


def unix_tai_us(mjd_tai: npt.ArrayLike) -> np.ndarray:
    """Whole microseconds (TAI, Unix epoch) nearest to float MJD TAI values.

    diadb records times as float MJD TAI, whose spacing near MJD 60000 is 0.63 us: the nearest
    whole microsecond is the time the caller gave whenever that was a whole microsecond (what the
    reference's timestamps and PPDB's ``datetime`` columns hold). The conversion runs in
    astropy's two-double form and extended precision, not through one float of seconds (whose
    spacing near 1.6e9 s, 0.24 us, would add to the MJD's error).
    """
    times = astropy.time.Time(np.asarray(mjd_tai, dtype=np.float64), format="mjd", scale="tai")
    seconds = np.asarray(times.to_value("unix_tai", "long"), dtype=np.longdouble)
    return np.asarray(np.rint(seconds * np.longdouble(1_000_000)), dtype=np.int64)


_EPOCH = datetime.datetime(1970, 1, 1)


def exact_time(microseconds: int) -> astropy.time.Time:
    """The TAI time of a whole number of microseconds since the Unix epoch (``unix_tai``).

    Made from a ``datetime`` read as TAI, as PPDB's SQL tables give their timestamps back, so
    that a chunk's time compares equal (``==``, exact) on both sides of a replication.
    """
    when = _EPOCH + datetime.timedelta(microseconds=int(microseconds))
    return astropy.time.Time(when, format="datetime", scale="tai")


def whole_microseconds(when: astropy.time.Time) -> astropy.time.Time:
    """``when`` rounded to the whole microsecond (TAI): a time diadb's float MJD gives back exactly."""
    seconds = np.longdouble(when.tai.to_value("unix_tai", "long"))
    return exact_time(int(np.rint(seconds * np.longdouble(1_000_000))))


class DiadbApdbReplica(ApdbReplica):
    """The replica view of one :class:`DiadbApdb`."""

    def __init__(self, apdb: DiadbApdb) -> None:
        self._apdb = apdb
        self._db = apdb.native

    @classmethod
    def apdbReplicaImplementationVersion(cls) -> VersionTuple:
        return REPLICA_VERSION

    def schemaVersion(self) -> VersionTuple:
        return self._apdb.schema.schemaVersion()

    @property
    def _window(self) -> int:
        return int(self._apdb.config.replica_chunk_seconds)

    def _unpublished(self) -> pa.Table:
        """diadb's unpublished chunks with the replica window each belongs to (``window``)."""
        chunks: pa.Table = self._db.replica_chunks(published=False)
        times = np.asarray(chunks.column("visit_mjd_tai").to_numpy(zero_copy_only=False), dtype=np.float64)
        missing = np.isnan(times)
        if missing.any():  # a chunk without a visit time: when it was stored (UTC)
            stored = chunks.column("stored_at").to_pylist()
            for i in np.flatnonzero(missing):
                times[i] = astropy.time.Time(str(stored[i]).replace("+00:00", ""), scale="utc").tai.mjd
        micros = unix_tai_us(times) if len(times) else np.zeros(0, dtype=np.int64)
        span = self._window * 1_000_000
        window = (micros // span) * self._window
        return (
            chunks.append_column("window", pa.array(window, pa.int64()))
            .append_column("time", pa.array(times))
            .append_column("time_us", pa.array(micros, pa.int64()))
        )

    def getReplicaChunks(self) -> list[ReplicaChunk] | None:
        if not self._apdb.config.enable_replica:
            return None
        chunks = self._unpublished()
        result = []
        windows = chunks.column("window").to_numpy()
        for window in np.unique(windows):
            mine = chunks.filter(pc.equal(chunks.column("window"), pa.scalar(int(window))))
            ids = ",".join(str(i) for i in mine.column("chunk_id").to_pylist())
            last = int(pc.max(mine.column("time_us")).as_py())
            result.append(
                ReplicaChunk(
                    id=int(window),
                    last_update_time=exact_time(last),
                    unique_id=uuid.uuid5(_UUID_NAMESPACE, ids),
                )
            )
        return result

    def _diadb_chunks(self, chunks: Iterable[int]) -> tuple[list[int], dict[int, int]]:
        """The unpublished diadb chunk ids in these replica windows, and each one's window."""
        wanted = {int(c) for c in chunks}
        if not wanted:
            return [], {}
        table = self._unpublished()
        ids = table.column("chunk_id").to_pylist()
        windows = table.column("window").to_pylist()
        found = {int(i): int(w) for i, w in zip(ids, windows, strict=True) if int(w) in wanted}
        return sorted(found), found

    def deleteReplicaChunks(self, chunks: Iterable[int]) -> None:
        ids, _ = self._diadb_chunks(chunks)
        if ids:
            # The reference forgets the chunks (rows stay): published first, then deleted
            # (diadb keeps its newest chunk, published, which this view no longer lists).
            self._db.mark_published(ids)
            self._db.delete_chunks(ids)

    def getTableDataChunks(self, table: ApdbTables, chunks: Iterable[int]) -> ApdbTableData:
        if not self._apdb.config.enable_replica:
            raise ValueError("APDB is not configured for replication")
        if table not in _DATA_TABLES:
            raise ValueError(f"Table {table} does not support replica chunks.")
        name = _DATA_TABLES[table]
        spec = self._db.schema.table(name)
        types = [felis.datamodel.DataType.long] + [felis.datamodel.DataType(c.datatype) for c in spec.columns]
        ids, window_of = self._diadb_chunks(chunks)
        empty = spec.arrow_schema(with_healpix=False).empty_table()
        if not ids:
            data = empty.add_column(0, _CHUNK_COLUMN, pa.array([], pa.int64()))
            return ArrowTableData(data, types)
        rows: pa.Table = self._db.read_chunks(ids)[name]
        chunk_ids = rows.column("_chunk_id").to_pylist()
        windows = pa.array([window_of[int(c)] for c in chunk_ids], pa.int64())
        columns = [rows.column(c.name).cast(empty.schema.field(c.name).type) for c in spec.columns]
        if name == "DiaObject" and "validityEndMjdTai" in spec.column_names:
            # As stored: a store writes open versions. diadb's rows show today's end (set by the
            # next version or by setValidityEnd), which the PPDB derives itself from the next
            # version and the update records; given here it would leave PpdbSql no open version
            # to close.
            at = spec.column_names.index("validityEndMjdTai")
            columns[at] = pa.nulls(rows.num_rows, columns[at].type)
        data = pa.Table.from_arrays([windows, *columns], names=[_CHUNK_COLUMN, *spec.column_names])
        if name == "DiaSource":
            data = self._as_stored(data, rows.column("_chunk_id"))
        return ArrowTableData(data, types)

    def _as_stored(self, data: pa.Table, chunk_ids: pa.ChunkedArray) -> pa.Table:
        """DiaSource rows with the values their store wrote, as the reference's replica keeps
        them: diadb's rows show today's values, so every later daytime change recorded with
        the values it replaced (``before``) is undone, newest first. The PPDB applies those
        changes itself from the update records (and checks the rows they name)."""
        if not data.num_rows:
            return data
        first = int(pc.min(chunk_ids).as_py())
        chunks: pa.Table = self._db.replica_chunks()
        later = chunks.filter(
            pc.and_(pc.equal(chunks.column("kind"), "update"), pc.greater(chunks.column("chunk_id"), first))
        )
        if not later.num_rows:
            return data
        updates = self._db.read_chunks(later.column("chunk_id").to_pylist())["updates"]
        undo: list[tuple[int, int, int, dict[str, Any]]] = []  # (chunk, seq, diaSourceId, before)
        for chunk, seq, payload in zip(
            updates.column("chunk_id").to_pylist(),
            updates.column("seq").to_pylist(),
            updates.column("payload").to_pylist(),
            strict=True,
        ):
            for row in json.loads(payload).get("rows", []):
                if "before" in row and "diaSourceId" in row:
                    undo.append((int(chunk), int(seq), int(row["diaSourceId"]), row["before"]))
        if not undo:
            return data
        position = {int(s): i for i, s in enumerate(data.column("diaSourceId").to_pylist())}
        stored_in = chunk_ids.to_pylist()
        values = {name: data.column(name).to_pylist() for name in data.column_names}
        for chunk, _, source, before in sorted(undo, reverse=True):
            i = position.get(source)
            if i is None or int(stored_in[i]) >= chunk:
                continue
            for column, value in before.items():
                values[column][i] = value
        return pa.table([pa.array(values[f.name], f.type) for f in data.schema], schema=data.schema)

    def getUpdateRecordChunks(self, chunks: Iterable[int]) -> Sequence[ApdbUpdateRecord]:
        ids, _ = self._diadb_chunks(chunks)
        if not ids:
            return []
        updates = self._db.read_chunks(ids)["updates"]
        records: list[ApdbUpdateRecord] = []
        for kind, payload in zip(
            updates.column("kind").to_pylist(), updates.column("payload").to_pylist(), strict=True
        ):
            records.extend(update_records(str(kind), json.loads(payload)))
        return sorted(records)


def _time_ns(mjd_tai: float) -> int:
    """An update record's ``update_time_ns``: the whole microsecond diadb's MJD records, in ns."""
    return int(unix_tai_us(np.array([mjd_tai]))[0]) * 1000


def update_records(kind: str, payload: dict[str, Any]) -> list[ApdbUpdateRecord]:
    """The reference's update records for one entry of diadb's change log.

    Positions (``ra``, ``dec``, ``midpointMjdTai``) locate a record for the PPDB; diadb records
    them with each update (NaN only for entries written before it did).
    """
    if kind == "dax_apdb":
        time_ns, order = int(payload["update_time_ns"]), int(payload["update_order"])
        return [ApdbUpdateRecord.from_json(time_ns, order, payload["record"])]
    when = float(payload["when_mjd_tai"])
    time_ns = _time_ns(when)
    nan = float("nan")
    out: list[ApdbUpdateRecord] = []
    if kind == "set_validity_end":
        objects = payload.get("objects") or [{"diaObjectId": i} for i in payload["diaObjectIds"]]
        for order, obj in enumerate(objects):
            out.append(
                ApdbCloseDiaObjectValidityRecord(
                    update_time_ns=time_ns,
                    update_order=order,
                    diaObjectId=int(obj["diaObjectId"]),
                    ra=float(obj.get("ra", nan)),
                    dec=float(obj.get("dec", nan)),
                    validityEndMjdTai=when,
                    nDiaSources=None,
                )
            )
        return out
    if kind == "withdraw_forced_sources":
        for order, row in enumerate(payload["rows"]):
            out.append(
                ApdbWithdrawDiaForcedSourceRecord(
                    update_time_ns=time_ns,
                    update_order=order,
                    diaObjectId=int(row["diaObjectId"]),
                    visit=int(row["visit"]),
                    detector=int(row["detector"]),
                    ra=float(row.get("ra", nan)),
                    dec=float(row.get("dec", nan)),
                    midpointMjdTai=float(row.get("midpointMjdTai", nan)),
                    timeWithdrawnMjdTai=float(row["timeWithdrawnMjdTai"]),
                )
            )
        return out
    rows: list[dict[str, Any]] = payload["rows"]
    for order, row in enumerate(rows):
        where: dict[str, Any] = {
            "update_time_ns": time_ns,
            "update_order": order,
            "diaSourceId": int(row["diaSourceId"]),
            "ra": float(row.get("ra", nan)),
            "dec": float(row.get("dec", nan)),
            "midpointMjdTai": float(row.get("midpointMjdTai", nan)),
        }
        if kind == "reassign_sources":
            out.append(ApdbReassignDiaSourceToDiaObjectRecord(**where, diaObjectId=int(row["diaObjectId"])))
        elif kind == "reassign_to_ssobjects":
            out.append(
                ApdbReassignDiaSourceToSSObjectRecord(
                    **where,
                    ssObjectId=int(row["ssObjectId"]),
                    ssObjectReassocTimeMjdTai=float(row["ssObjectReassocTimeMjdTai"]),
                )
            )
        elif kind == "withdraw_sources":
            out.append(
                ApdbWithdrawDiaSourceRecord(**where, timeWithdrawnMjdTai=float(row["timeWithdrawnMjdTai"]))
            )
        else:
            raise ValueError(f"diadb change-log records of kind {kind!r} have no lsst.dax.apdb equivalent")
    for order, row in enumerate(payload.get("objects", []), start=len(rows)):
        out.append(
            ApdbUpdateNDiaSourcesRecord(
                update_time_ns=time_ns,
                update_order=order,
                diaObjectId=int(row["diaObjectId"]),
                ra=float(row.get("ra", nan)),
                dec=float(row.get("dec", nan)),
                nDiaSources=int(row["nDiaSources"]),
            )
        )
    return out
