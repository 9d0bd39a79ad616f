"""The scheduling service both front doors share: its gates, its clock and its reads.

Commands are listed once in `server.commands`; what they and the WebSocket's
watches have in common lives here: who the caller is (`actor_of` and the role
gates), the range a watch may span, and the reads with a policy of their own
(a snapshot's range, a resume that falls back to a snapshot when too far behind).
Committed changes reach the broker through the store's outbox (`store.outbox`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime

from protocol.errors import ErrorCode, SlotcastError
from protocol.messages import Appointments, Dashboard, Snapshot
from protocol.vocabulary import Role
from server.auth import Identity
from server.settings import Settings
from store import reads
from store.changes import Change
from store.pool import Store
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
        self.store = store
        self.settings = settings
        self.clock = clock

    def require_patient(self, who: Identity | None) -> Actor:
        actor = actor_of(who, self.clock())
        if actor.role is not Role.PATIENT:
            raise forbidden("only patients hold, book and follow their appointments")
        return actor

    def require_admin(self, who: Identity | None) -> Actor:
        actor = actor_of(who, self.clock())
        if actor.role is not Role.ADMIN:
            raise forbidden("only an admin manages the doctor directory")
        return actor

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
        if days > self.settings.max_watch_days:
            raise SlotcastError(
                f"a range spans at most {self.settings.max_watch_days} days",
                code=ErrorCode.INVALID,
            )

    async def snapshot(self, doctor_id: int, start: date, end: date) -> Snapshot:
        snapshot, _ = await self.snapshot_at(doctor_id, start, end)
        return snapshot

    async def snapshot_at(
        self, doctor_id: int, start: date, end: date
    ) -> tuple[Snapshot, datetime]:
        """A snapshot and the `now` its bookable bounds were taken at (what a cache keeps)."""
        self.check_range(start, end)
        now = self.clock()
        snapshot = await reads.snapshot(
            self.store,
            doctor_id,
            start,
            end,
            now=now,
            max_slots=self.settings.max_snapshot_slots,
        )
        return snapshot, now

    async def missed(self, doctor_id: int, since: int) -> list[Change] | None:
        """The changes after `since`, if the log can replay them; None means: snapshot."""
        current = await reads.doctor_version(self.store, doctor_id)
        if since > current or current - since > self.settings.resume_max_versions:
            return None
        changes = await reads.changes_between(self.store, doctor_id, since, current)
        return changes if len(changes) == current - since else None

    async def dashboard(self, doctor_id: int, day: date) -> Dashboard:
        return await reads.dashboard(
            self.store, doctor_id, day, max_slots=self.settings.max_snapshot_slots
        )

    async def my_appointments(self, patient: Actor) -> Appointments:
        """Shared by the `my_appointments` command and `watch_appointments`' first reply."""
        found = await reads.patient_appointments(self.store, patient.subject, now=self.clock())
        return Appointments(found)
