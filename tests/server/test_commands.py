"""The commands as clients meet them: over real WebSockets and over REST.

The store's own tests prove the rules; these prove that every rule's outcome
reaches the people who act on it: watchers see holds, confirmations, expiries and
schedule edits as live deltas; the caller gets each refusal under its stable
code on either front door; and REST exposes every command with the status and
body a plain HTTP client expects. Time is the test's to move (a fake server
clock), so hold expiry is proven without sleeping through a TTL.

Beside it, tests/server/test_ws.py holds the WebSocket protocol and session (input
hygiene, identity, watches, delta order) and tests/server/test_api.py the REST
surface (routes, request bodies, status codes, the directory, health).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.errors import ErrorCode
from protocol.messages import AppointmentEvent, AppointmentView, Delta, SlotView, WeeklyBlock
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from server.api import HTTP_STATUS
from server.app import create_app
from server.settings import Settings
from store import commands, doctors, reads
from store.pool import Store
from testkit.engine import active_appointments
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.wire import assert_no_delta_before_pong, deltas_before_pong, expect

AppClient = TestClient[web.Request, web.Application]
# Long enough to outlive any move of the fake clock (tokens are checked against it).
LONG = timedelta(days=60)
MORNINGS = [WeeklyBlock(day, time(8), time(12)) for day in range(1, 8)]


class FakeClock:
    """The server's clock, moved only by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC))


@pytest.fixture
async def timed(settings: Settings, aiohttp_client: AiohttpClient, clock: FakeClock) -> AppClient:
    """An app on the test's clock whose hold sweep runs often enough to await."""
    app = create_app(settings.replace(hold_sweep_s=0.05), clock=clock)
    client: AppClient = await aiohttp_client(app)
    return client


def connect(
    client: AppClient, sub: str | None = None, role: Role = Role.PATIENT
) -> AbstractAsyncContextManager[SlotcastClient]:
    """A WebSocket client, signed in as `sub` (anonymous without one)."""
    tok = token(role, sub, ttl=LONG) if sub is not None else None
    return SlotcastClient.connect(ws_url(client), token=tok)


def bearer(sub: str, role: Role = Role.PATIENT) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sub, ttl=LONG)}"}


def doctor_of(doctor: SeededDoctor) -> dict[str, str]:
    return bearer(str(doctor.id), Role.DOCTOR)


async def refused(code: ErrorCode, attempt: Awaitable[object]) -> None:
    """A WebSocket command is refused with exactly this code."""
    with pytest.raises(ClientError) as caught:
        await attempt
    assert caught.value.code == code, caught.value


async def rest_error(resp: ClientResponse, code: ErrorCode) -> None:
    """The stable code in the JSON body; the HTTP status too, for codes that have one."""
    assert resp.content_type == "application/json", await resp.text()
    body = await resp.json()
    assert body["error"]["code"] == code.value, (resp.status, body)
    assert body["error"]["message"]
    mapped = HTTP_STATUS.get(code)
    if mapped is not None:
        assert resp.status == mapped, (code, resp.status)


async def json_of(resp: ClientResponse, status: int) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


async def next_slot(watcher: SlotcastClient, slot_id: int, timeout: float = 5.0) -> Delta:
    """The next delta that says something about `slot_id` (others may come first)."""
    async with asyncio.timeout(timeout):
        while True:
            delta = await watcher.next_delta(timeout)
            if any(s.id == slot_id for s in delta.slots) or slot_id in delta.removed:
                return delta


async def slot_statuses(client: AppClient, doctor: SeededDoctor) -> dict[int, str]:
    params = {"start": doctor.start.isoformat(), "end": doctor.end.isoformat()}
    body = await json_of(await client.get(f"/api/doctors/{doctor.id}/slots", params=params), 200)
    return {s["id"]: s["status"] for s in body["slots"]}


# ---- holds, live ------------------------------------------------------------------------------


