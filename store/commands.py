"""One function per scheduling command: a typed message in, a typed outcome out.

Each says what to lock (a doctor, or the doctor of a slot or appointment, found by
the locking statement) and what to do under the lock, in terms of `steps`; the
runner does the rest (transaction, idempotency, expired holds, versions, change
records, the commit hook). Checks that need no lock (ownership by doctor id,
well-formed input) happen here first, so a refusal costs no transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from protocol.messages import (
    AppointmentUpdated,
    AppointmentView,
    Block,
    BlockRange,
    Book,
    Booked,
    Cancel,
    Held,
    Hold,
    Mark,
    PreviewSchedule,
    Release,
    Reschedule,
    Rescheduled,
    ScheduleUpdated,
    SetSchedule,
    SlotsUpdated,
    SlotUpdated,
    SlotView,
    Unblock,
    UnblockRange,
    Unmark,
)
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from store import directory, doctors, schedule, sql, steps
from store.changes import Change
from store.errors import (
    AppointmentLimit,
    DoctorRetired,
    Forbidden,
    Invalid,
    InvalidTransition,
    OutsideHorizon,
    TooEarly,
)
from store.pool import Store
from store.runner import doctor_of_appointment, doctor_of_slot, run, run_command
from store.tx import SYSTEM, Actor, Limits, Outcome, Taking, Tx, resolve_now

ZERO = timedelta(0)


# ---- patient commands --------------------------------------------------------------------------


async def hold(
    store: Store,
    actor: Actor,
    msg: Hold,
    *,
    ttl: timedelta,
    max_holds: int,
    limits: Limits | None,
    now: datetime | None = None,
) -> Outcome[Held]:
    """Hold a free slot for `ttl`: the slot turns `busy-tentative` until confirmed.

    A hold counts against the patient's `limits` like a booking (confirming it later
    adds nothing), and at most `max_holds` may be live at once. On a patient's behalf
    (`patient_id`), the limits are that patient's."""
    now = resolve_now(now)
    patient = actor.patient(msg.patient_id)
    name = _name(actor, msg.patient_id, msg.patient_name)

    async def work(tx: Tx) -> Held:
        slot = await steps.bookable_slot(tx, msg.slot_id)
        _acting_for(tx, patient, msg.patient_id, slot["doctor_id"])
        await steps.claimable(tx, slot, patient, limits, max_holds=max_holds)
        expires = tx.now + ttl
        appointment = await steps.insert_appointment(
            tx,
            slot,
            patient,
            AppointmentStatus.PENDING,
            hold_expires_at=expires,
            slot_status=SlotStatus.BUSY_TENTATIVE,
            patient_name=name,
            visit_reason=msg.visit_reason,
            patient_contact=msg.patient_contact,
        )
        view = steps.slot_view(slot, SlotStatus.BUSY_TENTATIVE, hold_expires_at=expires)
        tx.slot(slot["doctor_id"], view, "slot.held")
        tx.appointment(appointment)
        return Held(appointment)

    return await run(
        store,
        of_slot=msg.slot_id,
        actor=actor,
        now=now,
        work=work,
        request=msg,
        key=msg.idempotency_key,
        patient_lock=patient,
        taking=Taking(
            patient,
            AppointmentStatus.PENDING,
            SlotStatus.BUSY_TENTATIVE,
            hold_expires_at=now + ttl,
            max_holds=max_holds,
            limits=limits,
            patient_name=name,
            visit_reason=msg.visit_reason,
            patient_contact=msg.patient_contact,
        ),
    )


