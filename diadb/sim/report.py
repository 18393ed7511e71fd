"""The report of ``diadb bench`` (:mod:`diadb.sim.bench`): its summary, as JSON-ready values and
as Markdown, and the latency plot, all from the per-visit metrics table (one row per system,
visit, table and operation: ``system``, ``visit``, ``table``, ``op``, ``seconds``, ``rows``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.sim.floor import render_floor, summarize_floor
from diadb.sim.metrics_cost import describe as describe_metrics_cost
from diadb.sim.probe import describe

TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")


def _median(metrics: pa.Table, system: str, op: str, table: str | None, last: int | None = None) -> float:
    mask = pc.and_(pc.equal(metrics.column("system"), system), pc.equal(metrics.column("op"), op))
    part = metrics.filter(mask)
    if table is not None:
        part = part.filter(pc.equal(part.column("table"), table))
    if op == "select" and table is None:
        part = part.group_by("visit").aggregate([("seconds", "sum")]).rename_columns(["visit", "seconds"])
    if last is not None and part.num_rows:
        visits = part.column("visit").to_numpy()
        part = part.filter(pa.array(visits > visits.max() - last))
    values = part.column("seconds").to_numpy()
    return float(np.median(values)) if len(values) else float("nan")


def summarize(
    profile: str,
    sim: dict[str, Any],
    n_visits: int,
    columns: str,
    metrics: pa.Table,
    checks: dict[str, dict[str, Any]],
    floor: list[dict[str, Any]],
    sizes: dict[str, Any],
) -> dict[str, Any]:
    """The benchmark's summary (``summary.json``): per system the median read and store seconds
    (overall and at depth, the last 20% of visits), the reference's ratios, the rows read at
    depth, the ID checks (``checks``: each system's as a dict), the distance to the floor
    (``floor``: :class:`diadb.sim.floor.FloorReading` dicts, per measured read) and ``sizes``."""
    systems = list(dict.fromkeys(metrics.column("system").to_pylist()))
    # "at depth": the last 20% of visits, where the history window is fullest.
    tail = max(1, n_visits // 5)
    medians: dict[str, dict[str, float]] = {}
    for s in systems:
        entry = {f"select_{t}": _median(metrics, s, "select", t) for t in TABLES}
        entry["select_total"] = _median(metrics, s, "select", None)
        entry["select_total_at_depth"] = _median(metrics, s, "select", None, last=tail)
        entry["store"] = _median(metrics, s, "store", None)
        medians[s] = entry
    last_visit = int(pc.max(metrics.column("visit")).as_py() or n_visits)
    rows_at_depth = {
        t: float(
            np.median(
                metrics.filter(
                    pc.and_(
                        pc.and_(
                            pc.equal(metrics.column("system"), "diadb"), pc.equal(metrics.column("table"), t)
                        ),
                        pc.greater(metrics.column("visit"), last_visit - tail),
                    )
                )
                .column("rows")
                .to_numpy()
            )
        )
        for t in TABLES
    }
    ratios = {}
    if "dax_apdb" in medians:
        ref = medians["dax_apdb"]
        for s in systems:
            if s != "dax_apdb":
                ratios[s] = {k: ref[k] / v if v else float("nan") for k, v in medians[s].items()}
    floor_summary = summarize_floor(floor)
    return {
        "profile": profile,
        "visits": n_visits,
        "columns": columns,
        "sim": sim,
        "medians_s": medians,
        "ratio_reference_over_system": ratios,
        "rows_per_visit_at_depth": rows_at_depth,
        "id_checks": checks,
        "floor": floor_summary,
        "sizes": sizes,
        # Medians hide the few stores that also compacted a closed span: means include them.
        "store_mean_s": {s: _mean_store(metrics, s) for s in systems if not np.isnan(medians[s]["store"])},
    }


def _mean_store(metrics: pa.Table, system: str) -> float:
    mask = pc.and_(pc.equal(metrics.column("system"), system), pc.equal(metrics.column("op"), "store"))
    values = metrics.filter(mask).column("seconds").to_numpy()
    return float(values.mean()) if len(values) else float("nan")


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown report."""
    lines = [
        f"# diadb bench: profile `{summary['profile']}`, {summary['visits']} visits, "
        f"source density x{summary['sim']['scale']}, columns: {summary['columns']}",
        "",
        "Medians in seconds per visit (whole field). *At depth*: the last 20% of visits.",
        "",
        "| system | objects | sources | forced | select total | select at depth | store |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, m in summary["medians_s"].items():
        lines.append(
            f"| {system} | {m['select_DiaObject']:.3f} | {m['select_DiaSource']:.3f} | "
            f"{m['select_DiaForcedSource']:.3f} | {m['select_total']:.3f} | "
            f"{m['select_total_at_depth']:.3f} | {m['store']:.3f} |"
        )
    depth = summary["rows_per_visit_at_depth"]
    lines += [
        "",
        f"Rows read per visit at depth (diadb): {depth['DiaObject']:,.0f} objects, "
        f"{depth['DiaSource']:,.0f} sources, {depth['DiaForcedSource']:,.0f} forced sources.",
    ]
    if summary["ratio_reference_over_system"]:
        lines += ["", "Speed-up over lsst-dax-apdb (its median / ours):", ""]
        lines += ["| system | select total | select at depth | store |", "|---|---|---|---|"]
        for system, r in summary["ratio_reference_over_system"].items():
            lines.append(
                f"| {system} | {r['select_total']:.1f}x | {r['select_total_at_depth']:.1f}x | "
                f"{r['store']:.2f}x |"
            )
    for system, c in summary["id_checks"].items():
        lines += [
            "",
            f"ID check against {system}: {c['identical']} of {c['visits']} checked visits identical.",
        ]
        for t in TABLES:
            if c["missing"][t] or c["extra"][t]:
                lines.append(
                    f"- {t}: {c['extra'][t]:,} rows only in {system} "
                    f"({c['extra_outside_region'][t]:,} of them outside the region), "
                    f"{c['missing'][t]:,} rows only in diadb"
                )
    if summary["floor"]:
        lines += render_floor(summary["floor"])
    if summary.get("store_mean_s"):
        means = ", ".join(f"{k} {v:.3f} s" for k, v in summary["store_mean_s"].items())
        lines += ["", f"Mean store per visit, compactions included: {means}."]
    if summary.get("reader_memory"):
        lines += ["", describe(summary["reader_memory"])]
    if summary.get("metrics_cost"):
        lines += ["", describe_metrics_cost(summary["metrics_cost"])]
    return "\n".join(lines) + "\n"


def plot_latency(metrics: pa.Table, path: Path, profile: str) -> Path | None:
    """Select and store seconds per visit and system, as a PNG at ``path`` (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_select, ax_store) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in dict.fromkeys(metrics.column("system").to_pylist()):
        for op, ax in (("select", ax_select), ("store", ax_store)):
            part = metrics.filter(
                pc.and_(pc.equal(metrics.column("system"), system), pc.equal(metrics.column("op"), op))
            )
            per_visit = part.group_by("visit").aggregate([("seconds", "sum")]).sort_by("visit")
            ax.plot(
                per_visit.column("visit").to_numpy(),
                per_visit.column("seconds_sum").to_numpy(),
                ".",
                markersize=3,
                label=system,
            )
    ax_select.set(title="select (objects + sources + forced) per visit", xlabel="visit", ylabel="seconds")
    ax_store.set(title="store per visit", xlabel="visit", ylabel="seconds")
    for ax in (ax_select, ax_store):
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"diadb bench, profile {profile}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["TABLES", "plot_latency", "render_markdown", "summarize"]
