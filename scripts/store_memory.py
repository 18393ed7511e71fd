"""Peak memory of one store whose automatic compaction rewrites the DiaObject snapshot.

Usage (from the repository root)::

    python scripts/store_memory.py /tmp/m.db prepare 100000 [TILE_ORDER]
    python scripts/store_memory.py /tmp/m.db measure 100000

TILE_ORDER (default -1: none) cuts the segments and the DiaObject snapshot by sky tile
(``history_tile_order``). ``measure`` stores a third visit of the same objects and reports how
much the process's anonymous memory grew (sampled from ``/proc/self/status`` every 5 ms), the
Arrow pool's peak and the resident size's peak, each over the store's input.
"""

from __future__ import annotations

import resource
import sys
import threading
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, ".")
import diadb
from tests.helpers import make_visit


def anonymous_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    url, step, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ids = np.arange(1, n + 1)
    rng = np.random.default_rng(1)
    ra, dec = rng.uniform(50, 60, n), rng.uniform(-35, -25, n)
    if step == "prepare":
        tiles = int(sys.argv[4]) if len(sys.argv) > 4 else -1
        db = diadb.Apdb.create(
            url, history_span_days=1.0, history_compact_lag_days=0.0, history_tile_order=tiles
        )
        for v in (1, 2):
            x = make_visit(db.schema, v, 60000.0 + v, ids, ra, dec, seed=v)
            db.store(x.mjd, x.objects, x.sources, x.forced, visit=v)
        print("segments", len(db.segments()))
        return
    db = diadb.Apdb.open(url)
    x = make_visit(db.schema, 3, 60003.0, ids, ra, dec, seed=3)
    inputs = x.objects.nbytes + x.sources.nbytes + x.forced.nbytes
    pool = pa.default_memory_pool()
    before_pool = pool.bytes_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], anonymous_bytes())
            time.sleep(0.005)

    anon0 = anonymous_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.time()
    if not db.store(x.mjd, x.objects, x.sources, x.forced, visit=3):
        raise SystemExit("visit 3 is already stored: prepare a new database")
    stop.set()
    sampler.join()
    grew = peak[0] - anon0
    print(f"anonymous memory peak grew {grew / 1e6:.1f} MB = {grew / inputs:.2f}x input")
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    snap = next(s for s in db.segments() if s.table == "DiaObject")
    pool_peak = pool.max_memory() - before_pool
    print(
        f"input {inputs / 1e6:.1f} MB, snapshot {snap.bytes / 1e6:.1f} MB ({snap.rows} rows); "
        f"arrow pool peak {pool_peak / 1e6:.1f} MB = {pool_peak / inputs:.2f}x input; "
        f"RSS peak grew {(rss1 - rss0) / 1e6:.1f} MB; {time.time() - t:.1f} s"
    )


if __name__ == "__main__":
    main()
