"""Real servers for the tests: started once per session, a fresh namespace per test.

A server that cannot be started skips its tests with the reason, except when
``DIADB_REQUIRE_SERVICES=1`` (as in CI), where that is a failure.
"""

from __future__ import annotations

import os

import pytest


def unavailable(engine: str, reason: str) -> None:
    """Skip (or, when services are required, fail) because ``engine`` cannot be used."""
    message = f"{engine} server unavailable: {reason}"
    if os.environ.get("DIADB_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (DIADB_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)
