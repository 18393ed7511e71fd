"""Incremental HATS updates (issue 20, items 2 and 3): every kind of daytime change, applied in
order, gives what a full re-export gives, for the flat catalogs, the light curves and the DiaObject
versions; applying the same chunks twice changes nothing; a failed update leaves the previous
export published and valid; the light curves are the database's."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pytest

import diadb
from diadb.ppdb.hats_export import ExportOptions, export_hats
from diadb.ppdb.layout import TABLES, Manifest, catalog_dir, current_version
from diadb.ppdb.nested import LIGHT_CURVES
from diadb.ppdb.verify import verify_export
from diadb.ppdb.versions import VERSIONS
from diadb.ppdb.writer import TableWriter
from diadb.schema import ApdbSchema
from tests.helpers import make_visit, random_positions, sliding_visits

pytest.importorskip("lsdb")
pytestmark = [
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

OPTS = ExportOptions(max_rows={"DiaObject": 60, "DiaSource": 150, "DiaForcedSource": 150}, light_curves=True)
CATALOGS = (*TABLES, LIGHT_CURVES, VERSIONS)
KEYS = {
    "DiaObject": ["diaObjectId"],
    LIGHT_CURVES: ["diaObjectId"],
    VERSIONS: ["diaObjectId", "validityStartMjdTai"],
    "DiaSource": ["diaSourceId"],
    "DiaForcedSource": ["diaObjectId", "visit", "detector"],
}


def rows(root: Path, catalog: str) -> pa.Table:
    files = sorted(str(p) for p in (catalog_dir(root, catalog) / "dataset").rglob("Npix=*.parquet"))
    t = pds.dataset(files, format="parquet").to_table()
    return t.sort_by([(k, "ascending") for k in KEYS[catalog]])


def _store(db: diadb.Apdb, schema: ApdbSchema, visits: range) -> None:
    for v in sliding_visits(schema, visits):
        db.store(v.mjd, v.objects, v.sources, v.forced, visit=v.visit)


def day_one(db: diadb.Apdb, schema: ApdbSchema) -> None:
    """Visit 5, then two sources of objects that visit 6 does not see again move: one to another
    object, one to an SSObject (its object, 1, had only that source: it is closed)."""
    _store(db, schema, range(5, 6))
    db.reassign_sources({10 * 100_000 + 5: 2}, time=60005.4)
    db.reassign_to_ssobjects({1 * 100_000 + 5: 9001}, time=60005.5)


def day_two(db: diadb.Apdb, schema: ApdbSchema) -> None:
    """Visit 6 and a far field, then withdrawals, a closed object and a record of the user's."""
    _store(db, schema, range(6, 7))
    far = make_visit(
        schema,
        50,
        60006.2,
        np.arange(900, 940),
        *random_positions(40, 3, ra0=120.0),
        n_dia_sources=np.ones(40),
    )
    db.store(far.mjd, far.objects, far.sources, far.forced, visit=50)
    db.withdraw_sources([60 * 100_000 + 6], time=60006.5)
    db.withdraw_forced_sources([(70, 6, 0)], time=60006.6)
    assert db.set_validity_end([270], 60006.7) == 1
    db.log_updates("user_note", [{"diaObjectId": 3, "note": "looked at it"}], 60006.8)


@pytest.fixture
def night(tmp_path: Path, official_schema: ApdbSchema) -> Iterator[diadb.Apdb]:
    db = diadb.Apdb.create(tmp_path / "apdb.db", schema=official_schema)
    _store(db, official_schema, range(1, 5))
    yield db
    db.close()


def _assert_same(a: Path, b: Path) -> None:
    for catalog in CATALOGS:
        x, y = rows(a, catalog), rows(b, catalog)
        assert x.num_rows > 0, catalog
        assert x.equals(y), catalog


