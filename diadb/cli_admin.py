"""The operators' commands of ``diadb``: ``status``, ``repair``, ``metadata``, ``chunks``, ``partitions`` and
``index``, with the meaning of ``apdb-cli``'s (``metadata``, ``replication list-chunks|delete-chunks``,
``partition show-temporal|extend-temporal|delete-temporal``, ``list-index``) on diadb's names.

Every command takes ``@label`` for a URL (see :mod:`diadb.index`); diadb errors are one line
and exit status 2 (:mod:`diadb.cli_support`); ``status`` exits with 1 when something needs action.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from diadb.cli_support import command, fail

if TYPE_CHECKING:
    from diadb.apdb import Apdb

URL = Annotated[str, typer.Argument(help="SQLite path, URL, or @label of the label index.")]
AS_JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]

metadata_app = typer.Typer(help="User metadata kept in the database (diadb's own keys protected).")
chunks_app = typer.Typer(help="The change log's chunks (what the PPDB export publishes).")
partitions_app = typer.Typer(help="Time partitions of the source tables (PostgreSQL, Cassandra).")
index_app = typer.Typer(help="The label index named by DIADB_INDEX_URI (label -> URL).")


def register(app: typer.Typer) -> None:
    """Add the operators' commands to ``app``."""
    command(app, "status")(status)
    command(app, "repair")(repair)
    for name, group in (
        ("metadata", metadata_app),
        ("chunks", chunks_app),
        ("partitions", partitions_app),
        ("index", index_app),
    ):
        app.add_typer(group, name=name)


# ---- status ----------------------------------------------------------------------------
def status(
    url: URL,
    as_json: AS_JSON = False,
    backlog_days: Annotated[
        float,
        typer.Option(
            help="Unpublished chunks older than this (days before the newest visit) need action.",
        ),
    ] = 1.0,
    partition_days: Annotated[
        float, typer.Option(help="The newest time partition must reach this many days past the newest visit.")
    ] = 7.0,
    now: Annotated[
        float | None,
        typer.Option(
            help="MJD TAI the partition check counts from (default: the newest visit).",
        ),
    ] = None,
) -> None:
    """What an operator checks: tables, history, compaction lag, change-log backlog, partitions,
    versions, config, connection. Exit status 1 when something needs action (listed)."""
    from diadb.apdb import Apdb
    from diadb.status import Thresholds, collect, render

    with Apdb.open(url) as db:
        report = collect(db, Thresholds(backlog_days, partition_days), now_mjd=now)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if report["actions"]:
        raise typer.Exit(code=1)


# ---- repair ----------------------------------------------------------------------------
def repair(
    url: URL,
    as_json: AS_JSON = False,
    min_age: Annotated[
        float, typer.Option(help="Seconds an unfinished operation must be old (younger ones may be running).")
    ] = 600.0,
) -> None:
    """Settle operations that did not finish (Cassandra: daytime calls are applied again from
    their recorded plan; a store that took its chunk is registered; one that did not has every
    row it wrote removed, and is listed, to be stored again). Exit status 1 when a store was
    removed or is left incomplete."""
    from dataclasses import asdict

    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        report = db.repair(min_age_s=min_age)
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2))
    else:
        typer.echo(
            f"completed {len(report.completed_updates)} daytime update(s), "
            f"finished {len(report.finished_stores)} store(s), "
            f"removed {len(report.removed_stores)} store(s) never completed, "
            f"{len(report.incomplete_stores)} incomplete store(s), {report.in_progress} in progress"
        )
        for key in report.removed_stores:
            typer.echo(f"REMOVED {key}: it never completed; its rows are gone; store it again")
        for key in report.incomplete_stores:
            typer.echo(f"INCOMPLETE {key}: hidden from reads; store it again to complete it")
    if report.removed_stores or report.incomplete_stores:
        raise typer.Exit(code=1)


# ---- metadata --------------------------------------------------------------------------
@command(metadata_app, "show")
def metadata_show(url: URL, as_json: AS_JSON = False) -> None:
    """Every user metadata key and value."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        values = db.user_metadata()
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    for key, value in sorted(values.items()):
        typer.echo(f"{key}: {value}")


@command(metadata_app, "get")
def metadata_get(url: URL, key: Annotated[str, typer.Argument(help="The key.")]) -> None:
    """The value of one key (exit status 1 when it is not set)."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        value = db.user_metadata().get(key)
    if value is None:
        typer.echo(f"{key} is not set", err=True)
        raise typer.Exit(code=1)
    typer.echo(value)


@command(metadata_app, "set")
def metadata_set(
    url: URL,
    key: Annotated[str, typer.Argument(help="The key (not one of diadb's own).")],
    value: Annotated[str, typer.Argument(help="The value.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a value already set.")] = False,
) -> None:
    """Set one key; a key already set is replaced only with --force."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        if not force and key in db.user_metadata():
            raise fail(f"metadata key {key!r} is already set in {db.url}; use --force to replace it")
        db.set_user_metadata({key: value})


@command(metadata_app, "delete")
def metadata_delete(url: URL, key: Annotated[str, typer.Argument(help="The key.")]) -> None:
    """Delete one key (exit status 1 when it was not set)."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        present = key in db.user_metadata()
        db.set_user_metadata({key: None})
    if not present:
        typer.echo(f"{key} was not set", err=True)
        raise typer.Exit(code=1)


