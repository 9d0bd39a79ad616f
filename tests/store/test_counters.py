"""Rate-limit counters (store/counters.py) against a real Redis, and against one that hangs.

Two `Counters` on one Redis are two instances: a budget spent through one is spent
for the other. An unreachable or silent Redis must cost a request at most the
timeout, and then nothing at all while it stays down.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from limits import parse

from store.counters import RETRY_AFTER_S, open_counters
from store.errors import Unavailable
from testkit.harness import free_port

BUDGET = parse("3/minute")


async def test_two_instances_spend_one_budget_and_learn_when_to_retry(redis_url: str) -> None:
    async with (
        open_counters(redis_url, timeout_s=1.0) as a,
        open_counters(redis_url, timeout_s=1.0) as b,
    ):
        assert a.kind == b.kind == "redis"
        assert [await a.hit(BUDGET, "address", "198.51.100.1") for _ in range(2)] == [0.0, 0.0]
        assert await b.peek(BUDGET, "address", "198.51.100.1") == 0.0  # peeking spends nothing
        assert await b.hit(BUDGET, "address", "198.51.100.1") == 0.0
        wait = await a.hit(BUDGET, "address", "198.51.100.1")
        assert 0 < wait <= 60
        assert 0 < await b.peek(BUDGET, "address", "198.51.100.1") <= 60
        # Other keys and other scopes are other budgets.
        assert await b.hit(BUDGET, "address", "198.51.100.2") == 0.0
        assert await b.hit(BUDGET, "identity_reads", "198.51.100.1") == 0.0


async def test_memory_counters_count_in_process() -> None:
    async with open_counters("memory://", timeout_s=0.1) as counters:
        assert counters.kind == "memory"
        for _ in range(3):
            assert await counters.hit(BUDGET, "connection", "1") == 0.0
        assert await counters.hit(BUDGET, "connection", "1") > 0


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A port that accepts connections and never answers: a wedged Redis."""
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def nothing_listening() -> str:
    """A port nobody listens on: Redis is down."""
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize("where", ["silent_redis", "nothing_listening"])
async def test_an_unreachable_redis_costs_the_timeout_once_then_nothing(
    where: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(where)
    async with open_counters(url, timeout_s=0.2) as counters:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await counters.hit(BUDGET, "address", "198.51.100.1")
        assert time.monotonic() - started < 1.0
        # While it stays down, calls fail at once instead of each waiting.
        started = time.monotonic()
        for _ in range(50):
            with pytest.raises(Unavailable):
                await counters.hit(BUDGET, "address", "198.51.100.1")
        assert time.monotonic() - started < 0.1
        # After RETRY_AFTER_S it is tried again (and, still down, bounded again).
        await asyncio.sleep(RETRY_AFTER_S)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await counters.peek(BUDGET, "address", "198.51.100.1")
        assert time.monotonic() - started < 1.0
