"""The vocabulary of a write: who acts, what it locks, what it changed, what it returns.

Shared by the runner (which opens the transaction and records it), the steps
(which re-check and write under the locks) and the commands (which say what to
lock and what to do). It holds no SQL, so each of those reads it without
reading the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

import asyncpg
import msgspec

from protocol.messages import AppointmentView, DoctorView, Message, SlotView
from protocol.vocabulary import AppointmentStatus, KeyScope, Role, SlotStatus
from store.changes import Change, ChangeDetail
from store.errors import Forbidden

# ---- who acts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What an API key may do: its scopes (`admin` implies every other), and the one
    doctor it is restricted to, if any."""

    id: int
    scopes: frozenset[KeyScope]
    doctor_id: int | None = None

    def allows(self, scope: KeyScope) -> bool:
        return KeyScope.ADMIN in self.scopes or scope in self.scopes

    def covers(self, doctor_id: int) -> bool:
        return self.doctor_id is None or self.doctor_id == doctor_id


@dataclass(frozen=True, slots=True)
class Actor:
    """Who runs a command. A doctor's subject is the doctor's id, as a string.

    An API key acts as an admin within its grant (`key`): the gates check its scopes
    (`server.commands`), `owns_doctor` its doctor restriction, and the change log names
    it `key:<id>`, never as a person. `name` is a patient's display name (their token's
    `name` claim), stored with the appointments they make.
    """

    subject: str
    role: Role
    name: str | None = None
    key: KeyGrant | None = None

    def __str__(self) -> str:
        if self.key is not None:
            return f"key:{self.key.id}"
        return f"{self.role.value}:{self.subject}"

    @property
    def is_admin(self) -> bool:
        """A person with the admin role, or a key with the admin scope on every doctor."""
        if self.key is not None:
            return self.key.allows(KeyScope.ADMIN) and self.key.doctor_id is None
        return self.role is Role.ADMIN

    def owns_doctor(self, doctor_id: int) -> bool:
        if self.key is not None:
            return self.key.covers(doctor_id)
        return self.role is Role.ADMIN or (
            self.role is Role.DOCTOR and self.subject == str(doctor_id)
        )

    def may_manage(self, appointment: AppointmentView) -> bool:
        """The appointment's patient, its doctor, or an admin."""
        return self.owns_doctor(appointment.doctor_id) or (
            self.role is Role.PATIENT
            and self.key is None
            and self.subject == appointment.patient_id
        )

    def patient(self, patient_id: str | None) -> str:
        """Whose appointment a patient command makes or touches: the caller's own, or
        `patient_id`'s when someone acts on their behalf. A patient names only themselves
        (`forbidden` otherwise); who else may act for the patient of a given doctor is
        `owns_doctor`'s answer, checked by the command once it knows the doctor."""
        if self.role is Role.PATIENT and self.key is None:
            if patient_id is not None and patient_id != self.subject:
                raise Forbidden("a patient books only for themselves")
            return self.subject
        if patient_id is None:
            raise Forbidden("name the patient (`patient_id`) to act on their behalf")
        return patient_id

    def on_behalf(self, patient_id: str | None) -> bool:
        """True when this command acts for someone other than the caller."""
        return not (self.role is Role.PATIENT and self.key is None) and patient_id is not None


SYSTEM = Actor("system", Role.ADMIN)


def resolve_now(now: datetime | None) -> datetime:
    """Tests and sweeps pass their clock; everyone else means the wall clock."""
    return now if now is not None else datetime.now(UTC)


