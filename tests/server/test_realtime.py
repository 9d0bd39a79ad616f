"""Real time inside one instance: dashboards, presence, patient rooms, resume, relay, back-pressure.

Everything goes through a real loopback WebSocket to the in-process server, so
what is asserted is what a browser or the Python client would see on the wire.
The slow-consumer tests make the server's socket genuinely back up (a paused
client transport and a small server send buffer); the Connection itself is also
driven with a fake transport, where the exact merge and close rules can be
pinned without depending on kernel buffer sizes.

Tests that serve an app list the database fixtures (`doctor`, `settings`) before
the app's client, so the app and its pool close before the database is dropped.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from typing import Any, cast

import aiohttp
import msgspec
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.codec import JSON, MSGPACK, Codec
from protocol.errors import ErrorCode
from protocol.messages import (
    SERVER_MESSAGES,
    AppointmentView,
    Dashboard,
    DashboardDelta,
    Delta,
    Message,
    Pong,
    Presence,
    Reconnect,
    Resumed,
    SlotView,
    Snapshot,
    Watch,
    WeeklyBlock,
)
from protocol.messages import AppointmentEvent as Event
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from server.app import INSTANCE_COOKIE, create_app
from server.connection import (
    CLOSE_SERVICE_RESTART,
    CLOSE_SLOW_CONSUMER,
    COALESCE_AFTER,
    HIGH_WATER,
    Connection,
)
from server.frames import frame
from server.keys import BROKER, CONNECTIONS, STATE
from server.rooms import Frames, Rooms
from server.settings import Settings
from store import commands, outbox, reads
from store.broker import MemoryBroker
from store.changes import Change, PatientNote, unpack
from store.constants import patient_channel
from store.errors import Unavailable
from store.runner import Store
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
            assert set(body) == {"doctor_id", "version", "slots", "removed", "since"}
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
        async with SlotcastClient.connect(url) as gone:
            await gone.watch(doctor.id, doctor.start, doctor.end)
            async with SlotcastClient.connect(url) as leaving:
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


async def test_resume_replays_exactly_the_missed_deltas_then_goes_live(
    doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-r")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        since = snapshot.version
        await watcher.unwatch(doctor.id)
        missed = doctor.slots[:3]
        for slot in missed:
            await patient.book(slot.id)
        assert await events_before_pong(watcher) == []  # unwatched: nothing was sent

        reply = await resume(watcher, doctor, since)
        assert reply == Resumed(doctor.id, since=since, version=since + 3)
        for i, slot in enumerate(missed, start=1):
            delta = await expect(watcher, Delta)
            assert (delta.version, delta.since) == (since + i, None)
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]

        await patient.book(doctor.slots[3].id)
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
    async with (
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-r")) as patient,
    ):
        base = (await watcher.watch(doctor.id, doctor.start, doctor.end)).version
        for slot in doctor.slots[:2]:
            await patient.book(slot.id)
        assert await resume(watcher, doctor, base) == Resumed(doctor.id, base, base + 2)
        for slot in doctor.slots[2:5]:
            await patient.book(slot.id)
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
        assert metric(await scrape(client), "slotcast_slow_consumers_total") == 1
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


# ---- the Connection's outbox, with a transport whose buffer the test controls ---------------


class FakeTransport:
    """The slice of an asyncio transport a Connection uses; the test decides how full it is."""

    def __init__(self) -> None:
        self.buffered = 0
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeSocket:
    """Stands in for the aiohttp WebSocketResponse: only its close is used, and recorded."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.close_args: tuple[int, bytes] | None = None

    async def close(self, *, code: int, message: bytes) -> bool:
        self.close_args = (code, message)
        self.closed.set()
        return True


def payload(frame: bytes) -> bytes:
    """The payload of one unmasked server frame (RFC 6455 section 5.2)."""
    length = frame[1] & 0x7F
    return frame[{126: 4, 127: 10}.get(length, 2) :]


def decode(frame: bytes) -> Message:
    return JSON.decode(payload(frame), SERVER_MESSAGES, max_size=1 << 30).body


def slot(slot_id: int, status: SlotStatus) -> SlotView:
    start = datetime(2031, 1, 1, 8, tzinfo=UTC) + timedelta(minutes=30 * slot_id)
    return SlotView(slot_id, start, start + timedelta(minutes=30), status)


def change(doctor_id: int, version: int, slots: list[SlotView], removed: list[int]) -> Change:
    return Change.build(doctor_id, version, slots, removed)


def offer(conn: Connection, c: Change) -> None:
    conn.send_delta(c.doctor_id, c.public, Frames(c).get("availability", JSON))


