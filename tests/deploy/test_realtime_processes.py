"""Real time across real `slotcast serve` processes that share PostgreSQL and Redis.

What only separate processes show: presence summed over instances, private
dashboard and patient streams crossing instances, a SIGTERM'd instance's clients
coming back and catching up, and a Redis outage healed from the change log.
Process starts dominate the runtime, so each test starts its instances together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp
import pytest

from client import SlotcastClient
from protocol.messages import (
    AppointmentEvent,
    DashboardDelta,
    Delta,
    Message,
    Presence,
    Reconnect,
    SlotView,
)
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from store import reads
from store.pool import Store
from testkit.fixtures import SeededDoctor, Spawn, token
from testkit.harness import RedisServer, ServerProcess
from testkit.wire import expect

pytestmark = pytest.mark.processes

M = TypeVar("M", bound=Message)

WAIT_S = 5.0
PRESENCE_S = 6.0  # announcements are immediate on change, and repeated every 2 s
RECOVERY_S = 15.0
# Stopping (and restarting) an instance need not wait out a balancer: there is none here.
FAST_DRAIN = {"SLOTCAST_DRAIN_GRACE_S": "0.2"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start(spawn: Spawn, *names: str, **kw: Any) -> list[ServerProcess]:
    """Start instances side by side: startup dominates this module's runtime."""
    return list(await asyncio.gather(*(asyncio.to_thread(spawn, n, **kw) for n in names)))


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def readiness(http: aiohttp.ClientSession, server: ServerProcess) -> tuple[int, Any]:
    async with http.get(f"{server.http_url}/readyz") as resp:
        return resp.status, await resp.json()


def in_range(slots: dict[int, SlotView], doctor: SeededDoctor) -> dict[int, SlotStatus]:
    return {i: s.status for i, s in slots.items() if doctor.start <= s.start.date() < doctor.end}


async def db_statuses(store: Store, doctor: SeededDoctor) -> dict[int, SlotStatus]:
    snapshot = await reads.snapshot(store, doctor.id, doctor.start, doctor.end)
    return {s.id: s.status for s in snapshot.slots}


async def test_presence_is_the_sum_over_instances(
    spawn_server: Spawn, redis_url: str, doctor: SeededDoctor
) -> None:
    """A dashboard on C counts watchers on A, B and C, and drops B's when they leave."""
    a, b, c = await start(spawn_server, "a", "b", "c", broker_url=redis_url, env=FAST_DRAIN)
    seen: list[int] = []

    async def until(dashboard: SlotcastClient, watchers: int) -> None:
        while not seen or seen[-1] != watchers:
            presence = await expect(dashboard, Presence, timeout=PRESENCE_S)
            assert presence.doctor_id == doctor.id
            seen.append(presence.watchers)

    async with SlotcastClient.connect(c.ws_url, token=token(Role.DOCTOR, str(doctor.id))) as doc:
        assert (await doc.watch_dashboard(doctor.id, doctor.start)).watchers == 0
        # Presence counts signed-in viewers (anonymous sockets could inflate it at will).
        async with (
            SlotcastClient.connect(a.ws_url, token=token(sub="p-a1")) as a1,
            SlotcastClient.connect(a.ws_url, token=token(sub="p-a2")) as a2,
            SlotcastClient.connect(c.ws_url, token=token(sub="p-c1")) as c1,
        ):
            async with SlotcastClient.connect(b.ws_url, token=token(sub="p-b1")) as b1:
                for watcher in (a1, a2, b1, c1):
                    await watcher.watch(doctor.id, doctor.start, doctor.end)
                await until(doc, 4)
                assert max(seen) == 4  # never more than there are
            await until(doc, 3)  # B's only watcher disconnected
        await until(doc, 0)
    leaving = seen[seen.index(4) :]
    assert leaving == sorted(leaving, reverse=True), seen  # no stale count came back


async def test_dashboard_and_patient_streams_cross_instances(
    spawn_server: Spawn, redis_url: str, doctor: SeededDoctor, store: Store
) -> None:
    """Booked via A, seen with the patient on B's dashboard and in the patient's room on C."""
    a, b, c = await start(spawn_server, "a", "b", "c", broker_url=redis_url, env=FAST_DRAIN)
    slot = doctor.slots[0]
    async with (
        SlotcastClient.connect(a.ws_url, token=token(sub="p-x")) as booker,
        SlotcastClient.connect(b.ws_url, token=token(Role.DOCTOR, str(doctor.id))) as doc,
        SlotcastClient.connect(c.ws_url, token=token(sub="p-x")) as follower,
        SlotcastClient.connect(c.ws_url, token=token(sub="p-other")) as other,
    ):
        dashboard = await doc.watch_dashboard(doctor.id, doctor.start)
        assert await follower.watch_appointments() == []
        assert await other.watch_appointments() == []

        appointment = await booker.book(slot.id)
        delta = await expect(doc, DashboardDelta, skip=(Presence,))
        assert delta.version == dashboard.version + 1
        assert [(a.id, a.patient_id) for a in delta.appointments] == [(appointment.id, "p-x")]
        event = await expect(follower, AppointmentEvent)
        assert (event.version, event.appointment.id) == (delta.version, appointment.id)
        assert event.appointment.status is AppointmentStatus.BOOKED

        await doc.cancel(appointment.id, "clinic closed")  # by the doctor, on B
        delta = await expect(doc, DashboardDelta, skip=(Presence,))
        assert delta.version == dashboard.version + 2
        event = await expect(follower, AppointmentEvent)
        assert event.version == delta.version
        assert event.appointment.status is AppointmentStatus.CANCELLED
        assert event.appointment.cancel_reason == "clinic closed"

        # The other patient on C heard nothing of p-x, even through Redis.
        await other.hold(doctor.slots[1].id)
        own = await expect(other, AppointmentEvent)
        assert own.appointment.patient_id == "p-other"
        await other.ping()
        assert other.events.empty()
        assert await reads.doctor_version(store, doctor.id) == dashboard.version + 3


