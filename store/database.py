"""The Store: every read and write Slotcast makes to PostgreSQL.

Every write command runs through `Store._run`, so a slot is never booked twice:
one READ COMMITTED transaction whose first statements take the doctors'
transaction-level advisory locks (in id order, so crossed commands cannot
deadlock); the idempotency key replayed if seen before; expired holds cleared;
then the command re-checks everything under the locks and writes; finally each
touched doctor's version is bumped once and its change record appended, all in
that transaction. The exclusion constraint on appointments stands behind it all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import orjson

from protocol.messages import (
    SERVER_MESSAGES,
    AppointmentUpdated,
    AppointmentView,
    Booked,
    Dashboard,
    DoctorView,
    Held,
    Message,
    Rescheduled,
    ScheduleUpdated,
    SlotUpdated,
    SlotView,
    Snapshot,
)
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from store import commands as cmd
from store import sql
from store.changes import Change
from store.commands import SYSTEM, Actor, Tx
from store.constants import LOCK_NS_DOCTOR, LOCK_NS_PATIENT
from store.errors import (
    Forbidden,
    HoldExpired,
    HoldLimit,
    IdempotencyConflict,
    Invalid,
    InvalidTransition,
    NotFound,
    NotHolder,
    SlotTaken,
    StoreError,
    translated,
)
from store.schedule import Block, zone

log = logging.getLogger(__name__)

OnCommit = Callable[[list[Change]], None]
Work = Callable[[Tx], Awaitable[Message | None]]


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: Message | None  # None for system work (expiry, slot upkeep)
    changes: list[Change]  # empty for an idempotent replay


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
    buffer_minutes: int
    min_notice_minutes: int


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
    session_state: set[int] = set()
    with translated():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_reset_only_if(session_state),
            server_settings={
                "lock_timeout": str(lock_timeout_ms),
                "statement_timeout": str(statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(statement_timeout_ms * 5),
                "application_name": "slotcast",
            },
        )
    try:
        yield Store(pool, session_state)
    finally:
        await pool.close()


def _reset_only_if(session_state: set[int]) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """A pool reset that costs a round trip only where session state may be left behind.

    asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release: one round trip per checkout, on every booking. Before this
    hook runs, asyncpg itself has dropped the connection's listeners and rolled back any
    transaction left open. The store leaves no other session state (no SET, LISTEN, WITH
    HOLD cursors or temporary tables: all its SQL is in `sql.py`) except the session
    advisory lock of `Store.exclusive`, which marks its connection (by backend pid) before
    locking: a marked connection gets the full reset, whatever happened to its unlock.
    Anything new that leaves session state must mark its connection the same way.
    """

    async def reset(conn: asyncpg.Connection) -> None:
        pid = conn.get_server_pid()
        if pid in session_state:
            session_state.discard(pid)
            await conn.execute(conn.get_reset_query())

    return reset


def _change(doctor_id: int, row: asyncpg.Record) -> Change:
    return Change(
        doctor_id, row["version"], row["public"], row["private"], row["created_at"].timestamp()
    )


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


class Store:
    def __init__(self, pool: asyncpg.Pool, session_state: set[int] | None = None) -> None:
        self._pool = pool
        # Backend pids of pooled connections that may hold session state (see open_store).
        self._session_state = session_state if session_state is not None else set()
        # Told of every commit's changes, in commit order per doctor; the server publishes them.
        self.on_commit: OnCommit = lambda changes: None

    # ---- the command runner ----------------------------------------------------------------------

    async def _run(
        self,
        *,
        actor: Actor,
        now: datetime,
        work: Work,
        doctors: Iterable[int] = (),
        of_slot: int | None = None,
        of_appointment: int | None = None,
        request: Message | None = None,
        key: str | None = None,
        patient_lock: str | None = None,
        taking: cmd.Taking | None = None,
    ) -> Outcome:
        """Run `work` under the locks of `doctors`, or of the doctor of `of_slot` or of
        `of_appointment`, found in the transaction's first statement (`not_found` if none).
        With `of_slot` (a booking or a hold: `taking` says what it inserts), the slot is read
        FOR UPDATE, and the appointment inserted if it passes, by the first read under the
        locks."""
        fingerprint: dict[str, Any] = {}
        if request is not None:
            fingerprint = msgspec.to_builtins(request)
            fingerprint.pop("idempotency_key", None)
        command = request.TYPE if request is not None else "system"
        target = _Target(sorted(set(doctors)), of_slot, of_appointment, patient_lock, taking)
        try:
            outcome, error = await self._attempt(
                target, actor, now, work, command, fingerprint, key
            )
        except _KeyRace:
            # The same subject's key was stored by a concurrent command on another doctor.
            with translated():
                async with self._pool.acquire() as conn:
                    replay = await self._replay(conn, actor, key, command, fingerprint)
            if replay is None:  # pragma: no cover - the conflicting insert committed
                raise IdempotencyConflict("key in use by an unfinished request") from None
            return Outcome(replay, [])
        if outcome.changes:
            self.on_commit(outcome.changes)
        if error is not None:
            raise error
        return outcome

    async def _command(
        self, doctors: list[int], actor: Actor, request: Any, now: datetime | None, work: Work
    ) -> Outcome:
        """`_run` for a client's command message, keyed by its own idempotency key."""
        return await self._run(
            doctors=doctors,
            actor=actor,
            now=_now(now),
            work=work,
            request=request,
            key=request.idempotency_key,
        )

    async def _lock(self, conn: asyncpg.Connection, target: _Target) -> list[int]:
        """Take the locks, doctors first in id order, then the patient's: the first statement."""
        if target.slot_id is None and target.appointment_id is None:
            for doctor_id in target.doctor_ids:
                await conn.execute(sql.DOCTOR_LOCK, LOCK_NS_DOCTOR, doctor_id)
            if target.patient is not None:
                await conn.execute(sql.PATIENT_LOCK, LOCK_NS_PATIENT, target.patient)
            return target.doctor_ids
        if target.slot_id is not None:
            if target.patient is not None:
                row = await conn.fetchrow(
                    sql.SLOT_DOCTOR_PATIENT_LOCK,
                    LOCK_NS_DOCTOR,
                    target.slot_id,
                    LOCK_NS_PATIENT,
                    target.patient,
                )
            else:
                row = await conn.fetchrow(sql.SLOT_DOCTOR_LOCK, LOCK_NS_DOCTOR, target.slot_id)
            if row is None:
                raise NotFound(f"no slot {target.slot_id}")
        else:
            assert target.patient is None  # no command locks a patient by appointment
            row = await conn.fetchrow(
                sql.APPOINTMENT_DOCTOR_LOCK, LOCK_NS_DOCTOR, target.appointment_id
            )
            if row is None:
                raise NotFound(f"no appointment {target.appointment_id}")
        return [row["doctor_id"]]

    async def _attempt(
        self,
        target: _Target,
        actor: Actor,
        now: datetime,
        work: Work,
        command: str,
        fingerprint: dict[str, Any],
        key: str | None,
    ) -> tuple[Outcome, StoreError | None]:
        with translated():
            async with self._pool.acquire() as conn, conn.transaction():
                doctor_ids = await self._lock(conn, target)
                # One round trip for the versions, the expired-hold check, the idempotency
                # record and the slot or appointment named: its snapshot follows the locks.
                if target.slot_id is not None:
                    first = await self._slot_prelude(conn, target, now, actor, key)
                elif target.appointment_id is not None:
                    first = await conn.fetchrow(
                        sql.APPOINTMENT_PRELUDE, now, str(actor), key, target.appointment_id
                    )
                    if first is None:  # pragma: no cover - appointments are never deleted
                        raise NotFound(f"no appointment {target.appointment_id}")
                else:
                    first = await conn.fetchrow(
                        sql.COMMAND_PRELUDE, doctor_ids, now, str(actor), key
                    )
                if first["key_command"] is not None:
                    return Outcome(self._replayed(first, command, fingerprint), []), None
                versions = dict(
                    zip(first["doctor_ids"] or [], first["versions"] or [], strict=True)
                )
                tx = Tx(conn, now, actor)
                if first["expired_holds"]:
                    for doctor_id in doctor_ids:
                        await cmd.expire_holds(tx, doctor_id)
                elif target.slot_id is not None:
                    tx.prefetched_slot = first  # nothing written since it was read
                    if first["taken_id"] is not None:
                        assert target.taking is not None
                        tx.taken = (target.taking, first)
                elif target.appointment_id is not None:
                    tx.prefetched_appointment = first  # nothing written since it was read
                before = tx.checkpoint()
                error: StoreError | None = None
                reply: Message | None = None
                if before:
                    # Expired holds to keep even if the command is refused: a savepoint
                    # lets a refusal undo only the command's own work.
                    try:
                        async with conn.transaction():
                            reply = await work(tx)
                    except StoreError as exc:
                        tx.restore(before)
                        error = exc
                else:
                    # Nothing to keep: a refusal rolls the whole transaction back, and
                    # the two round trips of a savepoint are saved on every command.
                    reply = await work(tx)
                if tx.taken is not None:  # pragma: no cover - the command must claim it
                    raise StoreError("an inserted appointment was not the command's")
                tx.prefetched_slot = tx.prefetched_appointment = None
                changes = await self._record(
                    conn, tx, versions, actor, key, command, fingerprint, reply
                )
                # A refused command still commits the holds it found expired.
                return Outcome(reply, changes), error

    async def _slot_prelude(
        self,
        conn: asyncpg.Connection,
        target: _Target,
        now: datetime,
        actor: Actor,
        key: str | None,
    ) -> asyncpg.Record:
        taking = target.taking
        assert taking is not None, "a command locating its doctor by slot inserts on it"
        try:
            row: asyncpg.Record | None = await conn.fetchrow(
                sql.SLOT_PRELUDE,
                now,
                str(actor),
                key,
                target.slot_id,
                taking.patient_id,
                taking.status.value,
                taking.hold_expires_at,
                taking.slot_status.value,
                taking.max_holds,
            )
        except (asyncpg.ExclusionViolationError, asyncpg.UniqueViolationError) as exc:
            # As in `cmd.insert_appointment`: the constraint behind every check fired, and
            # the whole transaction rolls back as this propagates.
            raise SlotTaken("the slot overlaps an active appointment") from exc
        if row is None:  # pragma: no cover - slots are never deleted
            raise NotFound(f"no slot {target.slot_id}")
        return row

    async def _record(
        self,
        conn: asyncpg.Connection,
        tx: Tx,
        versions: dict[int, int],
        actor: Actor,
        key: str | None,
        command: str,
        fingerprint: dict[str, Any],
        reply: Message | None,
    ) -> list[Change]:
        """Versions, change records and the idempotency record: one statement (`sql.RECORD`)."""
        built = tx.changes(versions)
        remember = reply is not None and key is not None
        if not built and not remember:
            return []
        response = (
            {"type": reply.TYPE, "body": msgspec.to_builtins(reply)} if reply is not None else None
        )
        row = await conn.fetchrow(
            sql.RECORD,
            [c.doctor_id for _, c in built],
            [c.version for _, c in built],
            [kind for kind, _ in built],
            [c.public for _, c in built],
            [c.private for _, c in built],
            str(actor),
            key if remember else None,
            command if remember else None,
            fingerprint if remember else None,
            response if remember else None,
        )
        if row["recorded"] != len(built):  # pragma: no cover - only a bug can get here
            raise StoreError("a doctor's version moved under its lock")
        if remember and not row["remembered"]:
            raise _KeyRace  # a concurrent command on another doctor stored it first
        return [c for _, c in built]

    @staticmethod
    def _replayed(row: Mapping[str, Any], command: str, fingerprint: dict[str, Any]) -> Message:
        """The reply stored under the key, if the key was used for this same request."""
        if row["key_command"] != command or row["key_request"] != fingerprint:
            raise IdempotencyConflict("this idempotency key was used for a different request")
        response = row["key_response"]
        reply: Message = msgspec.convert(response["body"], SERVER_MESSAGES[response["type"]])
        return reply

    async def _replay(
        self,
        conn: asyncpg.Connection,
        actor: Actor,
        key: str | None,
        command: str,
        fingerprint: dict[str, Any],
    ) -> Message | None:
        # Keys belong to the role and subject together: doctor "1" is not patient "1".
        row = await conn.fetchrow(sql.IDEMPOTENCY_GET, str(actor), key)
        if row is None:
            return None
        return self._replayed(
            {
                "key_command": row["command"],
                "key_request": row["request"],
                "key_response": row["response"],
            },
            command,
            fingerprint,
        )

    async def _doctor_of_slot(self, slot_id: int) -> int:
        with translated():  # a slot never changes doctor, so this is safe before the lock
            doctor_id: int | None = await self._pool.fetchval(sql.SLOT_DOCTOR, slot_id)
        if doctor_id is None:
            raise NotFound(f"no slot {slot_id}")
        return doctor_id

    async def _doctor_of_appointment(self, appointment_id: int) -> int:
        with translated():
            doctor_id: int | None = await self._pool.fetchval(
                sql.APPOINTMENT_DOCTOR, appointment_id
            )
        if doctor_id is None:
            raise NotFound(f"no appointment {appointment_id}")
        return doctor_id

    @contextlib.asynccontextmanager
    async def exclusive(self, namespace: int, key: int = 0) -> AsyncIterator[None]:
        """Hold a session advisory lock across several transactions (e.g. seeding)."""
        with translated():
            async with self._pool.acquire() as conn:
                # Fully reset on release even if the unlock below never runs.
                self._session_state.add(conn.get_server_pid())
                await conn.execute(sql.SESSION_LOCK, namespace, key)
                try:
                    yield
                finally:
                    await conn.execute(sql.SESSION_UNLOCK, namespace, key)

    # ---- health ----------------------------------------------------------------------------------

    async def ping(self) -> None:
        with translated():
            await self._pool.fetchval("SELECT 1")

    # ---- doctors ---------------------------------------------------------------------------------

    async def create_doctor(
        self,
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
        zone(timezone)  # refuse an unknown zone before it reaches the table
        with translated():
            async with self._pool.acquire() as conn, conn.transaction():
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
                await conn.execute(sql.RELAY_CURSOR_CREATE, doctor_id)
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

    # ---- reads -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _consistent(
        self, doctor_id: int
    ) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Record]]:
        """One repeatable-read snapshot: the doctor's row (its version) and what is read
        with it describe the same moment."""
        with translated():
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                doctor = await conn.fetchrow(sql.DOCTOR_GET, doctor_id)
                if doctor is None:
                    raise NotFound(f"no doctor {doctor_id}")
                yield conn, doctor

    async def snapshot(
        self, doctor_id: int, start: date, end: date, *, now: datetime | None = None
    ) -> Snapshot:
        """Slots of [start, end) in the doctor's local dates, stamped with one version."""
        now = _now(now)
        async with self._consistent(doctor_id) as (conn, doctor):
            rows = await conn.fetch(sql.SLOTS_IN_RANGE, doctor_id, start, end)
        return Snapshot(
            doctor_id=doctor_id,
            version=doctor["version"],
            timezone=doctor["timezone"],
            start=start,
            end=end,
            slots=[cmd.slot_view(r, hold_expires_at=r["hold_expires_at"]) for r in rows],
            bookable_from=now + timedelta(minutes=doctor["min_notice_minutes"]),
            bookable_until=now + timedelta(days=doctor["horizon_days"]),
        )

    async def dashboard(self, doctor_id: int, day: date) -> Dashboard:
        """A doctor's local day: appointments, slots and conflicts, stamped with one version."""
        async with self._consistent(doctor_id) as (conn, doctor):
            next_day = day + timedelta(days=1)
            slots = await conn.fetch(sql.SLOTS_IN_RANGE, doctor_id, day, next_day)
            appointments = await conn.fetch(sql.APPOINTMENTS_OF_DOCTOR_ON, doctor_id, day)
        return Dashboard(
            doctor_id=doctor_id,
            version=doctor["version"],
            timezone=doctor["timezone"],
            date=day,
            appointments=[cmd.appointment_view(r) for r in appointments],
            slots=[cmd.slot_view(r, hold_expires_at=r["hold_expires_at"]) for r in slots],
            conflicts=[r["id"] for r in slots if r["conflict"]],
        )

    async def changes_between(self, doctor_id: int, after: int, upto: int) -> list[Change]:
        """Committed changes with after < version <= upto, in order: the gap filler's source."""
        with translated():
            rows = await self._pool.fetch(sql.CHANGES_BETWEEN, doctor_id, after, upto)
        return [_change(doctor_id, r) for r in rows]

    # ---- the relay ----------------------------------------------------------------------------

    async def unpublished(self, *, older_than: datetime, limit: int = 500) -> list[Change]:
        """Changes committed before `older_than` that no publish has confirmed yet."""
        with translated():
            rows = await self._pool.fetch(sql.CHANGES_UNPUBLISHED, older_than, limit)
        return [_change(r["doctor_id"], r) for r in rows]

    async def mark_published(self, highest: dict[int, int]) -> None:
        """Advance doctors' relay cursors (never backwards) to the versions given."""
        if highest:
            with translated():
                await self._pool.execute(sql.RELAY_ADVANCE, list(highest), list(highest.values()))

    async def change_log(self, doctor_id: int) -> list[dict[str, Any]]:
        """The whole log of a doctor (audit, replay checks)."""
        with translated():
            rows = await self._pool.fetch(sql.CHANGES_ALL, doctor_id)
        return [dict(r) for r in rows]

    async def doctor_appointments(self, doctor_id: int, day: date) -> list[AppointmentView]:
        with translated():
            rows = await self._pool.fetch(sql.APPOINTMENTS_OF_DOCTOR_ON, doctor_id, day)
        return [cmd.appointment_view(r) for r in rows]

    async def patient_appointments(
        self, patient_id: str, *, now: datetime | None = None
    ) -> list[AppointmentView]:
        with translated():
            rows = await self._pool.fetch(
                sql.APPOINTMENTS_OF_PATIENT_UPCOMING, patient_id, _now(now)
            )
        return [cmd.appointment_view(r) for r in rows]

    # ---- availability ----------------------------------------------------------------------------

    async def materialize_slots(
        self, doctor_id: int, *, today: date | None = None, now: datetime | None = None
    ) -> Change | None:
        """Bring the doctor's slots in step with the schedule up to the horizon.

        Idempotent: a run that changes nothing records nothing. Booked slots the
        schedule no longer offers stay, flagged as conflicts.
        """

        async def work(tx: Tx) -> None:
            await cmd.rematerialize(tx, doctor_id, first_day=today)

        outcome = await self._run(doctors=[doctor_id], actor=SYSTEM, now=_now(now), work=work)
        return outcome.changes[0] if outcome.changes else None

    async def expire_holds(self, *, now: datetime | None = None) -> list[Change]:
        """Free every hold whose time is up, doctor by doctor (each under its lock)."""
        now = _now(now)
        with translated():
            doctors = [
                r["doctor_id"] for r in await self._pool.fetch(sql.DOCTORS_WITH_EXPIRED_HOLDS, now)
            ]
        changes: list[Change] = []
        for doctor_id in doctors:

            async def work(tx: Tx) -> None:
                return None  # _run clears the expired holds before any work

            outcome = await self._run(doctors=[doctor_id], actor=SYSTEM, now=now, work=work)
            changes.extend(outcome.changes)
        return changes

    # ---- patient commands ------------------------------------------------------------------------

    async def hold(
        self,
        actor: Actor,
        request: Any,
        *,
        ttl: timedelta,
        max_holds: int,
        now: datetime | None = None,
    ) -> Outcome:
        """Hold a free slot for `ttl`: the slot turns `busy-tentative` until confirmed."""
        now = _now(now)

        async def work(tx: Tx) -> Message:
            slot = await cmd.bookable_slot(tx, request.slot_id)
            # Counted with the slot by the first read (`sql.SLOT_PRELUDE`), under both locks.
            held = slot.get("active_holds")
            if held is None:
                held = await tx.conn.fetchval(sql.ACTIVE_HOLDS_OF_PATIENT, actor.subject, tx.now)
            if held >= max_holds:
                raise HoldLimit(f"at most {max_holds} holds at a time")
            expires = tx.now + ttl
            appointment = await cmd.insert_appointment(
                tx,
                slot,
                actor.subject,
                AppointmentStatus.PENDING,
                hold_expires_at=expires,
                slot_status=SlotStatus.BUSY_TENTATIVE,
            )
            view = cmd.slot_view(slot, SlotStatus.BUSY_TENTATIVE, hold_expires_at=expires)
            tx.slot(slot["doctor_id"], view, "slot.held")
            tx.appointment(appointment)
            return Held(appointment)

        return await self._run(
            of_slot=request.slot_id,
            actor=actor,
            now=now,
            work=work,
            request=request,
            key=request.idempotency_key,
            patient_lock=actor.subject,
            taking=cmd.Taking(
                actor.subject,
                AppointmentStatus.PENDING,
                SlotStatus.BUSY_TENTATIVE,
                hold_expires_at=now + ttl,
                max_holds=max_holds,
            ),
        )

    async def release(self, actor: Actor, request: Any, *, now: datetime | None = None) -> Outcome:
        doctor_id = await self._doctor_of_appointment(request.appointment_id)

        async def work(tx: Tx) -> Message:
            hold = await self._own_hold(tx, request.appointment_id)
            row = await tx.conn.fetchrow(
                sql.APPOINTMENT_CANCEL, hold.id, "released", tx.now, str(actor)
            )
            view = cmd.appointment_view(row)
            tx.appointment(view, "hold.released")
            await cmd.free_slot(tx, doctor_id, view.slot_id, "hold.released")
            return AppointmentUpdated(view)

        return await self._command([doctor_id], actor, request, now, work)

    async def _own_hold(self, tx: Tx, appointment_id: int) -> AppointmentView:
        row = await cmd.locked_appointment_row(tx, appointment_id)
        hold = cmd.appointment_view(row)
        if hold.patient_id != tx.actor.subject:
            raise NotHolder("this hold belongs to someone else")
        if cmd.expired_hold(row):
            raise HoldExpired("the hold has expired; the slot may be taken")
        if hold.status is not AppointmentStatus.PENDING:
            raise InvalidTransition(f"the appointment is {hold.status.value}, not a hold")
        return hold

    async def book_command(
        self, actor: Actor, request: Any, *, now: datetime | None = None
    ) -> Outcome:
        """Book a free slot directly, or confirm the caller's own hold (`hold_id`)."""
        if (request.slot_id is None) == (request.hold_id is None):
            raise Invalid("give exactly one of `slot_id` and `hold_id`")

        async def work(tx: Tx) -> Message:
            if request.hold_id is not None:
                hold = await self._own_hold(tx, request.hold_id)
                row = await tx.conn.fetchrow(
                    sql.HOLD_CONFIRM,
                    hold.id,
                    AppointmentStatus.BOOKED.value,
                    tx.now,
                    SlotStatus.BUSY.value,
                )
                appointment = cmd.appointment_view(row)
                slot = SlotView(
                    id=hold.slot_id,
                    start=row["slot_starts_at"],
                    end=row["slot_ends_at"],
                    status=SlotStatus.BUSY,
                )
            else:
                booked = await cmd.bookable_slot(tx, request.slot_id)
                appointment = await cmd.insert_appointment(
                    tx, booked, actor.subject, AppointmentStatus.BOOKED, slot_status=SlotStatus.BUSY
                )
                slot = cmd.slot_view(booked, SlotStatus.BUSY)
            tx.slot(appointment.doctor_id, slot, "slot.booked")
            tx.appointment(appointment)
            return Booked(appointment)

        return await self._run(
            of_slot=request.slot_id,
            of_appointment=request.hold_id,
            actor=actor,
            now=_now(now),
            work=work,
            request=request,
            key=request.idempotency_key,
            taking=cmd.Taking(actor.subject, AppointmentStatus.BOOKED, SlotStatus.BUSY),
        )

    async def book(
        self,
        *,
        slot_id: int,
        patient_id: str,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> Booking:
        """Book a free slot for a patient, exactly once per idempotency key."""
        from protocol.messages import Book

        outcome = await self.book_command(
            Actor(patient_id, Role.PATIENT), Book(slot_id, idempotency_key), now=now
        )
        assert isinstance(outcome.reply, Booked)
        change = next((c for c in outcome.changes if c.public["slots"]), None)
        return Booking(outcome.reply.appointment, change)

    # ---- patient or doctor commands --------------------------------------------------------------

    async def cancel(self, actor: Actor, request: Any, *, now: datetime | None = None) -> Outcome:
        doctor_id = await self._doctor_of_appointment(request.appointment_id)

        async def work(tx: Tx) -> Message:
            appointment = await cmd.locked_appointment(tx, request.appointment_id)
            if not actor.may_manage(appointment):
                raise Forbidden("not your appointment")
            if appointment.status is not AppointmentStatus.BOOKED:
                hint = (
                    " (release the hold instead)" if appointment.status.value == "pending" else ""
                )
                raise InvalidTransition(
                    f"cannot cancel an appointment that is {appointment.status.value}{hint}"
                )
            row = await tx.conn.fetchrow(
                sql.APPOINTMENT_CANCEL, appointment.id, request.reason, tx.now, str(actor)
            )
            view = cmd.appointment_view(row)
            tx.appointment(view, "appointment.cancelled")
            await cmd.free_slot(tx, doctor_id, view.slot_id, "appointment.cancelled")
            return AppointmentUpdated(view)

        return await self._command([doctor_id], actor, request, now, work)

    async def reschedule(
        self, actor: Actor, request: Any, *, now: datetime | None = None
    ) -> Outcome:
        """Move a booked appointment to another free slot, maybe another doctor's: atomic."""
        old_doctor = await self._doctor_of_appointment(request.appointment_id)
        new_doctor = await self._doctor_of_slot(request.slot_id)

        async def work(tx: Tx) -> Message:
            old = await cmd.locked_appointment(tx, request.appointment_id)
            if not actor.may_manage(old) or (
                actor.role is Role.DOCTOR and new_doctor != old_doctor
            ):
                raise Forbidden("not your appointment")
            if old.status is not AppointmentStatus.BOOKED:
                raise InvalidTransition(f"a {old.status.value} appointment cannot be moved")
            slot = await cmd.bookable_slot(tx, request.slot_id, moving=old.id)
            row = await tx.conn.fetchrow(
                sql.APPOINTMENT_CANCEL, old.id, "rescheduled", tx.now, str(actor)
            )
            replaced = cmd.appointment_view(row)
            tx.appointment(replaced, "appointment.rescheduled")
            await cmd.free_slot(tx, old_doctor, old.slot_id, "appointment.rescheduled")
            new = await cmd.insert_appointment(
                tx,
                slot,
                old.patient_id,
                AppointmentStatus.BOOKED,
                replaces_id=old.id,
                slot_status=SlotStatus.BUSY,
            )
            tx.slot(new_doctor, cmd.slot_view(slot, SlotStatus.BUSY), "appointment.rescheduled")
            tx.appointment(new)
            return Rescheduled(appointment=new, replaced=replaced)

        return await self._command([old_doctor, new_doctor], actor, request, now, work)

    # ---- doctor commands -------------------------------------------------------------------------

    async def set_blocked(
        self, actor: Actor, request: Any, *, blocked: bool, now: datetime | None = None
    ) -> Outcome:
        """Block a free slot (`busy-unavailable`) or unblock it."""
        doctor_id = await self._doctor_of_slot(request.slot_id)
        if not actor.owns_doctor(doctor_id):
            raise Forbidden("only the doctor or an admin manages these slots")
        before, after = (
            (SlotStatus.FREE, SlotStatus.BUSY_UNAVAILABLE)
            if blocked
            else (SlotStatus.BUSY_UNAVAILABLE, SlotStatus.FREE)
        )

        async def work(tx: Tx) -> Message:
            slot = await cmd.locked_slot(tx, request.slot_id)
            if slot["retired_at"] is not None or SlotStatus(slot["status"]) is not before:
                raise InvalidTransition(
                    f"only a {before.value} slot can be {'blocked' if blocked else 'unblocked'}"
                )
            await tx.conn.execute(sql.SLOT_SET_STATUS, slot["id"], after.value)
            view = cmd.slot_view(slot, after)
            tx.slot(doctor_id, view, "slot.blocked" if blocked else "slot.unblocked")
            return SlotUpdated(doctor_id, view)

        return await self._command([doctor_id], actor, request, now, work)

    async def mark(self, actor: Actor, request: Any, *, now: datetime | None = None) -> Outcome:
        """Record arrived / fulfilled / noshow along FHIR's lifecycle."""
        doctor_id = await self._doctor_of_appointment(request.appointment_id)
        if not actor.owns_doctor(doctor_id):
            raise Forbidden("only the doctor or an admin records attendance")

        async def work(tx: Tx) -> Message:
            appointment = await cmd.locked_appointment(tx, request.appointment_id)
            target = AppointmentStatus(request.status)
            if target not in cmd.MARKABLE.get(appointment.status, frozenset()):
                raise InvalidTransition(
                    f"cannot go from {appointment.status.value} to {target.value}"
                )
            row = await tx.conn.fetchrow(
                sql.APPOINTMENT_SET_STATUS, appointment.id, target.value, tx.now
            )
            view = cmd.appointment_view(row)
            tx.appointment(view, f"appointment.{target.value}")
            return AppointmentUpdated(view)

        return await self._command([doctor_id], actor, request, now, work)

    async def set_schedule(
        self, actor: Actor, request: Any, *, now: datetime | None = None
    ) -> Outcome:
        """Replace the doctor's rules and weekly blocks and overrides; slots follow."""
        doctor_id = request.doctor_id
        if not actor.owns_doctor(doctor_id):
            raise Forbidden("only the doctor or an admin edits the schedule")
        await self.doctor(doctor_id)  # not_found before any lock
        for b in request.weekly:
            if not b.start < b.end:
                raise Invalid(f"weekday {b.weekday}: start must be before end")
        for o in request.overrides:
            if (o.start is None) != (o.end is None) or (o.start and o.end and o.start >= o.end):
                raise Invalid(f"{o.date}: give both times with start before end, or neither")

        async def work(tx: Tx) -> Message:
            version = await tx.conn.fetchval(sql.DOCTOR_VERSION, doctor_id)
            await tx.conn.execute(
                sql.DOCTOR_SET_RULES,
                doctor_id,
                request.slot_minutes,
                request.buffer_minutes,
                request.min_notice_minutes,
                request.horizon_days,
            )
            await tx.conn.execute(sql.SCHEDULE_CLEAR, doctor_id)
            await tx.conn.executemany(
                sql.SCHEDULE_INSERT,
                [(doctor_id, b.weekday, b.start, b.end) for b in request.weekly],
            )
            await tx.conn.execute(sql.OVERRIDES_CLEAR, doctor_id)
            await tx.conn.executemany(
                sql.OVERRIDE_INSERT,
                [(doctor_id, o.date, o.start, o.end) for o in request.overrides],
            )
            result = await cmd.rematerialize(tx, doctor_id)
            tx.touched(doctor_id, "schedule.changed")  # rules changed even if no slot did
            return ScheduleUpdated(
                doctor_id=doctor_id,
                version=version + 1,
                opened=result.opened,
                removed=result.removed,
                conflicts=result.conflicts,
            )

        return await self._command([doctor_id], actor, request, now, work)


@dataclass(frozen=True, slots=True)
class _Target:
    """Whose locks a command takes: `doctor_ids`, or the doctor of a slot or appointment."""

    doctor_ids: list[int]
    slot_id: int | None
    appointment_id: int | None
    patient: str | None  # also the patient's lock (holds), taken after the doctor's
    taking: cmd.Taking | None  # with slot_id: what the command inserts on the slot


class _KeyRace(Exception):
    """Two transactions on different doctors inserted the same idempotency key."""
