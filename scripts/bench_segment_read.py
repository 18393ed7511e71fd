"""What checking history segments costs: hash speeds, then one segment of ~2 M DiaSource-like
rows (0.65 GB) read for a 1.75 deg field by this tree's HistoryTier and by another tree's.

    .venv/bin/python scripts/bench_segment_read.py --baseline DIR

``DIR`` is a checkout of diadb to compare with (e.g. ``git worktree add /tmp/base <commit>``
of a commit before block checksums). Both trees read the same file, written by this tree.
Each trial is a fresh process: "first" is a process's first read of the segment (the blocks it
touches are checked then), "again" the best of two more reads in that process. "cold" evicts
the file from the page cache first (posix_fadvise on that file only). Trials alternate between
the trees; the best and the median of ``--trials`` are shown (the machine may be shared).
Needs ~3 GB of memory and a few minutes; not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys, time
from collections.abc import Callable
from pathlib import Path
sys.path.insert(0, {tree!r})
import numpy as np
import pyarrow as pa
from diadb.history import segment as seg
from diadb.history.tier import HistoryTier
from diadb.sky.regions import Circle
try:
    from diadb.times import TimeWindow
except ImportError:
    from diadb.backends.base import TimeWindow

args = json.loads({args!r})
directory = Path(args["directory"])
out = {{}}
if args["action"] == "write":
    from diadb.schema import load_schema
    from diadb.sim.fill import fill_table
    from diadb.sky.healpix import radec_to_healpix29
    spec = load_schema().table("DiaSource")
    n = args["rows"]
    rng = np.random.default_rng(1)
    ra = rng.uniform(50.0, 60.0, n)  # ~87 deg^2: a 1.75 deg field holds ~11% of the rows
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-35.0)), np.sin(np.radians(-25.0)), n)))
    given = {{"ra": ra, "dec": dec, "midpointMjdTai": rng.uniform(60000.0, 60001.0, n),
             "diaSourceId": np.arange(n, dtype=np.int64), "diaObjectId": rng.integers(1, n // 4, n)}}
    data = fill_table(spec, n, rng, given).cast(spec.arrow_schema(with_healpix=False))
    data = data.append_column("_healpix_29", pa.array(radec_to_healpix29(ra, dec)))
    t = time.perf_counter()
    info = seg.write_segment(directory, "DiaSource", data, "midpointMjdTai", (60000.0, 60001.0))
    out["write_s"] = time.perf_counter() - t
    out["info"] = info.__dict__
elif args["action"] == "verify":
    info = seg.SegmentInfo(**args["info"])
    t = time.perf_counter()
    seg.verify_segment(directory, info)
    out["verify_s"] = time.perf_counter() - t
else:
    info = seg.SegmentInfo(**args["info"])
    path = str(directory / info.name)
    columns = args["columns"] or list(pa.ipc.open_file(pa.memory_map(path)).schema.names)
    if args["cold"]:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    field = Circle(55.0, -30.0, 1.75)
    ranges = field.pixel_ranges(4)
    window = TimeWindow(59000.0, 61000.0)
    tier = HistoryTier(directory, 1.0)
    checking = [0.0]  # seconds inside MappedSegment's checks (this tree only)
    if hasattr(seg, "MappedSegment"):
        for method in ("check", "locate", "values"):
            def timed(self, *a, _f=getattr(seg.MappedSegment, method), **k):
                t0 = time.perf_counter()
                try:
                    return _f(self, *a, **k)
                finally:
                    checking[0] += time.perf_counter() - t0
            setattr(seg.MappedSegment, method, timed)
        _open = seg.map_segment
        def timed_open(*a, **k):
            t0 = time.perf_counter()
            try:
                return _open(*a, **k)
            finally:
                checking[0] += time.perf_counter() - t0
        import diadb.history.tier as tier_module
        tier_module.map_segment = timed_open

    def read():
        if hasattr(tier, "select"):  # trees before history/reader.py
            return tier.select([info], ranges, columns, region=field, window=window, object_ids=None)
        from diadb.history.tier import column_values, gather
        kept = []
        for data, idx in tier.candidates([info], ranges, columns, window=window, object_ids=None):
            idx = idx[field.contains(column_values(data, "ra")[idx], column_values(data, "dec")[idx])]
            kept.append((data, idx))
        return gather(kept)

    walls, cpus = [], []
    checks = []
    for _ in range(3):
        checking[0] = 0.0
        t, c = time.perf_counter(), time.process_time()
        parts = read()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        checks.append(checking[0])
    out["checks"] = checks
    out.update(walls=walls, cpus=cpus, rows=sum(p.num_rows for p in parts))
    mapped = tier._open[info.name]
    if hasattr(mapped, "_verified"):
        out["checked"] = float(mapped._verified.mean()) if len(mapped._verified) else 1.0
print("RESULT " + json.dumps(out))
"""


