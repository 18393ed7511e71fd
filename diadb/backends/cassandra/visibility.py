"""Which stores a read may show: each store wholly or not at all.

Cassandra has no multi-partition transactions, so a store's rows become visible one batch at a
time, and a store that fails and is never retried leaves part of its rows. What a store does
have is an order (:mod:`.store`): every row, then its change-log chunk (a lightweight
transaction whose ids are in commit order), then the visit registry (``diadb_visit``, which keeps
the chunk id of the visit/detector's first store). So a read first takes the **horizon**, the
newest chunk id (one read at the read consistency: every id a replica holds was taken after its
store's rows were acknowledged, and a process's horizons never go back), and then shows a
row only if the store that wrote it (the visit/detector it was stored under, which every row
records in two hidden columns: a reference store's rows may be of other visits) is registered
with a chunk at or below the horizon:

- such a store had every row acknowledged before its chunk was taken, hence before the read
  began, so the read finds all of them (at the write and read consistency levels in use);
- a store whose chunk is newer, or that has none yet (in progress, or failed and not retried),
  is not shown at all, even if it completes while the read runs.

No clock is compared. A complete store stays complete, so the (visit, detector) -> chunk map is
cached for the process: after its first read of a field, a process asks the registry only about
stores it has not seen (a few per visit). Registry entries from before the change log have no
chunk id and count as complete.

Keyed stores (``store(key=...)``: several may share a visit/detector, each appending) record
instead their own store id, a 63-bit hash of the key, with the detector ``KEYED_STORE``; each is
registered with its chunk in ``diadb_keyed_store`` once complete, so a second keyed store of a
visit/detector already shown is hidden until it is complete too. (Keyed stores written before
this recorded their visit/detector, and are shown with its first store.)

An object that a store moves to another pixel keeps its old latest row until the store is
complete: the store marks that row as its own (its detector shifted by ``MOVED``) instead of
deleting it, and deletes it only after registering. A read treats a marked row as its store's:
while the store is not shown, the row stands for the object's previous version (as any hidden
object row does); once it is shown, the row is dropped (the object lives at its new place).

Not covered (README): daytime updates are not single steps; keyspaces made before the hidden
columns are not filtered.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.cassandra.changelog import CHUNK_BITS, ChangeLog
from diadb.backends.cassandra.layout import KEYED_STORES
from diadb.backends.cassandra.session import CassandraSession, Statements

#: Visits per registry query (``visit IN ?``: one partition each, the coordinator fans out).
VISITS_PER_QUERY = 100
#: The detector recorded by the rows of a keyed store (whose visit column holds its store id):
#: no real detector (those are >= 0; -1 is a whole visit).
KEYED_STORE = -2


#: Added to the detector recorded on a moved object's old latest row (see the module docstring):
#: far below any detector, whole-visit or keyed value.
MOVED = -(1 << 20)


def moved_mark(detector: int) -> int:
    """The detector a store records on the old row of an object it moves."""
    return detector + MOVED


def keyed_store_id(key: str) -> int:
    """The id a keyed store's rows record: the key's 63-bit blake2b (the same on a retry)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def recorded_store(visit: int, detector: int, key: str | None) -> tuple[int, int]:
    """The (visit, detector) pair a store's rows record in their hidden columns."""
    return (visit, detector) if key is None else (keyed_store_id(key), KEYED_STORE)


