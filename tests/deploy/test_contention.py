"""Races between real `slotcast serve` processes sharing one PostgreSQL and one Redis.

Inside one process, asyncio hides many races: requests interleave only at awaits,
and one pool meets every lock. Across processes nothing but PostgreSQL (the
doctors' advisory locks, row locks and constraints) stands between many patients
and one slot, so these tests put three instances in front of one database and
make patients collide through all of them at once. The losers must get a clean
`slot_taken` (never `busy` or `internal`), and the database must end up with
exactly what one serial run would have written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import asyncpg
import pytest

from client import ClientError, SlotcastClient
from protocol.messages import AppointmentView, Rescheduled
from protocol.vocabulary import SlotStatus
from store import commands
from store.pool import Store
from testkit.fixtures import SeededDoctor, Spawn, seed_doctor, token
from testkit.harness import ServerProcess

pytestmark = pytest.mark.processes

PATIENTS_PER_PROCESS = 20
# SIGTERM drains for drain_grace_s (1 s) by default so a load balancer can notice; these
# tests have no balancer, and a stop that waits would let the hold test's hold expire
# in the very process that is meant to be gone.
NO_GRACE = {"SLOTCAST_DRAIN_GRACE_S": "0"}
T = TypeVar("T")


async def spawn_many(spawn: Spawn, *names: str, **kw: Any) -> list[ServerProcess]:
    """Start processes side by side: startup dominates this module's runtime."""
    return list(await asyncio.gather(*(asyncio.to_thread(spawn, n, **kw) for n in names)))


@contextlib.asynccontextmanager
async def connected(
    urls_and_subjects: Sequence[tuple[str, str]],
) -> AsyncIterator[list[SlotcastClient]]:
    """One WebSocket per (url, patient), all open before anyone sends a command.

    Each connection handles its frames one at a time, so concurrency across
    patients needs one connection each; an unlimited connector keeps aiohttp's
    default cap of 100 from queueing connections behind each other.
    """
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        contextlib.AsyncExitStack() as stack,
    ):

        async def open_one(url: str, sub: str) -> SlotcastClient:
            return await stack.enter_async_context(
                SlotcastClient.connect(url, token=token(sub=sub), session=session)
            )

        yield list(await asyncio.gather(*(open_one(u, s) for u, s in urls_and_subjects)))


async def race(
    clients: Sequence[SlotcastClient], send: Callable[[SlotcastClient], Awaitable[T]]
) -> list[T | ClientError]:
    """Everyone sends at once: a barrier releases all senders in the same loop turn."""
    barrier = asyncio.Barrier(len(clients))

    async def one(client: SlotcastClient) -> T | ClientError:
        await barrier.wait()
        try:
            return await send(client)
        except ClientError as exc:
            return exc

    return list(await asyncio.gather(*(one(c) for c in clients)))


def outcomes(results: Sequence[object]) -> Counter[str]:
    return Counter(r.wire_code if isinstance(r, ClientError) else "ok" for r in results)


@contextlib.asynccontextmanager
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def doctor_version(conn: asyncpg.Connection, doctor_id: int) -> int:
    version: int = await conn.fetchval("SELECT version FROM doctors WHERE id = $1", doctor_id)
    return version


@pytest.fixture
async def three(spawn_server: Spawn, redis_url: str) -> list[ServerProcess]:
    return await spawn_many(spawn_server, "p1", "p2", "p3", broker_url=redis_url, env=NO_GRACE)


