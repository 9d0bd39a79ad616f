"""The folded statements of a command keep the discipline of `runner.run`.

A booking is fewer round trips than it was: the doctor is found and locked in one
statement, and one read under the lock fetches the versions, the expired-hold check,
the idempotency record and the slot; the writes end in one statement. These tests
pin what that must not change: a replay returns the first result before anything
else happens, expired holds are cleared before the slot is judged (so the early read
of the slot is never trusted after a write), a hold takes the doctor's lock before
the patient's, and not_found stays not_found.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from protocol.errors import ErrorCode
from protocol.messages import Book, Booked, Cancel, Hold, Release, SlotView
from protocol.vocabulary import AppointmentStatus, SlotStatus
from store import commands, pool, reads, sql, steps
from store.changes import Change
from store.constants import LOCK_NS_DOCTOR, LOCK_NS_PATIENT
from store.errors import NotFound, SlotTaken, SlotUnavailable, StoreError, TooLate
from store.pool import Store, open_store
from store.tx import Limits, Tx
from testkit.engine import (
    NOW,
    TTL,
    appointment_row,
    book,
    db_state,
    hold,
    open_calendar,
    patient,
    public_slots,
    slot_row,
    version,
)


async def test_a_retry_returns_the_first_booking_even_after_the_slot_changed_hands(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    slot = calendar.slots[0]
    ann, bob = patient("p-ann"), patient("p-bob")
    first = await commands.book(
        store, ann, Book(slot_id=slot.id, idempotency_key="k-1"), limits=None, now=NOW
    )
    assert isinstance(first.reply, Booked)
    await commands.cancel(
        store, ann, Cancel(first.reply.appointment.id, "changed my mind"), now=NOW
    )
    await book(store, bob, slot)  # the slot is Bob's now
    state = await db_state(db)

    again = await commands.book(
        store, ann, Book(slot_id=slot.id, idempotency_key="k-1"), limits=None, now=NOW
    )

    # The stored reply, not slot_taken: the key is looked up before the slot is judged.
    assert again.reply == first.reply
    assert again.changes == []
    assert await db_state(db) == state


async def test_a_replay_returns_before_expired_holds_are_cleared(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    ann, bob = patient("p-ann"), patient("p-bob")
    request = Book(slot_id=calendar.slots[0].id, idempotency_key="k-2")
    first = await commands.book(store, ann, request, limits=None, now=NOW)
    held = await hold(store, bob, calendar.slots[1])
    state = await db_state(db)

    # Bob's hold has expired, but a replay writes nothing, not even the expiry.
    again = await commands.book(store, ann, request, limits=None, now=NOW + TTL)

    assert again.reply == first.reply
    assert again.changes == []
    assert await db_state(db) == state
    assert (await appointment_row(db, held.id))["status"] == "pending"


@pytest.mark.parametrize("command", ["book", "hold"])
async def test_an_expired_hold_is_cleared_before_the_slot_is_checked(
    store: Store, db: asyncpg.Connection, command: str
) -> None:
    calendar = await open_calendar(store)
    slot = calendar.slots[0]
    ann, bob = patient("p-ann"), patient("p-bob")
    held = await hold(store, ann, slot)
    before = await version(db, calendar.id)
    published: list[list[Change]] = []
    store.on_commit = published.append
    # Still held a microsecond before the expiry.
    with pytest.raises(SlotTaken):
        await book(store, bob, slot, now=NOW + TTL - timedelta(microseconds=1))

    # At the expiry the slot read with the first statement is still busy-tentative; the
    # command must free the hold first and judge the slot as it is then.
    if command == "book":
        taken = await book(store, bob, slot, now=NOW + TTL)
        status = SlotStatus.BUSY
    else:
        taken = await hold(store, bob, slot, now=NOW + TTL)
        status = SlotStatus.BUSY_TENTATIVE

    assert taken.patient_id == "p-bob"
    row = await appointment_row(db, held.id)
    assert (row["status"], row["cancel_reason"]) == ("cancelled", "hold expired")
    assert (await slot_row(db, slot.id))["status"] == status.value
    # One version for both: the expiry and the booking committed together.
    assert await version(db, calendar.id) == before + 1
    [[change]] = published
    assert change.version == before + 1
    assert public_slots(change)[slot.id].status is status
    kinds = "hold.expired+" + ("slot.booked" if command == "book" else "slot.held")
    log = await reads.change_log(store, calendar.id)
    assert (log[-1]["version"], log[-1]["kind"]) == (before + 1, kinds)
    assert [a["id"] for a in change.private.appointments] == [held.id, taken.id]


async def test_an_expired_hold_no_longer_keeps_its_buffer(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store, days=2, buffer_minutes=15)
    first = calendar.slots[0]  # 08:00-08:30
    # A slot closer than the buffer, as an older schedule may have left one.
    start = first.end + timedelta(minutes=5)
    close_id = await db.fetchval(
        "INSERT INTO slots (doctor_id, starts_at, ends_at) VALUES ($1, $2, $3) RETURNING id",
        calendar.id,
        start,
        start + timedelta(minutes=30),
    )
    close = SlotView(close_id, start, start + timedelta(minutes=30), SlotStatus.FREE)
    await hold(store, patient("p-ann"), first)
    with pytest.raises(SlotUnavailable) as caught:
        await book(store, patient("p-bob"), close, now=NOW + TTL - timedelta(microseconds=1))
    assert caught.value.code is ErrorCode.SLOT_UNAVAILABLE

    # Once Ann's hold has expired, the buffer check must not use the answer read before
    # the expiry was written.
    booked = await book(store, patient("p-bob"), close, now=NOW + TTL)

    assert booked.status is AppointmentStatus.BOOKED
    assert (await slot_row(db, first.id))["status"] == "free"


async def test_an_unknown_slot_or_hold_is_not_found_and_writes_nothing(
    store: Store, db: asyncpg.Connection
) -> None:
    await open_calendar(store)
    state = await db_state(db)
    ann = patient("p-ann")

    with pytest.raises(NotFound) as no_slot:
        await commands.book(
            store, ann, Book(slot_id=10**9, idempotency_key="k-3"), limits=None, now=NOW
        )
    with pytest.raises(NotFound) as no_hold:
        await commands.book(
            store, ann, Book(hold_id=10**9, idempotency_key="k-4"), limits=None, now=NOW
        )
    with pytest.raises(NotFound):
        await commands.hold(
            store, ann, Hold(10**9, "k-5"), ttl=TTL, max_holds=5, limits=None, now=NOW
        )

    assert no_slot.value.code is ErrorCode.NOT_FOUND
    assert no_hold.value.code is ErrorCode.NOT_FOUND
    assert await db_state(db) == state


async def test_a_hold_takes_the_doctors_lock_before_the_patients(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    ann = patient("p-ann")
    blocker = await db.fetchval("SELECT pg_backend_pid()")
    async with db.transaction():
        # Someone holds Ann's lock: her hold must wait for it with the doctor's lock taken.
        await db.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", LOCK_NS_PATIENT, "p-ann")
        task = asyncio.create_task(hold(store, ann, calendar.slots[0]))
        locks: list[asyncpg.Record] = []
        for _ in range(200):
            locks = await db.fetch(
                "SELECT classid, objid, granted FROM pg_locks"
                " WHERE locktype = 'advisory' AND pid <> $1",
                blocker,
            )
            if any(not r["granted"] for r in locks):
                break
            await asyncio.sleep(0.01)
        held = {(r["classid"], r["objid"], r["granted"]) for r in locks}
        patient_key = await db.fetchval("SELECT hashtext('p-ann')")
        assert (LOCK_NS_DOCTOR, calendar.id, True) in held
        assert (LOCK_NS_PATIENT, patient_key & 0xFFFFFFFF, False) in held
        assert not task.done()
    appointment = await task
    assert appointment.status is AppointmentStatus.PENDING


async def test_pooled_connections_come_back_without_locks_or_transactions(
    store: Store, db: asyncpg.Connection
) -> None:
    """The pool skips asyncpg's reset query after ordinary commands: nothing may linger."""
    calendar = await open_calendar(store)
    ann, bob = patient("p-ann"), patient("p-bob")
    await hold(store, ann, calendar.slots[0])
    await book(store, ann, calendar.slots[1])
    with pytest.raises(SlotTaken):
        await book(store, bob, calendar.slots[1])  # refused: its transaction rolls back

    lingering = await db.fetch(
        "SELECT l.pid, l.locktype, a.state FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE a.application_name = 'slotcast'"
        "   AND (l.locktype = 'advisory' OR a.state <> 'idle')"
    )
    assert lingering == []
    assert (await book(store, bob, calendar.slots[2])).patient_id == "p-bob"


