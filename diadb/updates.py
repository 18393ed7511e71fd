"""The daytime algebra, engine-neutral: which columns change, how counts move, how overlays apply.

Every engine runs the same daytime calls (moving DiaSources between objects, withdrawing
sources and forced sources, closing object versions). The I/O differs per engine; what the
new values are does not, so it is computed here once, on Arrow tables:

- :func:`plan_source_update` turns the stored values of the named DiaSources and the requested
  changes into a :class:`SourceUpdatePlan` (the new rows, the DiaObjects that must exist, the
  ``nDiaSources`` deltas, the change-log record);
- the forced-source helpers name a DiaForcedSource by ``(diaObjectId, visit, detector)``;
- the overlay helpers apply the current values of sources that already live in immutable
  history segments on top of the segment rows (see :mod:`diadb.history.reader`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from diadb.errors import UnknownIdError

Int64Array = npt.NDArray[np.int64]

#: The DiaSource columns daytime operations change (and the source overlay carries).
MUTABLE_SOURCE_COLUMNS = ("diaObjectId", "ssObjectId", "ssObjectReassocTimeMjdTai", "timeWithdrawnMjdTai")
#: The current values of a DiaSource a daytime update reads (key, position, time, mutable columns).
CURRENT_COLUMNS = ("diaSourceId", "_healpix_29", "ra", "dec", "midpointMjdTai", *MUTABLE_SOURCE_COLUMNS)
_CURRENT_SCHEMA = pa.schema(
    [
        ("diaSourceId", pa.int64()),
        ("_healpix_29", pa.int64()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("midpointMjdTai", pa.float64()),
        ("diaObjectId", pa.int64()),
        ("ssObjectId", pa.int64()),
        ("ssObjectReassocTimeMjdTai", pa.float64()),
        ("timeWithdrawnMjdTai", pa.float64()),
    ]
)

#: A DiaForcedSource's name in daytime calls.
FORCED_KEY = ("diaObjectId", "visit", "detector")
#: What a forced withdrawal reads of each row (key, position, time, withdrawal time).
FORCED_CURRENT = (*FORCED_KEY, "_healpix_29", "ra", "dec", "midpointMjdTai", "timeWithdrawnMjdTai")
_FORCED_SCHEMA = pa.schema(
    [(c, pa.int64()) for c in (*FORCED_KEY, "_healpix_29")]
    + [(c, pa.float64()) for c in ("ra", "dec", "midpointMjdTai", "timeWithdrawnMjdTai")]
)


# ---- DiaSource updates -----------------------------------------------------------------
def empty_current() -> pa.Table:
    """No DiaSources, with the :data:`CURRENT_COLUMNS` and their types."""
    return _CURRENT_SCHEMA.empty_table()


def normalise_current(t: pa.Table) -> pa.Table:
    """``t``'s :data:`CURRENT_COLUMNS` with fixed types (engines return their own)."""
    return pa.table([t.column(f.name).cast(f.type) for f in _CURRENT_SCHEMA], schema=_CURRENT_SCHEMA)


def mapping_table(mapping: Mapping[int, int | None], key: str, value: str) -> pa.Table:
    """``{key: value}`` as a two-column int64 table (``None`` values become nulls)."""
    keys = np.fromiter((int(k) for k in mapping), dtype=np.int64, count=len(mapping))
    values = pa.array([None if v is None else int(v) for v in mapping.values()], pa.int64())
    return pa.table({key: keys, value: values})


def unset_only(current: pa.Table, changes: pa.Table, column: str | None) -> tuple[pa.Table, pa.Table]:
    """Keep the rows (of both) whose ``column`` is not set yet (all rows when ``column`` is None)."""
    if column is None or not current.num_rows:
        return current, changes
    current = current.filter(pc.is_null(current.column(column)))
    keep = pc.is_in(changes.column("diaSourceId"), value_set=current.column("diaSourceId"))
    return current, changes.filter(keep)


def merge_changes(current: pa.Table, changes: pa.Table) -> pa.Table:
    """``current`` rows with the changed columns replaced by ``changes`` (matched by diaSourceId)."""
    pos = pc.index_in(current.column("diaSourceId"), value_set=changes.column("diaSourceId"))
    out = current
    for name in changes.column_names:
        if name == "diaSourceId":
            continue
        values = changes.column(name).cast(current.schema.field(name).type).take(pos)
        out = out.set_column(out.schema.get_field_index(name), name, values)
    return out


