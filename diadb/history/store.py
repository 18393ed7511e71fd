"""Where a segment's bytes live: the segment store behind the history tier.

A segment is written once, read many times and deleted whole, so a store needs only five
operations. The tier does everything else (sorting, checksums, the manifest is the engine's):

- :class:`FileSegmentStore`, the embedded default: one file per segment in a directory beside
  the database, written durably (temporary name, fsync, rename, fsync of the directory) and
  read by memory-mapping it, so a read touches only the pages of the rows it takes, and the
  pages live in the OS page cache, shared by every process on the host.
- Server engines keep segments as immutable blobs inside the engine itself (PostgreSQL's
  ``bytea``, a Cassandra blob table), so every client on every host sees the same history with
  nothing new to operate. :class:`BlobSegmentStore` is the engine-neutral part of such a store
  (serialise to memory, check, upload; fetch many at once; a bounded cache); an engine supplies
  a :class:`BlobEngine` of four calls.

Writing is the same contract everywhere: ``write`` makes the segment durable under its name
before it returns, and a segment that no manifest entry names is deleted by the next
compaction's sweep, so a crash between the write and the manifest's commit leaves nothing
visible.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from diadb.history.blocks import CorruptSegmentError

#: Writes a segment's bytes into the sink it is given (an Arrow IPC file writer's target).
Produce = Callable[[Any], None]
#: Checks the bytes just written (the whole segment) before they are published.
CheckWritten = Callable[[pa.Buffer], None]
#: Tests only: called with a step's name before each step of a write, to crash there.
StepHook = Callable[[str], None]


@runtime_checkable
class SegmentStore(Protocol):
    """The bytes of immutable segments, by name."""

    #: Bytes of fetched segments a reader may keep between reads (None: no bound, because the
    #: store maps files and their pages belong to the OS page cache, not to the process).
    cache_bytes: int | None

    def location(self, name: str) -> str:
        """Where segment ``name`` lives, for messages (a path, or the engine and the name)."""

    def write(self, name: str, produce: Produce, check: CheckWritten, hook: StepHook) -> int:
        """Write segment ``name`` durably; returns its size in bytes."""

    def read(self, names: Sequence[tuple[str, int]]) -> list[tuple[pa.Buffer, Hashable]]:
        """The bytes of each ``(name, expected size)`` (fetched concurrently where that pays),
        and a key naming that exact copy (old whole-file checksums are remembered by it).
        Raises :class:`~diadb.history.blocks.CorruptSegmentError` for a missing segment or one
        of another size."""

    def names(self) -> list[str]:
        """Every segment present, named or not by a manifest (the sweep's input)."""

    def delete(self, names: Sequence[str]) -> None:
        """Delete these segments (absent ones are ignored)."""


# ---- files ----------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSegmentStore:
    """Segments as files in ``directory``, memory-mapped to read."""

    cache_bytes: int | None = None

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def location(self, name: str) -> str:
        return str(self.directory / name)

    def write(self, name: str, produce: Produce, check: CheckWritten, hook: StepHook) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / name
        tmp = self.directory / (name + ".tmp")
        hook("write_tmp")
        with open(tmp, "wb") as raw:
            produce(raw)
            raw.flush()
            os.fsync(raw.fileno())
        source = pa.memory_map(str(tmp), "r")
        try:
            check(source.read_buffer(source.size()))
        finally:
            source.close()
        hook("rename")
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        hook("renamed")
        return final.stat().st_size

    def read(self, names: Sequence[tuple[str, int]]) -> list[tuple[pa.Buffer, Hashable]]:
        return [self._map(name, size) for name, size in names]

    def _map(self, name: str, size_expected: int) -> tuple[pa.Buffer, Hashable]:
        path = self.directory / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise CorruptSegmentError(f"history segment {path} is missing") from None
        if stat.st_size != size_expected:
            raise CorruptSegmentError(
                f"history segment {path} has {stat.st_size} bytes, the manifest says {size_expected}"
            )
        try:
            source = pa.memory_map(str(path), "r")
            buffer = source.read_buffer(stat.st_size)
        except OSError as e:
            raise CorruptSegmentError(f"history segment {path} cannot be mapped: {e}") from e
        if buffer.size != stat.st_size:
            raise CorruptSegmentError(f"history segment {path} changed size while being mapped")
        key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        return buffer, key

    def names(self) -> list[str]:
        if not self.directory.exists():
            return []
        return [p.name for p in self.directory.iterdir()]

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            (self.directory / name).unlink(missing_ok=True)


# ---- blobs in an engine ----------------------------------------------------------------------


class BlobEngine(Protocol):
    """What a server engine offers a :class:`BlobSegmentStore`: immutable blobs by name."""

    def describe_blob(self, name: str) -> str:
        """Where blob ``name`` lives, for messages (the engine's address, never a secret)."""

    def put_blob(self, name: str, data: pa.Buffer) -> None:
        """Store ``data`` under ``name`` durably (the engine's strongest write) before returning."""

    def get_blobs(self, names: Sequence[tuple[str, int]]) -> list[pa.Buffer | None]:
        """The blobs of ``(name, size)`` pairs (None for a missing one), fetched concurrently
        (an engine that cuts a blob into parts knows from the size how many to fetch)."""

    def blob_names(self) -> list[str]:
        """Every blob present."""

    def delete_blobs(self, names: Sequence[str]) -> None:
        """Delete these blobs."""


#: Default bytes of fetched segments one reader keeps between reads (``history_cache_mb``).
DEFAULT_BLOB_CACHE_BYTES = 0


class BlobSegmentStore:
    """Segments as immutable blobs in a server engine.

    A write serialises the segment in memory (a segment is cut by sky tile and time span, so it
    is a few MB, see :mod:`diadb.history.tier`), checks the bytes, and uploads them. A read fetches
    every blob it needs in one concurrent round (``get_blobs``) and opens each from the fetched
    buffer without a copy. The tier keeps opened segments up to ``cache_bytes`` between reads
    (blobs never change, so a kept copy is never stale)."""

    def __init__(self, engine: BlobEngine, cache_bytes: int = DEFAULT_BLOB_CACHE_BYTES) -> None:
        self._engine = engine
        self.cache_bytes: int | None = max(0, int(cache_bytes))

    def location(self, name: str) -> str:
        return self._engine.describe_blob(name)

    def write(self, name: str, produce: Produce, check: CheckWritten, hook: StepHook) -> int:
        hook("write_tmp")
        sink = pa.BufferOutputStream()
        produce(sink)
        data = sink.getvalue()
        check(data)
        hook("rename")
        self._engine.put_blob(name, data)
        hook("renamed")
        return int(data.size)

    def read(self, names: Sequence[tuple[str, int]]) -> list[tuple[pa.Buffer, Hashable]]:
        fetched = self._engine.get_blobs(list(names)) if names else []
        result: list[tuple[pa.Buffer, Hashable]] = []
        for (name, size), data in zip(names, fetched, strict=True):
            if data is None:
                raise CorruptSegmentError(f"history segment {self.location(name)} is missing")
            if data.size != size:
                raise CorruptSegmentError(
                    f"history segment {self.location(name)} has {data.size} bytes, the manifest says {size}"
                )
            result.append((data, (self.location(name), size)))
        return result

    def names(self) -> list[str]:
        return self._engine.blob_names()

    def delete(self, names: Sequence[str]) -> None:
        if names:
            self._engine.delete_blobs(list(names))
