"""``Apdb.delete_chunks`` and ``diadb chunks delete`` on every engine (SQLite, the session's
PostgreSQL and Cassandra): only published chunks go, the newest stays and ids are never
handed out twice, the stored rows and the keyed-store registries stay, an incremental HATS
export after a deletion is still right (and a stale one is refused), and on Cassandra a
daytime retry still finds its chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner, Result

import diadb
from diadb.cli import app
from diadb.errors import CatalogError, ConfigError
from diadb.schema import ApdbSchema
from tests.conftest import make_url
from tests.helpers import make_visit, random_positions

ENGINES = ["sqlite", "postgresql", "cassandra"]
EVERYWHERE = "circle 0 0 180"


def _invoke(args: list[object]) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _store(db: diadb.Apdb, schema: ApdbSchema, visit: int, *, key: str | None = None) -> bool:
    """Visit ``visit`` (5 new objects) at MJD 60000.5 + visit."""
    ra, dec = random_positions(5, seed=visit)
    ids = np.arange(1 + 5 * visit, 6 + 5 * visit)
    # One source each, and counted so: the export's content checks (nDiaSources) hold.
    v = make_visit(schema, visit, 60000.5 + visit, ids, ra, dec, n_dia_sources=np.ones(5, np.int64))
    return db.store(v.mjd, v.objects, v.sources, v.forced, visit=visit, key=key)


@pytest.fixture(params=ENGINES)
def url(request: pytest.FixtureRequest, tmp_path: Path, official_schema: ApdbSchema) -> str:
    """A new APDB on each engine, with time partitions for 30 days on the servers."""
    made = make_url(str(request.param), tmp_path, request)
    with diadb.Apdb.create(made, schema=official_schema) as db:
        if db.location().scheme != "sqlite":
            db.create_time_partitions(60000.0, 60030.0)
    return made


def _ids(db: diadb.Apdb, **kw: bool) -> list[int]:
    return [int(i) for i in db.replica_chunks(**kw).column("chunk_id").to_pylist()]


def test_published_chunks_are_deleted_and_unpublished_refused(url: str, official_schema: ApdbSchema) -> None:
    with diadb.Apdb.open(url) as db:
        for visit in range(1, 5):
            _store(db, official_schema, visit)
        chunks = _ids(db)
        assert len(chunks) == 4
        db.mark_published(chunks[:3])
        sources = db.get_sources(EVERYWHERE, 60010.0).num_rows
    # --before: chunks 1 and 2 (visits at 60001.5 and 60002.5).
    result = _invoke(["chunks", "delete", url, "--before", "60003", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert not out["dry_run"] and [c["chunk_id"] for c in out["chunks"]] == chunks[:2]
    # A dry run lists, deletes nothing; the newest chunk and unpublished ones are not listed.
    result = _invoke(["chunks", "delete", url, "--all-published", "--dry-run"])
    assert result.exit_code == 0 and "1 chunk(s) would be deleted" in result.stdout
    assert result.stdout.splitlines()[1].split()[:3] == [str(chunks[2]), "store", "3"]
    # An unpublished chunk among those chosen: refused by name, nothing deleted.
    result = _invoke(["chunks", "delete", url, "--before", "60010"])
    assert result.exit_code == 2 and f"chunks [{chunks[3]}]" in result.stderr
    assert "not published" in result.stderr
    assert _invoke(["chunks", "delete", url]).exit_code == 2
    with diadb.Apdb.open(url) as db:
        assert _ids(db) == chunks[2:]
        with pytest.raises(ConfigError, match=rf"chunks \[{chunks[0]}\] are not in the change log"):
            db.delete_chunks([chunks[0]])
        with pytest.raises(ConfigError, match="not published"):
            db.delete_chunks(chunks[2:])
        assert _ids(db) == chunks[2:]
        # Everything published: the newest chunk stays all the same.
        db.mark_published(chunks)
        gone = db.delete_chunks(chunks[2:])
        assert gone.column("chunk_id").to_pylist() == [chunks[2]]
        assert _ids(db) == [chunks[3]]
        assert db.deleted_chunks_through() == chunks[2]
        # The rows are APDB data: all still there. A new chunk takes a new id.
        assert db.get_sources(EVERYWHERE, 60010.0).num_rows == sources
        assert _store(db, official_schema, 5)
        assert _ids(db) == [chunks[3], chunks[3] + 1]
        assert db.read_chunks([chunks[3] + 1])["DiaSource"].num_rows == 5
        # What is left still reads back its rows.
        assert db.read_chunks([chunks[3]])["DiaSource"].num_rows == 5


def test_keyed_stores_and_visits_are_still_known_after_deletion(
    url: str, official_schema: ApdbSchema
) -> None:
    with diadb.Apdb.open(url) as db:
        assert _store(db, official_schema, 1, key="a")
        assert _store(db, official_schema, 2)
        db.mark_published(_ids(db))
        assert len(db.delete_chunks(before=60010.0)) == 1
        # The same key is still a no-op, the same visit still stored.
        assert _store(db, official_schema, 1, key="a") is False
        assert _store(db, official_schema, 2) is False
        # Another keyed store (another visit) reusing the first one's DiaSource ids: still refused.
        ra, dec = random_positions(5, seed=1)
        again = make_visit(official_schema, 3, 60003.5, np.arange(6, 11), ra, dec)
        first_ids = pa.array(np.arange(6, 11) * 100_000 + 1)
        sources = again.sources.set_column(
            again.sources.schema.get_field_index("diaSourceId"), "diaSourceId", first_ids
        )
        with pytest.raises(diadb.Error):
            db.store(again.mjd, again.objects, sources, again.forced, visit=3, key="b")
        assert db.get_sources(EVERYWHERE, 60010.0).num_rows == 10
        assert len(_ids(db)) == 1


def test_keys_in_history_segments_are_still_refused_after_deletion(
    tmp_path: Path, official_schema: ApdbSchema
) -> None:
    """With the history tier, a keyed store's rows moved into segments are known by the keys it
    recorded: deleting its chunk leaves them, so another keyed store of those keys is refused."""
    db = diadb.Apdb.create(
        tmp_path / "apdb.db", schema=official_schema, history_span_days=1.0, history_span_offset_days=0.0
    )
    ra, dec = random_positions(20, 7)
    first = make_visit(official_schema, 1, 60002.0, np.arange(1, 21), ra, dec, seed=1)
    assert db.store(first.mjd, first.objects, first.sources, first.forced, visit=1, key="a")
    _store(db, official_schema, 9)
    db.compact(boundary=first.mjd + 1)
    db.mark_published(_ids(db))
    assert len(db.delete_chunks(before=60003.0)) == 1
    again = make_visit(official_schema, 1, 60002.0, np.arange(1, 21), ra, dec, seed=1)
    sources = again.sources.set_column(
        again.sources.schema.get_field_index("diaSourceId"), "diaSourceId", pa.array(np.arange(5000, 5020))
    )
    with pytest.raises(CatalogError, match="already stored") as err:
        db.store(again.mjd, again.objects, sources, again.forced, visit=1, key="b")
    assert err.value.table == "DiaForcedSource"
    assert db.store(first.mjd, first.objects, first.sources, first.forced, visit=1, key="a") is False
    db.close()


def test_daytime_chunks_go_with_their_update_records(url: str, official_schema: ApdbSchema) -> None:
    with diadb.Apdb.open(url) as db:
        _store(db, official_schema, 1)
        db.set_validity_end([6], 60003.0)
        db.log_updates("external", [{"n": 1}], 60004.0)
        _store(db, official_schema, 2)
        store, update, logged, newest = _ids(db)
        assert db.read_chunks([update, logged])["updates"].num_rows == 2
        db.mark_published([store, update, logged, newest])
        assert db.delete_chunks([update, logged]).column("kind").to_pylist() == ["update", "update"]
        assert _ids(db) == [store, newest]
        assert db.read_chunks([update, logged])["updates"].num_rows == 0
        # The daytime change itself stays.
        assert 6 not in db.get_objects(EVERYWHERE).column("diaObjectId").to_pylist()


def test_incremental_export_after_deletion(url: str, official_schema: ApdbSchema, tmp_path: Path) -> None:
    """Exports publish their chunks; those deleted, the next incremental export is still the
    database's rows. An export that had not applied a deleted chunk is refused."""
    pytest.importorskip("lsdb")
    from diadb.ppdb.hats_export import export_hats
    from diadb.ppdb.layout import TABLES, PublicationError
    from diadb.ppdb.verify import verify_export
    from tests.test_ppdb import SMALL, _all_rows, _export_rows

    with diadb.Apdb.open(url) as db:
        for visit in (1, 2):
            _store(db, official_schema, visit)
        out, stale = tmp_path / "ppdb", tmp_path / "stale"
        export_hats(db, out, options=SMALL)
        export_hats(db, stale, options=SMALL, mark_published=False)
        assert len(db.delete_chunks(before=60010.0)) == 1  # the newest stays
        _store(db, official_schema, 3)
        db.set_validity_end([6], 60004.0)
        second = export_hats(db, out, options=SMALL)
        assert second.incremental and second.chunks_applied == 2
        for table in TABLES:
            got = _export_rows(out, table)
            assert got.equals(_all_rows(db, table).cast(got.schema)), table
        report = verify_export(out)
        assert report.ok, report
        # ``stale`` applied chunks 1-2 and the next export has published and deleted 3 and 4.
        _store(db, official_schema, 4)
        export_hats(db, out, options=SMALL)
        db.delete_chunks(before=60010.0)
        with pytest.raises(PublicationError, match="were deleted"):
            export_hats(db, stale, options=SMALL)


