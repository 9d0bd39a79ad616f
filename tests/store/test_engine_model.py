"""The booking engine against a model small enough to be obviously right.

Hypothesis drives random sequences of holds, releases, bookings (direct and from a
hold), cancellations, reschedules, blocks, unblocks, clock moves and hold sweeps
over two doctors, eight slots and three patients, with right and wrong actors and
a tiny pool of idempotency keys so keys are reused, replayed and misused often.
Caps small enough to be met every few steps hold each patient's active future
appointments, per doctor and in all, and a cool-down bars a slot to the patient
who gave it back, so those rules meet every other one.
After every step the database must agree with the model: slot and appointment
states, one version and one change row per doctor touched, and a change log that
replays into the very slots table a watcher would otherwise have to trust.

The state machine is synchronous (that is what hypothesis drives); each Store call
runs on one event loop that this module owns, with its own pool on a scratch
database, so no async test plugin is involved and nothing waits on wall time:
every command gets the model's clock as `now=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any, TypeVar

import asyncpg
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from protocol.errors import ErrorCode
from protocol.messages import (
    AppointmentUpdated,
    AppointmentView,
    Block,
    Book,
    Booked,
    Cancel,
    Held,
    Hold,
    Message,
    Release,
    Reschedule,
    Rescheduled,
    SlotUpdated,
    Unblock,
)
from protocol.vocabulary import AppointmentStatus, Role, SlotStatus
from store import commands, doctors, reads
from store.errors import StoreError
from store.pool import Store, open_store
from store.schedule import Block as WeeklyHours
from store.tx import Actor, Limits, Outcome
from testkit.fixtures import TEMPLATE, scratch_database

T = TypeVar("T")

# A Tuesday; slots are 01:00-03:00 that day, so a few clock moves make early ones too late.
T0 = datetime(2031, 3, 4, 0, 40, tzinfo=UTC)
HOURS = [WeeklyHours(day, time(1), time(3)) for day in range(1, 8)]
HORIZON = timedelta(days=1)
SLOTS_PER_DOCTOR = 4
NOTICE = (timedelta(0), timedelta(minutes=20))  # the second doctor wants 20 minutes' notice
TTL = timedelta(minutes=10)
MAX_HOLDS = 1  # one live hold per patient: the limit, and what counts as live, get hit often
# Two active future appointments with one doctor, three in all; a slot given back is barred
# to its patient for as long as a hold lasts (so clock moves of 9, 10 and 11 minutes
# straddle its end too).
LIMITS = Limits(per_doctor=1, total=2, cooldown=timedelta(minutes=15))
PATIENTS = 3
KEYS = st.one_of(st.none(), st.sampled_from(["k0", "k1", "k2"]))
REASONS = st.sampled_from(["changed plans", "feeling better"])
# Who acts on an appointment: its own patient, any patient, either doctor, or an admin.
# "owner" is drawn twice as often as anyone else, so the happy path stays common.
ACTORS = st.sampled_from(["owner", "owner", "p0", "p1", "p2", "d0", "d1", "admin"])
PATIENT_CHOICE = st.sampled_from(["owner", "owner", "p0", "p1", "p2"])
ANY_PATIENT = st.sampled_from(["p0", "p1", "p2"])
HOLDER = st.sampled_from(["p0", "p0", "p0", "p1", "p2"])  # p0 often meets the hold limit
# Around the TTL: a hold at t is still live at t + 9, gone at t + 10 exactly, and after.
MINUTES = st.sampled_from([1, 5, 9, 10, 11])
BLOCKERS = st.sampled_from(["d0", "d1", "admin", "p0"])  # each doctor owns half the slots
APPOINTMENT = st.integers(min_value=0, max_value=63)  # 0 is the newest appointment
SLOT = st.integers(min_value=0, max_value=2 * SLOTS_PER_DOCTOR - 1)

ACTIVE = frozenset(AppointmentStatus) - {AppointmentStatus.CANCELLED}


@dataclass
class ModelSlot:
    id: int
    doctor: int
    start: datetime
    notice: timedelta
    status: SlotStatus = SlotStatus.FREE


@dataclass
class ModelAppointment:
    id: int
    slot: int
    doctor: int
    patient: str
    status: AppointmentStatus
    hold_expires_at: datetime | None
    cancel_reason: str | None = None
    replaces: int | None = None
    cancelled_at: datetime | None = None  # not compared: the model's own bookkeeping

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.slot,
            self.patient,
            self.status.value,
            self.hold_expires_at,
            self.cancel_reason,
            self.replaces,
        )


# What the model expects of one command: a refusal code, the first reply replayed,
# or success, checked and applied by a function of the real reply.
Apply = Callable[[Message], set[int]]
Expected = ErrorCode | Apply


@dataclass(frozen=True)
class Replayed:
    reply: Message


class Runner:
    """Runs coroutines to completion on the one loop that owns the pool."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self._runner = runner

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)


