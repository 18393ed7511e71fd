"""``diadb status``: what an operator checks on a running APDB, on one screen or as JSON.

:func:`collect` reads everything through public ``Apdb`` calls; :func:`render` makes the screen.
``report["actions"]`` lists what needs doing; the command exits with 1 when it is not empty:

* **compaction overdue**: engine rows older than the boundary a compaction would use now
  (``diadb compact`` moves them);
* **change-log backlog**: an unpublished chunk whose time is more than ``backlog_days`` before
  the newest visit (the PPDB export is behind: ``diadb export``);
* **time partitions outgrown**: on PostgreSQL and Cassandra, the newest partition ends less than
  ``partition_days`` after the reference time (the newest visit, or ``now_mjd``), or no
  partition exists (``diadb partitions create``);
* **read-only**: the database was written by a newer diadb (upgrade diadb before writing).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.compute as pc

from diadb.apdb import Apdb
from diadb.errors import ConfigError

SOURCE_TABLES = ("DiaSource", "DiaForcedSource")


@dataclass(frozen=True)
class Thresholds:
    """When ``diadb status`` says that something needs action."""

    #: An unpublished chunk older than this many days before the newest visit is a backlog.
    backlog_days: float = 1.0
    #: The newest time partition must reach this many days past the reference time.
    partition_days: float = 7.0


def collect(
    db: Apdb, thresholds: Thresholds = Thresholds(), *, now_mjd: float | None = None
) -> dict[str, Any]:
    """The status report of ``db`` (a JSON-serialisable dict; ``actions`` says what needs doing).

    Parameters
    ----------
    db
        An open database.
    thresholds
        When a backlog or the partitions need action.
    now_mjd
        The reference time of the partition check (default: the newest visit).
    """
    latest = db.latest_visit_mjd()
    report: dict[str, Any] = {
        "url": db.url,
        "connection": _connection(db),
        "versions": _versions(db),
        "config": json.loads(db.frozen_metadata().get("diadb.config", "{}")),
        "latest_visit_mjd": latest,
        "tables": db.stats(),
        "history": _history(db),
        "compaction": _compaction(db, latest),
        "changelog": _changelog(db, latest, thresholds.backlog_days),
        "partitions": _partitions(db, latest if now_mjd is None else now_mjd, thresholds.partition_days),
        "counters": db.counters(),
    }
    actions: list[str] = []
    if db.read_only:
        actions.append("read-only: written by a newer diadb; upgrade diadb before writing")
    overdue = report["compaction"].get("overdue_rows") or {}
    if any(overdue.values()):
        rows = ", ".join(f"{n:,} {t}" for t, n in overdue.items() if n)
        actions.append(f"compaction overdue: {rows} older than the boundary; run 'diadb compact'")
    log = report["changelog"]
    if log["backlog"]:
        actions.append(
            f"change-log backlog: {log['unpublished']} unpublished chunk(s), the oldest "
            f"{log['oldest_unpublished_age_days']:.2f} days before the newest visit; run 'diadb export'"
        )
    parts = report["partitions"]
    if parts is not None and parts["warning"]:
        actions.append(f"time partitions: {parts['warning']}; run 'diadb partitions create'")
    report["actions"] = actions
    return report


def _connection(db: Apdb) -> dict[str, Any]:
    loc = db.location()
    out: dict[str, Any] = {"engine": loc.scheme}
    if loc.files:
        out["files"] = [str(f) for f in loc.files if f.exists()]
    if loc.hosts:
        out["hosts"] = list(loc.hosts)
        out["port"] = loc.port
    for name in ("database", "namespace"):
        if getattr(loc, name):
            out[name] = getattr(loc, name)
    if loc.options:
        out["options"] = dict(loc.options)
    return out


def _versions(db: Apdb) -> dict[str, Any]:
    meta = db.frozen_metadata()
    return {
        "layout": meta.get("diadb.layout_version"),
        "pixelization": meta.get("diadb.pixelization"),
        "schema": f"{db.schema.name} {db.schema.version}",
        "read_only": db.read_only,
    }


def _history(db: Apdb) -> dict[str, Any]:
    out: dict[str, Any] = {"tier": db.tier is not None}
    for info in db.segments():
        entry = out.setdefault(info.table, {"segments": 0, "rows": 0, "bytes": 0, "spans": []})
        entry["segments"] += 1
        entry["rows"] += info.rows
        entry["bytes"] += info.bytes
        entry["spans"].append((info.span_start, info.span_end))
    for table in (*SOURCE_TABLES, "DiaObject"):
        entry = out.get(table)
        if isinstance(entry, dict):
            spans = sorted(entry.pop("spans"))
            entry["oldest_span_mjd"] = list(spans[0])
            entry["newest_span_mjd"] = list(spans[-1])
    return out


def _compaction(db: Apdb, latest: float | None) -> dict[str, Any]:
    backlog = db.compaction_backlog()
    if backlog is None:
        return {"tier": False}
    through = max((s.span_end for s in db.segments() if s.table in SOURCE_TABLES), default=None)
    return {
        "tier": True,
        "compacted_through_mjd": through,
        "lag_days": None if latest is None or through is None else latest - through,
        "boundary_mjd": backlog["boundary_mjd"],
        "overdue_rows": backlog["rows"],
        "last_error": None if db.compaction_error is None else str(db.compaction_error),
    }


def _changelog(db: Apdb, latest: float | None, backlog_days: float) -> dict[str, Any]:
    chunks = db.replica_chunks()
    pending = chunks.filter(pc.invert(chunks.column("published")))
    out: dict[str, Any] = {
        "chunks": chunks.num_rows,
        "unpublished": pending.num_rows,
        "oldest_unpublished": None,
        "oldest_unpublished_age_days": None,
        "backlog": False,
    }
    if pending.num_rows:
        first = pending.slice(0, 1).to_pylist()[0]
        out["oldest_unpublished"] = {k: first[k] for k in ("chunk_id", "kind", "visit_mjd_tai", "stored_at")}
        times = [t for t in pending.column("visit_mjd_tai").to_pylist() if t is not None]
        if times and latest is not None:
            age = latest - min(times)
            out["oldest_unpublished_age_days"] = age
            out["backlog"] = age > backlog_days
    return out


def _partitions(db: Apdb, ref_mjd: float | None, ahead_days: float) -> dict[str, Any] | None:
    try:
        parts = db.time_partitions()
    except ConfigError:
        return None  # an engine without time partitions (SQLite)
    out: dict[str, Any] = {"tables": {}, "warning": None}
    for p in parts:
        out["tables"].setdefault(p.table, []).append(asdict(p))
    for table in SOURCE_TABLES:
        mine = out["tables"].get(table, [])
        if not mine:
            out["warning"] = f"{table} has no time partition"
            break
        newest_end = max(p["end_mjd"] for p in mine)
        out.setdefault("newest_end_mjd", {})[table] = newest_end
        if ref_mjd is not None and newest_end - ref_mjd < ahead_days:
            out["warning"] = (
                f"the newest {table} partition ends at MJD {newest_end:g}, "
                f"{newest_end - ref_mjd:.1f} days after MJD {ref_mjd:.2f} (fewer than {ahead_days:g})"
            )
            break
    return out


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal (about one screen)."""
    lines = [f"diadb status of {report['url']}"]
    conn = report["connection"]
    where = ", ".join(f"{k}={v}" for k, v in conn.items() if k not in ("engine", "options", "files"))
    lines.append(f"  engine       {conn['engine']}: {where}")
    v = report["versions"]
    lines.append(
        f"  versions     layout {v['layout']}, {v['pixelization']}, schema {v['schema']}"
        + (" (READ-ONLY)" if v["read_only"] else "")
    )
    cfg = report["config"]
    lines += textwrap.wrap(
        ", ".join(f"{k}={cfg[k]}" for k in sorted(cfg)),
        100,
        initial_indent="  config       ",
        subsequent_indent=" " * 15,
        break_on_hyphens=False,
    )
    latest = report["latest_visit_mjd"]
    lines.append(f"  newest visit {'none' if latest is None else f'MJD {latest:.5f}'}")
    lines.append("tables")
    for table, s in report["tables"].items():
        extra = f" {s['segments']:>5d} segment(s)" if "segments" in s else ""
        lines.append(f"  {table:26s} {s['rows']:>12,d} rows {s['bytes'] / 1e6:>10.1f} MB{extra}")
    hist = report["history"]
    for table, h in hist.items():
        if isinstance(h, dict):
            old, new = h["oldest_span_mjd"], h["newest_span_mjd"]
            lines.append(
                f"  {table + ' spans':26s} oldest [{old[0]:g}, {old[1]:g}) newest [{new[0]:g}, {new[1]:g})"
            )
    comp = report["compaction"]
    if comp["tier"]:
        lag = comp["lag_days"]
        overdue = sum((comp["overdue_rows"] or {}).values())
        through = comp["compacted_through_mjd"]
        lines.append(
            f"compaction     through {'nothing yet' if through is None else f'MJD {through:g}'}"
            f"{'' if lag is None else f', {lag:.2f} days behind the newest visit'}; "
            f"{overdue:,} row(s) overdue"
        )
        if comp["last_error"]:
            lines.append(f"  last error: {comp['last_error']}")
    else:
        lines.append("compaction     history tier off")
    log = report["changelog"]
    line = f"change log     {log['chunks']:,} chunk(s), {log['unpublished']:,} unpublished"
    if log["oldest_unpublished"]:
        o = log["oldest_unpublished"]
        line += f"; oldest #{o['chunk_id']} ({o['kind']}, stored {o['stored_at']})"
    lines.append(line)
    parts = report["partitions"]
    if parts is not None:
        for table, ps in parts["tables"].items():
            lines.append(
                f"partitions     {table}: {len(ps)}, MJD {min(p['start_mjd'] for p in ps):g} "
                f"to {max(p['end_mjd'] for p in ps):g}"
            )
    counters = report["counters"]
    if counters:
        lines.append("counters       " + ", ".join(f"{k}={n}" for k, n in sorted(counters.items())))
    actions = report["actions"]
    lines.append("needs action:" if actions else "ok: nothing needs action")
    lines += [f"  - {a}" for a in actions]
    return "\n".join(lines)


__all__ = ["Thresholds", "collect", "render"]
