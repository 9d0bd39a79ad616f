"""Edges of the protocol an independent client found vague or wrong, pinned as documented.

Each test is one promise of docs/protocol.md that a client written from the page alone
relies on: dates at the ends of the calendar, a `mark` to a status that is no mark.
Everything goes over a real loopback WebSocket (or REST) to the in-process server, so
what is asserted is what any client sees on the wire. (An identity switch by `auth` is
in test_token_expiry.py, with the other ways private rooms end.)
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.errors import ErrorCode
from protocol.messages import DashboardDelta, Delta, Error, Presence
from protocol.vocabulary import Role
from server.app import create_app
from server.settings import Settings
from store import doctors
from store.pool import Store
from store.schedule import Block
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.wire import error_code, expect

AppClient = TestClient[Any, Any]


async def refusal(client: SlotcastClient, kind: str, body: dict[str, Any]) -> Error:
    """The `error` answering a raw frame (the Python client's own types refuse some of
    these): replies come in request order, so it is the next event but for pushes."""
    frame = client._codec.dumps({"type": kind, "id": "edge", "body": body})
    await client.send_raw(frame)
    return await expect(client, Error, skip=(Presence, Delta, DashboardDelta))


# ---- dates at the ends of the calendar ------------------------------------------------------

FIRST, LAST = "0001-01-01", "9999-12-31"  # what a date holds in Python and most languages


def date_frames(doctor_id: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("watch_dashboard", {"doctor_id": doctor_id, "date": LAST}),
        ("watch_dashboard", {"doctor_id": doctor_id, "date": FIRST}),
        ("watch", {"doctor_id": doctor_id, "start": "9999-12-30", "end": LAST}),
        ("watch", {"doctor_id": doctor_id, "start": FIRST, "end": "0001-01-05"}),
        ("list_appointments", {"doctor_id": doctor_id, "date": LAST}),
        ("list_appointments", {"doctor_id": doctor_id, "date": FIRST}),
        ("set_schedule", {"doctor_id": doctor_id, "weekly": [], "overrides": [{"date": LAST}]}),
    ]


async def test_dates_at_the_ends_of_the_calendar_are_invalid_not_internal(
    client: AppClient, doctor: SeededDoctor, caplog: pytest.LogCaptureFixture
) -> None:
    """9999-12-31 is a date in every language, but the day after it is none: the server
    refuses the first and last days as `invalid`, never fails on them (`internal`)."""
    caplog.set_level(logging.INFO)
    admin = token(Role.ADMIN, "ops")
    async with SlotcastClient.connect(ws_url(client), token=admin) as c:
        for kind, body in date_frames(doctor.id):
            error = await refusal(c, kind, body)
            assert error.code == ErrorCode.INVALID, (kind, body, error)
            assert "must be a date from 0001-01-02 to 9999-12-30" in error.message
        # The nearest dates inside are fine.
        dashboard = await c.watch_dashboard(doctor.id, date(9999, 12, 30))
        assert dashboard.appointments == []
        assert await c.list_appointments(doctor.id, date(1, 1, 2)) == []
    headers = {"Authorization": f"Bearer {admin}"}
    for url in (
        f"/api/doctors/{doctor.id}/slots?start=9999-12-30&end={LAST}",
        f"/api/doctors/{doctor.id}/slots?start={FIRST}&end=0001-01-05",
        f"/api/doctors/{doctor.id}/appointments?date={LAST}",
    ):
        assert await error_code(await client.get(url, headers=headers), 422) == "invalid"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- a mark to a status that is no mark -----------------------------------------------------


@pytest.mark.parametrize("status", ["pending", "booked", "cancelled"])
async def test_a_mark_to_a_status_that_is_never_marked_is_invalid_transition(
    client: AppClient, doctor: SeededDoctor, db: asyncpg.Connection, status: str
) -> None:
    """`pending`, `booked` and `cancelled` are appointment statuses, so the frame is valid;
    no mark leads to them (holds, bookings and cancellations have their own commands),
    so the move is refused as `invalid_transition` from every status, once the appointment
    is found and the caller may mark it; nothing changes."""
    async with (
        SlotcastClient.connect(ws_url(client), token=token(sub="p-mark")) as patient,
        SlotcastClient.connect(ws_url(client), token=token(Role.DOCTOR, str(doctor.id))) as doc,
        SlotcastClient.connect(ws_url(client), token=token(Role.DOCTOR, "999")) as other,
    ):
        held = await patient.hold(doctor.slots[0].id)
        booked = await patient.book(doctor.slots[1].id)
        for appointment in (held, booked):
            body = {"appointment_id": appointment.id, "status": status}
            error = await refusal(doc, "mark", body)
            assert error.code == ErrorCode.INVALID_TRANSITION, (appointment.status, error)
            assert (await refusal(other, "mark", body)).code == ErrorCode.FORBIDDEN
        missing = {"appointment_id": booked.id + 100, "status": status}
        assert (await refusal(doc, "mark", missing)).code == ErrorCode.NOT_FOUND
    rows = await db.fetch("SELECT id, status FROM appointments ORDER BY id")
    assert [(r["id"], r["status"]) for r in rows] == [(held.id, "pending"), (booked.id, "booked")]
    resp = await client.post(
        f"/api/appointments/{booked.id}/status",
        json={"status": status},
        headers={"Authorization": f"Bearer {token(Role.DOCTOR, str(doctor.id))}"},
    )
    assert await error_code(resp, 409) == "invalid_transition"


@pytest.mark.parametrize("status", ["ARRIVED", "proposed", "waitlist", "", None, 3])
async def test_a_mark_to_something_that_is_no_appointment_status_is_invalid(
    client: AppClient, doctor: SeededDoctor, status: Any
) -> None:
    """Not one of the six statuses (FHIR's others included, case matters): the frame
    does not validate, so it is `invalid` before anything is looked up."""
    async with SlotcastClient.connect(
        ws_url(client), token=token(Role.DOCTOR, str(doctor.id))
    ) as doc:
        error = await refusal(doc, "mark", {"appointment_id": 123456, "status": status})
        assert error.code == ErrorCode.INVALID
        assert "status" in error.message


# ---- outside_horizon: when a slot one can see is still too far ahead ------------------------

# Saturday 26 October 2030, 00:10 in Berlin (CEST, UTC+2); on Sunday the clocks go back
# an hour, so Sunday has 25 hours and two local days hold 49.
AUTUMN_NIGHT = datetime(2030, 10, 25, 22, 10, tzinfo=UTC)
LATE_HOURS = [Block(d, time(23), time(23, 59)) for d in range(1, 8)]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_outside_horizon_is_a_late_slot_of_the_last_day_across_an_autumn_clock_change(
    store: Store, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """The server opens slots for `horizon_days` whole local days, and refuses a slot that
    starts `horizon_days` x 24 h or more from now. The two agree unless a day in between
    is longer than 24 h: then, in the first hour after local midnight, the last day's
    latest slots are open (seen in snapshots, after `bookable_until`) but `outside_horizon`,
    until the window moves past them. This is the one way a client meets the code."""
    doctor_id = await doctors.create_doctor(
        store,
        name="Dr. Herbst",
        timezone="Europe/Berlin",
        schedule=LATE_HOURS,
        slot_minutes=15,
        horizon_days=2,
    )
    clock = Clock(AUTUMN_NIGHT)
    client = await aiohttp_client(create_app(settings, clock=clock))  # its upkeep opens them
    patient = token(sub="p-late", ttl=timedelta(days=20 * 366))
    async with SlotcastClient.connect(ws_url(client), token=patient) as c:
        snapshot = await c.watch(doctor_id, date(2030, 10, 26), date(2030, 10, 28))
        assert snapshot.bookable_until == AUTUMN_NIGHT + timedelta(days=2)
        sunday = [s for s in snapshot.slots if s.start.date() == date(2030, 10, 27)]
        # 23:00, 23:15 and 23:30 on Sunday in Berlin (UTC+1 by then).
        assert [s.start.time() for s in sunday] == [time(22), time(22, 15), time(22, 30)]
        inside, late, latest = sunday
        assert inside.start < snapshot.bookable_until <= late.start
        for slot in (late, latest):
            with pytest.raises(ClientError) as caught:
                await c.hold(slot.id)
            assert caught.value.code == ErrorCode.OUTSIDE_HORIZON
            with pytest.raises(ClientError) as caught:
                await c.book(slot.id)
            assert caught.value.code == ErrorCode.OUTSIDE_HORIZON
        assert (await c.hold(inside.id)).slot_id == inside.id
        # Ten minutes later the window has moved past 23:15: it can be booked now.
        clock.now += timedelta(minutes=10)
        assert (await c.book(late.id)).slot_id == late.id
        with pytest.raises(ClientError) as caught:
            await c.book(latest.id)
        assert caught.value.code == ErrorCode.OUTSIDE_HORIZON