async def test_a_hold_shows_as_tentative_then_busy_when_its_holder_confirms(
    client: AppClient, doctor: SeededDoctor, settings: Settings
) -> None:
    async with connect(client) as watcher, connect(client, "p-hold") as patient:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        slot = snapshot.slots[0]

        hold = await patient.hold(slot.id)
        assert (hold.slot_id, hold.status) == (slot.id, AppointmentStatus.PENDING)
        assert hold.hold_expires_at is not None
        ttl = timedelta(seconds=settings.hold_ttl_s)
        assert hold.hold_expires_at - datetime.now(UTC) <= ttl
        assert hold.hold_expires_at - datetime.now(UTC) > ttl - timedelta(seconds=30)
        held = await watcher.next_delta()
        assert held.version == snapshot.version + 1
        tentative = SlotView(
            slot.id, slot.start, slot.end, SlotStatus.BUSY_TENTATIVE, hold.hold_expires_at
        )
        assert held.slots == [tentative]
        assert watcher.calendars[doctor.id].slots[slot.id] == tentative
        mine = await patient.my_appointments()
        assert [(a.id, a.status, a.hold_expires_at) for a in mine] == [
            (hold.id, AppointmentStatus.PENDING, hold.hold_expires_at)
        ]

        booked = await patient.book(hold_id=hold.id)
        assert (booked.id, booked.status, booked.hold_expires_at) == (
            hold.id,
            AppointmentStatus.BOOKED,
            None,
        )
        confirmed = await watcher.next_delta()
        assert confirmed.version == held.version + 1
        assert confirmed.slots == [SlotView(slot.id, slot.start, slot.end, SlotStatus.BUSY)]
        assert watcher.calendars[doctor.id].slots[slot.id].status is SlotStatus.BUSY
        mine = await patient.my_appointments()
        assert [(a.id, a.status, a.hold_expires_at) for a in mine] == [
            (hold.id, AppointmentStatus.BOOKED, None)
        ]


async def test_an_expired_hold_frees_its_slot_for_watchers_without_any_client_action(
    timed: AppClient, clock: FakeClock, doctor: SeededDoctor, settings: Settings
) -> None:
    """The holder walked away: the background sweep, not a command, gives the slot back."""
    async with connect(timed) as watcher, connect(timed, "p-gone") as patient:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        slot = snapshot.slots[0]
        await patient.watch_appointments()
        hold = await patient.hold(slot.id)
        ttl = timedelta(seconds=settings.hold_ttl_s)
        assert hold.hold_expires_at == clock.now + ttl
        held = await watcher.next_delta()
        assert [s.status for s in held.slots] == [SlotStatus.BUSY_TENTATIVE]

        clock.advance(ttl + timedelta(seconds=1))
        freed = await watcher.next_delta(timeout=5)

        assert freed.version == held.version + 1
        assert freed.slots == [SlotView(slot.id, slot.start, slot.end, SlotStatus.FREE)]
        assert watcher.calendars[doctor.id].slots[slot.id].status is SlotStatus.FREE
        # The holder's own room hears it lapse: cancelled, and no expiry any more.
        events = [await expect(patient, AppointmentEvent) for _ in range(2)]
        assert [(e.appointment.status, e.appointment.cancel_reason) for e in events] == [
            (AppointmentStatus.PENDING, None),
            (AppointmentStatus.CANCELLED, "hold expired"),
        ]
        assert events[-1].appointment.hold_expires_at is None
        await refused(ErrorCode.HOLD_EXPIRED, patient.book(hold_id=hold.id))
        assert await patient.my_appointments() == []
        # The slot really is free again: someone else takes it.
        async with connect(timed, "p-next") as other:
            assert (await other.book(slot.id)).status is AppointmentStatus.BOOKED


# ---- every command over REST ------------------------------------------------------------------


async def test_rest_hold_release_and_confirm(client: AppClient, doctor: SeededDoctor) -> None:
    slot = doctor.slots[0]
    me = bearer("p-rest")

    held = await json_of(
        await client.post("/api/holds", json={"slot_id": slot.id}, headers=me), 201
    )
    hold = held["appointment"]
    assert (hold["slot_id"], hold["patient_id"], hold["status"]) == (slot.id, "p-rest", "pending")
    assert hold["hold_expires_at"] is not None
    assert (await slot_statuses(client, doctor))[slot.id] == "busy-tentative"

    released = await json_of(await client.delete(f"/api/holds/{hold['id']}", headers=me), 200)
    assert released["appointment"]["id"] == hold["id"]
    assert released["appointment"]["status"] == "cancelled"
    assert released["appointment"]["cancel_reason"] == "released"
    assert released["appointment"]["hold_expires_at"] is None  # only a pending hold expires
    assert (await slot_statuses(client, doctor))[slot.id] == "free"

    # Another slot: the one given back is barred to its patient for the re-hold cool-down
    # (tests/server/test_booking_limits.py).
    other = doctor.slots[1]
    again = await json_of(
        await client.post("/api/holds", json={"slot_id": other.id}, headers=me), 201
    )
    hold_id = again["appointment"]["id"]
    booked = await json_of(
        await client.post("/api/appointments", json={"hold_id": hold_id}, headers=me), 201
    )
    assert booked["appointment"]["id"] == hold_id
    assert booked["appointment"]["status"] == "booked"
    assert booked["appointment"]["hold_expires_at"] is None
    assert (await slot_statuses(client, doctor))[other.id] == "busy"


