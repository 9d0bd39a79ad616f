"""Rate limits and slow HTTP against real `slotcast serve` processes and a real Redis.

What only real processes show: budgets counted in the broker's Redis hold across
instances (a client cannot escape them by spreading over the balancer's
instances), a Redis outage admits requests instead of taking the server down,
and `slotcast serve` closes connections whose request head or body is too slow,
seen with raw sockets (an HTTP library would finish the request for us).
HAProxy's own slow-request timeout is in test_haproxy.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from client import ClientError, SlotcastClient
from testkit.fixtures import SeededDoctor, Spawn, token
from testkit.harness import RedisServer, ServerProcess

pytestmark = pytest.mark.processes


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start(spawn: Spawn, *names: str, **kw: Any) -> list[ServerProcess]:
    return list(await asyncio.gather(*(asyncio.to_thread(spawn, n, **kw) for n in names)))


async def status(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kw) as resp:
        return resp.status, await resp.json()


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub=sub)}"}


async def test_budgets_hold_across_instances_through_redis(
    spawn_server: Spawn, redis_url: str, doctor: SeededDoctor, http: aiohttp.ClientSession
) -> None:
    """One identity, one anonymous address and one address's failed sign-ins, each spread
    over two instances: each budget is spent once, whichever instance counted it."""
    env = {
        "SLOTCAST_RATE_IDENTITY_WRITES": "4/minute",
        "SLOTCAST_RATE_ADDRESS": "4/minute",
        "SLOTCAST_RATE_AUTH_FAILURES": "3/minute",
        # One patient books several slots of one doctor: the rate limits are under test,
        # not the caps on what one patient may claim (tests/server/test_booking_limits.py).
        "SLOTCAST_MAX_ACTIVE_PER_DOCTOR": "100",
        "SLOTCAST_MAX_ACTIVE_TOTAL": "100",
    }
    a, b = await start(spawn_server, "a", "b", broker_url=redis_url, env=env)

    # Writes of one identity: a WebSocket on A and REST on B share the budget.
    async with SlotcastClient.connect(a.ws_url, token=token(sub="p-spread")) as on_a:
        held = [await on_a.hold(doctor.slots[0].id)]
        code, _ = await status(
            http,
            "POST",
            f"{b.http_url}/api/holds",
            json={"slot_id": doctor.slots[1].id},
            headers=bearer("p-spread"),
        )
        assert code == 201
        held.append(await on_a.hold(doctor.slots[2].id))
        code, _ = await status(
            http,
            "DELETE",
            f"{b.http_url}/api/holds/{held[0].id}",
            json={},
            headers=bearer("p-spread"),
        )
        assert code == 200
        for server in (a, b):  # the fifth write is refused wherever it goes
            code, body = await status(
                http,
                "POST",
                f"{server.http_url}/api/holds",
                json={"slot_id": doctor.slots[3].id},
                headers=bearer("p-spread"),
            )
            assert (code, body["error"]["code"]) == (429, "rate_limited"), server.name
        with pytest.raises(ClientError) as refused:
            await on_a.hold(doctor.slots[3].id)
        assert refused.value.code.value == "rate_limited"
    # Another patient from the same address is not affected.
    code, _ = await status(
        http,
        "POST",
        f"{b.http_url}/api/holds",
        json={"slot_id": doctor.slots[3].id},
        headers=bearer("p-neighbour"),
    )
    assert code == 201

    # Anonymous requests from one address: 2 on A, 2 on B, then refused on both.
    for server in (a, a, b, b):
        assert (await status(http, "GET", f"{server.http_url}/api/doctors"))[0] == 200
    for server in (a, b):
        code, body = await status(http, "GET", f"{server.http_url}/api/doctors")
        assert (code, body["error"]["code"]) == (429, "rate_limited")

    # Failed sign-ins (WebSocket `auth`): two on A, one on B; then even a good token is not
    # checked, on either instance, over either door.
    async with (
        SlotcastClient.connect(a.ws_url) as on_a,
        SlotcastClient.connect(b.ws_url) as on_b,
    ):
        for client in (on_a, on_a, on_b):
            with pytest.raises(ClientError) as failed:
                await client.auth("forged")
            assert failed.value.code.value == "token_invalid"
        for client in (on_a, on_b):
            with pytest.raises(ClientError) as locked:
                await client.auth(token(sub="p-good"))
            assert locked.value.code.value == "rate_limited"
    code, body = await status(
        http, "GET", f"{b.http_url}/api/me/appointments", headers=bearer("p-good")
    )
    assert (code, body["error"]["code"]) == (429, "rate_limited")


async def test_a_redis_outage_admits_requests_quickly_and_limits_return_with_it(
    spawn_server: Spawn,
    redis_url: str,
    redis_process: RedisServer,
    doctor: SeededDoctor,
    http: aiohttp.ClientSession,
) -> None:
    env = {"SLOTCAST_RATE_ADDRESS": "3/minute", "SLOTCAST_LIMITER_TIMEOUT_MS": "200"}
    (a,) = await start(spawn_server, "a", broker_url=redis_url, env=env)
    url = f"{a.http_url}/api/doctors"
    for _ in range(3):  # the whole budget, counted in Redis
        assert (await status(http, "GET", url))[0] == 200
    await asyncio.to_thread(redis_process.stop)
    try:
        started = time.monotonic()
        answers = [(await status(http, "GET", url))[0] for _ in range(20)]
        elapsed = time.monotonic() - started
        assert answers == [200] * 20  # fail open: the limiter is down, the service is not
        assert elapsed < 3.0, f"20 requests took {elapsed:.2f}s with the limiter's Redis down"
        async with http.get(f"{a.http_url}/metrics") as resp:
            metrics = await resp.text()
        unchecked = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("slotcast_rate_limiter_unavailable_total ")
        )
        assert unchecked >= 20
        # Over a WebSocket too: its own (in-process) budget answering is no sign of Redis.
        async with SlotcastClient.connect(a.ws_url) as ws:
            for _ in range(5):
                await ws.search_doctors()
    finally:
        if redis_process.process is None:
            await asyncio.to_thread(redis_process.start)
    # Redis is back (empty: it keeps nothing on disk): counting starts over, and holds.
    deadline = time.monotonic() + 10
    while (await status(http, "GET", url))[0] != 429:
        assert time.monotonic() < deadline, "limits never came back with Redis"
        await asyncio.sleep(0.1)
    # Said once when counting stopped and once when it came back, not on every request.
    assert a.logs().count("rate limits not enforced") == 1
    assert a.logs().count("rate limits enforced again") == 1


# ---- slow HTTP, directly ---------------------------------------------------------------------


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Read until the server closes; (seconds it took, what it sent)."""
    sock.settimeout(limit)
    started = time.monotonic()
    received = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return time.monotonic() - started, received
        received += chunk


