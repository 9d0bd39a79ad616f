"""The booking engine driven directly, on an explicit clock, and the rows behind its back.

For store tests that call `store.commands` themselves: they pin the clock with
`now=` (a hold expires because the clock moved, never because a test slept), and
after each command they read the tables behind the store's back (`db_state`,
`slot_row`, ...) to prove what did and did not commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

import asyncpg
import msgspec

from protocol.messages import AppointmentView, Book, Booked, Held, Hold, SlotView
from protocol.vocabulary import Role
from store import commands, doctors, reads
from store.changes import Change
from store.pool import Store
from store.tx import Actor, Limits
from testkit.fixtures import EVERY_DAY

# A Monday morning in UTC, two hours before a UTC doctor's first slot of the day.
NOW = datetime(2030, 1, 7, 6, 0, tzinfo=UTC)
DAY = NOW.date()
TTL = timedelta(seconds=120)


@dataclass(frozen=True)
class Calendar:
    """A doctor open 08:00-18:00 every day, with the free slots it had when created."""

    id: int
    slots: list[SlotView]

    def at(self, day: int, hour: int, minute: int = 0) -> SlotView:
        """The slot starting at this UTC wall time, `day` days after DAY (UTC doctors only)."""
        start = datetime.combine(DAY + timedelta(days=day), time(hour, minute), UTC)
        return next(s for s in self.slots if s.start == start)


async def open_calendar(
    store: Store, *, name: str = "Dr. Engine", days: int = 4, **rules: int
) -> Calendar:
    doctor_id = await doctors.create_doctor(
        store, name=name, timezone="UTC", schedule=EVERY_DAY, horizon_days=days, **rules
    )
    await commands.materialize_slots(store, doctor_id, now=NOW)
    snapshot = await reads.snapshot(store, doctor_id, DAY, DAY + timedelta(days=days), now=NOW)
    assert snapshot.slots, "the calendar opened no slots"
    return Calendar(doctor_id, snapshot.slots)


def patient(name: str) -> Actor:
    return Actor(name, Role.PATIENT)


async def hold(
    store: Store,
    who: Actor,
    slot: SlotView,
    *,
    ttl: timedelta = TTL,
    max_holds: int = 5,
    limits: Limits | None = None,
    now: datetime = NOW,
) -> AppointmentView:
    outcome = await commands.hold(
        store, who, Hold(slot.id), ttl=ttl, max_holds=max_holds, limits=limits, now=now
    )
    assert isinstance(outcome.reply, Held)
    return outcome.reply.appointment


async def book(
    store: Store,
    who: Actor,
    slot: SlotView,
    *,
    limits: Limits | None = None,
    now: datetime = NOW,
) -> AppointmentView:
    outcome = await commands.book(store, who, Book(slot_id=slot.id), limits=limits, now=now)
    assert isinstance(outcome.reply, Booked)
    return outcome.reply.appointment


def public_slots(change: Change) -> dict[int, SlotView]:
    slots = msgspec.convert(change.public["slots"], list[SlotView])
    return {s.id: s for s in slots}


async def version(db: asyncpg.Connection, doctor_id: int) -> int:
    value: int = await db.fetchval("SELECT version FROM doctors WHERE id = $1", doctor_id)
    return value


async def slot_row(db: asyncpg.Connection, slot_id: int) -> asyncpg.Record:
    row: asyncpg.Record = await db.fetchrow(
        "SELECT status, conflict, retired_at FROM slots WHERE id = $1", slot_id
    )
    return row


async def appointment_row(db: asyncpg.Connection, appointment_id: int) -> asyncpg.Record:
    row: asyncpg.Record = await db.fetchrow(
        "SELECT status, cancel_reason, cancelled_at, cancelled_by, hold_expires_at"
        " FROM appointments WHERE id = $1",
        appointment_id,
    )
    return row


async def db_state(db: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a command may write: a refusal or a replay must leave all of it alone."""
    queries = {
        "doctors": "SELECT id, version, slot_minutes, buffer_minutes, min_notice_minutes,"
        " horizon_days FROM doctors ORDER BY id",
        "schedules": "SELECT doctor_id, weekday, starts, ends FROM schedules"
        " ORDER BY doctor_id, weekday, starts",
        "slots": "SELECT id, doctor_id, starts_at, ends_at, status, conflict, retired_at"
        " FROM slots ORDER BY id",
        "appointments": "SELECT id, slot_id, patient_id, status, hold_expires_at, replaces_id,"
        " cancel_reason, cancelled_at, cancelled_by FROM appointments ORDER BY id",
        "changes": "SELECT doctor_id, version, kind, actor FROM changes"
        " ORDER BY doctor_id, version",
        "keys": "SELECT subject, key, command FROM idempotency_keys ORDER BY subject, key",
    }
    return {name: [tuple(r) for r in await db.fetch(query)] for name, query in queries.items()}


async def active_appointments(db: asyncpg.Connection, slot_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT id, patient_id FROM appointments WHERE slot_id = $1 AND status <> 'cancelled'",
        slot_id,
    )
    return rows
