"""Bulk loading of the reference implementation's SQLite database (``lsst-dax-apdb``), for
:mod:`diadb.sim.build`: the database is made by the reference's own ``init_database`` (its
tables and indexes as it makes them, through :class:`diadb.sim.reference.ReferenceApdb`), then
the rows its ``store`` would have written visit by visit are inserted in bulk, in one
transaction per batch, through ADBC (Arrow in, no per-row Python), and the tables analysed.

What its ``store`` writes, and so what is loaded here: every DiaObject version with
``validityStartMjdTai`` the visit time and ``validityEndMjdTai`` the next version's start
(null for the latest), plus its HTM index column (``pixelId``); the latest versions in
``DiaObjectLast`` (its columns only); DiaSources with ``pixelId``; DiaForcedSources as given.
The HTM index comes from the reference's own pixelization (``lsst.sphgeom``), which indexes
one position per call: it is computed once per object position and reused for the object's
later versions and its sources (in the simulator a source sits at its object's position), so
only new positions cost a call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.bulk import version_chains
from diadb.errors import StorageError
from diadb.sim.reference import ReferenceApdb

Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class _HtmCache:
    """HTM indices of positions by object id: looked up in bulk, new positions computed."""

    def __init__(self, level: int) -> None:
        from lsst.sphgeom import HtmPixelization

        self._pixelization = HtmPixelization(level)
        self._ids: Int64Array = np.zeros(0, np.int64)
        self._ra: FloatArray = np.zeros(0, np.float64)
        self._dec: FloatArray = np.zeros(0, np.float64)
        self._pix: Int64Array = np.zeros(0, np.int64)
        #: Positions indexed by the reference's scalar call (the rest came from the cache).
        self.computed = 0

    def index(self, ids: Int64Array, ra: FloatArray, dec: FloatArray) -> Int64Array:
        pix = np.zeros(len(ids), dtype=np.int64)
        pos = np.clip(np.searchsorted(self._ids, ids), 0, max(len(self._ids) - 1, 0))
        hit = np.zeros(len(ids), dtype=bool)
        if len(self._ids):
            hit = (self._ids[pos] == ids) & (self._ra[pos] == ra) & (self._dec[pos] == dec)
            pix[hit] = self._pix[pos[hit]]
        miss = np.flatnonzero(~hit)
        if miss.size:
            from lsst.sphgeom import LonLat, UnitVector3d

            # One call per distinct new position: the reference's pixelization is scalar.
            keys = np.stack([ra[miss], dec[miss]], axis=1)
            unique, inverse = np.unique(keys, axis=0, return_inverse=True)
            index = self._pixelization.index
            values = np.fromiter(
                (index(UnitVector3d(LonLat.fromDegrees(a, d))) for a, d in unique),
                dtype=np.int64,
                count=len(unique),
            )
            self.computed += len(unique)
            pix[miss] = values[inverse.reshape(-1)]
            self._remember(ids[miss], ra[miss], dec[miss], pix[miss])
        return pix

    def _remember(self, ids: Int64Array, ra: FloatArray, dec: FloatArray, pix: Int64Array) -> None:
        ids_all = np.concatenate([self._ids, ids])
        # The newest entry of an id wins (an object that moved).
        order = np.lexsort((np.arange(len(ids_all)), ids_all))
        ids_sorted = ids_all[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = ids_sorted[1:] != ids_sorted[:-1]
        keep = order[last]
        self._ids = ids_all[keep]
        self._ra = np.concatenate([self._ra, ra])[keep]
        self._dec = np.concatenate([self._dec, dec])[keep]
        self._pix = np.concatenate([self._pix, pix])[keep]


class ReferenceLoader:
    """Makes the reference's database at ``path`` (SQLite) and loads batches of visits into it."""

    def __init__(self, path: Path, months: int) -> None:
        import adbc_driver_sqlite.dbapi as dbapi

        self.path = Path(path)
        ref = ReferenceApdb(self.path, months=months, create=True)
        pixelization = ref.config.pixelization
        self._pixel_column = str(pixelization.htm_index_column)
        self._htm = _HtmCache(int(pixelization.htm_level))
        self._conn = dbapi.connect(str(self.path), autocommit=True)
        self._columns = {t: self._table_columns(t) for t in self.TABLES}

    TABLES = ("DiaObject", "DiaObjectLast", "DiaSource", "DiaForcedSource")

    def _table_columns(self, table: str) -> list[str]:
        cur = self._conn.cursor()
        try:
            cur.execute(f"PRAGMA table_info('{table}')")
            return [str(row[1]) for row in cur.fetchall()]
        finally:
            cur.close()

    @property
    def htm_computed(self) -> int:
        """Positions whose HTM index took a call of the reference's pixelization."""
        return self._htm.computed

    def _with_pixel(self, data: pa.Table, ids_column: str) -> pa.Table:
        pix = self._htm.index(
            np.asarray(data.column(ids_column).to_numpy(), np.int64),
            np.asarray(data.column("ra").to_numpy(), np.float64),
            np.asarray(data.column("dec").to_numpy(), np.float64),
        )
        return data.append_column(self._pixel_column, pa.array(pix))

    def _select(self, table: str, data: pa.Table) -> pa.Table:
        """The columns of ``data`` that the reference's table has (its store writes no others)."""
        have = set(data.column_names)
        return data.select([c for c in self._columns[table] if c in have])

    def load(self, objects: pa.Table, sources: pa.Table, forced_sources: pa.Table) -> None:
        """One batch of whole visits (the simulator's tables), newer than every row loaded."""
        chained, _, is_latest, is_first = version_chains(objects)
        chained = self._with_pixel(chained, "diaObjectId")
        firsts = pa.table(
            {
                "id": chained.column("diaObjectId").filter(pa.array(is_first)),
                "start": chained.column("validityStartMjdTai").filter(pa.array(is_first)),
            }
        )
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            cur.execute("DROP TABLE IF EXISTS temp.bulk_first")
            cur.adbc_ingest("bulk_first", firsts, mode="create", temporary=True)
            cur.execute("CREATE UNIQUE INDEX temp.bulk_first_id ON bulk_first (id)")
            # As its store does: close the open versions, replace the objects' DiaObjectLast rows.
            cur.execute(
                'UPDATE "DiaObject" SET "validityEndMjdTai" = (SELECT f.start FROM temp.bulk_first f '
                'WHERE f.id = "DiaObject"."diaObjectId") WHERE "diaObjectId" IN '
                '(SELECT id FROM temp.bulk_first) AND "validityEndMjdTai" IS NULL'
            )
            cur.execute('DELETE FROM "DiaObjectLast" WHERE "diaObjectId" IN (SELECT id FROM temp.bulk_first)')
            cur.adbc_ingest("DiaObject", self._select("DiaObject", chained), mode="append")
            latest = chained.filter(pa.array(is_latest))
            cur.adbc_ingest("DiaObjectLast", self._select("DiaObjectLast", latest), mode="append")
            if sources.num_rows:
                cur.adbc_ingest(
                    "DiaSource",
                    self._select("DiaSource", self._with_pixel(sources, "diaObjectId")),
                    mode="append",
                )
            if forced_sources.num_rows:
                cur.adbc_ingest(
                    "DiaForcedSource", self._select("DiaForcedSource", forced_sources), mode="append"
                )
            cur.execute("COMMIT")
        except Exception as e:
            try:
                cur.execute("ROLLBACK")
            except Exception as rollback:  # the load's error is what matters
                e.add_note(f"(the ROLLBACK that followed failed too: {rollback})")
            raise StorageError(f"bulk load of the reference database {self.path} failed: {e}") from e
        finally:
            cur.close()

    def finish(self) -> None:
        """``ANALYZE`` (the query planner's statistics), then close."""
        cur = self._conn.cursor()
        try:
            cur.execute("ANALYZE")
        finally:
            cur.close()
            self._conn.close()