async def test_a_session_lock_never_outlives_its_checkout(
    store: Store, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make `exclusive` forget to unlock, as if its unlock had been cancelled: the full reset
    # that its connection gets on release must still free the lock.
    monkeypatch.setattr("store.runner.sql.SESSION_UNLOCK", "SELECT $1::int4, $2::int4")
    async with pool.exclusive(store, 0x5C99, 7):
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"
            " AND objid = 7",
            0x5C99,
        )
        assert held == 1

    free = await db.fetchval("SELECT pg_try_advisory_lock($1::int4, 7)", 0x5C99)
    assert free
    await db.execute("SELECT pg_advisory_unlock($1::int4, 7)", 0x5C99)


@pytest.mark.parametrize("command", ["book", "hold"])
async def test_a_refusal_after_the_first_reads_insert_rolls_it_back(
    store: Store, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The first read inserts the appointment when its SQL checks pass; the Python checks
    still decide. Were they ever stricter, their refusal must undo that insert."""
    calendar = await open_calendar(store)
    state = await db_state(db)
    original = steps.bookable_slot

    async def stricter(tx: Tx, slot_id: int, *, moving: int | None = None) -> Any:
        await original(tx, slot_id, moving=moving)
        assert tx.taken is not None  # the first read did insert
        raise TooLate("a rule only Python knows")

    monkeypatch.setattr(steps, "bookable_slot", stricter)
    take = book if command == "book" else hold
    with pytest.raises(TooLate):
        await take(store, patient("p-ann"), calendar.slots[0])

    assert await db_state(db) == state


async def test_confirming_a_hold_while_another_has_expired_frees_that_one_first(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    ann, bob = patient("p-ann"), patient("p-bob")
    expired = await hold(store, ann, calendar.slots[0])
    later = NOW + TTL / 2
    bobs = await hold(store, bob, calendar.slots[1], now=later)
    before = await version(db, calendar.id)

    # Ann's hold has expired, Bob's has not: the appointment read first is re-read after
    # the expiry is written, and the confirm goes on.
    outcome = await commands.book(store, bob, Book(hold_id=bobs.id), limits=None, now=NOW + TTL)

    assert isinstance(outcome.reply, Booked)
    assert outcome.reply.appointment.status is AppointmentStatus.BOOKED
    assert (await appointment_row(db, expired.id))["status"] == "cancelled"
    assert (await slot_row(db, calendar.slots[0].id))["status"] == "free"
    assert (await slot_row(db, calendar.slots[1].id))["status"] == "busy"
    [change] = outcome.changes
    assert change.version == before + 1 == await version(db, calendar.id)
    log = await reads.change_log(store, calendar.id)
    assert log[-1]["kind"] == "hold.expired+slot.booked"


async def test_round_trips_of_a_booking_a_hold_and_a_confirm(database_url: str) -> None:
    """What the folding bought, pinned: every statement the pool's one connection runs,
    its reset on release included, for each command (docs/benchmarks.md counts 14, 16
    and 15 before), under the patient's limits as the server passes them. Those cost no
    round trip: the first read counts them with the slot, and a direct booking takes the
    patient's lock in its locking statement (SLOT_DOCTOR_PATIENT_LOCK, as a hold always
    did) instead of SLOT_DOCTOR_LOCK. A refusal at a limit is a rollback after that read;
    a slot already booked is refused by the locking statement itself, before its locks."""
    names = {v: k for k, v in vars(sql).items() if k.isupper() and isinstance(v, str)}
    limits = Limits(per_doctor=2, total=6, cooldown=timedelta(minutes=5))
    async with open_store(database_url, min_size=1, max_size=1) as store:
        calendar = await open_calendar(store)
        sent: list[str] = []
        async with store.pool.acquire() as conn:
            conn.add_query_logger(lambda q: sent.append(names.get(q.query, q.query.strip())))
        ann, bob = patient("p-ann"), patient("p-bob")

        refusals: list[ErrorCode] = []

        async def statements(run: Awaitable[object]) -> list[str]:
            sent.clear()
            try:
                await run
            except StoreError as exc:
                refusals.append(exc.code)
            return list(sent)

        free, held = calendar.slots[0], calendar.slots[1]
        request = Book(slot_id=free.id, idempotency_key="k-7")
        lock, first = "SLOT_DOCTOR_PATIENT_LOCK", "SLOT_PRELUDE"
        refused = ["BEGIN;", lock, first, "ROLLBACK;"]
        assert await statements(commands.book(store, ann, request, limits=limits, now=NOW)) == [
            *("BEGIN;", lock, first, "RECORD", "COMMIT;")
        ]
        assert await statements(commands.book(store, ann, request, limits=limits, now=NOW)) == [
            *("BEGIN;", lock, first, "COMMIT;")  # the replay
        ]
        # Already booked when the locking statement began: refused there, without the locks.
        taken = ["BEGIN;", lock, "ROLLBACK;"]
        assert await statements(book(store, bob, free, limits=limits)) == taken  # slot_taken
        assert await statements(hold(store, bob, held, limits=limits)) == [
            *("BEGIN;", lock, first, "RECORD", "COMMIT;")
        ]
        hold_id = (await reads.patient_appointments(store, "p-bob", now=NOW))[0].id
        assert await statements(
            commands.book(store, bob, Book(hold_id=hold_id), limits=limits, now=NOW)
        ) == [
            *("BEGIN;", "APPOINTMENT_DOCTOR_LOCK", "APPOINTMENT_PRELUDE", "HOLD_CONFIRM"),
            *("RECORD", "COMMIT;"),
        ]
        # Without limits (seeding, benchmarks) a booking takes only the doctor's lock.
        assert await statements(book(store, bob, calendar.slots[2])) == [
            *("BEGIN;", "SLOT_DOCTOR_LOCK", first, "RECORD", "COMMIT;")
        ]
        assert await statements(book(store, bob, calendar.slots[3], limits=limits)) == refused
        again = await hold(store, ann, calendar.slots[4], limits=limits)
        await commands.release(store, ann, Release(again.id), now=NOW)
        assert await statements(hold(store, ann, calendar.slots[4], limits=limits)) == refused
        assert refusals == [ErrorCode.SLOT_TAKEN, ErrorCode.APPOINTMENT_LIMIT, ErrorCode.COOLDOWN]
