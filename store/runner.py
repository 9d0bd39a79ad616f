"""The one way a write reaches PostgreSQL.

Every write command runs through `run`, so a slot is never booked twice: one
READ COMMITTED transaction whose first statements take the doctors'
transaction-level advisory locks (in id order, so crossed commands cannot
deadlock); the idempotency key replayed if seen before; expired holds cleared;
then the command re-checks everything under the locks and writes; finally each
touched doctor's version is bumped once and its change record appended, all in
that transaction. The exclusion constraint on appointments stands behind it all.
After the commit the changes go to the store's commit hook (the outbox). The
handle and its bounds are `store.pool`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar, Protocol, cast

import asyncpg
import msgspec

from protocol.messages import SERVER_MESSAGES, Message
from store import sql, steps
from store.changes import Change
from store.constants import LOCK_NS_DOCTOR, LOCK_NS_PATIENT
from store.errors import (
    IdempotencyConflict,
    NotFound,
    SlotTaken,
    StoreError,
)
from store.pool import Store
from store.tx import Actor, LockTarget, Outcome, Reply, Taking, Tx, resolve_now

log = logging.getLogger(__name__)


# ---- the command runner ------------------------------------------------------------------------


class Request(Protocol):
    """A client's command message: what `run` fingerprints and keys its replay by."""

    TYPE: ClassVar[str]

    @property
    def idempotency_key(self) -> str | None: ...


async def run(
    store: Store,
    *,
    actor: Actor,
    now: datetime,
    work: Callable[[Tx], Awaitable[Reply]],
    doctors: Iterable[int] = (),
    of_slot: int | None = None,
    of_appointment: int | None = None,
    request: Request | None = None,
    key: str | None = None,
    patient_lock: str | None = None,
    taking: Taking | None = None,
) -> Outcome[Reply]:
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
    target = LockTarget(sorted(set(doctors)), of_slot, of_appointment, patient_lock, taking)
    try:
        outcome, error = await _attempt(store, target, actor, now, work, command, fingerprint, key)
    except _KeyRace:
        # The same subject's key was stored by a concurrent command on another doctor.
        async with store.connection() as conn:
            replay = await _replay(conn, actor, key, command, fingerprint)
        if replay is None:  # pragma: no cover - the conflicting insert committed
            raise IdempotencyConflict("key in use by an unfinished request") from None
        return Outcome(cast(Reply, replay), [])
    if outcome.changes:
        store.on_commit(outcome.changes)
    if error is not None:
        raise error
    return outcome


async def run_command(
    store: Store,
    doctors: list[int],
    actor: Actor,
    msg: Request,
    now: datetime | None,
    work: Callable[[Tx], Awaitable[Reply]],
) -> Outcome[Reply]:
    """`run` for a client's command message, keyed by its own idempotency key."""
    return await run(
        store,
        doctors=doctors,
        actor=actor,
        now=resolve_now(now),
        work=work,
        request=msg,
        key=msg.idempotency_key,
    )


async def _lock(
    conn: asyncpg.Connection, target: LockTarget, actor: Actor, key: str | None
) -> list[int]:
    """Take the locks, doctors first in id order, then the patient's: the first statement.

    A slot already booked is refused here, before any lock (see `sql.SLOT_DOCTOR_LOCK`)."""
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
                str(actor),
                key,
            )
        else:
            row = await conn.fetchrow(
                sql.SLOT_DOCTOR_LOCK, LOCK_NS_DOCTOR, target.slot_id, str(actor), key
            )
        if row is None:
            raise NotFound(f"no slot {target.slot_id}")
        if row["refused"]:
            raise SlotTaken("the slot is already taken")
    else:
        assert target.patient is None  # no command locks a patient by appointment
        row = await conn.fetchrow(
            sql.APPOINTMENT_DOCTOR_LOCK, LOCK_NS_DOCTOR, target.appointment_id
        )
        if row is None:
            raise NotFound(f"no appointment {target.appointment_id}")
    return [row["doctor_id"]]


async def _attempt(
    store: Store,
    target: LockTarget,
    actor: Actor,
    now: datetime,
    work: Callable[[Tx], Awaitable[Reply]],
    command: str,
    fingerprint: dict[str, Any],
    key: str | None,
) -> tuple[Outcome[Reply], StoreError | None]:
    timings = store.timings
    asked = time.perf_counter()
    async with store.connection() as conn:
        acquired = time.perf_counter()
        timings.observe("pool_wait", acquired - asked)
        async with conn.transaction():
            outcome, error, locked = await _locked(
                conn, target, actor, now, work, command, fingerprint, key
            )
            worked = time.perf_counter()
        committed = time.perf_counter()
    timings.observe("lock_wait", locked - acquired)
    timings.observe("statements", worked - locked)
    timings.observe("commit", committed - worked)
    return outcome, error