async def test_outbox_merges_a_doctors_deltas_once_behind_and_keeps_order() -> None:
    """Past COALESCE_AFTER queued frames a doctor's deltas collapse into one, sent where the
    first of them would have been, covering (since, version]; applied after what came
    before, the client ends exactly where applying every delta would have left it."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, JSON, outbox_limit=1000)
    try:
        transport.buffered = HIGH_WATER  # the kernel has stopped taking data
        cycle = [SlotStatus.BUSY, SlotStatus.BUSY_TENTATIVE, SlotStatus.FREE]
        changes = []
        for v in range(1, 41):
            slots = [slot(v % 3 + 1, cycle[v % 3])]
            removed = []
            if v == 35:
                slots, removed = [], [2]  # removed ...
            if v == 38:
                slots = [slot(2, SlotStatus.BUSY_UNAVAILABLE)]  # ... and offered again
            if v == 39:
                slots, removed = [], [7]  # removed for good
            changes.append(change(5, v, slots, removed))
        for c in changes[:COALESCE_AFTER]:
            offer(conn, c)
        conn.send(Pong())  # a reply queued between deltas keeps its place
        for c in changes[COALESCE_AFTER:]:
            offer(conn, c)
        other = change(6, 12, [slot(100, SlotStatus.BUSY)], [])
        offer(conn, other)
        assert transport.written == []

        transport.buffered = 0
        await eventually(lambda: len(transport.written) == COALESCE_AFTER + 3, "the outbox")
        sent = [decode(f) for f in transport.written]
        individual = sent[:COALESCE_AFTER]
        assert [(d.version, d.since) for d in individual if isinstance(d, Delta)] == [
            (v, None) for v in range(1, COALESCE_AFTER + 1)
        ]
        assert isinstance(sent[COALESCE_AFTER], Pong)
        merged, merged_other = sent[COALESCE_AFTER + 1 :]
        assert isinstance(merged, Delta)
        assert isinstance(merged_other, Delta)
        assert (merged.doctor_id, merged.since, merged.version) == (5, COALESCE_AFTER, 40)
        assert (merged_other.doctor_id, merged_other.since, merged_other.version) == (6, 11, 12)

        # Applying the stream gives what applying every change would.
        def apply(state: dict[int, SlotView], d: Delta) -> None:
            state.update({s.id: s for s in d.slots})
            for sid in d.removed:
                state.pop(sid, None)

        initial = {i: slot(i, SlotStatus.FREE) for i in (1, 2, 3, 7)}
        expected, got = dict(initial), dict(initial)
        for c in changes:
            apply(expected, msgspec.convert(c.public, Delta))
        for d in [*individual, merged]:
            assert isinstance(d, Delta)
            apply(got, d)
        assert got == expected
        assert 2 in got
        assert 7 not in got
        assert merged.removed == [7]  # 2 came back, so it is not in `removed`
    finally:
        await conn.close()


async def test_outbox_over_the_limit_closes_4008_once_the_command_is_done() -> None:
    transport, ws = FakeTransport(), FakeSocket()
    slow: list[int] = []
    conn = Connection(
        cast(web.WebSocketResponse, ws),
        transport,
        JSON,
        outbox_limit=3,
        on_slow=lambda: slow.append(1),
    )
    transport.buffered = HIGH_WATER
    conn.busy = True  # a command is in flight: its reply must not be cut off
    for _ in range(3):
        conn.send(Pong())
    assert slow == []
    assert not ws.closed.is_set()
    conn.send(Pong())  # one too many
    assert slow == [1]
    await asyncio.sleep(0)  # deliberately let any premature close task run
    assert not ws.closed.is_set()
    conn.command_done()
    await asyncio.wait_for(ws.closed.wait(), WAIT_S)
    assert ws.close_args == (CLOSE_SLOW_CONSUMER, b"slow consumer")
    assert conn.closing
    conn.send(Pong())  # ignored: closing
    assert slow == [1]
    await conn.close()  # what the handler does once the socket has closed
    transport.buffered = 0
    conn.send(Pong())
    offer(conn, change(5, 1, [slot(1, SlotStatus.BUSY)], []))
    assert transport.written == []  # the queue was dropped; the client will resume


async def test_closing_while_the_writer_waits_for_the_socket_does_not_crash_it() -> None:
    """The close clears the outbox while the writer waits for the kernel to take data;
    when the socket then drains (the client reads the backlog before the close frame),
    the writer must notice there is nothing left rather than die, since the handler's
    `Connection.close()` awaits it and would re-raise its error."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, JSON, outbox_limit=3)
    transport.buffered = HIGH_WATER
    for _ in range(3):
        conn.send(Pong())
    await asyncio.sleep(0.02)  # deliberately: the writer is now waiting for the socket
    conn.send(Pong())  # one too many: closed, and the outbox cleared
    await asyncio.wait_for(ws.closed.wait(), WAIT_S)
    transport.buffered = 0  # the client reads what the kernel held
    await asyncio.sleep(0.05)  # deliberately: the writer polls every 5 ms
    await conn.close()  # IndexError: pop from an empty deque, from the writer task
    assert transport.written == []


