"""Drive an APDB with simulated visits and time it, as the ap_proto prototype does.

Each visit first reads what the pipeline reads (the latest DiaObjects in the region, then the
DiaSources and DiaForcedSources of the history window before the visit time), then stores the
visit's new rows. ``mode="field"`` does this once per visit for the whole field;
``mode="detector"`` does it for each of the 189 detectors with its padded tile as the region
and ``detector=<id>`` in the store, spread over ``workers`` processes that each open their own
connection, as the pipeline's per-detector processes would. With ``clients=N`` (detector mode)
N clients run at once, as the pipeline's 189 detector processes do: each client is a thread
with its own database connection, the threads spread over ``workers`` processes (the drivers
release the GIL while they wait on the server), and all of a visit's detectors are handed out
at once; client ``c`` serves detectors ``d`` with ``d % N == c``.

Metrics: one row per visit, detector (-1 in field mode) and table, with columns

``visit``, ``detector``, ``table``
    ``table`` is ``DiaObject``, ``DiaSource`` or ``DiaForcedSource`` for a read, or ``all``
    for the whole visit/detector.
``select_s``
    Seconds of the table's read (``all``: the sum of the three reads).
``store_s``
    Seconds of the store. One transaction writes every table, so it is given on the ``all``
    row only and is null on the per-table rows.
``rows_read``, ``rows_stored``
    Rows returned by the read and rows given to the store (``all``: the sums).
``visit_wall_s``
    Wall-clock seconds of the visit's reads and stores, all detectors included (repeated on
    each of the visit's rows). Generating the visit is not counted.

The metrics table's schema metadata carries ``db_bytes``: the database's size on disk when
the run ended (for SQLite, the file plus its ``-wal`` file); with ``clients``, also ``clients``,
``errors`` (detectors whose read or store raised; they have no metric rows), ``retries``
(transactions the backend ran again after a transient failure) and ``first_error``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.apdb import Apdb
from diadb.errors import ConfigError
from diadb.sim.model import VisitSimulator
from diadb.sim.visit import Visit

TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")
ALL = "all"

METRICS_SCHEMA = pa.schema(
    [
        pa.field("visit", pa.int64(), nullable=False),
        pa.field("detector", pa.int16(), nullable=False),
        pa.field("table", pa.string(), nullable=False),
        pa.field("select_s", pa.float64(), nullable=False),
        pa.field("store_s", pa.float64()),
        pa.field("rows_read", pa.int64(), nullable=False),
        pa.field("rows_stored", pa.int64(), nullable=False),
        pa.field("visit_wall_s", pa.float64(), nullable=False),
    ]
)
#: The metric columns, in order.
METRIC_COLUMNS = tuple(METRICS_SCHEMA.names)

Mode = Literal["field", "detector"]


class _Metric(NamedTuple):
    visit: int
    detector: int
    table: str
    select_s: float
    store_s: float | None
    rows_read: int
    rows_stored: int


def _process(db: Apdb, visit: Visit) -> list[_Metric]:
    """Read what the pipeline reads for ``visit``, then store its rows; time both."""
    times: list[float] = []
    counts: list[int] = []
    for name in TABLES:
        start = time.perf_counter()
        if name == "DiaObject":
            got = db.get_objects(visit.region)
        elif name == "DiaSource":
            got = db.get_sources(visit.region, visit.mjd_tai)
        else:
            got = db.get_forced_sources(visit.region, visit.mjd_tai)
        times.append(time.perf_counter() - start)
        counts.append(got.num_rows)
    start = time.perf_counter()
    db.store(
        visit.mjd_tai,
        visit.objects,
        visit.sources,
        visit.forced_sources,
        visit=visit.visit,
        detector=visit.detector,
    )
    store_s = time.perf_counter() - start
    stored = [visit.objects.num_rows, visit.sources.num_rows, visit.forced_sources.num_rows]
    det = -1 if visit.detector is None else visit.detector
    rows = [
        _Metric(visit.visit, det, name, t, None, n, s)
        for name, t, n, s in zip(TABLES, times, counts, stored, strict=True)
    ]
    rows.append(_Metric(visit.visit, det, ALL, sum(times), store_s, sum(counts), sum(stored)))
    return rows


# Each worker process keeps one connection for the whole run.
_WORKER_DB: Apdb | None = None


def _init_worker(url: str) -> None:
    global _WORKER_DB
    _WORKER_DB = Apdb.open(url)


def _run_detector(visit: Visit) -> list[_Metric]:
    if _WORKER_DB is None:
        raise RuntimeError("worker used before _init_worker opened its database")
    return _process(_WORKER_DB, visit)


def _retries(db: Apdb) -> int:
    return int(db.counters().get("retries", 0))


#: What clients report for a visit: (metrics, error messages, transactions retried).
_Outcome = tuple[list[_Metric], list[str], int]


def _client_task(db: Apdb, parts: list[Visit]) -> _Outcome:
    """One client's detectors of a visit, in turn, on its own connection."""
    before = _retries(db)
    metrics: list[_Metric] = []
    errors: list[str] = []
    for part in parts:
        try:
            metrics.extend(_process(db, part))
        except Exception as e:
            errors.append(f"visit {part.visit} detector {part.detector}: {type(e).__name__}: {e}")
    return metrics, errors, _retries(db) - before


