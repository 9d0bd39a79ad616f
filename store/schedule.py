"""Turning a weekly schedule in a doctor's wall-clock time into concrete UTC slots.

Pure functions: the doctor's IANA zone decides what "Monday 09:00" means on each
date, so daylight-saving shifts move the UTC instants and never the local times.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones


@dataclass(frozen=True, slots=True)
class Block:
    """A weekly availability block: ISO weekday (Monday = 1) and local start/end times."""

    weekday: int
    starts: time
    ends: time


@functools.cache
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones())


def zone(name: str) -> ZoneInfo:
    """The IANA zone, refusing the empty and the unknown (ZoneInfo would accept paths)."""
    if name not in _known_zones():
        raise ValueError(f"unknown IANA time zone {name!r}")
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError as exc:  # pragma: no cover - guarded above
        raise ValueError(f"unknown IANA time zone {name!r}") from exc


def slot_times(
    blocks: Iterable[Block],
    tz: ZoneInfo,
    first_day: date,
    days: int,
    slot_minutes: int,
    *,
    buffer_minutes: int = 0,
    overrides: Mapping[date, Sequence[tuple[time, time]]] | None = None,
) -> Iterator[tuple[datetime, datetime]]:
    """Slots of `slot_minutes`, `buffer_minutes` apart, filling each block of each local date.

    A date in `overrides` uses its own hours instead of its weekday's blocks (none:
    a day off). A block's start and end are placed on the local date with the
    zone's rules for that date, and slots are laid out in absolute time: on a
    spring-forward day a 01:00-04:00 block holds two hours of slots, on a fall-back
    day four, which is what the clinic's wall clock really gives.
    """
    length = timedelta(minutes=slot_minutes)
    step = length + timedelta(minutes=buffer_minutes)
    by_weekday: dict[int, list[tuple[time, time]]] = {}
    for b in blocks:
        by_weekday.setdefault(b.weekday, []).append((b.starts, b.ends))
    overrides = overrides or {}
    for offset in range(days):
        day = first_day + timedelta(days=offset)
        hours = overrides[day] if day in overrides else by_weekday.get(day.isoweekday(), [])
        for starts, ends in sorted(hours):
            start = datetime.combine(day, starts, tzinfo=tz).astimezone(UTC)
            end = datetime.combine(day, ends, tzinfo=tz).astimezone(UTC)
            while start + length <= end:
                yield start, start + length
                start += step


def offered(
    blocks: Iterable[Block],
    tz: ZoneInfo,
    first_day: date,
    window_start: datetime,
    *,
    days: int,
    slot_minutes: int,
    buffer_minutes: int,
    overrides: Mapping[date, Sequence[tuple[time, time]]],
) -> set[tuple[datetime, datetime]]:
    """The slots a schedule offers from `window_start` on: what `steps.rematerialize`
    keeps, and what `reads.schedule_preview` holds appointments against, so a preview
    and the save it announces can never disagree."""
    return {
        (s, e)
        for s, e in slot_times(
            blocks,
            tz,
            first_day,
            days,
            slot_minutes,
            buffer_minutes=buffer_minutes,
            overrides=overrides,
        )
        if s >= window_start
    }


def window(tz: ZoneInfo, now: datetime, first_day: date | None = None) -> tuple[date, datetime]:
    """The first local date a schedule is laid from, and the instant its slots start:
    today (or `first_day`) in the doctor's zone, never before `now` (the past is history)."""
    first = first_day or now.astimezone(tz).date()
    return first, max(now, datetime.combine(first, time(0), tzinfo=tz).astimezone(UTC))


def slots_in(hours: Iterable[tuple[time, time]], slot_minutes: int, buffer_minutes: int = 0) -> int:
    """How many slots these hours of one local date open, as `slot_times` lays them out.

    Counted on the wall clock: on a daylight-saving day a block spanning the change
    holds an hour's worth of slots more or less. Overlapping blocks count twice.
    """
    length = timedelta(minutes=slot_minutes)
    step = length + timedelta(minutes=buffer_minutes)
    day = date(2000, 1, 3)  # any date: only the difference of the two times matters
    total = 0
    for starts, ends in hours:
        span = datetime.combine(day, ends) - datetime.combine(day, starts)
        if span >= length:
            total += (span - length) // step + 1
    return total
