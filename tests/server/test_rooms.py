"""The ordering guarantees of rooms: every watcher sees each version once, in order, with no gaps.

The broker may duplicate, reorder or lose messages and Redis may vanish for a
while; rooms hide all of it. Most tests drive `Rooms` directly with real
committed changes and fake connections, so each guarantee is tested on its own;
the rest go through real WebSockets, where the guarantee is what a client sees.

Tests that serve an app list the database fixtures (`doctor`, `settings`) before
the app's client, so the app and its pool close before the database is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.codec import JSON
from protocol.messages import SERVER_MESSAGES, AppointmentEvent, Delta, Resync
from protocol.vocabulary import SlotStatus
from server.app import create_app
from server.connection import Connection
from server.keys import BROKER, METRICS
from server.room import Member
from server.rooms import Rooms
from server.settings import Settings
from store import commands, reads
from store.broker import Broker, MemoryBroker, RedisBroker
from store.changes import Change
from store.constants import doctor_channel
from store.errors import NotFound
from store.pool import Store
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.harness import RedisServer
from testkit.wire import eventually, expect

AppClient = TestClient[web.Request, web.Application]

WAIT_S = 5.0
RECOVERY_S = 15.0
OUTAGE_S = 1.0  # longer than the broker's first reconnect attempt, as real restarts are


def payloads(data: bytes) -> list[bytes]:
    """The payloads of the unmasked server frames (RFC 6455 section 5.2) in `data`."""
    out = []
    while data:
        length, offset = data[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(data[2:10], "big"), 10
        out.append(data[offset : offset + length])
        data = data[offset + length :]
    return out


class FakeConnection:
    """What a Member needs of a Connection: a codec and non-blocking sends of built frames."""

    codec = JSON

    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.writes = 0  # frames or batches of frames handed over
        self._arrived = asyncio.Event()

    def send_delta(self, doctor_id: int, public: object, frame: bytes) -> None:
        self.send_frame(frame)

    def send_deltas(
        self, doctor_id: int, publics: list[object], frames: list[bytes], data: bytes
    ) -> None:
        assert data == b"".join(frames)
        assert len(publics) == len(frames)
        self.send_frame(data)

    def send(self, message: object) -> None:
        """Presence and resync notices are not deltas; these tests ignore them."""

    def send_frame(self, frame: bytes) -> None:
        self.writes += 1
        for data in payloads(frame):
            body = JSON.decode(data, SERVER_MESSAGES).body
            assert isinstance(body, Delta), f"rooms sent a {body.TYPE}, not a delta"
            self.deltas.append(body)
        self._arrived.set()

    @property
    def versions(self) -> list[int]:
        return [d.version for d in self.deltas]

    async def wait_for(self, version: int, timeout: float = WAIT_S) -> None:
        """Wait until `version` has been delivered, waking on each frame."""
        deadline = time.monotonic() + timeout
        while version not in self.versions:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for v{version}; got {self.versions}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


class ReconnectingBroker(MemoryBroker):
    """An in-process broker that can announce a reconnect, as RedisBroker does after an outage."""

    def reconnect(self) -> None:
        self._on_reconnect(self.channels)


@pytest.fixture
def broker() -> ReconnectingBroker:
    return ReconnectingBroker()


@pytest.fixture
async def rooms(store: Store, broker: ReconnectingBroker) -> AsyncIterator[Rooms]:
    r = Rooms(store, broker, "test-instance")
    yield r
    await r.close()


async def watch(rooms: Rooms, doctor_id: int) -> tuple[FakeConnection, Member]:
    """Join and go live at the room's current version, as a watcher with a fresh snapshot."""
    conn = FakeConnection()
    member = await rooms.join(cast(Connection, conn), doctor_id)
    assert member.room.version is not None
    member.start(member.room.version)
    return conn, member


