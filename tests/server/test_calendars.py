"""Rooms' calendars: joins answered from memory, never older than what a member can go live from.

Driven through `Rooms` with real committed changes (PostgreSQL) and the in-process
broker; the last test goes through a real server over WebSockets and counts reads
in its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.messages import Block, Hold, SetSchedule, Snapshot, WeeklyBlock
from protocol.vocabulary import Role
from server.app import create_app
from server.calendars import Budget, Calendars, Read
from server.connection import Connection
from server.keys import METRICS
from server.room import Member
from server.rooms import Rooms
from server.settings import Settings
from store import commands, reads
from store.broker import MemoryBroker
from store.changes import Change
from store.constants import doctor_channel
from store.pool import Store
from store.tx import Actor
from testkit.fixtures import SeededDoctor, token, ws_url
from tests.server.test_rooms import FakeConnection, commit

AppClient = TestClient[web.Request, web.Application]


class Reads:
    """The database reads a room asks for, counted."""

    def __init__(self, store: Store, doctor: SeededDoctor) -> None:
        self.store, self.doctor, self.count = store, doctor, 0

    async def __call__(self, at_least: int = 0) -> tuple[Snapshot, datetime]:
        self.count += 1
        now = datetime.now(UTC)
        snapshot = await reads.snapshot(
            self.store, self.doctor.id, *self.range, now=now, min_version=at_least
        )
        return snapshot, now

    @property
    def range(self) -> tuple[date, date]:
        return self.doctor.start, self.doctor.end


@pytest.fixture
async def rooms(store: Store) -> AsyncIterator[tuple[Rooms, MemoryBroker, Counter[str]]]:
    broker, sources = MemoryBroker(), Counter[str]()
    r = Rooms(
        store,
        broker,
        "test-instance",
        on_snapshot=lambda s: sources.update([s]),
        cache_slots=10_000,
    )
    yield r, broker, sources
    await r.close()


async def join(rooms: Rooms, doctor_id: int) -> Member:
    return await rooms.join(cast(Connection, FakeConnection()), doctor_id)


async def snapshot(rooms: Rooms, member: Member, read: Reads) -> Snapshot:
    return await rooms.snapshot(member, *read.range, read=read, clock=lambda: datetime.now(UTC))


async def publish(broker: MemoryBroker, rooms: Rooms, member: Member, *changes: Change) -> None:
    for change in changes:
        await broker.publish(doctor_channel(change.doctor_id), change.pack())
    for _ in range(100):  # the memory broker delivers on the loop: wait for the room
        if member.room.version == changes[-1].version:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"room at v{member.room.version}, not v{changes[-1].version}")


def same(a: Snapshot, b: Snapshot) -> None:
    assert (a.version, a.timezone, a.start, a.end) == (b.version, b.timezone, b.start, b.end)
    assert a.slots == b.slots


async def test_a_second_join_is_served_from_memory_and_equals_a_fresh_read(
    rooms: tuple[Rooms, MemoryBroker, Counter[str]], store: Store, doctor: SeededDoctor
) -> None:
    r, _, sources = rooms
    read = Reads(store, doctor)
    first = await snapshot(r, await join(r, doctor.id), read)
    second = await snapshot(r, await join(r, doctor.id), read)
    assert read.count == 1
    assert sources == {"database": 1, "cache": 1}
    same(first, second)
    fresh, _ = await read()
    same(second, fresh)


async def test_deltas_advance_the_calendar_to_exactly_what_the_database_says(
    rooms: tuple[Rooms, MemoryBroker, Counter[str]], store: Store, doctor: SeededDoctor
) -> None:
    r, broker, _ = rooms
    read = Reads(store, doctor)
    member = await join(r, doctor.id)
    before = await snapshot(r, member, read)
    booked = await commit(store, doctor, 2)
    held = await commands.hold(
        store,
        Actor("p-hold", Role.PATIENT),
        Hold(doctor.slots[5].id),
        ttl=timedelta(minutes=2),
        max_holds=3,
        limits=None,
    )
    blocked = await commands.block(
        store, Actor(str(doctor.id), Role.DOCTOR), Block(doctor.slots[7].id)
    )
    changes = [*booked, *held.changes, *blocked.changes]
    await publish(broker, r, member, *changes)
    cached = await snapshot(r, await join(r, doctor.id), read)
    assert read.count == 1, "the deltas should have kept the calendar current"
    assert cached.version == before.version + len(changes)
    fresh, _ = await read()
    same(cached, fresh)


async def test_a_change_of_rules_drops_the_calendar(
    rooms: tuple[Rooms, MemoryBroker, Counter[str]], store: Store, doctor: SeededDoctor
) -> None:
    r, broker, _ = rooms
    read = Reads(store, doctor)
    member = await join(r, doctor.id)
    await snapshot(r, member, read)
    weekly = [WeeklyBlock(d, time(9), time(12)) for d in range(1, 8)]
    outcome = await commands.set_schedule(
        store,
        Actor("admin", Role.ADMIN),
        SetSchedule(doctor.id, weekly, min_notice_minutes=60, horizon_days=9),
    )
    await publish(broker, r, member, *outcome.changes)
    after = await snapshot(r, await join(r, doctor.id), read)
    assert read.count == 2, "a schedule change may move bounds a delta does not carry"
    fresh, _ = await read()
    same(after, fresh)


async def test_a_version_waiting_behind_a_gap_is_never_served_from_memory(
    rooms: tuple[Rooms, MemoryBroker, Counter[str]], store: Store, doctor: SeededDoctor
) -> None:
    r, broker, _ = rooms
    read = Reads(store, doctor)
    member = await join(r, doctor.id)
    await snapshot(r, member, read)
    _, v2 = await commit(store, doctor, 2)
    await broker.publish(doctor_channel(doctor.id), v2.pack())  # v1 is missing: a gap
    await asyncio.sleep(0.01)
    assert member.room.pending
    later = await snapshot(r, await join(r, doctor.id), read)
    assert read.count == 2
    assert later.version == v2.version


async def test_a_crowd_joining_at_once_costs_one_read(
    rooms: tuple[Rooms, MemoryBroker, Counter[str]], store: Store, doctor: SeededDoctor
) -> None:
    r, _, sources = rooms
    read = Reads(store, doctor)
    members = [await join(r, doctor.id) for _ in range(50)]
    got = await asyncio.gather(*(snapshot(r, m, read) for m in members))
    assert read.count == 1
    assert sources == {"database": 1, "shared": 49}
    assert {s.version for s in got} == {got[0].version}


async def test_a_member_that_joined_after_a_shared_read_began_reads_again() -> None:
    """The shared read is older than what the room had fanned out when this member
    joined: those changes never reach the member, so it must not use that read."""
    versions = iter([5, 6])
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_read(at_least: int) -> tuple[Snapshot, datetime]:
        version = next(versions)
        started.set()
        if version == 5:
            await release.wait()
        now = datetime.now(UTC)
        day = date(2030, 1, 1)
        return Snapshot(1, version, "UTC", day, day + timedelta(1), [], now, now), now

    calendars = Calendars(1, Budget(100))
    room_version = 5

    def get(joined_at: int) -> asyncio.Task[Snapshot]:
        day = date(2030, 1, 1)
        return asyncio.create_task(
            calendars.snapshot(
                day,
                day + timedelta(1),
                current=lambda: room_version,
                joined_at=joined_at,
                read=slow_read,
                clock=lambda: datetime.now(UTC),
            )
        )

    leader = get(joined_at=5)
    await started.wait()
    room_version = 6  # v6 fanned out while the read was under way; then a member joins
    follower = get(joined_at=6)
    await asyncio.sleep(0)
    release.set()
    assert (await leader).version == 5
    assert (await follower).version == 6


async def test_the_budget_bounds_what_rooms_keep(store: Store, doctor: SeededDoctor) -> None:
    sources = Counter[str]()
    r = Rooms(
        store,
        MemoryBroker(),
        "test-instance",
        on_snapshot=lambda s: sources.update([s]),
        cache_slots=3,
    )
    try:
        read = Reads(store, doctor)
        await snapshot(r, await join(r, doctor.id), read)
        await snapshot(r, await join(r, doctor.id), read)
        assert read.count == 2, "a range bigger than the budget is never kept"
    finally:
        await r.close()


async def test_watchers_of_one_doctor_over_websockets_cost_one_read(
    settings: Settings, doctor: SeededDoctor, aiohttp_client: object
) -> None:
    client: AppClient = await aiohttp_client(create_app(settings))  # type: ignore[operator]
    metrics = client.app[METRICS]
    async with contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(
                SlotcastClient.connect(ws_url(client), token=token(sub=f"w{n}"))
            )
            for n in range(20)
        ]
        replies = await asyncio.gather(
            *(w.watch(doctor.id, doctor.start, doctor.end) for w in watchers)
        )
        assert {s.version for s in replies} == {replies[0].version}
        late = await watchers[0].watch(doctor.id, doctor.start, doctor.end)
        assert late.slots == replies[0].slots
    served = {
        s.labels["source"]: s.value
        for m in metrics.snapshot_reads.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert served.get("database", 0) == 1
    assert served.get("cache", 0) + served.get("shared", 0) == 20


async def test_a_zero_budget_turns_sharing_off_too(store: Store, doctor: SeededDoctor) -> None:
    """`SLOTCAST_SNAPSHOT_CACHE_SLOTS=0` is the server as it was: one read per watch."""
    sources = Counter[str]()
    r = Rooms(store, MemoryBroker(), "test-instance", on_snapshot=lambda s: sources.update([s]))
    try:
        read = Reads(store, doctor)
        members = [await join(r, doctor.id) for _ in range(5)]
        await asyncio.gather(*(snapshot(r, m, read) for m in members))
        assert read.count == 5
        assert sources == {"database": 5}
    finally:
        await r.close()


async def test_a_cached_range_older_than_a_resuming_clients_since_is_read_anew(
    store: Store, doctor: SeededDoctor
) -> None:
    """The client applied a version the room has not heard of yet: the cached range, at
    the room's version, is older than what the client holds, so it is read at that."""
    calendars, day = Calendars(doctor.id, Budget(10_000)), (doctor.start, doctor.end)
    version = await reads.doctor_version(store, doctor.id)
    read = Reads(store, doctor)

    def get(joined_at: int, read: Read) -> Awaitable[Snapshot]:
        clock = lambda: datetime.now(UTC)  # noqa: E731
        return calendars.snapshot(
            *day, current=lambda: version, joined_at=joined_at, read=read, clock=clock
        )

    kept = await get(version, read)  # now cached at the room's version
    assert (await get(version, read)).slots == kept.slots
    assert read.count == 1
    asked: list[int] = []

    async def newer(at_least: int) -> tuple[Snapshot, datetime]:
        asked.append(at_least)
        return replace(kept, version=at_least), datetime.now(UTC)

    served = await get(version + 1, newer)
    assert asked == [version + 1]
    assert served.version == version + 1