async def test_rest_cancel_replays_its_first_reply_for_the_same_idempotency_key(
    client: AppClient, doctor: SeededDoctor, store: Store
) -> None:
    me = bearer("p-cancel")
    slot = doctor.slots[1]
    booked = await json_of(
        await client.post("/api/appointments", json={"slot_id": slot.id}, headers=me), 201
    )
    url = f"/api/appointments/{booked['appointment']['id']}/cancel"
    keyed = {**me, "Idempotency-Key": "cancel-1"}
    version = await reads.doctor_version(store, doctor.id)

    first = await json_of(await client.post(url, json={"reason": "ill"}, headers=keyed), 200)
    second = await json_of(await client.post(url, json={"reason": "ill"}, headers=keyed), 200)

    assert first == second
    assert first["appointment"]["status"] == "cancelled"
    assert first["appointment"]["cancel_reason"] == "ill"
    assert await reads.doctor_version(store, doctor.id) == version + 1  # one commit, then a replay
    assert (await slot_statuses(client, doctor))[slot.id] == "free"
    # Without the key, the second cancel is what it is: a cancelled one cannot be cancelled.
    again = await client.post(url, json={"reason": "ill"}, headers=me)
    await rest_error(again, ErrorCode.INVALID_TRANSITION)
    other = await client.post(url, json={"reason": "other"}, headers=keyed)
    await rest_error(other, ErrorCode.IDEMPOTENCY_CONFLICT)


async def test_rest_reschedule_then_the_doctor_marks_attendance(
    client: AppClient, doctor: SeededDoctor
) -> None:
    me = bearer("p-move")
    old_slot, new_slot = doctor.slots[2], doctor.slots[3]
    booked = await json_of(
        await client.post("/api/appointments", json={"slot_id": old_slot.id}, headers=me), 201
    )
    old_id = booked["appointment"]["id"]

    moved = await json_of(
        await client.post(
            f"/api/appointments/{old_id}/reschedule", json={"slot_id": new_slot.id}, headers=me
        ),
        201,
    )

    new = moved["appointment"]
    assert (new["slot_id"], new["status"], new["replaces_id"]) == (new_slot.id, "booked", old_id)
    assert moved["replaced"]["id"] == old_id
    assert moved["replaced"]["status"] == "cancelled"
    assert moved["replaced"]["cancel_reason"] == "rescheduled"
    statuses = await slot_statuses(client, doctor)
    assert (statuses[old_slot.id], statuses[new_slot.id]) == ("free", "busy")

    status_url = f"/api/appointments/{new['id']}/status"
    by_patient = await client.post(status_url, json={"status": "arrived"}, headers=me)
    await rest_error(by_patient, ErrorCode.FORBIDDEN)
    arrived = await json_of(
        await client.post(status_url, json={"status": "arrived"}, headers=doctor_of(doctor)), 200
    )
    assert (arrived["appointment"]["id"], arrived["appointment"]["status"]) == (
        new["id"],
        "arrived",
    )


async def test_rest_block_and_unblock_belong_to_the_doctor(
    client: AppClient, doctor: SeededDoctor
) -> None:
    slot = doctor.slots[4]
    url = f"/api/slots/{slot.id}/block"

    # Every field is in the path; the body is the empty object (see docs/protocol.md).
    nosy = await client.post(url, json={}, headers=bearer("p-nosy"))
    await rest_error(nosy, ErrorCode.FORBIDDEN)
    await rest_error(await client.post(url, json={}), ErrorCode.UNAUTHENTICATED)
    someone_else = bearer(str(doctor.id + 1000), Role.DOCTOR)
    await rest_error(await client.post(url, json={}, headers=someone_else), ErrorCode.FORBIDDEN)
    assert (await slot_statuses(client, doctor))[slot.id] == "free"

    blocked = await json_of(await client.post(url, json={}, headers=doctor_of(doctor)), 200)
    assert blocked["doctor_id"] == doctor.id
    assert (blocked["slot"]["id"], blocked["slot"]["status"]) == (slot.id, "busy-unavailable")
    assert (await slot_statuses(client, doctor))[slot.id] == "busy-unavailable"
    unblocked = await json_of(await client.delete(url, headers=doctor_of(doctor)), 200)
    assert (unblocked["slot"]["id"], unblocked["slot"]["status"]) == (slot.id, "free")
    assert (await slot_statuses(client, doctor))[slot.id] == "free"


