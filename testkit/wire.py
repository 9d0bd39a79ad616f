"""What a client reads from the server, with a deadline: events, pongs, REST errors.

Shared by the tiers that talk to a server (tests/server over the in-process app,
tests/deploy over real processes) and by tests/unit where a condition has no event
to wait on. Each helper asserts what it reads, so a test states only what it expects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from aiohttp import ClientResponse

from client import SlotcastClient
from protocol.messages import Delta, Message

M = TypeVar("M", bound=Message)

WAIT_S = 5.0


async def expect(
    client: SlotcastClient,
    kind: type[M],
    *,
    skip: tuple[type[Message], ...] = (),
    timeout: float = WAIT_S,
) -> M:
    """The next event, which must be a `kind`; only the `skip` kinds may come first."""
    deadline = time.monotonic() + timeout
    while True:
        event = await client.next_event(max(deadline - time.monotonic(), 0.001))
        if isinstance(event, skip):
            continue
        assert isinstance(event, kind), f"expected {kind.TYPE}, got {event!r}"
        return event


async def events_before_pong(client: SlotcastClient) -> list[Message]:
    """Every event the server sent `client` before answering a ping: a barrier, not a sleep."""
    await client.ping()
    events = []
    while not client.events.empty():
        events.append(client.events.get_nowait())
    return events


async def deltas_before_pong(client: SlotcastClient) -> list[Delta]:
    """The deltas that reached `client` before a ping round-trip: a barrier, never a sleep.

    The server's outbox is FIFO and the in-memory broker delivers a commit's change one
    loop turn after publishing it, before the booking's reply is even written, so any
    delta a change was going to cause is queued ahead of this pong.
    """
    return [e for e in await events_before_pong(client) if isinstance(e, Delta)]


async def assert_no_delta_before_pong(client: SlotcastClient) -> None:
    assert await deltas_before_pong(client) == []


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll a condition that has no event to wait on (gauges, reconnects), with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def error_code(resp: ClientResponse, status: int) -> str:
    """The stable code of a JSON error reply, after checking it is one."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    code: str = body["error"]["code"]
    return code
