"""Schedules: "Monday 09:00" means the doctor's wall clock, and slots are only ever added once.

A doctor's week is written in local time, but slots are stored and compared as
UTC instants; getting the zone wrong shifts every appointment by hours. And the
materializer runs on every start and on a timer, so running it again must not
duplicate slots, reset a booked one, or flood watchers with empty changes.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta

import asyncpg
import pytest

from protocol.vocabulary import SlotStatus
from store import commands, doctors, reads
from store.pool import Store
from store.schedule import Block, slot_times, zone
from testkit.layout import starts

FUTURE_MONDAY = date(2030, 1, 7)


# ---- materialize_slots -----------------------------------------------------------------------


TOKYO_WEEK = [Block(1, time(9), time(11)), Block(4, time(14), time(15))]  # 4 + 2 slots a week


async def tokyo_doctor(store: Store, *, horizon_days: int = 14) -> int:
    return await doctors.create_doctor(
        store,
        name="Dr. Tanaka",
        timezone="Asia/Tokyo",
        schedule=TOKYO_WEEK,
        horizon_days=horizon_days,
    )


async def slot_rows(db: asyncpg.Connection, doctor_id: int) -> list[tuple[datetime, str]]:
    rows = await db.fetch(
        "SELECT starts_at, status FROM slots WHERE doctor_id = $1 ORDER BY starts_at", doctor_id
    )
    return [(r["starts_at"], r["status"]) for r in rows]


async def change_kinds(db: asyncpg.Connection, doctor_id: int) -> list[tuple[int, str]]:
    rows = await db.fetch(
        "SELECT version, kind FROM changes WHERE doctor_id = $1 ORDER BY version", doctor_id
    )
    return [(r["version"], r["kind"]) for r in rows]


async def test_materialize_adds_the_promised_slots_once(
    store: Store, db: asyncpg.Connection
) -> None:
    assert FUTURE_MONDAY.isoweekday() == 1
    doctor_id = await tokyo_doctor(store)
    expected = list(slot_times(TOKYO_WEEK, zone("Asia/Tokyo"), FUTURE_MONDAY, 14, 30))
    assert len(expected) == 12

    change = await commands.materialize_slots(store, doctor_id, today=FUTURE_MONDAY)

    assert change is not None
    assert change.version == 1
    assert [s["status"] for s in change.public["slots"]] == ["free"] * 12
    rows = await slot_rows(db, doctor_id)
    assert [start for start, _ in rows] == starts(expected)
    assert await change_kinds(db, doctor_id) == [(1, "slots.opened")]
    assert await reads.doctor_version(store, doctor_id) == 1

    # Again: nothing added, nothing recorded, the version untouched.
    assert await commands.materialize_slots(store, doctor_id, today=FUTURE_MONDAY) is None
    assert await slot_rows(db, doctor_id) == rows
    assert await change_kinds(db, doctor_id) == [(1, "slots.opened")]
    assert await reads.doctor_version(store, doctor_id) == 1


async def test_materialize_a_week_later_adds_only_the_new_week(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await tokyo_doctor(store)
    await commands.materialize_slots(store, doctor_id, today=FUTURE_MONDAY)
    before = await slot_rows(db, doctor_id)

    change = await commands.materialize_slots(
        store, doctor_id, today=FUTURE_MONDAY + timedelta(days=7)
    )

    assert change is not None
    assert change.version == 2
    added = [datetime.fromisoformat(s["start"]) for s in change.public["slots"]]
    third_week = FUTURE_MONDAY + timedelta(days=14)
    assert added == starts(list(slot_times(TOKYO_WEEK, zone("Asia/Tokyo"), third_week, 7, 30)))
    after = await slot_rows(db, doctor_id)
    assert after[: len(before)] == before
    assert [start for start, _ in after[len(before) :]] == added
    assert await change_kinds(db, doctor_id) == [(1, "slots.opened"), (2, "slots.opened")]


async def test_materialize_never_reopens_a_booked_slot(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await tokyo_doctor(store)
    opened = await commands.materialize_slots(store, doctor_id, today=FUTURE_MONDAY)
    assert opened is not None
    slot_id = opened.public["slots"][0]["id"]
    # Book as of the week before, so the slot is inside the doctor's booking horizon.
    a_week_before = datetime.combine(FUTURE_MONDAY - timedelta(days=7), time(0), tzinfo=UTC)
    await commands.book_slot(store, slot_id=slot_id, patient_id="p-booked", now=a_week_before)

    assert await commands.materialize_slots(store, doctor_id, today=FUTURE_MONDAY) is None
    status = await db.fetchval("SELECT status FROM slots WHERE id = $1", slot_id)
    assert status == SlotStatus.BUSY


async def test_concurrent_materialize_records_one_change(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await tokyo_doctor(store)

    results = await asyncio.gather(
        *(commands.materialize_slots(store, doctor_id, today=FUTURE_MONDAY) for _ in range(4))
    )

    assert sum(r is not None for r in results) == 1
    assert len(await slot_rows(db, doctor_id)) == 12
    assert await change_kinds(db, doctor_id) == [(1, "slots.opened")]


async def test_a_doctor_without_a_schedule_gets_no_slots_and_no_change(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor_id = await doctors.create_doctor(store, name="Dr. Away", timezone="Asia/Tokyo")

    assert await commands.materialize_slots(store, doctor_id, today=FUTURE_MONDAY) is None
    assert await slot_rows(db, doctor_id) == []
    assert await change_kinds(db, doctor_id) == []
    assert await reads.doctor_version(store, doctor_id) == 0


async def test_create_doctor_refuses_an_unknown_zone_before_writing(store: Store) -> None:
    before = await doctors.doctor_count(store)

    with pytest.raises(ValueError, match="unknown IANA time zone"):
        await doctors.create_doctor(store, name="Dr. Nowhere", timezone="Atlantis/Capital")

    assert await doctors.doctor_count(store) == before
