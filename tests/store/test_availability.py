"""Availability: what a schedule edit does to existing slots, and what a wall clock means.

A schedule edit must never drop a booking (it is flagged instead) and must take
free slots it no longer offers out of every watcher's view; the horizon upkeep
must add days without touching history. And because schedules are written in the
doctor's wall-clock time, daylight-saving days are where an implementation that
adds fixed offsets or counts hours per day quietly goes wrong, so each transition
is checked in both directions in zones on both hemispheres.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from protocol.messages import (
    Book,
    Booked,
    Cancel,
    DayOverride,
    Hold,
    ScheduleUpdated,
    SetSchedule,
    SlotView,
    WeeklyBlock,
)
from protocol.vocabulary import Role, SlotStatus
from store import commands, doctors, reads, schedule
from store.changes import Change
from store.errors import SlotTaken
from store.pool import Store
from store.schedule import slot_times, zone
from store.tx import Actor, Outcome
from testkit.fixtures import EVERY_DAY
from testkit.layout import (
    DST_BLOCKS,
    MORNING,
    NIGHT,
    TRANSITION_IDS,
    TRANSITIONS,
    check_transition,
    half_hours,
)

NOW = datetime(2030, 1, 7, 6, 0, tzinfo=UTC)  # a Monday, before a UTC doctor's day begins
DAY = NOW.date()
SLOT = timedelta(minutes=30)


def weekly(*hours: tuple[time, time]) -> list[WeeklyBlock]:
    """The same hours on every day of the week."""
    return [WeeklyBlock(d, start, end) for d in range(1, 8) for start, end in hours]


OPEN_ALL_DAY = weekly((time(8), time(18)))


def utc(day: int, hour: int, minute: int = 0) -> datetime:
    """A UTC instant `day` days after DAY."""
    return datetime.combine(DAY + timedelta(days=day), time(hour, minute), UTC)


def patient(name: str) -> Actor:
    return Actor(name, Role.PATIENT)


def doctor(doctor_id: int) -> Actor:
    return Actor(str(doctor_id), Role.DOCTOR)


async def utc_doctor(store: Store, *, days: int = 3) -> int:
    """A UTC doctor open 08:00-18:00 every day, slots opened as of NOW."""
    doctor_id = await doctors.create_doctor(
        store, name="Dr. Avail", timezone="UTC", schedule=EVERY_DAY, horizon_days=days
    )
    await commands.materialize_slots(store, doctor_id, now=NOW)
    return doctor_id


async def visible(store: Store, doctor_id: int, *, days: int = 8) -> dict[datetime, SlotView]:
    """The doctor's slots as a watcher's snapshot shows them, by start."""
    snapshot = await reads.snapshot(store, doctor_id, DAY, DAY + timedelta(days=days), now=NOW)
    return {s.start: s for s in snapshot.slots}


async def book_at(store: Store, doctor_id: int, start: datetime, who: str) -> int:
    """Book the slot starting at `start`; the appointment's id."""
    slot = (await visible(store, doctor_id))[start]
    outcome = await commands.book(store, patient(who), Book(slot_id=slot.id), limits=None, now=NOW)
    assert isinstance(outcome.reply, Booked)
    return outcome.reply.appointment.id


async def set_schedule(store: Store, request: SetSchedule, *, now: datetime = NOW) -> Outcome:
    return await commands.set_schedule(store, doctor(request.doctor_id), request, now=now)


def only_change(outcome: Outcome) -> Change:
    [change] = outcome.changes
    return change


def slot_views(change: Change) -> list[SlotView]:
    return msgspec.convert(change.public["slots"], list[SlotView])


async def slot_rows(db: asyncpg.Connection, doctor_id: int) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT id, starts_at, ends_at, status, conflict, retired_at FROM slots"
        " WHERE doctor_id = $1 ORDER BY starts_at, id",
        doctor_id,
    )
    return [tuple(r) for r in rows]


# ---- schedule edits --------------------------------------------------------------------------


