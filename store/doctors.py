"""Doctor administration: creating doctors and reading their settings.

Kept apart from the scheduling commands because none of it takes a doctor's
lock or records a version: a doctor's row is the calendar's frame, not an event
on it (schedule edits, which are events, are the `set_schedule` command).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from store import sql
from store.errors import NotFound
from store.pool import Store
from store.schedule import Block, zone


@dataclass(frozen=True, slots=True)
class Doctor:
    id: int
    name: str
    specialty: str
    timezone: str
    slot_minutes: int
    horizon_days: int
    version: int
    buffer_minutes: int
    min_notice_minutes: int
    retired_at: datetime | None = None


async def create_doctor(
    store: Store,
    *,
    name: str,
    timezone: str,
    specialty: str = "",
    slot_minutes: int = 30,
    horizon_days: int = 28,
    buffer_minutes: int = 0,
    min_notice_minutes: int = 0,
    schedule: Sequence[Block] = (),
) -> int:
    """A doctor with rules and weekly hours but no slots yet: `materialize_slots` opens them."""
    zone(timezone)  # refuse an unknown zone before it reaches the table
    async with store.connection() as conn, conn.transaction():
        doctor_id: int = await conn.fetchval(
            sql.DOCTOR_INSERT, name, specialty, timezone, slot_minutes, horizon_days
        )
        await conn.execute(
            sql.DOCTOR_SET_RULES,
            doctor_id,
            slot_minutes,
            buffer_minutes,
            min_notice_minutes,
            horizon_days,
        )
        await conn.executemany(
            sql.SCHEDULE_INSERT,
            [(doctor_id, b.weekday, b.starts, b.ends) for b in schedule],
        )
        # Without its cursor row the relay would never see this doctor's changes.
        await conn.execute(sql.RELAY_CURSOR_CREATE, doctor_id)
    return doctor_id


async def doctor(store: Store, doctor_id: int) -> Doctor:
    row = await store.fetchrow(sql.DOCTOR_GET, doctor_id)
    if row is None:
        raise NotFound(f"no doctor {doctor_id}")
    return Doctor(**dict(row))


async def doctor_ids(store: Store) -> list[int]:
    return [r["id"] for r in await store.fetch(sql.DOCTOR_IDS)]


async def doctor_count(store: Store) -> int:
    count: int = await store.fetchval(sql.DOCTOR_COUNT)
    return count
