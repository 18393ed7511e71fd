"""What a store checks beyond the Felis schema, and how a validated catalog becomes a batch.

:func:`diadb.schema.validate.validate_catalog` checks each catalog against its Felis table;
the checks here need the other catalogs of the store or the database: object versions, the
objects that sources name, keys another visit already stored. All are columnar.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from diadb.backends.base import Backend, VisitBatch
from diadb.errors import CatalogError, StorageError
from diadb.history.manifest import HistoryEngine
from diadb.history.tier import HistoryTier
from diadb.schema.model import HEALPIX_COLUMN, ApdbSchema
from diadb.sky.healpix import radec_to_healpix29


def check_objects(objs: pa.Table) -> None:
    """One version per object, and no ``validityEndMjdTai`` (diadb closes versions itself)."""
    ends = objs.column("validityEndMjdTai")
    if ends.null_count != len(ends):
        set_rows = np.flatnonzero(~np.asarray(ends.is_null().to_numpy(zero_copy_only=False), dtype=bool))
        raise CatalogError(
            "DiaObject", "validityEndMjdTai", "must be null: diadb closes versions itself", set_rows.tolist()
        )
    ids = objs.column("diaObjectId").to_numpy()
    order = np.argsort(ids, kind="stable")
    dup = ids[order][1:] == ids[order][:-1]
    if dup.any():
        rows = sorted(int(order[i + 1]) for i in np.flatnonzero(dup)[:10])
        raise CatalogError(
            "DiaObject", "diaObjectId", "more than one version of an object in one store", rows
        )


def with_healpix(data: pa.Table) -> pa.Table:
    """``data`` with its ``_healpix_29`` column (computed from ``ra``/``dec``) last."""
    pix = radec_to_healpix29(data.column("ra").to_numpy(), data.column("dec").to_numpy())
    return data.append_column(pa.field(HEALPIX_COLUMN, pa.int64(), nullable=False), pa.array(pix))


def diagnose_key_conflicts(backend: Backend, schema: ApdbSchema, batch: VisitBatch) -> None:
    """After a failed store, a :class:`CatalogError` naming rows whose keys another visit
    already stored (nothing when that is not why it failed)."""
    for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
        pk = list(schema.table(name).primary_key)
        if not data.num_rows or not pk:
            continue
        try:
            found = backend.existing_keys(name, data.select(pk))
        except StorageError:
            return
        if found.num_rows:
            taken = set(zip(*(found.column(c).to_pylist() for c in pk), strict=True))
            keys = zip(*(data.column(c).to_pylist() for c in pk), strict=True)
            rows = [i for i, k in enumerate(keys) if k in taken]
            raise CatalogError(name, ", ".join(pk), "primary key already stored by another visit", rows)


def check_history_keys(
    tier: HistoryTier, engine: HistoryEngine, schema: ApdbSchema, batch: VisitBatch
) -> None:
    """Keys are unique across both tiers: a :class:`CatalogError` naming the rows whose primary
    key a history segment already holds (the engine checks its own rows in the store's
    transaction). A store that will be skipped as already stored is not checked: its retry must
    return False, not fail."""
    if (
        engine.contains_store_key(batch.key)
        if batch.key is not None
        else engine.contains_visit_detector(batch.visit, batch.detector)
    ):
        return
    for name, data in (("DiaSource", batch.sources), ("DiaForcedSource", batch.forced_sources)):
        pk = list(schema.table(name).primary_key)
        if not data.num_rows or not pk:
            continue
        rows = tier.stored_keys(engine.list_segments(name), data.select(pk))
        if rows.size:
            raise CatalogError(
                name,
                ", ".join(pk),
                "primary key already stored by another visit (in the history tier)",
                rows.tolist(),
            )