def object_delta(current: pa.Table, new: pa.Table, increment: bool, decrement: bool) -> pa.Table:
    """``(id, delta)`` of nDiaSources: +1 per source moved to an object (``increment``), -1 per
    source moved away (``decrement``); zero deltas left out."""
    old_ids = pc.drop_null(current.column("diaObjectId")).to_numpy() if decrement else np.zeros(0)
    new_ids = pc.drop_null(new.column("diaObjectId")).to_numpy() if increment else np.zeros(0)
    ids = np.concatenate([old_ids, new_ids]).astype(np.int64)
    signs = np.concatenate([-np.ones(len(old_ids)), np.ones(len(new_ids))]).astype(np.int64)
    uniq, inverse = np.unique(ids, return_inverse=True)
    delta = np.zeros(len(uniq), dtype=np.int64)
    np.add.at(delta, inverse, signs)
    keep = delta != 0
    return pa.table({"id": uniq[keep], "delta": delta[keep]})


def object_counts(rows: pa.Table) -> list[dict[str, Any]]:
    """``{diaObjectId, ra, dec, nDiaSources}`` per row of (id, ra, dec, count)."""
    types = (pa.int64(), pa.float64(), pa.float64(), pa.int64())
    names = ["diaObjectId", "ra", "dec", "nDiaSources"]
    typed = pa.table([rows.column(i).cast(t) for i, t in enumerate(types)], names=names)
    counts: list[dict[str, Any]] = typed.to_pylist()
    return counts


def update_payload(
    new: pa.Table,
    changes: pa.Table,
    when_mjd: float,
    counts: list[dict[str, Any]],
    current: pa.Table | None = None,
) -> dict[str, Any]:
    """The change-log record of a source update: each row's new values and its position, and
    (``before``) the values it replaces, from which a replica gives rows back as stored."""
    changed = [c for c in changes.column_names if c != "diaSourceId"]
    rows = new.select(["diaSourceId", "ra", "dec", "midpointMjdTai", *changed]).to_pylist()
    if current is not None:
        ids = current.column("diaSourceId").to_pylist()
        before = dict(zip(ids, current.select(changed).to_pylist(), strict=True))
        for row in rows:
            row["before"] = before[row["diaSourceId"]]
    payload: dict[str, Any] = {"when_mjd_tai": when_mjd, "rows": rows}
    if counts:
        payload["objects"] = counts
    return payload


def closing_payload(closed: pa.Table, when_mjd: float) -> dict[str, Any]:
    """The change-log record of ``set_validity_end``: the objects closed (id, ra, dec columns)."""
    objects = pa.table(
        {
            "diaObjectId": closed.column(0).cast(pa.int64()),
            "ra": closed.column(1).cast(pa.float64()),
            "dec": closed.column(2).cast(pa.float64()),
        }
    ).to_pylist()
    return {
        "when_mjd_tai": when_mjd,
        "diaObjectIds": [o["diaObjectId"] for o in objects],
        "objects": objects,
    }


def require_known(kind: str, wanted: npt.ArrayLike, found: npt.ArrayLike) -> None:
    """:class:`UnknownIdError` naming the ids of ``wanted`` that are not in ``found``."""
    unknown = np.setdiff1d(np.asarray(wanted, dtype=np.int64), np.asarray(found, dtype=np.int64))
    if len(unknown):
        raise UnknownIdError(f"unknown {kind} ids: {unknown[:20].tolist()}")


@dataclass(frozen=True)
class SourceUpdatePlan:
    """What a DiaSource update writes, computed before any write."""

    #: The rows that change, with their stored values (:data:`CURRENT_COLUMNS`).
    current: pa.Table
    #: The same rows with their new values.
    new: pa.Table
    #: The requested changes of those rows only.
    changes: pa.Table
    #: The DiaObjects the sources move to; each must be a current object.
    targets: Int64Array
    #: ``(id, delta)`` of ``nDiaSources`` (empty without object deltas).
    delta: pa.Table

    def payload(self, when_mjd: float, counts: list[dict[str, Any]]) -> dict[str, Any]:
        """The change-log record, given the objects' new counts (see :func:`object_counts`)."""
        return update_payload(self.new, self.changes, when_mjd, counts, self.current)


def plan_source_update(
    stored: pa.Table,
    changes: pa.Table,
    *,
    object_deltas: bool,
    increment: bool = True,
    decrement: bool = True,
    only_null: str | None = None,
) -> SourceUpdatePlan | None:
    """The plan of a DiaSource update; ``None`` when no row changes.

    ``stored`` holds the current values of every stored DiaSource among ``changes``'
    ``diaSourceId``s (wherever the engine keeps it, overlays applied); ids missing from it
    raise :class:`UnknownIdError` and nothing is planned. Rows whose ``only_null`` column is
    already set are left alone; with ``object_deltas`` the new (``increment``) and old
    (``decrement``) DiaObjects' counts follow the move.
    """
    current = normalise_current(stored)
    require_known("DiaSource", changes.column("diaSourceId").to_numpy(), current.column(0).to_numpy())
    current, changes = unset_only(current, changes, only_null)
    if not current.num_rows:
        return None
    new = merge_changes(current, changes)
    targets = np.zeros(0, dtype=np.int64)
    if "diaObjectId" in changes.column_names:
        targets = np.unique(pc.drop_null(changes.column("diaObjectId")).to_numpy()).astype(np.int64)
    delta = (
        object_delta(current, new, increment, decrement)
        if object_deltas
        else pa.table({"id": pa.array([], pa.int64()), "delta": pa.array([], pa.int64())})
    )
    return SourceUpdatePlan(current=current, new=new, changes=changes, targets=targets, delta=delta)