def test_every_daytime_change_incrementally_equals_a_full_export(
    night: diadb.Apdb, official_schema: ApdbSchema, tmp_path: Path
) -> None:
    inc = tmp_path / "inc"
    first = export_hats(night, inc, options=OPTS)
    v1 = current_version(inc)
    day_one(night, official_schema)
    second = export_hats(night, inc, options=OPTS)
    assert second.incremental and second.chunks_applied == 3
    v2 = current_version(inc)
    assert v2 != v1 and v1.exists()  # the version before stays for its readers
    day_two(night, official_schema)
    third = export_hats(night, inc, options=OPTS)
    assert third.incremental and third.chunks_applied == 6
    assert first.last_chunk_id is not None and third.last_chunk_id == first.last_chunk_id + 9
    # Only the current version and the one before it remain.
    assert sorted(p.name for p in (inc / "versions").iterdir()) == [v2.name, current_version(inc).name]
    full = tmp_path / "full"
    export_hats(night, full, options=OPTS, mark_published=False)
    _assert_same(inc, full)
    report = verify_export(inc)
    assert report.ok, report.problems
    # The changes are there: object 1 closed (no source left), object 270 closed, both still
    # among the versions with their end; the withdrawn rows carry their time.
    latest = rows(inc, "DiaObject").column("diaObjectId").to_pylist()
    assert 1 not in latest and 270 not in latest and 2 in latest
    versions = rows(inc, VERSIONS)
    ends = {
        (o, s): e
        for o, s, e in zip(
            *(
                versions.column(c).to_pylist()
                for c in ("diaObjectId", "validityStartMjdTai", "validityEndMjdTai")
            ),
            strict=True,
        )
    }
    assert ends[(1, 60005.0)] == 60005.5
    assert ends[(270, 60004.0)] == 60006.7
    sources = rows(inc, "DiaSource")
    moved = sources.filter(pc.equal(sources.column("diaSourceId"), 10 * 100_000 + 5))
    assert moved.column("diaObjectId").to_pylist() == [2]
    withdrawn = sources.filter(pc.equal(sources.column("diaSourceId"), 60 * 100_000 + 6))
    assert withdrawn.column("timeWithdrawnMjdTai").to_pylist() == [60006.5]
    # Nothing new: nothing written, not even a new version.
    published = current_version(inc)
    again = export_hats(night, inc, options=OPTS)
    assert again.chunks_applied == 0 and current_version(inc) == published


def test_applying_the_same_chunks_twice_changes_nothing(
    night: diadb.Apdb, official_schema: ApdbSchema, tmp_path: Path
) -> None:
    out = tmp_path / "ppdb"
    first = export_hats(night, out, options=OPTS)
    day_one(night, official_schema)
    day_two(night, official_schema)
    export_hats(night, out, options=OPTS)
    # The export forgets it applied them (as after a crash between writing and recording):
    # the same chunks are applied again on top of their own result.
    version = current_version(out)
    manifest = Manifest.read(version)
    manifest.last_chunk_id = first.last_chunk_id
    manifest.write(version)
    redo = export_hats(night, out, options=OPTS)
    assert redo.chunks_applied == 9
    full = tmp_path / "full"
    export_hats(night, full, options=OPTS, mark_published=False)
    _assert_same(out, full)
    assert verify_export(out).ok, verify_export(out).problems


