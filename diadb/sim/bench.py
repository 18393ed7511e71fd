"""``diadb bench``: the simulated visit stream stored into diadb and, side by side, into the
reference implementation (``lsst-dax-apdb``) on the same engine, visit by visit.

Per visit, each system reads what the pipeline reads (objects in the field, then the
sources and forced sources of the history window) and stores the visit. The systems take
turns in a rotating order so that machine noise hits them alike. Reads are checked: every
system must return the same IDs as diadb, or the difference is counted and explained.
Outputs (in ``out``): ``metrics.parquet`` (one row per system, visit, table and operation),
``summary.md`` (medians, ratios, ID differences, distance to the floor), ``latency.png``
(the summary, the report and the plot are made by :mod:`diadb.sim.report`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.apdb import Apdb
from diadb.errors import ConfigError
from diadb.sim.build import build_record
from diadb.sim.floor import measure
from diadb.sim.metrics_cost import metrics_cost
from diadb.sim.model import VisitSimulator
from diadb.sim.probe import reader_memory
from diadb.sim.profiles import PROFILES as PROFILES
from diadb.sim.profiles import Profile as Profile
from diadb.sim.reference import ReadResult, ReferenceApdb, forced_key
from diadb.sim.report import TABLES, plot_latency, render_markdown, summarize
from diadb.sim.visit import Visit
from diadb.sky.regions import Region

#: The columns an association step needs (the ``--columns association`` reads).
ASSOCIATION_COLUMNS = {
    "DiaObject": ["diaObjectId", "ra", "dec", "nDiaSources", "lastDiaSourceMjdTai"],
    "DiaSource": [
        "diaSourceId",
        "diaObjectId",
        "ra",
        "dec",
        "midpointMjdTai",
        "psfFlux",
        "psfFluxErr",
        "band",
    ],
    "DiaForcedSource": ["diaObjectId", "visit", "midpointMjdTai", "psfFlux", "psfFluxErr", "band"],
}


class System(Protocol):
    name: str

    def read(self, region: Region, mjd: float) -> ReadResult: ...

    def store(self, visit: Visit) -> float: ...

    def close(self) -> None: ...


class DiadbSystem:
    """diadb's own API (Arrow out)."""

    def __init__(self, name: str, db: Apdb, columns: str, *, owner: bool = True) -> None:
        self.name = name
        self.db = db
        self.columns = columns
        #: A view shares another system's database: it reads, but neither stores nor closes.
        self.owner = owner

    def _cols(self, table: str) -> list[str] | None:
        return ASSOCIATION_COLUMNS[table] if self.columns == "association" else None

    def read(self, region: Region, mjd: float) -> ReadResult:
        seconds = {}
        t0 = time.perf_counter()
        objects = self.db.get_objects(region, columns=self._cols("DiaObject"))
        seconds["DiaObject"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sources = self.db.get_sources(region, mjd, columns=self._cols("DiaSource"))
        seconds["DiaSource"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        forced = self.db.get_forced_sources(region, mjd, columns=self._cols("DiaForcedSource"))
        seconds["DiaForcedSource"] = time.perf_counter() - t0
        return ReadResult(
            _ids(objects, "diaObjectId"),
            _ids(sources, "diaSourceId"),
            forced_key(_ids(forced, "diaObjectId"), _ids(forced, "visit")),
            seconds,
            nbytes={
                "DiaObject": objects.nbytes,
                "DiaSource": sources.nbytes,
                "DiaForcedSource": forced.nbytes,
            },
        )

    def store(self, visit: Visit) -> float:
        t0 = time.perf_counter()
        self.db.store(visit.mjd_tai, visit.objects, visit.sources, visit.forced_sources, visit=visit.visit)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.owner:
            self.db.close()


class ReferenceSystem:
    """lsst-dax-apdb on SQLite (a path), PostgreSQL or Cassandra (a URL), through its own API
    (pandas out)."""

    name = "dax_apdb"

    def __init__(self, path: Path | str, months: int, *, create: bool = True) -> None:
        self.ref = ReferenceApdb(path, months=months, create=create)

    def read(self, region: Region, mjd: float) -> ReadResult:
        return self.ref.read(region, mjd)

    def store(self, visit: Visit) -> float:
        return self.ref.store(visit.mjd_tai, visit.objects, visit.sources, visit.forced_sources)

    def close(self) -> None:
        pass


def _ids(table: pa.Table, column: str) -> npt.NDArray[np.int64]:
    return np.asarray(table.column(column).to_numpy(), dtype=np.int64)


@dataclass
class IdCheck:
    """How one system's read differed from diadb's, summed over the checked visits."""

    visits: int = 0
    identical: int = 0
    missing: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    extra: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    extra_outside_region: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))