async def test_rest_schedule_and_the_three_lists(
    client: AppClient, doctor: SeededDoctor, store: Store
) -> None:
    me = bearer("p-lists")
    morning = next(s for s in doctor.slots if s.start.time() < time(12))
    booked = await json_of(
        await client.post("/api/appointments", json={"slot_id": morning.id}, headers=me), 201
    )
    appointment_id = booked["appointment"]["id"]
    day = morning.start.date().isoformat()

    listed = await json_of(
        await client.get(
            f"/api/doctors/{doctor.id}/appointments",
            params={"date": day},
            headers=doctor_of(doctor),
        ),
        200,
    )
    assert [a["id"] for a in listed["appointments"]] == [appointment_id]
    nosy = await client.get(
        f"/api/doctors/{doctor.id}/appointments", params={"date": day}, headers=me
    )
    await rest_error(nosy, ErrorCode.FORBIDDEN)
    mine = await json_of(await client.get("/api/me/appointments", headers=me), 200)
    assert [(a["id"], a["status"]) for a in mine["appointments"]] == [(appointment_id, "booked")]
    found = await json_of(await client.get("/api/doctors", params={"q": "test"}), 200)
    assert [d["id"] for d in found["doctors"]] == [doctor.id]
    nobody = await json_of(await client.get("/api/doctors", params={"q": "nobody"}), 200)
    assert nobody["doctors"] == []

    weekly = [{"weekday": b.weekday, "start": "08:00:00", "end": "12:00:00"} for b in MORNINGS]
    schedule_url = f"/api/doctors/{doctor.id}/schedule"
    body = {"weekly": weekly, "horizon_days": 9}
    version = await reads.doctor_version(store, doctor.id)
    await rest_error(await client.put(schedule_url, json=body, headers=me), ErrorCode.FORBIDDEN)
    updated = await json_of(
        await client.put(schedule_url, json=body, headers=doctor_of(doctor)), 200
    )
    assert updated["doctor_id"] == doctor.id
    assert updated["version"] == version + 1 == await reads.doctor_version(store, doctor.id)
    assert updated["removed"] > 0
    assert updated["conflicts"] == []  # the only booking is in the morning, still offered
    statuses = await slot_statuses(client, doctor)
    assert set(statuses) == {s.id for s in doctor.slots if s.start.time() < time(12)}
    assert statuses[morning.id] == "busy"


# ---- every engine refusal, with its code, on both front doors --------------------------------


async def test_not_holder(client: AppClient, doctor: SeededDoctor) -> None:
    slot = doctor.slots[0]
    async with connect(client, "p-owner") as owner, connect(client, "p-thief") as thief:
        hold = await owner.hold(slot.id)
        await refused(ErrorCode.NOT_HOLDER, thief.book(hold_id=hold.id))
        await refused(ErrorCode.NOT_HOLDER, thief.release(hold.id))
        rest = await client.post(
            "/api/appointments", json={"hold_id": hold.id}, headers=bearer("p-thief")
        )
        await rest_error(rest, ErrorCode.NOT_HOLDER)
        # The hold survived every attempt and is still its owner's to confirm.
        assert (await owner.book(hold_id=hold.id)).status is AppointmentStatus.BOOKED


async def test_hold_expired(timed: AppClient, clock: FakeClock, doctor: SeededDoctor) -> None:
    async with connect(timed, "p-late") as patient:
        first = await patient.hold(doctor.slots[0].id)
        second = await patient.hold(doctor.slots[1].id)
        assert second.hold_expires_at is not None
        clock.advance(second.hold_expires_at - clock.now + timedelta(seconds=1))
        await refused(ErrorCode.HOLD_EXPIRED, patient.book(hold_id=first.id))
        rest = await timed.delete(f"/api/holds/{second.id}", headers=bearer("p-late"))
        await rest_error(rest, ErrorCode.HOLD_EXPIRED)


