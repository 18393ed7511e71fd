"""Retention and schema evolution through the shared fixture: the same semantics on every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

import diadb
from diadb.schema import official_apdb_yaml
from tests.helpers import make_visit, random_positions

EVERYWHERE = diadb.Box(0, 360, -90, 90)


def _store(apdb: diadb.Apdb, visit: int, mjd: float, n: int = 8) -> None:
    ra, dec = random_positions(n, visit)
    v = make_visit(apdb.schema, visit, mjd, np.arange(1, n + 1) + 1000 * visit, ra, dec)
    apdb.store(v.mjd, v.objects, v.sources, v.forced, visit=visit)


def test_prune_drops_history_older_than_window_plus_grace(apdb):
    # Default window: 12 months of 30 days, plus 30 days of grace = 390 days before the newest visit.
    for visit, day in [(1, 0.0), (2, 200.0), (3, 500.0)]:  # the cutoff is day 110
        _store(apdb, visit, 60000.0 + day)
    preview = apdb.prune(dry_run=True)
    assert preview["DiaSource"]["rows"] == 8 and preview["DiaForcedSource"]["rows"] == 8
    every = apdb.get_sources(EVERYWHERE, 60500.0, months=100, columns=["visit"]).column(0).to_pylist()
    assert sorted(set(every)) == [1, 2, 3]  # a dry run changes nothing
    assert apdb.prune() == preview
    left = apdb.get_sources(EVERYWHERE, 60500.0, months=100, columns=["visit"]).column(0).to_pylist()
    forced = apdb.get_forced_sources(EVERYWHERE, 60500.0, months=100, columns=["visit"]).column(0).to_pylist()
    assert sorted(set(left)) == [2, 3] and sorted(set(forced)) == [2, 3]
    assert apdb.prune(dry_run=True)["DiaSource"]["rows"] == 0


def test_schema_evolves_by_a_new_nullable_column_on_every_backend(apdb, backend_url, tmp_path: Path):
    _store(apdb, 1, 60000.0)
    text = official_apdb_yaml().replace('version: "10.0.0"', 'version: "10.1.0"', 1)
    anchor = "  - name: midpointMjdTai\n"  # the first one in the file is DiaSource's
    column = "  - name: isGlint\n    datatype: boolean\n    nullable: true\n    description: Added later.\n"
    newer = tmp_path / "apdb-10.1.0.yaml"
    newer.write_text(text.replace(anchor, column + anchor, 1))
    apdb.close()
    assert diadb.Apdb.upgrade(backend_url, schema=newer) == [
        "DiaSource: added nullable column(s) ['isGlint']"
    ]
    with diadb.Apdb.open(backend_url) as again:
        assert again.schema.version == "10.1.0"
        old = again.get_sources(EVERYWHERE, 60010.0, columns=["diaSourceId", "isGlint"])
        assert old.num_rows == 8 and old.column("isGlint").null_count == 8
        ra, dec = random_positions(8, 2)
        v = make_visit(again.schema, 2, 60001.0, np.arange(1, 9) + 2000, ra, dec)
        flags = pa.array(np.arange(8) % 2 == 0)
        sources = v.sources.set_column(v.sources.schema.get_field_index("isGlint"), "isGlint", flags)
        again.store(v.mjd, v.objects, sources, v.forced, visit=2)
        got = again.get_sources(EVERYWHERE, 60010.0, columns=["visit", "isGlint"]).to_pylist()
        assert sum(1 for r in got if r["visit"] == 2 and r["isGlint"]) == 4
