"""What the replica reads back from the change log: the rows each store chunk wrote, and the
update records of daytime chunks (``chunk_rows``).

Apart from :mod:`.changelog` (which writes the log) because nothing here writes, and together
they would pass 500 lines. A plain store's rows are found by its visit/detector (the SAI index
on ``visit`` of each partition table, object versions through ``diadb_chunk_object``); a keyed
store's by the primary keys it recorded as members (``diadb_chunk_member``), and a plain
store's then exclude the members of keyed stores that share its visit/detector.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.backends.cassandra.changelog import ChangeLog
from diadb.backends.cassandra.codec import q, to_arrow
from diadb.backends.cassandra.layout import BUCKET, HISTORY_TABLE, Layout, partition_table
from diadb.backends.cassandra.session import CassandraSession, Statements
from diadb.errors import StorageError
from diadb.schema.model import HEALPIX_COLUMN


class ChunkReader:
    """``chunk_rows`` of one keyspace."""

    def __init__(self, session: CassandraSession, layout: Layout, log: ChangeLog) -> None:
        self.session = session
        self.layout = layout
        self.log = log

    def chunk_rows(self, chunk_ids: Sequence[int]) -> dict[str, pa.Table]:
        """Rows written by these store chunks (``_chunk_id`` first; sources found through the SAI
        index on ``visit``, object versions through ``diadb_chunk_object``) and update records."""
        chunks = self.log.chunk_table(ids=list(chunk_ids))
        stores = chunks.filter(pc.equal(chunks.column("kind"), "store")).to_pylist()
        updates = chunks.filter(pc.equal(chunks.column("kind"), "update")).to_pylist()
        out: dict[str, pa.Table] = {}
        parts = self.layout.partition_numbers()
        members = self._members(stores)
        for table in ("DiaSource", "DiaForcedSource"):
            spec = self.layout.schema.table(table)
            types = {c.name: c.datatype for c in spec.columns}
            cols = [*spec.column_names, HEALPIX_COLUMN]
            physical = self.layout.packer.physical(table, cols)
            sel = ", ".join(q(c) for c in physical)
            statements: Statements = []
            owners: list[tuple[int, int]] = []
            visits = {int(c["chunk_id"]): self._visits(table, c, members) for c in stores}
            for p in parts[table]:
                stmt = self.session.prepare(
                    f"SELECT {sel} FROM {self.session.t(partition_table(table, p))} WHERE visit = ?"
                )
                for c in stores:
                    for visit in visits[int(c["chunk_id"])]:
                        statements.append((stmt, (visit,)))
                        owners.append((int(c["chunk_id"]), int(c["detector"])))
            pieces = []
            found: dict[int, int] = {}
            det_at = physical.index("detector")
            for (chunk, det), rows in zip(owners, self.session.run(statements, write=False), strict=True):
                mine = [r for r in rows if det == -1 or r[det_at] == det]
                if mine:
                    t = self._only_members(table, self.layout.decode(table, cols, mine), members, chunk)
                    found[chunk] = found.get(chunk, 0) + t.num_rows
                    pieces.append(
                        t.add_column(0, "_chunk_id", pa.array(np.full(t.num_rows, chunk), pa.int64()))
                    )
            self._check_complete(table, stores, members, found)
            out[table] = self._concat(pieces, types, cols)
        out[HISTORY_TABLE] = self._chunk_objects(stores, members)
        out["updates"] = self._update_records(updates)
        return out

    def _visits(
        self, table: str, chunk: Mapping[str, Any], members: Mapping[int, pa.Table | None]
    ) -> list[int]:
        """The visits whose rows hold ``table``'s rows of this store chunk: its recorded visit and,
        for a keyed store whose rows' primary key names their visit (DiaForcedSource), every visit
        its members name (a whole-visit store may carry rows of several visits)."""
        out = {int(chunk["visit"])}
        own = members.get(int(chunk["chunk_id"]))
        pk = list(self.layout.schema.table(table).primary_key)
        if own is not None and "visit" in pk[:3]:
            column = ("k1", "k2", "k3")[pk.index("visit")]
            listed = own.filter(pc.equal(own.column("tbl"), table))
            out.update(int(v) for v in pc.unique(listed.column(column)).to_pylist())
        return sorted(out)

    def _check_complete(
        self,
        table: str,
        stores: Sequence[Mapping[str, Any]],
        members: Mapping[int, pa.Table | None],
        found: Mapping[int, int],
    ) -> None:
        """StorageError when a keyed store's rows of ``table`` were not all found (its rows of a
        visit other than the one its chunk records, found by no index): never fewer rows."""
        for c in stores:
            chunk = int(c["chunk_id"])
            own = members.get(chunk)
            if own is None:
                continue
            expected = pc.sum(pc.equal(own.column("tbl"), table).cast(pa.int64())).as_py() or 0
            if found.get(chunk, 0) != expected:
                raise StorageError(
                    f"change log: store chunk {chunk} wrote {expected} {table} rows but "
                    f"{found.get(chunk, 0)} were found by visit {int(c['visit'])} (rows of one keyed "
                    f"store in several visits cannot all be found on Cassandra)"
                )

    def _concat(self, pieces: list[pa.Table], types: Mapping[str, str], cols: Sequence[str]) -> pa.Table:
        if pieces:
            return pa.concat_tables(pieces)
        empty = to_arrow(types, cols, [])
        return empty.add_column(0, "_chunk_id", pa.array([], pa.int64()))

    def _only_members(
        self, table: str, rows: pa.Table, members: Mapping[int, pa.Table | None], chunk: int
    ) -> pa.Table:
        """The rows of ``chunk`` among its visit/detector's ``rows``: a keyed store's own members;
        for a plain store, all but the members of keyed stores."""
        own = members.get(chunk)
        listed = own if own is not None else members.get(-chunk - 1)
        if listed is None:
            return rows
        listed = listed.filter(pc.equal(listed.column("tbl"), table))
        if own is None and not listed.num_rows:
            return rows
        pk = list(self.layout.schema.table(table).primary_key)
        keys = pa.table(
            {
                c: listed.column(k).cast(rows.schema.field(c).type)
                for c, k in zip(pk, ("k1", "k2", "k3"), strict=False)
            }
        )
        kind = "left semi" if own is not None else "left anti"
        return rows.join(keys, keys=pk, join_type=kind)

    def _chunk_objects(
        self, stores: list[dict[str, Any]], members: Mapping[int, pa.Table | None] | None = None
    ) -> pa.Table:
        spec = self.layout.schema.table(HISTORY_TABLE)
        types = {c.name: c.datatype for c in spec.columns}
        cols = [*spec.column_names, HEALPIX_COLUMN]
        keys_stmt = self.session.prepare(
            f'SELECT "diaObjectId", "validityStartMjdTai" FROM {self.session.t("diadb_chunk_object")} '
            "WHERE visit = ? AND detector = ?"
        )
        found = self.session.run(
            [(keys_stmt, (int(c["visit"]), int(c["detector"]))) for c in stores], write=False
        )
        for i, c in enumerate(stores):
            own = (members or {}).get(int(c["chunk_id"]))
            if own is not None:  # a keyed store: its own object versions
                objs = own.filter(pc.equal(own.column("tbl"), HISTORY_TABLE))
                found[i] = list(
                    zip(objs.column("k1").to_pylist(), objs.column("start").to_pylist(), strict=True)
                )
        physical = self.layout.packer.physical(HISTORY_TABLE, cols)
        sel = ", ".join(q(c) for c in physical)
        stmt = self.session.prepare(
            f'SELECT {sel} FROM {self.session.t(HISTORY_TABLE)} WHERE {BUCKET} = ? AND "diaObjectId" IN ?'
        )
        pieces = []
        start_at = physical.index("validityStartMjdTai")
        for c, keys in zip(stores, found, strict=True):
            if not keys:
                continue
            wanted = {(int(i), float(s)) for i, s in keys}
            ids = np.unique(np.asarray([k[0] for k in wanted], dtype=np.int64))
            buckets = self.layout.bucket(ids)
            statements: Statements = []
            for b in np.unique(buckets).tolist():
                in_bucket = ids[buckets == b]
                for part in np.array_split(in_bucket, -(-len(in_bucket) // 500)):
                    statements.append((stmt, (int(b), part.tolist())))
            rows = [r for rs in self.session.run(statements, write=False) for r in rs]
            id_at = physical.index("diaObjectId")
            mine = [r for r in rows if (int(r[id_at]), float(r[start_at])) in wanted]
            if mine:
                t = self.layout.decode(HISTORY_TABLE, cols, mine)
                n = t.num_rows
                pieces.append(t.add_column(0, "_chunk_id", pa.array(np.full(n, c["chunk_id"]), pa.int64())))
        return self._concat(pieces, types, cols)

    def _update_records(self, updates: list[dict[str, Any]]) -> pa.Table:
        stmt = self.session.prepare(
            f"SELECT seq, kind, payload FROM {self.session.t('diadb_update')} WHERE op = ?"
        )
        found = self.session.run([(stmt, (uuid.UUID(c["op"]),)) for c in updates], write=False)
        out: dict[str, list[Any]] = {"chunk_id": [], "seq": [], "kind": [], "payload": []}
        for c, rows in zip(updates, found, strict=True):
            for seq, kind, payload in sorted(rows, key=lambda r: int(r[0])):
                out["chunk_id"].append(int(c["chunk_id"]))
                out["seq"].append(int(seq))
                out["kind"].append(str(kind))
                out["payload"].append(str(payload))
        return pa.table(
            {
                "chunk_id": pa.array(out["chunk_id"], pa.int64()),
                "seq": pa.array(out["seq"], pa.int64()),
                "kind": pa.array(out["kind"], pa.string()),
                "payload": pa.array(out["payload"], pa.string()),
            }
        )

    def _members(self, stores: list[dict[str, Any]]) -> dict[int, pa.Table | None]:
        """Per store chunk: the rows it wrote (``tbl, k1, k2, k3, start``) when it is a keyed store;
        for a plain store, ``None`` and, under key ``-chunk_id - 1``, the members of every keyed
        store of its visit/detector (rows a plain store did not write)."""
        out: dict[int, pa.Table | None] = {}
        if not stores or "diadb_chunk_member" not in self.session.table_names():
            return out
        cols = ["tbl", "k1", "k2", "k3", "start"]
        types = {"tbl": "string", "k1": "long", "k2": "long", "k3": "long", "start": "double"}
        member_table = self.session.t("diadb_chunk_member")
        every_sql = f"SELECT {', '.join(cols)} FROM {member_table} WHERE visit = ? AND detector = ?"
        mine = self.session.prepare(every_sql + " AND op = ?")
        every = self.session.prepare(every_sql)
        results = self.session.run(
            [(mine, (int(c["visit"]), int(c["detector"]), uuid.UUID(c["op"]))) for c in stores]
            + [(every, (int(c["visit"]), int(c["detector"]))) for c in stores],
            write=False,
        )
        for i, c in enumerate(stores):
            own = to_arrow(types, cols, results[i])
            if own.num_rows:
                out[int(c["chunk_id"])] = own
            else:
                out[int(c["chunk_id"])] = None
                out[-int(c["chunk_id"]) - 1] = to_arrow(types, cols, results[len(stores) + i])
        return out