async def test_a_batch_of_deltas_is_one_write_while_the_socket_keeps_up() -> None:
    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, JSON, outbox_limit=1000)
    try:
        changes = [change(5, v, [slot(v, SlotStatus.BUSY)], []) for v in (1, 2, 3)]
        frames = [Frames(c).get("availability", JSON) for c in changes]
        conn.send_deltas(5, [c.public for c in changes], frames, b"".join(frames))
        assert transport.written == [b"".join(frames)]
    finally:
        await conn.close()


async def test_a_batch_of_deltas_for_a_client_behind_queues_and_merges_each_change() -> None:
    """Behind, a batch is not one opaque item: each delta counts toward the merge threshold
    and the outbox limit, and the merged delta covers exactly the batch's tail."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, JSON, outbox_limit=1000)
    try:
        transport.buffered = HIGH_WATER
        total = COALESCE_AFTER + 5
        changes = [change(5, v, [slot(v, SlotStatus.BUSY)], []) for v in range(1, total + 1)]
        frames = [Frames(c).get("availability", JSON) for c in changes]
        conn.send_deltas(5, [c.public for c in changes], frames, b"".join(frames))
        assert transport.written == []
        transport.buffered = 0
        await eventually(lambda: len(transport.written) == COALESCE_AFTER + 1, "the outbox")
        sent = [decode(f) for f in transport.written]
        assert all(isinstance(d, Delta) for d in sent)
        deltas = cast(list[Delta], sent)
        assert [(d.version, d.since) for d in deltas[:COALESCE_AFTER]] == [
            (v, None) for v in range(1, COALESCE_AFTER + 1)
        ]
        merged = deltas[-1]
        assert (merged.since, merged.version) == (COALESCE_AFTER, total)
        assert sorted(s.id for s in merged.slots) == list(range(COALESCE_AFTER + 1, total + 1))
    finally:
        await conn.close()


async def test_a_connection_that_never_queued_starts_no_writer_and_closes_with_its_code() -> None:
    """The writer task is created on the first queued frame only; and `close()` returns
    after the close frame we began has gone out, so the handler returning cannot let
    aiohttp close with 1000 first."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, JSON, outbox_limit=10)
    conn.send(Pong())
    assert conn._writer is None
    conn.close_soon(CLOSE_SERVICE_RESTART, "service restart")
    await conn.close()
    assert ws.close_args == (CLOSE_SERVICE_RESTART, b"service restart")
    transport.buffered = HIGH_WATER
    other = Connection(cast(web.WebSocketResponse, FakeSocket()), transport, JSON, outbox_limit=10)
    other.send(Pong())  # behind: queued, so now there is a writer
    assert other._writer is not None
    await other.close()


