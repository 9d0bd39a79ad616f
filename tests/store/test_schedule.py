"""Schedules: "Monday 09:00" means the doctor's wall clock, and slots are only ever added once.

A doctor's week is written in local time, but slots are stored and compared as
UTC instants; getting the zone wrong shifts every appointment by hours. And the
materializer runs on every start and on a timer, so running it again must not
duplicate slots, reset a booked one, or flood watchers with empty changes.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from protocol.vocabulary import SlotStatus
from store import commands, doctors, reads
from store.runner import Store
from store.schedule import Block, slot_times, zone

MONDAY = date(2025, 1, 6)
FUTURE_MONDAY = date(2030, 1, 7)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def starts(times: list[tuple[datetime, datetime]]) -> list[datetime]:
    return [s for s, _ in times]


# ---- slot_times ------------------------------------------------------------------------------


def test_weekly_blocks_become_utc_slots_on_their_weekdays() -> None:
    assert MONDAY.isoweekday() == 1
    blocks = [Block(3, time(13), time(14, 30)), Block(1, time(9), time(10))]  # Wed, Mon

    times = list(slot_times(blocks, zone("Asia/Tokyo"), MONDAY, 7, 30))

    # Tokyo is UTC+9 all year: 09:00 local is midnight UTC.
    assert times == [
        (utc(2025, 1, 6, 0, 0), utc(2025, 1, 6, 0, 30)),
        (utc(2025, 1, 6, 0, 30), utc(2025, 1, 6, 1, 0)),
        (utc(2025, 1, 8, 4, 0), utc(2025, 1, 8, 4, 30)),
        (utc(2025, 1, 8, 4, 30), utc(2025, 1, 8, 5, 0)),
        (utc(2025, 1, 8, 5, 0), utc(2025, 1, 8, 5, 30)),
    ]
    for start, end in times:
        assert start.utcoffset() == timedelta(0)
        assert end.utcoffset() == timedelta(0)


def test_the_range_is_first_day_plus_days_whatever_weekday_it_starts_on() -> None:
    blocks = [Block(1, time(9), time(9, 30)), Block(3, time(9), time(9, 30))]
    tokyo = zone("Asia/Tokyo")
    tuesday = MONDAY + timedelta(days=1)

    # Tuesday + 7 days reaches the next Monday; one day from Monday sees only Monday.
    assert starts(list(slot_times(blocks, tokyo, tuesday, 7, 30))) == [
        utc(2025, 1, 8, 0, 0),
        utc(2025, 1, 13, 0, 0),
    ]
    assert starts(list(slot_times(blocks, tokyo, MONDAY, 1, 30))) == [utc(2025, 1, 6, 0, 0)]
    assert list(slot_times(blocks, tokyo, MONDAY, 0, 30)) == []


def test_daylight_saving_moves_the_utc_instant_not_the_local_time() -> None:
    every_day = [Block(d, time(9), time(9, 30)) for d in range(1, 8)]
    new_york = zone("America/New_York")

    times = list(slot_times(every_day, new_york, date(2025, 3, 7), 4, 30))

    # US clocks spring forward on Sunday 2025-03-09.
    assert starts(times) == [
        utc(2025, 3, 7, 14, 0),
        utc(2025, 3, 8, 14, 0),
        utc(2025, 3, 9, 13, 0),
        utc(2025, 3, 10, 13, 0),
    ]
    assert {s.astimezone(new_york).time() for s in starts(times)} == {time(9)}


def test_a_block_holds_only_whole_slots() -> None:
    tokyo = zone("Asia/Tokyo")

    assert list(slot_times([Block(1, time(9), time(9, 20))], tokyo, MONDAY, 7, 30)) == []
    # 09:00-10:45 holds three 30-minute slots; the trailing quarter hour is not a slot.
    times = list(slot_times([Block(1, time(9), time(10, 45))], tokyo, MONDAY, 7, 30))
    assert times[-1][1] == utc(2025, 1, 6, 1, 30)
    assert len(times) == 3


def test_zone_accepts_iana_names() -> None:
    tokyo = zone("Asia/Tokyo")

    assert isinstance(tokyo, ZoneInfo)
    assert tokyo.key == "Asia/Tokyo"
    assert datetime(2025, 1, 6, 9, tzinfo=tokyo).utcoffset() == timedelta(hours=9)


@pytest.mark.parametrize(
    "name", ["", " ", "Mars/Olympus_Mons", "Asia/Tokio", "Europe/../Asia/Tokyo", "/etc/localtime"]
)
def test_zone_refuses_unknown_names(name: str) -> None:
    with pytest.raises(ValueError, match="unknown IANA time zone"):
        zone(name)


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
