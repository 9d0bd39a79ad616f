"""Real time inside one instance: dashboards, presence, patient rooms, resume, relay, back-pressure.

Everything goes through a real loopback WebSocket to the in-process server, so
what is asserted is what a browser or the Python client would see on the wire.
The slow-consumer tests make the server's socket genuinely back up (a paused
client transport and a small server send buffer); tests/unit/test_outbox.py drives
the Connection with a fake transport, where the exact merge and close rules can be
pinned without depending on kernel buffer sizes.

Tests that serve an app list the database fixtures (`doctor`, `settings`) before
the app's client, so the app and its pool close before the database is dropped.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.codec import JSON, MSGPACK, Codec
from protocol.errors import ErrorCode
from protocol.messages import AppointmentEvent as Event
from protocol.messages import (
    Dashboard,
    DashboardDelta,
    Delta,
    Message,
    Presence,
    Resumed,
    SlotView,
    Snapshot,
    Watch,
    WeeklyBlock,
)
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from server.app import INSTANCE_COOKIE, create_app
from server.connection import (
    CLOSE_SLOW_CONSUMER,
    COALESCE_AFTER,
    HIGH_WATER,
    Connection,
)
from server.keys import BROKER, CONNECTIONS, OUTBOX, STATE
from server.settings import Settings
from store import commands, outbox, reads
from store.changes import Change, unpack
from store.errors import Unavailable
from store.pool import Store
from testkit.fixtures import SeededDoctor, seed_doctor, token, ws_url
from testkit.wire import WAIT_S, events_before_pong, eventually, expect

AppClient = TestClient[web.Request, web.Application]

PRESENCE_S = 4.0  # a local join is told to dashboards on the next full announce (every 2 s)
EVERY_DAY = range(1, 8)


# ---- helpers ---------------------------------------------------------------------------------


def doctor_token(doctor_id: int) -> str:
    return token(Role.DOCTOR, str(doctor_id))


async def serve(aiohttp_client: AiohttpClient, settings: Settings) -> AppClient:
    return cast(AppClient, await aiohttp_client(create_app(settings)))


def statuses(slots: Iterable[SlotView]) -> dict[int, SlotStatus]:
    return {s.id: s.status for s in slots}


async def db_statuses(store: Store, doctor: SeededDoctor) -> dict[int, SlotStatus]:
    return statuses((await reads.snapshot(store, doctor.id, doctor.start, doctor.end)).slots)


def in_range(slots: dict[int, Any], doctor: SeededDoctor) -> dict[int, Any]:
    """Deltas carry a doctor's slots of every day; keep those of the watched dates (UTC)."""
    return {sid: s for sid, s in slots.items() if doctor.start <= slot_date(s) < doctor.end}


def slot_date(slot: Any) -> Any:
    if isinstance(slot, SlotView):
        return slot.start.date()
    return datetime.fromisoformat(slot["start"]).astimezone(UTC).date()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


