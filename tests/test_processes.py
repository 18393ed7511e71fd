"""Several processes at once, and a writer killed with SIGKILL in the middle of a store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import diadb

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N = 400  # objects per visit

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    import diadb
    from tests.helpers import make_visit, random_positions
    db = diadb.Apdb.open({url!r})
    ra, dec = random_positions({n}, 1)
    for v in range({first}, {first} + {count}):
        ids = np.arange(1, {n} + 1) + v * 1_000_000
        visit = make_visit(db.schema, v, 60000.0 + v, ids, ra, dec)
        db.store(visit.mjd, visit.objects, visit.sources, visit.forced, visit=v, detector=0)
        print(v, flush=True)
    """
)

READER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import diadb
    db = diadb.Apdb.open({url!r})
    region = diadb.Circle(55.0, -30.0, 3.0)
    bad = 0
    for _ in range(40):
        # Each read is one snapshot: every visit it sees is complete.
        src = db.get_sources(region, 60100.0, columns=["visit"]).column("visit").to_numpy()
        if len(src):
            counts = __import__("numpy").unique(src, return_counts=True)[1]
            bad += int((counts != {n}).sum())
    print("bad", bad, flush=True)
    """
)


def _script(template: str, **kw: object) -> list[str]:
    return [sys.executable, "-c", template.format(root=str(ROOT), **kw)]


def _visit_counts(url: str) -> dict[int, int]:
    with diadb.Apdb.open(url) as db:
        visits = (
            db.get_sources(diadb.Box(0, 360, -90, 90), 60100.0, columns=["visit"]).column("visit").to_numpy()
        )
        forced = db.get_forced_sources(diadb.Box(0, 360, -90, 90), 60100.0, columns=["visit"]).column("visit")
        values, counts = np.unique(visits, return_counts=True)
        fv, fc = np.unique(forced.to_numpy(), return_counts=True)
        assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == dict(
            zip(fv.tolist(), fc.tolist(), strict=True)
        )
        objects = db.get_objects(diadb.Box(0, 360, -90, 90), columns=["diaObjectId"]).num_rows
        assert objects == N * len(values)
        return dict(zip(values.tolist(), counts.tolist(), strict=True))


def test_readers_see_whole_visits_while_one_writes(tmp_path, official_schema):
    url = str(tmp_path / "shared.db")
    diadb.Apdb.create(url, schema=official_schema).close()
    writer = subprocess.Popen(
        _script(WRITER, url=url, n=N, first=1, count=15), stdout=subprocess.PIPE, text=True
    )
    readers = [
        subprocess.Popen(_script(READER, url=url, n=N), stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    writer.communicate(timeout=300)
    assert writer.returncode == 0
    for r in readers:
        out, _ = r.communicate(timeout=300)
        assert r.returncode == 0
        assert out.strip() == "bad 0"
    assert _visit_counts(url) == {v: N for v in range(1, 16)}


def test_writer_killed_mid_store_leaves_no_partial_visit(tmp_path, official_schema):
    url = str(tmp_path / "crash.db")
    diadb.Apdb.create(url, schema=official_schema).close()
    rng = np.random.default_rng(0)
    acknowledged: set[int] = set()
    first = 1
    for _attempt in range(4):
        proc = subprocess.Popen(
            _script(WRITER, url=url, n=N, first=first, count=200), stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        # Wait until a few visits are acknowledged, then kill at a random moment of a store.
        for _ in range(2):
            line = proc.stdout.readline()
            if line.strip():
                acknowledged.add(int(line))
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        acknowledged.update(int(x) for x in rest.split())
        counts = _visit_counts(url)
        assert all(c == N for c in counts.values()), counts  # no partial visit
        assert acknowledged <= set(counts)  # nothing acknowledged is lost
        first = max(counts) + 1
    with diadb.Apdb.open(url) as db:
        assert all(db.contains_visit_detector(v, 0) for v in acknowledged)
