"""Everything the server reads without a lock: snapshots, dashboards, the change log.

A read that pairs rows with a doctor's version (a snapshot, a dashboard) reads
both in one repeatable-read transaction, so the version describes exactly the
rows sent with it and the deltas after it apply on top without a gap or a
repeat. The other reads are single statements.

Those reads may run on a read replica (`store.replicas`), which can be behind the
primary. They take a `min_version`: the doctor's version is read first, and below
it the read stops at once with `Behind`, before reading any slot, so a replica
that has not replayed what the caller already knows never answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import asyncpg

from protocol.messages import (
    AppointmentView,
    BlockNote,
    Dashboard,
    DayOverride,
    DoctorView,
    PreviewSchedule,
    Schedule,
    SchedulePreview,
    SlotView,
    Snapshot,
    WeeklyBlock,
)
from store import schedule as rules
from store import sql
from store.changes import Change
from store.errors import DoctorRetired, Invalid, NotFound
from store.pool import Store
from store.steps import appointment_view, slot_view
from store.tx import resolve_now


@dataclass(frozen=True, slots=True)
class AppointmentEntry:
    """An appointment with what a calendar file names besides it: whom and in which zone."""

    appointment: AppointmentView
    doctor_name: str
    doctor_timezone: str


class Behind(Exception):
    """The database read is older than the version the caller already knows (a replica
    that has not replayed it yet). Never leaves the store: `store.replicas` waits or
    reads the primary instead."""

    def __init__(self, doctor_id: int, version: int, wanted: int) -> None:
        super().__init__(f"doctor {doctor_id} is at version {version} here, {wanted} wanted")
        self.version = version


@contextlib.asynccontextmanager
async def _consistent(
    store: Store, doctor_id: int, min_version: int = 0
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Record]]:
    """One repeatable-read snapshot: the doctor's row (its version) and what is read
    with it describe the same moment; `Behind` if that version is below `min_version`."""
    async with (
        store.connection() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        doctor = await conn.fetchrow(sql.DOCTOR_GET, doctor_id)
        if doctor is None:
            raise NotFound(f"no doctor {doctor_id}")
        if doctor["version"] < min_version:
            raise Behind(doctor_id, doctor["version"], min_version)
        yield conn, doctor


async def snapshot(
    store: Store,
    doctor_id: int,
    start: date,
    end: date,
    *,
    now: datetime | None = None,
    max_slots: int | None = None,
    min_version: int = 0,
) -> Snapshot:
    """Slots of [start, end) in the doctor's local dates, stamped with one version.

    More than `max_slots` slots is `Invalid`, without reading the rest.
    """
    now = resolve_now(now)
    async with _consistent(store, doctor_id, min_version) as (conn, doctor):
        if doctor["retired_at"] is not None:
            raise DoctorRetired(f"doctor {doctor_id} is retired and offers no slots")
        rows = await _slots(conn, doctor_id, start, end, max_slots, "the range")
    return Snapshot(
        doctor_id=doctor_id,
        version=doctor["version"],
        timezone=doctor["timezone"],
        start=start,
        end=end,
        slots=[slot_view(r, hold_expires_at=r["hold_expires_at"]) for r in rows],
        bookable_from=now + timedelta(minutes=doctor["min_notice_minutes"]),
        bookable_until=now + timedelta(days=doctor["horizon_days"]),
    )


async def next_available(
    store: Store,
    doctor_id: int,
    *,
    after: datetime | None = None,
    now: datetime | None = None,
    min_version: int = 0,
) -> tuple[int, SlotView | None]:
    """The doctor's first slot a patient may hold at `now`, starting at or after `after`:
    past the notice, before the horizon, clear of the buffer; None when there is none.
    With the doctor's version it was read at."""
    now = resolve_now(now)
    async with _consistent(store, doctor_id, min_version) as (conn, doctor):
        if doctor["retired_at"] is not None:
            raise DoctorRetired(f"doctor {doctor_id} is retired and offers no slots")
        earliest = now + timedelta(minutes=doctor["min_notice_minutes"])
        # The notice may be zero: a slot starting this instant has started.
        earliest = max(earliest, now + timedelta(microseconds=1), after or earliest)
        row = await conn.fetchrow(
            sql.NEXT_AVAILABLE,
            doctor_id,
            earliest,
            now + timedelta(days=doctor["horizon_days"]),
            timedelta(minutes=doctor["buffer_minutes"]),
        )
    return doctor["version"], None if row is None else slot_view(row)