def test_a_failed_update_leaves_the_previous_export_valid(
    night: diadb.Apdb, official_schema: ApdbSchema, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ppdb"
    export_hats(night, out, options=OPTS)
    before = {c: rows(out, c) for c in CATALOGS}
    published = current_version(out)
    day_one(night, official_schema)
    day_two(night, official_schema)
    original = TableWriter.write_partition
    calls = {"n": 0}

    def failing(self: TableWriter, pixel: object) -> int:
        calls["n"] += 1
        if calls["n"] == 4:  # mid-way: some partitions of the new version are written
            raise OSError(28, "No space left on device")
        return original(self, pixel)  # type: ignore[arg-type]

    monkeypatch.setattr(TableWriter, "write_partition", failing)
    with pytest.raises(OSError, match="No space"):
        export_hats(night, out, options=OPTS)
    monkeypatch.undo()
    assert calls["n"] == 4
    assert current_version(out) == published
    assert [p.name for p in (out / "versions").iterdir()] == [published.name]
    report = verify_export(out)
    assert report.ok, report.problems
    for c in CATALOGS:
        assert rows(out, c).equals(before[c]), c
    import lsdb

    assert len(lsdb.open_catalog(out / "DiaObject").compute()) == before["DiaObject"].num_rows
    # A process killed mid-update leaves its unfinished version behind: the next update drops it.
    leftover = out / "versions" / "v000002" / "DiaObject"
    leftover.mkdir(parents=True)
    (leftover / "junk.parquet").write_bytes(b"partial")
    # The next update applies everything (nothing was marked published).
    assert len(night.replica_chunks(published=False)) == 9
    retry = export_hats(night, out, options=OPTS)
    assert retry.chunks_applied == 9
    assert not (current_version(out) / "DiaObject" / "junk.parquet").exists()
    full = tmp_path / "full"
    export_hats(night, full, options=OPTS, mark_published=False)
    _assert_same(out, full)


def test_light_curves_are_the_databases(
    night: diadb.Apdb, official_schema: ApdbSchema, tmp_path: Path
) -> None:
    day_one(night, official_schema)
    day_two(night, official_schema)
    out = tmp_path / "ppdb"
    export_hats(night, out, options=dataclasses.replace(OPTS, light_curves=True))
    import lsdb
    from nested_pandas import NestedDtype

    frame = lsdb.open_catalog(out / LIGHT_CURVES).compute()
    assert isinstance(frame.dtypes["diaSource"], NestedDtype)
    assert isinstance(frame.dtypes["diaForcedSource"], NestedDtype)
    lc = rows(out, LIGHT_CURVES)
    objects = rows(out, "DiaObject")
    assert lc.select(objects.column_names).equals(objects)
    ids = np.asarray(lc.column("diaObjectId").to_numpy(), dtype=np.int64)
    for column, table, key in (
        ("diaSource", "DiaSource", ["diaSourceId"]),
        ("diaForcedSource", "DiaForcedSource", ["visit", "detector"]),
    ):
        nested = lc.column(column).combine_chunks()
        flat = pa.Table.from_struct_array(pc.list_flatten(nested))
        owner = ids[pc.list_parent_indices(nested).to_numpy()]
        # Each object's rows, in time order, are its rows of the database.
        assert np.array_equal(owner, flat.column("diaObjectId").to_numpy())
        t = flat.column("midpointMjdTai").to_numpy()
        same = owner[1:] == owner[:-1]
        assert np.all(t[1:][same] >= t[:-1][same])
        read = night.get_sources if table == "DiaSource" else night.get_forced_sources
        expected = read(None, 60100.0, object_ids=ids, start=float("-inf"), end=float("inf"))
        order = [
            ("diaObjectId", "ascending"),
            ("midpointMjdTai", "ascending"),
            *((k, "ascending") for k in key),
        ]
        assert flat.sort_by(order).equals(expected.sort_by(order).cast(flat.schema)), column
        assert expected.num_rows == len(flat) > 0
        # In lsdb too: the same number of rows per object.
        counts = frame[column].nest.to_flat().groupby(level=0).size()
        assert int(counts.sum()) == len(flat)
    # The moved source is in its new object's light curve, not the old one's.
    two = lc.filter(pc.equal(lc.column("diaObjectId"), 2)).column("diaSource")[0].as_py()
    assert 10 * 100_000 + 5 in [s["diaSourceId"] for s in two]
    assert os.path.isdir(out / LIGHT_CURVES / f"{LIGHT_CURVES}_margin")


def test_versions_are_every_stored_version(
    night: diadb.Apdb, official_schema: ApdbSchema, tmp_path: Path
) -> None:
    day_one(night, official_schema)
    day_two(night, official_schema)
    out = tmp_path / "ppdb"
    export_hats(night, out, options=OPTS)
    versions = rows(out, VERSIONS)
    stored = [
        (int(o), 60000.0 + v.visit)
        for v in sliding_visits(official_schema, range(1, 7))
        for o in v.objects.column("diaObjectId").to_pylist()
    ]
    stored += [(int(o), 60006.2) for o in range(900, 940)]
    keys = list(
        zip(
            versions.column("diaObjectId").to_pylist(),
            versions.column("validityStartMjdTai").to_pylist(),
            strict=True,
        )
    )
    assert sorted(keys) == sorted(stored)
    # Open versions are the latest ones, exactly.
    open_ = versions.filter(pc.is_null(versions.column("validityEndMjdTai")))
    assert open_.sort_by([("diaObjectId", "ascending")]).equals(rows(out, "DiaObject"))
    # A superseded version ends where the next begins.
    ends = versions.filter(pc.equal(versions.column("diaObjectId"), 100))
    assert (
        ends.column("validityEndMjdTai").to_pylist()[:-1]
        == ends.column("validityStartMjdTai").to_pylist()[1:]
    )