async def release(
    store: Store, actor: Actor, msg: Release, *, now: datetime | None = None
) -> Outcome[AppointmentUpdated]:
    doctor_id = await doctor_of_appointment(store, msg.appointment_id)
    patient = actor.patient(msg.patient_id)

    async def work(tx: Tx) -> AppointmentUpdated:
        hold = await steps.own_hold(tx, msg.appointment_id, patient)
        _acting_for(tx, patient, msg.patient_id, doctor_id)
        view = await steps.cancel_appointment(tx, doctor_id, hold.id, "released", "hold.released")
        return AppointmentUpdated(view)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def book(
    store: Store,
    actor: Actor,
    msg: Book,
    *,
    limits: Limits | None,
    now: datetime | None = None,
) -> Outcome[Booked]:
    """Book a free slot directly, or confirm the caller's own hold (`hold_id`).

    A direct booking is held to the patient's `limits` (under the patient's lock too, so
    two bookings with two doctors at once cannot both pass the total); confirming a hold
    is not, since the hold already counted."""
    if (msg.slot_id is None) == (msg.hold_id is None):
        raise Invalid("give exactly one of `slot_id` and `hold_id`")
    patient = actor.patient(msg.patient_id)
    name = _name(actor, msg.patient_id, msg.patient_name)

    async def work(tx: Tx) -> Booked:
        if msg.hold_id is not None:
            hold = await steps.own_hold(tx, msg.hold_id, patient)
            _acting_for(tx, patient, msg.patient_id, hold.doctor_id)
            row = await tx.conn.fetchrow(
                sql.HOLD_CONFIRM,
                hold.id,
                AppointmentStatus.BOOKED.value,
                tx.now,
                SlotStatus.BUSY.value,
                msg.visit_reason,
                msg.patient_contact,
            )
            appointment = steps.appointment_view(row)
            slot = SlotView(
                id=hold.slot_id,
                start=row["slot_starts_at"],
                end=row["slot_ends_at"],
                status=SlotStatus.BUSY,
            )
        else:
            assert msg.slot_id is not None  # exactly one of the two, checked above
            booked = await steps.bookable_slot(tx, msg.slot_id)
            _acting_for(tx, patient, msg.patient_id, booked["doctor_id"])
            await steps.claimable(tx, booked, patient, limits)
            appointment = await steps.insert_appointment(
                tx,
                booked,
                patient,
                AppointmentStatus.BOOKED,
                slot_status=SlotStatus.BUSY,
                patient_name=name,
                visit_reason=msg.visit_reason,
                patient_contact=msg.patient_contact,
            )
            slot = steps.slot_view(booked, SlotStatus.BUSY)
        tx.slot(appointment.doctor_id, slot, "slot.booked")
        tx.appointment(appointment)
        return Booked(appointment)

    return await run(
        store,
        of_slot=msg.slot_id,
        of_appointment=msg.hold_id,
        actor=actor,
        now=resolve_now(now),
        work=work,
        request=msg,
        key=msg.idempotency_key,
        patient_lock=patient if msg.slot_id is not None and limits is not None else None,
        taking=Taking(
            patient,
            AppointmentStatus.BOOKED,
            SlotStatus.BUSY,
            limits=limits,
            patient_name=name,
            visit_reason=msg.visit_reason,
            patient_contact=msg.patient_contact,
        ),
    )


def _name(actor: Actor, patient_id: str | None, given: str | None) -> str | None:
    """The display name stored with a new appointment: given by whoever acts for the
    patient, else the patient's own token's `name` claim (a patient names themselves
    only through their identity provider)."""
    return given if actor.on_behalf(patient_id) else actor.name


def _acting_for(tx: Tx, patient: str, patient_id: str | None, doctor_id: int) -> None:
    """Someone acting for a patient may do so with this doctor (the doctor themselves, an
    admin, a key for this doctor): the audit then names the patient beside the actor."""
    if not tx.actor.on_behalf(patient_id):
        return
    if not tx.actor.owns_doctor(doctor_id):
        raise Forbidden("only the doctor, an admin or a key for this doctor acts for a patient")
    tx.on_behalf_of = patient


def _names(patient_id: str | None, appointment: AppointmentView) -> bool:
    """A `patient_id` sent with a cancel or reschedule must be the appointment's patient."""
    return patient_id is None or patient_id == appointment.patient_id


def _behalf(tx: Tx, appointment: AppointmentView) -> None:
    if tx.actor.role is not Role.PATIENT or tx.actor.key is not None:
        tx.on_behalf_of = appointment.patient_id


@dataclass(frozen=True, slots=True)
class Booking:
    appointment: AppointmentView
    change: Change | None  # None when an idempotent retry returned the first result