@pytest.mark.parametrize("command", ["book", "hold"])
async def test_sixty_patients_on_three_instances_race_for_one_slot(
    three: list[ServerProcess], doctor: SeededDoctor, database_url: str, command: str
) -> None:
    """One winner, 59 clean `slot_taken`s, one active appointment, one committed change."""
    slot = doctor.slots[3]
    subjects = [
        (p.ws_url, f"racer-{p.name}-{i}") for p in three for i in range(PATIENTS_PER_PROCESS)
    ]
    async with db(database_url) as conn, connected(subjects) as clients:
        base = await doctor_version(conn, doctor.id)

        async def send(client: SlotcastClient) -> AppointmentView:
            if command == "book":
                return await client.book(slot.id)
            return await client.hold(slot.id)

        results = await race(clients, send)

        assert outcomes(results) == {"ok": 1, "slot_taken": len(clients) - 1}, outcomes(results)
        winner_index, won = next(
            (i, r) for i, r in enumerate(results) if isinstance(r, AppointmentView)
        )
        assert won.patient_id == subjects[winner_index][1]
        active = await conn.fetch(
            "SELECT id, patient_id, status FROM appointments"
            " WHERE slot_id = $1 AND status <> 'cancelled'",
            slot.id,
        )
        expected_status = "booked" if command == "book" else "pending"
        assert [tuple(r) for r in active] == [(won.id, won.patient_id, expected_status)]
        # Nothing but the winner reached the table, not even as a cancelled row.
        assert await conn.fetchval("SELECT count(*) FROM appointments") == 1
        expected_slot = SlotStatus.BUSY if command == "book" else SlotStatus.BUSY_TENTATIVE
        status = await conn.fetchval("SELECT status FROM slots WHERE id = $1", slot.id)
        assert status == expected_slot.value
        # The 59 refusals committed nothing: exactly one version, one change record.
        assert await doctor_version(conn, doctor.id) == base + 1
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM changes WHERE doctor_id = $1 AND version > $2",
                doctor.id,
                base,
            )
            == 1
        )


async def test_one_idempotency_key_through_three_instances_books_once(
    three: list[ServerProcess], doctor: SeededDoctor, database_url: str
) -> None:
    """A client retrying on every instance at once must still get exactly one booking."""
    slot = doctor.slots[5]
    per_process = 10
    connections = [(p.ws_url, "p-retrier") for p in three for _ in range(per_process)]
    async with db(database_url) as conn, connected(connections) as clients:
        base = await doctor_version(conn, doctor.id)
        results = await race(clients, lambda c: c.book(slot.id, idempotency_key="retry-1"))

        assert outcomes(results) == {"ok": len(clients)}, outcomes(results)
        ids = {r.id for r in results if isinstance(r, AppointmentView)}
        assert len(ids) == 1, f"replies name different appointments: {ids}"
        rows = await conn.fetch("SELECT id, slot_id, status FROM appointments")
        assert [tuple(r) for r in rows] == [(ids.pop(), slot.id, "booked")]
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 1
        assert await doctor_version(conn, doctor.id) == base + 1