async def test_a_client_that_is_behind_still_gets_the_reconnect_notice_of_a_drain() -> None:
    """On SIGTERM every client is told when to come back (a jittered `retry_after_ms`) and
    then closed with 1012. A client whose outbox is not empty at that moment must still
    get the notice; otherwise all such clients fall back to their own backoff at once."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, JSON, outbox_limit=100)
    transport.buffered = HIGH_WATER
    conn.send(Pong())  # the client is a little behind: this waits in the outbox
    conn.send_now(Reconnect(retry_after_ms=700))  # what lifecycle.drain does, then:
    conn.close_soon(CLOSE_SERVICE_RESTART, "service restart")
    await asyncio.wait_for(ws.closed.wait(), WAIT_S)
    assert ws.close_args == (CLOSE_SERVICE_RESTART, b"service restart")
    transport.buffered = 0
    await conn.close()
    notices = [m for m in map(decode, transport.written) if isinstance(m, Reconnect)]
    assert notices == [Reconnect(retry_after_ms=700)], "the notice was dropped with the outbox"


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
    assert moved("slotcast_errors_total", code="forbidden") == 1
    assert moved("slotcast_errors_total", code="slot_taken") == 0
    assert metric(during, "slotcast_rooms", kind="rooms") == 1

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
        client.app[BROKER].healthy = False
        async with client.get("/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["reason"] == "broker listener reconnecting"
        client.app[BROKER].healthy = True
        async with client.get("/readyz") as resp:
            assert resp.status == 200


async def test_deltas_after_a_new_snapshot_are_not_merged_ahead_of_it() -> None:
    """A merge open when the client re-watches sits before the new snapshot in the outbox;
    versions after that snapshot must come after it, or the client would miss them."""
    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, JSON, outbox_limit=1000)
    transport.buffered = HIGH_WATER  # the client is behind: everything queues
    for _ in range(COALESCE_AFTER):
        conn.send(Pong())
    offer(conn, change(1, 11, [slot(1, SlotStatus.BUSY)], []))  # opens a merge
    conn.seal(1)  # what a re-watch does before its reply
    conn.send(Snapshot(1, 12, "UTC", date(2031, 1, 1), date(2031, 1, 2), []))
    offer(conn, change(1, 13, [slot(2, SlotStatus.BUSY)], []))
    transport.buffered = 0
    conn.send(Pong())  # wakes the writer
    await asyncio.sleep(0.05)  # deliberately: the writer drains on its own task
    await conn.close()
    order = [
        (type(m).__name__, getattr(m, "version", None))
        for m in map(decode, transport.written)
        if not isinstance(m, Pong)
    ]
    assert order[-1] == ("Delta", 13), order
    assert order.index(("Snapshot", 12)) < order.index(("Delta", 13)), order


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


# ---- the bytes fan-out writes: spliced envelopes, as clients have always received them -------


def whole_envelope(codec: Codec, kind: str, body: dict[str, Any]) -> bytes:
    """A server frame as built before bodies were spliced in: the whole envelope encoded."""
    return frame(codec.dumps({"type": kind, "id": None, "body": body}), binary=codec.binary)


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=lambda c: c.name)
async def test_deltas_and_merged_deltas_keep_their_bytes_on_the_wire(codec: Codec) -> None:
    c = change(5, 7, [slot(1, SlotStatus.BUSY), slot(2, SlotStatus.FREE)], [3])
    assert Frames(c).get("availability", codec) == whole_envelope(codec, "delta", c.public)

    transport, ws = FakeTransport(), FakeSocket()
    conn = Connection(cast(web.WebSocketResponse, ws), transport, codec, outbox_limit=1000)
    try:
        transport.buffered = HIGH_WATER
        for _ in range(COALESCE_AFTER):
            conn.send(Pong())
        later = [change(5, v, [slot(v, SlotStatus.BUSY)], [v - 1]) for v in (8, 9)]
        for c in later:
            conn.send_delta(5, c.public, Frames(c).get("availability", codec))
        transport.buffered = 0
        conn.send(Pong())  # wakes the writer
        await eventually(lambda: len(transport.written) == COALESCE_AFTER + 2, "the outbox")
        merged = {  # 9 removed slot 8, which 8 had changed
            "doctor_id": 5,
            "version": 9,
            "slots": later[1].public["slots"],
            "removed": [7, 8],
            "since": 7,
        }
        assert transport.written[COALESCE_AFTER] == whole_envelope(codec, "delta", merged)
    finally:
        await conn.close()


async def test_appointment_events_keep_their_bytes_on_the_wire() -> None:
    """One frame per codec for the patient's room, spliced; each codec's bytes as before."""
    broker = MemoryBroker()
    rooms = Rooms(cast(Store, None), broker, "test-instance")  # a patient room reads no store
    transports = {codec.name: FakeTransport() for codec in (JSON, MSGPACK)}
    conns = [
        Connection(
            cast(web.WebSocketResponse, FakeSocket()), transports[codec.name], codec, outbox_limit=9
        )
        for codec in (JSON, MSGPACK)
    ]
    try:
        for conn in conns:
            await rooms.join_patient(conn, "p-1")
        start = datetime(2031, 1, 1, 8, tzinfo=UTC)
        view = AppointmentView(
            11, 3, 5, "p-1", start, start + timedelta(minutes=30), AppointmentStatus.BOOKED
        )
        note = PatientNote("p-1", 5, 42, msgspec.to_builtins(view))
        await broker.publish(patient_channel("p-1"), note.pack())
        await eventually(lambda: all(t.written for t in transports.values()), "the events")
        body = {"doctor_id": 5, "version": 42, "appointment": note.appointment}
        for codec in (JSON, MSGPACK):
            expected = whole_envelope(codec, "appointment_event", body)
            assert transports[codec.name].written == [expected], codec.name
    finally:
        await rooms.close()
        for conn in conns:
            await conn.close()
