from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import diadb
from diadb.schema import ApdbSchema, load_schema

# Every backend variant runs the shared suite (test_store_read.py, test_validation.py).
# SQLite: the default (history tier on, 7-day segments), one where nearly every row lives in
# segments, and one without the tier. PostgreSQL and Cassandra: their default (the tier off),
# and nearly every row in segments (blobs in the server).
BACKENDS = [
    "sqlite",
    "sqlite-segments",
    "sqlite-engine-only",
    "postgresql",
    "postgresql-segments",
    "cassandra",
    "cassandra-segments",
]
#: Nearly every row in 1-day history segments cut by order-5 sky tiles.
SEGMENTS = {
    "history_tier": True,
    "history_span_days": 1.0,
    "history_span_offset_days": 0.0,
    "history_compact_lag_days": 0.0,
    "history_tile_order": 5,
}
CREATE_OPTIONS: dict[str, dict[str, Any]] = {
    "sqlite-segments": SEGMENTS,
    "sqlite-engine-only": {"history_tier": False},
    "postgresql-segments": SEGMENTS,
    "cassandra-segments": SEGMENTS,
}


@pytest.fixture(scope="session")
def official_schema() -> ApdbSchema:
    return load_schema()


def make_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest | None = None) -> str:
    if backend.startswith("sqlite"):
        return str(tmp_path / "apdb.db")
    if backend.startswith("postgresql"):  # a fresh schema on the session's server (tests/service_postgres.py)
        from tests.service_postgres import fresh_url

        assert request is not None, "a PostgreSQL URL needs the test's request"
        return fresh_url(request)
    if backend.startswith("cassandra"):  # a fresh keyspace on the session's node (tests/service_cassandra.py)
        from tests.service_cassandra import fresh_url as fresh_keyspace_url

        assert request is not None, "a Cassandra URL needs the test's request"
        return fresh_keyspace_url(request)
    raise AssertionError(backend)


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_url(backend_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return make_url(backend_name, tmp_path, request)


@pytest.fixture
def create_options(backend_name: str) -> dict[str, Any]:
    return CREATE_OPTIONS.get(backend_name, {})


@pytest.fixture
def apdb(
    backend_url: str, official_schema: ApdbSchema, create_options: dict[str, Any]
) -> Iterator[diadb.Apdb]:
    db = diadb.Apdb.create(backend_url, schema=official_schema, **create_options)
    yield db
    db.close()


@pytest.fixture(autouse=True, scope="module")
def _no_cassandra_client_outlives_its_module() -> Iterator[None]:
    """Shut down every Cassandra driver cluster a module left open (the reference's ``Apdb``
    has no close, so its own test suite drops instances). A live cluster keeps threads that
    reconnect with random jitter from the global ``random`` state, which Hypothesis reads as a
    strategy using ``random`` and fails a fuzz test in a later module."""
    yield
    import gc
    import sys

    if "cassandra.cluster" not in sys.modules:
        return
    from cassandra.cluster import Cluster

    from tests import service_cassandra

    gc.collect()
    shared = service_cassandra._node._cluster if service_cassandra._node is not None else None
    for obj in gc.get_objects():
        # type(), not isinstance(): the heap holds dead weak proxies, which raise on isinstance.
        if type(obj) is Cluster and obj is not shared and not obj.is_shutdown:
            obj.shutdown()
