"""The booking engine, rule by rule, against a real database and an explicit clock.

Every command runs under the doctors' locks and re-checks its rules there, so
these tests drive the store directly: they pin the clock with `now=` (a hold
expires because the clock moved, never because the test slept), and after each
refusal they look behind the store's back to prove that nothing leaked out of
the rolled-back savepoint except what must commit (expired holds).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from protocol.errors import ErrorCode
from protocol.messages import (
    AppointmentUpdated,
    AppointmentView,
    Block,
    Book,
    Booked,
    Cancel,
    Held,
    Hold,
    Mark,
    Message,
    Release,
    Reschedule,
    Rescheduled,
    ScheduleUpdated,
    SetSchedule,
    SlotUpdated,
    SlotView,
    Unblock,
    WeeklyBlock,
)
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from store import commands, doctors, reads
from store.changes import Change
from store.errors import (
    Forbidden,
    HoldExpired,
    HoldLimit,
    IdempotencyConflict,
    InvalidTransition,
    NotHolder,
    OutsideHorizon,
    SlotTaken,
    SlotUnavailable,
    StoreError,
    TooLate,
)
from store.pool import Store, open_store
from store.tx import Actor, Outcome
from testkit.engine import (
    DAY,
    NOW,
    TTL,
    Calendar,
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
from testkit.fixtures import EVERY_DAY

ADMIN = Actor("admin-ops", Role.ADMIN)
OPEN_ALL_DAY = [WeeklyBlock(d, time(8), time(18)) for d in range(1, 8)]


# ---- helpers ---------------------------------------------------------------------------------


def doctor_of(calendar: Calendar) -> Actor:
    return Actor(str(calendar.id), Role.DOCTOR)


async def mark(
    store: Store,
    who: Actor,
    appointment: AppointmentView,
    status: AppointmentStatus,
    *,
    now: datetime = NOW,
) -> AppointmentView:
    outcome = await commands.mark(store, who, Mark(appointment.id, status), now=now)
    assert isinstance(outcome.reply, AppointmentUpdated)
    return outcome.reply.appointment


async def change_count(db: asyncpg.Connection, doctor_id: int | None = None) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM changes WHERE $1::int IS NULL OR doctor_id = $1", doctor_id
    )
    return count


async def snapshot_slot(store: Store, doctor_id: int, slot_id: int) -> SlotView | None:
    snapshot = await reads.snapshot(store, doctor_id, DAY, DAY + timedelta(days=8), now=NOW)
    return next((s for s in snapshot.slots if s.id == slot_id), None)


# ---- holds -----------------------------------------------------------------------------------


async def test_a_hold_shows_the_slot_tentative_with_its_expiry(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    slot = calendar.slots[0]

    outcome = await commands.hold(
        store, patient("p-ann"), Hold(slot.id), ttl=TTL, max_holds=2, limits=None, now=NOW
    )

    assert isinstance(outcome.reply, Held)
    held = outcome.reply.appointment
    assert (held.slot_id, held.patient_id, held.status) == (slot.id, "p-ann", "pending")
    assert held.hold_expires_at == NOW + TTL
    tentative = SlotView(slot.id, slot.start, slot.end, SlotStatus.BUSY_TENTATIVE, NOW + TTL)
    [change] = outcome.changes
    assert public_slots(change) == {slot.id: tentative}
    assert change.version == await version(db, calendar.id)
    # Watchers joining later see the same thing, expiry included, so they can count down.
    assert await snapshot_slot(store, calendar.id, slot.id) == tentative


async def test_the_holder_confirms_and_the_slot_turns_busy(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    slot = calendar.slots[0]
    held = await hold(store, patient("p-ann"), slot)

    outcome = await commands.book(
        store, patient("p-ann"), Book(hold_id=held.id), limits=None, now=NOW + timedelta(seconds=60)
    )

    assert isinstance(outcome.reply, Booked)
    booked = outcome.reply.appointment
    assert (booked.id, booked.slot_id, booked.status) == (held.id, slot.id, "booked")
    assert booked.hold_expires_at is None
    busy = SlotView(slot.id, slot.start, slot.end, SlotStatus.BUSY)
    [change] = outcome.changes
    assert public_slots(change) == {slot.id: busy}
    assert await snapshot_slot(store, calendar.id, slot.id) == busy
    # A booking never expires: the sweep long after the hold's time leaves it alone.
    assert await commands.expire_holds(store, now=NOW + timedelta(hours=1)) == []
    assert (await appointment_row(db, held.id))["status"] == "booked"


async def test_only_the_holder_may_confirm_or_release(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store)
    held = await hold(store, patient("p-ann"), calendar.slots[0])
    before = await db_state(db)

    with pytest.raises(NotHolder) as confirm:
        await commands.book(store, patient("p-bob"), Book(hold_id=held.id), limits=None, now=NOW)
    with pytest.raises(NotHolder):
        await commands.release(store, patient("p-bob"), Release(held.id), now=NOW)

    assert confirm.value.code is ErrorCode.NOT_HOLDER
    assert await db_state(db) == before
    assert (await appointment_row(db, held.id))["status"] == "pending"


async def test_confirming_after_expiry_is_refused_but_the_expiry_commits(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    early, late = calendar.slots[0], calendar.slots[1]
    ann = patient("p-ann")
    in_time = await hold(store, ann, early)
    too_late = await hold(store, ann, late)
    published: list[list[Change]] = []
    store.on_commit = published.append

    # One microsecond before the expiry is still in time.
    await commands.book(
        store, ann, Book(hold_id=in_time.id), limits=None, now=NOW + TTL - timedelta(microseconds=1)
    )
    before = await version(db, calendar.id)
    published.clear()

    with pytest.raises(HoldExpired) as caught:
        await commands.book(store, ann, Book(hold_id=too_late.id), limits=None, now=NOW + TTL)

    assert caught.value.code is ErrorCode.HOLD_EXPIRED
    row = await appointment_row(db, too_late.id)
    assert (row["status"], row["cancel_reason"]) == ("cancelled", "hold expired")
    assert row["cancelled_at"] == NOW + TTL
    # The row keeps when it lapsed (the re-hold cool-down counts from it); no view shows it.
    assert row["hold_expires_at"] == NOW + TTL
    assert (await slot_row(db, late.id))["status"] == "free"
    # The refusal rolled back only the confirm: the expiry is one committed, published version.
    assert await version(db, calendar.id) == before + 1
    [[change]] = published
    assert change.version == before + 1
    assert public_slots(change) == {
        late.id: SlotView(late.id, late.start, late.end, SlotStatus.FREE)
    }
    [lapsed] = change.private.appointments
    assert (lapsed["status"], lapsed["hold_expires_at"]) == ("cancelled", None)
    # And it stays told apart from a release: confirming or releasing it again says so.
    with pytest.raises(HoldExpired):
        await commands.release(store, ann, Release(too_late.id), now=NOW + TTL)
    log = await reads.change_log(store, calendar.id)
    assert (log[-1]["version"], log[-1]["kind"]) == (before + 1, "hold.expired")
    assert await snapshot_slot(store, calendar.id, late.id) == public_slots(change)[late.id]
    # The slot really is free: someone else can take it now.
    assert (await hold(store, patient("p-bob"), late, now=NOW + TTL)).patient_id == "p-bob"


async def test_release_gives_the_slot_back(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store)
    slot = calendar.slots[0]
    ann = patient("p-ann")
    held = await hold(store, ann, slot)
    released_at = NOW + timedelta(seconds=30)

    outcome = await commands.release(store, ann, Release(held.id), now=released_at)

    assert isinstance(outcome.reply, AppointmentUpdated)
    released = outcome.reply.appointment
    assert (released.id, released.status, released.cancel_reason) == (
        held.id,
        "cancelled",
        "released",
    )
    assert released.cancelled_at == released_at
    free = SlotView(slot.id, slot.start, slot.end, SlotStatus.FREE)
    [change] = outcome.changes
    assert public_slots(change) == {slot.id: free}
    # A hold given back shows no expiry any more, in the reply and in what goes live; the
    # row keeps it for the re-hold cool-down.
    assert released.hold_expires_at is None
    assert (await appointment_row(db, held.id))["hold_expires_at"] is not None
    [live] = change.private.appointments
    assert (live["id"], live["hold_expires_at"]) == (held.id, None)
    assert await snapshot_slot(store, calendar.id, slot.id) == free
    # A released hold is gone: neither released again nor confirmed.
    with pytest.raises(InvalidTransition):
        await commands.release(store, ann, Release(held.id), now=released_at)
    with pytest.raises(InvalidTransition):
        await commands.book(store, ann, Book(hold_id=held.id), limits=None, now=released_at)


async def test_the_hold_limit_counts_only_active_holds(
    store: Store, db: asyncpg.Connection
) -> None:
    first = await open_calendar(store, name="Dr. First")
    second = await open_calendar(store, name="Dr. Second")
    ann = patient("p-ann")
    await hold(store, ann, first.slots[0], max_holds=2)
    await hold(store, ann, first.slots[1], max_holds=2)

    with pytest.raises(HoldLimit) as caught:
        await hold(store, ann, first.slots[2], max_holds=2)
    with pytest.raises(HoldLimit):
        await hold(store, ann, second.slots[0], max_holds=2)

    assert caught.value.code is ErrorCode.HOLD_LIMIT
    assert (await slot_row(db, first.slots[2].id))["status"] == "free"
    # The limit is per patient: Bob is not held back by Ann's holds.
    await hold(store, patient("p-bob"), first.slots[2], max_holds=2)
    # Once Ann's holds have expired they stop counting, even before any sweep frees them:
    # holding on the second doctor sweeps only that doctor, so the first's are still pending.
    later = NOW + TTL
    renewed = await hold(store, ann, second.slots[0], max_holds=2, now=later)
    assert renewed.status is AppointmentStatus.PENDING
    pending = await db.fetchval(
        "SELECT count(*) FROM appointments WHERE patient_id = 'p-ann' AND status = 'pending'"
        " AND doctor_id = $1",
        first.id,
    )
    assert pending == 2


async def test_concurrent_holds_on_many_doctors_cannot_beat_the_limit(
    store: Store, db: asyncpg.Connection
) -> None:
    """Each hold takes a different doctor's lock; only the patient's lock serializes them."""
    calendars = [await open_calendar(store, name=f"Dr. {i}", days=1) for i in range(5)]

    results = await asyncio.gather(
        *(hold(store, patient("p-greedy"), c.slots[0], max_holds=2) for c in calendars),
        return_exceptions=True,
    )

    held = [r for r in results if isinstance(r, AppointmentView)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(held) == 2, results
    assert len(refused) == 3
    assert all(isinstance(r, HoldLimit) for r in refused), refused
    count = await db.fetchval(
        "SELECT count(*) FROM appointments WHERE patient_id = 'p-greedy' AND status = 'pending'"
    )
    assert count == 2
    tentative = await db.fetchval("SELECT count(*) FROM slots WHERE status = 'busy-tentative'")
    assert tentative == 2


async def test_expire_holds_frees_every_expired_hold_once_per_doctor(
    store: Store, db: asyncpg.Connection
) -> None:
    calendars = [await open_calendar(store, name=f"Dr. {i}", days=1) for i in range(3)]
    expiring = [
        (calendars[0], calendars[0].slots[0], "p-ann"),
        (calendars[0], calendars[0].slots[1], "p-bob"),
        (calendars[1], calendars[1].slots[0], "p-ann"),
        (calendars[2], calendars[2].slots[0], "p-cat"),
    ]
    for _, slot, who in expiring:
        await hold(store, patient(who), slot)
    lasting = await hold(store, patient("p-dan"), calendars[1].slots[1], ttl=timedelta(hours=1))
    before = {c.id: await version(db, c.id) for c in calendars}

    changes = await commands.expire_holds(store, now=NOW + TTL)

    assert sorted(c.doctor_id for c in changes) == sorted(before)
    for change in changes:
        assert change.version == before[change.doctor_id] + 1
        assert await version(db, change.doctor_id) == change.version
        freed = {s.id for s in public_slots(change).values() if s.status is SlotStatus.FREE}
        assert freed == {slot.id for c, slot, _ in expiring if c.id == change.doctor_id}
        [row] = [
            r
            for r in await reads.change_log(store, change.doctor_id)
            if r["version"] == change.version
        ]
        assert (row["kind"], row["actor"]) == ("hold.expired", "admin:system")
    for _, slot, _ in expiring:
        assert (await slot_row(db, slot.id))["status"] == "free"
    # The hold with time left keeps its slot; a second sweep finds nothing to do.
    assert (await appointment_row(db, lasting.id))["status"] == "pending"
    assert (await slot_row(db, lasting.slot_id))["status"] == "busy-tentative"
    assert await commands.expire_holds(store, now=NOW + TTL) == []


async def test_a_hold_needs_a_free_offered_slot(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store)
    booked, held, blocked = calendar.at(0, 8), calendar.at(0, 9), calendar.at(0, 10)
    retired = calendar.at(1, 17)
    await book(store, patient("p-ann"), booked)
    await hold(store, patient("p-bob"), held)
    await commands.block(store, doctor_of(calendar), Block(blocked.id), now=NOW)
    shorter = [WeeklyBlock(d, time(8), time(12)) for d in range(1, 8)]
    await commands.set_schedule(
        store, doctor_of(calendar), SetSchedule(calendar.id, shorter, horizon_days=4), now=NOW
    )
    assert (await slot_row(db, retired.id))["retired_at"] == NOW
    before = await db_state(db)

    refusals: dict[str, type[StoreError]] = {}
    for name, slot in {
        "busy": booked,
        "held": held,
        "blocked": blocked,
        "retired": retired,
    }.items():
        with pytest.raises(StoreError) as caught:
            await hold(store, patient("p-cat"), slot)
        refusals[name] = type(caught.value)

    assert refusals == {
        "busy": SlotTaken,
        "held": SlotTaken,
        "blocked": SlotUnavailable,
        "retired": SlotUnavailable,
    }
    assert await db_state(db) == before


# ---- notice and horizon ----------------------------------------------------------------------


async def test_minimum_notice_refuses_a_slot_too_soon(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store)
    await commands.set_schedule(
        store,
        doctor_of(calendar),
        SetSchedule(calendar.id, OPEN_ALL_DAY, min_notice_minutes=60, horizon_days=4),
        now=NOW,
    )
    slot = calendar.at(1, 10)
    soon = slot.start - timedelta(minutes=30)
    before = await db_state(db)

    with pytest.raises(TooLate) as booking:
        await book(store, patient("p-ann"), slot, now=soon)
    with pytest.raises(TooLate):
        await hold(store, patient("p-ann"), slot, now=soon)

    assert booking.value.code is ErrorCode.TOO_LATE
    assert await db_state(db) == before
    snapshot = await reads.snapshot(store, calendar.id, DAY, DAY + timedelta(days=2), now=soon)
    assert snapshot.bookable_from == soon + timedelta(minutes=60)
    # Exactly the notice ahead is enough.
    booked = await book(store, patient("p-ann"), slot, now=slot.start - timedelta(minutes=60))
    assert booked.slot_id == slot.id


async def test_the_horizon_refuses_a_slot_too_far_ahead(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store, days=3)
    # Slots five days out exist (opened as of a later day) but are beyond a 3-day horizon now.
    await commands.materialize_slots(store, calendar.id, today=DAY + timedelta(days=5), now=NOW)
    far_snapshot = await reads.snapshot(
        store, calendar.id, DAY + timedelta(days=5), DAY + timedelta(days=6), now=NOW
    )
    far = far_snapshot.slots[0]
    assert far.start - NOW > timedelta(days=5)
    before = await db_state(db)

    with pytest.raises(OutsideHorizon) as booking:
        await book(store, patient("p-ann"), far)
    with pytest.raises(OutsideHorizon):
        await hold(store, patient("p-ann"), far)

    assert booking.value.code is ErrorCode.OUTSIDE_HORIZON
    assert await db_state(db) == before
    assert far_snapshot.bookable_until == NOW + timedelta(days=3)
    # The horizon's edge: a slot exactly three days ahead is out, a microsecond less is in.
    edge = calendar.at(2, 8)
    with pytest.raises(OutsideHorizon):
        await book(store, patient("p-ann"), edge, now=edge.start - timedelta(days=3))
    in_time = edge.start - timedelta(days=3) + timedelta(microseconds=1)
    assert (await book(store, patient("p-ann"), edge, now=in_time)).slot_id == edge.id


# ---- buffer ----------------------------------------------------------------------------------


async def test_the_buffer_keeps_other_appointments_away(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store, days=2, buffer_minutes=15)
    first, second, third = calendar.slots[:3]
    # The schedule itself lays slots a buffer apart...
    assert [s.start.time() for s in (first, second, third)] == [time(8), time(8, 45), time(9, 30)]
    ann = await book(store, patient("p-ann"), second)  # 08:45-09:15
    # ...so neighbours closer than the buffer can only come from elsewhere (an older schedule).
    insert = "INSERT INTO slots (doctor_id, starts_at, ends_at) VALUES ($1, $2, $3) RETURNING id"
    close_after = second.end + timedelta(minutes=5)
    close_before = second.start - timedelta(minutes=40)
    after_id = await db.fetchval(
        insert, calendar.id, close_after, close_after + timedelta(minutes=30)
    )
    before_id = await db.fetchval(
        insert, calendar.id, close_before, close_before + timedelta(minutes=30)
    )
    after = SlotView(after_id, close_after, close_after + timedelta(minutes=30), SlotStatus.FREE)
    before = SlotView(
        before_id, close_before, close_before + timedelta(minutes=30), SlotStatus.FREE
    )
    state = await db_state(db)

    with pytest.raises(SlotUnavailable) as booking:
        await book(store, patient("p-bob"), after)
    with pytest.raises(SlotUnavailable):
        await hold(store, patient("p-bob"), before)

    assert booking.value.code is ErrorCode.SLOT_UNAVAILABLE
    assert await db_state(db) == state
    # A slot exactly the buffer away is fine.
    assert (await book(store, patient("p-bob"), third)).slot_id == third.id
    # Moving an appointment into its own buffer is fine: the one being moved does not count.
    outcome = await commands.reschedule(
        store, patient("p-ann"), Reschedule(ann.id, before.id), limits=None, now=NOW
    )
    assert isinstance(outcome.reply, Rescheduled)
    assert outcome.reply.appointment.slot_id == before.id


# ---- cancel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["patient", "doctor", "admin"])
async def test_cancel_by_the_patient_the_doctor_or_an_admin(
    store: Store, db: asyncpg.Connection, who: str
) -> None:
    calendar = await open_calendar(store)
    slot = calendar.slots[0]
    appointment = await book(store, patient("p-ann"), slot)
    actor = {"patient": patient("p-ann"), "doctor": doctor_of(calendar), "admin": ADMIN}[who]
    at = NOW + timedelta(minutes=5)

    outcome = await commands.cancel(store, actor, Cancel(appointment.id, "feeling better"), now=at)

    assert isinstance(outcome.reply, AppointmentUpdated)
    cancelled = outcome.reply.appointment
    assert (cancelled.id, cancelled.status, cancelled.cancel_reason) == (
        appointment.id,
        "cancelled",
        "feeling better",
    )
    assert cancelled.cancelled_at == at
    assert (await appointment_row(db, appointment.id))["cancelled_by"] == str(actor)
    free = SlotView(slot.id, slot.start, slot.end, SlotStatus.FREE)
    [change] = outcome.changes
    assert public_slots(change) == {slot.id: free}
    assert await snapshot_slot(store, calendar.id, slot.id) == free


async def test_cancel_by_someone_else_is_forbidden(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store, name="Dr. Mine")
    other = await open_calendar(store, name="Dr. Other", days=1)
    appointment = await book(store, patient("p-ann"), calendar.slots[0])
    before = await db_state(db)

    for intruder in (patient("p-bob"), doctor_of(other)):
        with pytest.raises(Forbidden) as caught:
            await commands.cancel(store, intruder, Cancel(appointment.id, "mine now"), now=NOW)
        assert caught.value.code is ErrorCode.FORBIDDEN

    assert await db_state(db) == before


async def test_only_a_booked_appointment_can_be_cancelled(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    held = await hold(store, patient("p-ann"), calendar.slots[0])
    arrived = await book(store, patient("p-bob"), calendar.slots[1])
    await mark(store, doctor_of(calendar), arrived, AppointmentStatus.ARRIVED)
    gone = await book(store, patient("p-cat"), calendar.slots[2])
    await commands.cancel(store, patient("p-cat"), Cancel(gone.id, "first time"), now=NOW)
    before = await db_state(db)

    for who, appointment in (("p-ann", held), ("p-bob", arrived), ("p-cat", gone)):
        with pytest.raises(InvalidTransition) as caught:
            await commands.cancel(store, patient(who), Cancel(appointment.id, "again"), now=NOW)
        assert caught.value.code is ErrorCode.INVALID_TRANSITION
    # The doctor cannot cancel a hold either: holds are released or expire.
    with pytest.raises(InvalidTransition):
        await commands.cancel(store, doctor_of(calendar), Cancel(held.id, "no"), now=NOW)

    assert await db_state(db) == before


# ---- reschedule ------------------------------------------------------------------------------


async def test_reschedule_within_one_doctor_is_one_version(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    old_slot, new_slot = calendar.at(1, 9), calendar.at(1, 15)
    old = await book(store, patient("p-ann"), old_slot)
    before = await version(db, calendar.id)
    at = NOW + timedelta(minutes=1)

    outcome = await commands.reschedule(
        store, patient("p-ann"), Reschedule(old.id, new_slot.id), limits=None, now=at
    )

    assert isinstance(outcome.reply, Rescheduled)
    new, replaced = outcome.reply.appointment, outcome.reply.replaced
    assert (new.slot_id, new.patient_id, new.status, new.replaces_id) == (
        new_slot.id,
        "p-ann",
        "booked",
        old.id,
    )
    assert (replaced.id, replaced.status, replaced.cancel_reason) == (
        old.id,
        "cancelled",
        "rescheduled",
    )
    assert replaced.cancelled_at == at
    [change] = outcome.changes
    assert change.version == before + 1 == await version(db, calendar.id)
    assert {i: s.status for i, s in public_slots(change).items()} == {
        old_slot.id: SlotStatus.FREE,
        new_slot.id: SlotStatus.BUSY,
    }
    assert await change_count(db, calendar.id) == before + 1
    assert (await slot_row(db, old_slot.id))["status"] == "free"
    assert (await slot_row(db, new_slot.id))["status"] == "busy"


async def test_reschedule_across_doctors_is_one_version_each(
    store: Store, db: asyncpg.Connection
) -> None:
    here = await open_calendar(store, name="Dr. Here")
    there = await open_calendar(store, name="Dr. There")
    old = await book(store, patient("p-ann"), here.slots[0])
    before = {c.id: await version(db, c.id) for c in (here, there)}

    outcome = await commands.reschedule(
        store, ADMIN, Reschedule(old.id, there.slots[3].id), limits=None, now=NOW
    )

    assert isinstance(outcome.reply, Rescheduled)
    new = outcome.reply.appointment
    assert (new.doctor_id, new.slot_id, new.replaces_id) == (there.id, there.slots[3].id, old.id)
    changes = {c.doctor_id: c for c in outcome.changes}
    assert sorted(changes) == sorted(before)
    for doctor_id, change in changes.items():
        assert change.version == before[doctor_id] + 1 == await version(db, doctor_id)
        assert await change_count(db, doctor_id) == before[doctor_id] + 1
    assert {i: s.status for i, s in public_slots(changes[here.id]).items()} == {
        here.slots[0].id: SlotStatus.FREE
    }
    assert {i: s.status for i, s in public_slots(changes[there.id]).items()} == {
        there.slots[3].id: SlotStatus.BUSY
    }
    # Each doctor's private side carries its own appointment.
    assert [a["id"] for a in changes[here.id].private.appointments] == [old.id]
    assert [a["id"] for a in changes[there.id].private.appointments] == [new.id]


@pytest.mark.parametrize("taken_by", ["booking", "hold", "unseen booking"])
async def test_reschedule_to_a_taken_slot_changes_nothing(
    store: Store, db: asyncpg.Connection, taken_by: str
) -> None:
    here = await open_calendar(store, name="Dr. Here")
    there = await open_calendar(store, name="Dr. There")
    old = await book(store, patient("p-ann"), here.slots[0])
    target = there.slots[0]
    if taken_by == "booking":
        await book(store, patient("p-bob"), target)
    elif taken_by == "hold":
        await hold(store, patient("p-bob"), target, ttl=timedelta(hours=1))
    else:
        # The slot row says free but an appointment covers it, so the refusal comes only
        # at the insert, after the old appointment was already cancelled in the savepoint.
        await db.execute(
            "INSERT INTO appointments (doctor_id, slot_id, patient_id, starts_at, ends_at, status)"
            " VALUES ($1, $2, 'p-legacy', $3, $4, 'booked')",
            there.id,
            target.id,
            target.start,
            target.end,
        )
    before = await db_state(db)

    with pytest.raises(SlotTaken) as caught:
        await commands.reschedule(
            store, patient("p-ann"), Reschedule(old.id, target.id), limits=None, now=NOW
        )

    assert caught.value.code is ErrorCode.SLOT_TAKEN
    assert await db_state(db) == before
    assert (await appointment_row(db, old.id))["status"] == "booked"
    assert (await slot_row(db, here.slots[0].id))["status"] == "busy"


async def test_who_may_move_a_patient_to_another_doctor(
    store: Store, db: asyncpg.Connection
) -> None:
    here = await open_calendar(store, name="Dr. Here")
    there = await open_calendar(store, name="Dr. There")
    ann = await book(store, patient("p-ann"), here.slots[0])
    before = await db_state(db)

    # The patient's doctor may not hand the patient to a colleague, nor take one.
    for doctor in (doctor_of(here), doctor_of(there)):
        with pytest.raises(Forbidden):
            await commands.reschedule(
                store, doctor, Reschedule(ann.id, there.slots[0].id), limits=None, now=NOW
            )
    assert await db_state(db) == before

    # Within the doctor's own calendar the doctor may.
    moved = await commands.reschedule(
        store, doctor_of(here), Reschedule(ann.id, here.slots[1].id), limits=None, now=NOW
    )
    assert isinstance(moved.reply, Rescheduled)
    # The patient and an admin may cross doctors.
    by_patient = await commands.reschedule(
        store,
        patient("p-ann"),
        Reschedule(moved.reply.appointment.id, there.slots[0].id),
        limits=None,
        now=NOW,
    )
    assert isinstance(by_patient.reply, Rescheduled)
    assert by_patient.reply.appointment.doctor_id == there.id
    by_admin = await commands.reschedule(
        store,
        ADMIN,
        Reschedule(by_patient.reply.appointment.id, here.slots[2].id),
        limits=None,
        now=NOW,
    )
    assert isinstance(by_admin.reply, Rescheduled)
    assert by_admin.reply.appointment.doctor_id == here.id
    assert by_admin.reply.appointment.patient_id == "p-ann"


async def test_crossed_reschedules_neither_deadlock_nor_lose_a_slot(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Every command takes both doctors' locks; taken in id order they cannot deadlock."""
    n = 15
    async with open_store(
        database_url,
        min_size=2,
        max_size=2 * n + 4,
        lock_timeout_ms=30_000,
        statement_timeout_ms=30_000,
    ) as store:
        a = await open_calendar(store, name="Dr. A")
        b = await open_calendar(store, name="Dr. B")
        a_patients = [await book(store, patient(f"a-{i:02}"), a.slots[i]) for i in range(n)]
        b_patients = [await book(store, patient(f"b-{i:02}"), b.slots[i]) for i in range(n)]
        before = {d: await version(db, d) for d in (a.id, b.id)}
        moves: list[Awaitable[Outcome]] = []
        for i in range(n):  # interleaved, so both directions are in flight at once
            moves.append(
                commands.reschedule(
                    store,
                    patient(f"a-{i:02}"),
                    Reschedule(a_patients[i].id, b.slots[n + i].id),
                    limits=None,
                    now=NOW,
                )
            )
            moves.append(
                commands.reschedule(
                    store,
                    patient(f"b-{i:02}"),
                    Reschedule(b_patients[i].id, a.slots[n + i].id),
                    limits=None,
                    now=NOW,
                )
            )

        results = await asyncio.wait_for(asyncio.gather(*moves, return_exceptions=True), 30)

    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    moved: dict[int, AppointmentView] = {}
    for outcome in results:
        assert isinstance(outcome, Outcome)
        assert isinstance(outcome.reply, Rescheduled)
        moved[outcome.reply.replaced.id] = outcome.reply.appointment
    for i in range(n):
        assert moved[a_patients[i].id].slot_id == b.slots[n + i].id
        assert moved[b_patients[i].id].slot_id == a.slots[n + i].id
    for calendar in (a, b):
        # Every reschedule bumped both doctors exactly once, with a change row each.
        assert await version(db, calendar.id) == before[calendar.id] + 2 * n
        assert await change_count(db, calendar.id) == await version(db, calendar.id)
        busy = await db.fetchval(
            "SELECT count(*) FROM slots WHERE doctor_id = $1 AND status = 'busy'", calendar.id
        )
        active = await db.fetchval(
            "SELECT count(*) FROM appointments WHERE doctor_id = $1 AND status = 'booked'",
            calendar.id,
        )
        assert busy == active == n
    free_but_taken = await db.fetchval(
        "SELECT count(*) FROM slots s JOIN appointments a ON a.slot_id = s.id"
        " WHERE s.status = 'free' AND a.status <> 'cancelled'"
    )
    busy_but_empty = await db.fetchval(
        "SELECT count(*) FROM slots s WHERE s.status = 'busy' AND NOT EXISTS"
        " (SELECT 1 FROM appointments a WHERE a.slot_id = s.id AND a.status <> 'cancelled')"
    )
    assert (free_but_taken, busy_but_empty) == (0, 0)


