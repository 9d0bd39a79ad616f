"""Slots laid out from a weekly schedule: what a layout must look like, in any tier.

The same checks hold for `store.schedule.slot_times` alone (tests/unit) and for
the slots the store materializes from it (tests/store): daylight-saving days in
zones on both hemispheres, where an implementation that adds fixed offsets or
counts hours per day quietly goes wrong, checked in both directions.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, time, timedelta
from itertools import pairwise

from store import schedule
from store.schedule import zone

SLOT = timedelta(minutes=30)
DAY = date(2030, 1, 7)  # any date: half_hours only does wall-clock arithmetic on it


def starts(times: list[tuple[datetime, datetime]]) -> list[datetime]:
    return [s for s, _ in times]


# (zone, transition date, the wall-clock hour that is skipped or repeated, hours gained)
TRANSITIONS = [
    ("America/New_York", date(2026, 3, 8), 2, -1),
    ("America/New_York", date(2026, 11, 1), 1, +1),
    ("Europe/Berlin", date(2026, 3, 29), 2, -1),
    ("Europe/Berlin", date(2026, 10, 25), 2, +1),
    ("Australia/Sydney", date(2026, 10, 4), 2, -1),
    ("Australia/Sydney", date(2026, 4, 5), 2, +1),
]
NIGHT, MORNING = (time(0), time(4)), (time(9), time(12))
DST_BLOCKS = [schedule.Block(d, *hours) for d in range(1, 8) for hours in (NIGHT, MORNING)]
TRANSITION_IDS = [f"{name}-{day}" for name, day, _, _ in TRANSITIONS]


def half_hours(first: time, last: time) -> list[time]:
    """Wall-clock starts every 30 minutes from `first` up to `last` (excluded)."""
    base = datetime.combine(DAY, first)
    count = int((datetime.combine(DAY, last) - base) / SLOT)
    return [(base + i * SLOT).time() for i in range(count)]


def check_transition(
    times: list[tuple[datetime, datetime]], name: str, day: date, hour: int, gained: int
) -> None:
    """The three days around a transition, as laid out from DST_BLOCKS."""
    tz = zone(name)
    # The data itself: the zone's offset really changes by `gained` hours that day.
    offset_before = datetime.combine(day - timedelta(days=1), time(12), tz).utcoffset()
    offset_after = datetime.combine(day + timedelta(days=1), time(12), tz).utcoffset()
    assert offset_before is not None
    assert offset_after is not None
    assert offset_before - offset_after == timedelta(hours=gained)

    starts = [s for s, _ in times]
    assert len(set(starts)) == len(starts), "two slots share a UTC instant"
    ordered = sorted(times)
    for (_, end), (next_start, _) in pairwise(ordered):
        assert end <= next_start, "slots overlap"
    assert all(end - start == SLOT for start, end in times)

    by_date: dict[date, list[time]] = {}
    for start in sorted(starts):
        local = start.astimezone(tz)
        by_date.setdefault(local.date(), []).append(local.time())
    assert sorted(by_date) == [day + timedelta(days=d) for d in (-1, 0, 1)]
    ordinary_night = half_hours(*NIGHT)
    morning = half_hours(*MORNING)
    transition_hour = [time(hour), time(hour, 30)]
    for d in (-1, 1):
        assert by_date[day + timedelta(days=d)] == ordinary_night + morning
    wall = by_date[day]
    night = [t for t in wall if t < time(4)]
    if gained < 0:  # the skipped hour has no slots
        assert night == [t for t in ordinary_night if t not in transition_hour]
    else:  # the repeated hour has them twice, in order of real time
        assert Counter(night) == Counter(ordinary_night + transition_hour)
    assert len(night) == len(ordinary_night) + 2 * gained
    # Morning hours are untouched by the change: 09:00 local every day...
    assert [t for t in wall if t >= time(4)] == morning
    nine = {
        local_date: next(
            s
            for s in starts
            if s.astimezone(tz).date() == local_date and s.astimezone(tz).time() == time(9)
        )
        for local_date in by_date
    }
    # ...which is a different UTC instant once the clocks have changed.
    shift = nine[day + timedelta(days=1)] - nine[day - timedelta(days=1)]
    assert shift == timedelta(days=2, hours=gained)
