"""The steps of every scheduling command, run inside a locked transaction.

`runner.run` opens the transaction and takes the doctors' advisory locks; the
functions here re-check everything under those locks and write. They never
commit, publish or bump versions themselves: they report what they changed to
the `Tx`, which turns it into exactly one version and one change record per
doctor when the command succeeds. What was true before the locks is never
trusted here: every rule a booking must obey is checked again on the locked row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg

from protocol.messages import AppointmentView, SlotView
from protocol.vocabulary import AppointmentStatus, SlotStatus
from store import sql
from store.errors import (
    AppointmentLimit,
    Cooldown,
    Forbidden,
    HoldExpired,
    HoldLimit,
    InvalidTransition,
    NotFound,
    NotHolder,
    OutsideHorizon,
    SlotTaken,
    SlotUnavailable,
    StoreError,
    TooLate,
)
from store.schedule import Block, offered, window, zone
from store.tx import Limits, Taking, Tx

# The FHIR lifecycle a doctor may record; cancellation and holds have their own commands.
MARKABLE: dict[AppointmentStatus, frozenset[AppointmentStatus]] = {
    AppointmentStatus.BOOKED: frozenset({AppointmentStatus.ARRIVED, AppointmentStatus.NOSHOW}),
    AppointmentStatus.ARRIVED: frozenset({AppointmentStatus.FULFILLED}),
}


# Undoing a mark: the status each mark came from.
UNMARKED: dict[AppointmentStatus, AppointmentStatus] = {
    AppointmentStatus.ARRIVED: AppointmentStatus.BOOKED,
    AppointmentStatus.NOSHOW: AppointmentStatus.BOOKED,
    AppointmentStatus.FULFILLED: AppointmentStatus.ARRIVED,
}


# ---- reading rows ------------------------------------------------------------------------------


def appointment_view(row: asyncpg.Record, prefix: str = "") -> AppointmentView:
    """The appointment as the protocol shows it: an expiry only while it is a pending hold.

    The row keeps a released or lapsed hold's expiry (the re-hold cool-down counts from
    it); clients see null, as `docs/protocol.md` says.
    """
    status = AppointmentStatus(row[prefix + "status"])
    return AppointmentView(
        id=row[prefix + "id"],
        slot_id=row[prefix + "slot_id"],
        doctor_id=row[prefix + "doctor_id"],
        patient_id=row[prefix + "patient_id"],
        start=row[prefix + "starts_at"],
        end=row[prefix + "ends_at"],
        status=status,
        hold_expires_at=row[prefix + "hold_expires_at"]
        if status is AppointmentStatus.PENDING
        else None,
        replaces_id=row[prefix + "replaces_id"],
        cancel_reason=row[prefix + "cancel_reason"],
        cancelled_at=row[prefix + "cancelled_at"],
        patient_name=row[prefix + "patient_name"],
        visit_reason=row[prefix + "visit_reason"],
        patient_contact=row[prefix + "patient_contact"],
    )


def slot_view(row: asyncpg.Record, status: SlotStatus | None = None, **extra: Any) -> SlotView:
    return SlotView(
        id=row["id"],
        start=row["starts_at"],
        end=row["ends_at"],
        status=status or SlotStatus(row["status"]),
        **extra,
    )


async def locked_slot(tx: Tx, slot_id: int) -> asyncpg.Record:
    row = tx.prefetched_slot
    tx.prefetched_slot = None  # good for one read: the command may write the slot next
    if row is not None and row["id"] == slot_id:
        return row
    row = await tx.conn.fetchrow(sql.SLOT_FOR_UPDATE, slot_id)
    if row is None:
        raise NotFound(f"no slot {slot_id}")
    return row


async def locked_appointment(tx: Tx, appointment_id: int) -> AppointmentView:
    return appointment_view(await locked_appointment_row(tx, appointment_id))


async def locked_appointment_row(tx: Tx, appointment_id: int) -> asyncpg.Record:
    row = tx.prefetched_appointment
    tx.prefetched_appointment = None  # good for one read: the command may write it next
    if row is not None and row["id"] == appointment_id:
        return row
    row = await tx.conn.fetchrow(sql.APPOINTMENT_FOR_UPDATE, appointment_id)
    if row is None:
        raise NotFound(f"no appointment {appointment_id}")
    return row


def expired_hold(row: asyncpg.Record) -> bool:
    """Cancelled by the system's expiry (`sql.HOLDS_EXPIRE`, the only canceller named
    'system': people are `role:subject`), not by anyone's words (reasons are free text)."""
    return bool(row["status"] == "cancelled" and row["cancelled_by"] == "system")


