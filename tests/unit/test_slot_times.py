"""Slot layout, with no database: "Monday 09:00" means the doctor's wall clock.

A doctor's week is written in local time, but slots are stored and compared as
UTC instants; getting the zone wrong shifts every appointment by hours. These
pin `store.schedule.slot_times` and `zone` on their own; tests/store checks the
slots the store materializes from them.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from store.schedule import Block, slot_times, slots_in, zone
from testkit.layout import DST_BLOCKS, TRANSITION_IDS, TRANSITIONS, check_transition, starts

MONDAY = date(2025, 1, 6)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


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


@pytest.mark.parametrize(
    ("hours", "minutes", "buffer"),
    [
        ([(time(8), time(18))], 30, 0),
        ([(time(8), time(18))], 30, 10),
        ([(time(0), time(23, 55))], 5, 0),  # 5-minute slots around the clock: 287
        ([(time(9), time(9, 20))], 30, 0),  # too short for one slot
        ([(time(9), time(12)), (time(13), time(17, 30))], 45, 5),
        ([(time(9, 0, 30), time(10))], 15, 0),  # seconds: the last slot would end late
        ([(time(9), time(11)), (time(10), time(12))], 30, 0),  # overlapping: counted twice
    ],
)
def test_slots_in_counts_what_slot_times_lays_out(
    hours: list[tuple[time, time]], minutes: int, buffer: int
) -> None:
    """The `set_schedule` cap counts a day's slots without laying them out."""
    blocks = [Block(1, starts, ends) for starts, ends in hours]
    laid_out = list(slot_times(blocks, zone("UTC"), MONDAY, 1, minutes, buffer_minutes=buffer))
    assert slots_in(hours, minutes, buffer) == len(laid_out)


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


# ---- daylight saving -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "day", "hour", "gained"), TRANSITIONS, ids=TRANSITION_IDS)
def test_slot_times_across_a_daylight_saving_change(
    name: str, day: date, hour: int, gained: int
) -> None:
    times = list(slot_times(DST_BLOCKS, zone(name), day - timedelta(days=1), 3, 30))

    check_transition(times, name, day, hour, gained)