def _combine(outcomes: Iterable[_Outcome]) -> _Outcome:
    """(metrics, errors, retries) of several clients or processes, added up."""
    metrics: list[_Metric] = []
    errors: list[str] = []
    retries = 0
    for m, e, r in outcomes:
        metrics += m
        errors += e
        retries += r
    return metrics, errors, retries


def _client_host(url: str, n_clients: int, pipe: Connection) -> None:
    """A worker process hosting ``n_clients`` clients, one thread and one connection each.

    Protocol on ``pipe``: sends ``"ready"`` once every client is connected; then receives a
    visit's work, ``[(client, [detector parts])...]``, runs the clients at once and sends back
    ``(metrics, errors, retries)``; ``None`` ends it.
    """
    dbs: list[Apdb] = []
    try:
        for _ in range(n_clients):
            db = Apdb.open(url)
            db.contains_visit_detector(-1)  # connect now, not inside the first visit's timing
            dbs.append(db)
        pipe.send("ready")
        with ThreadPoolExecutor(max_workers=n_clients) as threads:
            while (work := pipe.recv()) is not None:
                futures = [threads.submit(_client_task, dbs[c], parts) for c, parts in work]
                pipe.send(_combine(f.result() for f in futures))
    except BaseException as e:
        pipe.send(e if isinstance(e, Exception) else RuntimeError(repr(e)))
        raise
    finally:
        for db in dbs:
            db.close()