async def own_hold(tx: Tx, appointment_id: int, patient_id: str) -> AppointmentView:
    """`patient_id`'s hold, still pending: what a release or a confirm may act on. The
    actor is that patient, or acts for them on this hold's doctor."""
    row = await locked_appointment_row(tx, appointment_id)
    hold = appointment_view(row)
    if hold.patient_id != patient_id:
        raise NotHolder("this hold belongs to someone else")
    if tx.actor.on_behalf(patient_id) and not tx.actor.owns_doctor(hold.doctor_id):
        raise Forbidden("only the doctor, an admin or a key for this doctor acts for a patient")
    if expired_hold(row):
        raise HoldExpired("the hold has expired; the slot may be taken")
    if hold.status is not AppointmentStatus.PENDING:
        raise InvalidTransition(f"the appointment is {hold.status.value}, not a hold")
    return hold


# ---- shared steps ------------------------------------------------------------------------------


async def expire_holds(tx: Tx, doctor_id: int) -> None:
    """Cancel the doctor's holds whose time is up and free their slots."""
    for row in await tx.conn.fetch(sql.HOLDS_EXPIRE, doctor_id, tx.now):
        view = appointment_view(row)
        tx.appointment(view, "hold.expired")
        await free_slot(tx, doctor_id, view.slot_id, "hold.expired")


async def cancel_appointment(
    tx: Tx, doctor_id: int, appointment_id: int, reason: str, kind: str
) -> AppointmentView:
    """Cancel an appointment and give its slot back, as one change of `kind`: a release,
    a cancellation and the old half of a reschedule are the same two writes."""
    row = await tx.conn.fetchrow(
        sql.APPOINTMENT_CANCEL, appointment_id, reason, tx.now, str(tx.actor)
    )
    view = appointment_view(row)
    tx.appointment(view, kind)
    await free_slot(tx, doctor_id, view.slot_id, kind)
    return view


async def free_slot(tx: Tx, doctor_id: int, slot_id: int, kind: str) -> None:
    """Give a slot back: free again, or retired if the schedule no longer offers it."""
    slot = await locked_slot(tx, slot_id)
    if slot["conflict"]:
        await tx.conn.execute(sql.SLOT_RETIRE, slot_id, tx.now)
        await tx.conn.execute(sql.SLOT_SET_STATUS, slot_id, SlotStatus.FREE.value)
        tx.removed(doctor_id, slot_id, kind)
        return
    await tx.conn.execute(sql.SLOT_SET_STATUS, slot_id, SlotStatus.FREE.value)
    tx.slot(doctor_id, slot_view(slot, SlotStatus.FREE), kind)


async def bookable_slot(tx: Tx, slot_id: int, *, moving: int | None = None) -> asyncpg.Record:
    """The slot, if a patient may take it now: free, offered, in notice and horizon, clear
    of the doctor's buffer around other appointments (`moving` is the one being replaced)."""
    slot = await locked_slot(tx, slot_id)
    status = SlotStatus(slot["status"])
    if slot["retired_at"] is not None:
        raise SlotUnavailable("the slot is no longer offered")
    if status is SlotStatus.BUSY_UNAVAILABLE:
        raise SlotUnavailable("the doctor has blocked this slot")
    if status is not SlotStatus.FREE:
        raise SlotTaken("the slot is already taken")
    start: datetime = slot["starts_at"]
    if start <= tx.now or start < tx.now + timedelta(minutes=slot["min_notice_minutes"]):
        raise TooLate(
            "the slot has already started"
            if start <= tx.now
            else f"book at least {slot['min_notice_minutes']} minutes ahead"
        )
    if start >= tx.now + timedelta(days=slot["horizon_days"]):
        raise OutsideHorizon(f"book at most {slot['horizon_days']} days ahead")
    buffer = timedelta(minutes=slot["buffer_minutes"])
    # A slot read by `sql.SLOT_PRELUDE` carries the answer (for moving=None) as `buffer_clash`.
    clash = slot.get("buffer_clash") if moving is None else None
    if buffer and clash is None:
        clash = await tx.conn.fetchval(
            sql.BUFFER_CLASH, slot["doctor_id"], start - buffer, slot["ends_at"] + buffer, moving
        )
    if buffer and clash:
        raise SlotUnavailable("the slot is too close to another appointment")
    return slot