async def schedule(store: Store, doctor_id: int) -> Schedule:
    """The doctor's rules, weekly hours and date overrides, read together."""
    async with _consistent(store, doctor_id) as (conn, doctor):
        weekly = await conn.fetch(sql.SCHEDULE_FOR_DOCTOR, doctor_id)
        overrides = await conn.fetch(sql.OVERRIDES_FOR_DOCTOR, doctor_id)
    return Schedule(
        doctor_id=doctor_id,
        weekly=[WeeklyBlock(r["weekday"], r["starts"], r["ends"]) for r in weekly],
        overrides=[DayOverride(r["day"], r["starts"], r["ends"]) for r in overrides],
        slot_minutes=doctor["slot_minutes"],
        buffer_minutes=doctor["buffer_minutes"],
        min_notice_minutes=doctor["min_notice_minutes"],
        horizon_days=doctor["horizon_days"],
    )


async def dashboard(
    store: Store,
    doctor_id: int,
    day: date,
    *,
    max_slots: int | None = None,
    min_version: int = 0,
) -> Dashboard:
    """A doctor's local day: appointments, slots and conflicts, stamped with one version."""
    async with _consistent(store, doctor_id, min_version) as (conn, doctor):
        next_day = day + timedelta(days=1)
        slots = await _slots(conn, doctor_id, day, next_day, max_slots, "the day")
        appointments = await conn.fetch(sql.APPOINTMENTS_OF_DOCTOR_ON, doctor_id, day)
    return Dashboard(
        doctor_id=doctor_id,
        version=doctor["version"],
        timezone=doctor["timezone"],
        date=day,
        appointments=[appointment_view(r) for r in appointments],
        slots=[slot_view(r, hold_expires_at=r["hold_expires_at"]) for r in slots],
        conflicts=[r["id"] for r in slots if r["conflict"]],
        blocks=[BlockNote(r["id"], r["block_reason"]) for r in slots if r["block_reason"]],
    )


async def _slots(
    conn: asyncpg.Connection,
    doctor_id: int,
    start: date,
    end: date,
    max_slots: int | None,
    what: str,
) -> list[asyncpg.Record]:
    """The doctor's slots of [start, end), refused past `max_slots` (None: no bound)."""
    limit = None if max_slots is None else max_slots + 1
    rows: list[asyncpg.Record] = await conn.fetch(sql.SLOTS_IN_RANGE, doctor_id, start, end, limit)
    if max_slots is not None and len(rows) > max_slots:
        raise Invalid(f"{what} holds more than {max_slots} slots: ask for fewer days")
    return rows


async def doctor_version(store: Store, doctor_id: int) -> int:
    version: int | None = await store.fetchval(sql.DOCTOR_VERSION, doctor_id)
    if version is None:
        raise NotFound(f"no doctor {doctor_id}")
    return version


async def resume(
    store: Store, doctor_id: int, since: int, *, max_versions: int, min_version: int = 0
) -> tuple[int, list[Change] | None]:
    """The doctor's version, and the changes after `since` if the log can replay them all
    (at most `max_versions`); None means: send a snapshot instead.

    On one connection: the version first (`Behind` below `min_version`), then the log up
    to it. Committed changes never change, so no transaction is needed to pair them.
    """
    async with store.connection() as conn:
        current: int | None = await conn.fetchval(sql.DOCTOR_VERSION, doctor_id)
        if current is None:
            raise NotFound(f"no doctor {doctor_id}")
        if current < min_version:
            raise Behind(doctor_id, current, min_version)
        if since > current or current - since > max_versions:
            return current, None
        rows = await conn.fetch(sql.CHANGES_BETWEEN, doctor_id, since, current)
    changes = [Change.of_record(doctor_id, r) for r in rows]
    return current, changes if len(changes) == current - since else None


