"""A patient's limits through both front doors, and across instances.

The store proves the rules (tests/store/test_patient_limits.py); these prove the server
hands its settings to every claim, whichever door it comes through: bookings and holds
over REST and over a WebSocket count together against one cap, a slot given back is
barred to its patient on both doors until the cool-down has passed on the server's
clock, and two instances on one database share the count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.vocabulary import AppointmentStatus, Role
from server.app import create_app
from server.settings import Settings
from store.pool import Store
from testkit.fixtures import SeededDoctor, seed_doctor, token, ws_url
from testkit.wire import error_code

AppClient = TestClient[web.Request, web.Application]
LONG = timedelta(days=60)  # tokens outlive every move of the fake clock


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def connect(client: AppClient, sub: str) -> AbstractAsyncContextManager[SlotcastClient]:
    return SlotcastClient.connect(ws_url(client), token=token(Role.PATIENT, sub, ttl=LONG))


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(Role.PATIENT, sub, ttl=LONG)}"}


async def outcome(attempt: Awaitable[object]) -> str:
    """Either "ok" or the code a WebSocket command was refused with."""
    try:
        await attempt
    except ClientError as exc:
        return exc.wire_code
    return "ok"


async def ws_refusal(attempt: Any) -> str:
    with pytest.raises(ClientError) as caught:
        await attempt
    return caught.value.wire_code


async def rest_book(client: AppClient, sub: str, slot_id: int) -> tuple[int, Any]:
    resp = await client.post("/api/appointments", json={"slot_id": slot_id}, headers=bearer(sub))
    return resp.status, await resp.json()


async def test_the_twelve_slot_attack_is_refused_on_both_doors_after_the_cap(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Issue 10's attack, alternating doors: one token, twelve direct bookings, two pass
    (SLOTCAST_MAX_ACTIVE_PER_DOCTOR's default); then a real patient books what it left."""
    targets = doctor.slots[:12]
    outcomes: list[str] = []
    async with connect(client, "p-greedy") as ws:
        for i, slot in enumerate(targets):
            if i % 2 == 0:
                status, body = await rest_book(client, "p-greedy", slot.id)
                outcomes.append("ok" if status == 201 else f"{status} {body['error']['code']}")
            else:
                outcomes.append(f"ws {await outcome(ws.book(slot.id))}")
        # Holds count too: a hold is refused at the cap like a booking.
        assert await ws_refusal(ws.hold(targets[2].id)) == "appointment_limit"
        mine = await ws.my_appointments()

    assert outcomes == ["ok", "ws ok"] + ["409 appointment_limit", "ws appointment_limit"] * 5
    assert sorted(a.slot_id for a in mine) == [targets[0].id, targets[1].id]
    status, body = await rest_book(client, "p-real", targets[2].id)
    assert status == 201, body
    assert body["appointment"]["patient_id"] == "p-real"


async def test_holds_on_one_door_and_bookings_on_the_other_count_together(
    settings: Settings, aiohttp_client: AiohttpClient, store: Store
) -> None:
    """The total, across doctors and doors; confirming a hold does not count it again."""
    app: AppClient = await aiohttp_client(
        create_app(settings.replace(max_active_per_doctor=5, max_active_total=3))
    )
    here = await seed_doctor(store, name="Dr. Here")
    there = await seed_doctor(store, name="Dr. There")
    async with connect(app, "p-both") as ws:
        held = await ws.hold(here.slots[0].id)
        status, _ = await rest_book(app, "p-both", there.slots[0].id)
        assert status == 201
        resp = await app.post(
            "/api/holds", json={"slot_id": here.slots[1].id}, headers=bearer("p-both")
        )
        assert resp.status == 201  # three in all now: two holds and a booking

        assert await ws_refusal(ws.book(there.slots[1].id)) == "appointment_limit"
        status, body = await rest_book(app, "p-both", here.slots[2].id)
        assert (status, body["error"]["code"]) == (409, "appointment_limit")
        # Confirming a hold, on either door, is not a fourth.
        assert (await ws.book(hold_id=held.id)).status is AppointmentStatus.BOOKED
        second = (await resp.json())["appointment"]["id"]
        confirmed = await app.post(
            "/api/appointments", json={"hold_id": second}, headers=bearer("p-both")
        )
        assert confirmed.status == 201, await confirmed.text()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC))


@pytest.fixture
async def timed(settings: Settings, aiohttp_client: AiohttpClient, clock: FakeClock) -> AppClient:
    client: AppClient = await aiohttp_client(create_app(settings, clock=clock))
    return client


async def test_release_then_take_again_waits_out_the_cooldown_on_both_doors(
    timed: AppClient, clock: FakeClock, doctor: SeededDoctor
) -> None:
    slot = doctor.slots[0]
    cooldown = timedelta(seconds=Settings().rehold_cooldown_s)
    async with connect(timed, "p-cycler") as ws:
        held = await ws.hold(slot.id)
        released = await timed.delete(f"/api/holds/{held.id}", headers=bearer("p-cycler"))
        assert released.status == 200, await released.text()

        assert await ws_refusal(ws.hold(slot.id)) == "cooldown"
        assert await ws_refusal(ws.book(slot.id)) == "cooldown"
        rest_hold = await timed.post(
            "/api/holds", json={"slot_id": slot.id}, headers=bearer("p-cycler")
        )
        assert await error_code(rest_hold, 409) == "cooldown"
        # How long to wait is said, as for a rate limit: the whole cool-down, here.
        assert rest_hold.headers["Retry-After"] == str(int(cooldown.total_seconds()))
        status, body = await rest_book(timed, "p-cycler", slot.id)
        assert body["error"]["retry_after_ms"] == cooldown.total_seconds() * 1000
        assert (status, body["error"]["code"]) == (409, "cooldown")

        clock.now += cooldown - timedelta(seconds=1)
        assert await ws_refusal(ws.hold(slot.id)) == "cooldown"
        clock.now += timedelta(seconds=1)
        again = await ws.hold(slot.id)
        assert (again.slot_id, again.status) == (slot.id, AppointmentStatus.PENDING)


async def test_the_cooldown_leaves_the_slot_to_everyone_else(
    client: AppClient, doctor: SeededDoctor
) -> None:
    slot = doctor.slots[0]
    async with connect(client, "p-quitter") as quitter, connect(client, "p-next") as other:
        await quitter.release((await quitter.hold(slot.id)).id)
        assert await ws_refusal(quitter.hold(slot.id)) == "cooldown"
        assert (await other.hold(slot.id)).patient_id == "p-next"


async def test_two_instances_share_the_count(
    settings: Settings, aiohttp_client: AiohttpClient, store: Store
) -> None:
    """Bookings of one patient with two doctors, at once, through two instances and both
    doors: whoever commits first takes the one allowed appointment, every round."""
    here = await seed_doctor(store, name="Dr. Here")
    there = await seed_doctor(store, name="Dr. There")
    one = settings.replace(max_active_per_doctor=5, max_active_total=1)
    a: AppClient = await aiohttp_client(create_app(one.replace(instance_id="a")))
    b: AppClient = await aiohttp_client(create_app(one.replace(instance_id="b")))
    for n in range(4):
        who = f"p-spread-{n}"
        async with connect(b, who) as ws:
            results = await asyncio.gather(
                rest_book(a, who, here.slots[n].id), outcome(ws.book(there.slots[n].id))
            )
        (status, body), by_ws = results
        by_rest = "ok" if status == 201 else body["error"]["code"]
        assert sorted([by_rest, by_ws]) == ["appointment_limit", "ok"], (n, results)
