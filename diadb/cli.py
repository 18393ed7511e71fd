"""The ``diadb`` command line: parse, call one library function, print, map errors to exit codes.

Every command is registered through :func:`_command`: a ``diadb.Error`` it raises, whatever the
command, is one line on stderr and exit status 2 (no traceback). A failed check (``verify``) exits
with 1.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from diadb.errors import Error

if TYPE_CHECKING:
    from diadb.apdb import Apdb

app = typer.Typer(
    help="diadb: an Alert Production Database for time-domain astronomy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    # One line, whatever the driver's message looked like (libpq's span several).
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code=2)


F = TypeVar("F", bound=Callable[..., Any])


def _command(fn: F) -> F:
    """Register ``fn`` as a command; the ``diadb.Error`` it raises is one line and exit 2."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Error as e:
            raise _fail(str(e)) from None

    app.command()(run)
    return fn


@_command
def create(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the new database.")],
    schema: Annotated[
        Path | None, typer.Option(help="Felis YAML (default: Rubin's official apdb.yaml).")
    ] = None,
    history_months: Annotated[int, typer.Option(help="Default history window, months of 30 days.")] = 12,
) -> None:
    """Create an empty APDB."""
    from diadb.apdb import Apdb

    with Apdb.create(url, schema=schema, history_months=history_months) as db:
        typer.echo(f"created {url}: schema {db.schema.name} {db.schema.version}")


