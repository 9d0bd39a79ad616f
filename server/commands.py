"""Every command Slotcast runs, once: who may run it, what runs it, where REST finds it.

The WebSocket dispatcher (`server.ws`) and the REST routes (`server.routes`) are
both generated from `REGISTRY`, so a hold over REST and a hold over a WebSocket
are the same code under the same rules. Adding a command means: its message in
`protocol.messages`, its store function in `store.commands` (or a read), one
entry here, its docs and its tests.

Role checks that need no data happen here, at the gate; ownership checks that
need the row happen in the store, under the doctor's lock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Generic, Literal, Protocol, TypeVar

from protocol.messages import (
    Appointments,
    Block,
    BlockRange,
    Book,
    Cancel,
    CreateDoctor,
    Doctors,
    GetSchedule,
    Hold,
    ListAppointments,
    Mark,
    Message,
    MyAppointments,
    NextAvailable,
    NextSlot,
    PreviewSchedule,
    Release,
    Reschedule,
    RetireDoctor,
    SearchDoctors,
    SetSchedule,
    Unblock,
    UnblockRange,
    Unmark,
    UpdateDoctor,
)
from protocol.vocabulary import KeyScope, Role
from server.auth import Identity
from server.service import Scheduling, actor_of, forbidden, require_scope
from store import commands, directory, doctors, reads
from store.pool import Store
from store.tx import Actor, Limits, Outcome

M = TypeVar("M", bound=Message)
C = TypeVar("C", bound=Message, contravariant=True)


class Gate(Enum):
    """Who may knock at all; what they may touch is the store's business."""

    SIGNED_IN = "signed-in"  # any valid token; the store checks ownership
    PATIENT = "patient"  # one's own appointments
    # Holds and bookings: a patient for themselves, or the doctor, an admin or an API key
    # naming the patient (`patient_id`); the store checks the doctor under the lock.
    BOOKING = "booking"
    ADMIN = "admin"  # the doctor directory


@dataclass(frozen=True, slots=True)
class Route:
    """Where REST serves a command: path parameters are fields of the message."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str
    status: int = 200


Run = Callable[[Scheduling, Actor, M], Awaitable[Message]]
# A public read may still show more to some callers (admins see retired doctors).
PublicRun = Callable[[Scheduling, Identity | None, M], Awaitable[Message]]


@dataclass(frozen=True, slots=True)
class Command(Generic[M]):
    """One command: its message, its gate, its store call, its REST route.

    `idempotent` commands carry an `idempotency_key` (REST takes it from the
    `Idempotency-Key` header too): a retry returns the first reply, never acts twice.
    `scope` is what an API key needs to run it (docs/protocol.md, "API keys").
    """

    message: type[M]
    gate: Gate
    run: Run[M]
    route: Route
    scope: KeyScope
    idempotent: bool = True

    async def __call__(self, scheduling: Scheduling, who: Identity | None, msg: M) -> Message:
        if self.gate is Gate.PATIENT:
            actor = scheduling.require_patient(who)
        elif self.gate is Gate.ADMIN:
            actor = scheduling.require_admin(who)
        else:
            actor = actor_of(who, scheduling.clock())
        if self.gate is Gate.BOOKING:
            patient_id = getattr(msg, "patient_id", None)
            if patient_id is None and (actor.role is not Role.PATIENT or actor.key is not None):
                raise forbidden(
                    "only patients hold and book for themselves: name the patient "
                    "(`patient_id`) to act on their behalf"
                )
            actor.patient(patient_id)  # forbidden: a patient naming someone else
        require_scope(actor, self.scope)
        return await self.run(scheduling, actor, msg)


@dataclass(frozen=True, slots=True)
class PublicCommand(Generic[M]):
    """A read anyone may make, token or not (public availability and the directory)."""

    message: type[M]
    run: PublicRun[M]
    route: Route
    idempotent: bool = False

    async def __call__(self, scheduling: Scheduling, who: Identity | None, msg: M) -> Message:
        return await self.run(scheduling, who, msg)


# ---- the commands, in the order of docs/protocol.md -------------------------------------------


def patient_limits(s: Scheduling) -> Limits:
    """What one patient may claim: the store checks it under the locks, whichever door."""
    return Limits(
        per_doctor=s.settings.max_active_per_doctor,
        total=s.settings.max_active_total,
        cooldown=timedelta(seconds=s.settings.rehold_cooldown_s),
    )


async def _hold(s: Scheduling, actor: Actor, msg: Hold) -> Message:
    outcome = await commands.hold(
        s.store,
        actor,
        msg,
        ttl=timedelta(seconds=s.settings.hold_ttl_s),
        max_holds=s.settings.max_holds_per_patient,
        limits=patient_limits(s),
        now=s.clock(),
    )
    return outcome.reply


async def _book(s: Scheduling, actor: Actor, msg: Book) -> Message:
    outcome = await commands.book(s.store, actor, msg, limits=patient_limits(s), now=s.clock())
    return outcome.reply


async def _reschedule(s: Scheduling, actor: Actor, msg: Reschedule) -> Message:
    outcome = await commands.reschedule(
        s.store, actor, msg, limits=patient_limits(s), now=s.clock()
    )
    return outcome.reply


class StoreCommand(Protocol[C]):
    """A `store.commands` function: the caller's actor, the message, the instant it runs."""

    def __call__(
        self, store: Store, actor: Actor, msg: C, *, now: datetime | None = None
    ) -> Awaitable[Outcome[Any]]: ...


