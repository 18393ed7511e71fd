"""Cassandra: history segments as immutable blobs in the keyspace, and the compaction lease.

A segment is cut into parts of :data:`PART_BYTES`, each its own Cassandra partition
``(name, part)``: Cassandra handles cells of a few hundred kB to a few MB well (a mutation must
stay under half the commit-log segment, 16 MiB by default, and large cells strain the heap of a
small node), and one partition per part spreads a segment over every node, so one read fetches
all its parts concurrently from all replicas. ``diadb_segment_parts`` names every segment
written, with its part count, before its parts are written: the sweep finds orphans there.
Writes are at the session's write level (QUORUM above RF 1).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence

import pyarrow as pa

from diadb.backends.cassandra.session import CassandraSession
from diadb.errors import StorageError

BLOB_TABLE = "diadb_segment_blob"
#: The overlays: current mutable values of sources already in segments, written by daytime
#: plans (``changelog._apply_plan``) and read by reads (``history``).
SOURCE_OVERLAY = "diadb_source_overlay"
FORCED_OVERLAY = "diadb_forced_overlay"
#: The columns of an overlay entry as a daytime plan records it.
SOURCE_OVERLAY_ENTRY = ("apdb_part", "_healpix_29", "midpointMjdTai", "diaSourceId")
FORCED_OVERLAY_ENTRY = (
    "apdb_part", "_healpix_29", "midpointMjdTai", "diaObjectId", "visit", "detector", "timeWithdrawnMjdTai",
)  # fmt: skip
PARTS_TABLE = "diadb_segment_parts"
LEASE_TABLE = "diadb_lease"
#: Bytes per blob part (see the module docstring).
PART_BYTES = 1 << 20


def blob_ddl(session: CassandraSession) -> list[str]:
    t = session.t
    return [
        f"CREATE TABLE IF NOT EXISTS {t(BLOB_TABLE)} (name text, part int, data blob, "
        "PRIMARY KEY ((name, part)))",
        f"CREATE TABLE IF NOT EXISTS {t(PARTS_TABLE)} (name text PRIMARY KEY, parts int)",
        f"CREATE TABLE IF NOT EXISTS {t(LEASE_TABLE)} (name text PRIMARY KEY, owner text)",
    ]


class CassandraBlobs:
    """The :class:`~diadb.history.store.BlobEngine` of Cassandra."""

    def __init__(self, session: CassandraSession) -> None:
        self.session = session

    def describe_blob(self, name: str) -> str:
        return f"cassandra keyspace {self.session.keyspace} {BLOB_TABLE}/{name}"

    def put_blob(self, name: str, data: pa.Buffer) -> None:
        view = memoryview(data)
        parts = max(1, -(-data.size // PART_BYTES))
        index = self.session.prepare(f"INSERT INTO {self.session.t(PARTS_TABLE)} (name, parts) VALUES (?, ?)")
        self.session.run([(index, (name, parts))], write=True)
        stmt = self.session.prepare(
            f"INSERT INTO {self.session.t(BLOB_TABLE)} (name, part, data) VALUES (?, ?, ?)"
        )
        statements = [
            (stmt, (name, i, bytes(view[i * PART_BYTES : (i + 1) * PART_BYTES]))) for i in range(parts)
        ]
        self.session.run(statements, write=True)

    def get_blobs(self, names: Sequence[tuple[str, int]]) -> list[pa.Buffer | None]:
        stmt = self.session.prepare(
            f"SELECT data FROM {self.session.t(BLOB_TABLE)} WHERE name = ? AND part = ?"
        )
        plan: list[tuple[int, int]] = []  # (blob, part) of each statement
        statements = []
        for b, (name, size) in enumerate(names):
            for i in range(max(1, -(-size // PART_BYTES))):
                plan.append((b, i))
                statements.append((stmt, (name, i)))
        results = self.session.run(statements, write=False)
        out: list[bytearray | None] = [bytearray(size) for _, size in names]
        for (b, i), rows in zip(plan, results, strict=True):
            target = out[b]
            if target is None:
                continue
            if not rows:
                out[b] = None  # a part is missing: the segment is missing
                continue
            piece = rows[0][0] or b""
            start = i * PART_BYTES
            if start + len(piece) > len(target):
                out[b] = None  # longer than the manifest says: reported as missing/damaged below
                continue
            target[start : start + len(piece)] = piece
        return [None if data is None else pa.py_buffer(data) for data in out]

    def blob_names(self) -> list[str]:
        (rows,) = self.session.run(
            [(self.session.prepare(f"SELECT name FROM {self.session.t(PARTS_TABLE)}"), ())], write=False
        )
        return [r[0] for r in rows]

    def delete_blobs(self, names: Sequence[str]) -> None:
        t = self.session.t
        lookup = self.session.prepare(f"SELECT parts FROM {t(PARTS_TABLE)} WHERE name = ?")
        counts = self.session.run([(lookup, (name,)) for name in names], write=False)
        part = self.session.prepare(f"DELETE FROM {t(BLOB_TABLE)} WHERE name = ? AND part = ?")
        statements = []
        for name, rows in zip(names, counts, strict=True):
            n = int(rows[0][0]) if rows else 0
            statements += [(part, (name, i)) for i in range(n)]
        self.session.run(statements, write=True)
        index = self.session.prepare(f"DELETE FROM {t(PARTS_TABLE)} WHERE name = ?")
        self.session.run([(index, (name,)) for name in names], write=True)


class Lease:
    """A named lease in the keyspace (a lightweight transaction, at SERIAL): one holder at a
    time. A dead holder's lease expires after ``ttl_s`` (the row's TTL); one that died on this
    host (its process is gone) is broken at once."""

    def __init__(self, session: CassandraSession, name: str, ttl_s: int = 600) -> None:
        self.session = session
        self.name = name
        self.ttl_s = ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def acquire(self, wait_s: float, required: bool = True) -> bool:
        """Take the lease, waiting up to ``wait_s`` seconds for its holder to finish; False (or,
        when ``required``, a StorageError) if it is still held then."""
        t = self.session.t(LEASE_TABLE)
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            rows = list(
                self.session.execute(
                    f"INSERT INTO {t} (name, owner) VALUES (%s, %s) IF NOT EXISTS "
                    f"USING TTL {int(self.ttl_s)}",
                    [self.name, self.owner],
                )
            )
            holder = str(rows[0][2]) if rows and len(rows[0]) > 2 else ""
            # Ours already: a retry of this insert after a timeout whose first try applied.
            if rows and (bool(rows[0][0]) or holder == self.owner):
                return True
            if _dead_here(holder):
                self.session.execute(f"DELETE FROM {t} WHERE name = %s IF owner = %s", [self.name, holder])
                continue
            if time.monotonic() + delay > deadline:
                if not required:
                    return False
                raise StorageError(
                    f"the {self.name} lease of keyspace {self.session.keyspace} is held by "
                    f"{holder or 'another process'}; it expires {self.ttl_s} s after it was taken "
                    "if its holder died"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def renew(self) -> None:
        """Extend the lease by ``ttl_s``; StorageError if it is no longer this holder's (it
        expired and another took it: the caller must not commit what it prepared)."""
        t = self.session.t(LEASE_TABLE)
        rows = list(
            self.session.execute(
                f"UPDATE {t} USING TTL {int(self.ttl_s)} SET owner = %s WHERE name = %s IF owner = %s",
                [self.owner, self.name, self.owner],
            )
        )
        if not (rows and bool(rows[0][0])):
            raise StorageError(
                f"the {self.name} lease of keyspace {self.session.keyspace} expired while held "
                f"by {self.owner}; nothing was committed"
            )

    def release(self) -> None:
        t = self.session.t(LEASE_TABLE)
        self.session.execute(f"DELETE FROM {t} WHERE name = %s IF owner = %s", [self.name, self.owner])


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` (``host:pid:nonce``) names a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
