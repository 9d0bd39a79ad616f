"""Booking: a slot is never given to two patients, whatever the timing.

These tests attack the guarantees in the order they are layered: the per-doctor
advisory lock, the checks re-done under it, the idempotency keys that make a
retry safe, the change log that watchers are fed from, and the exclusion
constraint that stands behind all of it should the code above ever be wrong.
They call the store directly; the same race over WebSockets is in tests/server/test_commands.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import asyncpg
import pytest

from protocol.errors import ErrorCode
from protocol.vocabulary import SlotStatus
from store import commands, reads
from store.commands import Booking
from store.constants import LOCK_NS_DOCTOR
from store.errors import Busy, IdempotencyConflict, NotFound, SlotTaken, SlotUnavailable, TooLate
from store.pool import Store, open_store
from testkit.engine import active_appointments, version
from testkit.fixtures import SeededDoctor, seed_doctor

# ---- helpers ---------------------------------------------------------------------------------


async def slot_status(db: asyncpg.Connection, slot_id: int) -> str:
    status: str = await db.fetchval("SELECT status FROM slots WHERE id = $1", slot_id)
    return status


async def change_log(db: asyncpg.Connection, doctor_id: int) -> list[tuple[int, str, str]]:
    """(version, kind, public as JSON text): the text is what a leak would show up in."""
    rows = await db.fetch(
        "SELECT version, kind, public::text AS public FROM changes "
        "WHERE doctor_id = $1 ORDER BY version",
        doctor_id,
    )
    return [(r["version"], r["kind"], r["public"]) for r in rows]


async def appointment_count(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM appointments")
    return count


async def waiting_for_doctor_lock(db: asyncpg.Connection, doctor_id: int) -> None:
    """Return once some session is blocked on this doctor's advisory lock.

    PostgreSQL has no notification for "a backend started waiting", so this polls
    pg_locks: it is how the test knows the booking is really queued behind the lock.
    """
    query = """
        SELECT count(*) FROM pg_locks
        WHERE locktype = 'advisory' AND NOT granted AND classid = $1 AND objid = $2
          AND objsubid = 2"""
    async with asyncio.timeout(10):
        while True:
            if await db.fetchval(query, LOCK_NS_DOCTOR, doctor_id) > 0:
                return
            await asyncio.sleep(0.01)


def split(results: Sequence[object]) -> tuple[list[Booking], list[BaseException]]:
    wins = [r for r in results if isinstance(r, Booking)]
    losses = [r for r in results if isinstance(r, BaseException)]
    assert len(wins) + len(losses) == len(results)
    return wins, losses


# ---- racing for one slot ---------------------------------------------------------------------


@pytest.mark.parametrize("patients", [2, 20])
async def test_patients_racing_for_one_slot_exactly_one_wins(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection, patients: int
) -> None:
    slot = doctor.slots[0]
    before = await version(db, doctor.id)

    results = await asyncio.gather(
        *(
            commands.book_slot(store, slot_id=slot.id, patient_id=f"racer-{i}")
            for i in range(patients)
        ),
        return_exceptions=True,
    )

    wins, losses = split(results)
    assert len(wins) == 1, results
    assert len(losses) == patients - 1
    for loss in losses:
        assert isinstance(loss, SlotTaken), loss
        assert loss.code is ErrorCode.SLOT_TAKEN
    winner = wins[0].appointment
    rows = await active_appointments(db, slot.id)
    assert [(r["id"], r["patient_id"]) for r in rows] == [(winner.id, winner.patient_id)]
    assert await slot_status(db, slot.id) == SlotStatus.BUSY
    assert await version(db, doctor.id) == before + 1


# ---- the exclusion constraint: the last guard ------------------------------------------------


async def test_exclusion_constraint_refuses_an_overlap_that_bypasses_the_store(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    first, second = doctor.slots[0], doctor.slots[1]
    assert first.end == second.start  # the fixture's slots are back to back
    booked = await commands.book_slot(store, slot_id=first.id, patient_id="p-first")
    insert = """
        INSERT INTO appointments
            (doctor_id, slot_id, patient_id, starts_at, ends_at, status, cancelled_at)
        VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $6 = 'cancelled' THEN now() END)"""

    # Same times, and a range straddling the booked one's end: both refused.
    for start, end in ((first.start, first.end), (first.end - timedelta(minutes=1), second.end)):
        with pytest.raises(asyncpg.ExclusionViolationError):
            await db.execute(insert, doctor.id, second.id, "p-sneaky", start, end, "booked")
    # A cancelled appointment holds nothing, so it may overlap.
    await db.execute(insert, doctor.id, first.id, "p-gone", first.start, first.end, "cancelled")
    # Ranges are half-open: the next slot touching the booked one is not an overlap.
    await db.execute(insert, doctor.id, second.id, "p-next", second.start, second.end, "booked")

    rows = await db.fetch(
        "SELECT patient_id, status FROM appointments WHERE doctor_id = $1 ORDER BY id", doctor.id
    )
    assert [(r["patient_id"], r["status"]) for r in rows] == [
        (booked.appointment.patient_id, "booked"),
        ("p-gone", "cancelled"),
        ("p-next", "booked"),
    ]


async def test_constraint_turns_an_overlap_the_checks_missed_into_slot_taken(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    """The slot row says free but an active appointment already covers it: no double booking."""
    slot = doctor.slots[0]
    await db.execute(
        "INSERT INTO appointments (doctor_id, slot_id, patient_id, starts_at, ends_at, status)"
        " VALUES ($1, $2, 'p-legacy', $3, $4, 'booked')",
        doctor.id,
        slot.id,
        slot.start,
        slot.end,
    )
    before = await version(db, doctor.id)

    with pytest.raises(SlotTaken) as caught:
        await commands.book_slot(store, slot_id=slot.id, patient_id="p-new")

    assert caught.value.code is ErrorCode.SLOT_TAKEN
    assert [r["patient_id"] for r in await active_appointments(db, slot.id)] == ["p-legacy"]
    # The whole transaction rolled back: no version, no change, slot untouched.
    assert await version(db, doctor.id) == before
    assert [v for v, _, _ in await change_log(db, doctor.id)] == list(range(1, before + 1))
    assert await slot_status(db, slot.id) == SlotStatus.FREE


# ---- idempotency -----------------------------------------------------------------------------


async def test_same_key_twice_books_once_and_returns_the_first_result(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    slot = doctor.slots[0]
    before_version = await version(db, doctor.id)
    before_log = await change_log(db, doctor.id)

    first = await commands.book_slot(
        store, slot_id=slot.id, patient_id="p-retry", idempotency_key="k-1"
    )
    again = await commands.book_slot(
        store, slot_id=slot.id, patient_id="p-retry", idempotency_key="k-1"
    )

    assert again.appointment == first.appointment
    assert first.change is not None
    assert again.change is None  # nothing new to publish on a replay
    assert await appointment_count(db) == 1
    assert await version(db, doctor.id) == before_version + 1
    assert len(await change_log(db, doctor.id)) == len(before_log) + 1


async def test_same_key_concurrently_books_once(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    slot = doctor.slots[0]
    before_version = await version(db, doctor.id)
    before_log = await change_log(db, doctor.id)

    results = await asyncio.gather(
        *(
            commands.book_slot(
                store, slot_id=slot.id, patient_id="p-double-click", idempotency_key="k-dc"
            )
            for _ in range(5)
        )
    )

    assert len({r.appointment.id for r in results}) == 1
    assert len({r.appointment for r in results}) == 1
    assert sum(r.change is not None for r in results) == 1
    assert await appointment_count(db) == 1
    assert await version(db, doctor.id) == before_version + 1
    assert len(await change_log(db, doctor.id)) == len(before_log) + 1


async def test_same_key_for_a_different_slot_is_a_conflict(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    first, other = doctor.slots[0], doctor.slots[5]
    await commands.book_slot(
        store, slot_id=first.id, patient_id="p-reuse", idempotency_key="k-reuse"
    )
    before = await version(db, doctor.id)

    with pytest.raises(IdempotencyConflict) as caught:
        await commands.book_slot(
            store, slot_id=other.id, patient_id="p-reuse", idempotency_key="k-reuse"
        )

    assert caught.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
    assert await slot_status(db, other.id) == SlotStatus.FREE
    assert await appointment_count(db) == 1
    assert await version(db, doctor.id) == before


async def test_same_key_for_two_doctors_at_once_books_only_one(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    """Different doctors' locks do not serialize the two; the key's primary key must."""
    other_doctor = await seed_doctor(store, name="Dr. Other", days=2)
    mine, theirs = doctor.slots[0], other_doctor.slots[0]
    before = {d: await version(db, d) for d in (doctor.id, other_doctor.id)}

    results = await asyncio.gather(
        commands.book_slot(store, slot_id=mine.id, patient_id="p-two", idempotency_key="k-two"),
        commands.book_slot(store, slot_id=theirs.id, patient_id="p-two", idempotency_key="k-two"),
        return_exceptions=True,
    )

    wins, losses = split(results)
    assert len(wins) == 1, results
    assert len(losses) == 1
    assert isinstance(losses[0], IdempotencyConflict), losses[0]
    assert await appointment_count(db) == 1
    won, lost = (doctor.id, other_doctor.id)
    if wins[0].appointment.doctor_id != doctor.id:
        won, lost = lost, won
    # The loser's booking was rolled back with its key: no version, its slot still free.
    assert await version(db, won) == before[won] + 1
    assert await version(db, lost) == before[lost]
    lost_slot = theirs if lost == other_doctor.id else mine
    assert await slot_status(db, lost_slot.id) == SlotStatus.FREE


async def test_keys_belong_to_their_patient(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    first, second = doctor.slots[0], doctor.slots[1]

    a = await commands.book_slot(
        store, slot_id=first.id, patient_id="p-ann", idempotency_key="shared"
    )
    b = await commands.book_slot(
        store, slot_id=second.id, patient_id="p-ben", idempotency_key="shared"
    )

    assert a.appointment.id != b.appointment.id
    assert (a.appointment.patient_id, b.appointment.patient_id) == ("p-ann", "p-ben")
    assert b.change is not None  # a real booking, not a replay of Ann's
    # A third patient with the same key on Ann's slot is not handed Ann's appointment.
    with pytest.raises(SlotTaken):
        await commands.book_slot(
            store, slot_id=first.id, patient_id="p-cat", idempotency_key="shared"
        )
    assert await appointment_count(db) == 2


# ---- refusals --------------------------------------------------------------------------------


async def test_refusals_leave_no_trace(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    blocked, past, future = doctor.slots[0], doctor.slots[1], doctor.slots[2]
    await db.execute("UPDATE slots SET status = 'busy-unavailable' WHERE id = $1", blocked.id)
    before_version = await version(db, doctor.id)
    before_log = await change_log(db, doctor.id)

    with pytest.raises(NotFound) as missing:
        await commands.book_slot(store, slot_id=2**40, patient_id="p-x")
    with pytest.raises(SlotUnavailable) as unavailable:
        await commands.book_slot(store, slot_id=blocked.id, patient_id="p-x")
    with pytest.raises(TooLate) as started:
        await commands.book_slot(store, slot_id=past.id, patient_id="p-x", now=past.start)
    with pytest.raises(TooLate):
        await commands.book_slot(
            store, slot_id=past.id, patient_id="p-x", now=past.end + timedelta(days=1)
        )

    assert missing.value.code is ErrorCode.NOT_FOUND
    assert unavailable.value.code is ErrorCode.SLOT_UNAVAILABLE
    assert started.value.code is ErrorCode.TOO_LATE
    assert await appointment_count(db) == 0
    assert await version(db, doctor.id) == before_version
    assert await change_log(db, doctor.id) == before_log
    assert await slot_status(db, blocked.id) == SlotStatus.BUSY_UNAVAILABLE
    assert await slot_status(db, past.id) == SlotStatus.FREE
    # One microsecond before the start is still in time.
    booked = await commands.book_slot(
        store, slot_id=future.id, patient_id="p-x", now=future.start - timedelta(microseconds=1)
    )
    assert booked.appointment.slot_id == future.id


# ---- the change log --------------------------------------------------------------------------


async def test_each_booking_is_one_version_and_one_public_change(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    patient = "patient-7d1e-very-identifiable"
    for slot in doctor.slots[:3]:
        before_version = await version(db, doctor.id)
        before_log = await change_log(db, doctor.id)

        booking = await commands.book_slot(store, slot_id=slot.id, patient_id=patient)

        after_log = await change_log(db, doctor.id)
        assert await version(db, doctor.id) == before_version + 1
        assert after_log[:-1] == before_log
        new_version, kind, text = after_log[-1]
        assert new_version == before_version + 1
        assert kind == "slot.booked"
        assert patient not in text
        assert "7d1e" not in text
        public = json.loads(text)
        assert public["version"] == new_version
        assert public["doctor_id"] == doctor.id
        assert [(s["id"], s["status"]) for s in public["slots"]] == [(slot.id, "busy")]
        # What was published at commit is byte for byte what the log will replay.
        assert booking.change is not None
        assert booking.change.version == new_version
        assert booking.change.public == public


async def test_change_log_refuses_update_and_delete(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    await commands.book_slot(store, slot_id=doctor.slots[0].id, patient_id="p-audit")
    before = await change_log(db, doctor.id)
    assert len(before) >= 2

    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("UPDATE changes SET kind = 'forged' WHERE doctor_id = $1", doctor.id)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("DELETE FROM changes WHERE doctor_id = $1", doctor.id)

    assert await change_log(db, doctor.id) == before


async def test_snapshot_version_and_changes_between(
    store: Store, doctor: SeededDoctor, db: asyncpg.Connection
) -> None:
    other = await seed_doctor(store, name="Dr. Noise", days=2)
    await commands.book_slot(store, slot_id=other.slots[0].id, patient_id="p-noise")
    start = await version(db, doctor.id)
    booked = [doctor.slots[i] for i in (0, 3, 7)]
    for i, slot in enumerate(booked, start=1):
        await commands.book_slot(store, slot_id=slot.id, patient_id="p-series")
        await commands.book_slot(
            store, slot_id=other.slots[i].id, patient_id="p-noise"
        )  # interleaved

    snapshot = await reads.snapshot(store, doctor.id, doctor.start, doctor.end)
    current = start + len(booked)
    assert snapshot.version == current == await reads.doctor_version(store, doctor.id)
    busy = {s.id for s in snapshot.slots if s.status is SlotStatus.BUSY}
    assert busy == {s.id for s in booked}

    def versions(after: int, upto: int) -> list[int]:
        return [c.version for c in changes[(after, upto)]]

    changes = {
        (a, b): await reads.changes_between(store, doctor.id, a, b)
        for a, b in ((0, current), (start, current), (start, start + 2), (current, current))
    }
    assert versions(0, current) == list(range(1, current + 1))
    assert versions(start, current) == [start + 1, start + 2, start + 3]
    assert versions(start, start + 2) == [start + 1, start + 2]
    assert versions(current, current) == []
    for change in changes[(0, current)]:
        assert change.doctor_id == doctor.id
        assert change.public["doctor_id"] == doctor.id
        assert change.public["version"] == change.version
    replayed = [s["id"] for c in changes[(start, current)] for s in c.public["slots"]]
    assert replayed == [s.id for s in booked]


# ---- the doctor's lock -----------------------------------------------------------------------


@pytest.fixture
async def lock_holder(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_held_doctor_lock_makes_booking_fail_fast_with_busy(
    database_url: str, doctor: SeededDoctor, db: asyncpg.Connection, lock_holder: asyncpg.Connection
) -> None:
    slot = doctor.slots[0]
    other = doctor.slots[1]
    async with open_store(database_url, min_size=1, max_size=2, lock_timeout_ms=200) as store:
        transaction = lock_holder.transaction()
        await transaction.start()
        await lock_holder.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS_DOCTOR, doctor.id)
        try:
            started = time.monotonic()
            with pytest.raises(Busy) as caught:
                await commands.book_slot(store, slot_id=slot.id, patient_id="p-wait")
            elapsed = time.monotonic() - started
        finally:
            await transaction.rollback()

        assert caught.value.code is ErrorCode.BUSY
        assert 0.15 < elapsed < 2.0, elapsed  # it waited for lock_timeout, and no longer
        assert await slot_status(db, slot.id) == SlotStatus.FREE
        # With the lock released the very same call goes through, on a pooled connection
        # that the timeout did not leave in a broken transaction.
        booking = await commands.book_slot(store, slot_id=slot.id, patient_id="p-wait")
        assert booking.appointment.slot_id == slot.id
        await commands.book_slot(store, slot_id=other.id, patient_id="p-wait-2")


async def test_booking_waits_for_the_doctor_lock_and_only_that_doctors(
    database_url: str,
    store: Store,
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    lock_holder: asyncpg.Connection,
) -> None:
    neighbour = await seed_doctor(store, name="Dr. Neighbour", days=2)
    slot = doctor.slots[0]
    async with open_store(database_url, min_size=1, max_size=4, lock_timeout_ms=10_000) as patient:
        transaction = lock_holder.transaction()
        await transaction.start()
        await lock_holder.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS_DOCTOR, doctor.id)
        try:
            queued = asyncio.create_task(
                commands.book_slot(patient, slot_id=slot.id, patient_id="p-queued")
            )
            await waiting_for_doctor_lock(db, doctor.id)
            # Another doctor's calendar is not held up by this one's lock.
            elsewhere = await commands.book_slot(
                patient, slot_id=neighbour.slots[0].id, patient_id="p-free"
            )
            assert elsewhere.appointment.doctor_id == neighbour.id
            assert not queued.done()
            assert await slot_status(db, slot.id) == SlotStatus.FREE
        finally:
            await transaction.rollback()
        booking = await asyncio.wait_for(queued, 10)

    assert booking.appointment.slot_id == slot.id
    assert await slot_status(db, slot.id) == SlotStatus.BUSY


async def test_a_slot_already_booked_is_refused_without_queueing_but_a_replay_queues(
    database_url: str,
    store: Store,
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    lock_holder: asyncpg.Connection,
) -> None:
    """A stampede's losers must not wait behind the hot doctor's lock only to be refused:
    a slot booked before the request began is `slot_taken` at once, lock held or not. The
    winner's retry (its idempotency key stored) still goes the whole way, under the lock,
    for its stored reply."""
    slot = doctor.slots[0]
    first = await commands.book_slot(store, slot_id=slot.id, patient_id="p-1", idempotency_key="k")
    async with open_store(database_url, min_size=1, max_size=2, lock_timeout_ms=10_000) as other:
        transaction = lock_holder.transaction()
        await transaction.start()
        await lock_holder.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS_DOCTOR, doctor.id)
        try:
            with pytest.raises(SlotTaken):  # not Busy after 10 s: the lock was never asked for
                await asyncio.wait_for(
                    commands.book_slot(other, slot_id=slot.id, patient_id="p-2"), 5
                )
            replay = asyncio.create_task(
                commands.book_slot(other, slot_id=slot.id, patient_id="p-1", idempotency_key="k")
            )
            await waiting_for_doctor_lock(db, doctor.id)
            assert not replay.done()
        finally:
            await transaction.rollback()
        again = await asyncio.wait_for(replay, 10)
    assert again.appointment == first.appointment
    assert [r["patient_id"] for r in await active_appointments(db, slot.id)] == ["p-1"]