async def test_hold_limit(
    settings: Settings, aiohttp_client: AiohttpClient, doctor: SeededDoctor
) -> None:
    app: AppClient = await aiohttp_client(create_app(settings.replace(max_holds_per_patient=1)))
    async with connect(app, "p-greedy") as patient:
        hold = await patient.hold(doctor.slots[0].id)
        await refused(ErrorCode.HOLD_LIMIT, patient.hold(doctor.slots[1].id))
        rest = await app.post(
            "/api/holds", json={"slot_id": doctor.slots[1].id}, headers=bearer("p-greedy")
        )
        await rest_error(rest, ErrorCode.HOLD_LIMIT)
        # The limit counts live holds: give one back and the next is allowed.
        await patient.release(hold.id)
        assert (await patient.hold(doctor.slots[1].id)).status is AppointmentStatus.PENDING


async def test_invalid_transition(client: AppClient, doctor: SeededDoctor) -> None:
    async with (
        connect(client, "p-trans") as patient,
        connect(client, str(doctor.id), Role.DOCTOR) as doc,
    ):
        hold = await patient.hold(doctor.slots[0].id)
        await refused(ErrorCode.INVALID_TRANSITION, patient.cancel(hold.id, "changed my mind"))
        await refused(ErrorCode.INVALID_TRANSITION, doc.block(doctor.slots[0].id))
        await refused(ErrorCode.INVALID_TRANSITION, doc.unblock(doctor.slots[1].id))
        await refused(ErrorCode.INVALID_TRANSITION, doc.mark(hold.id, AppointmentStatus.FULFILLED))
        rest = await client.delete(
            f"/api/slots/{doctor.slots[1].id}/block", headers=doctor_of(doctor)
        )
        await rest_error(rest, ErrorCode.INVALID_TRANSITION)
        # None of that touched the hold.
        assert [a.status for a in await patient.my_appointments()] == [AppointmentStatus.PENDING]


async def test_outside_horizon(client: AppClient, doctor: SeededDoctor, store: Store) -> None:
    """Slots laid out as of a later day exist, but are beyond today's horizon."""
    later = date.today() + timedelta(days=5)
    await commands.materialize_slots(store, doctor.id, today=later)
    horizon = (await doctors.doctor(store, doctor.id)).horizon_days
    beyond = date.today() + timedelta(days=horizon + 2)
    async with connect(client) as watcher, connect(client, "p-eager") as patient:
        snapshot = await watcher.watch(doctor.id, beyond, beyond + timedelta(days=1))
        assert snapshot.bookable_until is not None
        far = snapshot.slots[0]
        assert far.start >= snapshot.bookable_until
        await refused(ErrorCode.OUTSIDE_HORIZON, patient.hold(far.id))
        await refused(ErrorCode.OUTSIDE_HORIZON, patient.book(far.id))
        rest = await client.post(
            "/api/appointments", json={"slot_id": far.id}, headers=bearer("p-eager")
        )
        await rest_error(rest, ErrorCode.OUTSIDE_HORIZON)


async def test_too_late(timed: AppClient, clock: FakeClock, doctor: SeededDoctor) -> None:
    slot = doctor.slots[0]
    clock.now = slot.start  # the slot starts now
    async with connect(timed, "p-tardy") as patient:
        await refused(ErrorCode.TOO_LATE, patient.hold(slot.id))
        await refused(ErrorCode.TOO_LATE, patient.book(slot.id))
        rest = await timed.post("/api/holds", json={"slot_id": slot.id}, headers=bearer("p-tardy"))
        await rest_error(rest, ErrorCode.TOO_LATE)
        # A minute earlier it was still bookable.
        clock.now = slot.start - timedelta(minutes=1)
        assert (await patient.book(slot.id)).slot_id == slot.id


