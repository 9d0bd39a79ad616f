"""The Python client always recovers: a restore after a reconnect that fails is retried.

Two faults at once, in one process: the instance's clients lose their sockets (as
when an instance is killed) while its database is unreachable (a TCP relay in
front of PostgreSQL is cut, see testkit/proxy.py). The clients reconnect at once,
but every `watch` they resume with is answered `unavailable`; they must keep
trying, with `ready` clear, until the database returns, and then converge to it
with every room back: availability, the dashboard and the patient's appointments.

Tests that serve an app list the database fixtures (`doctor`, `settings`) before
the app's client, so the app and its pool close before the database is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from client import SlotcastClient
from protocol.messages import AppointmentEvent, Book, DashboardDelta, Delta, Hold, Presence
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from server.app import create_app
from server.keys import CONNECTIONS
from server.service import Scheduling
from server.settings import Settings
from store import commands, reads
from store.pool import Store
from store.tx import Actor
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.proxy import pg_proxy
from testkit.wire import eventually, expect

BACKOFF_S = 0.3  # the clients' backoff cap: many retries while the database is down
HOLD = timedelta(minutes=5)


def kill_connections(client: TestClient) -> int:
    """Every client socket of the instance drops with no close frame, as on kill -9."""
    sessions = list(client.app[CONNECTIONS])
    for session in sessions:
        session.conn._transport.abort()
    return len(sessions)


async def truth(store: Store, doctor: SeededDoctor) -> dict[int, SlotStatus]:
    snapshot = await reads.snapshot(store, doctor.id, doctor.start, doctor.end)
    return {s.id: s.status for s in snapshot.slots}


def seen(client: SlotcastClient, doctor: SeededDoctor) -> dict[int, SlotStatus]:
    return {s.id: s.status for s in client.calendars[doctor.id].slots.values()}


async def test_restore_is_retried_while_the_database_is_down_and_converges_after(
    store: Store,
    doctor: SeededDoctor,
    settings: Settings,
    aiohttp_client: AiohttpClient,
) -> None:
    async with pg_proxy(settings.database_url or "") as proxy:
        client = await aiohttp_client(create_app(settings.replace(database_url=proxy.dsn)))
        url = ws_url(client)
        doctor_token = token(Role.DOCTOR, str(doctor.id))
        async with (
            SlotcastClient.connect(
                url, token=doctor_token, reconnect=True, max_backoff=BACKOFF_S
            ) as doc,
            SlotcastClient.connect(
                url,
                token=token(sub="alice"),
                token_in_header=False,
                codec="msgpack",
                reconnect=True,
                max_backoff=BACKOFF_S,
            ) as alice,
        ):
            await doc.watch(doctor.id, doctor.start, doctor.end)
            await doc.watch_dashboard(doctor.id, doctor.start)
            await alice.watch(doctor.id, doctor.start, doctor.end)
            await alice.watch_appointments()
            before = alice.calendars[doctor.id].version

            await proxy.cut()
            assert kill_connections(client) == 2
            await eventually(
                lambda: all(c.reconnects == 1 and c.restore_failures >= 3 for c in (doc, alice)),
                "both clients to reconnect and fail to restore, several times",
            )
            # Meanwhile the clinic goes on elsewhere: bob books, alice holds from her phone.
            slots = doctor.slots
            await commands.book(
                store, Actor("bob", Role.PATIENT), Book(slot_id=slots[0].id), limits=None
            )
            await commands.hold(
                store,
                Actor("alice", Role.PATIENT),
                Hold(slots[1].id),
                ttl=HOLD,
                max_holds=3,
                limits=None,
            )
            assert not doc.ready.is_set()
            assert not alice.ready.is_set()
            assert alice.calendars[doctor.id].version == before  # frozen, not lost
            assert all(c.reconnects == 1 for c in (doc, alice))  # the sockets stayed up

            await proxy.restore()
            await eventually(
                lambda: doc.ready.is_set() and alice.ready.is_set(),
                "both clients to restore every room once the database is back",
            )
            expected = await truth(store, doctor)
            assert expected[slots[0].id] is SlotStatus.BUSY
            assert expected[slots[1].id] is SlotStatus.BUSY_TENTATIVE
            for c in (doc, alice):
                await eventually(
                    lambda c=c: seen(c, doctor) == expected,  # type: ignore[misc]
                    "the calendar to equal the database",
                )
            assert alice.calendars[doctor.id].resyncs == 0  # resumed from the change log

            # Every room is live again: the doctor marks bob arrived (dashboard, and a
            # version for the watchers), then cancels alice's appointment-to-be.
            appointments = await doc.list_appointments(doctor.id, slots[0].start.date())
            bobs = next(a for a in appointments if a.patient_id == "bob")
            await doc.mark(bobs.id, AppointmentStatus.ARRIVED)
            others = (Delta, Presence, AppointmentEvent)
            delta = await expect(doc, DashboardDelta, skip=others)
            while delta.kinds != ["appointment.arrived"]:  # the relay may bring the outage's
                delta = await expect(doc, DashboardDelta, skip=others)
            booked = await alice.book(hold_id=(await alice.my_appointments())[0].id)
            await doc.cancel(booked.id, "the doctor is ill")
            event = await expect(alice, AppointmentEvent, skip=(Delta,))
            while event.appointment.status is not AppointmentStatus.CANCELLED:
                event = await expect(alice, AppointmentEvent, skip=(Delta,))
            assert event.appointment.id == booked.id
            await eventually(
                lambda: seen(alice, doctor)[slots[1].id] is SlotStatus.FREE,
                "alice's calendar to follow live",
            )


async def test_a_restore_that_times_out_is_retried_on_the_same_socket(
    store: Store,
    doctor: SeededDoctor,
    settings: Settings,
    aiohttp_client: AiohttpClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not only `unavailable`: a resume whose reply never comes in `request_timeout`
    is sent again, and the client is ready once one is answered."""
    client = await aiohttp_client(create_app(settings))
    gate = asyncio.Event()
    stalled = 0
    missed: Callable[..., Awaitable[Any]] = Scheduling.missed

    async def slow_missed(self: Scheduling, doctor_id: int, since: int, at_least: int) -> Any:
        nonlocal stalled
        if not gate.is_set():
            stalled += 1
            await gate.wait()
        return await missed(self, doctor_id, since, at_least)

    async with SlotcastClient.connect(
        ws_url(client), reconnect=True, max_backoff=BACKOFF_S, request_timeout=0.3
    ) as watcher:
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        monkeypatch.setattr(Scheduling, "missed", slow_missed)
        assert kill_connections(client) == 1
        await eventually(
            lambda: watcher.reconnects == 1 and watcher.restore_failures >= 2,
            "the resume to time out, more than once",
        )
        assert stalled == 1  # the retries queue behind the stalled one: one connection
        assert not watcher.ready.is_set()
        await commands.book(
            store, Actor("bob", Role.PATIENT), Book(slot_id=doctor.slots[0].id), limits=None
        )
        gate.set()
        await eventually(watcher.ready.is_set, "the retried resume to be answered")
        expected = await truth(store, doctor)
        await eventually(lambda: seen(watcher, doctor) == expected, "the calendar to converge")
        assert watcher.reconnects == 1