# ---- DiaForcedSource withdrawals -------------------------------------------------------
def normalise_forced(t: pa.Table) -> pa.Table:
    """``t``'s :data:`FORCED_CURRENT` columns with fixed types."""
    return pa.table([t.column(f.name).cast(f.type) for f in _FORCED_SCHEMA], schema=_FORCED_SCHEMA)


def empty_forced() -> pa.Table:
    """No DiaForcedSources, with the :data:`FORCED_CURRENT` columns and their types."""
    return _FORCED_SCHEMA.empty_table()


def forced_keys(keys: Sequence[tuple[int, int, int]]) -> pa.Table:
    """``(diaObjectId, visit, detector)`` tuples as a de-duplicated int64 table."""
    arr = np.asarray(list(keys), dtype=np.int64).reshape(-1, 3)
    arr = np.unique(arr, axis=0) if len(arr) else arr
    return pa.table({c: arr[:, i] for i, c in enumerate(FORCED_KEY)})


def missing_keys(keys: pa.Table, found: pa.Table) -> pa.Table:
    """The rows of ``keys`` not in ``found`` (both with the :data:`FORCED_KEY` columns)."""
    if not found.num_rows:
        return keys
    return keys.join(found.select(list(FORCED_KEY)), keys=list(FORCED_KEY), join_type="left anti")


def require_known_forced(unknown: pa.Table) -> None:
    """:class:`UnknownIdError` naming the forced-source keys in ``unknown`` (if any)."""
    if unknown.num_rows:
        shown = list(zip(*(unknown.column(c).to_pylist() for c in FORCED_KEY), strict=True))[:20]
        raise UnknownIdError(f"unknown DiaForcedSource keys (diaObjectId, visit, detector): {shown}")


def forced_payload(rows: pa.Table, when_mjd: float, logged_mjd: float) -> dict[str, Any]:
    """The change-log record of a forced withdrawal: each row's key, position and new time."""
    data = rows.select([*FORCED_KEY, "ra", "dec", "midpointMjdTai"])
    data = data.append_column("timeWithdrawnMjdTai", pa.array(np.full(rows.num_rows, when_mjd)))
    return {"when_mjd_tai": logged_mjd, "rows": data.to_pylist()}


# ---- overlays (current values of rows in immutable segments) ---------------------------
def apply_source_overlay(data: pa.Table, overlay: pa.Table) -> pa.Table:
    """``data`` with its mutable DiaSource columns replaced where ``overlay`` (``diaSourceId``
    and any of :data:`MUTABLE_SOURCE_COLUMNS`) names the row. Order-preserving."""
    if not overlay.num_rows or not data.num_rows or "diaSourceId" not in data.column_names:
        return data
    pos = pc.index_in(data.column("diaSourceId"), value_set=overlay.column("diaSourceId").cast(pa.int64()))
    hit = pc.is_valid(pos)
    if not pc.any(hit).as_py():
        return data
    take = pc.fill_null(pos, 0)
    for name in MUTABLE_SOURCE_COLUMNS:
        if name in data.column_names and name in overlay.column_names:
            field = data.schema.field(name)
            values = overlay.column(name).cast(field.type).take(take)
            data = data.set_column(
                data.schema.get_field_index(name), field, pc.if_else(hit, values, data.column(name))
            )
    return data


def apply_forced_overlay(data: pa.Table, overlay: pa.Table) -> pa.Table:
    """``data`` with ``timeWithdrawnMjdTai`` replaced where ``overlay`` (the key columns and
    ``_w``, the withdrawal time) names the row. Row order may change (callers sort afterwards)."""
    if not overlay.num_rows or not data.num_rows or "timeWithdrawnMjdTai" not in data.column_names:
        return data
    if any(c not in data.column_names for c in FORCED_KEY):
        return data
    types = {c: data.schema.field(c).type for c in FORCED_KEY}
    right = pa.table(
        {
            **{c: overlay.column(c).cast(types[c]) for c in FORCED_KEY},
            "_w": overlay.column("_w").cast(pa.float64()),
        }
    )
    joined = data.join(right, keys=list(FORCED_KEY), join_type="left outer", coalesce_keys=True)
    field = data.schema.field("timeWithdrawnMjdTai")
    value = pc.coalesce(joined.column("_w").cast(field.type), joined.column("timeWithdrawnMjdTai"))
    joined = joined.set_column(joined.schema.get_field_index("timeWithdrawnMjdTai"), field, value)
    return joined.drop_columns(["_w"]).select(data.column_names).cast(data.schema)