def test_cassandra_keeps_the_chunk_a_retry_looks_for(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    official_schema: ApdbSchema,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daytime call that took its chunk but failed before it finished: its chunk is kept
    (published or not), so the retry finds it and takes no second one."""
    from diadb.backends.cassandra import changelog

    made = make_url("cassandra", tmp_path, request)
    with diadb.Apdb.create(made, schema=official_schema) as db:
        db.create_time_partitions(60000.0, 60030.0)
        _store(db, official_schema, 1)
        real_end = changelog.ChangeLog.end
        failed: list[str] = []

        def crash_once(self: changelog.ChangeLog, op_key: str) -> None:
            if op_key.startswith("log:") and not failed:
                failed.append(op_key)
                raise RuntimeError("crash before the pending record is deleted")
            real_end(self, op_key)

        monkeypatch.setattr(changelog.ChangeLog, "end", crash_once)
        with pytest.raises(RuntimeError):
            db.log_updates("external", [{"n": 1}], 60004.0)
        _store(db, official_schema, 2)
        store, pending, newest = _ids(db)
        db.mark_published([store, pending, newest])
        assert db.delete_chunks([store, pending], dry_run=True).column("chunk_id").to_pylist() == [store]
        assert db.delete_chunks([store, pending]).column("chunk_id").to_pylist() == [store]
        assert db.log_updates("external", [{"n": 1}], 60004.0) == pending
        assert _ids(db) == [pending, newest]
        # Finished now: it can go.
        assert db.delete_chunks([pending]).column("chunk_id").to_pylist() == [pending]


def test_the_facade_replica_deletes_what_it_is_told_to(tmp_path: Path) -> None:
    """``ApdbReplica.deleteReplicaChunks`` (what ``apdb-cli replication delete-chunks`` calls)
    deletes diadb's chunks of those windows; the rows stay."""
    pytest.importorskip("lsst.dax.apdb")
    import astropy.time
    from lsst.dax.apdb import Apdb, ApdbReplica
    from lsst.dax.apdb.tests.data_factory import makeObjectCatalog, makeSourceCatalog
    from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d

    from diadb.compat.dax import DiadbApdb
    from tests.test_compat_dax import TEST_SCHEMA

    schema = tmp_path / "schema.yaml"
    schema.write_text(TEST_SCHEMA)
    config = DiadbApdb.init_database(
        f"sqlite:///{tmp_path}/apdb.db", schema_file=str(schema), enable_replica=True
    )
    apdb = Apdb.from_config(config)
    replica = ApdbReplica.from_config(config)
    region = Circle(UnitVector3d(LonLat.fromDegrees(10.0, 5.0)), Angle.fromDegrees(0.05))
    start = astropy.time.Time("2025-03-01T00:00:00", format="isot", scale="tai")
    for i, minute in enumerate((1, 31, 61)):
        when = start + astropy.time.TimeDelta(60.0 * minute, format="sec")
        objects = makeObjectCatalog(region, 10, start_id=1 + 10 * i)
        apdb.store(when, objects, makeSourceCatalog(objects, when, start_id=100 * i, visit=i + 1, detector=5))
    windows = [c.id for c in replica.getReplicaChunks() or []]
    assert len(windows) == 3
    replica.deleteReplicaChunks(windows[:2])
    assert [c.id for c in replica.getReplicaChunks() or []] == windows[2:]
    with diadb.Apdb.open(tmp_path / "apdb.db") as db:
        assert len(_ids(db)) == 1 and db.deleted_chunks_through() == 2
        assert db.get_sources(EVERYWHERE, 60740.0).num_rows == 30
    # All windows: the newest diadb chunk stays, published, not listed.
    replica.deleteReplicaChunks(windows)
    assert replica.getReplicaChunks() == []