def plain(command: StoreCommand[M]) -> Run[M]:
    """Run a store command that needs nothing from the settings, at the server's clock."""

    async def run(s: Scheduling, actor: Actor, msg: M) -> Message:
        outcome = await command(s.store, actor, msg, now=s.clock())
        reply: Message = outcome.reply
        return reply

    return run


async def _mark(s: Scheduling, actor: Actor, msg: Mark) -> Message:
    early = timedelta(minutes=s.settings.arrive_early_minutes)
    outcome = await commands.mark(s.store, actor, msg, now=s.clock(), arrive_early=early)
    return outcome.reply


async def _unmark(s: Scheduling, actor: Actor, msg: Unmark) -> Message:
    window = timedelta(seconds=s.settings.unmark_window_s)
    outcome = await commands.unmark(s.store, actor, msg, now=s.clock(), window=window)
    return outcome.reply


async def _set_schedule(s: Scheduling, actor: Actor, msg: SetSchedule) -> Message:
    outcome = await commands.set_schedule(
        s.store, actor, msg, now=s.clock(), max_slots_per_day=s.settings.max_slots_per_day
    )
    return outcome.reply


async def _get_schedule(s: Scheduling, actor: Actor, msg: GetSchedule) -> Message:
    if not actor.owns_doctor(msg.doctor_id):
        raise forbidden("only the doctor or an admin reads the doctor's schedule")
    return await reads.schedule(s.store, msg.doctor_id)


async def _list_appointments(s: Scheduling, actor: Actor, msg: ListAppointments) -> Message:
    if not actor.owns_doctor(msg.doctor_id):
        raise forbidden("only the doctor or an admin sees the doctor's appointments")
    await doctors.doctor(s.store, msg.doctor_id)  # not_found for an unknown doctor
    return Appointments(await reads.doctor_appointments(s.store, msg.doctor_id, msg.date))


async def _my_appointments(s: Scheduling, actor: Actor, msg: MyAppointments) -> Message:
    return await s.my_appointments(actor)


async def _search_doctors(s: Scheduling, who: Identity | None, msg: SearchDoctors) -> Message:
    if msg.include_retired:
        s.require_admin(who)
    found = await s.search_doctors(
        msg.q, limit=msg.limit, offset=msg.offset, include_retired=msg.include_retired
    )
    return Doctors(found, msg.limit, msg.offset)


async def _next_available(s: Scheduling, who: Identity | None, msg: NextAvailable) -> Message:
    return NextSlot(msg.doctor_id, await s.next_available(msg.doctor_id, msg.after))


async def _preview_schedule(s: Scheduling, actor: Actor, msg: PreviewSchedule) -> Message:
    if not actor.owns_doctor(msg.doctor_id):
        raise forbidden("only the doctor or an admin edits the schedule")
    commands.check_schedule(msg, s.settings.max_slots_per_day)  # what the save would refuse
    return await reads.schedule_preview(s.store, msg, now=s.clock())