async def test_sigterm_clients_come_back_and_catch_up(
    spawn_server: Spawn, redis_url: str, doctor: SeededDoctor, store: Store
) -> None:
    """A restarted instance's clients reconnect to it, resume from their versions and miss
    nothing booked while it was down (via another instance)."""
    a, b = await start(spawn_server, "a", "b", broker_url=redis_url, env=FAST_DRAIN)
    async with (
        SlotcastClient.connect(a.ws_url, reconnect=True, max_backoff=0.3) as watcher,
        SlotcastClient.connect(b.ws_url, token=token(sub="p-away")) as patient,
    ):
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        calendar = watcher.calendars[doctor.id]
        assert await asyncio.to_thread(a.stop) == 0  # SIGTERM: drain, then exit
        await eventually(lambda: watcher.close_code == 1012, "the 1012 close to be read")
        assert not watcher.ready.is_set()
        events = []
        while not watcher.events.empty():
            events.append(watcher.events.get_nowait())
        assert any(isinstance(e, Reconnect) for e in events), events

        for slot in doctor.slots[:2]:  # while A is down
            await patient.book(slot.id)
        await asyncio.to_thread(a.start)
        latest = await reads.doctor_version(store, doctor.id)
        await eventually(
            lambda: watcher.ready.is_set() and calendar.version == latest,
            "the watcher to come back and catch up",
            timeout=RECOVERY_S,
        )
        assert watcher.reconnects == 1
        assert watcher.instance == "a"
        assert calendar.resyncs == 0  # resumed from its version, no snapshot
        assert in_range(calendar.slots, doctor) == await db_statuses(store, doctor)
        for slot in doctor.slots[:2]:
            assert calendar.slots[slot.id].status is SlotStatus.BUSY

        # Live again: a booking via B reaches the restarted A through Redis (by another
        # patient: p-away has as many of this doctor's slots as one patient may).
        async with SlotcastClient.connect(b.ws_url, token=token(sub="p-back")) as another:
            await another.book(doctor.slots[2].id)
        delta = await expect(watcher, Delta)
        while delta.version <= latest:  # the replayed deltas precede it
            delta = await expect(watcher, Delta)
        assert delta.version == latest + 1
        assert calendar.slots[doctor.slots[2].id].status is SlotStatus.BUSY


async def broker_up(http: aiohttp.ClientSession, server: ServerProcess) -> float:
    async with http.get(f"{server.http_url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("slotcast_broker_up "):
                return float(line.split()[1])
    raise AssertionError("no slotcast_broker_up in /metrics")


async def test_a_redis_outage_degrades_the_instances_and_the_change_log_heals_it(
    spawn_server: Spawn,
    redis_url: str,
    redis_process: RedisServer,
    doctor: SeededDoctor,
    http: aiohttp.ClientSession,
) -> None:
    """With Redis down every instance stays ready (an outage of the one shared Redis must
    not empty the balancer) and says `broker: down`. B's booking reaches B's own watcher
    at once; A's watcher gets it once Redis is back (A's catch-up from the change log, or
    B's relay), and each gets it exactly once."""
    a, b = await start(spawn_server, "a", "b", broker_url=redis_url, env=FAST_DRAIN)
    async with (
        SlotcastClient.connect(a.ws_url) as far,
        SlotcastClient.connect(b.ws_url) as near,
        SlotcastClient.connect(b.ws_url, token=token(sub="p-outage")) as patient,
    ):
        snapshot = await far.watch(doctor.id, doctor.start, doctor.end)
        await near.watch(doctor.id, doctor.start, doctor.end)
        slot = doctor.slots[0]
        await asyncio.to_thread(redis_process.stop)
        try:
            for server in (a, b):
                deadline = time.monotonic() + WAIT_S
                while (status := await readiness(http, server))[1]["broker"] != "down":
                    assert status[0] == 200, status
                    assert time.monotonic() < deadline, f"{server.name} never noticed"
                    await asyncio.sleep(0.05)
                assert status[0] == 200, status  # degraded, still in the balancer
                assert await broker_up(http, server) == 0
            appointment = await patient.book(slot.id)  # committed; the publish fails
            assert appointment.slot_id == slot.id
            delta = await expect(near, Delta, timeout=2.0)  # local delivery, no broker
            assert delta.version == snapshot.version + 1
            await far.ping()
            assert far.events.empty()  # nothing could have carried it to A yet
        finally:
            if redis_process.process is None:
                await asyncio.to_thread(redis_process.start)

        delta = await expect(far, Delta, timeout=RECOVERY_S)
        assert delta.version == snapshot.version + 1
        assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]
        await patient.book(doctor.slots[1].id)
        for watcher in (far, near):  # no duplicate of the first came between
            delta = await expect(watcher, Delta, timeout=RECOVERY_S)
            assert delta.version == snapshot.version + 2
            assert watcher.calendars[doctor.id].resyncs == 0
        for server in (a, b):
            deadline = time.monotonic() + RECOVERY_S
            while (await readiness(http, server))[1]["broker"] != "up":
                assert time.monotonic() < deadline, f"{server.name}'s broker never came back"
                await asyncio.sleep(0.05)
            assert await broker_up(http, server) == 1
