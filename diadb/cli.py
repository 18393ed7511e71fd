"""The ``diadb`` command line: parse, call one library function, print, map errors to exit codes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from diadb.errors import Error

app = typer.Typer(
    help="diadb: an Alert Production Database for time-domain astronomy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@app.command()
def create(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the new database.")],
    schema: Annotated[
        Path | None, typer.Option(help="Felis YAML (default: Rubin's official apdb.yaml).")
    ] = None,
    history_months: Annotated[int, typer.Option(help="Default history window, months of 30 days.")] = 12,
) -> None:
    """Create an empty APDB."""
    from diadb.apdb import Apdb

    try:
        with Apdb.create(url, schema=schema, history_months=history_months) as db:
            typer.echo(f"created {url}: schema {db.schema.name} {db.schema.version}")
    except Error as e:
        raise _fail(str(e)) from None


@app.command()
def stats(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rows and bytes per table."""
    from diadb.apdb import Apdb

    try:
        with Apdb.open(url) as db:
            result = db.stats()
    except Error as e:
        raise _fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for table, s in result.items():
        typer.echo(f"{table:24s} {s['rows']:>12,d} rows {s['bytes'] / 1e6:>10.1f} MB")


@app.command()
def compact(url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")]) -> None:
    """Move source rows of closed time spans into history segments now."""
    from diadb.apdb import Apdb

    try:
        with Apdb.open(url) as db:
            created = db.compact()
    except Error as e:
        raise _fail(str(e)) from None
    rows = sum(s.rows for s in created)
    typer.echo(f"compacted {rows:,} rows into {len(created)} segment(s)")


@app.command()
def verify(url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")]) -> None:
    """Check every history segment's size, structure and checksum against the manifest."""
    from diadb.apdb import Apdb

    try:
        with Apdb.open(url) as db:
            problems = db.verify()
            n = len(db.segments())
    except Error as e:
        raise _fail(str(e)) from None
    for line in problems:
        typer.echo(f"BAD {line}", err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"ok: {n} segment(s) verified")


@app.command()
def prune(
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the database.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would go; change nothing.")] = False,
) -> None:
    """Drop source history older than the window plus the retention grace."""
    from diadb.apdb import Apdb

    try:
        with Apdb.open(url) as db:
            report = db.prune(dry_run=dry_run)
    except Error as e:
        raise _fail(str(e)) from None
    verb = "would drop" if dry_run else "dropped"
    for table, r in report.items():
        typer.echo(f"{table}: {verb} {r['rows']:,} rows ({r['segments']} segment(s))")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo database.")] = Path("build/demo"),
    visits: Annotated[int, typer.Option(help="Number of synthetic visits.")] = 20,
) -> None:
    """Store synthetic visits of one field into a fresh SQLite APDB and read them back."""
    try:
        report = run_demo(out, visits)
    except Error as e:
        raise _fail(str(e)) from None
    for line in report:
        typer.echo(line)


def run_demo(out: Path, n_visits: int) -> list[str]:
    """The embedded-default demo: store then read ``n_visits`` synthetic visits of one field."""
    import numpy as np
    import pyarrow as pa

    from diadb.apdb import Apdb
    from diadb.sim.fill import fill_table
    from diadb.sky.regions import Circle

    if n_visits < 1:
        raise typer.BadParameter("visits must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    rng = np.random.default_rng(42)
    lines = [f"diadb demo: {n_visits} synthetic visits of one 3.5 deg field into {path}"]
    with Apdb.create(str(path)) as db:
        field = Circle(55.0, -30.0, 1.75)
        n = 10_000  # ~1,040 variable objects per deg^2 over the 9.6 deg^2 field
        r = 1.7 * np.sqrt(rng.random(n))  # inside the 1.75 deg field despite the flat-sky approximation
        theta = rng.random(n) * 2 * np.pi
        dec = -30.0 + r * np.sin(theta)
        ra = 55.0 + r * np.cos(theta) / np.cos(np.radians(dec))
        ids = np.arange(1, n + 1, dtype=np.int64)
        spec_o, spec_s, spec_f = (db.schema.table(t) for t in ("DiaObject", "DiaSource", "DiaForcedSource"))
        reads, stores = [], []
        for v in range(1, n_visits + 1):
            mjd = 60000.0 + v * 45.0 / 86400.0
            t0 = time.perf_counter()
            objs = db.get_objects(field)
            srcs = db.get_sources(field, mjd)
            forced = db.get_forced_sources(field, mjd)
            reads.append(time.perf_counter() - t0)
            common: dict[str, Any] = {
                "ra": ra,
                "dec": dec,
                "midpointMjdTai": np.full(n, mjd),
                "visit": np.full(n, v),
                "detector": np.zeros(n, np.int16),
            }
            objects = fill_table(
                spec_o,
                n,
                rng,
                {
                    "diaObjectId": ids,
                    "ra": ra,
                    "dec": dec,
                    "validityStartMjdTai": np.full(n, mjd),
                    "validityEndMjdTai": pa.nulls(n, pa.float64()),
                    "nDiaSources": np.full(n, v, np.int32),
                },
            )
            sources = fill_table(
                spec_s,
                n,
                rng,
                {
                    **common,
                    "diaSourceId": ids * 10_000 + v,
                    "diaObjectId": ids,
                    "ssObjectId": pa.nulls(n, pa.int64()),
                },
            )
            forced_new = fill_table(
                spec_f, n, rng, {**common, "diaForcedSourceId": ids * 10_000 + v, "diaObjectId": ids}
            )
            t0 = time.perf_counter()
            db.store(mjd, objects, sources, forced_new, visit=v)
            stores.append(time.perf_counter() - t0)
        lines.append(
            f"last read: {objs.num_rows:,} objects, {srcs.num_rows:,} sources, "
            f"{forced.num_rows:,} forced sources"
        )
        lines.append(
            f"median read {np.median(reads):.3f} s, median store {np.median(stores):.3f} s per visit"
        )
        for table, s in db.stats().items():
            lines.append(f"  {table:24s} {s['rows']:>10,d} rows {s['bytes'] / 1e6:>9.1f} MB")
    return lines


def main() -> None:
    app()


if __name__ == "__main__":
    main()