async def book_slot(
    store: Store,
    *,
    slot_id: int,
    patient_id: str,
    idempotency_key: str | None = None,
    limits: Limits | None = None,
    now: datetime | None = None,
) -> Booking:
    """Book a free slot for a patient, exactly once per idempotency key: `book` as the
    patient would send it, for seeding, tests and the booking benchmark (no `limits`
    unless given: the seed books many slots for few patients)."""
    outcome = await book(
        store,
        Actor(patient_id, Role.PATIENT),
        Book(slot_id, idempotency_key),
        limits=limits,
        now=now,
    )
    change = next((c for c in outcome.changes if c.public["slots"]), None)
    return Booking(outcome.reply.appointment, change)


# ---- patient or doctor commands ----------------------------------------------------------------


async def cancel(
    store: Store, actor: Actor, msg: Cancel, *, now: datetime | None = None
) -> Outcome[AppointmentUpdated]:
    doctor_id = await doctor_of_appointment(store, msg.appointment_id)

    async def work(tx: Tx) -> AppointmentUpdated:
        appointment = await steps.locked_appointment(tx, msg.appointment_id)
        if not actor.may_manage(appointment) or not _names(msg.patient_id, appointment):
            raise Forbidden("not your appointment")
        _behalf(tx, appointment)
        if appointment.status is not AppointmentStatus.BOOKED:
            hint = " (release the hold instead)" if appointment.status.value == "pending" else ""
            raise InvalidTransition(
                f"cannot cancel an appointment that is {appointment.status.value}{hint}"
            )
        view = await steps.cancel_appointment(
            tx, doctor_id, appointment.id, msg.reason, "appointment.cancelled"
        )
        return AppointmentUpdated(view)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def reschedule(
    store: Store,
    actor: Actor,
    msg: Reschedule,
    *,
    limits: Limits | None,
    now: datetime | None = None,
) -> Outcome[Rescheduled]:
    """Move a booked appointment to another free slot, maybe another doctor's: atomic.

    A move keeps the patient's count: one appointment out, one in. Only a move to
    another doctor must fit under that doctor's cap in `limits` (counted under that
    doctor's lock, which every claim on that doctor takes); the cool-down does not
    apply, as a move claims nothing new."""
    old_doctor = await doctor_of_appointment(store, msg.appointment_id)
    new_doctor = await doctor_of_slot(store, msg.slot_id)

    async def work(tx: Tx) -> Rescheduled:
        old = await steps.locked_appointment(tx, msg.appointment_id)
        # A patient moves to any doctor; anyone else only to a doctor they may act for.
        patient_self = actor.role is Role.PATIENT and actor.key is None
        moving_away = not patient_self and not actor.owns_doctor(new_doctor)
        if not actor.may_manage(old) or moving_away or not _names(msg.patient_id, old):
            raise Forbidden("not your appointment")
        _behalf(tx, old)
        if old.status is not AppointmentStatus.BOOKED:
            raise InvalidTransition(f"a {old.status.value} appointment cannot be moved")
        slot = await steps.bookable_slot(tx, msg.slot_id, moving=old.id)
        if limits is not None and new_doctor != old_doctor:
            there = await tx.conn.fetchval(
                sql.ACTIVE_WITH_DOCTOR, old.patient_id, new_doctor, tx.now
            )
            if there >= limits.per_doctor:
                raise AppointmentLimit(
                    f"at most {limits.per_doctor} upcoming appointments (booked or held)"
                    " with one doctor"
                )
        replaced = await steps.cancel_appointment(
            tx, old_doctor, old.id, "rescheduled", "appointment.rescheduled"
        )
        new = await steps.insert_appointment(
            tx,
            slot,
            old.patient_id,
            AppointmentStatus.BOOKED,
            replaces_id=old.id,
            slot_status=SlotStatus.BUSY,
            patient_name=old.patient_name,
            visit_reason=old.visit_reason,
            patient_contact=old.patient_contact,
        )
        tx.slot(new_doctor, steps.slot_view(slot, SlotStatus.BUSY), "appointment.rescheduled")
        tx.appointment(new)
        return Rescheduled(appointment=new, replaced=replaced)

    return await run_command(store, [old_doctor, new_doctor], actor, msg, now, work)


# ---- doctor commands ---------------------------------------------------------------------------


async def block(
    store: Store, actor: Actor, msg: Block, *, now: datetime | None = None
) -> Outcome[SlotUpdated]:
    """Take a free slot off the calendar (`busy-unavailable`)."""
    return await _set_blocked(store, actor, msg, blocked=True, now=now)