class _ClientHosts:
    """``clients`` clients (threads, one connection each) spread over ``workers`` processes."""

    def __init__(self, url: str, clients: int, workers: int) -> None:
        workers = min(workers, clients)
        self.clients = clients
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for w in range(workers):
                mine, theirs = ctx.Pipe()
                n = len(range(w, clients, workers))
                proc = ctx.Process(target=_client_host, args=(url, n, theirs), daemon=True)
                proc.start()
                theirs.close()
                self._pipes.append(mine)
                self._procs.append(proc)
            for pipe in self._pipes:
                self._receive(pipe)
        except BaseException:
            self.close(failed=True)
            raise

    @staticmethod
    def _receive(pipe: Connection) -> Any:
        try:
            got = pipe.recv()
        except EOFError:
            raise RuntimeError("a client process died") from None
        if isinstance(got, Exception):
            raise got
        return got

    def run_visit(self, parts: list[Visit]) -> _Outcome:
        """Every detector of one visit at once; returns when all are done."""
        work: list[list[tuple[int, list[Visit]]]] = [[] for _ in range(self.workers)]
        by_client: dict[int, list[Visit]] = {}
        for part in parts:
            by_client.setdefault((part.detector or 0) % self.clients, []).append(part)
        for c, mine in sorted(by_client.items()):
            # Client c lives in process c % workers, as its (c // workers)-th thread.
            work[c % self.workers].append((c // self.workers, mine))
        for pipe, w in zip(self._pipes, work, strict=True):
            pipe.send(w)
        return _combine(self._receive(pipe) for pipe in self._pipes)

    def close(self, failed: bool = False) -> None:
        for pipe in self._pipes:
            if not failed:
                with contextlib.suppress(OSError):
                    pipe.send(None)
        for proc in self._procs:
            proc.join(timeout=None if not failed else 5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for pipe in self._pipes:
            pipe.close()


def database_bytes(url: str) -> int | None:
    """Size on disk of the database at ``url`` (SQLite: file plus ``-wal``); None if unknown."""
    from diadb.backends import locate

    files = locate(url).files
    if not files:
        return None
    db, wal = files[0], files[0].with_name(files[0].name + "-wal")
    return sum(p.stat().st_size for p in (db, wal) if p.exists())


def run(
    db: Apdb,
    simulator: VisitSimulator,
    n_visits: int,
    *,
    mode: Mode = "field",
    workers: int = 1,
    clients: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pa.Table:
    """Process the simulator's next ``n_visits`` visits against ``db``; return the metrics.

    ``progress(done, n_visits)`` is called after each visit. With ``mode="detector"`` and
    ``workers > 1`` the detectors run in that many 'spawn' processes, each opening ``db.url``.
    With ``clients`` (detector mode) that many concurrent clients, each with its own
    connection, run as threads spread over ``workers`` processes (see the module docstring).
    """
    if mode not in ("field", "detector"):
        raise ConfigError(f"mode must be 'field' or 'detector', got {mode!r}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if n_visits < 0:
        raise ConfigError(f"n_visits must be >= 0, got {n_visits}")
    if clients is not None and (mode != "detector" or clients < 1):
        raise ConfigError(f"clients needs mode 'detector' and must be >= 1, got {clients} in {mode!r}")
    if clients is not None:
        return _run_clients(db, simulator, n_visits, clients, workers, progress)
    rows: list[tuple[_Metric, float]] = []
    pool = None
    if mode == "detector" and workers > 1:
        # 'spawn' because forking a process that holds an open SQLite connection is unsafe.
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(db.url,)
        )
    failed = True
    try:
        for done, visit in enumerate(simulator.visits(n_visits), start=1):
            start = time.perf_counter()
            if mode == "field":
                got = _process(db, visit)
            elif pool is None:
                got = [m for part in visit.split_by_detector() for m in _process(db, part)]
            else:
                got = [m for part in pool.map(_run_detector, visit.split_by_detector()) for m in part]
            wall = time.perf_counter() - start
            rows.extend((m, wall) for m in got)
            if progress is not None:
                progress(done, n_visits)
        failed = False
    finally:
        if pool is not None:
            if failed:
                pool.terminate()
            else:
                pool.close()
            pool.join()
    return _metrics_with(rows, {"mode": mode, "workers": str(workers)}, db.url)


def _run_clients(
    db: Apdb,
    simulator: VisitSimulator,
    n_visits: int,
    clients: int,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> pa.Table:
    rows: list[tuple[_Metric, float]] = []
    errors: list[str] = []
    retries = 0
    hosts = _ClientHosts(db.url, clients, workers)
    failed = True
    try:
        for done, visit in enumerate(simulator.visits(n_visits), start=1):
            parts = visit.split_by_detector()
            start = time.perf_counter()
            got, errs, tries = hosts.run_visit(parts)
            wall = time.perf_counter() - start
            rows.extend((m, wall) for m in got)
            errors.extend(errs)
            retries += tries
            if progress is not None:
                progress(done, n_visits)
        failed = False
    finally:
        hosts.close(failed=failed)
    meta = {
        "mode": "detector",
        "workers": str(hosts.workers),
        "clients": str(clients),
        "errors": str(len(errors)),
        "retries": str(retries),
        "first_error": errors[0] if errors else "",
    }
    return _metrics_with(rows, meta, db.url)


def _metrics_with(rows: list[tuple[_Metric, float]], meta: dict[str, str], url: str) -> pa.Table:
    """The metrics table, with ``meta`` and the database's size on disk as schema metadata."""
    size = database_bytes(url)
    if size is not None:
        meta["db_bytes"] = str(size)
    return _metrics_table(rows).replace_schema_metadata(meta)


def _metrics_table(rows: list[tuple[_Metric, float]]) -> pa.Table:
    columns: dict[str, list[object]] = {name: [] for name in METRIC_COLUMNS}
    for metric, wall in rows:
        for name, value in zip(_Metric._fields, metric, strict=True):
            columns[name].append(value)
        columns["visit_wall_s"].append(wall)
    return pa.Table.from_pydict(columns, schema=METRICS_SCHEMA)


def save_metrics(table: pa.Table, path: str | Path) -> None:
    """Write the metrics as Parquet (``.parquet``/``.pq``, keeps ``db_bytes``) or CSV (``.csv``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        raise ConfigError(f"metrics path must end in .parquet, .pq or .csv, got {path.name!r}")


def summarize(table: pa.Table) -> dict[str, float]:
    """Medians of the metrics, keyed ``"<table>.<metric>"`` (e.g. ``"DiaSource.select_s"``).

    Also ``visits`` (how many), ``visit_wall_s`` (median over visits) and, when recorded,
    ``db_bytes``. In detector mode the per-table medians are over every detector of every visit.
    """
    out: dict[str, float] = {}
    for name in (*TABLES, ALL):
        part = table.filter(pc.equal(table.column("table"), name))
        for metric in ("select_s", "store_s", "rows_read", "rows_stored"):
            values = part.column(metric).drop_null().to_numpy()
            if len(values):
                out[f"{name}.{metric}"] = float(np.median(values))
    visits = table.select(["visit", "visit_wall_s"]).group_by("visit").aggregate([("visit_wall_s", "max")])
    out["visits"] = float(visits.num_rows)
    if visits.num_rows:
        out["visit_wall_s"] = float(np.median(visits.column("visit_wall_s_max").to_numpy()))
    meta: Mapping[bytes, bytes] = table.schema.metadata or {}
    for key in ("db_bytes", "clients", "errors", "retries"):
        if key.encode() in meta:
            out[key] = float(meta[key.encode()])
    return out


def simulate_url(
    url: str,
    profile_name: str,
    *,
    visits: int | None = None,
    mode: str = "field",
    workers: int = 1,
    clients: int | None = None,
    scale: float | None = None,
    after: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pa.Table, list[str]]:
    """``diadb simulate``: :func:`run` on a new database at ``url`` (or, with ``after``, one that
    holds the profile's first ``after`` visits); the metrics and the report's lines (medians, and
    the rows given to the stores against the rows the database gained)."""
    import dataclasses

    from diadb.sim.profiles import PROFILES

    if profile_name not in PROFILES:
        raise ConfigError(f"unknown profile {profile_name!r}; known: {', '.join(PROFILES)}")
    if mode not in ("field", "detector"):
        raise ConfigError(f"mode must be field or detector, got {mode!r}")
    if after < 0:
        raise ConfigError(f"--after must be >= 0, got {after}")
    prof = PROFILES[profile_name]
    n = prof.visits if visits is None else visits
    sim_config = prof.sim if scale is None else dataclasses.replace(prof.sim, scale=scale)
    with Apdb.open(url) if after else Apdb.create(url) as db:
        before = db.stats() if after else {}
        sim = VisitSimulator(sim_config, db.schema)
        # The model's state (ids, detection history) depends on the visits before.
        sim.skip(after)
        table = run(
            db,
            sim,
            n,
            mode="field" if mode == "field" else "detector",
            workers=workers,
            clients=clients,
            progress=progress,
        )
        held = db.stats()
    lines = [f"{key:28s} {value:12.4f}" for key, value in summarize(table).items()]
    # Rows given to the stores against rows the database holds (every DiaObject version is a row;
    # sources moved to history segments count too).
    for name in TABLES:
        part = table.filter(pc.equal(table.column("table"), name))
        given = pc.sum(part.column("rows_stored")).as_py() or 0
        rows = 0
        for stats, sign in ((held, 1), (before, -1)):
            rows += sign * stats.get(name, {}).get("rows", 0)
            if name != "DiaObject":
                rows += sign * stats.get(f"{name} (history)", {}).get("rows", 0)
        lines.append(f"rows {name:23s} stored {given:>12,d}  added to database {rows:>12,d}")
    return table, lines
