"""SQLite database names that would give a wrong answer are refused ("Never a wrong answer",
class 7): an empty path or ``:memory:`` (a temporary database that vanishes, with a stray
history directory), and ``scheme:`` strings that are not ``sqlite:///`` URLs (``sqlite:/x.db``
would make a directory named ``sqlite:``). A bare relative path stays a path."""

from __future__ import annotations

from pathlib import Path

import pytest

import diadb
from diadb.backends import locate
from diadb.backends.sqlite.url import path_from_url
from diadb.errors import ConfigError
from diadb.schema import ApdbSchema


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory inside ``tmp_path``: anything created beside it shows."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _everything(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("url", ["", ":memory:", "sqlite:///:memory:"])
def test_no_file_is_refused_and_leaves_nothing(url: str, workdir: Path, official_schema: ApdbSchema) -> None:
    with pytest.raises(ConfigError, match="names no database file"):
        diadb.Apdb.create(url, schema=official_schema)
    with pytest.raises(ConfigError, match="names no database file"):
        diadb.Apdb.open(url)
    assert _everything(workdir.parent) == ["work"]


@pytest.mark.parametrize("url", ["sqlite:/x.db", "sqlite:x.db", "sqlite:", "file:x.db", "x:y.db"])
def test_scheme_without_slashes_is_refused_and_leaves_nothing(
    url: str, workdir: Path, official_schema: ApdbSchema
) -> None:
    with pytest.raises(ConfigError, match=r"sqlite:///relative\.db or sqlite:////abs/path\.db"):
        diadb.Apdb.create(url, schema=official_schema)
    with pytest.raises(ConfigError, match="neither a path nor a SQLite URL"):
        diadb.Apdb.open(url)
    assert _everything(workdir.parent) == ["work"]


@pytest.mark.parametrize("url", ["", ":memory:", "sqlite:/x.db", "sqlite:///:memory:"])
def test_locate_refuses_what_create_refuses(url: str) -> None:
    with pytest.raises(ConfigError):
        locate(url)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("apdb.db", "apdb.db"),
        ("sub/apdb.db", "sub/apdb.db"),
        ("sub/a:b.db", "sub/a:b.db"),  # a ':' after a '/' is part of a file name
        ("/abs/apdb.db", "/abs/apdb.db"),
        ("sqlite:///rel.db", "rel.db"),
        ("sqlite:////abs/apdb.db", "/abs/apdb.db"),
    ],
)
def test_proper_names_are_paths(url: str, path: str) -> None:
    assert path_from_url(url) == path


@pytest.mark.parametrize("url", ["apdb.db", "sub/apdb.db", "sqlite:///url.db"])
def test_relative_names_create_and_reopen(url: str, workdir: Path, official_schema: ApdbSchema) -> None:
    diadb.Apdb.create(url, schema=official_schema).close()
    file = workdir / path_from_url(url)
    assert file.is_file()
    diadb.Apdb.open(url).close()
    assert all(p.startswith("work") for p in _everything(workdir.parent))
