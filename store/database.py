"""The Store: every read and write Slotcast makes to PostgreSQL.

Write commands follow one discipline, so a slot is never booked twice:
one READ COMMITTED transaction whose first statement takes the doctor's
transaction-level advisory lock; every check re-done under that lock; the write,
the doctor's version bump and its change record committed together. The
exclusion constraint on appointments stands behind all of it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import msgspec
import orjson

from protocol.messages import AppointmentView, DoctorView, SlotView, Snapshot
from protocol.vocabulary import AppointmentStatus, SlotStatus
from store import sql
from store.changes import Change
from store.constants import LOCK_NS_DOCTOR
from store.errors import (
    IdempotencyConflict,
    NotFound,
    SlotTaken,
    SlotUnavailable,
    TooLate,
    translated,
)
from store.schedule import Block, slot_times, zone

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Booking:
    appointment: AppointmentView
    change: Change | None  # None when an idempotent retry returned the first result


@dataclass(frozen=True, slots=True)
class Doctor:
    id: int
    name: str
    specialty: str
    timezone: str
    slot_minutes: int
    horizon_days: int
    version: int


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


@contextlib.asynccontextmanager
async def open_store(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    lock_timeout_ms: int = 1000,
    statement_timeout_ms: int = 2000,
) -> AsyncIterator[Store]:
    """A pool whose every connection fails fast on a stuck lock or a runaway statement."""
    with translated():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            server_settings={
                "lock_timeout": str(lock_timeout_ms),
                "statement_timeout": str(statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(statement_timeout_ms * 5),
                "application_name": "slotcast",
            },
        )
    try:
        yield Store(pool)
    finally:
        await pool.close()


def _slot(row: asyncpg.Record) -> SlotView:
    return SlotView(
        id=row["id"], start=row["starts_at"], end=row["ends_at"], status=SlotStatus(row["status"])
    )


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def _locked(self, doctor_id: int) -> AsyncIterator[asyncpg.Connection]:
        """A write transaction holding the doctor's lock from its first statement."""
        with translated():
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(sql.DOCTOR_LOCK, LOCK_NS_DOCTOR, doctor_id)
                yield conn

    async def _record_change(
        self,
        conn: asyncpg.Connection,
        doctor_id: int,
        kind: str,
        actor: str | None,
        slots: list[SlotView],
    ) -> Change:
        version = await conn.fetchval(sql.DOCTOR_BUMP_VERSION, doctor_id)
        change = Change.of_slots(doctor_id, version, slots)
        await conn.execute(sql.CHANGE_INSERT, doctor_id, version, kind, actor, change.public)
        return change

    @contextlib.asynccontextmanager
    async def exclusive(self, namespace: int, key: int = 0) -> AsyncIterator[None]:
        """Hold a session advisory lock across several transactions (e.g. seeding)."""
        with translated():
            async with self._pool.acquire() as conn:
                await conn.execute(sql.SESSION_LOCK, namespace, key)
                try:
                    yield
                finally:
                    await conn.execute(sql.SESSION_UNLOCK, namespace, key)

    # ---- health -------------------------------------------------------------------------------

    async def ping(self) -> None:
        with translated():
            await self._pool.fetchval("SELECT 1")

    # ---- doctors ------------------------------------------------------------------------------

    async def create_doctor(
        self,
        *,
        name: str,
        timezone: str,
        specialty: str = "",
        slot_minutes: int = 30,
        horizon_days: int = 28,
        schedule: Sequence[Block] = (),
    ) -> int:
        zone(timezone)  # refuse an unknown zone before it reaches the table
        with translated():
            async with self._pool.acquire() as conn, conn.transaction():
                doctor_id: int = await conn.fetchval(
                    sql.DOCTOR_INSERT, name, specialty, timezone, slot_minutes, horizon_days
                )
                await conn.executemany(
                    sql.SCHEDULE_INSERT,
                    [(doctor_id, b.weekday, b.starts, b.ends) for b in schedule],
                )
        return doctor_id

    async def doctor(self, doctor_id: int) -> Doctor:
        with translated():
            row = await self._pool.fetchrow(sql.DOCTOR_GET, doctor_id)
        if row is None:
            raise NotFound(f"no doctor {doctor_id}")
        return Doctor(**dict(row))

    async def doctor_ids(self) -> list[int]:
        with translated():
            return [r["id"] for r in await self._pool.fetch(sql.DOCTOR_IDS)]

    async def search_doctors(
        self, query: str | None, *, limit: int = 20, offset: int = 0
    ) -> list[DoctorView]:
        with translated():
            rows = await self._pool.fetch(sql.DOCTOR_SEARCH, query or None, limit, offset)
        return [DoctorView(**dict(r)) for r in rows]

    async def doctor_count(self) -> int:
        with translated():
            count: int = await self._pool.fetchval(sql.DOCTOR_COUNT)
        return count

    async def doctor_version(self, doctor_id: int) -> int:
        with translated():
            version: int | None = await self._pool.fetchval(sql.DOCTOR_VERSION, doctor_id)
        if version is None:
            raise NotFound(f"no doctor {doctor_id}")
        return version

    # ---- slots --------------------------------------------------------------------------------

    async def materialize_slots(
        self, doctor_id: int, *, today: date | None = None
    ) -> Change | None:
        """Create the slots the schedule promises up to the horizon; record them as a change.

        Idempotent: slots that already exist are left as they are, and a run that
        adds nothing records nothing.
        """
        doctor = await self.doctor(doctor_id)
        tz = zone(doctor.timezone)
        first = today or datetime.now(tz).date()
        with translated():
            blocks = [
                Block(r["weekday"], r["starts"], r["ends"])
                for r in await self._pool.fetch(sql.SCHEDULE_FOR_DOCTOR, doctor_id)
            ]
        times = list(slot_times(blocks, tz, first, doctor.horizon_days, doctor.slot_minutes))
        if not times:
            return None
        async with self._locked(doctor_id) as conn:
            rows = await conn.fetch(
                sql.SLOTS_INSERT_MISSING,
                doctor_id,
                [s for s, _ in times],
                [e for _, e in times],
            )
            if not rows:
                return None
            return await self._record_change(
                conn, doctor_id, "slots.opened", None, [_slot(r) for r in rows]
            )

    async def snapshot(self, doctor_id: int, start: date, end: date) -> Snapshot:
        """Slots of [start, end) in the doctor's local dates, stamped with one version."""
        with translated():
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                doctor = await conn.fetchrow(sql.DOCTOR_GET, doctor_id)
                if doctor is None:
                    raise NotFound(f"no doctor {doctor_id}")
                rows = await conn.fetch(sql.SLOTS_IN_RANGE, doctor_id, start, end)
        return Snapshot(
            doctor_id=doctor_id,
            version=doctor["version"],
            timezone=doctor["timezone"],
            start=start,
            end=end,
            slots=[_slot(r) for r in rows],
        )

    async def changes_between(self, doctor_id: int, after: int, upto: int) -> list[Change]:
        """Committed changes with after < version <= upto, in order: the gap filler's source."""
        with translated():
            rows = await self._pool.fetch(sql.CHANGES_BETWEEN, doctor_id, after, upto)
        return [Change(doctor_id, r["version"], r["public"]) for r in rows]

    # ---- booking ------------------------------------------------------------------------------

    async def book(
        self,
        *,
        slot_id: int,
        patient_id: str,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> Booking:
        """Book a free slot for a patient, exactly once per idempotency key."""
        with translated():
            # A slot never changes doctor, so reading it before the lock is safe.
            doctor_id = await self._pool.fetchval(sql.SLOT_DOCTOR, slot_id)
        if doctor_id is None:
            raise NotFound(f"no slot {slot_id}")
        request = {"slot_id": slot_id}
        try:
            async with self._locked(doctor_id) as conn:
                if idempotency_key is not None:
                    first = await self._replay(conn, patient_id, idempotency_key, "book", request)
                    if first is not None:
                        return first
                booking = await self._book_locked(conn, slot_id, patient_id, now)
                if idempotency_key is not None:
                    await self._remember(
                        conn, patient_id, idempotency_key, "book", request, booking.appointment
                    )
                return booking
        except _KeyRace:
            pass
        # Another doctor's transaction stored this key first; return what it stored.
        with translated():
            async with self._pool.acquire() as conn:
                first = await self._replay(conn, patient_id, idempotency_key, "book", request)
        if first is None:  # pragma: no cover - the conflicting insert committed
            raise IdempotencyConflict("idempotency key in use by an unfinished request")
        return first

    async def _replay(
        self,
        conn: asyncpg.Connection,
        subject: str,
        key: str | None,
        command: str,
        request: dict[str, Any],
    ) -> Booking | None:
        row = await conn.fetchrow(sql.IDEMPOTENCY_GET, subject, key)
        if row is None:
            return None
        if row["command"] != command or row["request"] != request:
            raise IdempotencyConflict("this idempotency key was used for a different request")
        return Booking(msgspec.convert(row["response"], AppointmentView), change=None)

    async def _remember(
        self,
        conn: asyncpg.Connection,
        subject: str,
        key: str,
        command: str,
        request: dict[str, Any],
        response: AppointmentView,
    ) -> None:
        try:
            async with conn.transaction():
                await conn.execute(
                    sql.IDEMPOTENCY_PUT,
                    subject,
                    key,
                    command,
                    request,
                    msgspec.to_builtins(response),
                )
        except asyncpg.UniqueViolationError as exc:
            raise _KeyRace from exc

    async def _book_locked(
        self, conn: asyncpg.Connection, slot_id: int, patient_id: str, now: datetime | None
    ) -> Booking:
        slot = await conn.fetchrow(sql.SLOT_FOR_UPDATE, slot_id)
        status = SlotStatus(slot["status"])
        if status is SlotStatus.BUSY_UNAVAILABLE:
            raise SlotUnavailable("the doctor has blocked this slot")
        if status is not SlotStatus.FREE:
            raise SlotTaken("the slot is already taken")
        if slot["starts_at"] <= (now or datetime.now(UTC)):
            raise TooLate("the slot has already started")
        try:
            async with conn.transaction():  # savepoint: a duplicate key must not poison the tx
                appointment_id = await conn.fetchval(
                    sql.APPOINTMENT_INSERT,
                    slot["doctor_id"],
                    slot_id,
                    patient_id,
                    slot["starts_at"],
                    slot["ends_at"],
                    AppointmentStatus.BOOKED.value,
                )
        except asyncpg.ExclusionViolationError as exc:
            log.error("overlap refused by constraint for slot %s: %s", slot_id, exc)
            raise SlotTaken("the slot overlaps an active appointment") from exc
        await conn.execute(sql.SLOT_SET_STATUS, slot_id, SlotStatus.BUSY.value)
        booked = SlotView(slot_id, slot["starts_at"], slot["ends_at"], SlotStatus.BUSY)
        change = await self._record_change(
            conn, slot["doctor_id"], "slot.booked", patient_id, [booked]
        )
        appointment = AppointmentView(
            id=appointment_id,
            slot_id=slot_id,
            doctor_id=slot["doctor_id"],
            patient_id=patient_id,
            start=slot["starts_at"],
            end=slot["ends_at"],
            status=AppointmentStatus.BOOKED,
        )
        return Booking(appointment, change)


class _KeyRace(Exception):
    """Two transactions on different doctors inserted the same idempotency key."""