async def test_slow_request_heads_and_bodies_are_closed_by_the_server_itself(
    spawn_server: Spawn,
) -> None:
    env = {"SLOTCAST_HEADER_TIMEOUT_S": "1", "SLOTCAST_BODY_TIMEOUT_S": "1"}
    (server,) = await start(spawn_server, "slow", env=env)
    address = ("127.0.0.1", server.port)

    def half_head() -> tuple[float, bytes]:
        with socket.create_connection(address) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: slotcast\r\nX-Slow: ")
            return closed_after(sock, 10)

    def silent() -> tuple[float, bytes]:
        with socket.create_connection(address) as sock:
            return closed_after(sock, 10)

    def half_body() -> tuple[float, bytes]:
        with socket.create_connection(address) as sock:
            sock.sendall(
                b"POST /api/holds HTTP/1.1\r\nHost: slotcast\r\n"
                b'Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{"slot'
            )
            return closed_after(sock, 10)

    def whole() -> bytes:
        with socket.create_connection(address) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: slotcast\r\nConnection: close\r\n\r\n")
            return closed_after(sock, 10)[1]

    (head_s, head), (silent_s, nothing), (body_s, body) = await asyncio.gather(
        asyncio.to_thread(half_head), asyncio.to_thread(silent), asyncio.to_thread(half_body)
    )
    assert 0.5 < head_s < 4, head_s
    assert head == b""  # it never asked anything: nothing to answer
    assert 0.5 < silent_s < 4, silent_s
    assert nothing == b""
    assert 0.5 < body_s < 4, body_s
    assert body.startswith(b"HTTP/1.1 408"), body
    assert (await asyncio.to_thread(whole)).startswith(b"HTTP/1.1 200")