async def test_forbidden(client: AppClient, doctor: SeededDoctor) -> None:
    async with (
        connect(client, "p-first") as first,
        connect(client, "p-second") as second,
        connect(client, str(doctor.id + 1000), Role.DOCTOR) as stranger,
    ):
        appointment = await first.book(doctor.slots[0].id)
        await refused(ErrorCode.FORBIDDEN, second.block(doctor.slots[1].id))
        await refused(ErrorCode.FORBIDDEN, second.cancel(appointment.id, "not mine"))
        await refused(ErrorCode.FORBIDDEN, stranger.cancel(appointment.id, "not mine"))
        await refused(ErrorCode.FORBIDDEN, second.reschedule(appointment.id, doctor.slots[2].id))
        await refused(ErrorCode.FORBIDDEN, stranger.hold(doctor.slots[2].id))
        rest = await client.post(
            f"/api/appointments/{appointment.id}/cancel",
            json={"reason": "not mine"},
            headers=bearer("p-second"),
        )
        await rest_error(rest, ErrorCode.FORBIDDEN)
        assert [a.id for a in await first.my_appointments()] == [appointment.id]


# ---- booking over WebSockets: a race, a refusal, a retry, a bad key ------------------------


async def test_two_patients_racing_over_websockets_exactly_one_is_booked(
    client: TestClient[web.Request, web.Application], doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    url = ws_url(client)
    slot = doctor.slots[0]
    async with (
        SlotcastClient.connect(url, token=token(sub="ws-alice")) as alice,
        SlotcastClient.connect(url, token=token(sub="ws-bob")) as bob,
    ):
        results = await asyncio.gather(
            alice.book(slot.id), bob.book(slot.id), return_exceptions=True
        )

    booked = [r for r in results if isinstance(r, AppointmentView)]
    refused = [r for r in results if isinstance(r, ClientError)]
    assert len(booked) == 1, results
    assert len(refused) == 1, results
    assert refused[0].code is ErrorCode.SLOT_TAKEN
    assert refused[0].wire_code == "slot_taken"
    # The winner is whoever the server says it is, and it booked under its own identity.
    winner = "ws-alice" if results[0] is booked[0] else "ws-bob"
    assert booked[0].patient_id == winner
    assert booked[0].slot_id == slot.id
    assert booked[0].status is AppointmentStatus.BOOKED
    rows = await active_appointments(db, slot.id)
    assert [(r["id"], r["patient_id"]) for r in rows] == [(booked[0].id, winner)]


async def test_double_booking_over_websocket_is_slot_taken(
    client: AppClient, doctor: SeededDoctor
) -> None:
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(sub="p-1")) as first,
        SlotcastClient.connect(url, token=token(sub="p-2")) as second,
    ):
        await first.book(doctor.slots[0].id)
        with pytest.raises(ClientError) as caught:
            await second.book(doctor.slots[0].id)
        assert caught.value.code == ErrorCode.SLOT_TAKEN