async def unblock(
    store: Store, actor: Actor, msg: Unblock, *, now: datetime | None = None
) -> Outcome[SlotUpdated]:
    """Offer a blocked slot again."""
    return await _set_blocked(store, actor, msg, blocked=False, now=now)


async def _set_blocked(
    store: Store, actor: Actor, msg: Block | Unblock, *, blocked: bool, now: datetime | None
) -> Outcome[SlotUpdated]:
    doctor_id = await doctor_of_slot(store, msg.slot_id)
    if not actor.owns_doctor(doctor_id):
        raise Forbidden("only the doctor or an admin manages these slots")
    before, after = (
        (SlotStatus.FREE, SlotStatus.BUSY_UNAVAILABLE)
        if blocked
        else (SlotStatus.BUSY_UNAVAILABLE, SlotStatus.FREE)
    )

    async def work(tx: Tx) -> SlotUpdated:
        slot = await steps.locked_slot(tx, msg.slot_id)
        if slot["retired_at"] is not None or SlotStatus(slot["status"]) is not before:
            raise InvalidTransition(
                f"only a {before.value} slot can be {'blocked' if blocked else 'unblocked'}"
            )
        await tx.conn.execute(sql.SLOT_SET_BLOCKED, slot["id"], after.value)
        view = steps.slot_view(slot, after)
        tx.slot(doctor_id, view, "slot.blocked" if blocked else "slot.unblocked")
        return SlotUpdated(doctor_id, view)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def mark(
    store: Store,
    actor: Actor,
    msg: Mark,
    *,
    now: datetime | None = None,
    arrive_early: timedelta | None = None,
) -> Outcome[AppointmentUpdated]:
    """Record arrived / fulfilled / noshow along FHIR's lifecycle, never ahead of time.

    With `arrive_early` (the server always passes it), a patient may arrive from that
    long before the start, and nobody is a no-show, nor seen, before it: without it, a
    click on the wrong day told a patient they had missed an appointment three days
    away. Without it (seeding, the lifecycle's own tests) only the lifecycle is checked.
    """
    doctor_id = await doctor_of_appointment(store, msg.appointment_id)
    if not actor.owns_doctor(doctor_id):
        raise Forbidden("only the doctor or an admin records attendance")

    async def work(tx: Tx) -> AppointmentUpdated:
        appointment = await steps.locked_appointment(tx, msg.appointment_id)
        target = AppointmentStatus(msg.status)
        if target not in steps.MARKABLE.get(appointment.status, frozenset()):
            raise InvalidTransition(f"cannot go from {appointment.status.value} to {target.value}")
        early = arrive_early if target is AppointmentStatus.ARRIVED else ZERO
        opens = appointment.start - (early or ZERO)
        if arrive_early is not None and tx.now < opens:
            raise TooEarly(f"{target.value} can be recorded from {opens.isoformat()}, not before")
        row = await tx.conn.fetchrow(
            sql.APPOINTMENT_SET_STATUS, appointment.id, target.value, tx.now
        )
        view = steps.appointment_view(row)
        tx.appointment(view, f"appointment.{target.value}")
        return AppointmentUpdated(view)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def unmark(
    store: Store,
    actor: Actor,
    msg: Unmark,
    *,
    now: datetime | None = None,
    window: timedelta = timedelta(minutes=10),
) -> Outcome[AppointmentUpdated]:
    """Take back the last mark (arrived, fulfilled, noshow) within `window` of making it."""
    doctor_id = await doctor_of_appointment(store, msg.appointment_id)
    if not actor.owns_doctor(doctor_id):
        raise Forbidden("only the doctor or an admin records attendance")

    async def work(tx: Tx) -> AppointmentUpdated:
        appointment = await steps.locked_appointment(tx, msg.appointment_id)
        previous = steps.UNMARKED.get(appointment.status)
        if previous is None:
            raise InvalidTransition(f"{appointment.status.value} is not a mark to undo")
        marked_at = await tx.conn.fetchval(sql.APPOINTMENT_UPDATED_AT, appointment.id)
        if tx.now - marked_at > window:
            raise InvalidTransition(
                f"{appointment.status.value} was recorded more than "
                f"{int(window.total_seconds())} s ago: it can no longer be undone"
            )
        row = await tx.conn.fetchrow(
            sql.APPOINTMENT_SET_STATUS, appointment.id, previous.value, tx.now
        )
        view = steps.appointment_view(row)
        tx.appointment(view, "appointment.unmarked")
        return AppointmentUpdated(view)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def set_schedule(
    store: Store,
    actor: Actor,
    msg: SetSchedule,
    *,
    now: datetime | None = None,
    max_slots_per_day: int | None = None,
) -> Outcome[ScheduleUpdated]:
    """Replace the doctor's rules and weekly blocks and overrides; slots follow.

    A schedule that would open more than `max_slots_per_day` slots on any one local
    date (a weekday's blocks, or a date's overrides) is `Invalid`.
    """
    doctor_id = msg.doctor_id
    if not actor.owns_doctor(doctor_id):
        raise Forbidden("only the doctor or an admin edits the schedule")
    if (await doctors.doctor(store, doctor_id)).retired_at is not None:  # not_found too
        raise DoctorRetired(f"doctor {doctor_id} is retired: no hours can be set")
    check_schedule(msg, max_slots_per_day)

    async def work(tx: Tx) -> ScheduleUpdated:
        current = await tx.conn.fetchrow(sql.DOCTOR_VERSION_RETIRED, doctor_id)
        if current["retired_at"] is not None:  # retired since the check above
            raise DoctorRetired(f"doctor {doctor_id} is retired: no hours can be set")
        version = current["version"]
        entry = await tx.conn.fetchrow(
            sql.DOCTOR_SET_RULES,
            doctor_id,
            msg.slot_minutes,
            msg.buffer_minutes,
            msg.min_notice_minutes,
            msg.horizon_days,
        )
        await tx.conn.execute(sql.SCHEDULE_CLEAR, doctor_id)
        await tx.conn.executemany(
            sql.SCHEDULE_INSERT,
            [(doctor_id, b.weekday, b.start, b.end) for b in msg.weekly],
        )
        await tx.conn.execute(sql.OVERRIDES_CLEAR, doctor_id)
        await tx.conn.executemany(
            sql.OVERRIDE_INSERT,
            [(doctor_id, o.date, o.start, o.end) for o in msg.overrides],
        )
        result = await steps.rematerialize(tx, doctor_id)
        # The entry rides on every save, changed rules or not: the row comes back from the
        # update anyway, and watchers then never have to tell which saves moved their
        # bookable window (notice, horizon) before re-reading a snapshot.
        tx.doctor(directory.view(entry, private=False), "schedule.changed")
        return ScheduleUpdated(
            doctor_id=doctor_id,
            version=version + 1,
            opened=result.opened,
            removed=result.removed,
            conflicts=result.conflicts,
        )

    return await run_command(store, [doctor_id], actor, msg, now, work)


