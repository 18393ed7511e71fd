"""Small synthetic visits for tests: every schema column filled, known ids and positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diadb.schema.model import ApdbSchema, TableSpec
from diadb.sim.fill import fill_table


@dataclass
class Visit:
    visit: int
    mjd: float
    objects: pa.Table
    sources: pa.Table
    forced: pa.Table


def make_visit(
    schema: ApdbSchema,
    visit: int,
    mjd: float,
    object_ids: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    *,
    seed: int = 0,
    detector: int = 0,
    n_dia_sources: np.ndarray | None = None,
) -> Visit:
    rng = np.random.default_rng(seed + visit)
    n = len(object_ids)
    given = {} if n_dia_sources is None else {"nDiaSources": np.asarray(n_dia_sources, dtype=np.int64)}
    objects = fill_table(
        schema.table("DiaObject"),
        n,
        rng,
        {
            "diaObjectId": object_ids,
            "ra": ra,
            "dec": dec,
            "validityStartMjdTai": np.full(n, mjd),
            "validityEndMjdTai": pa.nulls(n, pa.float64()),
            **given,
        },
    )
    sources = fill_table(
        schema.table("DiaSource"),
        n,
        rng,
        {
            "diaSourceId": object_ids * 100_000 + visit,
            "diaObjectId": object_ids,
            "ssObjectId": pa.nulls(n, pa.int64()),
            "ra": ra,
            "dec": dec,
            "visit": np.full(n, visit, dtype=np.int64),
            "detector": np.full(n, detector, dtype=np.int16),
            "midpointMjdTai": np.full(n, mjd),
        },
    )
    forced = fill_table(
        schema.table("DiaForcedSource"),
        n,
        rng,
        {
            "diaForcedSourceId": object_ids * 100_000 + visit,
            "diaObjectId": object_ids,
            "ra": ra,
            "dec": dec,
            "visit": np.full(n, visit, dtype=np.int64),
            "detector": np.full(n, detector, dtype=np.int16),
            "midpointMjdTai": np.full(n, mjd),
        },
    )
    return Visit(visit, mjd, objects, sources, forced)


def random_positions(
    n: int, seed: int, ra0: float = 55.0, dec0: float = -30.0, half: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(ra0 - half, ra0 + half, n), rng.uniform(dec0 - half, dec0 + half, n)


def with_nulls(t: pa.Table, spec: TableSpec, every: int) -> pa.Table:
    """``t`` with every ``every``-th value of each nullable float or boolean column set to null."""
    for i, name in enumerate(t.column_names):
        col = t.column(name)
        if not spec.column(name).nullable or name in ("validityEndMjdTai", "diaObjectId"):
            continue
        if not (pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            continue
        mask = np.zeros(t.num_rows, dtype=bool)
        mask[(i % every) :: every] = True
        t = t.set_column(i, name, pc.if_else(pa.array(mask), pa.nulls(t.num_rows, col.type), col))
    return t


def sliding_visits(schema: ApdbSchema, visits: range) -> list[Visit]:
    """Objects 1..300 around (55, -30), each visit re-observing a sliding subset (new versions);
    each version's ``nDiaSources`` counts the object's sources up to and including its visit;
    no source is withdrawn yet."""
    ra, dec = random_positions(300, seed=7, half=1.2)
    ids = np.arange(1, 301, dtype=np.int64)
    out = []
    for v in visits:
        counts = np.zeros(300, dtype=np.int64)
        for w in range(1, v + 1):
            counts[(w * 40) % 200 : (w * 40) % 200 + 120] += 1
        sel = slice((v * 40) % 200, (v * 40) % 200 + 120)
        visit = make_visit(schema, v, 60000.0 + v, ids[sel], ra[sel], dec[sel], n_dia_sources=counts[sel])
        out.append(Visit(v, visit.mjd, visit.objects, unwithdrawn(visit.sources), unwithdrawn(visit.forced)))
    return out


def unwithdrawn(t: pa.Table) -> pa.Table:
    i = t.schema.get_field_index("timeWithdrawnMjdTai")
    return t.set_column(i, t.schema.field(i), pa.nulls(t.num_rows, t.schema.field(i).type))
