"""The in-process app: `client` serves `create_app(settings)` on a real loopback port."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.settings import Settings
from testkit.fixtures import JWT_SECRET, token


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url="memory://",
        jwt_secret=JWT_SECRET,
        instance_id="test-instance",
        db_pool_min=1,
        db_pool_max=10,
        heartbeat_s=5.0,
        # The seeded slots start two days out. The tests that mark arrivals are about the
        # lifecycle and the rooms; the attendance window has tests of its own
        # (test_commands.py, "attendance").
        arrive_early_minutes=60 * 24 * 30,
    )


@pytest.fixture
async def client(settings: Settings, aiohttp_client: Callable[..., object]) -> TestClient:
    """An in-process server on a real loopback port, with its own test client."""
    return await aiohttp_client(create_app(settings))  # type: ignore[misc, no-any-return]


@pytest.fixture
def make_token() -> Callable[..., str]:
    return token
