"""Private rooms end with the token that opened them.

A dashboard names patients and a patient room carries their appointments; both are
joined once and then stream, so the server, not each command, has to notice the
token running out. Tokens here live two seconds (JWT `exp` has whole seconds).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from aiohttp import web
from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.errors import ErrorCode
from protocol.messages import (
    AppointmentEvent,
    Dashboard,
    DashboardDelta,
    Delta,
    Error,
    Message,
    Presence,
    Unwatched,
)
from protocol.vocabulary import Role
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.wire import events_before_pong, expect

AppClient = TestClient[web.Request, web.Application]
SHORT = timedelta(seconds=2)


def live_only(events: list[Message]) -> list[Message]:
    return [e for e in events if not isinstance(e, Presence)]


async def test_an_expired_token_leaves_dashboard_and_patient_room_but_not_public_watches(
    doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    doctor_token = token(Role.DOCTOR, str(doctor.id), ttl=SHORT)
    async with (
        SlotcastClient.connect(url, token=doctor_token) as doc,
        SlotcastClient.connect(url, token=token(sub="p-short", ttl=SHORT)) as patient,
        SlotcastClient.connect(url, token=token(sub="p-long")) as booker,
    ):
        await doc.watch(doctor.id, doctor.start, doctor.end)
        assert isinstance(await doc.watch_dashboard(doctor.id, doctor.start), Dashboard)
        await patient.watch_appointments()

        error = await expect(doc, Error, skip=(Presence,))
        assert error.code == ErrorCode.TOKEN_EXPIRED
        left = await expect(doc, Unwatched, skip=(Presence,))
        assert (left.room, left.doctor_id) == ("dashboard", doctor.id)
        error = await expect(patient, Error)
        assert error.code == ErrorCode.TOKEN_EXPIRED
        assert (await expect(patient, Unwatched)).room == "appointments"

        # A booking now: the public watch still hears it, the private rooms do not.
        await booker.book(doctor.slots[0].id)
        delta = await expect(doc, Delta, skip=(Presence,))
        assert delta.slots[0].id == doctor.slots[0].id
        assert not any(isinstance(e, DashboardDelta) for e in await events_before_pong(doc))
        assert live_only(await events_before_pong(patient)) == []
        # ...and the patient's own change is no longer pushed to it either.
        async with SlotcastClient.connect(url, token=token(sub="p-short")) as same_patient:
            await same_patient.book(doctor.slots[1].id)
        assert live_only(await events_before_pong(patient)) == []


async def test_a_fresh_auth_before_expiry_keeps_the_rooms(
    doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(Role.DOCTOR, str(doctor.id), ttl=SHORT)) as doc,
        SlotcastClient.connect(url, token=token(sub="p-renew", ttl=SHORT)) as patient,
    ):
        await doc.watch_dashboard(doctor.id, doctor.start)
        await patient.watch_appointments()
        renewed_until = (await doc.auth(token(Role.DOCTOR, str(doctor.id)))).expires_at
        await patient.auth(token(sub="p-renew"))
        # Wait out the first tokens (the renewed ones last 12 hours); time must pass here.
        await asyncio.sleep(2.5)
        assert renewed_until is not None
        assert datetime.now(UTC) > renewed_until - timedelta(hours=12) + SHORT  # first ones gone
        # Still members: the booking streams to both, and neither heard of an expiry.
        booked = await patient.book(doctor.slots[0].id)
        delta = await expect(doc, DashboardDelta, skip=(Presence,))
        assert [a.id for a in delta.appointments] == [booked.id]
        assert (await expect(patient, AppointmentEvent)).appointment.id == booked.id


async def test_after_expiry_a_new_token_lets_the_client_join_again(
    doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    async with SlotcastClient.connect(
        url, token=token(Role.DOCTOR, str(doctor.id), ttl=SHORT)
    ) as doc:
        await doc.watch_dashboard(doctor.id, doctor.start)
        assert (await expect(doc, Error, skip=(Presence,))).code == ErrorCode.TOKEN_EXPIRED
        await doc.auth(token(Role.DOCTOR, str(doctor.id)))
        dashboard = await doc.watch_dashboard(doctor.id, doctor.start)
        assert dashboard.doctor_id == doctor.id


async def test_switching_identity_by_auth_leaves_the_private_rooms_and_says_so(
    doctor: SeededDoctor, client: AppClient
) -> None:
    """Rooms joined as one identity are not kept for another: an `auth` naming someone
    else leaves them, with an `unwatched` (id null) for each before the reply; the same
    identity's fresh token keeps them; the public watch stays either way."""
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(Role.DOCTOR, str(doctor.id))) as desk,
        SlotcastClient.connect(url, token=token(sub="p-first")) as kiosk,
        SlotcastClient.connect(url, token=token(sub="p-booker")) as booker,
    ):
        await desk.watch(doctor.id, doctor.start, doctor.end)
        await desk.watch_dashboard(doctor.id, doctor.start)
        await kiosk.watch_appointments()
        await desk.auth(token(Role.DOCTOR, str(doctor.id)))  # the same doctor: nothing left
        await kiosk.auth(token(sub="p-first"))
        assert live_only(await events_before_pong(desk)) == []
        assert live_only(await events_before_pong(kiosk)) == []

        await desk.auth(token(Role.ADMIN, "ops"))  # another identity, even a mightier one
        await kiosk.auth(token(sub="p-second"))
        assert live_only(await events_before_pong(desk)) == [Unwatched(doctor.id, room="dashboard")]
        assert live_only(await events_before_pong(kiosk)) == [Unwatched(room="appointments")]
        assert (desk.dashboards, kiosk.following) == ({}, False)  # the client forgets them too

        booked = await booker.book(doctor.slots[0].id)
        delta = await expect(desk, Delta, skip=(Presence,))  # the public watch goes on
        assert delta.slots[0].id == booked.slot_id
        assert not any(isinstance(e, DashboardDelta) for e in await events_before_pong(desk))
        # A patient's appointments are for that patient's eyes: p-first's own booking is not
        # pushed to the kiosk now that it is p-second.
        async with SlotcastClient.connect(url, token=token(sub="p-first")) as first:
            await first.book(doctor.slots[1].id)
        assert live_only(await events_before_pong(kiosk)) == []