# ---- what a patient may claim -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What one patient may claim at once, so that one identity cannot empty a calendar.

    A patient's active future appointments (booked, or held and unexpired, starting after
    now) are capped per doctor and in total (`appointment_limit`), and a patient whose
    hold on a slot ended (released, or lapsed) may neither hold nor book that slot again
    for `cooldown` (`cooldown`): a slot given back is someone else's turn. Checked by the
    store under the locks, in the command's own transaction, whichever door the command
    came through. The server passes its settings; None (seeding, benchmarks) means no
    limit.
    """

    per_doctor: int
    total: int
    cooldown: timedelta = timedelta(0)


# ---- what a command locks ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Taking:
    """The appointment a booking or a hold means to insert on its slot, told to the runner
    in advance so that its first read can insert it at once when every check passes
    (`sql.SLOT_PRELUDE`); `steps.insert_appointment` then returns that row."""

    patient_id: str
    status: AppointmentStatus
    slot_status: SlotStatus
    hold_expires_at: datetime | None = None
    max_holds: int | None = None  # a hold: the patient's limit, checked with the slot
    limits: Limits | None = None  # the patient's caps and cool-down, checked with the slot
    patient_name: str | None = None  # the display name stored with it
    visit_reason: str | None = None  # visit details stored with it
    patient_contact: str | None = None


@dataclass(frozen=True, slots=True)
class LockTarget:
    """Whose locks a command takes: `doctor_ids`, or the doctor of a slot or appointment,
    found by the locking statement itself so that finding costs no extra round trip."""

    doctor_ids: list[int]
    slot_id: int | None = None
    appointment_id: int | None = None
    # Also the patient's lock (holds, and bookings under `Limits`), after the doctor's.
    patient: str | None = None
    taking: Taking | None = None  # with slot_id: what the command inserts on the slot


# ---- the transaction -------------------------------------------------------------------------


@dataclass(slots=True)
class _DoctorChanges:
    kinds: list[str] = field(default_factory=list)
    slots: dict[int, SlotView] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)
    appointments: dict[int, AppointmentView] = field(default_factory=dict)
    conflicts: list[int] = field(default_factory=list)
    doctor: DoctorView | None = None  # the directory entry, when the command changed it
    blocks: dict[int, str] = field(default_factory=dict)  # slot id -> why it was blocked


class Tx:
    """One command's transaction: its connection, clock, actor and what it changed.

    Steps report their changes here instead of recording them, so a command that
    touches a doctor many times still becomes one version and one change record
    per doctor, written by the runner only when the command succeeds.
    """

    def __init__(self, conn: asyncpg.Connection, now: datetime, actor: Actor) -> None:
        self.conn = conn
        self.now = now
        self.actor = actor
        self._doctors: dict[int, _DoctorChanges] = {}
        # A slot row the runner's first read under the locks already fetched FOR UPDATE
        # (`sql.SLOT_PRELUDE`), handed to `locked_slot` once instead of a second query.
        # The runner only sets it when nothing was written in between.
        self.prefetched_slot: asyncpg.Record | None = None
        # The appointment that read inserted (`taken_` columns), for `insert_appointment`;
        # the runner refuses to commit if the command does not claim it.
        self.taken: tuple[Taking, asyncpg.Record] | None = None
        # Likewise an appointment row read FOR UPDATE by `sql.APPOINTMENT_PRELUDE`.
        self.prefetched_appointment: asyncpg.Record | None = None
        # Doctors this command inserted (their ids locked beforehand): version 0 before it,
        # which the first read could not see.
        self.created: set[int] = set()
        # The patient the actor acts for, when it is someone else (`ChangeDetail`).
        self.on_behalf_of: str | None = None

    def _of(self, doctor_id: int, kind: str | None) -> _DoctorChanges:
        changes = self._doctors.setdefault(doctor_id, _DoctorChanges())
        if kind is not None and kind not in changes.kinds:
            changes.kinds.append(kind)
        return changes

    def slot(self, doctor_id: int, slot: SlotView, kind: str | None = None) -> None:
        self._of(doctor_id, kind).slots[slot.id] = slot

    def removed(self, doctor_id: int, slot_id: int, kind: str | None = None) -> None:
        changes = self._of(doctor_id, kind)
        changes.slots.pop(slot_id, None)
        changes.removed.append(slot_id)

    def appointment(self, view: AppointmentView, kind: str | None = None) -> None:
        self._of(view.doctor_id, kind).appointments[view.id] = view

    def conflict(self, doctor_id: int, slot_id: int) -> None:
        self._of(doctor_id, None).conflicts.append(slot_id)

    def blocked(self, doctor_id: int, slot: SlotView, reason: str, kind: str) -> None:
        """A slot blocked with a reason: the slot goes to every watcher, the reason only
        to the doctor's side (`ChangeDetail.blocks`)."""
        changes = self._of(doctor_id, kind)
        changes.slots[slot.id] = slot
        changes.blocks[slot.id] = reason

    def touched(self, doctor_id: int, kind: str) -> None:
        self._of(doctor_id, kind)

    def doctor(self, view: DoctorView, kind: str) -> None:
        """The doctor's directory entry changed: every watcher's delta carries it."""
        self._of(view.id, kind).doctor = view

    def checkpoint(self) -> dict[int, _DoctorChanges]:
        return {
            d: _DoctorChanges(
                list(c.kinds),
                dict(c.slots),
                list(c.removed),
                dict(c.appointments),
                list(c.conflicts),
                c.doctor,
                dict(c.blocks),
            )
            for d, c in self._doctors.items()
        }

    def restore(self, checkpoint: dict[int, _DoctorChanges]) -> None:
        self._doctors = checkpoint

    def changes(self, versions: dict[int, int]) -> list[tuple[str, Change]]:
        """One change (with its `kind`) per touched doctor, in doctor order, each labelled
        with the doctor's next version: `versions` holds the versions read under the locks.
        The runner writes them all (`sql.RECORD`) and checks every version was the next."""
        changes = []
        for doctor_id in sorted(self._doctors):
            c = self._doctors[doctor_id]
            if doctor_id not in versions:  # pragma: no cover - a command touched an unlocked doctor
                raise RuntimeError(f"doctor {doctor_id} changed without its lock")
            detail = ChangeDetail(
                kinds=c.kinds,
                actor=str(self.actor),
                appointments=msgspec.to_builtins(list(c.appointments.values())),
                conflicts=c.conflicts,
                on_behalf_of=self.on_behalf_of,
                blocks=[
                    {"slot_id": slot_id, "reason": reason}
                    for slot_id, reason in c.blocks.items()
                    if slot_id in c.slots
                ],
            )
            change = Change.build(
                doctor_id,
                versions[doctor_id] + 1,
                list(c.slots.values()),
                c.removed,
                detail,
                doctor=c.doctor,
            )
            changes.append(("+".join(c.kinds) or "change", change))
        self._doctors.clear()
        return changes


# ---- what a command returns --------------------------------------------------------------------

Reply = TypeVar("Reply", bound=Message | None)


@dataclass(frozen=True, slots=True)
class Outcome(Generic[Reply]):
    reply: Reply  # None for system work (expiry, slot upkeep)
    changes: list[Change]  # empty for an idempotent replay
