"""The PPDB commands of ``diadb``: ``export`` (HATS catalogs that LSDB reads, updated from the change
log) and ``restore`` (an APDB rebuilt from an export); ``verify`` of an export directory lives here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diadb.cli_support import command, fail, with_status


def register(app: typer.Typer) -> None:
    """Add the PPDB commands to ``app``."""
    command(app, "export")(export)
    command(app, "restore")(restore)


def verify_export_directory(directory: str, as_json: bool) -> None:
    from diadb.ppdb.verify import verify_export

    try:
        report = verify_export(directory)
    except OSError as e:  # an unreadable directory or manifest
        raise fail(str(e)) from None
    for line in [report.to_json()] if as_json else report.lines():
        typer.echo(line, err=line.startswith("BAD"))
    if not report.ok:
        raise typer.Exit(code=1)


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
        result = with_status(
            "exporting",
            lambda say: export_hats(
                db, directory, region=region, options=opts, incremental=False if full else None, progress=say
            ),
        )
    kind = f"incremental ({result.chunks_applied} chunk(s))" if result.incremental else "full"
    for table, s in result.tables.items():
        typer.echo(f"{table:16s} {s['rows']:>12,d} rows {s['partitions']:>6d} partition(s)")
    typer.echo(f"{kind} export to {directory} in {result.seconds:.1f} s")


def restore(
    directory: Annotated[Path, typer.Argument(help="A PPDB export directory (diadb export).")],
    url: Annotated[str, typer.Argument(help="SQLite path or URL of the new database.")],
) -> None:
    """Rebuild an APDB from a PPDB export into a new database (disaster recovery)."""
    from diadb.ppdb.restore import restore_export

    try:
        result = with_status("restoring", lambda say: restore_export(directory, url))
    except OSError as e:  # an unreadable export, no room for the scratch files
        raise fail(str(e)) from None
    rows = ", ".join(f"{n:,} {t}" for t, n in result.rows.items())
    typer.echo(f"restored {rows} in {result.visits} visit(s) into {url}")
