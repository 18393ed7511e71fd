"""The PostgreSQL server of the test session: a throw-away cluster, a fresh schema per test.

``scripts/postgres.sh up`` starts the cluster once per session (initdb + pg_ctl in
``/tmp/diadb-postgres-<port>`` as root, else ``build/postgres``; port ``DIADB_PG_PORT`` or
54329) and ``down`` removes it at the end (a cluster that was already running is used and
left running; ``DIADB_PG_KEEP=1`` keeps it). Set
``DIADB_POSTGRES_URL`` to use a running server instead (nothing is started or stopped then).
When no server can be had the tests skip with the reason, or fail under
``DIADB_REQUIRE_SERVICES=1`` (see ``tests.services.unavailable``).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.services import unavailable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "postgres.sh"


@dataclass
class PostgresServer:
    """A running server: its superuser URL and whether this session started it."""

    url: str
    managed: bool
    started: bool = False  # this session ran 'up' on a stopped cluster, so it runs 'down' at the end
    schemas: list[str] = field(default_factory=list)

    def fresh_url(self, prefix: str = "t") -> str:
        """The URL of a new, empty schema (created by ``Apdb.create``)."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.schemas.append(name)
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}schema={name}"

    def script(self, command: str) -> str:
        """Run ``scripts/postgres.sh command`` (only for a server this session manages)."""
        if not self.managed:
            pytest.skip(f"'postgres.sh {command}' needs the session's own server, not DIADB_POSTGRES_URL")
        done = subprocess.run(
            ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"postgres.sh {command} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout.strip()

    def sql(self, statement: str, *, user: str | None = None) -> None:
        """Run one statement as the superuser (or ``user``), autocommit."""
        import psycopg

        conninfo = self.url if user is None else self.url.replace("postgres@", f"{user}@", 1)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]


_server: PostgresServer | None = None
_failure: str | None = None


def _start() -> PostgresServer:
    external = os.environ.get("DIADB_POSTGRES_URL")
    if external:
        return PostgresServer(external, managed=False)
    if not SCRIPT.exists():
        raise RuntimeError(f"{SCRIPT} is missing")
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, timeout=60, check=False)
    done = subprocess.run(
        ["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"'postgres.sh up' failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    url = done.stdout.strip().splitlines()[-1]
    return PostgresServer(url, managed=True, started=status.returncode != 0)


def postgres_server(request: pytest.FixtureRequest) -> PostgresServer:
    """The session's server, started on first use; stopped when the session ends."""
    global _server, _failure
    if _server is None and _failure is None:
        try:
            import adbc_driver_postgresql  # noqa: F401
            import psycopg  # noqa: F401
        except ImportError as e:
            _failure = f"driver missing ({e.name}): pip install 'diadb[postgres]'"
        else:
            try:
                _server = _start()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                _failure = str(e)
            else:
                if _server.started:
                    request.session.config.add_cleanup(_stop)
    if _server is None:
        unavailable("postgresql", _failure or "not started")
        raise AssertionError("unreachable")
    return _server


def _stop() -> None:
    global _server
    if _server is not None and _server.started and os.environ.get("DIADB_PG_KEEP") != "1":
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=300, check=False)
    _server = None


def fresh_url(request: pytest.FixtureRequest) -> str:
    """A URL naming a new, empty schema on the session's server."""
    return postgres_server(request).fresh_url()