class Visibility:
    """The horizon of a read, and which rows it may show (see the module docstring)."""

    def __init__(self, session: CassandraSession, log: ChangeLog) -> None:
        self.session = session
        self.log = log
        # (visit, detector) -> the chunk id of its first store (0: registered before the log).
        self._chunks: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        # The newest horizon this process has used or chunk it has taken, and its bucket.
        self._seen = 0
        self._bucket: int | None = None

    def horizon(self) -> int:
        """The newest chunk id, read before a read's rows; never older than one this process
        has seen or taken (so it reads its own stores, and never hides a store it showed)."""
        newest = self._newest_chunk_id()
        with self._lock:
            self._seen = max(self._seen, newest)
            return self._seen

    def _newest_chunk_id(self) -> int:
        """The newest chunk id committed (0 before the first), read at the read consistency, not
        ``SERIAL``: any id a replica holds was taken after its operation's rows were
        acknowledged, so a read may show it, and at QUORUM every completed id is seen. Not
        linearizable (a lagging replica gives an older id): :meth:`horizon` keeps it monotonic."""
        b = self._bucket if self._bucket is not None else self.log.newest_bucket()
        stmt = self.session.prepare(
            f"SELECT bucket, last_id FROM {self.session.t('diadb_chunk')} WHERE bucket = ? LIMIT 1"
        )
        while True:
            (rows,) = self.session.run([(stmt, (b,))], write=False)
            last = None if not rows or rows[0][1] is None else int(rows[0][1])
            if last is not None and last >= ((b + 1) << CHUNK_BITS) - 1:
                b += 1  # the bucket is full: the newest ids are in the next one
                continue
            self._bucket = b
            return max(0, (b << CHUNK_BITS) - 1) if last is None else last

    def remember(self, visit: int, detector: int, chunk: int) -> None:
        """A store this process just completed (no registry lookup needed for it)."""
        with self._lock:
            self._chunks.setdefault((int(visit), int(detector)), int(chunk))
            self._seen = max(self._seen, int(chunk))

    def shown(self, visits: np.ndarray, detectors: np.ndarray, horizon: int) -> np.ndarray | None:
        """A mask of the rows whose store is complete at ``horizon``; None when all are."""
        if not len(visits):
            return None
        pairs = pa.table({"v": pa.array(visits, pa.int64()), "d": pa.array(detectors, pa.int64())})
        distinct = pairs.group_by(["v", "d"]).aggregate([])
        uv = np.asarray(distinct.column("v").to_numpy(), dtype=np.int64)
        ud = np.asarray(distinct.column("d").to_numpy(), dtype=np.int64)
        self._look_up(uv, ud)
        with self._lock:
            chunks = self._chunks
            ok = np.fromiter(
                (
                    chunks.get((v, d), horizon + 1) <= horizon
                    or (d != KEYED_STORE and chunks.get((v, -1), horizon + 1) <= horizon)
                    for v, d in zip(uv.tolist(), ud.tolist(), strict=True)
                ),
                dtype=bool,
                count=len(uv),
            )  # one test per distinct store, not per row
        if ok.all():
            return None
        # Only the rows of the few stores not shown are looked at closely.
        hidden_v = uv[~ok]
        mask = np.ones(len(visits), dtype=bool)
        suspect = np.flatnonzero(np.isin(visits, hidden_v))
        if len(suspect):
            hidden = pa.table({"v": pa.array(hidden_v), "d": pa.array(ud[~ok])})
            rows = pa.table(
                {
                    "v": pa.array(np.asarray(visits)[suspect], pa.int64()),
                    "d": pa.array(np.asarray(detectors)[suspect], pa.int64()),
                    "i": pa.array(suspect),
                }
            )
            gone = rows.join(hidden, keys=["v", "d"], join_type="left semi").column("i")
            mask[np.asarray(gone.to_numpy(), dtype=np.int64)] = False
        return mask

    def _look_up(self, visits: np.ndarray, detectors: np.ndarray) -> None:
        """Ask the registry about the stores not known complete yet (one query per 100 visits)."""
        with self._lock:
            pairs = [
                (v, d)
                for v, d in zip(visits.tolist(), detectors.tolist(), strict=True)
                if (v, d) not in self._chunks and (d == KEYED_STORE or (v, -1) not in self._chunks)
            ]
        unknown = sorted({v for v, d in pairs if d != KEYED_STORE})
        keyed = sorted({v for v, d in pairs if d == KEYED_STORE})
        if not unknown and not keyed:
            return
        visits_stmt = self.session.prepare(
            f"SELECT visit, detector, chunk_id FROM {self.session.t('diadb_visit')} WHERE visit IN ?"
        )
        statements: Statements = [(visits_stmt, (ids,)) for ids in _in_groups(unknown)]
        n_visits = len(statements)
        if keyed:
            # Rows of a keyed store exist only once its writer made this table.
            keyed_stmt = self.session.prepare(
                f"SELECT store_id, chunk_id FROM {self.session.t(KEYED_STORES)} WHERE store_id IN ?",
                table_may_be_new=True,
            )
            statements += [(keyed_stmt, (ids,)) for ids in _in_groups(keyed)]
        results = self.session.run(statements, write=False)
        found = [tuple(r) for rs in results[:n_visits] for r in rs]
        found += [(r[0], KEYED_STORE, r[1]) for rs in results[n_visits:] for r in rs]
        with self._lock:
            for visit, detector, chunk in found:
                self._chunks.setdefault((int(visit), int(detector)), 0 if chunk is None else int(chunk))


def _in_groups(values: list[int]) -> list[list[int]]:
    """``values`` in lists of at most ``VISITS_PER_QUERY`` (one ``IN ?`` query each)."""
    return [values[i : i + VISITS_PER_QUERY] for i in range(0, len(values), VISITS_PER_QUERY)]


def unmark_moved(data: pa.Table, detector_column: str) -> tuple[pa.Table, np.ndarray | None]:
    """``data`` with the marks of moved objects' old rows taken off their detector (so their
    store is looked up), and which rows were marked (None: none)."""
    column = data.column(detector_column)
    marked = pc.fill_null(pc.less(column, MOVED // 2), False)
    if not pc.any(marked).as_py():
        return data, None
    real = pc.if_else(marked, pc.subtract(column, pa.scalar(MOVED, column.type)), column)
    index = data.schema.get_field_index(detector_column)
    moved = np.asarray(marked.to_numpy(zero_copy_only=False), dtype=bool)
    return data.set_column(index, data.schema.field(index), real), moved


def rows_shown(
    visibility: Visibility, data: pa.Table, visit_column: str, detector_column: str, horizon: int
) -> np.ndarray | None:
    """:meth:`Visibility.shown` of a table's rows (rows with a null store count as complete)."""
    if not data.num_rows:
        return None
    v, d = data.column(visit_column), data.column(detector_column)
    known = pc.and_(pc.is_valid(v), pc.is_valid(d))
    if not pc.all(known).as_py():
        idx = np.flatnonzero(np.asarray(known.to_numpy(zero_copy_only=False), dtype=bool))
        mask = np.ones(data.num_rows, dtype=bool)
        sub = visibility.shown(
            np.asarray(v.to_numpy(zero_copy_only=False)[idx], dtype=np.int64),
            np.asarray(d.to_numpy(zero_copy_only=False)[idx], dtype=np.int64),
            horizon,
        )
        if sub is None:
            return None
        mask[idx] = sub
        return mask
    return visibility.shown(
        np.asarray(v.to_numpy(), dtype=np.int64), np.asarray(d.to_numpy(), dtype=np.int64), horizon
    )