# ---- chunks ----------------------------------------------------------------------------
@command(chunks_app, "list")
def chunks_list(
    url: URL,
    as_json: AS_JSON = False,
    unpublished: Annotated[bool, typer.Option("--unpublished", help="Only unpublished chunks.")] = False,
    limit: Annotated[int | None, typer.Option(help="Only the newest N chunks.")] = None,
) -> None:
    """The change log's chunks in commit order."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        table = db.replica_chunks(published=False if unpublished else None)
    if limit is not None:
        table = table.slice(max(0, table.num_rows - limit))
    rows = table.to_pylist()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    _print_chunks(rows)


@command(chunks_app, "delete")
def chunks_delete(
    url: URL,
    before: Annotated[
        float | None,
        typer.Option(help="Delete the chunks whose visit (or daytime) time is before this MJD TAI."),
    ] = None,
    all_published: Annotated[
        bool, typer.Option("--all-published", help="Delete every published chunk.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be deleted.")] = False,
    as_json: AS_JSON = False,
) -> None:
    """Delete published chunks (after the PPDB has them); the stored rows stay. Refused, with
    nothing deleted, when a chosen chunk is not published; the newest chunk always stays."""
    from diadb.apdb import Apdb

    if (before is None) == (not all_published):
        raise fail("give one of --before MJD or --all-published")
    with Apdb.open(url) as db:
        if all_published:
            ids = db.replica_chunks(published=True).column("chunk_id").to_pylist()
            gone = db.delete_chunks(ids, dry_run=dry_run) if ids else db.replica_chunks().slice(0, 0)
        else:
            gone = db.delete_chunks(before=before, dry_run=dry_run)
    rows = gone.to_pylist()
    if as_json:
        typer.echo(json.dumps({"dry_run": dry_run, "chunks": rows}, indent=2, default=str))
        return
    _print_chunks(rows)
    typer.echo(f"{len(rows)} chunk(s) {'would be deleted' if dry_run else 'deleted'}")


def _print_chunks(rows: list[dict[str, Any]]) -> None:
    typer.echo(
        f"{'chunk':>8s} {'kind':6s} {'visit':>10s} {'det':>4s} {'visit MJD':>12s} {'published':9s} stored at"
    )
    for r in rows:
        det = "-" if r["detector"] is None or r["detector"] < 0 else str(r["detector"])
        visit = "-" if r["visit"] is None else str(r["visit"])
        mjd = "-" if r["visit_mjd_tai"] is None else f"{r['visit_mjd_tai']:.5f}"
        typer.echo(
            f"{r['chunk_id']:>8d} {r['kind']:6s} {visit:>10s} {det:>4s} {mjd:>12s} "
            f"{'yes' if r['published'] else 'no':9s} {r['stored_at']}"
        )


# ---- partitions ------------------------------------------------------------------------
def _show_partitions(db: Apdb) -> None:
    shown: dict[str, list[str]] = {"DiaSource": [], "DiaForcedSource": []}
    for p in db.time_partitions():
        shown.setdefault(p.table, []).append(f"{p.name} [{p.start_mjd:g}, {p.end_mjd:g})")
    for table, parts in shown.items():
        typer.echo(f"{table}: {', '.join(parts) or 'none'}")


@command(partitions_app, "show")
def partitions_show(url: URL, as_json: AS_JSON = False) -> None:
    """The source tables' time partitions and their ranges (MJD TAI)."""
    import dataclasses

    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        if as_json:
            typer.echo(json.dumps([dataclasses.asdict(p) for p in db.time_partitions()], indent=2))
        else:
            _show_partitions(db)


@command(partitions_app, "create")
def partitions_create(
    url: URL,
    ahead: Annotated[
        int, typer.Option(help="Partitions to create beyond the one holding the newest visit (or now).")
    ] = 1,
) -> None:
    """Create the time partitions from the newest visit's (or now) to N partitions ahead."""
    from diadb.apdb import Apdb

    if ahead < 0:
        raise fail(f"--ahead must be >= 0, got {ahead}")
    with Apdb.open(url) as db:
        for name in _create_ahead(db, ahead):
            typer.echo(f"created {name}")
        _show_partitions(db)


@command(partitions_app, "drop")
def partitions_drop(
    url: URL,
    before: Annotated[float, typer.Option(help="Drop the partitions ending at or before this MJD (TAI).")],
) -> None:
    """Drop old time partitions and the rows in them."""
    from diadb.apdb import Apdb

    with Apdb.open(url) as db:
        for name in db.drop_time_partitions(before):
            typer.echo(f"dropped {name}")
        _show_partitions(db)


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
        raise fail(f"{db.url}: no time partition was made at MJD {start:g}; cannot tell their width")
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


# ---- the label index -------------------------------------------------------------------
@command(index_app, "list")
def index_list(as_json: AS_JSON = False) -> None:
    """The labels of the index and their URLs."""
    from diadb.index import read_index

    entries = read_index()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    for label, url in sorted(entries.items()):
        typer.echo(f"@{label}: {url}")


__all__ = ["register"]
