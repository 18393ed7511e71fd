"""Run an export's per-partition work in this process, or on Dask workers when Dask is installed.

The work is a list of jobs; a job writes one table's data files (and index files) or margin
files for a run of partitions. Each job reads only the APDB and writes only its own files, so
jobs are independent and may run in any order, anywhere that sees the database and the export
directory. Metadata, skymaps and the manifest are written afterwards, in the calling process,
from the files.

Serial (``workers=1``, no scheduler): the jobs run here, through the caller's open database.
Parallel: ``workers=N`` runs them on a local pool of N processes (Dask's ``processes``
scheduler, plain ``dask`` suffices); ``scheduler="tcp://host:8786"`` runs them on a
``dask.distributed`` cluster, whose workers must reach the database URL and the export
directory by the same names (a server database or a shared file system). A connection cannot
travel between processes, so a worker opens the database by URL, once per thread (opening parses
the frozen Felis schema, ~0.2-1 s) and keeps it for the following jobs. Every read sees the
database as it is then (segments are listed per read), so a kept connection is not stale; a
SQLite file replaced at the same path (a new inode) is opened afresh.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from diadb.errors import BackendUnavailable
from diadb.ppdb import partition as part
from diadb.ppdb.layout import PublicationError
from diadb.ppdb.options import ExportOptions
from diadb.ppdb.writer import TableWriter

if TYPE_CHECKING:
    from diadb.apdb import Apdb
    from diadb.sky.regions import Region

#: Jobs per worker: enough that a few large partitions do not leave the other workers idle,
#: few enough that each job's fixed cost (scheduling, shipping its arguments, a table writer)
#: stays small beside the writing. The database is opened once per worker thread, not per job.
_JOBS_PER_WORKER = 4


@dataclass(frozen=True)
class Job:
    """One table's data files (``data``) or margin files (``margin``) for a run of partitions."""

    table: str
    kind: Literal["data", "margin"]
    pixels: tuple[part.Pixel, ...]
    #: Margins only: write only those whose margin holds one of these order-29 values.
    changed: part.Int64Array | None = None


def require_dask() -> Any:
    """The ``dask`` module, or a clear error when it is not installed."""
    try:
        import dask
    except ImportError:
        raise BackendUnavailable(
            "parallel export (workers > 1 or a scheduler) needs Dask: pip install 'diadb[dask]'"
        ) from None
    return dask


def is_parallel(opts: ExportOptions) -> bool:
    return opts.workers > 1 or opts.scheduler is not None


def run_jobs(
    apdb: Apdb,
    root: Path,
    region: Region | None,
    opts: ExportOptions,
    jobs: Sequence[Job],
    writers: dict[str, TableWriter],
) -> int:
    """Run the jobs (serially through ``writers``, or on Dask); returns the data rows written."""
    jobs = [j for j in jobs if j.pixels]
    if not jobs:
        return 0
    if not is_parallel(opts):
        return sum(_do(writers[j.table], j) for j in jobs)
    dask = require_dask()
    # Workers run their jobs serially: they must not start pools of their own.
    inner = replace(opts, workers=1, scheduler=None)
    # A worker's working directory may differ from ours: absolute paths.
    url = _absolute(apdb.url)
    root = root.resolve()
    if opts.scheduler is not None:
        try:
            from dask.distributed import Client
        except ImportError:
            raise BackendUnavailable(
                "a Dask scheduler address needs dask.distributed: pip install 'diadb[dask]'"
            ) from None
        connect: Any = Client  # untyped in dask.distributed
        try:
            client = connect(opts.scheduler)
        except (OSError, ValueError) as e:  # unreachable (a timeout), or not an address
            raise PublicationError(f"cannot reach the Dask scheduler {opts.scheduler}: {e}") from None
        with client:
            n = max(sum(client.nthreads().values()), 1)
            tasks = [dask.delayed(_remote)(url, root, region, inner, j) for j in _split(jobs, n)]
            results = dask.compute(*tasks, scheduler=client.get)
    else:
        tasks = [dask.delayed(_remote)(url, root, region, inner, j) for j in _split(jobs, opts.workers)]
        try:
            results = dask.compute(*tasks, scheduler="processes", num_workers=opts.workers)
        except BrokenExecutor as e:
            # A worker died (killed, out of memory): one line, not the pool's traceback.
            raise PublicationError(f"an export worker process died ({e}); the export is incomplete") from None
    return int(sum(results))


def _absolute(url: str) -> str:
    """A SQLite URL as an absolute path (a bare path is a SQLite URL); other URLs as they are."""
    from diadb.backends import locate

    files = locate(url).files
    return str(files[0]) if files else url


def _split(jobs: list[Job], workers: int) -> list[Job]:
    """Cut the jobs into about ``_JOBS_PER_WORKER * workers`` pieces of consecutive partitions."""
    total = sum(len(j.pixels) for j in jobs)
    size = max(1, -(-total // (_JOBS_PER_WORKER * workers)))
    return [replace(j, pixels=j.pixels[i : i + size]) for j in jobs for i in range(0, len(j.pixels), size)]


def _do(writer: TableWriter, job: Job) -> int:
    if job.kind == "data":
        return sum(writer.write_partition(p) for p in job.pixels)
    changed = None if job.changed is None else np.asarray(job.changed, dtype=np.int64)
    writer.write_margins(list(job.pixels), changed)
    return 0


_local = threading.local()


def _remote(url: str, root: Path, region: Region | None, opts: ExportOptions, job: Job) -> int:
    """A job on a worker, through this thread's connection to the database."""
    from diadb.ppdb.nested import writer_for

    return _do(writer_for(_worker_db(url), root, job.table, region, opts), job)


def _worker_db(url: str) -> Apdb:
    from diadb.apdb import Apdb
    from diadb.backends import locate

    key: tuple[Any, ...] = (url,)
    files = locate(url).files
    if files:
        st = os.stat(files[0])
        key = (url, st.st_dev, st.st_ino)
    cache: dict[tuple[Any, ...], Apdb] = getattr(_local, "dbs", None) or {}
    _local.dbs = cache
    if key not in cache:
        for old in [k for k in cache if k[0] == url]:
            cache.pop(old).close()
        cache[key] = Apdb.open(url)
    return cache[key]


__all__ = ["Job", "is_parallel", "require_dask", "run_jobs"]
