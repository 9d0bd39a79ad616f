"""The scheduling service both front doors share: its gates, its clock and its reads.

Commands are listed once in `server.commands`; what they and the WebSocket's
watches have in common lives here: who the caller is (`actor_of` and the role
gates), the range a watch may span, and the reads with a policy of their own
(a snapshot's range, a resume that falls back to a snapshot when too far behind).
Committed changes reach the broker through the store's outbox (`store.outbox`).

The reads here may be served by a read replica (`store.replicas`); each is fenced
by the version its caller already knows (`at_least`: a member's room version when
it joined, a client's `since`) and by the version this instance's room holds
(`known`), so no answer is older than what its client could already have seen.
Commands, and the reads a patient makes of their own appointments (which have no
version to fence on), stay on the primary.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime

from protocol.errors import ErrorCode, SlotcastError
from protocol.messages import Appointments, Dashboard, DoctorView, SlotView, Snapshot
from protocol.vocabulary import KeyScope, Role
from server.auth import Identity
from server.settings import Settings
from store import reads
from store.changes import Change
from store.pool import Store
from store.replicas import Replicas
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
    return Actor(who.subject, who.role, who.name, who.key)


def require_scope(actor: Actor, scope: KeyScope) -> Actor:
    """An API key passes only with `scope` (or `admin`); anyone else passes."""
    if actor.key is not None and not actor.key.allows(scope):
        raise forbidden(f"this API key lacks the `{scope.value}` scope")
    return actor


def _nothing_known(doctor_id: int) -> int:
    return 0


class Scheduling:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        clock: Clock = utcnow,
        *,
        replicas: Replicas | None = None,
        known: Callable[[int], int] = _nothing_known,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.replicas = replicas or Replicas(primary=store)
        # The doctor's version this instance's room is at (0: no room): the least a
        # REST read may answer with.
        self.known = known

    def require_patient(self, who: Identity | None) -> Actor:
        actor = actor_of(who, self.clock())
        if actor.role is not Role.PATIENT:
            raise forbidden("only patients hold, book and follow their appointments")
        return actor

    def require_admin(self, who: Identity | None) -> Actor:
        actor = actor_of(who, self.clock())
        if not actor.is_admin:
            raise forbidden("only an admin manages the doctor directory")
        return actor

    def require_doctor(self, who: Identity | None, doctor_id: int) -> Actor:
        actor = require_scope(actor_of(who, self.clock()), KeyScope.READ)
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
        """A REST slot read: at least as new as this instance's room of the doctor."""
        snapshot, _ = await self.snapshot_at(doctor_id, start, end, self.known(doctor_id))
        return snapshot

    async def snapshot_at(
        self, doctor_id: int, start: date, end: date, at_least: int = 0
    ) -> tuple[Snapshot, datetime]:
        """A snapshot at version `at_least` or later, and the `now` its bookable bounds
        were taken at (what a cache keeps)."""
        self.check_range(start, end)
        now = self.clock()

        async def read(store: Store, min_version: int) -> Snapshot:
            return await reads.snapshot(
                store,
                doctor_id,
                start,
                end,
                now=now,
                max_slots=self.settings.max_snapshot_slots,
                min_version=min_version,
            )

        snapshot = await self.replicas.fenced(doctor_id, at_least, read, _version)
        return snapshot, now

    async def missed(self, doctor_id: int, since: int, at_least: int = 0) -> list[Change] | None:
        """The changes after `since`, if the log can replay them; None means: snapshot.

        Read at version `since` and `at_least` or later: a replica behind either must
        not say "nothing missed" for what it has not replayed yet.
        """

        async def read(store: Store, min_version: int) -> tuple[int, list[Change] | None]:
            return await reads.resume(
                store,
                doctor_id,
                since,
                max_versions=self.settings.resume_max_versions,
                min_version=min_version,
            )

        _, changes = await self.replicas.fenced(doctor_id, max(since, at_least), read, _current)
        return changes

    async def dashboard(self, doctor_id: int, day: date, at_least: int = 0) -> Dashboard:
        """A doctor's day at version `at_least` or later (the dashboard member's join)."""

        async def read(store: Store, min_version: int) -> Dashboard:
            return await reads.dashboard(
                store,
                doctor_id,
                day,
                max_slots=self.settings.max_snapshot_slots,
                min_version=min_version,
            )

        return await self.replicas.fenced(doctor_id, at_least, read, _version)

    async def next_available(self, doctor_id: int, after: datetime | None) -> SlotView | None:
        """At least as new as this instance's room of the doctor, like a REST slot read: a
        replica behind what a page has already seen never offers a slot it saw taken."""
        now = self.clock()

        async def read(store: Store, min_version: int) -> tuple[int, SlotView | None]:
            return await reads.next_available(
                store, doctor_id, after=after, now=now, min_version=min_version
            )

        _, slot = await self.replicas.fenced(doctor_id, self.known(doctor_id), read, _first)
        return slot

    async def search_doctors(
        self, query: str | None, *, limit: int, offset: int, include_retired: bool = False
    ) -> list[DoctorView]:
        """The directory: no version to fence on, so at most a rotating replica's lag old."""
        return await self.replicas.read(
            lambda store: reads.search_doctors(
                store, query, limit=limit, offset=offset, include_retired=include_retired
            )
        )

    async def my_appointments(self, patient: Actor) -> Appointments:
        """Shared by the `my_appointments` command and `watch_appointments`' first reply."""
        found = await reads.patient_appointments(self.store, patient.subject, now=self.clock())
        return Appointments(found)


def _version(read: Snapshot | Dashboard) -> int:
    return read.version


def _current(read: tuple[int, list[Change] | None]) -> int:
    return read[0]


def _first(read: tuple[int, SlotView | None]) -> int:
    return read[0]