class EngineModel(RuleBasedStateMachine):
    """One example: two fresh doctors, a model clock, and the model of their calendars."""

    def __init__(self, run: Runner, store: Store, db: asyncpg.Connection, example: int) -> None:
        super().__init__()
        self.run = run
        self.store = store
        self.db = db  # looks at the tables behind the Store's back
        self.now = T0
        self.patients = [f"ex{example}-p{i}" for i in range(PATIENTS)]
        self.admin = Actor(f"ex{example}-admin", Role.ADMIN)
        self.doctors: list[int] = []
        self.slots: dict[int, ModelSlot] = {}
        self.appointments: dict[int, ModelAppointment] = {}
        self.versions: dict[int, int] = {}
        # (subject, key) -> the request without its key, and the reply it got first.
        self.keys: dict[tuple[str, str], tuple[Message, Message]] = {}
        for notice in NOTICE:
            self._add_doctor(notice)

    def _add_doctor(self, notice: timedelta) -> None:
        async def create() -> int:
            doctor_id = await doctors.create_doctor(
                self.store,
                name=f"Dr. Model {len(self.doctors)}",
                timezone="UTC",
                schedule=HOURS,
                horizon_days=HORIZON.days,
                min_notice_minutes=int(notice.total_seconds() // 60),
            )
            await commands.materialize_slots(self.store, doctor_id, now=self.now)
            return doctor_id

        doctor_id = self.run(create())
        snapshot = self.run(
            reads.snapshot(self.store, doctor_id, T0.date(), T0.date() + HORIZON, now=self.now)
        )
        assert snapshot.version == 1  # the materialization was one change
        assert len(snapshot.slots) == SLOTS_PER_DOCTOR
        self.doctors.append(doctor_id)
        self.versions[doctor_id] = snapshot.version
        for s in snapshot.slots:
            self.slots[s.id] = ModelSlot(s.id, doctor_id, s.start, notice, s.status)

    def teardown(self) -> None:
        """Every example shares one database: leave no hold for a later example's sweep."""
        self.run(commands.expire_holds(self.store, now=T0 + timedelta(days=365)))

    # ---- picking things -------------------------------------------------------------------

    def _slot(self, index: int) -> ModelSlot:
        return self.slots[sorted(self.slots)[index]]

    def _appointment(self, index: int) -> ModelAppointment:
        ids = sorted(self.appointments, reverse=True)
        return self.appointments[ids[index % len(ids)]]

    def _patient(self, choice: str, appointment: ModelAppointment | None = None) -> Actor:
        if choice == "owner":
            assert appointment is not None
            return Actor(appointment.patient, Role.PATIENT)
        return Actor(self.patients[int(choice[1:])], Role.PATIENT)

    def _actor(self, choice: str, appointment: ModelAppointment | None = None) -> Actor:
        if choice.startswith("d"):
            return Actor(str(self.doctors[int(choice[1:])]), Role.DOCTOR)
        if choice == "admin":
            return self.admin
        return self._patient(choice, appointment)

    # ---- the model's rules ----------------------------------------------------------------

    def _expire(self, doctor: int) -> bool:
        """Holds whose time is up are cancelled and their slots freed, under the lock."""
        expired = False
        for a in self.appointments.values():
            if (
                a.doctor == doctor
                and a.status is AppointmentStatus.PENDING
                and a.hold_expires_at is not None
                and a.hold_expires_at <= self.now
            ):
                a.status = AppointmentStatus.CANCELLED
                a.cancel_reason = "hold expired"
                a.cancelled_at = self.now
                self.slots[a.slot].status = SlotStatus.FREE
                expired = True
        return expired

    def _bookable(self, slot: ModelSlot) -> ErrorCode | None:
        if slot.status is SlotStatus.BUSY_UNAVAILABLE:
            return ErrorCode.SLOT_UNAVAILABLE
        if slot.status is not SlotStatus.FREE:
            return ErrorCode.SLOT_TAKEN
        if slot.start <= self.now or slot.start < self.now + slot.notice:
            return ErrorCode.TOO_LATE
        if slot.start >= self.now + HORIZON:
            return ErrorCode.OUTSIDE_HORIZON
        return None

    def _own_hold(self, actor: Actor, hold: ModelAppointment) -> ErrorCode | None:
        if hold.patient != actor.subject:
            return ErrorCode.NOT_HOLDER
        if hold.status is AppointmentStatus.CANCELLED and hold.cancel_reason == "hold expired":
            return ErrorCode.HOLD_EXPIRED
        if hold.status is not AppointmentStatus.PENDING:
            return ErrorCode.INVALID_TRANSITION
        return None

    def _owns(self, actor: Actor, doctor: int) -> bool:
        return actor.role is Role.ADMIN or (
            actor.role is Role.DOCTOR and actor.subject == str(doctor)
        )

    def _may_manage(self, actor: Actor, appointment: ModelAppointment) -> bool:
        return self._owns(actor, appointment.doctor) or (
            actor.role is Role.PATIENT and actor.subject == appointment.patient
        )

    def _active_holds(self, patient: str) -> int:
        return sum(
            1
            for a in self.appointments.values()
            if a.patient == patient
            and a.status is AppointmentStatus.PENDING
            and a.hold_expires_at is not None
            and a.hold_expires_at > self.now
        )

    def _active(self, patient: str, doctor: int | None = None) -> int:
        """Active future appointments: booked (or arrived), or held and unexpired, starting
        after now; with one doctor or in all."""
        return sum(
            1
            for a in self.appointments.values()
            if a.patient == patient
            and (doctor is None or a.doctor == doctor)
            and self.slots[a.slot].start > self.now
            and (
                a.status in (AppointmentStatus.BOOKED, AppointmentStatus.ARRIVED)
                or (
                    a.status is AppointmentStatus.PENDING
                    and a.hold_expires_at is not None
                    and a.hold_expires_at > self.now
                )
            )
        )

    def _claim(self, patient: str, slot: ModelSlot, *, holding: bool) -> ErrorCode | None:
        """A hold's or a direct booking's checks after the slot's: the cool-down, the
        hold limit (holds), then the caps per doctor and in all."""
        ended = [
            min(a.cancelled_at, a.hold_expires_at)
            for a in self.appointments.values()
            if a.patient == patient
            and a.slot == slot.id
            and a.status is AppointmentStatus.CANCELLED
            and a.hold_expires_at is not None  # a hold, released or lapsed
            and a.cancelled_at is not None
        ]
        if ended and max(ended) + LIMITS.cooldown > self.now:
            return ErrorCode.COOLDOWN
        if holding and self._active_holds(patient) >= MAX_HOLDS:
            return ErrorCode.HOLD_LIMIT
        if self._active(patient, slot.doctor) >= LIMITS.per_doctor:
            return ErrorCode.APPOINTMENT_LIMIT
        if self._active(patient) >= LIMITS.total:
            return ErrorCode.APPOINTMENT_LIMIT
        return None

    def _new(self, view: AppointmentView, doctor: int) -> None:
        assert view.id not in self.appointments
        assert view.doctor_id == doctor
        self.appointments[view.id] = ModelAppointment(
            view.id,
            view.slot_id,
            doctor,
            view.patient_id,
            view.status,
            view.hold_expires_at,
            view.cancel_reason,
            view.replaces_id,
        )

    def _check_view(self, view: AppointmentView, model: ModelAppointment) -> None:
        # A view shows an expiry only while the appointment is a pending hold; the row
        # keeps it (the cool-down counts from it).
        shown = model.hold_expires_at if model.status is AppointmentStatus.PENDING else None
        got = (view.id, view.slot_id, view.patient_id, view.status.value, view.hold_expires_at)
        assert got == (*model.row()[:4], shown)
        assert (view.cancel_reason, view.replaces_id) == (model.cancel_reason, model.replaces)

    # ---- running one command against both -------------------------------------------------

    def _execute(
        self,
        *,
        doctors: list[int],
        actor: Actor,
        request: Any,
        call: Callable[[], Coroutine[Any, Any, Outcome]],
        work: Callable[[], Expected],
        refused_before_lock: ErrorCode | None = None,
    ) -> None:
        """Predict, run, compare: the Store's `_run` order, step by step, in the model."""
        expected: Expected | Replayed
        touched: set[int] = set()
        key: str | None = request.idempotency_key
        bare = dataclasses.replace(request, idempotency_key=None)
        if refused_before_lock is not None:
            expected = refused_before_lock
        elif key is not None and (actor.subject, key) in self.keys:
            first_request, first_reply = self.keys[(actor.subject, key)]
            expected = (
                Replayed(first_reply) if first_request == bare else ErrorCode.IDEMPOTENCY_CONFLICT
            )
        else:
            for doctor in doctors:
                if self._expire(doctor):
                    touched.add(doctor)
            expected = work()

        outcome: Outcome | None = None
        error: StoreError | None = None
        try:
            outcome = self.run(call())
        except StoreError as exc:
            error = exc
        if error is not None or outcome is None:
            result = repr(error)
        else:
            versions = [(c.doctor_id, c.version) for c in outcome.changes]
            result = f"{outcome.reply!r}, versions {versions}"
        note(f"at {self.now:%H:%M} {actor} {request!r} -> {result}")
        event(f"{request.TYPE}: {error.code.value if error is not None else 'ok'}")

        if isinstance(expected, ErrorCode):
            assert error is not None, f"expected {expected}, got {outcome}"
            assert error.code is expected, f"expected {expected}, got {error.code}: {error}"
        elif isinstance(expected, Replayed):
            assert error is None, f"expected a replay, got {error!r}"
            assert outcome is not None
            assert outcome.reply == expected.reply
            assert outcome.changes == []
        else:
            assert error is None, f"expected success, got {error!r}"
            assert outcome is not None
            assert outcome.reply is not None
            touched |= expected(outcome.reply)
            if key is not None:
                self.keys[(actor.subject, key)] = (bare, outcome.reply)
        for doctor in touched:
            self.versions[doctor] += 1
        if outcome is not None:
            got = [(c.doctor_id, c.version) for c in outcome.changes]
            assert got == [(d, self.versions[d]) for d in sorted(touched)]

    # ---- rules ------------------------------------------------------------------------------

    @rule(slot=SLOT, patient=HOLDER, key=KEYS)
    def hold(self, slot: int, patient: str, key: str | None) -> None:
        self._hold(self._slot(slot), self._patient(patient), key)

    def _hold(self, s: ModelSlot, actor: Actor, key: str | None) -> None:
        request = Hold(s.id, key)

        def work() -> Expected:
            refused = self._bookable(s) or self._claim(actor.subject, s, holding=True)
            if refused is not None:
                return refused

            def apply(reply: Message) -> set[int]:
                assert isinstance(reply, Held)
                a = reply.appointment
                assert (a.slot_id, a.patient_id) == (s.id, actor.subject)
                assert a.status is AppointmentStatus.PENDING
                assert a.hold_expires_at == self.now + TTL
                self._new(a, s.doctor)
                s.status = SlotStatus.BUSY_TENTATIVE
                return {s.doctor}

            return apply

        self._execute(
            doctors=[s.doctor],
            actor=actor,
            request=request,
            call=lambda: commands.hold(
                self.store,
                actor,
                request,
                ttl=TTL,
                max_holds=MAX_HOLDS,
                limits=LIMITS,
                now=self.now,
            ),
            work=work,
        )

    @precondition(lambda self: self.appointments)
    @rule(appointment=APPOINTMENT, patient=PATIENT_CHOICE, key=KEYS)
    def release(self, appointment: int, patient: str, key: str | None) -> None:
        a = self._appointment(appointment)
        actor = self._patient(patient, a)
        request = Release(a.id, key)

        def work() -> Expected:
            refused = self._own_hold(actor, a)
            if refused is not None:
                return refused

            def apply(reply: Message) -> set[int]:
                assert isinstance(reply, AppointmentUpdated)
                a.status = AppointmentStatus.CANCELLED
                a.cancel_reason = "released"
                a.cancelled_at = self.now
                self._check_view(reply.appointment, a)
                self.slots[a.slot].status = SlotStatus.FREE
                return {a.doctor}

            return apply

        self._execute(
            doctors=[a.doctor],
            actor=actor,
            request=request,
            call=lambda: commands.release(self.store, actor, request, now=self.now),
            work=work,
        )

    @rule(slot=SLOT, patient=ANY_PATIENT, key=KEYS)
    def book(self, slot: int, patient: str, key: str | None) -> None:
        self._book(self._slot(slot), self._patient(patient), key)

    def _book(self, s: ModelSlot, actor: Actor, key: str | None) -> None:
        request = Book(slot_id=s.id, idempotency_key=key)

        def work() -> Expected:
            refused = self._bookable(s) or self._claim(actor.subject, s, holding=False)
            if refused is not None:
                return refused

            def apply(reply: Message) -> set[int]:
                assert isinstance(reply, Booked)
                a = reply.appointment
                assert (a.slot_id, a.patient_id) == (s.id, actor.subject)
                assert (a.status, a.hold_expires_at) == (AppointmentStatus.BOOKED, None)
                self._new(a, s.doctor)
                s.status = SlotStatus.BUSY
                return {s.doctor}

            return apply

        self._execute(
            doctors=[s.doctor],
            actor=actor,
            request=request,
            call=lambda: commands.book(self.store, actor, request, limits=LIMITS, now=self.now),
            work=work,
        )

    def _ended_holds(self) -> list[ModelAppointment]:
        """Holds released, or lapsed (swept or not yet), newest first."""
        return sorted(
            (
                a
                for a in self.appointments.values()
                if a.hold_expires_at is not None
                and (
                    a.status is AppointmentStatus.CANCELLED
                    or (a.status is AppointmentStatus.PENDING and a.hold_expires_at <= self.now)
                )
            ),
            key=lambda a: a.id,
            reverse=True,
        )

    @precondition(lambda self: self._ended_holds())
    @rule(appointment=APPOINTMENT, booking=st.booleans(), key=KEYS)
    def take_back(self, appointment: int, booking: bool, key: str | None) -> None:
        """The patient whose hold ended holds or books its slot again: the cool-down."""
        ended = self._ended_holds()
        a = ended[appointment % len(ended)]
        (self._book if booking else self._hold)(
            self.slots[a.slot], Actor(a.patient, Role.PATIENT), key
        )

    @precondition(lambda self: self.appointments)
    @rule(appointment=APPOINTMENT, patient=PATIENT_CHOICE, key=KEYS)
    def confirm(self, appointment: int, patient: str, key: str | None) -> None:
        a = self._appointment(appointment)
        actor = self._patient(patient, a)
        request = Book(hold_id=a.id, idempotency_key=key)

        def work() -> Expected:
            refused = self._own_hold(actor, a)
            if refused is not None:
                return refused

            def apply(reply: Message) -> set[int]:
                assert isinstance(reply, Booked)
                a.status = AppointmentStatus.BOOKED
                a.hold_expires_at = None
                self._check_view(reply.appointment, a)
                self.slots[a.slot].status = SlotStatus.BUSY
                return {a.doctor}

            return apply

        self._execute(
            doctors=[a.doctor],
            actor=actor,
            request=request,
            call=lambda: commands.book(self.store, actor, request, limits=LIMITS, now=self.now),
            work=work,
        )

    @precondition(lambda self: self.appointments)
    @rule(appointment=APPOINTMENT, who=ACTORS, reason=REASONS, key=KEYS)
    def cancel(self, appointment: int, who: str, reason: str, key: str | None) -> None:
        a = self._appointment(appointment)
        actor = self._actor(who, a)
        request = Cancel(a.id, reason, key)

        def work() -> Expected:
            if not self._may_manage(actor, a):
                return ErrorCode.FORBIDDEN
            if a.status is not AppointmentStatus.BOOKED:
                return ErrorCode.INVALID_TRANSITION

            def apply(reply: Message) -> set[int]:
                assert isinstance(reply, AppointmentUpdated)
                a.status = AppointmentStatus.CANCELLED
                a.cancel_reason = reason
                a.cancelled_at = self.now
                self._check_view(reply.appointment, a)
                self.slots[a.slot].status = SlotStatus.FREE
                return {a.doctor}

            return apply

        self._execute(
            doctors=[a.doctor],
            actor=actor,
            request=request,
            call=lambda: commands.cancel(self.store, actor, request, now=self.now),
            work=work,
        )

    @precondition(lambda self: self.appointments)
    @rule(appointment=APPOINTMENT, slot=SLOT, who=ACTORS, key=KEYS)
    def reschedule(self, appointment: int, slot: int, who: str, key: str | None) -> None:
        a = self._appointment(appointment)
        s = self._slot(slot)
        actor = self._actor(who, a)
        request = Reschedule(a.id, s.id, key)

        def work() -> Expected:
            if not self._may_manage(actor, a) or (
                actor.role is Role.DOCTOR and s.doctor != a.doctor
            ):
                return ErrorCode.FORBIDDEN
            if a.status is not AppointmentStatus.BOOKED:
                return ErrorCode.INVALID_TRANSITION
            refused = self._bookable(s)
            if refused is not None:
                return refused
            # A move keeps the count; only a move to another doctor needs room there.
            if s.doctor != a.doctor and self._active(a.patient, s.doctor) >= LIMITS.per_doctor:
                return ErrorCode.APPOINTMENT_LIMIT

            def apply(reply: Message) -> set[int]:
                assert isinstance(reply, Rescheduled)
                a.status = AppointmentStatus.CANCELLED
                a.cancel_reason = "rescheduled"
                a.cancelled_at = self.now
                self._check_view(reply.replaced, a)
                new = reply.appointment
                assert (new.slot_id, new.patient_id) == (s.id, a.patient)
                assert (new.status, new.replaces_id) == (AppointmentStatus.BOOKED, a.id)
                self._new(new, s.doctor)
                self.slots[a.slot].status = SlotStatus.FREE
                s.status = SlotStatus.BUSY
                return {a.doctor, s.doctor}

            return apply

        self._execute(
            doctors=[a.doctor, s.doctor],
            actor=actor,
            request=request,
            call=lambda: commands.reschedule(
                self.store, actor, request, limits=LIMITS, now=self.now
            ),
            work=work,
        )

    @rule(slot=SLOT, who=BLOCKERS, key=KEYS, blocked=st.booleans())
    def block_or_unblock(self, slot: int, who: str, key: str | None, blocked: bool) -> None:
        s = self._slot(slot)
        actor = self._actor(who)
        request: Block | Unblock = Block(s.id, key) if blocked else Unblock(s.id, key)
        before, after = (
            (SlotStatus.FREE, SlotStatus.BUSY_UNAVAILABLE)
            if blocked
            else (SlotStatus.BUSY_UNAVAILABLE, SlotStatus.FREE)
        )

        def work() -> Expected:
            if s.status is not before:
                return ErrorCode.INVALID_TRANSITION

            def apply(reply: Message) -> set[int]:
                assert isinstance(reply, SlotUpdated)
                assert (reply.doctor_id, reply.slot.id, reply.slot.status) == (
                    s.doctor,
                    s.id,
                    after,
                )
                s.status = after
                return {s.doctor}

            return apply

        self._execute(
            doctors=[s.doctor],
            actor=actor,
            request=request,
            call=lambda: (commands.block if blocked else commands.unblock)(
                self.store, actor, request, now=self.now
            ),
            work=work,
            # Ownership needs no lock, so it is refused before the key is even looked up.
            refused_before_lock=None if self._owns(actor, s.doctor) else ErrorCode.FORBIDDEN,
        )

    @rule(minutes=MINUTES)
    def advance(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)

    @rule()
    def sweep(self) -> None:
        """The background sweep: each doctor with expired holds gets exactly one version."""
        touched = sorted(d for d in self.doctors if self._expire(d))
        changes = self.run(commands.expire_holds(self.store, now=self.now))
        for doctor in touched:
            self.versions[doctor] += 1
        assert [(c.doctor_id, c.version) for c in changes] == [
            (d, self.versions[d]) for d in touched
        ]

    # ---- what must hold after every step --------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        mine = self.doctors
        slots = self.run(
            self.db.fetch(
                "SELECT id, status, retired_at FROM slots WHERE doctor_id = ANY($1)", mine
            )
        )
        appointments = self.run(
            self.db.fetch(
                "SELECT id, slot_id, patient_id, status, hold_expires_at, cancel_reason,"
                " replaces_id FROM appointments WHERE doctor_id = ANY($1)",
                mine,
            )
        )
        doubles = self.run(
            self.db.fetch(
                "SELECT slot_id FROM appointments"
                " WHERE doctor_id = ANY($1) AND status <> 'cancelled'"
                " GROUP BY slot_id HAVING count(*) > 1",
                mine,
            )
        )
        versions = self.run(
            self.db.fetch("SELECT id, version FROM doctors WHERE id = ANY($1)", mine)
        )
        assert doubles == [], "two active appointments on one slot"
        assert all(r["retired_at"] is None for r in slots)
        assert {r["id"]: SlotStatus(r["status"]) for r in slots} == {
            i: s.status for i, s in self.slots.items()
        }
        assert sorted(tuple(r) for r in appointments) == sorted(
            a.row() for a in self.appointments.values()
        )
        for slot_id, count in self._active_per_slot().items():
            assert count <= 1, f"the model itself put {count} active appointments on {slot_id}"
        assert {r["id"]: r["version"] for r in versions} == self.versions

    def _active_per_slot(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for a in self.appointments.values():
            if a.status in ACTIVE:
                counts[a.slot] = counts.get(a.slot, 0) + 1
        return counts

    @invariant()
    def change_log_replays_into_the_slots(self) -> None:
        """What a watcher rebuilds from snapshot-free deltas is what the table says."""
        for doctor in self.doctors:
            log = self.run(reads.change_log(self.store, doctor))
            versions = [r["version"] for r in log]
            assert versions == list(range(1, self.versions[doctor] + 1)), f"doctor {doctor}"
            replayed: dict[int, dict[str, Any]] = {}
            for r in log:
                public = r["public"]
                assert set(public) == {
                    "doctor_id",
                    "version",
                    "slots",
                    "removed",
                    "since",
                    "doctor",
                }
                assert (public["doctor_id"], public["version"]) == (doctor, r["version"])
                for s in public["slots"]:
                    replayed[s["id"]] = s
                for slot_id in public["removed"]:
                    replayed.pop(slot_id, None)
            mine = {i: s for i, s in self.slots.items() if s.doctor == doctor}
            assert {i: SlotStatus(s["status"]) for i, s in replayed.items()} == {
                i: s.status for i, s in mine.items()
            }
            holds = {
                a.slot: a.hold_expires_at
                for a in self.appointments.values()
                if a.status is AppointmentStatus.PENDING and a.doctor == doctor
            }
            for slot_id, s in replayed.items():
                expires = s.get("hold_expires_at")
                if SlotStatus(s["status"]) is SlotStatus.BUSY_TENTATIVE:
                    assert expires is not None
                    assert datetime.fromisoformat(expires) == holds[slot_id]
                else:
                    assert expires is None


@contextlib.asynccontextmanager
async def model_store(admin_dsn: str) -> AsyncIterator[tuple[Store, asyncpg.Connection]]:
    """One scratch database for the whole run: each example makes its own doctors in it."""
    async with (
        scratch_database(admin_dsn, TEMPLATE) as dsn,
        open_store(dsn, min_size=1, max_size=2) as store,
    ):
        db = await asyncpg.connect(dsn)
        try:
            yield store, db
        finally:
            await db.close()


@contextlib.contextmanager
def entered(run: Runner, manager: contextlib.AbstractAsyncContextManager[T]) -> Iterator[T]:
    """An async context manager entered and left on `run`'s loop, from sync code."""
    value = run(manager.__aenter__())
    try:
        yield value
    except BaseException as exc:
        if not run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
            raise
    else:
        run(manager.__aexit__(None, None, None))


# Every step costs a few database round trips, so shrinking a failure replays hundreds
# of multi-step examples and can outlast the suite's timeout (and lose the report). A
# failure is reported unshrunk instead: each step's `note` names its actor, request
# and result, and the example database replays it first on the next run.
MODEL_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_engine_agrees_with_the_model(pg_admin_dsn: str, template_dsn: str) -> None:
    with asyncio.Runner() as loop:
        run = Runner(loop)
        with entered(run, model_store(pg_admin_dsn)) as (store, db):
            examples = itertools.count()
            run_state_machine_as_test(
                lambda: EngineModel(run, store, db, next(examples)),  # type: ignore[arg-type]
                settings=MODEL_SETTINGS,
            )