async def _locked(
    conn: asyncpg.Connection,
    target: LockTarget,
    actor: Actor,
    now: datetime,
    work: Callable[[Tx], Awaitable[Reply]],
    command: str,
    fingerprint: dict[str, Any],
    key: str | None,
) -> tuple[Outcome[Reply], StoreError | None, float]:
    """The transaction's statements, from the locks on; also when the locks were held
    (`time.perf_counter()`), for the stage timings."""
    doctor_ids = await _lock(conn, target, actor, key)
    locked = time.perf_counter()
    # One round trip for the versions, the expired-hold check, the idempotency
    # record and the slot or appointment named: its snapshot follows the locks.
    if target.slot_id is not None:
        first = await _slot_prelude(conn, target, now, actor, key)
    elif target.appointment_id is not None:
        first = await conn.fetchrow(
            sql.APPOINTMENT_PRELUDE, now, str(actor), key, target.appointment_id
        )
        if first is None:  # pragma: no cover - appointments are never deleted
            raise NotFound(f"no appointment {target.appointment_id}")
    else:
        first = await conn.fetchrow(sql.COMMAND_PRELUDE, doctor_ids, now, str(actor), key)
    if first["key_command"] is not None:
        # The stored reply is of the type this very command returned the first time.
        replayed = _replayed(first, command, fingerprint)
        return Outcome(cast(Reply, replayed), []), None, locked
    versions = dict(zip(first["doctor_ids"] or [], first["versions"] or [], strict=True))
    tx = Tx(conn, now, actor)
    if first["expired_holds"]:
        for doctor_id in doctor_ids:
            await steps.expire_holds(tx, doctor_id)
    elif target.slot_id is not None:
        tx.prefetched_slot = first  # nothing written since it was read
        if first["taken_id"] is not None:
            assert target.taking is not None
            tx.taken = (target.taking, first)
    elif target.appointment_id is not None:
        tx.prefetched_appointment = first  # nothing written since it was read
    before = tx.checkpoint()
    error: StoreError | None = None
    reply: Reply | None = None
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
    for doctor_id in tx.created:  # inserted by this command, at version 0
        versions.setdefault(doctor_id, 0)
    changes = await _record(conn, tx, versions, actor, key, command, fingerprint, reply)
    # A refused command still commits the holds it found expired; its `reply` is
    # None then, but `run` raises `error` instead of returning it.
    return Outcome(cast(Reply, reply), changes), error, locked


async def _slot_prelude(
    conn: asyncpg.Connection,
    target: LockTarget,
    now: datetime,
    actor: Actor,
    key: str | None,
) -> asyncpg.Record:
    taking = target.taking
    assert taking is not None, "a command locating its doctor by slot inserts on it"
    limits = taking.limits
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
            limits.per_doctor if limits is not None else None,
            limits.total if limits is not None else None,
            limits.cooldown if limits is not None and limits.cooldown > timedelta(0) else None,
            taking.patient_name,
            taking.visit_reason,
            taking.patient_contact,
        )
    except (asyncpg.ExclusionViolationError, asyncpg.UniqueViolationError) as exc:
        # As in `steps.insert_appointment`: the constraint behind every check fired, and
        # the whole transaction rolls back as this propagates.
        raise SlotTaken("the slot overlaps an active appointment") from exc
    if row is None:  # pragma: no cover - slots are never deleted
        raise NotFound(f"no slot {target.slot_id}")
    return row


async def _record(
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
        [c.private.to_builtins() for _, c in built],
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


def _replayed(row: Mapping[str, Any], command: str, fingerprint: dict[str, Any]) -> Message:
    """The reply stored under the key, if the key was used for this same request."""
    if row["key_command"] != command or row["key_request"] != fingerprint:
        raise IdempotencyConflict("this idempotency key was used for a different request")
    response = row["key_response"]
    reply: Message = msgspec.convert(response["body"], SERVER_MESSAGES[response["type"]])
    return reply


async def _replay(
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
    return _replayed(
        {
            "key_command": row["command"],
            "key_request": row["request"],
            "key_response": row["response"],
        },
        command,
        fingerprint,
    )


class _KeyRace(Exception):
    """Two transactions on different doctors inserted the same idempotency key."""


# ---- before the locks ------------------------------------------------------------------------


async def doctor_of_slot(store: Store, slot_id: int) -> int:
    # A slot never changes doctor, so this is safe before the lock.
    doctor_id: int | None = await store.fetchval(sql.SLOT_DOCTOR, slot_id)
    if doctor_id is None:
        raise NotFound(f"no slot {slot_id}")
    return doctor_id


async def doctor_of_appointment(store: Store, appointment_id: int) -> int:
    # Nor does an appointment.
    doctor_id: int | None = await store.fetchval(sql.APPOINTMENT_DOCTOR, appointment_id)
    if doctor_id is None:
        raise NotFound(f"no appointment {appointment_id}")
    return doctor_id