def run(tree: str, **args: Any) -> dict[str, Any]:
    code = WORKER.format(tree=tree, args=json.dumps(args))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result


def hash_speeds() -> None:
    import numpy as np
    import xxhash

    data = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8).tobytes()
    view = memoryview(data)
    hashes: dict[str, Callable[[memoryview], object]] = {
        "xxhash xxh3_64": xxhash.xxh3_64_intdigest,
        "xxhash xxh3_128": xxhash.xxh3_128_intdigest,
        "xxhash xxh64": xxhash.xxh64_intdigest,
        "zlib.crc32": zlib.crc32,
        "hashlib.blake2b-128": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
    }
    print("hash speed on a 256 MB buffer (best of 3; whole buffer / in 64 KiB blocks):")
    for name, fn in hashes.items():
        speeds = []
        for block in (len(view), 1 << 16):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for i in range(0, len(view), block):
                    fn(view[i : i + block])
                best = min(best, time.perf_counter() - t)
            speeds.append(len(view) / best / 1e9)
        print(f"  {name:20s} {speeds[0]:6.2f} GB/s / {speeds[1]:6.2f} GB/s")


def _ms(values: list[float]) -> str:
    return f"{min(values) * 1e3:7.1f} ({statistics.median(values) * 1e3:7.1f})"


def compare(trees: list[tuple[str, str]], directory: Path, info: dict[str, Any], trials: int) -> None:
    print("  best (median) ms over trials         first read: wall      cpu     again: wall      cpu")
    for columns, what in ((None, "104 columns"), (["diaSourceId", "ra", "dec", "psfFlux"], "4 columns")):
        for cold in (False, True):
            results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
            for _ in range(trials):
                for label, tree in trees:
                    results[label].append(
                        run(
                            tree,
                            action="read",
                            directory=str(directory),
                            info=info,
                            columns=columns,
                            cold=cold,
                        )
                    )
            for label, rs in results.items():
                first_wall = [r["walls"][0] for r in rs]
                first_cpu = [r["cpus"][0] for r in rs]
                again_wall = [min(r["walls"][1:]) for r in rs]
                again_cpu = [min(r["cpus"][1:]) for r in rs]
                checked = ""
                if "checked" in rs[0]:
                    first_check = [r["checks"][0] for r in rs]
                    again_check = [min(r["checks"][1:]) for r in rs]
                    checked = (
                        f" {rs[0]['checked']:4.0%} blocks checked; in map/locate/check: first"
                        f" {_ms(first_check)}, again {_ms(again_check)}"
                    )
                cache = "cold" if cold else "warm"
                print(
                    f"  {label:9s} {what:11s} {cache}  {_ms(first_wall)} {_ms(first_cpu)}"
                    f"  {_ms(again_wall)} {_ms(again_cpu)}  {rs[0]['rows']:,} rows{checked}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--baseline", help="another checkout of diadb (before block checksums)")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    hash_speeds()
    trees = [("this", str(ROOT))] + ([("baseline", args.baseline)] if args.baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        new = run(str(ROOT), action="write", directory=f"{tmp}/new", rows=args.rows)
        info = new["info"]
        print(f"segment: {info['rows']:,} rows, {info['bytes'] / 1e9:.2f} GB; written by this tree in "
              f"{new['write_s']:.1f} s")  # fmt: skip
        verified = run(str(ROOT), action="verify", directory=f"{tmp}/new", info=info)
        print(f"  verify (this tree): {verified['verify_s']:.2f} s")
        compare(trees, Path(tmp) / "new", info, args.trials)
        if args.baseline:
            old = run(args.baseline, action="write", directory=f"{tmp}/old", rows=args.rows)
            old_info = old["info"]
            print(f"segment written by the baseline (whole-file blake2b) in {old['write_s']:.1f} s")
            for label, tree in trees[::-1]:
                v = run(tree, action="verify", directory=f"{tmp}/old", info=old_info)
                print(f"  verify ({label}): {v['verify_s']:.2f} s")
            compare(trees, Path(tmp) / "old", old_info, args.trials)
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