# ---- block and unblock -----------------------------------------------------------------------


async def test_only_a_free_slot_is_blocked_and_only_a_blocked_one_unblocked(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    doctor = doctor_of(calendar)
    slot, booked, held = calendar.slots[0], calendar.slots[1], calendar.slots[2]
    await book(store, patient("p-ann"), booked)
    await hold(store, patient("p-bob"), held)

    outcome = await commands.block(store, doctor, Block(slot.id), now=NOW)

    assert isinstance(outcome.reply, SlotUpdated)
    blocked_view = SlotView(slot.id, slot.start, slot.end, SlotStatus.BUSY_UNAVAILABLE)
    assert outcome.reply == SlotUpdated(calendar.id, blocked_view)
    assert await snapshot_slot(store, calendar.id, slot.id) == blocked_view
    before = await db_state(db)
    wrong: list[tuple[bool, SlotView]] = [(True, slot), (True, booked), (True, held)]
    wrong += [(False, booked), (False, held), (False, calendar.slots[3])]
    for blocked, target in wrong:
        request = Block(target.id) if blocked else Unblock(target.id)
        with pytest.raises(InvalidTransition):
            await (commands.block if blocked else commands.unblock)(store, ADMIN, request, now=NOW)
    assert await db_state(db) == before

    unblocked = await commands.unblock(store, ADMIN, Unblock(slot.id), now=NOW)

    assert isinstance(unblocked.reply, SlotUpdated)
    assert unblocked.reply.slot.status is SlotStatus.FREE
    assert (await slot_row(db, slot.id))["status"] == "free"
    assert (await book(store, patient("p-cat"), slot)).slot_id == slot.id


async def test_blocking_is_for_the_doctor_alone(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store, name="Dr. Mine")
    other = await open_calendar(store, name="Dr. Other", days=1)
    free, blocked = calendar.slots[0], calendar.slots[1]
    await commands.block(store, doctor_of(calendar), Block(blocked.id), now=NOW)
    before = await db_state(db)

    for intruder in (patient("p-ann"), doctor_of(other)):
        with pytest.raises(Forbidden):
            await commands.block(store, intruder, Block(free.id), now=NOW)
        with pytest.raises(Forbidden):
            await commands.unblock(store, intruder, Unblock(blocked.id), now=NOW)

    assert await db_state(db) == before


# ---- mark ------------------------------------------------------------------------------------


async def test_mark_follows_the_appointment_lifecycle(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store)
    doctor = doctor_of(calendar)
    visit = await book(store, patient("p-ann"), calendar.slots[0])
    missed = await book(store, patient("p-bob"), calendar.slots[1])

    assert (await mark(store, doctor, visit, AppointmentStatus.ARRIVED)).status == "arrived"
    assert (await mark(store, ADMIN, visit, AppointmentStatus.FULFILLED)).status == "fulfilled"
    assert (await mark(store, doctor, missed, AppointmentStatus.NOSHOW)).status == "noshow"
    assert (await appointment_row(db, visit.id))["status"] == "fulfilled"
    assert (await appointment_row(db, missed.id))["status"] == "noshow"


async def test_mark_refuses_transitions_off_the_lifecycle(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    doctor = doctor_of(calendar)
    arrived = await book(store, patient("p-ann"), calendar.slots[0])
    await mark(store, doctor, arrived, AppointmentStatus.ARRIVED)
    fulfilled = await book(store, patient("p-bob"), calendar.slots[1])
    await mark(store, doctor, fulfilled, AppointmentStatus.ARRIVED)
    await mark(store, doctor, fulfilled, AppointmentStatus.FULFILLED)
    booked = await book(store, patient("p-cat"), calendar.slots[2])
    held = await hold(store, patient("p-dan"), calendar.slots[3])
    before = await db_state(db)
    s = AppointmentStatus
    refused = [
        (arrived, s.NOSHOW),
        (arrived, s.BOOKED),
        *((fulfilled, target) for target in (s.ARRIVED, s.NOSHOW, s.FULFILLED, s.BOOKED)),
        (booked, s.FULFILLED),
        (booked, s.CANCELLED),
        (booked, s.BOOKED),
        (held, s.ARRIVED),
        (held, s.BOOKED),
    ]

    for appointment, target in refused:
        with pytest.raises(InvalidTransition) as caught:
            await mark(store, doctor, appointment, target)
        assert caught.value.code is ErrorCode.INVALID_TRANSITION

    assert await db_state(db) == before


async def test_mark_is_for_the_doctor_alone(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store, name="Dr. Mine")
    other = await open_calendar(store, name="Dr. Other", days=1)
    appointment = await book(store, patient("p-ann"), calendar.slots[0])
    before = await db_state(db)

    for intruder in (patient("p-ann"), doctor_of(other)):
        with pytest.raises(Forbidden) as caught:
            await mark(store, intruder, appointment, AppointmentStatus.ARRIVED)
        assert caught.value.code is ErrorCode.FORBIDDEN

    assert await db_state(db) == before


# ---- idempotency -----------------------------------------------------------------------------

KEY = "k-retry-1"


@dataclass(frozen=True)
class Case:
    """One mutating command: its request, a different request under the same key, its call."""

    request: Message
    variant: Message
    run: Callable[[Any], Awaitable[Outcome]]


async def _hold_case(store: Store, calendar: Calendar) -> Case:
    who = patient("p-ann")
    return Case(
        Hold(calendar.slots[0].id, KEY),
        Hold(calendar.slots[1].id, KEY),
        lambda r: commands.hold(store, who, r, ttl=TTL, max_holds=5, limits=None, now=NOW),
    )


async def _release_case(store: Store, calendar: Calendar) -> Case:
    who = patient("p-ann")
    first = await hold(store, who, calendar.slots[0])
    second = await hold(store, who, calendar.slots[1])
    return Case(
        Release(first.id, KEY),
        Release(second.id, KEY),
        lambda r: commands.release(store, who, r, now=NOW),
    )


async def _book_case(store: Store, calendar: Calendar) -> Case:
    who = patient("p-ann")
    return Case(
        Book(slot_id=calendar.slots[0].id, idempotency_key=KEY),
        Book(slot_id=calendar.slots[1].id, idempotency_key=KEY),
        lambda r: commands.book(store, who, r, limits=None, now=NOW),
    )


async def _confirm_case(store: Store, calendar: Calendar) -> Case:
    who = patient("p-ann")
    first = await hold(store, who, calendar.slots[0])
    second = await hold(store, who, calendar.slots[1])
    return Case(
        Book(hold_id=first.id, idempotency_key=KEY),
        Book(hold_id=second.id, idempotency_key=KEY),
        lambda r: commands.book(store, who, r, limits=None, now=NOW),
    )


async def _cancel_case(store: Store, calendar: Calendar) -> Case:
    who = patient("p-ann")
    appointment = await book(store, who, calendar.slots[0])
    return Case(
        Cancel(appointment.id, "ill", KEY),
        Cancel(appointment.id, "better", KEY),
        lambda r: commands.cancel(store, who, r, now=NOW),
    )


async def _reschedule_case(store: Store, calendar: Calendar) -> Case:
    who = patient("p-ann")
    appointment = await book(store, who, calendar.slots[0])
    return Case(
        Reschedule(appointment.id, calendar.slots[1].id, KEY),
        Reschedule(appointment.id, calendar.slots[2].id, KEY),
        lambda r: commands.reschedule(store, who, r, limits=None, now=NOW),
    )


async def _block_case(store: Store, calendar: Calendar) -> Case:
    who = doctor_of(calendar)
    return Case(
        Block(calendar.slots[0].id, KEY),
        Block(calendar.slots[1].id, KEY),
        lambda r: commands.block(store, who, r, now=NOW),
    )


async def _unblock_case(store: Store, calendar: Calendar) -> Case:
    who = doctor_of(calendar)
    for slot in calendar.slots[:2]:
        await commands.block(store, who, Block(slot.id), now=NOW)
    return Case(
        Unblock(calendar.slots[0].id, KEY),
        Unblock(calendar.slots[1].id, KEY),
        lambda r: commands.unblock(store, who, r, now=NOW),
    )


async def _mark_case(store: Store, calendar: Calendar) -> Case:
    who = doctor_of(calendar)
    appointment = await book(store, patient("p-ann"), calendar.slots[0])
    return Case(
        Mark(appointment.id, AppointmentStatus.ARRIVED, KEY),
        Mark(appointment.id, AppointmentStatus.NOSHOW, KEY),
        lambda r: commands.mark(store, who, r, now=NOW),
    )


async def _set_schedule_case(store: Store, calendar: Calendar) -> Case:
    who = doctor_of(calendar)
    mornings = [WeeklyBlock(d, time(8), time(12)) for d in range(1, 8)]
    afternoons = [WeeklyBlock(d, time(13), time(17)) for d in range(1, 8)]
    return Case(
        SetSchedule(calendar.id, mornings, horizon_days=4, idempotency_key=KEY),
        SetSchedule(calendar.id, afternoons, horizon_days=4, idempotency_key=KEY),
        lambda r: commands.set_schedule(store, who, r, now=NOW),
    )


CASES: dict[str, Callable[[Store, Calendar], Awaitable[Case]]] = {
    "hold": _hold_case,
    "release": _release_case,
    "book": _book_case,
    "confirm": _confirm_case,
    "cancel": _cancel_case,
    "reschedule": _reschedule_case,
    "block": _block_case,
    "unblock": _unblock_case,
    "mark": _mark_case,
    "set_schedule": _set_schedule_case,
}


@pytest.mark.parametrize("command", list(CASES))
async def test_same_key_twice_changes_state_once(
    store: Store, db: asyncpg.Connection, command: str
) -> None:
    calendar = await open_calendar(store)
    case = await CASES[command](store, calendar)
    before = await change_count(db)

    first = await case.run(case.request)
    after_first = await db_state(db)
    again = await case.run(case.request)

    assert first.reply is not None
    assert len(first.changes) == 1
    assert await change_count(db) == before + 1
    assert again.reply == first.reply
    assert again.changes == []  # nothing new to publish
    assert await db_state(db) == after_first


@pytest.mark.parametrize("command", list(CASES))
async def test_same_key_concurrently_changes_state_once(
    store: Store, db: asyncpg.Connection, command: str
) -> None:
    calendar = await open_calendar(store)
    case = await CASES[command](store, calendar)
    before = await change_count(db)

    results = await asyncio.gather(*(case.run(case.request) for _ in range(5)))

    assert results[0].reply is not None
    assert all(r.reply == results[0].reply for r in results), results
    assert sorted(len(r.changes) for r in results) == [0, 0, 0, 0, 1]
    assert await change_count(db) == before + 1
    state = await db_state(db)
    again = await case.run(case.request)
    assert again.reply == results[0].reply
    assert await db_state(db) == state


@pytest.mark.parametrize("command", list(CASES))
async def test_same_key_for_a_different_request_is_a_conflict(
    store: Store, db: asyncpg.Connection, command: str
) -> None:
    calendar = await open_calendar(store)
    case = await CASES[command](store, calendar)
    await case.run(case.request)
    before = await db_state(db)

    with pytest.raises(IdempotencyConflict) as caught:
        await case.run(case.variant)

    assert caught.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
    assert await db_state(db) == before


async def test_a_key_belongs_to_the_actor_not_just_the_subject_string(
    store: Store, db: asyncpg.Connection
) -> None:
    """A doctor's subject is its id, and a patient's subject is any string, "1" included.

    Keys are stored per subject only, so a patient whose id equals a doctor's id is
    handed that doctor's stored replies (other patients' appointments) without any
    permission check, and can poison the doctor's keys.
    """
    calendar = await open_calendar(store)
    appointment = await book(store, patient("p-ann"), calendar.slots[0])
    request = Cancel(appointment.id, "clinic closed", "k-shared")
    await commands.cancel(store, doctor_of(calendar), request, now=NOW)
    namesake = patient(str(calendar.id))  # a patient whose id happens to be "1"

    with pytest.raises(Forbidden):
        await commands.cancel(store, namesake, request, now=NOW)


async def test_a_patient_cannot_spoil_a_doctors_key_by_sharing_its_subject(
    store: Store, db: asyncpg.Connection
) -> None:
    """The other side of the same collision: the doctor's retry-safe command is refused."""
    calendar = await open_calendar(store)
    namesake = patient(str(calendar.id))
    await commands.book(
        store,
        namesake,
        Book(slot_id=calendar.slots[0].id, idempotency_key="k-7"),
        limits=None,
        now=NOW,
    )

    outcome = await commands.block(
        store, doctor_of(calendar), Block(calendar.slots[1].id, "k-7"), now=NOW
    )

    assert isinstance(outcome.reply, SlotUpdated)
    assert (await slot_row(db, calendar.slots[1].id))["status"] == "busy-unavailable"


# ---- the audit trail -------------------------------------------------------------------------


async def test_every_change_row_is_an_audit_record(store: Store, db: asyncpg.Connection) -> None:
    started = await db.fetchval("SELECT clock_timestamp()")
    calendar = await open_calendar(store)
    doctor = doctor_of(calendar)
    x, y, z = "patient-x-41f9", "patient-y-7c22", "patient-z-90ab"
    minute = timedelta(minutes=1)

    held = await hold(store, patient(x), calendar.slots[0])
    await commands.book(store, patient(x), Book(hold_id=held.id), limits=None, now=NOW + minute)
    await commands.cancel(store, doctor, Cancel(held.id, "doctor ill"), now=NOW + 2 * minute)
    first = await book(store, patient(y), calendar.slots[1], now=NOW + 3 * minute)
    moved = await commands.reschedule(
        store, ADMIN, Reschedule(first.id, calendar.slots[2].id), limits=None, now=NOW + 4 * minute
    )
    assert isinstance(moved.reply, Rescheduled)
    second = moved.reply.appointment
    await mark(store, doctor, second, AppointmentStatus.ARRIVED, now=NOW + 5 * minute)
    await commands.block(store, doctor, Block(calendar.slots[3].id), now=NOW)
    lapsed = await hold(store, patient(z), calendar.slots[4], now=NOW + 6 * minute)
    await commands.expire_holds(store, now=NOW + 6 * minute + TTL)
    schedule = SetSchedule(calendar.id, OPEN_ALL_DAY, horizon_days=4)
    updated = await commands.set_schedule(store, doctor, schedule, now=NOW + 7 * minute)
    assert isinstance(updated.reply, ScheduleUpdated)

    log = await reads.change_log(store, calendar.id)
    finished = await db.fetchval("SELECT clock_timestamp()")

    system, admin = "admin:system", str(ADMIN)
    expected = [
        ("slots.opened", system, []),
        ("slot.held", f"patient:{x}", [(held.id, x, "pending")]),
        ("slot.booked", f"patient:{x}", [(held.id, x, "booked")]),
        ("appointment.cancelled", str(doctor), [(held.id, x, "cancelled")]),
        ("slot.booked", f"patient:{y}", [(first.id, y, "booked")]),
        ("appointment.rescheduled", admin, [(first.id, y, "cancelled"), (second.id, y, "booked")]),
        ("appointment.arrived", str(doctor), [(second.id, y, "arrived")]),
        ("slot.blocked", str(doctor), []),
        ("slot.held", f"patient:{z}", [(lapsed.id, z, "pending")]),
        ("hold.expired", system, [(lapsed.id, z, "cancelled")]),
        ("schedule.changed", str(doctor), []),
    ]
    assert [r["version"] for r in log] == list(range(1, len(expected) + 1))
    actual = [
        (
            r["kind"],
            r["actor"],
            [(a["id"], a["patient_id"], a["status"]) for a in r["private"]["appointments"]],
        )
        for r in log
    ]
    assert actual == expected
    for row in log:
        assert started <= row["created_at"] <= finished
        assert row["private"]["kind"] == row["kind"].split("+")
        assert row["private"]["actor"] == row["actor"]
        public = json.dumps(row["public"])
        for who in (x, y, z):
            assert who not in public
        assert "patient" not in public
    private = json.dumps([r["private"] for r in log])
    assert all(who in private for who in (x, y, z))


# ---- lists -----------------------------------------------------------------------------------


async def test_a_doctors_day_is_the_doctors_local_day(store: Store) -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    day = date(2030, 1, 8)  # Tokyo's 08:00 that day is 23:00 UTC the day before
    doctor_id = await doctors.create_doctor(
        store, name="Dr. Sato", timezone="Asia/Tokyo", schedule=EVERY_DAY, horizon_days=4
    )
    await commands.materialize_slots(store, doctor_id, today=day, now=NOW)
    slots = (await reads.snapshot(store, doctor_id, day, day + timedelta(days=3), now=NOW)).slots

    def local(on: date, hour: int, minute: int = 0) -> SlotView:
        start = datetime.combine(on, time(hour, minute), tokyo)
        return next(s for s in slots if s.start == start)

    next_day = day + timedelta(days=1)
    # Booked out of order; the early one is on the previous UTC date, the next day's on this one.
    late = await book(store, patient("p-1"), local(day, 17, 30))
    following = await book(store, patient("p-2"), local(next_day, 8))
    early = await book(store, patient("p-3"), local(day, 8))
    noon = await book(store, patient("p-4"), local(day, 12))
    assert early.start.date() != day
    assert following.start.date() == late.start.date()

    on_day = await reads.doctor_appointments(store, doctor_id, day)
    on_next = await reads.doctor_appointments(store, doctor_id, next_day)

    assert [a.id for a in on_day] == [early.id, noon.id, late.id]
    assert [a.id for a in on_next] == [following.id]
    assert {a.start.astimezone(tokyo).date() for a in on_day} == {day}
    assert await reads.doctor_appointments(store, doctor_id, day - timedelta(days=1)) == []


async def test_a_patients_list_holds_only_what_is_still_ahead(store: Store) -> None:
    calendar = await open_calendar(store)
    doctor = doctor_of(calendar)
    ann = patient("p-ann")
    past = await book(store, ann, calendar.at(0, 8))
    booked = await book(store, ann, calendar.at(0, 10))
    arrived = await book(store, ann, calendar.at(0, 11))
    await mark(store, doctor, arrived, AppointmentStatus.ARRIVED)
    fulfilled = await book(store, ann, calendar.at(0, 12))
    await mark(store, doctor, fulfilled, AppointmentStatus.ARRIVED)
    await mark(store, doctor, fulfilled, AppointmentStatus.FULFILLED)
    noshow = await book(store, ann, calendar.at(0, 13))
    await mark(store, doctor, noshow, AppointmentStatus.NOSHOW)
    cancelled = await book(store, ann, calendar.at(0, 14))
    await commands.cancel(store, ann, Cancel(cancelled.id, "busy"), now=NOW)
    await hold(store, ann, calendar.at(0, 15), ttl=timedelta(minutes=1))  # lapses unswept
    live = await hold(store, ann, calendar.at(1, 9), ttl=timedelta(days=1))
    await book(store, patient("p-bob"), calendar.at(0, 16))
    query_at = past.end + timedelta(minutes=1)

    upcoming = await reads.patient_appointments(store, "p-ann", now=query_at)

    assert [a.id for a in upcoming] == [booked.id, arrived.id, live.id]
    assert [a.status for a in upcoming] == ["booked", "arrived", "pending"]
    # Seen from before the first slot ended, the past booking was still ahead.
    earlier = await reads.patient_appointments(store, "p-ann", now=NOW)
    assert [a.id for a in earlier][:2] == [past.id, booked.id]