async def claimable(
    tx: Tx,
    slot: asyncpg.Record,
    patient_id: str,
    limits: Limits | None,
    *,
    max_holds: int | None = None,
) -> None:
    """Refuse a hold or a booking of `slot` (as `bookable_slot` returned it) that the
    patient may not claim now: their own hold on it ended less than the cool-down ago
    (`cooldown`), they hold `max_holds` slots already (holds only: `hold_limit`), or
    `limits` caps their active future appointments with this doctor or in all
    (`appointment_limit`). The first read counted it all with the slot when it could
    (`sql.SLOT_PRELUDE`); otherwise it is counted now. Either way under the doctor's lock
    (the per-doctor count and the slot's history) and the patient's (the totals)."""
    if limits is None and max_holds is None:
        return
    cooldown = limits.cooldown if limits is not None else timedelta(0)
    # A row of the first read has the columns (a `name in record` test is by field name).
    quota: asyncpg.Record | None = slot if "cooled_until" in slot else None
    if quota is None:
        quota = await tx.conn.fetchrow(
            sql.PATIENT_QUOTA,
            patient_id,
            tx.now,
            slot["doctor_id"],
            slot["id"],
            cooldown if cooldown > timedelta(0) else None,
        )
        assert quota is not None  # an aggregate always returns its row
    cooled_until: datetime | None = quota["cooled_until"]
    if cooldown > timedelta(0) and cooled_until is not None and cooled_until > tx.now:
        raise Cooldown(
            "you gave this slot back a moment ago; it is open to other patients until "
            + cooled_until.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            retry_after=cooled_until - tx.now,
        )
    if max_holds is not None and quota["active_holds"] >= max_holds:
        raise HoldLimit(f"at most {max_holds} holds at a time")
    if limits is None:
        return
    if quota["active_here"] >= limits.per_doctor:
        raise AppointmentLimit(
            f"at most {limits.per_doctor} upcoming appointments (booked or held) with one doctor"
        )
    if quota["active_total"] >= limits.total:
        raise AppointmentLimit(
            f"at most {limits.total} upcoming appointments (booked or held) in all"
        )


async def insert_appointment(
    tx: Tx,
    slot: asyncpg.Record,
    patient_id: str,
    status: AppointmentStatus,
    *,
    hold_expires_at: datetime | None = None,
    replaces_id: int | None = None,
    slot_status: SlotStatus,
    patient_name: str | None = None,
    visit_reason: str | None = None,
    patient_contact: str | None = None,
) -> AppointmentView:
    """Insert the appointment and set its slot's status, in one statement, unless the
    runner's first read already did exactly that (`Tx.taken`)."""
    if tx.taken is not None:
        taking, row = tx.taken
        tx.taken = None
        asked = Taking(patient_id, status, slot_status, hold_expires_at)
        done = Taking(taking.patient_id, taking.status, taking.slot_status, taking.hold_expires_at)
        if row["taken_slot_id"] != slot["id"] or replaces_id is not None or asked != done:
            raise StoreError("the first read inserted another appointment")  # pragma: no cover
        return appointment_view(row, prefix="taken_")
    try:
        row = await tx.conn.fetchrow(
            sql.APPOINTMENT_INSERT_TAKING_SLOT,
            slot["doctor_id"],
            slot["id"],
            patient_id,
            slot["starts_at"],
            slot["ends_at"],
            status.value,
            hold_expires_at,
            replaces_id,
            slot_status.value,
            patient_name,
            visit_reason,
            patient_contact,
        )
    except (asyncpg.ExclusionViolationError, asyncpg.UniqueViolationError) as exc:
        # The constraint behind every check fired; the command (or its savepoint) is
        # rolled back as this propagates, so no statement may follow in this transaction.
        raise SlotTaken("the slot overlaps an active appointment") from exc
    return appointment_view(row)


