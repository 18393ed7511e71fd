"""Whole-field reads of one database with the history tier and one without, on the same server.

Reads the databases a ``diadb bench --url <server> --engine-only`` run left (``<url>`` and its
``_engine`` sibling), at their newest visit, for each of the ``year`` profile's three fields, in
fresh processes (no blob kept from an earlier read unless ``history_cache_mb`` is set), and
prints the median seconds of each table's read and the total. Usage::

    .venv/bin/python scripts/bench_server_tier.py URL_WITH_TIER URL_WITHOUT [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

FIELDS = ((40.0, -30.0), (55.0, -30.0), (70.0, -30.0))

ONE_READ = """
import json, sys, time
import diadb
url, ra, dec = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
db = diadb.Apdb.open(url)
mjd = db.latest_visit_mjd()
region = diadb.Circle(ra, dec, 1.75)
db.contains_visit_detector(-1)  # connect before timing
out = {}
for name, read in (("DiaObject", lambda: db.get_objects(region)),
                   ("DiaSource", lambda: db.get_sources(region, mjd)),
                   ("DiaForcedSource", lambda: db.get_forced_sources(region, mjd))):
    t0 = time.perf_counter(); rows = read().num_rows; out[name] = (time.perf_counter() - t0, rows)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tier_url")
    parser.add_argument("engine_url")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {"tier": {}, "engine": {}}
    rows: dict[str, dict[str, int]] = {"tier": {}, "engine": {}}
    for _ in range(args.repeat):
        for ra, dec in FIELDS:
            for label, url in (("tier", args.tier_url), ("engine", args.engine_url)):
                done = subprocess.run(
                    [sys.executable, "-c", ONE_READ, url, str(ra), str(dec)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                for table, (seconds, n) in json.loads(done.stdout.strip().splitlines()[-1]).items():
                    results[label].setdefault(table, []).append(seconds)
                    rows[label][table] = rows[label].get(table, 0) + n
    print("| system | objects | sources | forced | total |")
    print("|---|---|---|---|---|")
    for label in ("tier", "engine"):
        medians = {t: statistics.median(v) for t, v in results[label].items()}
        cells = " | ".join(f"{medians[t]:.3f}" for t in ("DiaObject", "DiaSource", "DiaForcedSource"))
        print(f"| {label} | {cells} | {sum(medians.values()):.3f} |")
    same = rows["tier"] == rows["engine"]
    print(f"\nreads per system: {args.repeat * len(FIELDS)}; rows returned equal: {same}")


if __name__ == "__main__":
    main()
