"""The ``diadb`` command line: parse, call one library function, print, map errors to exit codes.

Every command is registered through :func:`_command`: a ``diadb.Error`` it raises, whatever the
command, is one line on stderr and exit status 2 (no traceback). A failed check (``verify``) exits
with 1.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from diadb.cli_admin import register as register_admin
from diadb.cli_ppdb import register as register_ppdb
from diadb.cli_ppdb import verify_export_directory
from diadb.cli_support import command, fail, in_terminal, with_status

app = typer.Typer(
    help="diadb: an Alert Production Database for time-domain astronomy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


_fail = fail
_command = command(app)


@_command
def create(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the new database.")],
    schema: Annotated[
        Path | None, typer.Option(help="Felis YAML (default: Rubin's official apdb.yaml).")
    ] = None,
    history_months: Annotated[int, typer.Option(help="Default history window, months of 30 days.")] = 12,
    replication_factor: Annotated[
        int | None, typer.Option(help="Cassandra: the keyspace's replication factor (URL option rf).")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="An engine option KEY=VALUE added to the URL (repeatable), e.g. partition_days=30 "
            "(PostgreSQL), compression=lz4 or time_partition_days=30 (Cassandra)."
        ),
    ] = None,
) -> None:
    """Create an empty APDB, with the server options an operator sets (replication factor, engine
    and table options; they are frozen into the database)."""
    from diadb.apdb import Apdb
    from diadb.backends import scheme_of

    extra: list[tuple[str, str]] = []
    if replication_factor is not None:
        if scheme_of(url) != "cassandra":
            raise _fail("--replication-factor is a Cassandra option (the URL is not cassandra://)")
        extra.append(("rf", str(replication_factor)))
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(f"--option takes KEY=VALUE, got {item!r}")
        extra.append((key, value))
    if extra:
        if "://" not in url:
            raise _fail("--option is for server URLs (postgresql://, cassandra://)")
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in extra)
        url = f"{url}{'&' if '?' in url else '?'}{query}"
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
def compact(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")],
    follow: Annotated[
        bool, typer.Option(help="Keep running beside the pipeline: compact each span as it closes.")
    ] = False,
    every: Annotated[float, typer.Option(help="With --follow: seconds between checks.", min=0.1)] = 60.0,
) -> None:
    """Move source rows of closed time spans into history segments, refresh the DiaObject snapshot.
    With --follow this is the compaction job of a server database (one at a time: it holds the
    engine's compaction lock or lease while it works); stop it with Ctrl-C or SIGTERM."""
    from diadb.apdb import Apdb

    if follow:
        # A job supervisor stops the job with SIGTERM: handled as Ctrl-C (a background shell
        # may have started it with SIGINT ignored).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    with Apdb.open(url) as db:
        try:
            _compact_loop(db, follow, every)
        except KeyboardInterrupt:  # Ctrl-C stops the job; an interrupted compaction rolled back
            if not follow:
                raise


def _compact_loop(db: Any, follow: bool, every: float) -> None:
    """One compaction, or (``follow``) one every ``every`` seconds, each reported when it did work."""
    while True:
        created = with_status("compacting", lambda say: db.compact())
        if created or not follow:
            sources = [s for s in created if s.table != "DiaObject"]
            snapshot = [s for s in created if s.table == "DiaObject"]
            line = f"compacted {sum(s.rows for s in sources):,} rows into {len(sources)} segment(s)"
            if snapshot:
                line += (
                    f"; DiaObject snapshot: {sum(s.rows for s in snapshot):,} latest versions "
                    f"in {len(snapshot)} tile segment(s) rewritten"
                )
            typer.echo(line, nl=True)
        if not follow:
            return
        time.sleep(every)


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
        verify_export_directory(url, as_json)
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
    after: Annotated[
        str | None,
        typer.Option(help="Go on after the visits of this `diadb build` database (and its reference)."),
    ] = None,
    history_tier: Annotated[
        bool | None,
        typer.Option(help="diadb with (or without) its history tier; default: the engine's default."),
    ] = None,
    reference_every: Annotated[
        int | None,
        typer.Option(help="The reference reads every Nth visit (default: the profile's, 20 for year)."),
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
            after=after,
            history_tier=history_tier,
            reference_every=reference_every,
        ),
    )
    typer.echo(result.summary_path.read_text())
    typer.echo(f"report: {result.summary_path}")
    if result.plot_path is not None:
        typer.echo(f"plot: {result.plot_path}")


@_command
def build(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database to create.")],
    profile: Annotated[str, typer.Option(help="Simulation profile: ci, demo or year.")] = "year",
    months: Annotated[float, typer.Option(help="Months (30 days) of the profile's stream to write.")] = 12.0,
    scale: Annotated[
        float | None, typer.Option(help="Override the profile's source density (fraction of full).")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="Also build lsst-dax-apdb's SQLite database of the same rows at this path."),
    ] = None,
    batch_rows: Annotated[int, typer.Option(help="Rows (all tables) per bulk-load transaction.")] = 1_000_000,
    history_tile_order: Annotated[
        int | None,
        typer.Option(help="Cut segments by HEALPix tiles of this order (-1: none; default: the engine's)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write the first MONTHS of a profile's visit stream into a new database in bulk (then
    `diadb bench --after URL` goes on visit by visit)."""
    from diadb.sim.build import build_history

    options: dict[str, Any] = {
        "months": months,
        "scale": scale,
        "reference": reference,
        "batch_rows": batch_rows,
        "config": {} if history_tile_order is None else {"history_tile_order": history_tile_order},
    }
    result = _with_progress(
        "build", lambda progress: build_history(url, profile, **options, progress=progress)
    )
    typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else result.describe())


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
    from diadb.sim.runner import save_metrics, simulate_url

    table, lines = _with_progress(
        "simulate",
        lambda progress: simulate_url(
            url,
            profile,
            visits=visits,
            mode=mode,
            workers=workers,
            clients=clients,
            scale=scale,
            after=after,
            progress=progress,
        ),
    )
    if metrics is not None:
        save_metrics(table, metrics)
    for line in lines:
        typer.echo(line)
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
    """Run ``work(progress)`` under a rich progress bar, shown only when stdout is a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        f"[bold]{label}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        disable=not in_terminal(),
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


register_ppdb(app)
register_admin(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
