"""Seeded fuzzing of database URLs: every string is either a database or a diadb.Error, and no
secret ever reaches an error message (issue "Never a wrong answer", class 7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diadb
from diadb.backends import locate, scheme_of

SECRET = "hunter2-s3cr3t"
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_schemes = st.sampled_from(
    ["", "sqlite:", "sqlite:/", "sqlite://", "sqlite:///", "sqlite:////", "postgresql://", "cassandra://",
     "file:", "http://", "mysql://", "SQLITE:///", "sqlite+pysqlite:///", ":memory:"]
)  # fmt: skip
_tails = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30
) | st.sampled_from(["", "a.db", "/", "//", "?x=1", ":memory:", "..", "db?schema=x", "h:1/ks"])


@FUZZ
@given(scheme=_schemes, tail=_tails)
def test_any_url_locates_or_is_a_config_error(scheme: str, tail: str) -> None:
    """``locate`` (no connection, no driver) never raises anything but a diadb.Error."""
    url = scheme + tail
    try:
        where = locate(url)
    except diadb.Error:
        return
    assert where.scheme == scheme_of(url)


@FUZZ
@given(tail=_tails, where=st.sampled_from(["user", "query", "sslpassword", "nested"]))
def test_a_password_is_refused_and_never_echoed(tail: str, where: str) -> None:
    host = "127.0.0.1:1/db"  # nothing listens there: the URL must be refused before connecting
    url = {
        "user": f"postgresql://me:{SECRET}@{host}?{tail}",
        "query": f"postgresql://me@{host}?password={SECRET}&{tail}",
        "sslpassword": f"postgresql://me@{host}?sslpassword={SECRET}",
        "nested": f"postgresql://me@{host}?options=x&PassWord={SECRET}",
    }[where]
    with pytest.raises(diadb.Error) as err:
        diadb.Apdb.open(url)
    assert SECRET not in str(err.value)
    assert all(SECRET not in str(note) for note in getattr(err.value, "__notes__", []))


@FUZZ
@given(
    name=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00/"), min_size=0, max_size=20)
)
def test_sqlite_paths_make_exactly_the_file_named_or_fail_cleanly(
    tmp_path_factory, official_schema, name: str
) -> None:
    """A bare name is a file in the working directory; anything refused leaves nothing behind."""
    base = tmp_path_factory.mktemp("urls")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        try:
            db = diadb.Apdb.create(name, schema=official_schema, history_tier=False)
        except diadb.Error:
            assert list(Path(base).iterdir()) == [], f"{name!r} was refused but left files"
            return
        db.close()
        made = {p.name for p in Path(base).iterdir()}
        assert name in made, (name, made)
        assert made <= {name, name + "-wal", name + "-shm", name + ".history"}
        diadb.Apdb.open(name).close()
    finally:
        os.chdir(cwd)