async def changes_between(store: Store, doctor_id: int, after: int, upto: int) -> list[Change]:
    """Committed changes with after < version <= upto, in order: the gap filler's source."""
    rows = await store.fetch(sql.CHANGES_BETWEEN, doctor_id, after, upto)
    return [Change.of_record(doctor_id, r) for r in rows]


async def change_log(store: Store, doctor_id: int) -> list[dict[str, Any]]:
    """The whole log of a doctor, rows as stored (audit, replay checks)."""
    rows = await store.fetch(sql.CHANGES_ALL, doctor_id)
    return [dict(r) for r in rows]


async def search_doctors(
    store: Store,
    query: str | None,
    *,
    limit: int = 20,
    offset: int = 0,
    include_retired: bool = False,
) -> list[DoctorView]:
    """Active doctors; with `include_retired` (admins) all, with their staff-system ids."""
    rows = await store.fetch(sql.DOCTOR_SEARCH, query or None, limit, offset, include_retired)
    return [DoctorView(**dict(r)) for r in rows]


async def doctor_appointments(store: Store, doctor_id: int, day: date) -> list[AppointmentView]:
    rows = await store.fetch(sql.APPOINTMENTS_OF_DOCTOR_ON, doctor_id, day)
    return [appointment_view(r) for r in rows]


async def patient_appointments(
    store: Store, patient_id: str, *, now: datetime | None = None
) -> list[AppointmentView]:
    rows = await store.fetch(sql.APPOINTMENTS_OF_PATIENT_UPCOMING, patient_id, resolve_now(now))
    return [appointment_view(r) for r in rows]


async def schedule_preview(
    store: Store, msg: PreviewSchedule, *, now: datetime | None = None, limit: int = 200
) -> SchedulePreview:
    """The appointments that `set_schedule` with `msg`'s body would leave in conflict now:
    every booked, arrived or live held one whose slot the new rules no longer offer, laid
    out exactly as `steps.rematerialize` would lay them (`schedule.offered`). A read: the
    rules and appointments are read together, nothing is locked or written. The first
    `limit` by start are listed, `total` counts them all."""
    now = resolve_now(now)
    async with _consistent(store, msg.doctor_id) as (conn, doctor):
        if doctor["retired_at"] is not None:
            raise DoctorRetired(f"doctor {msg.doctor_id} is retired: no hours can be set")
        tz = rules.zone(doctor["timezone"])
        first, window_start = rules.window(tz, now)
        holding = await conn.fetch(sql.APPOINTMENTS_HOLDING_FROM, msg.doctor_id, window_start, now)
    overrides: dict[date, list[tuple[time, time]]] = {}
    for o in msg.overrides:
        hours = overrides.setdefault(o.date, [])
        if o.start is not None and o.end is not None:
            hours.append((o.start, o.end))
    wanted = rules.offered(
        [rules.Block(b.weekday, b.start, b.end) for b in msg.weekly],
        tz,
        first,
        window_start,
        days=msg.horizon_days,
        slot_minutes=msg.slot_minutes,
        buffer_minutes=msg.buffer_minutes,
        overrides=overrides,
    )
    conflicts = [r for r in holding if (r["starts_at"], r["ends_at"]) not in wanted]
    return SchedulePreview(
        doctor_id=msg.doctor_id,
        conflicts=[appointment_view(r) for r in conflicts[:limit]],
        total=len(conflicts),
    )


async def appointment_entry(store: Store, appointment_id: int) -> AppointmentEntry:
    """Read on the primary: a patient downloads the file right after booking, and a replica
    behind would answer `not_found` for the appointment they were just shown."""
    row = await store.fetchrow(sql.APPOINTMENT_WITH_DOCTOR, appointment_id)
    if row is None:
        raise NotFound(f"no appointment {appointment_id}")
    return AppointmentEntry(appointment_view(row), row["doctor_name"], row["doctor_timezone"])