@_command
def stats(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rows and bytes per table."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        result = db.stats()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for table, s in result.items():
        typer.echo(f"{table:24s} {s['rows']:>12,d} rows {s['bytes'] / 1e6:>10.1f} MB")


@_command
def compact(url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")]) -> None:
    """Move source rows of closed time spans into history segments, refresh the DiaObject snapshot."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        created = db.compact()
    sources = [s for s in created if s.table != "DiaObject"]
    snapshot = [s for s in created if s.table == "DiaObject"]
    rows = sum(s.rows for s in sources)
    line = f"compacted {rows:,} rows into {len(sources)} segment(s)"
    if snapshot:
        line += f"; DiaObject snapshot of {snapshot[0].rows:,} latest versions"
    typer.echo(line)


@_command
def verify(
    url: Annotated[
        str, typer.Argument(help="SQLite path or URL of the database, or a PPDB export directory.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="An export's report as JSON.")] = False,
) -> None:
    """Check a database (SQLite's integrity check, and every history segment's size, structure
    and block checksums), or a published PPDB export (a directory: checksums, types,
    nullability and row counts against the Felis schema, then the rows' references, counts,
    unique ids, partitions and ranges)."""
    from diadb.apdb import Apdb

    if Path(url).is_dir():
        _verify_export(url, as_json)
        return
    with Apdb.open(url) as db:
        problems = db.verify()
        n = len(db.segments())
    for line in problems:
        typer.echo(f"BAD {line}", err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"ok: {n} segment(s) verified")


@_command
def upgrade(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")],
    schema: Annotated[Path | None, typer.Option(help="A newer Felis YAML (same major version).")] = None,
) -> None:
    """Migrate an older database in place: diadb's layout, and optionally the Felis schema."""
    from diadb.apdb import Apdb

    steps = Apdb.upgrade(url, schema)
    for step in steps or ["already up to date"]:
        typer.echo(step)


@_command
def prune(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would go; change nothing.")] = False,
) -> None:
    """Drop source history older than the window plus the retention grace."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        report = db.prune(dry_run=dry_run)
    verb = "would drop" if dry_run else "dropped"
    for table, r in report.items():
        typer.echo(f"{table}: {verb} {r['rows']:,} rows ({r['segments']} segment(s))")


@_command
def bench(
    profile: Annotated[
        str, typer.Option(help="ci (seconds), demo (minutes) or year (up to an hour).")
    ] = "demo",
    compare: Annotated[
        list[str] | None, typer.Option(help="Also run this system side by side: dax_apdb.")
    ] = None,
    engine_only: Annotated[bool, typer.Option(help="Also run diadb without its history tier.")] = False,
    association_view: Annotated[
        bool, typer.Option(help="Also time diadb reading only the columns association needs.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Directory for the databases and the report.")] = Path(
        "build/bench"
    ),
    visits: Annotated[int | None, typer.Option(help="Override the profile's number of visits.")] = None,
    scale: Annotated[
        float | None, typer.Option(help="Override the profile's source density (fraction of full).")
    ] = None,
    columns: Annotated[str, typer.Option(help="Columns diadb reads: all, or association.")] = "all",
    url: Annotated[str | None, typer.Option(help="diadb database URL (default: SQLite in --out).")] = None,
    reference_url: Annotated[
        str | None,
        typer.Option(
            help="lsst-dax-apdb on PostgreSQL (schema= names its namespace) or Cassandra at this URL; "
            "default: on --url's server when that is PostgreSQL (schema <schema>_dax_apdb) or Cassandra "
            "(keyspace <keyspace>_dax), else SQLite in --out."
        ),
    ] = None,
) -> None:
    """Simulate visits into diadb (and the reference) side by side; report medians, ratios, a plot."""
    from diadb.sim.bench import run_bench

    result = _with_progress(
        "bench",
        lambda progress: run_bench(
            profile,
            out,
            compare=compare or (),
            engine_only=engine_only,
            association_view=association_view,
            visits=visits,
            scale=scale,
            columns=columns,
            progress=progress,
            url=url,
            reference_url=reference_url,
        ),
    )
    typer.echo(result.summary_path.read_text())
    typer.echo(f"report: {result.summary_path}")
    if result.plot_path is not None:
        typer.echo(f"plot: {result.plot_path}")


@_command
def simulate(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of a database to create.")],
    profile: Annotated[str, typer.Option(help="Simulation profile: ci, demo or year.")] = "ci",
    visits: Annotated[int | None, typer.Option(help="Override the profile's number of visits.")] = None,
    mode: Annotated[str, typer.Option(help="field (one read+store per visit) or detector (189).")] = "field",
    workers: Annotated[int, typer.Option(help="Worker processes in detector mode.")] = 1,
    clients: Annotated[
        int | None,
        typer.Option(
            help="Detector mode: this many concurrent clients (e.g. 189), each with its own "
            "connection, as threads spread over --workers processes."
        ),
    ] = None,
    scale: Annotated[
        float | None, typer.Option(help="Override the profile's source density (fraction of full).")
    ] = None,
    metrics: Annotated[Path | None, typer.Option(help="Write per-visit metrics (.parquet or .csv).")] = None,
    after: Annotated[
        int,
        typer.Option(
            help="Continue a database that holds the first AFTER visits of the same profile and "
            "scale (e.g. one `diadb bench` filled): open it and simulate the visits that follow."
        ),
    ] = 0,
) -> None:
    """Run the visit simulator against a new database (or, with --after, one it filled before),
    as the pipeline would (ap_proto's job)."""
    import dataclasses

    import pyarrow.compute as pc

    from diadb.apdb import Apdb
    from diadb.sim.bench import PROFILES
    from diadb.sim.model import VisitSimulator
    from diadb.sim.runner import run, save_metrics, summarize

    if profile not in PROFILES:
        raise _fail(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if mode not in ("field", "detector"):
        raise _fail(f"mode must be field or detector, got {mode!r}")
    if after < 0:
        raise _fail(f"--after must be >= 0, got {after}")
    prof = PROFILES[profile]
    n = prof.visits if visits is None else visits
    sim_config = prof.sim if scale is None else dataclasses.replace(prof.sim, scale=scale)
    with Apdb.open(url) if after else Apdb.create(url) as db:
        before = db.stats() if after else {}
        sim = VisitSimulator(sim_config, db.schema)
        # The model's state (ids, detection history) depends on the visits before: replay them.
        for _ in sim.visits(after):
            pass
        table = _with_progress(
            "simulate",
            lambda progress: run(
                db,
                sim,
                n,
                mode="field" if mode == "field" else "detector",
                workers=workers,
                clients=clients,
                progress=progress,
            ),
        )
        held = db.stats()
    if metrics is not None:
        save_metrics(table, metrics)
    for key, value in summarize(table).items():
        typer.echo(f"{key:28s} {value:12.4f}")
    # Rows given to the stores against rows the database holds (every DiaObject version is a row;
    # sources moved to history segments count too).
    for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
        part = table.filter(pc.equal(table.column("table"), name))
        given = pc.sum(part.column("rows_stored")).as_py() or 0
        rows = 0
        for stats, sign in ((held, 1), (before, -1)):
            rows += sign * stats.get(name, {}).get("rows", 0)
            if name != "DiaObject":
                rows += sign * stats.get(f"{name} (history)", {}).get("rows", 0)
        typer.echo(f"rows {name:23s} stored {given:>12,d}  added to database {rows:>12,d}")
    first_error = (table.schema.metadata or {}).get(b"first_error", b"").decode()
    if first_error:
        typer.echo(f"first error: {first_error}", err=True)


@_command
def sizing(
    summary: Annotated[Path, typer.Option(help="summary.json written by diadb bench.")] = Path(
        "build/bench/summary.json"
    ),
    visits: Annotated[float | None, typer.Option(help="Project for this many visits.")] = None,
    nights: Annotated[float | None, typer.Option(help="... or nights (1,000 visits each).")] = None,
    years: Annotated[float | None, typer.Option(help="... or years (300 nights each).")] = None,
    replication: Annotated[int, typer.Option(help="Copies kept (e.g. Cassandra's replication factor).")] = 1,
) -> None:
    """Project storage from the bytes per visit a benchmark measured (at full source density)."""
    from diadb.sim.sizing import load_summary, project

    rows = project(load_summary(summary), visits=visits, nights=nights, years=years, replication=replication)
    for p in rows:
        typer.echo(f"{p.table:28s} {p.bytes_per_visit / 1e6:10.2f} MB/visit {p.total_bytes / 1e12:12.3f} TB")


def _with_progress(label: str, work: Any) -> Any:
    """Run ``work(progress)`` under a rich progress bar (plain output when not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        f"[bold]{label}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return work(progress)


@_command
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo database and report.")] = Path(
        "build/demo"
    ),
    visits: Annotated[int | None, typer.Option(help="Override the demo profile's number of visits.")] = None,
) -> None:
    """The main job on the embedded default: simulated visits into SQLite, a latency report with a
    plot, then the database published as HATS catalogs (the PPDB)."""
    import shutil

    from diadb.apdb import Apdb
    from diadb.ppdb.hats_export import export_hats
    from diadb.sim.bench import run_bench

    hats_dir = out / "hats"
    result = _with_progress("demo", lambda progress: run_bench("demo", out, visits=visits, progress=progress))
    shutil.rmtree(hats_dir, ignore_errors=True)
    with Apdb.open(str(out / "diadb.db")) as db:
        exported = export_hats(db, hats_dir)
    typer.echo(result.summary_path.read_text())
    for table, s in exported.tables.items():
        typer.echo(f"HATS {table:16s} {s['rows']:>10,d} rows {s['partitions']:>4d} partition(s)")
    typer.echo(f"database: {out / 'diadb.db'}")
    typer.echo(f"HATS export (lsdb.open_catalog reads it): {hats_dir}")
    typer.echo(f"report: {result.summary_path}")
    if result.plot_path is not None:
        typer.echo(f"plot: {result.plot_path}")


def _verify_export(directory: str, as_json: bool) -> None:
    from diadb.ppdb.verify import verify_export

    try:
        report = verify_export(directory)
    except OSError as e:  # an unreadable directory or manifest
        raise _fail(str(e)) from None
    for line in [report.to_json()] if as_json else report.lines():
        typer.echo(line, err=line.startswith("BAD"))
    if not report.ok:
        raise typer.Exit(code=1)


@_command
def export(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")],
    directory: Annotated[
        Path, typer.Argument(help="Export directory (new, or an earlier export to update).")
    ],
    region: Annotated[
        str | None, typer.Option(help='Only this part of the sky, e.g. "circle 55 -30 3" (degrees).')
    ] = None,
    max_rows: Annotated[
        int | None, typer.Option(help="Most rows in one partition file (all tables).")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Refuse to update an existing export.")] = False,
    workers: Annotated[
        int, typer.Option(help="Processes writing partitions in parallel (more than 1 needs Dask).")
    ] = 1,
    scheduler: Annotated[
        str | None,
        typer.Option(help="A dask.distributed scheduler address to write the partitions on instead."),
    ] = None,
    light_curves: Annotated[bool, typer.Option("--light-curves", help="Also light curves.")] = False,
    versions: Annotated[bool, typer.Option("--versions/--no-versions", help="Also old versions.")] = True,
) -> None:
    """Publish DiaObjects (latest, and every version), DiaSources and DiaForcedSources as HATS
    catalogs (LSDB reads them); an existing export is updated with the new change-log chunks."""
    import dataclasses

    from diadb.apdb import Apdb
    from diadb.ppdb.hats_export import ExportOptions, export_hats
    from diadb.ppdb.layout import TABLES

    opts = ExportOptions(workers=workers, scheduler=scheduler, light_curves=light_curves)
    opts = dataclasses.replace(opts, object_versions=versions)
    if max_rows is not None:
        opts = dataclasses.replace(opts, max_rows=dict.fromkeys(TABLES, max_rows))
    with Apdb.open(url) as db:
        result = export_hats(db, directory, region=region, options=opts, incremental=False if full else None)
    kind = f"incremental ({result.chunks_applied} chunk(s))" if result.incremental else "full"
    for table, s in result.tables.items():
        typer.echo(f"{table:16s} {s['rows']:>12,d} rows {s['partitions']:>6d} partition(s)")
    typer.echo(f"{kind} export to {directory} in {result.seconds:.1f} s")


@_command
def restore(
    directory: Annotated[Path, typer.Argument(help="A PPDB export directory (diadb export).")],
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the new database.")],
) -> None:
    """Rebuild an APDB from a PPDB export into a new database (disaster recovery)."""
    from diadb.ppdb.restore import restore_export

    try:
        result = restore_export(directory, url)
    except OSError as e:  # an unreadable export, no room for the scratch files
        raise _fail(str(e)) from None
    rows = ", ".join(f"{n:,} {t}" for t, n in result.rows.items())
    typer.echo(f"restored {rows} in {result.visits} visit(s) into {url}")


@_command
def partitions(
    url: Annotated[str, typer.Argument(help="URL of a PostgreSQL or Cassandra APDB.")],
    create_ahead: Annotated[
        int,
        typer.Option(
            help="Create the time partitions from the newest visit's (or now) to N partitions ahead."
        ),
    ] = 0,
    drop_before: Annotated[
        float | None, typer.Option(help="Drop the partitions that end at or before this MJD (TAI).")
    ] = None,
) -> None:
    """Manage the source tables' time partitions (PostgreSQL, Cassandra): list them, create ahead,
    drop old ones."""
    from diadb.apdb import Apdb

    if create_ahead < 0:
        raise _fail(f"--create-ahead must be >= 0, got {create_ahead}")
    with Apdb.open(url) as db:
        if create_ahead:
            for name in _create_ahead(db, create_ahead):
                typer.echo(f"created {name}")
        if drop_before is not None:
            for name in db.drop_time_partitions(drop_before):
                typer.echo(f"dropped {name}")
        shown: dict[str, list[str]] = {"DiaSource": [], "DiaForcedSource": []}
        for p in db.time_partitions():
            shown.setdefault(p.table, []).append(f"{p.name} [{p.start_mjd:g}, {p.end_mjd:g})")
        for table, parts in shown.items():
            typer.echo(f"{table}: {', '.join(parts) or 'none'}")


def _create_ahead(db: Apdb, n: int) -> list[str]:
    """Create the partitions from the one holding the newest visit (or now) to ``n`` partitions
    of the current width beyond it; the names created."""
    start = _newest_visit_mjd(db)
    created: list[str] = []
    existing = db.time_partitions()  # ConfigError on an engine without time partitions
    if not existing:
        # No partition to read the width from: make the one holding ``start`` first.
        created += db.create_time_partitions(start, start + _INSTANT_DAYS)
        existing = db.time_partitions()
    if not existing:
        raise _fail(f"{db.url}: no time partition was made at MJD {start:g}; cannot tell their width")
    newest = max(existing, key=lambda p: p.end_mjd)
    width = newest.end_mjd - newest.start_mjd
    created += db.create_time_partitions(start, start + n * width)
    return created


#: A time span shorter than any partition: [t, t + this) lies in the partition holding t.
_INSTANT_DAYS = 1e-6


def _newest_visit_mjd(db: Apdb) -> float:
    """MJD TAI of the newest stored visit, or now."""
    from diadb.times import mjd_tai

    newest = db.latest_visit_mjd()
    return mjd_tai(_dt.datetime.now(_dt.UTC).replace(tzinfo=None)) if newest is None else float(newest)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
