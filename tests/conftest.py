from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import diadb
from diadb.schema import ApdbSchema, load_schema

BACKENDS = ["sqlite"]


@pytest.fixture(scope="session")
def official_schema() -> ApdbSchema:
    return load_schema()


def make_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return str(tmp_path / "apdb.db")
    raise AssertionError(backend)


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return make_url(request.param, tmp_path)


@pytest.fixture
def apdb(backend_url: str, official_schema: ApdbSchema) -> Iterator[diadb.Apdb]:
    db = diadb.Apdb.create(backend_url, schema=official_schema)
    yield db
    db.close()
