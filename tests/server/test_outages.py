"""What clients and balancers see while PostgreSQL is frozen or restarting.

A fault campaign found that with PostgreSQL frozen (SIGSTOP) for 15 s, `/readyz`
answered 200 after 15.04 s and a REST booking 201 after 15.06 s, and that a restart
reached clients as `internal`. Here, with the default bounds: the booking answers
`unavailable` (503) within `SLOTCAST_DB_TIMEOUT_MS`, `/readyz` answers 503 within
about a second and names the database, `/healthz` stays about the process; a restart
is `unavailable` on both front doors and nothing is logged as a server error. The app
runs on a PostgreSQL these tests own (`testkit.harness.own_postgres`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client import ClientError, SlotcastClient
from server.app import create_app
from server.keys import STORE
from server.settings import Settings
from testkit.fixtures import JWT_SECRET, SeededDoctor, seed_doctor, token, ws_url
from testkit.harness import ControlledPostgres
from testkit.wire import eventually

AppClient = TestClient[web.Request, web.Application]

DEFAULTS = Settings()
SLACK_S = 0.7  # scheduling on a shared, loaded machine


@pytest.fixture
async def client(cluster: ControlledPostgres, aiohttp_client: Callable[..., Any]) -> AppClient:
    settings = Settings(
        database_url=cluster.dsn(),
        broker_url="memory://",
        jwt_secret=JWT_SECRET,
        instance_id="outages",
        db_pool_min=1,
        # One patient books slot after slot through the restart: the outage is under test,
        # not what one patient may claim (tests/server/test_booking_limits.py).
        max_active_per_doctor=1_000_000,
        max_active_total=1_000_000,
    )
    return cast(AppClient, await aiohttp_client(create_app(settings)))


@pytest.fixture
async def doctor(client: AppClient) -> SeededDoctor:
    return await seed_doctor(client.app[STORE])


def booking(slot_id: int, key: str, sub: str = "p-frozen") -> dict[str, Any]:
    return {
        "json": {"slot_id": slot_id},
        "headers": {"Authorization": f"Bearer {token(sub=sub)}", "Idempotency-Key": key},
    }


async def timed(request: Any) -> tuple[float, int, Any]:
    started = time.monotonic()
    async with request as resp:
        body = await resp.json()
        return time.monotonic() - started, resp.status, body


async def test_with_postgres_frozen_a_booking_and_readyz_answer_within_their_bounds(
    cluster: ControlledPostgres, client: AppClient, doctor: SeededDoctor
) -> None:
    slot = doctor.slots[0]
    with cluster.frozen_for():
        (
            (book_s, book_status, book_body),
            (ready_s, ready_status, ready_body),
        ) = await asyncio.gather(
            timed(client.post("/api/appointments", **booking(slot.id, "k1"))),
            timed(client.get("/readyz")),
        )
        health_s, health_status, _ = await timed(client.get("/healthz"))
    assert (book_status, book_body["error"]["code"]) == (503, "unavailable")
    assert book_s < DEFAULTS.db_timeout_ms / 1000 + SLACK_S, f"booking took {book_s:.2f} s"
    assert ready_status == 503
    assert ready_s < DEFAULTS.ready_timeout_ms / 1000 + SLACK_S, f"readyz took {ready_s:.2f} s"
    assert ready_body["database"] == "down"
    assert ready_body["broker"] == "up"
    assert ready_body["reason"].startswith("database: ")
    assert health_status == 200  # liveness is about the process
    assert health_s < SLACK_S

    # Thawed: ready again by itself, and the retried booking (same key) books once.
    async def ready() -> bool:
        async with client.get("/readyz") as resp:
            return resp.status == 200

    await eventually_async(ready, "readiness to come back")
    async with client.post("/api/appointments", **booking(slot.id, "k1")) as resp:
        assert resp.status == 201, await resp.text()
        first = await resp.json()
    async with client.post("/api/appointments", **booking(slot.id, "k1")) as resp:
        assert (resp.status, await resp.json()) == (201, first)


async def eventually_async(check: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_postgres_restart_is_unavailable_on_both_front_doors_never_internal(
    cluster: ControlledPostgres,
    client: AppClient,
    doctor: SeededDoctor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes: list[str] = []
    stop = asyncio.Event()

    async def rest(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            slot = doctor.slots[(7 * i + n) % len(doctor.slots)]
            try:
                async with client.post(
                    "/api/appointments", **booking(slot.id, f"r{i}-{n}", sub=f"p{i}")
                ) as resp:
                    body = await resp.json()
                    outcomes.append("ok" if resp.status == 201 else body["error"]["code"])
            except aiohttp.ClientError as exc:
                outcomes.append(f"transport {exc}")
            await asyncio.sleep(0.01)

    async def websocket(conn: SlotcastClient) -> None:
        while not stop.is_set():
            try:
                await conn.my_appointments()
                await conn.watch(doctor.id, doctor.start, doctor.end)
                outcomes.append("ok")
            except ClientError as exc:
                outcomes.append(exc.code)
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING):
        async with SlotcastClient.connect(ws_url(client), token=token(sub="p-ws")) as conn:
            workers = [asyncio.create_task(rest(i)) for i in range(2)]
            workers.append(asyncio.create_task(websocket(conn)))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(cluster.restart)
            # Answered again: booked, or the slot was taken by then (the slots run out).
            await eventually(
                lambda: len(outcomes) > 6 and "unavailable" not in outcomes[-6:],
                "requests to be answered again",
                15,
            )
            stop.set()
            await asyncio.gather(*workers)
    assert "unavailable" in outcomes  # the restart was seen
    assert not [o for o in outcomes if o not in {"ok", "unavailable", "slot_taken"}]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "unexpected database error" not in caplog.text
