"""Scheduling commands, shared by the WebSocket and REST front doors.

`COMMANDS` maps each command message to a `Scheduling` method; both front doors
dispatch through it, so a hold over REST and a hold over a WebSocket are the
same code. Role checks that need no data happen here; ownership checks that do
happen in the store, under the doctor's lock. Committed changes reach the broker
through the `Publisher`, which the store notifies on every commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from store.broker import Broker
from store.changes import Change, PatientNote
from store.commands import Actor
from store.constants import doctor_channel, patient_channel
from store.database import Outcome, Store
from store.errors import StoreError

log = logging.getLogger(__name__)

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


def _reply(outcome: Outcome) -> Message:
    assert outcome.reply is not None
    return outcome.reply


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
        return await self._store.snapshot(doctor_id, start, end, now=self.clock())

    async def missed(self, doctor_id: int, since: int) -> list[Change] | None:
        """The changes after `since`, if the log can replay them; None means: snapshot."""
        current = await self._store.doctor_version(doctor_id)
        if since > current or current - since > self._settings.resume_max_versions:
            return None
        changes = await self._store.changes_between(doctor_id, since, current)
        return changes if len(changes) == current - since else None

    async def dashboard(self, doctor_id: int, day: date) -> Dashboard:
        return await self._store.dashboard(doctor_id, day)

    async def search_doctors(self, who: Identity | None, msg: SearchDoctors) -> Message:
        found = await self._store.search_doctors(msg.q, limit=msg.limit, offset=msg.offset)
        return Doctors(found, msg.limit, msg.offset)

    async def list_appointments(self, who: Identity | None, msg: ListAppointments) -> Message:
        if not actor_of(who, self.clock()).owns_doctor(msg.doctor_id):
            raise forbidden("only the doctor or an admin sees the doctor's appointments")
        await self._store.doctor(msg.doctor_id)  # not_found for an unknown doctor
        return Appointments(await self._store.doctor_appointments(msg.doctor_id, msg.date))

    async def my_appointments(self, who: Identity | None, msg: MyAppointments) -> Message:
        actor = self._patient(who)  # a doctor's subject is a doctor id, never a patient's
        return Appointments(await self._store.patient_appointments(actor.subject, now=self.clock()))

    # ---- commands ------------------------------------------------------------------------

    async def hold(self, who: Identity | None, msg: Hold) -> Message:
        outcome = await self._store.hold(
            self._patient(who),
            msg,
            ttl=timedelta(seconds=self._settings.hold_ttl_s),
            max_holds=self._settings.max_holds_per_patient,
            now=self.clock(),
        )
        return _reply(outcome)

    async def release(self, who: Identity | None, msg: Release) -> Message:
        return _reply(await self._store.release(self._patient(who), msg, now=self.clock()))

    async def book(self, who: Identity | None, msg: Book) -> Message:
        return _reply(await self._store.book_command(self._patient(who), msg, now=self.clock()))

    async def cancel(self, who: Identity | None, msg: Cancel) -> Message:
        actor = actor_of(who, self.clock())
        return _reply(await self._store.cancel(actor, msg, now=self.clock()))

    async def reschedule(self, who: Identity | None, msg: Reschedule) -> Message:
        actor = actor_of(who, self.clock())
        return _reply(await self._store.reschedule(actor, msg, now=self.clock()))

    async def block(self, who: Identity | None, msg: Block) -> Message:
        actor = actor_of(who, self.clock())
        return _reply(await self._store.set_blocked(actor, msg, blocked=True, now=self.clock()))

    async def unblock(self, who: Identity | None, msg: Unblock) -> Message:
        actor = actor_of(who, self.clock())
        return _reply(await self._store.set_blocked(actor, msg, blocked=False, now=self.clock()))

    async def mark(self, who: Identity | None, msg: Mark) -> Message:
        actor = actor_of(who, self.clock())
        return _reply(await self._store.mark(actor, msg, now=self.clock()))

    async def set_schedule(self, who: Identity | None, msg: SetSchedule) -> Message:
        actor = actor_of(who, self.clock())
        return _reply(await self._store.set_schedule(actor, msg, now=self.clock()))


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


class Publisher:
    """Publishes committed changes in commit order, off the request path.

    Each change goes to its doctor's channel, and a note to the channel of every
    patient it touched. A publish that fails is not lost: the relay cursor only
    advances past what was published, and the relay sweep (`republish`) sends
    whatever stayed behind, e.g. after a crash between commit and publish.
    """

    def __init__(self, broker: Broker, store: Store) -> None:
        self._broker = broker
        self._store = store
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._done: dict[int, int] = {}  # doctor -> highest version published this batch
        self._failed: dict[int, set[int]] = {}  # doctor -> versions whose publish failed
        self._task = asyncio.create_task(self._run(), name="publisher")

    def enqueue(self, changes: list[Change]) -> None:
        for change in changes:
            self._queue.put_nowait(change)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            try:
                for change in batch:
                    failed = self._failed.setdefault(change.doctor_id, set())
                    if await self._publish(change):
                        failed.discard(change.version)
                        self._done[change.doctor_id] = max(
                            self._done.get(change.doctor_id, 0), change.version
                        )
                    else:
                        failed.add(change.version)
                # The cursor never passes a version whose publish failed: the relay
                # resends from there (a patient room has no log to fill gaps from).
                cursor = {
                    doctor: min(done, min(self._failed.get(doctor) or {done + 1}) - 1)
                    for doctor, done in self._done.items()
                }
                self._done.clear()
                await self._store.mark_published(cursor)
            except StoreError as exc:
                log.warning("could not advance the relay cursor: %s", exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _publish(self, change: Change) -> bool:
        try:
            await self._broker.publish(doctor_channel(change.doctor_id), change.pack())
            for note in PatientNote.of_change(change):
                await self._broker.publish(patient_channel(note.patient_id), note.pack())
        except StoreError as exc:
            log.warning(
                "publish of doctor %s v%s failed: %s", change.doctor_id, change.version, exc
            )
            return False
        return True

    async def close(self, timeout: float = 2.0) -> None:
        """Publish what is queued (bounded), then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