async def scrape(client: AppClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples(await resp.text())


def metric(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def open_all_day() -> list[WeeklyBlock]:
    return [WeeklyBlock(d, clock(8), clock(18)) for d in EVERY_DAY]


# ---- dashboards ------------------------------------------------------------------------------


async def test_dashboard_is_the_day_then_live_private_deltas(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    """The doctor sees the day with patients and conflicts, then each change by others, live."""
    day = doctor.start
    early, nine, late = doctor.slots[0], doctor.slots[2], doctor.slots[19]
    assert {s.start.date() for s in (early, nine, late)} == {day}
    assert (early.start.time(), late.start.time()) == (clock(8), clock(17, 30))
    await commands.book_slot(store, slot_id=early.id, patient_id="p-early")
    await commands.book_slot(store, slot_id=late.id, patient_id="p-late")
    url = ws_url(client)
    async with SlotcastClient.connect(url, token=doctor_token(doctor.id)) as doc:
        # Mornings only: the booked 17:30 slot stays, flagged as a conflict.
        mornings = [WeeklyBlock(d, clock(8), clock(12)) for d in EVERY_DAY]
        updated = await doc.set_schedule(doctor.id, mornings, horizon_days=9)
        assert updated.conflicts == [late.id]

        dashboard = await doc.watch_dashboard(doctor.id, day)
        version = await reads.doctor_version(store, doctor.id)
        assert dashboard.version == version == updated.version
        assert (dashboard.doctor_id, dashboard.date, dashboard.timezone) == (doctor.id, day, "UTC")
        assert dashboard.watchers == 0
        assert {a.slot_id: (a.patient_id, a.status) for a in dashboard.appointments} == {
            early.id: ("p-early", AppointmentStatus.BOOKED),
            late.id: ("p-late", AppointmentStatus.BOOKED),
        }
        expected_slots = (
            await reads.snapshot(store, doctor.id, day, day + timedelta(days=1))
        ).slots
        assert dashboard.slots == expected_slots
        assert len(dashboard.slots) == 8 + 1  # 08:00-12:00 in half hours, plus the conflict
        assert dashboard.conflicts == [late.id]

        async with (
            SlotcastClient.connect(url, token=token(sub="p-live")) as live,
            SlotcastClient.connect(url, token=token(sub="p-early")) as early_patient,
            SlotcastClient.connect(url, token=token(Role.ADMIN, "ops")) as admin,
        ):
            booked = await live.book(nine.id)
            delta = await expect(doc, DashboardDelta)
            assert (delta.doctor_id, delta.version) == (doctor.id, version + 1)
            assert (delta.kinds, delta.actor) == (["slot.booked"], "patient:p-live")
            assert [(a.id, a.patient_id, a.status) for a in delta.appointments] == [
                (booked.id, "p-live", AppointmentStatus.BOOKED)
            ]
            assert [(s.id, s.status) for s in delta.slots] == [(nine.id, SlotStatus.BUSY)]

            (mine,) = await early_patient.my_appointments()
            await early_patient.cancel(mine.id, "feeling better")
            delta = await expect(doc, DashboardDelta)
            assert delta.version == version + 2
            assert delta.kinds == ["appointment.cancelled"]
            ((appointment),) = delta.appointments
            assert (appointment.id, appointment.patient_id) == (mine.id, "p-early")
            assert appointment.status is AppointmentStatus.CANCELLED
            assert appointment.cancel_reason == "feeling better"
            assert [(s.id, s.status) for s in delta.slots] == [(early.id, SlotStatus.FREE)]

            await admin.mark(booked.id, AppointmentStatus.ARRIVED)
            delta = await expect(doc, DashboardDelta)
            assert delta.version == version + 3
            assert (delta.kinds, delta.actor) == (["appointment.arrived"], "admin:ops")
            assert [(a.id, a.patient_id, a.status) for a in delta.appointments] == [
                (booked.id, "p-live", AppointmentStatus.ARRIVED)
            ]
            assert delta.slots == []  # arrival changes no slot

        assert await events_before_pong(doc) == []
        assert await reads.doctor_version(store, doctor.id) == version + 3


@pytest.mark.parametrize(
    ("role", "subject", "code"),
    [
        pytest.param(Role.PATIENT, "p-nosy", ErrorCode.FORBIDDEN, id="patient"),
        pytest.param(Role.DOCTOR, "other", ErrorCode.FORBIDDEN, id="another doctor"),
        pytest.param(None, "", ErrorCode.UNAUTHENTICATED, id="anonymous"),
    ],
)
async def test_only_the_doctor_or_an_admin_may_watch_a_dashboard(
    store: Store,
    doctor: SeededDoctor,
    client: AppClient,
    role: Role | None,
    subject: str,
    code: ErrorCode,
) -> None:
    """Dashboards carry patient identities: refusals happen before joining the room."""
    if subject == "other":
        subject = str((await seed_doctor(store, name="Dr. Other", days=1)).id)
    url = ws_url(client)
    tok = token(role, subject) if role is not None else None
    async with (
        SlotcastClient.connect(url, token=tok) as intruder,
        SlotcastClient.connect(url, token=token(Role.ADMIN, "ops")) as admin,
    ):
        with pytest.raises(ClientError) as refused:
            await intruder.watch_dashboard(doctor.id, doctor.start)
        assert refused.value.code is code
        assert all(not c.dashboards for c in client.app[CONNECTIONS])

        dashboard = await admin.watch_dashboard(doctor.id, doctor.start)
        assert isinstance(dashboard, Dashboard)
        assert dashboard.version == await reads.doctor_version(store, doctor.id)

        # Only the admin hears the next change privately.
        async with SlotcastClient.connect(url, token=token(sub="p-x")) as patient:
            await patient.book(doctor.slots[0].id)
        await expect(admin, DashboardDelta)
        assert not any(isinstance(e, DashboardDelta) for e in await events_before_pong(intruder))


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
async def test_public_delta_never_carries_the_patient(
    doctor: SeededDoctor, client: AppClient, codec: Codec
) -> None:
    """The very same change: the dashboard frame names the patient, the public frame must not."""
    url = ws_url(client)
    secret_patient, secret_reason = "p-secret-4821", "secret-reason-9917"
    session = client.session
    watch = {
        "doctor_id": doctor.id,
        "start": doctor.start.isoformat(),
        "end": doctor.end.isoformat(),
    }
    dash = {"doctor_id": doctor.id, "date": doctor.start.isoformat()}

    async def send(ws: aiohttp.ClientWebSocketResponse, kind: str, body: dict[str, Any]) -> None:
        data = codec.dumps({"type": kind, "id": kind, "body": body})
        await (ws.send_bytes(data) if codec.binary else ws.send_str(data.decode()))

    async def frames(ws: aiohttp.ClientWebSocketResponse, kind: str, n: int) -> list[bytes]:
        """The raw payloads of the next `n` frames of `kind` (skipping presence notices)."""
        found: list[bytes] = []
        while len(found) < n:
            msg = await ws.receive(timeout=WAIT_S)
            assert msg.type in (WSMsgType.TEXT, WSMsgType.BINARY), msg
            raw = msg.data.encode() if isinstance(msg.data, str) else msg.data
            if codec.loads(raw)["type"] == kind:
                found.append(raw)
        return found

    headers = {"Authorization": f"Bearer {doctor_token(doctor.id)}"}
    async with (
        session.ws_connect(url, protocols=[codec.subprotocol]) as public,
        session.ws_connect(url, protocols=[codec.subprotocol], headers=headers) as private,
        SlotcastClient.connect(url, token=token(sub=secret_patient)) as patient,
    ):
        await send(public, "watch", watch)
        await frames(public, "snapshot", 1)
        await send(private, "watch_dashboard", dash)
        await frames(private, "dashboard", 1)

        appointment = await patient.book(doctor.slots[0].id)
        await patient.cancel(appointment.id, secret_reason)

        for raw in await frames(public, "delta", 2):
            assert secret_patient.encode() not in raw
            assert secret_reason.encode() not in raw
            body = codec.loads(raw)["body"]
            assert set(body) == {"doctor_id", "version", "slots", "removed", "since", "doctor"}
            assert body["doctor"] is None  # only a directory change carries the entry
            assert all(
                set(s) == {"id", "start", "end", "status", "hold_expires_at"} for s in body["slots"]
            )
        booked, cancelled = await frames(private, "dashboard_delta", 2)
        assert secret_patient.encode() in booked  # the check above could fail
        assert secret_reason.encode() in cancelled


# ---- presence --------------------------------------------------------------------------------


async def test_presence_counts_availability_watchers_as_they_come_and_go(
    doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    seen: list[int] = []

    async def until(doc: SlotcastClient, watchers: int) -> None:
        while not seen or seen[-1] != watchers:
            presence = await expect(doc, Presence, timeout=PRESENCE_S)
            assert presence.doctor_id == doctor.id
            seen.append(presence.watchers)

    async with SlotcastClient.connect(url, token=doctor_token(doctor.id)) as doc:
        assert (await doc.watch_dashboard(doctor.id, doctor.start)).watchers == 0
        # Presence counts signed-in viewers (tests/server/test_guard.py: anonymous ones do not).
        async with SlotcastClient.connect(url, token=token(sub="p-gone")) as gone:
            await gone.watch(doctor.id, doctor.start, doctor.end)
            async with SlotcastClient.connect(url, token=token(sub="p-leaving")) as leaving:
                await leaving.watch(doctor.id, doctor.start, doctor.end)
                await until(doc, 2)
                assert seen in ([2], [1, 2])  # never more than there are
                # Another dashboard is not an availability watcher.
                async with SlotcastClient.connect(url, token=token(Role.ADMIN, "a")) as admin:
                    assert (await admin.watch_dashboard(doctor.id, doctor.start)).watchers == 2
                await leaving.unwatch(doctor.id)
                await until(doc, 1)
            # `leaving` disconnects after its unwatch: no change, so no notice (checked below).
        await until(doc, 0)  # `gone` disconnected without unwatching
        assert seen[-3:] == [2, 1, 0]


# ---- patient rooms ---------------------------------------------------------------------------


async def test_patient_room_lists_upcoming_then_follows_own_appointments_only(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    slots = doctor.slots
    mine_before = await commands.book_slot(store, slot_id=slots[0].id, patient_id="p-1")
    theirs_before = await commands.book_slot(store, slot_id=slots[1].id, patient_id="p-2")
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(sub="p-1")) as p1,
        SlotcastClient.connect(url, token=token(sub="p-2")) as p2,
        SlotcastClient.connect(url, token=doctor_token(doctor.id)) as doc,
    ):
        listed = await p1.watch_appointments()
        assert [(a.id, a.patient_id, a.status) for a in listed] == [
            (mine_before.appointment.id, "p-1", AppointmentStatus.BOOKED)
        ]
        assert [a.id for a in await p2.watch_appointments()] == [theirs_before.appointment.id]

        async def next_event(status: AppointmentStatus, slot: SlotView) -> Event:
            event = await expect(p1, Event)
            assert event.doctor_id == doctor.id
            assert event.appointment.patient_id == "p-1"
            assert (event.appointment.slot_id, event.appointment.status) == (slot.id, status)
            assert event.version == await reads.doctor_version(store, doctor.id)
            return event

        hold = await p1.hold(slots[2].id)
        held = await next_event(AppointmentStatus.PENDING, slots[2])
        assert held.appointment.id == hold.id
        assert held.appointment.hold_expires_at is not None
        await p1.book(hold_id=hold.id)
        booked = await next_event(AppointmentStatus.BOOKED, slots[2])
        assert booked.version == held.version + 1
        await doc.cancel(hold.id, "the doctor is ill")
        cancelled = await next_event(AppointmentStatus.CANCELLED, slots[2])
        assert cancelled.appointment.cancel_reason == "the doctor is ill"
        await doc.mark(mine_before.appointment.id, AppointmentStatus.ARRIVED)
        await next_event(AppointmentStatus.ARRIVED, slots[0])

        # Someone else's changes: p-2 hears them, p-1 never does.
        await p2.book(slots[3].id)
        await doc.cancel(theirs_before.appointment.id, "rescheduling the clinic")
        assert (await expect(p2, Event)).appointment.slot_id == slots[3].id
        assert (await expect(p2, Event)).appointment.status is AppointmentStatus.CANCELLED
        # Barrier: notes are published in commit order, so p-1's own later event comes last.
        await p1.hold(slots[4].id)
        await next_event(AppointmentStatus.PENDING, slots[4])
        assert await events_before_pong(p1) == []


async def test_only_patients_have_a_patient_room(doctor: SeededDoctor, client: AppClient) -> None:
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=doctor_token(doctor.id)) as doc,
        SlotcastClient.connect(url) as anonymous,
    ):
        with pytest.raises(ClientError) as refused:
            await doc.watch_appointments()
        assert refused.value.code is ErrorCode.FORBIDDEN
        with pytest.raises(ClientError) as refused:
            await anonymous.watch_appointments()
        assert refused.value.code is ErrorCode.UNAUTHENTICATED
    await eventually(lambda: not client.app[CONNECTIONS], "the connections to close")


# ---- resume ----------------------------------------------------------------------------------


async def resume(client: SlotcastClient, doctor: SeededDoctor, since: int) -> Message:
    watch = Watch(doctor.id, doctor.start, doctor.end, since=since)
    return await client.request_any(watch, (Resumed, Snapshot))


async def book_as_another(url: str, slot_id: int) -> None:
    """A booking over a WebSocket by a patient of its own: one patient may have only a
    few of a doctor's slots (`SLOTCAST_MAX_ACTIVE_PER_DOCTOR`)."""
    async with SlotcastClient.connect(url, token=token(sub=f"p-r{slot_id}")) as patient:
        await patient.book(slot_id)


async def test_resume_replays_exactly_the_missed_deltas_then_goes_live(
    doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    async with SlotcastClient.connect(url) as watcher:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        since = snapshot.version
        await watcher.unwatch(doctor.id)
        missed = doctor.slots[:3]
        for slot in missed:
            await book_as_another(url, slot.id)
        assert await events_before_pong(watcher) == []  # unwatched: nothing was sent

        reply = await resume(watcher, doctor, since)
        assert reply == Resumed(doctor.id, since=since, version=since + 3)
        for i, slot in enumerate(missed, start=1):
            delta = await expect(watcher, Delta)
            assert (delta.version, delta.since) == (since + i, None)
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]

        await book_as_another(url, doctor.slots[3].id)
        live = await expect(watcher, Delta)
        assert live.version == since + 4
        assert [s.id for s in live.slots] == [doctor.slots[3].id]
        assert await events_before_pong(watcher) == []  # no replayed version came twice


async def test_resume_at_the_current_version_replays_nothing(
    doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-r")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        reply = await resume(watcher, doctor, snapshot.version)
        assert reply == Resumed(doctor.id, since=snapshot.version, version=snapshot.version)
        assert await events_before_pong(watcher) == []
        await patient.book(doctor.slots[0].id)
        assert (await expect(watcher, Delta)).version == snapshot.version + 1


async def test_resume_too_far_behind_or_ahead_gets_a_fresh_snapshot(
    store: Store, doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """Replay covers up to `resume_max_versions` versions; beyond, or ahead: a snapshot."""
    client = await serve(aiohttp_client, settings.replace(resume_max_versions=2))
    url = ws_url(client)
    async with SlotcastClient.connect(url) as watcher:
        base = (await watcher.watch(doctor.id, doctor.start, doctor.end)).version
        for slot in doctor.slots[:2]:
            await book_as_another(url, slot.id)
        assert await resume(watcher, doctor, base) == Resumed(doctor.id, base, base + 2)
        for slot in doctor.slots[2:5]:
            await book_as_another(url, slot.id)
        current = base + 5
        assert await reads.doctor_version(store, doctor.id) == current

        for since in (base + 2, 0, current + 1, current + 1000):
            reply = await resume(watcher, doctor, since)
            assert isinstance(reply, Snapshot), f"since={since}: {reply!r}"
            assert reply.version == current
            assert statuses(reply.slots) == await db_statuses(store, doctor)


# ---- the relay -------------------------------------------------------------------------------


async def test_relay_delivers_a_commit_nobody_published(
    store: Store, doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """A commit whose publish never happened (a crash in between) still reaches watchers,
    without any later change to reveal the gap."""
    grace, sweep = 0.2, 0.1
    client = await serve(aiohttp_client, settings.replace(relay_grace_s=grace, relay_sweep_s=sweep))
    async with SlotcastClient.connect(ws_url(client)) as watcher:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        slot = doctor.slots[0]
        started = time.monotonic()
        booking = await commands.book_slot(
            store, slot_id=slot.id, patient_id="p-orphan"
        )  # no publisher here
        assert booking.change is not None
        delta = await expect(watcher, Delta)
        elapsed = time.monotonic() - started
        assert delta.version == snapshot.version + 1 == booking.change.version
        assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]
        # Well inside what the default relay settings (2 s grace) could manage.
        assert elapsed < grace + sweep + 1.0, f"took {elapsed:.2f}s"

        # Published once: the relay cursor moved past it, so it is not sent again and again.
        found = await scrape(client)
        assert metric(found, "slotcast_relayed_changes_total") >= 1

        async def nothing_left() -> bool:
            return not await outbox.unpublished(store, older_than=datetime.now(UTC))

        deadline = time.monotonic() + WAIT_S
        while not await nothing_left():
            assert time.monotonic() < deadline, "the relay cursor never advanced"
            await asyncio.sleep(0.05)
        assert await events_before_pong(watcher) == []


async def test_a_failed_publish_is_relayed_even_after_a_later_one_succeeds(
    doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """The relay cursor may only pass what was published. Here v+1's publish fails (a blip
    on this instance's Redis connection) and v+2's succeeds at once: watchers of the doctor
    recover v+1 by gap filling, but a patient room has no versions to fill from, so only
    the relay can still bring the patient the event of v+1."""
    client = await serve(aiohttp_client, settings.replace(relay_grace_s=0.2, relay_sweep_s=0.1))
    # As on any instance but the committing one: only the broker (or the relay) brings it.
    client.app[OUTBOX].deliver_to(None)
    broker = client.app[BROKER]
    publish = broker.publish
    failures = 1

    async def blip(channel: str, data: bytes) -> None:
        nonlocal failures
        if failures and isinstance(unpack(data), Change):
            failures -= 1
            raise Unavailable("broker unreachable: injected")
        await publish(channel, data)

    broker.publish = blip  # type: ignore[method-assign]
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(sub="p-lost")) as lost,
        SlotcastClient.connect(url, token=token(sub="p-next")) as following,
    ):
        await lost.watch_appointments()
        appointment = await lost.book(doctor.slots[0].id)  # its publish fails
        await following.book(doctor.slots[1].id)  # published at once, well within the grace
        assert failures == 0
        event = await expect(lost, Event, timeout=0.2 + 0.1 + 2.0)
        assert (event.appointment.id, event.appointment.status) == (
            appointment.id,
            AppointmentStatus.BOOKED,
        )


# ---- slow consumers --------------------------------------------------------------------------


def server_side(client: AppClient, doctor_id: int) -> Connection:
    (session,) = [s for s in client.app[CONNECTIONS] if doctor_id in s.watches]
    return session.conn


def back_up(client_ws: aiohttp.ClientWebSocketResponse, server: Connection) -> Any:
    """Make the server's socket to this client fill up, as a stalled phone's would.

    The client's transport stops reading, and the server's kernel send buffer is
    made small, so writes pile up in the server's transport after a few hundred
    kilobytes instead of after the several megabytes loopback autotuning allows.
    Returns the paused client transport.
    """
    conn = client_ws._conn  # aiohttp keeps the upgraded connection here
    assert conn is not None
    assert conn.transport is not None
    transport = conn.transport
    transport.pause_reading()
    sock = server._transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return transport


async def flood(
    doc: SlotcastClient, store: Store, doctor: SeededDoctor, blocks: int
) -> tuple[int, int]:
    """Big deltas (whole horizons of slots) until the socket is behind, then many small ones.

    Returns the first and last version of the small ones.
    """
    for minutes in (5, 30, 5):  # each switch replaces thousands of slots: ~100-400 kB deltas
        await doc.set_schedule(doctor.id, open_all_day(), slot_minutes=minutes, horizon_days=28)
    free = [
        s.id
        for s in (await reads.snapshot(store, doctor.id, doctor.start, doctor.end)).slots
        if s.status is SlotStatus.FREE
    ]
    first = await reads.doctor_version(store, doctor.id) + 1
    for slot_id in free[:blocks]:
        await doc.block(slot_id)
    return first, first + blocks - 1


async def test_a_slow_watcher_gets_merged_deltas_and_ends_equal_to_the_database(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    blocks = COALESCE_AFTER + 30
    async with (
        SlotcastClient.connect(url, token=doctor_token(doctor.id)) as doc,
        client.session.ws_connect(url, protocols=[JSON.subprotocol]) as ws,
    ):
        assert JSON.loads((await ws.receive(timeout=WAIT_S)).data)["type"] == "welcome"
        await ws.send_str(
            JSON.dumps(
                {
                    "type": "watch",
                    "id": 1,
                    "body": {
                        "doctor_id": doctor.id,
                        "start": doctor.start.isoformat(),
                        "end": doctor.end.isoformat(),
                    },
                }
            ).decode()
        )
        snapshot = JSON.loads((await ws.receive(timeout=WAIT_S)).data)
        assert snapshot["type"] == "snapshot"
        state = {s["id"]: s for s in snapshot["body"]["slots"]}
        version = snapshot["body"]["version"]

        server = server_side(client, doctor.id)
        paused = back_up(ws, server)
        first, last = await flood(doc, store, doctor, blocks)
        assert server._transport.get_write_buffer_size() >= HIGH_WATER  # really behind
        paused.resume_reading()

        merged = []
        while version < last:
            msg = await ws.receive(timeout=WAIT_S)
            assert msg.type is WSMsgType.TEXT, msg
            frame = JSON.loads(msg.data)
            assert frame["type"] == "delta", frame["type"]
            body = frame["body"]
            if body["since"] is None:
                assert body["version"] == version + 1
            else:
                merged.append(body)
                assert body["since"] == version  # applies on top of what came before
                assert body["version"] > version + 1  # it does stand for several versions
            for slot in body["slots"]:
                state[slot["id"]] = slot
            for slot_id in body["removed"]:
                state.pop(slot_id, None)
            version = body["version"]

        assert version == last == await reads.doctor_version(store, doctor.id)
        assert len(merged) == 1, [(m["since"], m["version"]) for m in merged]
        assert merged[0]["since"] >= first - 1  # only the small deltas queued past the limit
        assert len(merged[0]["slots"]) == merged[0]["version"] - merged[0]["since"]
        mine = {sid: SlotStatus(s["status"]) for sid, s in in_range(state, doctor).items()}
        assert mine == await db_statuses(store, doctor)
        assert server in {s.conn for s in client.app[CONNECTIONS]}  # merging kept it connected
        await ws.send_str(JSON.dumps({"type": "ping", "id": "p", "body": {}}).decode())
        assert JSON.loads((await ws.receive(timeout=WAIT_S)).data)["type"] == "pong"


async def test_a_watcher_too_slow_even_for_merging_is_closed_4008_and_resumes(
    store: Store, doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """Past `outbox_limit` queued frames the client is cut off; reconnecting, it resumes
    from its last version and converges to the database without a snapshot."""
    client = await serve(aiohttp_client, settings.replace(outbox_limit=4))
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=doctor_token(doctor.id)) as doc,
        SlotcastClient.connect(url, reconnect=True, max_backoff=0.2) as watcher,
    ):
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        assert watcher._ws is not None
        paused = back_up(watcher._ws, server_side(client, doctor.id))
        _, last = await flood(doc, store, doctor, blocks=10)
        found = await scrape(client)
        assert metric(found, "slotcast_slow_consumers_total", reason="frames") == 1
        paused.resume_reading()

        calendar = watcher.calendars[doctor.id]
        await eventually(
            lambda: watcher.reconnects == 1 and watcher.ready.is_set() and calendar.version == last,
            "the watcher to reconnect and catch up",
        )
        assert watcher.close_code == CLOSE_SLOW_CONSUMER
        assert calendar.resyncs == 0  # resumed from the change log, no snapshot needed
        mine = statuses(in_range(calendar.slots, doctor).values())
        assert mine == await db_statuses(store, doctor)
        # And it is live again on the new connection.
        free = next(
            s
            for s in (await reads.snapshot(store, doctor.id, doctor.start, doctor.end)).slots
            if s.status is SlotStatus.FREE
        )
        while not watcher.events.empty():  # what the reconnect replayed
            watcher.events.get_nowait()
        await doc.block(free.id)
        live = await expect(watcher, Delta)
        assert live.version == last + 1
        assert calendar.slots[free.id].status is SlotStatus.BUSY_UNAVAILABLE


# ---- metrics ---------------------------------------------------------------------------------


async def test_metrics_move_with_traffic(doctor: SeededDoctor, client: AppClient) -> None:
    before = await scrape(client)
    assert metric(before, "slotcast_connections") == 0
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-m")) as patient,
    ):
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        await patient.book(doctor.slots[0].id)
        await expect(watcher, Delta)
        with pytest.raises(ClientError):
            await patient.watch_dashboard(doctor.id, doctor.start)
        await patient.ping()
        await watcher.ping()
        during = await scrape(client)
    assert metric(during, "slotcast_connections") == 2

    def moved(name: str, **labels: str) -> float:
        return metric(during, name, **labels) - metric(before, name, **labels)

    assert moved("slotcast_messages_in_total") == 5  # watch, book, watch_dashboard, 2 pings
    assert moved("slotcast_messages_out_total") == 1  # one change, one watcher
    assert moved("slotcast_fanout_latency_seconds_count") == 1
    assert 0 < moved("slotcast_fanout_latency_seconds_sum") < WAIT_S
    assert moved("slotcast_command_seconds_count", type="book") == 1
    assert moved("slotcast_command_seconds_count", type="watch") == 1
    assert moved("slotcast_command_seconds_count", type="ping") == 2
    assert moved("slotcast_errors_total", code="forbidden", transport="ws") == 1
    assert moved("slotcast_errors_total", code="slot_taken", transport="ws") == 0
    assert metric(during, "slotcast_rooms", kind="rooms") == 1
    # The latency breakdown: the booking's transaction, then its local fan-out, ...
    for stage in ("pool_wait", "lock_wait", "statements", "commit", "fanout_wait"):
        assert moved("slotcast_stage_seconds_count", stage=stage) >= 1, stage
    assert moved("slotcast_stage_seconds_count", stage="fanout_write") == 1
    # ... and its publish, which this instance's own listener hears back.
    published = during
    for _ in range(50):
        if metric(published, "slotcast_stage_seconds_count", stage="broker_hop") >= 1:
            break
        await asyncio.sleep(0.05)
        published = await scrape(client)
    for stage in ("outbox_wait", "publish", "broker_hop"):
        assert metric(published, "slotcast_stage_seconds_count", stage=stage) >= 1, stage
    assert metric(published, "slotcast_stage_seconds_bucket", stage="commit", le="+Inf") == (
        metric(published, "slotcast_stage_seconds_count", stage="commit")
    )

    await eventually(lambda: not client.app[CONNECTIONS], "the connections to close")
    after = await scrape(client)
    assert metric(after, "slotcast_connections") == 0
    assert metric(after, "slotcast_rooms", kind="rooms") == 0


# ---- instance stamping and readiness ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/no-such-page", 404),
        ("POST", "/api/appointments", 401),
    ],
)
async def test_every_response_names_the_instance(
    settings: Settings, client: AppClient, method: str, path: str, status: int
) -> None:
    """Whatever the answer, it says which instance gave it (debugging, sticky balancing)."""
    async with client.request(method, path, json={"slot_id": 1}) as resp:
        assert resp.status == status
        assert resp.headers["X-Slotcast-Instance"] == settings.instance_id == "test-instance"