async def commit(
    store: Store, doctor: SeededDoctor, n: int, *, first_slot: int = 0
) -> list[Change]:
    """Book `n` slots through the Store only: committed and logged, but not yet published."""
    changes = []
    for i in range(first_slot, first_slot + n):
        booking = await commands.book_slot(store, slot_id=doctor.slots[i].id, patient_id=f"p-{i}")
        assert booking.change is not None
        changes.append(booking.change)
    return changes


async def publish(broker: Broker, *changes: Change) -> None:
    for change in changes:
        await broker.publish(doctor_channel(change.doctor_id), change.pack())


def busy_slot_ids(conn: FakeConnection) -> list[list[int]]:
    return [[s.id for s in d.slots if s.status is SlotStatus.BUSY] for d in conn.deltas]


# ---- duplicates and order -------------------------------------------------------------------


async def test_a_duplicate_reaches_members_once(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    conn, _ = await watch(rooms, doctor.id)
    v1, v2, v3 = await commit(store, doctor, 3)
    await publish(broker, v1, v1)
    await publish(broker, v2, v1)  # a late duplicate of an already delivered version
    await publish(broker, v3)  # the barrier: once it is delivered, so is all of the above
    await conn.wait_for(v3.version)
    assert conn.versions == [v1.version, v2.version, v3.version]
    assert busy_slot_ids(conn) == [[doctor.slots[i].id] for i in range(3)]


async def test_out_of_order_changes_are_delivered_in_order(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    conn, _ = await watch(rooms, doctor.id)
    v1, v2, v3 = await commit(store, doctor, 3)
    await publish(broker, v3, v2, v1)
    await conn.wait_for(v3.version)
    assert conn.versions == [v1.version, v2.version, v3.version]


async def test_every_member_gets_the_same_stream(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    """Fan-out is per room, not per member: two watchers cannot disagree on order."""
    a, _ = await watch(rooms, doctor.id)
    b, _ = await watch(rooms, doctor.id)
    changes = await commit(store, doctor, 4)
    # Out of order and duplicated; the last arrival (c2) completes the run, so once c3 is
    # delivered every message has been processed.
    c0, c1, c2, c3 = changes
    await publish(broker, c1, c0, c1, c3, c2)
    await a.wait_for(changes[-1].version)
    await b.wait_for(changes[-1].version)
    assert a.versions == b.versions == [c.version for c in changes]


async def test_a_lost_publish_is_filled_from_the_change_log(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    conn, _ = await watch(rooms, doctor.id)
    lost, published = await commit(store, doctor, 2)
    await publish(broker, published)
    await conn.wait_for(published.version)
    assert conn.versions == [lost.version, published.version]
    assert conn.deltas[0].slots[0].id == doctor.slots[0].id


async def test_lost_publish_over_websocket(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    """What a client sees: both bookings, in order, and no resync was needed."""
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-ws")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        unpublished = await commands.book_slot(
            store, slot_id=snapshot.slots[0].id, patient_id="p-store"
        )
        assert unpublished.change is not None
        await patient.book(snapshot.slots[1].id)

        first = await watcher.next_delta(timeout=WAIT_S)
        second = await watcher.next_delta(timeout=WAIT_S)
        assert (first.version, second.version) == (snapshot.version + 1, snapshot.version + 2)
        assert [(s.id, s.status) for s in first.slots] == [(snapshot.slots[0].id, SlotStatus.BUSY)]
        assert [(s.id, s.status) for s in second.slots] == [(snapshot.slots[1].id, SlotStatus.BUSY)]
        calendar = watcher.calendars[doctor.id]
        assert calendar.version == snapshot.version + 2
        assert calendar.resyncs == 0


# ---- snapshots and the backlog --------------------------------------------------------------


async def test_member_never_receives_what_its_snapshot_already_has(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    """A snapshot can be newer than the room, when it read commits whose publish is in flight."""
    early, _ = await watch(rooms, doctor.id)
    base = await reads.doctor_version(store, doctor.id)
    late_conn = FakeConnection()
    late = await rooms.join(cast(Connection, late_conn), doctor.id)
    in_flight = await commit(store, doctor, 2)
    snapshot = await reads.snapshot(store, doctor.id, doctor.start, doctor.end)
    assert snapshot.version == base + 2
    late.start(snapshot.version)

    (after,) = await commit(store, doctor, 1, first_slot=2)
    await publish(broker, *in_flight, after)
    await early.wait_for(after.version)
    await late_conn.wait_for(after.version)
    assert early.versions == [base + 1, base + 2, base + 3]
    assert late_conn.versions == [base + 3]


async def test_backlog_is_forwarded_if_newer_than_the_snapshot(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    """Changes that arrive while a snapshot is read wait; only those it missed go out."""
    live, _ = await watch(rooms, doctor.id)  # proves the room has processed each change
    base = await reads.doctor_version(store, doctor.id)
    conn = FakeConnection()
    member = await rooms.join(cast(Connection, conn), doctor.id)

    (seen,) = await commit(store, doctor, 1)
    snapshot = await reads.snapshot(store, doctor.id, doctor.start, doctor.end)  # sees `seen` only
    (missed,) = await commit(store, doctor, 1, first_slot=1)
    await publish(broker, seen, missed)
    await live.wait_for(missed.version)
    assert conn.versions == []  # nothing may precede the snapshot on the wire
    assert [f.change.version for f in member.backlog] == [seen.version, missed.version]

    member.start(snapshot.version)
    assert snapshot.version == base + 1
    assert conn.versions == [missed.version]
    assert member.backlog == []

    (later,) = await commit(store, doctor, 1, first_slot=2)
    await publish(broker, later)
    await conn.wait_for(later.version)
    assert conn.versions == [missed.version, later.version]


# ---- subscriptions --------------------------------------------------------------------------


async def test_last_member_leaving_unsubscribes_and_rejoining_resubscribes(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    channel = doctor_channel(doctor.id)
    assert channel not in broker.channels
    _, a = await watch(rooms, doctor.id)
    _, b = await watch(rooms, doctor.id)
    assert channel in broker.channels
    await rooms.leave(a)
    assert channel in broker.channels  # b still watches
    await rooms.leave(b)
    assert channel not in broker.channels
    assert rooms.watchers(doctor.id) == 0
    assert len(rooms) == 0

    conn, _ = await watch(rooms, doctor.id)
    assert channel in broker.channels
    (change,) = await commit(store, doctor, 1)
    await publish(broker, change)
    await conn.wait_for(change.version)
    assert conn.versions == [change.version]


async def test_unwatch_over_websocket_unsubscribes_the_instance(
    doctor: SeededDoctor, client: AppClient
) -> None:
    broker = client.app[BROKER]
    channel = doctor_channel(doctor.id)
    async with (
        SlotcastClient.connect(ws_url(client)) as a,
        SlotcastClient.connect(ws_url(client)) as b,
    ):
        await a.watch(doctor.id, doctor.start, doctor.end)
        await b.watch(doctor.id, doctor.start, doctor.end)
        assert channel in broker.channels
        await a.unwatch(doctor.id)
        assert channel in broker.channels
        await b.unwatch(doctor.id)
        assert channel not in broker.channels
        await a.watch(doctor.id, doctor.start, doctor.end)
        assert channel in broker.channels


async def test_watching_an_unknown_doctor_leaves_no_subscription(
    rooms: Rooms, broker: ReconnectingBroker
) -> None:
    with pytest.raises(NotFound):
        await rooms.join(cast(Connection, FakeConnection()), 987654)
    assert broker.channels == frozenset()
    assert len(rooms) == 0


# ---- reconnects -----------------------------------------------------------------------------


async def test_reconnect_during_a_gap_fill_still_catches_up_to_the_latest_version(
    rooms: Rooms, broker: ReconnectingBroker, store: Store, doctor: SeededDoctor
) -> None:
    """A reconnect means anything may be lost, not only the versions a gap fill is reading.

    Here v+1 is in flight when Redis drops, v+2 arrived, and v+3 was published
    during the outage. After the reconnect the room must reach v+3 without
    waiting for some unrelated later change.
    """
    conn, member = await watch(rooms, doctor.id)
    v1, v2, v3 = await commit(store, doctor, 3)
    rooms.receive(v2)  # a gap: a fill from the log is now scheduled
    assert member.room.catching_up is not None
    broker.reconnect()
    await conn.wait_for(v3.version)
    assert conn.versions == [v1.version, v2.version, v3.version]


async def test_during_a_redis_outage_the_committing_instance_still_delivers_once(
    doctor: SeededDoctor,
    settings: Settings,
    redis_url: str,
    redis_process: RedisServer,
    aiohttp_client: Callable[..., object],
) -> None:
    """The publish fails while Redis is down, yet the instance that committed the change
    hands it to its own members at once (the outbox's local delivery): the watcher gets
    the delta, the patient the appointment event. Once Redis is back the relay publishes
    it, and the rooms drop that copy: each arrived exactly once."""
    fast_relay = settings.replace(broker_url=redis_url, relay_sweep_s=0.2, relay_grace_s=0.2)
    app = create_app(fast_relay)
    client = cast(AppClient, await aiohttp_client(app))  # type: ignore[misc]
    broker = app[BROKER]
    assert isinstance(broker, RedisBroker)
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-outage")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        await patient.watch_appointments()
        slot = snapshot.slots[0]
        await asyncio.to_thread(redis_process.stop)
        try:
            await eventually(lambda: not broker.healthy, "the broker to notice the outage")
            appointment = await patient.book(slot.id)  # the publish fails and is logged
            delta = await watcher.next_delta(timeout=WAIT_S)
            assert delta.version == snapshot.version + 1
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]
            event = await expect(patient, AppointmentEvent)
            assert event.appointment.id == appointment.id
            assert not broker.up
        finally:
            if redis_process.process is None:
                await asyncio.to_thread(redis_process.start)

        # Once the relay has published it, the broker's copy has come and gone.
        relayed = app[METRICS].relayed
        await eventually(lambda: relayed._value.get() >= 1, "the relay", RECOVERY_S)
        await eventually(lambda: broker.up, "the broker to be back", RECOVERY_S)
        await patient.book(snapshot.slots[1].id)
        delta = await watcher.next_delta(timeout=WAIT_S)
        assert delta.version == snapshot.version + 2  # no copy of the first came between
        # After a reconnect a patient room is told to re-read its list (no log to resume
        # from), but the relayed event itself is not delivered a second time.
        event = await expect(patient, AppointmentEvent, skip=(Resync,))
        assert event.appointment.slot_id == snapshot.slots[1].id
        await watcher.ping()
        await patient.ping()
        assert watcher.events.empty()
        while not patient.events.empty():
            assert isinstance(patient.events.get_nowait(), Resync)


# ---- rounds: batching and slicing -----------------------------------------------------------


@pytest.fixture
async def sliced_rooms(store: Store, broker: ReconnectingBroker) -> AsyncIterator[Rooms]:
    """Rooms that write to 2 members per event-loop turn, so a round of 5 takes 3 turns."""
    r = Rooms(store, broker, "test-instance", fanout_slice=2)
    yield r
    await r.close()


async def test_changes_ready_together_go_out_in_one_write_per_member(
    rooms: Rooms, store: Store, doctor: SeededDoctor
) -> None:
    """Changes received in the same loop turn are one round: one write per member, in order."""
    a, _ = await watch(rooms, doctor.id)
    b, _ = await watch(rooms, doctor.id)
    changes = await commit(store, doctor, 3)
    for change in changes:
        rooms.receive(change)  # as the broker reader does with messages already buffered
    assert a.versions == b.versions == []  # not on the reader's path: in the next round
    await a.wait_for(changes[-1].version)
    await b.wait_for(changes[-1].version)
    assert a.versions == b.versions == [c.version for c in changes]
    assert a.writes == b.writes == 1
    (later,) = await commit(store, doctor, 1, first_slot=3)
    rooms.receive(later)
    await a.wait_for(later.version)
    assert a.versions[-1] == later.version
    assert a.writes == 2


async def test_a_member_live_within_a_batch_gets_only_what_its_snapshot_lacks(
    rooms: Rooms, store: Store, doctor: SeededDoctor
) -> None:
    """A member whose snapshot falls inside a round's versions takes the per-change path."""
    early, _ = await watch(rooms, doctor.id)
    late_conn = FakeConnection()
    late = await rooms.join(cast(Connection, late_conn), doctor.id)
    v1, v2, v3 = await commit(store, doctor, 3)
    late.start(v1.version)  # its snapshot read v1, not v2 and v3
    for change in (v1, v2, v3):
        rooms.receive(change)
    await early.wait_for(v3.version)
    await late_conn.wait_for(v3.version)
    assert early.versions == [v1.version, v2.version, v3.version]
    assert late_conn.versions == [v2.version, v3.version]


async def test_a_big_room_is_written_in_slices_and_each_member_keeps_its_order(
    sliced_rooms: Rooms, store: Store, doctor: SeededDoctor
) -> None:
    """Other work runs between slices; a change arriving mid-round waits for the next round,
    so every member still sees every version once, in order."""
    conns = [(await watch(sliced_rooms, doctor.id))[0] for _ in range(5)]
    first, second = await commit(store, doctor, 2)
    sliced_rooms.receive(first)
    await asyncio.sleep(0)  # the first slice of the first round
    reached = sum(1 for c in conns if c.versions)
    assert reached == 2, "one slice per event-loop turn"
    sliced_rooms.receive(second)  # mid-round
    for conn in conns:
        await conn.wait_for(second.version)
    for conn in conns:
        assert conn.versions == [first.version, second.version]
        assert conn.writes == 2


async def test_a_member_that_leaves_mid_round_gets_nothing_more(
    sliced_rooms: Rooms, store: Store, doctor: SeededDoctor
) -> None:
    watched = [await watch(sliced_rooms, doctor.id) for _ in range(5)]
    (change,) = await commit(store, doctor, 1)
    sliced_rooms.receive(change)
    await asyncio.sleep(0)  # the first slice is written
    pending = [(c, m) for c, m in watched if not c.versions]
    assert len(pending) == 3
    gone_conn, gone = pending[0]
    await sliced_rooms.leave(gone)  # e.g. an `unwatch` between two slices
    for conn, member in watched:
        if member is not gone:
            await conn.wait_for(change.version)
    assert gone_conn.versions == []


async def test_fan_out_metrics_count_each_change_once_per_round(
    store: Store, broker: ReconnectingBroker, doctor: SeededDoctor
) -> None:
    seen: list[int] = []
    rooms = Rooms(
        store, broker, "test-instance", on_fanout=lambda delivered, _latency: seen.append(delivered)
    )
    try:
        conns = [(await watch(rooms, doctor.id))[0] for _ in range(3)]
        changes = await commit(store, doctor, 2)
        for change in changes:
            rooms.receive(change)
        await conns[0].wait_for(changes[-1].version)
        await asyncio.sleep(0)
        assert seen == [3, 3]  # one observation per change, each for every member
    finally:
        await rooms.close()


async def test_a_closing_room_tells_the_version_its_members_were_sent(
    store: Store, doctor: SeededDoctor, broker: ReconnectingBroker
) -> None:
    """Changes heard from other instances, sent to members, and then no room holds that
    version: the read replicas' fence must remember it (store.replicas, `note`)."""
    closed: list[tuple[int, int]] = []
    rooms = Rooms(store, broker, "test-instance", on_close=lambda d, v: closed.append((d, v)))
    try:
        _, member = await watch(rooms, doctor.id)
        changes = await commit(store, doctor, 2)
        await publish(broker, *changes)
        await eventually(lambda: member.room.version == changes[-1].version, "the changes")
        await rooms.leave(member)
        assert closed == [(doctor.id, changes[-1].version)]
    finally:
        await rooms.close()