@dataclass(frozen=True, slots=True)
class Rematerialized:
    opened: int
    removed: int
    conflicts: list[int]


async def rematerialize(tx: Tx, doctor_id: int, *, first_day: date | None = None) -> Rematerialized:
    """Make the doctor's future slots match the schedule, from `first_day` (local) on.

    Wanted slots that are missing are opened; free or blocked slots the schedule no
    longer offers are retired; booked or held ones are never dropped: they stay,
    flagged as conflicts for the doctor to resolve (and cleared if the schedule
    offers them again). Past slots are history and left alone.
    """
    doctor = await tx.conn.fetchrow(sql.DOCTOR_GET, doctor_id)
    if doctor is None:
        raise NotFound(f"no doctor {doctor_id}")
    tz = zone(doctor["timezone"])
    first, window_start = window(tz, tx.now, first_day)
    blocks = [
        Block(r["weekday"], r["starts"], r["ends"])
        for r in await tx.conn.fetch(sql.SCHEDULE_FOR_DOCTOR, doctor_id)
    ]
    overrides: dict[date, list[tuple[time, time]]] = {}
    for r in await tx.conn.fetch(sql.OVERRIDES_FOR_DOCTOR, doctor_id):
        hours = overrides.setdefault(r["day"], [])
        if r["starts"] is not None:
            hours.append((r["starts"], r["ends"]))
    wanted = offered(
        blocks,
        tz,
        first,
        window_start,
        days=doctor["horizon_days"],
        slot_minutes=doctor["slot_minutes"],
        buffer_minutes=doctor["buffer_minutes"],
        overrides=overrides,
    )
    kept: set[tuple[datetime, datetime]] = set()
    occupied: list[tuple[datetime, datetime]] = []  # booked or held, with the buffer around
    buffer = timedelta(minutes=doctor["buffer_minutes"])
    removed = 0
    conflicts: list[int] = []
    for row in await tx.conn.fetch(sql.SLOTS_OPEN_FROM, doctor_id, window_start):
        key = (row["starts_at"], row["ends_at"])
        status = SlotStatus(row["status"])
        if status in (SlotStatus.BUSY, SlotStatus.BUSY_TENTATIVE):
            occupied.append((key[0] - buffer, key[1] + buffer))
        if key in wanted:
            kept.add(key)
            if row["conflict"]:
                await tx.conn.execute(sql.SLOT_SET_CONFLICT, row["id"], False)
                tx.touched(doctor_id, "slots.conflict_resolved")
        elif status in (SlotStatus.FREE, SlotStatus.BUSY_UNAVAILABLE):
            await tx.conn.execute(sql.SLOT_RETIRE, row["id"], tx.now)
            tx.removed(doctor_id, row["id"], "slots.closed")
            removed += 1
        else:
            conflicts.append(row["id"])  # every open conflict, not only the new ones
            if not row["conflict"]:
                await tx.conn.execute(sql.SLOT_SET_CONFLICT, row["id"], True)
                tx.conflict(doctor_id, row["id"])
                tx.touched(doctor_id, "slots.conflict")
    # Never open a free slot that a kept booking (or hold) makes impossible to book.
    missing = sorted(
        (s, e)
        for s, e in wanted - kept
        if not any(s < o_end and o_start < e for o_start, o_end in occupied)
    )
    opened = 0
    if missing:
        rows = await tx.conn.fetch(
            sql.SLOTS_INSERT_MISSING, doctor_id, [s for s, _ in missing], [e for _, e in missing]
        )
        for r in rows:
            tx.slot(doctor_id, slot_view(r), "slots.opened")
        opened = len(rows)
    return Rematerialized(opened, removed, conflicts)
