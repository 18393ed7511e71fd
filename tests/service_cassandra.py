"""The Cassandra node of the test session: one node, a fresh keyspace per test.

``scripts/cassandra.sh up`` starts a single node (127.0.0.1:9042, data in ``build/cassandra/n1``)
on first use; ``down`` stops it when the session ends, if this session started it. Set
``DIADB_CASSANDRA_URL`` (e.g. ``cassandra://10.0.0.1,10.0.0.2:9042``) to use a running cluster
instead (nothing is started or stopped then). When no node can be had the tests skip with the
reason, or fail under ``DIADB_REQUIRE_SERVICES=1`` (see ``tests.services.unavailable``).
Each test's keyspace is dropped after the test (asynchronously; all drops are awaited at the end).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.services import unavailable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cassandra.sh"


def script(*args: str, timeout: float = 600) -> str:
    """Run ``scripts/cassandra.sh args...``; its stdout, or RuntimeError with its output."""
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        out = (done.stderr + "\n" + done.stdout).strip()[-3000:]
        raise RuntimeError(f"'cassandra.sh {' '.join(args)}' failed (exit {done.returncode}): {out}")
    return done.stdout.strip()


@dataclass
class CassandraNode:
    """A reachable cluster: its base URL (no keyspace) and whether this session started it."""

    base: str
    managed: bool
    keyspaces: list[str] = field(default_factory=list)
    _session: Any = None
    _cluster: Any = None
    _drops: list[Any] = field(default_factory=list)

    def fresh_url(self, params: str = "") -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.keyspaces.append(name)
        return f"{self.base}/{name}" + (f"?{params}" if params else "")

    def session(self) -> Any:
        if self._session is None:
            from cassandra.cluster import Cluster

            hosts, port = self.base.split("://", 1)[1].rsplit(":", 1)
            self._cluster = Cluster(hosts.split(","), port=int(port), protocol_version=5)
            self._session = self._cluster.connect()
        return self._session

    def drop_async(self, keyspace: str) -> None:
        self._drops.append(self.session().execute_async(f'DROP KEYSPACE IF EXISTS "{keyspace}"', timeout=120))

    def finish(self) -> None:
        for f in self._drops:
            # A drop that failed is removed with the node's data directory anyway.
            with contextlib.suppress(Exception):
                f.result()
        self._drops.clear()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = self._session = None


_node: CassandraNode | None = None
_failure: str | None = None


def _start() -> CassandraNode:
    external = os.environ.get("DIADB_CASSANDRA_URL")
    if external:
        return CassandraNode(external.rstrip("/"), managed=False)
    if not SCRIPT.exists():
        raise RuntimeError(f"{SCRIPT} is missing")
    script("install")
    try:
        script("status", "--nodes", "1", timeout=60)
        running = True  # started before this session (e.g. by hand): left running at the end
    except RuntimeError:
        running = False
    script("up", "--nodes", "1")
    return CassandraNode("cassandra://" + script("contact", "--nodes", "1"), managed=not running)


def cassandra_node(request: pytest.FixtureRequest) -> CassandraNode:
    """The session's node, started on first use; stopped when the session ends."""
    global _node, _failure
    if _node is None and _failure is None:
        try:
            import cassandra  # noqa: F401
        except ImportError as e:
            _failure = f"driver missing ({e.name}): pip install 'diadb[cassandra]'"
        else:
            try:
                _node = _start()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                _failure = str(e)
            else:
                request.session.config.add_cleanup(_stop)
    if _node is None:
        unavailable("cassandra", _failure or "not started")
        raise AssertionError("unreachable")
    return _node


def _stop() -> None:
    global _node
    if _node is not None:
        _node.finish()
        if _node.managed and os.environ.get("DIADB_CASSANDRA_KEEP") != "1":
            subprocess.run(["bash", str(SCRIPT), "down", "--nodes", "1"], capture_output=True, timeout=300)
    _node = None


def fresh_url(request: pytest.FixtureRequest) -> str:
    """A URL naming a new keyspace (created by ``Apdb.create``), dropped after the test."""
    node = cassandra_node(request)
    url = node.fresh_url()
    keyspace = url.rsplit("/", 1)[1].split("?", 1)[0]
    request.addfinalizer(lambda: node.drop_async(keyspace))
    return url