_ALL: tuple[Command[Any] | PublicCommand[Any], ...] = (
    Command(Hold, Gate.BOOKING, _hold, Route("POST", "/api/holds", 201), KeyScope.BOOK),
    Command(
        Release,
        Gate.BOOKING,
        plain(commands.release),
        Route("DELETE", "/api/holds/{appointment_id}"),
        KeyScope.BOOK,
    ),
    Command(Book, Gate.BOOKING, _book, Route("POST", "/api/appointments", 201), KeyScope.BOOK),
    Command(
        Cancel,
        Gate.SIGNED_IN,
        plain(commands.cancel),
        Route("POST", "/api/appointments/{appointment_id}/cancel"),
        KeyScope.BOOK,
    ),
    Command(
        Reschedule,
        Gate.SIGNED_IN,
        _reschedule,
        Route("POST", "/api/appointments/{appointment_id}/reschedule", 201),
        KeyScope.BOOK,
    ),
    Command(
        Block,
        Gate.SIGNED_IN,
        plain(commands.block),
        Route("POST", "/api/slots/{slot_id}/block"),
        KeyScope.SCHEDULES,
    ),
    Command(
        Unblock,
        Gate.SIGNED_IN,
        plain(commands.unblock),
        Route("DELETE", "/api/slots/{slot_id}/block"),
        KeyScope.SCHEDULES,
    ),
    Command(
        Mark,
        Gate.SIGNED_IN,
        _mark,
        Route("POST", "/api/appointments/{appointment_id}/status"),
        KeyScope.SCHEDULES,
    ),
    Command(
        Unmark,
        Gate.SIGNED_IN,
        _unmark,
        Route("DELETE", "/api/appointments/{appointment_id}/status"),
        KeyScope.SCHEDULES,
    ),
    Command(
        SetSchedule,
        Gate.SIGNED_IN,
        _set_schedule,
        Route("PUT", "/api/doctors/{doctor_id}/schedule"),
        KeyScope.SCHEDULES,
    ),
    Command(
        GetSchedule,
        Gate.SIGNED_IN,
        _get_schedule,
        Route("GET", "/api/doctors/{doctor_id}/schedule"),
        KeyScope.READ,
        idempotent=False,
    ),
    Command(
        ListAppointments,
        Gate.SIGNED_IN,
        _list_appointments,
        Route("GET", "/api/doctors/{doctor_id}/appointments"),
        KeyScope.READ,
        idempotent=False,
    ),
    Command(
        MyAppointments,
        Gate.PATIENT,
        _my_appointments,
        Route("GET", "/api/me/appointments"),
        KeyScope.READ,
        idempotent=False,
    ),
    PublicCommand(SearchDoctors, _search_doctors, Route("GET", "/api/doctors")),
    PublicCommand(
        NextAvailable, _next_available, Route("GET", "/api/doctors/{doctor_id}/next-available")
    ),
    Command(
        CreateDoctor,
        Gate.ADMIN,
        plain(directory.create),
        Route("POST", "/api/doctors", 201),
        KeyScope.ADMIN,
    ),
    Command(
        UpdateDoctor,
        Gate.ADMIN,
        plain(directory.update),
        Route("PATCH", "/api/doctors/{doctor_id}"),
        KeyScope.ADMIN,
    ),
    Command(
        RetireDoctor,
        Gate.ADMIN,
        plain(directory.retire),
        Route("POST", "/api/doctors/{doctor_id}/retire"),
        KeyScope.ADMIN,
    ),
    # The schedule editor (issue 16, item 2).
    Command(
        BlockRange,
        Gate.SIGNED_IN,
        plain(commands.block_range),
        Route("POST", "/api/doctors/{doctor_id}/blocks"),
        KeyScope.SCHEDULES,
    ),
    Command(
        UnblockRange,
        Gate.SIGNED_IN,
        plain(commands.unblock_range),
        Route("DELETE", "/api/doctors/{doctor_id}/blocks"),
        KeyScope.SCHEDULES,
    ),
    Command(
        PreviewSchedule,
        Gate.SIGNED_IN,
        _preview_schedule,
        Route("POST", "/api/doctors/{doctor_id}/schedule/preview"),
        KeyScope.READ,
        idempotent=False,
    ),
)

REGISTRY: dict[type[Message], Command[Any] | PublicCommand[Any]] = {c.message: c for c in _ALL}