async def test_idempotent_rebook_over_websocket_returns_first_result(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """A retry after a lost reply must not book twice nor fail as slot_taken."""
    async with (
        SlotcastClient.connect(ws_url(client)) as watcher,
        SlotcastClient.connect(ws_url(client), token=token(sub="p-idem")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        first = await patient.book(doctor.slots[0].id, idempotency_key="k-1")
        again = await patient.book(doctor.slots[0].id, idempotency_key="k-1")
        assert again == first
        assert (await watcher.next_delta()).version == snapshot.version + 1
        await assert_no_delta_before_pong(watcher)
        with pytest.raises(ClientError) as caught:
            await patient.book(doctor.slots[1].id, idempotency_key="k-1")
        assert caught.value.code == ErrorCode.IDEMPOTENCY_CONFLICT


async def test_nul_in_idempotency_key_is_invalid(client: AppClient, doctor: SeededDoctor) -> None:
    """Client input must fail as `invalid`, never as the server's own `internal` error."""
    async with SlotcastClient.connect(ws_url(client), token=token(sub="p-nul")) as patient:
        with pytest.raises(ClientError) as caught:
            await patient.book(doctor.slots[0].id, idempotency_key="a\x00b")
        assert caught.value.code == ErrorCode.INVALID
        # The slot is still free for an honest retry.
        assert (await patient.book(doctor.slots[0].id)).slot_id == doctor.slots[0].id


# ---- schedule edits, live --------------------------------------------------------------------


async def test_a_schedule_edit_reaches_watchers_as_one_delta_of_removed_slots(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Afternoons close: free ones vanish from every calendar at once; a booked one stays."""
    async with (
        connect(client) as watcher,
        connect(client, "p-afternoon") as patient,
        connect(client, str(doctor.id), Role.DOCTOR) as doc,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        afternoon = [s for s in snapshot.slots if s.start.time() >= time(12)]
        mornings = {s.id for s in snapshot.slots if s.start.time() < time(12)}
        kept = afternoon[0]
        await patient.book(kept.id)
        booked = await next_slot(watcher, kept.id)

        result = await doc.set_schedule(doctor.id, MORNINGS, horizon_days=9)
        delta = await watcher.next_delta()

        assert delta.version == booked.version + 1 == result.version
        removed = set(delta.removed)
        assert {s.id for s in afternoon[1:]} <= removed
        assert kept.id not in removed
        assert not mornings & removed
        assert len(delta.removed) == result.removed
        assert result.conflicts == [kept.id]
        assert all(s.start.time() < time(12) for s in delta.slots)
        calendar = watcher.calendars[doctor.id]
        assert calendar.version == delta.version
        assert set(calendar.slots) == mornings | {kept.id}
        assert calendar.slots[kept.id].status is SlotStatus.BUSY
        assert await deltas_before_pong(watcher) == [], "the edit was more than one delta"


# ---- known defects -----------------------------------------------------------------------------


async def test_a_cancelled_booking_is_not_an_expired_hold_whatever_its_reason(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """The reason is the patient's text; only the sweep can expire a hold."""
    async with connect(client, "p-wordy") as patient:
        hold = await patient.hold(doctor.slots[0].id)
        await patient.book(hold_id=hold.id)
        await patient.cancel(hold.id, "hold expired")
        await refused(ErrorCode.INVALID_TRANSITION, patient.release(hold.id))
        await refused(ErrorCode.INVALID_TRANSITION, patient.book(hold_id=hold.id))


# ---- attendance: never ahead of time, and undone within a window ---------------------------


async def test_attendance_is_refused_before_its_time_and_a_mark_can_be_undone(
    settings: Settings, aiohttp_client: AiohttpClient, clock: FakeClock, doctor: SeededDoctor
) -> None:
    """The production window (an hour's early arrival; no-show and seen from the start),
    not the test suite's: a no-show three days ahead was the bug."""
    app = create_app(settings.replace(arrive_early_minutes=60, unmark_window_s=600), clock=clock)
    client: AppClient = await aiohttp_client(app)
    slot = doctor.slots[0]
    me, staff = bearer("p-attend"), doctor_of(doctor)
    booked = await json_of(
        await client.post("/api/appointments", json={"slot_id": slot.id}, headers=me), 201
    )
    status_url = f"/api/appointments/{booked['appointment']['id']}/status"

    async def mark(status: str) -> ClientResponse:
        return await client.post(status_url, json={"status": status}, headers=staff)

    clock.now = slot.start - timedelta(minutes=61)
    await rest_error(await mark("arrived"), ErrorCode.TOO_EARLY)
    clock.now = slot.start - timedelta(minutes=1)
    await rest_error(await mark("noshow"), ErrorCode.TOO_EARLY)
    arrived = await json_of(await mark("arrived"), 200)
    assert arrived["appointment"]["status"] == "arrived"
    await rest_error(await mark("fulfilled"), ErrorCode.TOO_EARLY)

    # The wrong button: undone within the window, live for the patient.
    async with connect(client, "p-attend") as patient:
        await patient.watch_appointments()
        undone = await json_of(await client.delete(status_url, headers=staff), 200)
        assert undone["appointment"]["status"] == "booked"
        event = await patient.next_event()
        assert isinstance(event, AppointmentEvent)
        assert event.appointment.status is AppointmentStatus.BOOKED

    clock.now = slot.start + timedelta(minutes=15)
    noshow = await json_of(await mark("noshow"), 200)
    assert noshow["appointment"]["status"] == "noshow"
    clock.advance(timedelta(seconds=601))
    await rest_error(await client.delete(status_url, headers=staff), ErrorCode.INVALID_TRANSITION)
    by_patient = await client.delete(status_url, headers=me)
    await rest_error(by_patient, ErrorCode.FORBIDDEN)
    # Nothing to undo on a booking that was never marked.
    other = await json_of(
        await client.post("/api/appointments", json={"slot_id": doctor.slots[1].id}, headers=me),
        201,
    )
    fresh = await client.delete(
        f"/api/appointments/{other['appointment']['id']}/status", headers=staff
    )
    await rest_error(fresh, ErrorCode.INVALID_TRANSITION)
