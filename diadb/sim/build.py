"""``diadb build``: a database at depth in minutes, written in bulk instead of visit by visit.

The simulator's stream (the same model and seed as ``diadb bench``: objects with their
versions, sources, forced sources) for the first ``months`` of a profile is generated visit
after visit, columnar (each visit's tables are whole Arrow columns; no per-row Python), gathered
into batches of about ``batch_rows`` rows, and each batch written with one
:meth:`diadb.Apdb.load_history` call: one engine transaction per batch, rows of closed spans
straight into history segments, then the ordinary compaction. The database holds exactly the
rows that storing the visits one by one leaves (``tests/test_build.py``).

With ``reference``, the reference's SQLite database (``lsst-dax-apdb``) is built beside it from
the same batches (:mod:`diadb.sim.reference_load`): made by its own ``init_database``, the same
rows inserted in bulk, then ``ANALYZE``.

The build is recorded in the database's user metadata (``sim.build``: profile, scale, seed,
visits, reference), so ``diadb bench --after URL`` continues the same stream visit by visit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from diadb.apdb import Apdb
from diadb.errors import ConfigError
from diadb.sim.model import SimConfig, VisitSimulator
from diadb.sim.profiles import PROFILES, Profile
from diadb.sim.visit import Visit

#: The user-metadata key of a build's record.
BUILD_KEY = "sim.build"
TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")


@dataclass
class BuildResult:
    """What a build wrote and how long it took (seconds: ``generate`` the stream, ``diadb``
    and ``reference`` loads, ``total`` wall time)."""

    url: str
    reference: str | None
    visits: int
    batches: int
    rows: dict[str, int]
    seconds: dict[str, float]
    segments: int
    htm_computed: int = 0
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def rows_per_s(self, part: str = "total") -> float:
        seconds = self.seconds.get(part, float("nan"))
        return self.total_rows / seconds if seconds > 0 else float("nan")

    def describe(self) -> str:
        """A few lines for the command line."""
        s = self.seconds
        lines = [
            f"built {self.url}: {self.visits} visits, {self.total_rows:,} rows "
            f"({', '.join(f'{k} {v:,}' for k, v in self.rows.items())}), {self.segments} segment(s) "
            f"written, {self.batches} batch(es)",
            f"seconds: generate {s['generate']:.1f}, diadb load {s['diadb']:.1f}, reference load "
            f"{s['reference']:.1f}, total {s['total']:.1f} ({self.rows_per_s():,.0f} rows/s overall, "
            f"{self.rows_per_s('diadb'):,.0f} rows/s into diadb)",
        ]
        if self.reference:
            lines.append(f"reference: {self.reference} ({self.htm_computed:,} HTM positions computed)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_rows"] = self.total_rows
        out["rows_per_s"] = {p: self.rows_per_s(p) for p in self.seconds}
        return out


def profile_config(profile_name: str, scale: float | None) -> tuple[Profile, SimConfig]:
    """The named profile and its simulator config (``scale``: a fraction of its density)."""
    if profile_name not in PROFILES:
        raise ConfigError(f"unknown profile {profile_name!r}; known: {', '.join(PROFILES)}")
    profile = PROFILES[profile_name]
    sim = profile.sim if scale is None else dataclasses.replace(profile.sim, scale=scale)
    return profile, sim


def visits_in_months(sim: SimConfig, months: float) -> int:
    """How many visits the simulator makes in the first ``months`` (30 days each)."""
    if not months > 0:
        raise ConfigError(f"months must be > 0, got {months}")
    return math.ceil(30.0 * months - 1e-9) * sim.visits_per_night


def _batch(visits: list[Visit]) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    """The batch's visit list and its three tables, concatenated (no copy of the columns)."""
    listing = pa.table(
        {
            "visit": pa.array([v.visit for v in visits], pa.int64()),
            "visit_time": pa.array([v.mjd_tai for v in visits], pa.float64()),
        }
    )
    tables = [
        pa.concat_tables([getattr(v, name) for v in visits], promote_options="permissive")
        for name in ("objects", "sources", "forced_sources")
    ]
    return listing, tables[0], tables[1], tables[2]


def build_history(
    url: str,
    profile_name: str = "year",
    *,
    months: float = 12.0,
    scale: float | None = None,
    reference: str | Path | None = None,
    batch_rows: int = 1_000_000,
    config: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Build a new database at ``url`` holding the first ``months`` of the profile's stream
    (and, with ``reference``, the reference's SQLite database at that path); see the module
    docstring. ``config``: fields of the new database's ``ApdbConfig``. ``progress(done, total)``
    is called after each batch, in visits."""
    profile, sim_config = profile_config(profile_name, scale)
    n_visits = visits_in_months(sim_config, months)
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
    loader = None
    if reference is not None:
        from diadb.sim.reference_load import ReferenceLoader

        ref_path = Path(reference)
        if ref_path.exists():
            raise ConfigError(f"{ref_path} already exists; the reference database is built new")
        loader = ReferenceLoader(ref_path, months=12)
    t_start = time.perf_counter()
    db = Apdb.create(url, **dict(config or {}))
    seconds = {"generate": 0.0, "diadb": 0.0, "reference": 0.0}
    rows = dict.fromkeys(TABLES, 0)
    segments = batches = 0
    try:
        simulator = VisitSimulator(sim_config, db.schema)
        pending: list[Visit] = []
        pending_rows = done = 0
        for i in range(n_visits):
            t0 = time.perf_counter()
            visit = simulator.next_visit()
            seconds["generate"] += time.perf_counter() - t0
            pending.append(visit)
            pending_rows += visit.objects.num_rows + visit.sources.num_rows + visit.forced_sources.num_rows
            if pending_rows < batch_rows and i < n_visits - 1:
                continue
            t0 = time.perf_counter()
            listing, objects, sources, forced = _batch(pending)
            seconds["generate"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = db.load_history(listing, objects, sources, forced)
            seconds["diadb"] += time.perf_counter() - t0
            segments += loaded["segments"]
            for name in TABLES:
                rows[name] += loaded[name]
            if loader is not None:
                t0 = time.perf_counter()
                loader.load(objects, sources, forced)
                seconds["reference"] += time.perf_counter() - t0
            done += len(pending)
            batches += 1
            pending, pending_rows = [], 0
            del listing, objects, sources, forced
            if progress is not None:
                progress(done, n_visits)
        if loader is not None:
            t0 = time.perf_counter()
            loader.finish()
            seconds["reference"] += time.perf_counter() - t0
        record = {
            "profile": profile.name,
            "scale": sim_config.scale,
            "seed": sim_config.seed,
            "months": months,
            "visits": n_visits,
            "reference": None if reference is None else str(Path(reference).resolve()),
        }
        db.set_user_metadata({BUILD_KEY: json.dumps(record)})
    finally:
        db.close()
    seconds["total"] = time.perf_counter() - t_start
    return BuildResult(
        url=str(url),
        reference=None if reference is None else str(reference),
        visits=n_visits,
        batches=batches,
        rows=rows,
        seconds=seconds,
        segments=segments,
        htm_computed=0 if loader is None else loader.htm_computed,
        record=record,
    )


def build_record(db: Apdb) -> dict[str, Any]:
    """The build record of a database made by :func:`build_history`."""
    text = db.user_metadata().get(BUILD_KEY)
    if text is None:
        raise ConfigError(f"{db.url} was not made by 'diadb build' (no {BUILD_KEY} metadata)")
    record: dict[str, Any] = json.loads(text)
    return record
