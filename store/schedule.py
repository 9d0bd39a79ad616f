"""Turning a weekly schedule in a doctor's wall-clock time into concrete UTC slots.

Pure functions: the doctor's IANA zone decides what "Monday 09:00" means on each
date, so daylight-saving shifts move the UTC instants and never the local times.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
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
) -> Iterator[tuple[datetime, datetime]]:
    """Slots of `slot_minutes` filling each block on each local date, in UTC.

    A block's start and end are placed on the local date with the zone's rules for
    that date; slots are then laid out in absolute time, so a block that spans a
    transition is as long as the wall clock says.
    """
    length = timedelta(minutes=slot_minutes)
    by_weekday: dict[int, list[Block]] = {}
    for b in blocks:
        by_weekday.setdefault(b.weekday, []).append(b)
    for offset in range(days):
        day = first_day + timedelta(days=offset)
        for b in sorted(by_weekday.get(day.isoweekday(), ()), key=lambda b: b.starts):
            start = datetime.combine(day, b.starts, tzinfo=tz).astimezone(UTC)
            end = datetime.combine(day, b.ends, tzinfo=tz).astimezone(UTC)
            while start + length <= end:
                yield start, start + length
                start += length