def check_schedule(msg: SetSchedule | PreviewSchedule, max_slots_per_day: int | None) -> None:
    """Refuse hours that end before they start, and a day opening too many slots: the
    same checks for a save and for its preview, so a preview never shows a save that
    would then be refused."""
    for b in msg.weekly:
        if not b.start < b.end:
            raise Invalid(f"weekday {b.weekday}: start must be before end")
    for o in msg.overrides:
        if (o.start is None) != (o.end is None) or (o.start and o.end and o.start >= o.end):
            raise Invalid(f"{o.date}: give both times with start before end, or neither")
    if max_slots_per_day is not None:
        _check_slots_per_day(msg, max_slots_per_day)


def _check_slots_per_day(msg: SetSchedule | PreviewSchedule, limit: int) -> None:
    """Refuse a schedule whose busiest local date would open more than `limit` slots."""
    days: dict[str, list[tuple[time, time]]] = {}
    for b in msg.weekly:
        days.setdefault(f"weekday {b.weekday}", []).append((b.start, b.end))
    for o in msg.overrides:
        if o.start is not None and o.end is not None:
            days.setdefault(o.date.isoformat(), []).append((o.start, o.end))
    for day, hours in days.items():
        count = schedule.slots_in(hours, msg.slot_minutes, msg.buffer_minutes)
        if count > limit:
            raise Invalid(
                f"{day} would open {count} slots: a schedule opens at most {limit} slots a day"
            )


