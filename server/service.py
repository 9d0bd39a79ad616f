"""Scheduling commands, shared by the WebSocket and REST front doors.

`COMMANDS` maps each command message to a `Scheduling` method; both front doors
dispatch through it, so a hold over REST and a hold over a WebSocket are the
same code. Role checks that need no data happen here; ownership checks that do
happen in the store, under the doctor's lock. Committed changes reach the broker
through the store's outbox (`store.outbox`), not through here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from protocol.errors import ErrorCode, SlotcastError
from protocol.messages import (
    Appointments,
    Block,
    Book,
    Cancel,
    Dashboard,
    Doctors,
    Hold,
    ListAppointments,
    Mark,
    Message,
    MyAppointments,
    Release,
    Reschedule,
    SearchDoctors,
    SetSchedule,
    Snapshot,
    Unblock,
)
from protocol.vocabulary import Role
from server.auth import Identity
from server.settings import Settings
from store import commands, doctors, reads
from store.changes import Change
from store.runner import Store
from store.tx import Actor

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def forbidden(message: str) -> SlotcastError:
    return SlotcastError(message, code=ErrorCode.FORBIDDEN)


def actor_of(who: Identity | None, now: datetime) -> Actor:
    """The caller as the store knows it; anonymous or expired callers stop here."""
    if who is None:
        raise SlotcastError("sign in first", code=ErrorCode.UNAUTHENTICATED)
    if who.expires_at is not None and who.expires_at <= now:
        raise SlotcastError("the token has expired", code=ErrorCode.TOKEN_EXPIRED)
    return Actor(who.subject, who.role)


class Scheduling:
    def __init__(self, store: Store, settings: Settings, clock: Clock = utcnow) -> None:
        self._store = store
        self._settings = settings
        self.clock = clock

    def require_patient(self, who: Identity | None) -> Actor:
        actor = actor_of(who, self.clock())
        if actor.role is not Role.PATIENT:
            raise forbidden("only patients hold, book and follow their appointments")
        return actor

    _patient = require_patient

    def require_doctor(self, who: Identity | None, doctor_id: int) -> Actor:
        actor = actor_of(who, self.clock())
        if not actor.owns_doctor(doctor_id):
            raise forbidden("only the doctor or an admin sees the doctor's dashboard")
        return actor

    # ---- reads --------------------------------------------------------------------------

    def check_range(self, start: date, end: date) -> None:
        days = (end - start).days
        if days < 1:
            raise SlotcastError("`end` must be after `start`", code=ErrorCode.INVALID)
        if days > self._settings.max_watch_days:
            raise SlotcastError(
                f"a range spans at most {self._settings.max_watch_days} days",
                code=ErrorCode.INVALID,
            )

    async def snapshot(self, doctor_id: int, start: date, end: date) -> Snapshot:
        self.check_range(start, end)
        return await reads.snapshot(self._store, doctor_id, start, end, now=self.clock())

    async def missed(self, doctor_id: int, since: int) -> list[Change] | None:
        """The changes after `since`, if the log can replay them; None means: snapshot."""
        current = await reads.doctor_version(self._store, doctor_id)
        if since > current or current - since > self._settings.resume_max_versions:
            return None
        changes = await reads.changes_between(self._store, doctor_id, since, current)
        return changes if len(changes) == current - since else None

    async def dashboard(self, doctor_id: int, day: date) -> Dashboard:
        return await reads.dashboard(self._store, doctor_id, day)

    async def search_doctors(self, who: Identity | None, msg: SearchDoctors) -> Message:
        found = await reads.search_doctors(self._store, msg.q, limit=msg.limit, offset=msg.offset)
        return Doctors(found, msg.limit, msg.offset)

    async def list_appointments(self, who: Identity | None, msg: ListAppointments) -> Message:
        if not actor_of(who, self.clock()).owns_doctor(msg.doctor_id):
            raise forbidden("only the doctor or an admin sees the doctor's appointments")
        await doctors.doctor(self._store, msg.doctor_id)  # not_found for an unknown doctor
        return Appointments(await reads.doctor_appointments(self._store, msg.doctor_id, msg.date))

    async def my_appointments(self, who: Identity | None, msg: MyAppointments) -> Message:
        actor = self._patient(who)  # a doctor's subject is a doctor id, never a patient's
        found = await reads.patient_appointments(self._store, actor.subject, now=self.clock())
        return Appointments(found)

    # ---- commands ------------------------------------------------------------------------

    async def hold(self, who: Identity | None, msg: Hold) -> Message:
        outcome = await commands.hold(
            self._store,
            self._patient(who),
            msg,
            ttl=timedelta(seconds=self._settings.hold_ttl_s),
            max_holds=self._settings.max_holds_per_patient,
            now=self.clock(),
        )
        return outcome.reply

    async def release(self, who: Identity | None, msg: Release) -> Message:
        actor = self._patient(who)
        return (await commands.release(self._store, actor, msg, now=self.clock())).reply

    async def book(self, who: Identity | None, msg: Book) -> Message:
        actor = self._patient(who)
        return (await commands.book(self._store, actor, msg, now=self.clock())).reply

    async def cancel(self, who: Identity | None, msg: Cancel) -> Message:
        actor = actor_of(who, self.clock())
        return (await commands.cancel(self._store, actor, msg, now=self.clock())).reply

    async def reschedule(self, who: Identity | None, msg: Reschedule) -> Message:
        actor = actor_of(who, self.clock())
        return (await commands.reschedule(self._store, actor, msg, now=self.clock())).reply

    async def block(self, who: Identity | None, msg: Block) -> Message:
        actor = actor_of(who, self.clock())
        return (await commands.block(self._store, actor, msg, now=self.clock())).reply

    async def unblock(self, who: Identity | None, msg: Unblock) -> Message:
        actor = actor_of(who, self.clock())
        return (await commands.unblock(self._store, actor, msg, now=self.clock())).reply

    async def mark(self, who: Identity | None, msg: Mark) -> Message:
        actor = actor_of(who, self.clock())
        return (await commands.mark(self._store, actor, msg, now=self.clock())).reply

    async def set_schedule(self, who: Identity | None, msg: SetSchedule) -> Message:
        actor = actor_of(who, self.clock())
        return (await commands.set_schedule(self._store, actor, msg, now=self.clock())).reply


Command = Callable[[Scheduling, Identity | None, Any], Awaitable[Message]]

# Every command, once: the WebSocket handler and the REST adapter both dispatch here.
COMMANDS: dict[type[Message], Command] = {
    Hold: Scheduling.hold,
    Release: Scheduling.release,
    Book: Scheduling.book,
    Cancel: Scheduling.cancel,
    Reschedule: Scheduling.reschedule,
    Block: Scheduling.block,
    Unblock: Scheduling.unblock,
    Mark: Scheduling.mark,
    SetSchedule: Scheduling.set_schedule,
    ListAppointments: Scheduling.list_appointments,
    MyAppointments: Scheduling.my_appointments,
    SearchDoctors: Scheduling.search_doctors,
}
