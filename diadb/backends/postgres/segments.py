"""PostgreSQL: history segments as immutable blobs in the engine itself.

Every client on every host sees the same history through the server it already uses: no shared
file system, nothing new to operate. One row per segment in ``diadb_segment_blob``; the column's
storage is ``EXTERNAL`` (TOAST out of line, uncompressed: a segment is uncompressed Arrow whose
floats pglz cannot shrink, and trying costs CPU on every write). A blob written inside a
compaction's transaction commits with its manifest entry, so on this engine a crash leaves no
orphan at all.

Reads fetch every blob a read needs in one statement, through the binary ``COPY`` path (no bound
parameters: the names are a transaction-local setting, see ``read.py``), and hand each out as a
zero-copy slice of the fetched Arrow column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diadb.backends.postgres.connection import Connection, params
from diadb.errors import StorageError

BLOB_TABLE = "diadb_segment_blob"
#: Segment names are diadb's own (``segment.segment_name``): checked before they go into an
#: array literal.
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def blob_ddl(conn: Connection) -> list[str]:
    """The blob table (created with the other tables of the history tier)."""
    table = conn.t(BLOB_TABLE)
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (name TEXT PRIMARY KEY, data BYTEA NOT NULL)",
        f"ALTER TABLE {table} ALTER COLUMN data SET STORAGE EXTERNAL",
    ]


def _checked(names: Sequence[str]) -> list[str]:
    for name in names:
        if not _NAME.match(name):
            raise StorageError(f"not a history segment name: {name!r}")
    return list(names)


class PostgresBlobs:
    """The :class:`~diadb.history.store.BlobEngine` of PostgreSQL."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def describe_blob(self, name: str) -> str:
        return f"{self.conn.where} {BLOB_TABLE}/{name}"

    def put_blob(self, name: str, data: pa.Buffer) -> None:
        _checked([name])
        value = pa.Array.from_buffers(
            pa.large_binary(), 1, [None, pa.array([0, data.size], pa.int64()).buffers()[1], data]
        )
        batch = pa.RecordBatch.from_arrays([pa.array([name]), value], names=["name", "data"])

        def work(cur: Any) -> None:
            cur.execute(
                f"INSERT INTO {self.conn.t(BLOB_TABLE)} (name, data) VALUES ($1, $2)", parameters=batch
            )

        self.conn.run("segment upload", work)

    def get_blobs(self, names: Sequence[tuple[str, int]]) -> list[pa.Buffer | None]:
        if not names:
            return []
        wanted = _checked([name for name, _ in names])
        sql = (
            f"SELECT name, data FROM {self.conn.t(BLOB_TABLE)} "
            "WHERE name = ANY(current_setting('diadb.p1')::text[])"
        )
        rows = self.conn.read("segment fetch", sql, {"diadb.p1": "{" + ",".join(wanted) + "}"})
        found: dict[str, pa.Buffer] = {}
        for batch in rows.to_batches():
            data = batch.column(1)
            # The column's offsets buffer, read in place: each blob is a slice of its data buffer.
            width = 8 if pa.types.is_large_binary(data.type) else 4
            kind = "<i8" if width == 8 else "<i4"
            _, offsets_buffer, body = data.buffers()
            offsets = np.frombuffer(offsets_buffer, dtype=kind, count=len(data) + data.offset + 1)[
                data.offset :
            ]
            for i, name in enumerate(batch.column(0).to_pylist()):
                start, stop = int(offsets[i]), int(offsets[i + 1])
                found[name] = body.slice(start, stop - start) if body is not None else pa.py_buffer(b"")
        return [found.get(name) for name, _ in names]

    def blob_names(self) -> list[str]:
        names: list[str] = (
            self.conn.fetch(f"SELECT name FROM {self.conn.t(BLOB_TABLE)}").column(0).to_pylist()
        )
        return names

    def delete_blobs(self, names: Sequence[str]) -> None:
        wanted = _checked(names)

        def work(cur: Any) -> None:
            cur.execute(
                f"DELETE FROM {self.conn.t(BLOB_TABLE)} WHERE name = ANY($1::text[])",
                parameters=params((pa.array(wanted, pa.string()), pa.string())),
            )

        self.conn.run("segment delete", work)