async def test_crossed_reschedules_through_different_instances_neither_deadlock_nor_lose(
    three: list[ServerProcess], store: Store, database_url: str
) -> None:
    """A→B and B→A at once take both doctors' locks in opposite request order.

    The store takes them in id order, so none may deadlock or time out, and every
    slot freed or taken must match the appointments exactly afterwards.
    """
    a, b = await asyncio.gather(seed_doctor(store, name="Dr. A"), seed_doctor(store, name="Dr. B"))
    pairs = 10  # per direction
    moves: list[tuple[str, int, int]] = []  # (patient, appointment, target slot)
    for i in range(pairs):
        on_a = await commands.book_slot(store, slot_id=a.slots[i].id, patient_id=f"pa-{i}")
        on_b = await commands.book_slot(store, slot_id=b.slots[i].id, patient_id=f"pb-{i}")
        moves.append((f"pa-{i}", on_a.appointment.id, b.slots[pairs + i].id))
        moves.append((f"pb-{i}", on_b.appointment.id, a.slots[pairs + i].id))
    # Consecutive moves go in opposite directions through different processes.
    routes = [(three[k % 3].ws_url, patient) for k, (patient, _, _) in enumerate(moves)]
    async with db(database_url) as conn, connected(routes) as clients:
        versions = {d.id: await doctor_version(conn, d.id) for d in (a, b)}
        by_client = dict(zip(clients, moves, strict=True))

        async def move(client: SlotcastClient) -> Rescheduled:
            _, appointment_id, target = by_client[client]
            return await client.reschedule(appointment_id, target)

        results = await race(clients, move)

        assert outcomes(results) == {"ok": len(moves)}, outcomes(results)
        for (patient, old_id, target), result in zip(moves, results, strict=True):
            assert isinstance(result, Rescheduled)
            assert (result.appointment.slot_id, result.appointment.patient_id) == (target, patient)
            assert (result.replaced.id, result.replaced.cancel_reason) == (old_id, "rescheduled")
        active = await conn.fetch(
            "SELECT patient_id, slot_id FROM appointments WHERE status <> 'cancelled'"
        )
        assert sorted(tuple(r) for r in active) == sorted((p, t) for p, _, t in moves)
        for d in (a, b):
            busy, active_count = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM slots WHERE doctor_id = $1 AND status = 'busy'),
                          (SELECT count(*) FROM appointments
                           WHERE doctor_id = $1 AND status <> 'cancelled')""",
                d.id,
            )
            assert (busy, active_count) == (pairs, pairs), f"doctor {d.id}"
            # Every reschedule touched both doctors: one version each, none skipped or doubled.
            assert await doctor_version(conn, d.id) == versions[d.id] + 2 * pairs
        freed = await conn.fetch(
            "SELECT status FROM slots WHERE id = ANY($1::bigint[])",
            [s.id for d in (a, b) for s in d.slots[:pairs]],
        )
        assert {r["status"] for r in freed} == {SlotStatus.FREE.value}


async def test_a_hold_left_behind_by_a_stopped_instance_expires_on_the_next_one(
    spawn_server: Spawn, doctor: SeededDoctor, database_url: str
) -> None:
    """Expiry lives in the database, not in the process that granted the hold.

    The first instance is stopped while its hold is still live; no instance runs
    while the hold's time passes; the next one to start must free the slot for
    its watchers and record why.
    """
    env = {"SLOTCAST_HOLD_TTL_S": "1", "SLOTCAST_HOLD_SWEEP_S": "0.2", **NO_GRACE}
    slot = doctor.slots[2]
    first = spawn_server("before", env=env)
    async with SlotcastClient.connect(first.ws_url, token=token(sub="p-holder")) as holder:
        hold = await holder.hold(slot.id)
    assert hold.hold_expires_at is not None
    assert await asyncio.to_thread(first.stop) == 0

    async with db(database_url) as conn:

        async def status_and_reason() -> tuple[str, str | None]:
            row = await conn.fetchrow(
                "SELECT status, cancel_reason FROM appointments WHERE id = $1", hold.id
            )
            return row["status"], row["cancel_reason"]

        assert await status_and_reason() == ("pending", None), "stopped after the hold expired"
        # The deliberate restart gap: the hold's time runs out while no instance is up.
        gap = (hold.hold_expires_at - datetime.now(UTC)).total_seconds() + 0.5
        await asyncio.sleep(max(gap, 0.0))
        assert await status_and_reason() == ("pending", None), "something else expired it"

        second = await asyncio.to_thread(spawn_server, "after", env=env)
        async with SlotcastClient.connect(second.ws_url) as watcher:
            await watcher.watch(doctor.id, doctor.start, doctor.end)
            calendar = watcher.calendars[doctor.id]
            async with asyncio.timeout(5):  # the snapshot, or a later delta, shows it free
                while calendar.slots[slot.id].status is not SlotStatus.FREE:
                    await watcher.next_delta()
        assert await status_and_reason() == ("cancelled", "hold expired")
        assert await conn.fetchval("SELECT status FROM slots WHERE id = $1", slot.id) == "free"
        assert (
            await conn.fetchval("SELECT cancelled_by FROM appointments WHERE id = $1", hold.id)
            == "system"
        )