async def test_a_new_weekly_schedule_opens_retires_and_flags(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await utc_doctor(store)
    old = await visible(store, doctor_id)
    early = await book_at(store, doctor_id, utc(1, 10), "p-ann")
    late = await book_at(store, doctor_id, utc(1, 11), "p-bob")
    early_slot, late_slot = old[utc(1, 10)].id, old[utc(1, 11)].id
    # Mornings to 10:00 stay; 10:00-18:00 goes; an evening hour is new.
    new_hours = weekly((time(8), time(10)), (time(18), time(19)))

    outcome = await set_schedule(store, SetSchedule(doctor_id, new_hours, horizon_days=3))

    change = only_change(outcome)
    dropped = {
        s.id
        for start, s in old.items()
        if time(10) <= start.time() and s.id not in (early_slot, late_slot)
    }
    opened = {s.start for s in slot_views(change)}
    evenings = {utc(d, 18, m) for d in range(3) for m in (0, 30)}
    assert outcome.reply == ScheduleUpdated(
        doctor_id=doctor_id,
        version=change.version,
        opened=len(evenings),
        removed=len(dropped),
        conflicts=[early_slot, late_slot],
    )
    assert opened == evenings
    assert all(s.status is SlotStatus.FREE for s in slot_views(change))
    assert set(change.public["removed"]) == dropped
    assert change.private.conflicts == [early_slot, late_slot]
    now_visible = await visible(store, doctor_id)
    free = {start for start, s in now_visible.items() if s.status is SlotStatus.FREE}
    assert free == {utc(d, h, m) for d in range(3) for h in (8, 9) for m in (0, 30)} | evenings
    # Bookings outside the new hours are kept, busy, and flagged for the doctor.
    assert now_visible[utc(1, 10)].status is SlotStatus.BUSY
    assert now_visible[utc(1, 11)].status is SlotStatus.BUSY
    flags = dict(await db.fetch("SELECT id, conflict FROM slots WHERE doctor_id = $1", doctor_id))
    assert {i for i, flagged in flags.items() if flagged} == {early_slot, late_slot}
    retired = await db.fetchval(
        "SELECT array_agg(id) FROM slots WHERE retired_at = $1 AND doctor_id = $2", NOW, doctor_id
    )
    assert set(retired) == dropped

    # Cancelling a conflicting booking takes its slot away instead of offering it again.
    cancelled = await commands.cancel(store, patient("p-bob"), Cancel(late, "moving away"), now=NOW)

    change = only_change(cancelled)
    assert change.public["removed"] == [late_slot]
    assert slot_views(change) == []
    assert utc(1, 11) not in await visible(store, doctor_id)
    assert (await db.fetchval("SELECT retired_at FROM slots WHERE id = $1", late_slot)) == NOW

    # A schedule offering those hours again clears the remaining conflict and reopens 11:00
    # as a new slot (the retired one stays history).
    restored = await set_schedule(store, SetSchedule(doctor_id, OPEN_ALL_DAY, horizon_days=3))

    assert isinstance(restored.reply, ScheduleUpdated)
    assert restored.reply.conflicts == []
    assert "slots.conflict_resolved" in (await reads.change_log(store, doctor_id))[-1]["kind"]
    assert await db.fetchval("SELECT conflict FROM slots WHERE id = $1", early_slot) is False
    after = await visible(store, doctor_id)
    assert after[utc(1, 10)].id == early_slot
    assert after[utc(1, 10)].status is SlotStatus.BUSY
    assert after[utc(1, 11)].status is SlotStatus.FREE
    assert after[utc(1, 11)].id != late_slot
    assert len(after) == 3 * 20
    assert await db.fetchval("SELECT status FROM appointments WHERE id = $1", early) == "booked"


async def test_every_schedule_edit_reports_the_bookings_it_leaves_outside(
    store: Store,
) -> None:
    """The reply is what the doctor sees after saving: an open conflict must stay in it.

    Only the first edit flags the slot in the database, but the second schedule
    leaves the booking just as far outside the hours as the first did.
    """
    doctor_id = await utc_doctor(store)
    await book_at(store, doctor_id, utc(1, 15), "p-ann")
    slot_id = (await visible(store, doctor_id))[utc(1, 15)].id
    mornings = weekly((time(8), time(12)))

    first = await set_schedule(store, SetSchedule(doctor_id, mornings, horizon_days=3))
    # The doctor then changes another rule; the booking is still outside the hours.
    second = await set_schedule(
        store, SetSchedule(doctor_id, mornings, min_notice_minutes=30, horizon_days=3)
    )

    assert isinstance(first.reply, ScheduleUpdated)
    assert isinstance(second.reply, ScheduleUpdated)
    assert first.reply.conflicts == [slot_id]
    assert second.reply.conflicts == [slot_id]


async def test_a_hold_on_a_dropped_slot_retires_it_when_it_lapses(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await utc_doctor(store)
    slot = (await visible(store, doctor_id))[utc(2, 16)]
    await commands.hold(
        store, patient("p-ann"), Hold(slot.id), ttl=SLOT, max_holds=5, limits=None, now=NOW
    )
    flagged = await set_schedule(
        store, SetSchedule(doctor_id, weekly((time(8), time(12))), horizon_days=3)
    )
    assert isinstance(flagged.reply, ScheduleUpdated)
    assert flagged.reply.conflicts == [slot.id]

    [change] = await commands.expire_holds(store, now=NOW + SLOT)

    assert change.public["removed"] == [slot.id]
    assert utc(2, 16) not in await visible(store, doctor_id)
    assert await db.fetchval("SELECT retired_at FROM slots WHERE id = $1", slot.id) == NOW + SLOT


async def test_a_new_slot_length_never_opens_a_free_slot_over_a_booking(
    store: Store, db: asyncpg.Connection
) -> None:
    """A free slot must be bookable; one overlapping a kept booking never is."""
    doctor_id = await utc_doctor(store, days=2)
    await book_at(store, doctor_id, utc(1, 9), "p-ann")  # 09:00-09:30

    # 45-minute slots from 08:00 put one at 08:45-09:30, across the kept booking.
    await set_schedule(store, SetSchedule(doctor_id, OPEN_ALL_DAY, slot_minutes=45, horizon_days=2))

    slots = list((await visible(store, doctor_id)).values())
    busy = [s for s in slots if s.status is SlotStatus.BUSY]
    assert [b.start for b in busy] == [utc(1, 9)]
    unbookable = [
        f
        for f in slots
        if f.status is SlotStatus.FREE and any(f.start < b.end and b.start < f.end for b in busy)
    ]
    for slot in unbookable:  # what a patient who trusts the snapshot gets
        with pytest.raises(SlotTaken):
            await commands.book(
                store, patient("p-bob"), Book(slot_id=slot.id), limits=None, now=NOW
            )
    assert [(s.start, s.end) for s in unbookable] == [], "free slots that can never be booked"


# ---- overrides and buffer --------------------------------------------------------------------


async def test_a_day_off_removes_only_that_dates_free_slots(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await utc_doctor(store)
    before = await visible(store, doctor_id)
    booked = await book_at(store, doctor_id, utc(1, 14), "p-ann")
    day_off = DAY + timedelta(days=1)

    outcome = await set_schedule(
        store,
        SetSchedule(doctor_id, OPEN_ALL_DAY, overrides=[DayOverride(day_off)], horizon_days=3),
    )

    assert isinstance(outcome.reply, ScheduleUpdated)
    booked_slot = before[utc(1, 14)].id
    gone = {s.id for start, s in before.items() if start.date() == day_off} - {booked_slot}
    assert set(only_change(outcome).public["removed"]) == gone
    assert outcome.reply.conflicts == [booked_slot]
    after = await visible(store, doctor_id)
    assert [start for start in after if start.date() == day_off] == [utc(1, 14)]
    # The other days keep their very slots.
    others = {start: s.id for start, s in before.items() if start.date() != day_off}
    assert {start: s.id for start, s in after.items() if start.date() != day_off} == others
    assert await db.fetchval("SELECT status FROM appointments WHERE id = $1", booked) == "booked"


async def test_override_hours_replace_or_extend_a_dates_weekly_hours(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await utc_doctor(store)
    before = await visible(store, doctor_id)
    extended, shortened = DAY + timedelta(days=1), DAY + timedelta(days=2)
    overrides = [
        # The usual hours plus an evening on one date...
        DayOverride(extended, time(8), time(18)),
        DayOverride(extended, time(19), time(21)),
        # ...and only a lunchtime hour on another.
        DayOverride(shortened, time(12), time(13)),
    ]

    outcome = await set_schedule(
        store, SetSchedule(doctor_id, OPEN_ALL_DAY, overrides=overrides, horizon_days=3)
    )

    change = only_change(outcome)
    assert {s.start for s in slot_views(change)} == {utc(1, 19, m) for m in (0, 30)} | {
        utc(1, 20, m) for m in (0, 30)
    }
    after = await visible(store, doctor_id)
    assert [t for t in after if t.date() == shortened] == [utc(2, 12), utc(2, 12, 30)]
    kept = {t: s.id for t, s in before.items() if t.date() != shortened}
    assert {t: after[t].id for t in kept} == kept  # nothing else moved
    assert not [t for t in after if t.date() == DAY and t.hour >= 18]
    removed = {s.id for t, s in before.items() if t.date() == shortened and t.hour != 12}
    assert set(change.public["removed"]) == removed


async def test_the_buffer_lays_slots_apart(store: Store) -> None:
    doctor_id = await utc_doctor(store)
    before = await visible(store, doctor_id)

    await set_schedule(
        store,
        SetSchedule(doctor_id, weekly((time(8), time(10))), buffer_minutes=15, horizon_days=3),
    )

    after = await visible(store, doctor_id)
    for d in range(3):
        on_day = DAY + timedelta(days=d)
        day = sorted((s for s in after.values() if s.start.date() == on_day), key=lambda s: s.start)
        assert [s.start for s in day] == [utc(d, 8), utc(d, 8, 45), utc(d, 9, 30)]
        assert all(s.end - s.start == SLOT for s in day)
        # Slots matching the new layout are kept, not reopened under new ids.
        assert day[0].id == before[utc(d, 8)].id
        assert day[2].id == before[utc(d, 9, 30)].id
    pure = slot_times(
        [schedule.Block(1, time(8), time(10))],
        zone("UTC"),
        date(2030, 1, 7),
        1,
        30,
        buffer_minutes=15,
    )
    assert [s for s, _ in pure] == [utc(0, 8), utc(0, 8, 45), utc(0, 9, 30)]


# ---- daylight saving -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "day", "hour", "gained"), TRANSITIONS, ids=TRANSITION_IDS)
async def test_materialized_slots_across_a_daylight_saving_change(
    store: Store, db: asyncpg.Connection, name: str, day: date, hour: int, gained: int
) -> None:
    tz = zone(name)
    doctor_id = await doctors.create_doctor(
        store, name="Dr. Clock", timezone=name, schedule=DST_BLOCKS, horizon_days=3
    )
    before = datetime.combine(day - timedelta(days=2), time(12), tz)

    await commands.materialize_slots(store, doctor_id, today=day - timedelta(days=1), now=before)

    rows = await db.fetch(
        "SELECT starts_at, ends_at FROM slots WHERE doctor_id = $1 ORDER BY starts_at", doctor_id
    )
    times = [(r["starts_at"], r["ends_at"]) for r in rows]
    check_transition(times, name, day, hour, gained)
    assert times == sorted(slot_times(DST_BLOCKS, tz, day - timedelta(days=1), 3, 30))
    # A watcher's local date is the doctor's: the snapshot of that day has exactly its slots.
    snapshot = await reads.snapshot(store, doctor_id, day, day + timedelta(days=1), now=before)
    assert {s.start.astimezone(tz).date() for s in snapshot.slots} == {day}
    assert len(snapshot.slots) == len(half_hours(*NIGHT)) + 2 * gained + len(half_hours(*MORNING))


# ---- horizon upkeep --------------------------------------------------------------------------


async def test_upkeep_opens_new_days_and_never_touches_the_past(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await utc_doctor(store, days=3)
    await book_at(store, doctor_id, utc(0, 10), "p-ann")
    two_days_later = NOW + timedelta(days=2)
    history = [r for r in await slot_rows(db, doctor_id) if r[1] < two_days_later]
    assert len(history) == 2 * 20

    change = await commands.materialize_slots(store, doctor_id, now=two_days_later)

    assert change is not None
    opened = [s.start for s in slot_views(change)]
    assert sorted(opened) == sorted(
        utc(d, h, m) for d in (3, 4) for h in range(8, 18) for m in (0, 30)
    )
    assert change.public["removed"] == []
    assert [r for r in await slot_rows(db, doctor_id) if r[1] < two_days_later] == history
    assert await commands.materialize_slots(store, doctor_id, now=two_days_later) is None

    # Even a schedule edit leaves the past alone: past free slots are not retired, the
    # past booking is not flagged; only slots from now on follow the new hours.
    await set_schedule(
        store,
        SetSchedule(doctor_id, weekly((time(8), time(9))), horizon_days=3),
        now=two_days_later,
    )

    assert [r for r in await slot_rows(db, doctor_id) if r[1] < two_days_later] == history
    future = [r for r in await slot_rows(db, doctor_id) if r[1] >= two_days_later]
    offered = {r[1] for r in future if r[5] is None}
    assert offered == {utc(d, 8, m) for d in (2, 3, 4) for m in (0, 30)}
