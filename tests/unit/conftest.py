"""tests/unit: no PostgreSQL, no Redis, no server (`make test-fast`, a few seconds).

The shared fixtures (testkit.fixtures) are visible here too, so a test that asks
for a service fails at setup instead of quietly making the fast loop slow: it
belongs in tests/store, tests/server or tests/deploy.
"""

from __future__ import annotations

import pytest

# Every service fixture depends on one of these, so the closure of a test that needs one names it.
SERVICES = frozenset({"pg_admin_dsn", "redis_service", "spawn_server", "aiohttp_client"})


@pytest.hookimpl(tryfirst=True)  # before the runner sets up any fixture
def pytest_runtest_setup(item: pytest.Item) -> None:
    needs = SERVICES.intersection(getattr(item, "fixturenames", ()))
    if needs:
        pytest.fail(f"{item.nodeid} needs {sorted(needs)}: move it out of tests/unit")