def _compare(check: IdCheck, mine: ReadResult, theirs: ReadResult, region: Region) -> None:
    check.visits += 1
    same = True
    pairs = [
        ("DiaObject", mine.object_ids, theirs.object_ids, theirs.object_radec, theirs.object_ids),
        ("DiaSource", mine.source_ids, theirs.source_ids, theirs.source_radec, theirs.source_ids),
        ("DiaForcedSource", mine.forced_keys, theirs.forced_keys, None, None),
    ]
    for table, a, b, radec, ids in pairs:
        missing = np.setdiff1d(a, b)
        extra = np.setdiff1d(b, a)
        check.missing[table] += len(missing)
        check.extra[table] += len(extra)
        same &= not len(missing) and not len(extra)
        if len(extra) and radec is not None and ids is not None:
            where = np.isin(ids, extra)
            check.extra_outside_region[table] += int(
                (~region.contains(radec[0][where], radec[1][where])).sum()
            )
    check.identical += int(same)


@dataclass
class BenchResult:
    out: Path
    metrics: pa.Table
    summary: dict[str, Any]
    summary_path: Path
    plot_path: Path | None


def run_bench(
    profile_name: str,
    out: Path,
    *,
    compare: Sequence[str] = (),
    engine_only: bool = False,
    association_view: bool = False,
    visits: int | None = None,
    columns: str = "all",
    progress: Callable[[int, int], None] | None = None,
    url: str | None = None,
    scale: float | None = None,
    reference_url: str | None = None,
    after: str | None = None,
    history_tier: bool | None = None,
    reference_every: int | None = None,
) -> BenchResult:
    """Run one benchmark profile; see the module docstring.

    ``after``: the URL of a database made by ``diadb build`` (:mod:`diadb.sim.build`) with this
    profile and scale: the run opens it (and the reference database built beside it, for
    ``compare=("dax_apdb",)``) and goes on visit by visit from the visit after the built ones;
    ``visits`` defaults to the rest of the profile's visits (at least one). ``reference_every``:
    the compared systems read every Nth visit (and the last), instead of the profile's interval.

    ``reference_url`` puts lsst-dax-apdb on PostgreSQL (a ``postgresql://`` URL, ``schema=``
    naming its namespace) or Cassandra (a ``cassandra://`` URL); by default it shares diadb's
    PostgreSQL server when ``url`` is one (namespace ``<diadb's schema>_dax_apdb``) or diadb's
    Cassandra cluster (keyspace ``<diadb's keyspace>_dax``), else it runs on SQLite in ``out``.
    """
    if profile_name not in PROFILES:
        raise ConfigError(f"unknown profile {profile_name!r}; known: {', '.join(PROFILES)}")
    unknown = sorted(set(compare) - {"dax_apdb", "facade"})
    if unknown:
        raise ConfigError(f"unknown --compare system(s) {unknown}; known: dax_apdb, facade")
    if columns not in ("all", "association"):
        raise ConfigError(f"columns must be 'all' or 'association', got {columns!r}")
    profile = PROFILES[profile_name]
    if reference_every is not None:
        if reference_every < 1:
            raise ConfigError(f"reference_every must be >= 1, got {reference_every}")
        profile = dataclasses.replace(profile, reference_read_every=int(reference_every))
    if scale is not None:
        # Same revisit depth, a fraction of the source density (SimConfig checks the range).
        profile = dataclasses.replace(profile, sim=dataclasses.replace(profile.sim, scale=scale))
    months = 12
    built: dict[str, Any] = {}
    if after is not None:
        if engine_only or "facade" in compare or url is not None or reference_url is not None:
            raise ConfigError("--after runs on the built databases only: no --engine-only, facade, --url")
        main_db = Apdb.open(after)
        try:
            built = _check_build(main_db, profile)
        except BaseException:
            main_db.close()
            raise
    n_visits = max(1, profile.visits - built.get("visits", 0)) if visits is None else visits
    if n_visits < 1:
        raise ConfigError(f"visits must be >= 1, got {n_visits}")
    out.mkdir(parents=True, exist_ok=True)
    if after is None:
        for old in out.glob("*.db*"):
            old.unlink()
        for old in out.glob("*.history"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        # The tier as asked, else the engine's default (on for SQLite).
        tier: dict[str, Any] = {} if history_tier is None else {"history_tier": history_tier}
        main_db = Apdb.create(url or str(out / "diadb.db"), **tier)
    main = DiadbSystem("diadb", main_db, columns)
    systems: list[System] = [main]
    if association_view:
        systems.append(DiadbSystem("diadb-association-columns", main.db, "association", owner=False))
    if engine_only:
        db = Apdb.create(_sibling_url(url, "engine") or str(out / "diadb-engine.db"), history_tier=False)
        systems.append(DiadbSystem("diadb-engine-only", db, columns))
    if "dax_apdb" in compare and after is not None:
        if not built.get("reference"):
            raise ConfigError(f"{after} was built without a reference database (diadb build --reference)")
        systems.append(ReferenceSystem(built["reference"], months, create=False))
    elif "dax_apdb" in compare:
        systems.append(ReferenceSystem(_reference_location(out, url, reference_url), months))
    if "facade" in compare:
        # diadb driven through its lsst.dax.apdb drop-in: what a pipeline sees after the switch.
        from diadb.compat.bench_system import FacadeSystem

        systems.append(FacadeSystem(out / "facade.db", months))
    simulator = VisitSimulator(profile.sim, main.db.schema)
    simulator.skip(int(built.get("visits", 0)))  # the built visits' state, without their tables
    rows: list[dict[str, Any]] = []
    checks = {s.name: IdCheck() for s in systems[1:] if s.name != "diadb-association-columns"}
    floor: list[dict[str, Any]] = []
    compared = len(systems) > 1 and any(s.name != "diadb-association-columns" for s in systems[1:])
    try:
        for done, visit in enumerate(simulator.visits(n_visits), start=1):
            order = systems[done % len(systems) :] + systems[: done % len(systems)]
            results: dict[str, ReadResult] = {}
            for system in order:
                if system is not main and done % profile.reference_read_every and done != n_visits:
                    continue
                result = system.read(visit.region, visit.mjd_tai)
                results[system.name] = result
                for table, seconds in result.seconds.items():
                    n = {"DiaObject": result.object_ids, "DiaSource": result.source_ids}.get(table)
                    count = len(n) if n is not None else len(result.forced_keys)
                    rows.append(_row(system.name, visit.visit, table, "select", seconds, count))
            for system in order:
                if isinstance(system, DiadbSystem) and not system.owner:
                    continue
                seconds = system.store(visit)
                rows.append(_row(system.name, visit.visit, "all", "store", seconds, _stored(visit)))
            for name, check in checks.items():
                if name in results:
                    _compare(check, results["diadb"], results[name], visit.region)
            # The floor of each compared read (every read with no system to compare to: a tenth).
            every = profile.reference_read_every if compared else max(1, n_visits // 10)
            if done % every == 0 or done == n_visits:
                mine = results["diadb"]
                counts = {
                    "DiaObject": len(mine.object_ids),
                    "DiaSource": len(mine.source_ids),
                    "DiaForcedSource": len(mine.forced_keys),
                }
                readings = measure(
                    main.db,
                    visit.visit,
                    visit.region,
                    visit.mjd_tai,
                    months,
                    mine.seconds,
                    mine.nbytes,
                    counts,
                )
                floor += [r.as_dict() for r in readings]
            if progress is not None:
                progress(done, n_visits)
            last = visit
        sizes = {s.name: _size(s) for s in systems}
    finally:
        for system in systems:
            system.close()
    metrics = pa.Table.from_pylist(rows)
    summary = summarize(
        profile.name,
        dataclasses.asdict(profile.sim),
        n_visits,
        columns,
        metrics,
        {k: dataclasses.asdict(v) for k, v in checks.items()},
        floor,
        sizes,
    )
    summary["reader_memory"] = reader_memory(main.db.url, last.region, last.mjd_tai)
    with Apdb.open(main.db.url) as reopened:
        summary["metrics_cost"] = metrics_cost(reopened, last.region, last.mjd_tai)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    import pyarrow.parquet as pq

    pq.write_table(metrics, out / "metrics.parquet")
    plot_path = plot_latency(metrics, out / "latency.png", profile.name)
    summary_path = out / "summary.md"
    summary_path.write_text(render_markdown(summary))
    return BenchResult(out, metrics, summary, summary_path, plot_path)


def _sibling_url(url: str | None, suffix: str) -> str | None:
    """A namespace beside ``url``'s on the same server (``<schema>_<suffix>`` on PostgreSQL,
    ``<keyspace>_<suffix>`` on Cassandra), so that diadb's variants are measured on one engine;
    None for an embedded database."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if url is None or not url.startswith(("postgresql", "cassandra")):
        return None
    parts = urlsplit(url)
    if url.startswith("cassandra"):
        keyspace = parts.path.lstrip("/")[: 47 - len(suffix)] + "_" + suffix
        return urlunsplit(parts._replace(path="/" + keyspace))
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = dict(query).get("schema") or "public"
    query = [(k, v) for k, v in query if k != "schema"] + [("schema", f"{schema}_{suffix}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _check_build(db: Apdb, profile: Profile) -> dict[str, Any]:
    """The build record of ``db``, checked against the profile the run continues."""
    record = build_record(db)
    mine = {"profile": profile.name, "scale": profile.sim.scale, "seed": profile.sim.seed}
    theirs = {k: record.get(k) for k in mine}
    if theirs != mine:
        raise ConfigError(f"{db.url} was built with {theirs}, not {mine}: the streams would differ")
    return record


def _reference_location(out: Path, url: str | None, reference_url: str | None) -> Path | str:
    """Where lsst-dax-apdb runs: ``reference_url``; or diadb's PostgreSQL server (Cassandra
    cluster), in a namespace (keyspace) of its own; or a SQLite file in ``out``."""
    if reference_url is not None:
        if not reference_url.startswith(("postgresql", "cassandra")):
            raise ConfigError(
                f"the reference URL must be postgresql://... or cassandra://..., got {reference_url!r}"
            )
        return reference_url
    if url is not None and url.startswith("cassandra"):
        from urllib.parse import urlsplit, urlunsplit

        # Same cluster, keyspace <diadb's>_dax, without diadb's own options.
        sibling = _sibling_url(url, "dax")
        assert sibling is not None
        return urlunsplit(urlsplit(sibling)._replace(query="", fragment=""))
    if url is not None and url.startswith("postgresql"):
        return _sibling_url(url, "dax_apdb") or out / "dax_apdb.db"
    return out / "dax_apdb.db"


def _row(system: str, visit: int, table: str, op: str, seconds: float, rows: int) -> dict[str, Any]:
    return {"system": system, "visit": visit, "table": table, "op": op, "seconds": seconds, "rows": rows}


def _stored(visit: Visit) -> int:
    return int(visit.objects.num_rows + visit.sources.num_rows + visit.forced_sources.num_rows)


def _size(system: System) -> dict[str, Any]:
    if isinstance(system, DiadbSystem):
        return system.db.stats()
    if isinstance(system, ReferenceSystem):
        return {"file_bytes": system.ref.size_bytes()}
    return {}