async def test_responses_set_the_instance_cookie_unless_the_client_has_it(
    client: AppClient,
) -> None:
    """A balancer sticks a client to an instance by this cookie: it is set on the first
    answer, not repeated while the client has it, and replaced when it names another."""
    url = client.make_url("/healthz")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(url) as resp:
            cookie = resp.cookies.get(INSTANCE_COOKIE)
            assert cookie is not None, (
                f"no cookie; Set-Cookie: {resp.headers.getall('Set-Cookie', [])}"
            )
            assert cookie.value == "test-instance"
            assert cookie["httponly"]
        stuck = {"Cookie": f"{INSTANCE_COOKIE}=test-instance"}
        async with http.get(url, headers=stuck) as resp:
            assert INSTANCE_COOKIE not in resp.cookies
        elsewhere = {"Cookie": f"{INSTANCE_COOKIE}=some-other-instance"}
        async with http.get(url, headers=elsewhere) as resp:
            assert resp.cookies[INSTANCE_COOKIE].value == "test-instance"


async def test_draining_fails_readiness_and_refuses_new_websockets(client: AppClient) -> None:
    url = ws_url(client)
    async with SlotcastClient.connect(url) as connected:
        client.app[STATE].draining = True
        async with client.get("/readyz") as resp:
            assert resp.status == 503
            assert await resp.json() == {"status": "unready", "reason": "draining"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.session.ws_connect(url)
        assert refused.value.status == 503
        await connected.ping()  # draining refuses new clients; it does not cut existing ones

        client.app[STATE].draining = False
        async with client.get("/readyz") as resp:
            assert resp.status == 200
        # A broker outage degrades the instance; it stays in the balancer (server.health).
        client.app[BROKER].healthy = False
        async with client.get("/readyz") as resp:
            assert resp.status == 200
            body = await resp.json()
            assert (body["broker"], body["broker_error"]) == ("down", "listener reconnecting")
        client.app[BROKER].healthy = True
        async with client.get("/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["broker"] == "up"


async def test_auth_as_someone_else_leaves_private_rooms(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Rooms are authorized on join; a new identity must not inherit the old one's."""
    async with SlotcastClient.connect(
        ws_url(client), token=doctor_token(doctor.id), token_in_header=False
    ) as c:
        await c.watch_dashboard(doctor.id, doctor.start)
        await c.auth(token(Role.PATIENT, "p-switch"))
        resp = await client.get("/readyz")
        assert (await resp.json())["dashboards"] == 0