# ---- system work -------------------------------------------------------------------------------


async def materialize_slots(
    store: Store, doctor_id: int, *, today: date | None = None, now: datetime | None = None
) -> Change | None:
    """Bring the doctor's slots in step with the schedule up to the horizon.

    Idempotent: a run that changes nothing records nothing. Booked slots the
    schedule no longer offers stay, flagged as conflicts.
    """

    async def work(tx: Tx) -> None:
        await steps.rematerialize(tx, doctor_id, first_day=today)

    outcome = await run(store, doctors=[doctor_id], actor=SYSTEM, now=resolve_now(now), work=work)
    return outcome.changes[0] if outcome.changes else None


async def expire_holds(store: Store, *, now: datetime | None = None) -> list[Change]:
    """Free every hold whose time is up, doctor by doctor (each under its lock)."""
    now = resolve_now(now)
    doctor_ids = [r["doctor_id"] for r in await store.fetch(sql.DOCTORS_WITH_EXPIRED_HOLDS, now)]
    changes: list[Change] = []
    for doctor_id in doctor_ids:

        async def work(tx: Tx) -> None:
            return None  # the runner clears the expired holds before any work

        outcome = await run(store, doctors=[doctor_id], actor=SYSTEM, now=now, work=work)
        changes.extend(outcome.changes)
    return changes


# ---- ranges (the schedule editor) --------------------------------------------------------------


async def block_range(
    store: Store, actor: Actor, msg: BlockRange, *, now: datetime | None = None
) -> Outcome[SlotsUpdated]:
    """Block every free slot starting in [start, end): a day off at short notice, a
    meeting. One transaction under the doctor's lock, so no hold or booking slips in
    between two of its slots, and one change record. Booked and held slots stay as they
    are (the doctor cancels or reschedules them, one by one, with the patient's name in
    view); slots already started are history."""
    doctor_id = await _range_doctor(store, actor, msg)

    async def work(tx: Tx) -> SlotsUpdated:
        rows = await tx.conn.fetch(
            sql.SLOTS_BLOCK_RANGE, doctor_id, msg.start, msg.end, msg.reason, tx.now
        )
        views = [steps.slot_view(r) for r in rows]
        for view in views:
            if msg.reason is not None:
                tx.blocked(doctor_id, view, msg.reason, "slots.blocked")
            else:
                tx.slot(doctor_id, view, "slots.blocked")
        return SlotsUpdated(doctor_id, views, msg.reason)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def unblock_range(
    store: Store, actor: Actor, msg: UnblockRange, *, now: datetime | None = None
) -> Outcome[SlotsUpdated]:
    """Offer every blocked slot starting in [start, end) again: one change, as the block."""
    doctor_id = await _range_doctor(store, actor, msg)

    async def work(tx: Tx) -> SlotsUpdated:
        rows = await tx.conn.fetch(sql.SLOTS_UNBLOCK_RANGE, doctor_id, msg.start, msg.end, tx.now)
        views = [steps.slot_view(r) for r in rows]
        for view in views:
            tx.slot(doctor_id, view, "slots.unblocked")
        return SlotsUpdated(doctor_id, views)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def _range_doctor(store: Store, actor: Actor, msg: BlockRange | UnblockRange) -> int:
    """The range's doctor, once the caller may manage their slots and the range is one the
    schedule can hold: forward, and no longer than the doctor's horizon (the slots that
    exist), so one command never sweeps more than a schedule opens."""
    doctor_id = msg.doctor_id
    if not actor.owns_doctor(doctor_id):
        raise Forbidden("only the doctor or an admin manages these slots")
    if msg.start >= msg.end:
        raise Invalid("`start` must be before `end`")
    doctor = await doctors.doctor(store, doctor_id)  # not_found for an unknown doctor
    if doctor.retired_at is not None:
        raise DoctorRetired(f"doctor {doctor_id} is retired and offers no slots")
    if msg.end - msg.start > timedelta(days=doctor.horizon_days):
        raise OutsideHorizon(
            f"a range spans at most the doctor's horizon, {doctor.horizon_days} days"
        )
    return doctor_id
