"""Every message of protocol v1, as frozen, slotted dataclasses.

A message's wire name is its `TYPE`. The envelope around it is
`{"type": TYPE, "id": <client request id or null>, "body": {...fields...}}`;
replies echo the request's `id`. Field constraints (ranges, lengths, time zone
awareness) are declared here with `Annotated` and enforced when a frame is decoded,
so handlers only ever see valid values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Annotated, ClassVar

from msgspec import Meta

from protocol.vocabulary import AppointmentStatus, Role, SlotStatus

PROTOCOL = "slotcast.v1"

# PostgreSQL text cannot hold NUL; refusing it here keeps it from becoming a server error.
NO_NUL = "^[^\x00]*$"
Id = Annotated[int, Meta(ge=1, le=2**53 - 1)]  # a safe JavaScript integer
DoctorId = Annotated[int, Meta(ge=1, le=2**31 - 1)]  # fits the int4 advisory-lock key
RequestId = Annotated[str, Meta(min_length=1, max_length=64)] | Annotated[int, Meta(ge=0)]
Key = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_NUL)]
Token = Annotated[str, Meta(min_length=1, max_length=4096)]
Reason = Annotated[str, Meta(min_length=1, max_length=500, pattern=NO_NUL)]
Query = Annotated[str, Meta(max_length=100, pattern=NO_NUL)]
Instant = Annotated[datetime, Meta(tz=True)]
# A wall-clock time in the doctor's zone: an offset would contradict the zone.
LocalTime = Annotated[time, Meta(tz=False)]
# The doctor directory's fields. A zone is checked against the IANA database by the
# server (and by PostgreSQL), not here: the list changes with the tz database.
DoctorName = Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]
Specialty = Annotated[str, Meta(max_length=200, pattern=NO_NUL)]
ZoneName = Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_NUL)]
# The doctor's id in the clinic's own staff system: what imports match on.
ExternalId = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_NUL)]
# A patient's display name: the token's `name` claim, or given by whoever books for them.
PatientName = Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]
# Why the patient comes, in their words or the front desk's (staff and the patient see it).
VisitReason = Annotated[str, Meta(min_length=1, max_length=300, pattern=NO_NUL)]
# How the clinic reaches a patient: a phone number or an e-mail address, checked loosely
# (digits with the usual separators, or something@somewhere.tld), since numbers and
# addresses come in more shapes than any strict rule allows.
CONTACT = r"^(?:\+?[0-9(][0-9 ().\-/]{2,38}|[^@\s\x00]{1,64}@[^@\s\x00]+\.[^@\s\x00]+)$"
PatientContact = Annotated[str, Meta(min_length=3, max_length=120, pattern=CONTACT)]


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame: which message, the client's request id, and the typed body."""

    id: str | int | None
    body: Message


class Message:
    """Marker base: every message has a wire `TYPE`."""

    __slots__ = ()
    TYPE: ClassVar[str]


def _utc(value: datetime | None) -> datetime | None:
    """Instants travel as UTC: encoders round sub-minute offsets (old local mean times)."""
    if value is None or value.utcoffset() == UTC.utcoffset(None):
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+14:00 has no UTC equivalent
        raise ValueError("instant out of range") from None


def _normalize_instants(obj: object, *names: str) -> None:
    for name in names:
        object.__setattr__(obj, name, _utc(getattr(obj, name)))


# The dates a client may send: one day inside what a date type holds at either end, since
# the server steps a day either side of a date (a dashboard is [date, date + 1)) and that
# must never overflow. 0001-01-01 and 9999-12-31 are `invalid`, never a server error.
FIRST_DATE = date(1, 1, 2)
LAST_DATE = date(9999, 12, 30)


def check_date(value: date, name: str) -> date:
    if not FIRST_DATE <= value <= LAST_DATE:
        raise ValueError(f"`{name}` must be a date from {FIRST_DATE} to {LAST_DATE}")
    return value


def _bound_dates(obj: object, *names: str) -> None:
    for name in names:
        check_date(getattr(obj, name), name)


# ---- shared value types -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotView:
    """A slot as anyone may see it: time and status, never who holds it."""

    id: Id
    start: Instant
    end: Instant
    status: SlotStatus
    # When a `busy-tentative` slot frees itself unless its holder confirms.
    hold_expires_at: Instant | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "start", "end", "hold_expires_at")


@dataclass(frozen=True, slots=True)
class AppointmentView:
    id: Id
    slot_id: Id
    doctor_id: DoctorId
    patient_id: Key
    start: Instant
    end: Instant
    status: AppointmentStatus
    hold_expires_at: Instant | None = None  # set while `pending` (a hold)
    replaces_id: Id | None = None  # the appointment this one rescheduled
    cancel_reason: str | None = None
    cancelled_at: Instant | None = None
    patient_name: str | None = None  # the patient's display name, when one is known
    # Visit details: only the patient's own views and staff's (dashboard, lists, webhooks).
    visit_reason: str | None = None
    patient_contact: str | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "start", "end", "hold_expires_at", "cancelled_at")


@dataclass(frozen=True, slots=True)
class DoctorView:
    """A doctor as the directory shows them. `external_id` (the clinic's staff-system id)
    is filled in for admins only; `retired_at` is set once the doctor is retired (only
    admins find retired doctors in the directory; watchers learn it from a `delta`).

    `min_notice_minutes` and `horizon_days` are public because they decide a watcher's
    bookable window: a `delta` that carries them (every `set_schedule` does) lets an open
    page slide its window without reading a snapshot again. They are null only in entries
    the change log recorded before the rules rode along (a resume may replay those)."""

    id: DoctorId
    name: str
    specialty: str
    timezone: str
    external_id: str | None = None
    retired_at: Instant | None = None
    min_notice_minutes: int | None = None
    horizon_days: int | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "retired_at")


@dataclass(frozen=True, slots=True)
class WeeklyBlock:
    """Open hours on one ISO weekday (Monday = 1), in the doctor's local time."""

    weekday: Annotated[int, Meta(ge=1, le=7)]
    start: LocalTime
    end: LocalTime


@dataclass(frozen=True, slots=True)
class DayOverride:
    """Hours for one local date instead of its weekly blocks; no times means a day off."""

    date: date
    start: LocalTime | None = None
    end: LocalTime | None = None

    def __post_init__(self) -> None:
        _bound_dates(self, "date")


@dataclass(frozen=True, slots=True)
class BlockNote:
    """Why the doctor's side blocked a slot: staff messages only. Patients see the slot
    as `busy-unavailable` and nothing more, so the reason rides beside the slot views
    (which every watcher receives), never inside them."""

    slot_id: Id
    reason: str


# ---- client -> server ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """Present a bearer token after connecting (browsers cannot set headers)."""

    TYPE: ClassVar[str] = "auth"
    token: Token


@dataclass(frozen=True, slots=True)
class Watch(Message):
    """Subscribe to a doctor's public availability for [start, end) in the doctor's zone.

    With `since` (the last version the client applied) the server answers `resumed`
    and replays exactly the missed deltas when it still can, else a fresh snapshot.
    """

    TYPE: ClassVar[str] = "watch"
    doctor_id: DoctorId
    start: date
    end: date
    since: Annotated[int, Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        _bound_dates(self, "start", "end")


@dataclass(frozen=True, slots=True)
class WatchDashboard(Message):
    """The doctor's live day: appointments with patients, slots, and who is watching."""

    TYPE: ClassVar[str] = "watch_dashboard"
    doctor_id: DoctorId
    date: date

    def __post_init__(self) -> None:
        _bound_dates(self, "date")


@dataclass(frozen=True, slots=True)
class UnwatchDashboard(Message):
    TYPE: ClassVar[str] = "unwatch_dashboard"
    doctor_id: DoctorId


@dataclass(frozen=True, slots=True)
class WatchAppointments(Message):
    """A patient follows their own holds and appointments, live."""

    TYPE: ClassVar[str] = "watch_appointments"


@dataclass(frozen=True, slots=True)
class UnwatchAppointments(Message):
    TYPE: ClassVar[str] = "unwatch_appointments"


@dataclass(frozen=True, slots=True)
class Unwatch(Message):
    TYPE: ClassVar[str] = "unwatch"
    doctor_id: DoctorId


@dataclass(frozen=True, slots=True)
class Hold(Message):
    """Hold a free slot for a while (it shows as `busy-tentative`) before confirming."""

    TYPE: ClassVar[str] = "hold"
    slot_id: Id
    idempotency_key: Key | None = None
    # On a patient's behalf (the doctor, an admin, a key with the `book` scope).
    patient_id: Key | None = None
    patient_name: PatientName | None = None
    # Visit details, stored with the appointment (docs/protocol.md, "Visit details").
    visit_reason: VisitReason | None = None
    patient_contact: PatientContact | None = None


@dataclass(frozen=True, slots=True)
class Release(Message):
    """Give a hold back before it expires."""

    TYPE: ClassVar[str] = "release"
    appointment_id: Id
    idempotency_key: Key | None = None
    patient_id: Key | None = None  # whose hold, when released on their behalf


@dataclass(frozen=True, slots=True)
class Book(Message):
    """Book a free slot directly, or confirm one's own hold (`hold_id`).

    Resending with the same idempotency key returns the first result.
    """

    TYPE: ClassVar[str] = "book"
    slot_id: Id | None = None
    idempotency_key: Key | None = None
    hold_id: Id | None = None
    # On a patient's behalf (the doctor, an admin, a key with the `book` scope).
    patient_id: Key | None = None
    patient_name: PatientName | None = None
    # Visit details, stored with the appointment; confirming a hold may add or change them.
    visit_reason: VisitReason | None = None
    patient_contact: PatientContact | None = None


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Cancel a booked appointment (its patient, its doctor, or an admin)."""

    TYPE: ClassVar[str] = "cancel"
    appointment_id: Id
    reason: Reason
    idempotency_key: Key | None = None
    patient_id: Key | None = None  # on a patient's behalf: must be the appointment's


@dataclass(frozen=True, slots=True)
class Reschedule(Message):
    """Move a booked appointment to another free slot: both happen, or neither."""

    TYPE: ClassVar[str] = "reschedule"
    appointment_id: Id
    slot_id: Id
    idempotency_key: Key | None = None
    patient_id: Key | None = None  # on a patient's behalf: must be the appointment's


@dataclass(frozen=True, slots=True)
class Block(Message):
    """The doctor takes a free slot out of availability (`busy-unavailable`)."""

    TYPE: ClassVar[str] = "block"
    slot_id: Id
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class Unblock(Message):
    TYPE: ClassVar[str] = "unblock"
    slot_id: Id
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class Mark(Message):
    """The doctor records what happened: `arrived`, `fulfilled` or `noshow`."""

    TYPE: ClassVar[str] = "mark"
    appointment_id: Id
    status: AppointmentStatus
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class Unmark(Message):
    """Undo the doctor's last `mark` of an appointment, within a short time of it."""

    TYPE: ClassVar[str] = "unmark"
    appointment_id: Id
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class SetSchedule(Message):
    """Replace a doctor's availability rules; slots follow, booked ones are never dropped."""

    TYPE: ClassVar[str] = "set_schedule"
    doctor_id: DoctorId
    weekly: Annotated[list[WeeklyBlock], Meta(max_length=100)]
    overrides: Annotated[list[DayOverride], Meta(max_length=400)] = field(default_factory=list)
    slot_minutes: Annotated[int, Meta(ge=5, le=480)] = 30
    buffer_minutes: Annotated[int, Meta(ge=0, le=240)] = 0
    min_notice_minutes: Annotated[int, Meta(ge=0, le=43200)] = 0
    horizon_days: Annotated[int, Meta(ge=1, le=366)] = 28
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class GetSchedule(Message):
    """A doctor's rules and hours, read back in the very shape `set_schedule` takes."""

    TYPE: ClassVar[str] = "get_schedule"
    doctor_id: DoctorId


@dataclass(frozen=True, slots=True)
class NextAvailable(Message):
    """The doctor's first slot a patient may hold now, starting at or after `after`
    (default: now): what a page's "next available" jumps to. One bounded read: the
    search ends at the doctor's booking horizon."""

    TYPE: ClassVar[str] = "next_available"
    doctor_id: DoctorId
    after: Instant | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "after")


@dataclass(frozen=True, slots=True)
class ListAppointments(Message):
    """A doctor's appointments on one of the doctor's local dates."""

    TYPE: ClassVar[str] = "list_appointments"
    doctor_id: DoctorId
    date: date

    def __post_init__(self) -> None:
        _bound_dates(self, "date")


@dataclass(frozen=True, slots=True)
class MyAppointments(Message):
    """The caller's own upcoming appointments and holds (patients)."""

    TYPE: ClassVar[str] = "my_appointments"


@dataclass(frozen=True, slots=True)
class SearchDoctors(Message):
    """The directory: active doctors whose name or specialty contains `q`.

    `include_retired` (admins only) lists retired doctors too, with their external ids.
    """

    TYPE: ClassVar[str] = "search_doctors"
    q: Query | None = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    offset: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    include_retired: bool = False


@dataclass(frozen=True, slots=True)
class CreateDoctor(Message):
    """An admin adds a doctor to the directory (no hours yet: `set_schedule` opens slots)."""

    TYPE: ClassVar[str] = "create_doctor"
    name: DoctorName
    timezone: ZoneName
    specialty: Specialty = ""
    external_id: ExternalId | None = None
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class UpdateDoctor(Message):
    """An admin corrects a doctor's directory entry; fields left out stay as they are.

    A new `timezone` keeps the weekly hours as wall-clock times in the new zone: free
    slots move, booked ones that no longer fit are flagged as conflicts.
    """

    TYPE: ClassVar[str] = "update_doctor"
    doctor_id: DoctorId
    name: DoctorName | None = None
    specialty: Specialty | None = None
    timezone: ZoneName | None = None
    external_id: ExternalId | None = None
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class RetireDoctor(Message):
    """An admin retires a doctor: their free slots and hours close, holds are released,
    booked appointments and the whole history stay (docs/protocol.md says why)."""

    TYPE: ClassVar[str] = "retire_doctor"
    doctor_id: DoctorId
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class BlockRange(Message):
    """Take every free slot starting in [start, end) off the calendar at once (a day off
    at short notice, a meeting): one change, with a reason only the doctor's side sees."""

    TYPE: ClassVar[str] = "block_range"
    doctor_id: DoctorId
    start: Instant
    end: Instant
    reason: Reason | None = None
    idempotency_key: Key | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "start", "end")


@dataclass(frozen=True, slots=True)
class UnblockRange(Message):
    """Offer every blocked slot starting in [start, end) again, in one change."""

    TYPE: ClassVar[str] = "unblock_range"
    doctor_id: DoctorId
    start: Instant
    end: Instant
    idempotency_key: Key | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "start", "end")


@dataclass(frozen=True, slots=True)
class PreviewSchedule(Message):
    """What `set_schedule` with this body would leave in conflict, without saving it: an
    editor shows the booked and held appointments a change would strand, before it does."""

    TYPE: ClassVar[str] = "preview_schedule"
    doctor_id: DoctorId
    weekly: Annotated[list[WeeklyBlock], Meta(max_length=100)]
    overrides: Annotated[list[DayOverride], Meta(max_length=400)] = field(default_factory=list)
    slot_minutes: Annotated[int, Meta(ge=5, le=480)] = 30
    buffer_minutes: Annotated[int, Meta(ge=0, le=240)] = 0
    min_notice_minutes: Annotated[int, Meta(ge=0, le=43200)] = 0
    horizon_days: Annotated[int, Meta(ge=1, le=366)] = 28


# ---- server -> client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """First frame on every connection: who the server is and who it thinks you are."""

    TYPE: ClassVar[str] = "welcome"
    protocol: str
    instance: str
    subject: str | None = None
    role: Role | None = None


@dataclass(frozen=True, slots=True)
class Authenticated(Message):
    TYPE: ClassVar[str] = "authenticated"
    subject: str
    role: Role
    expires_at: Instant | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "expires_at")


@dataclass(frozen=True, slots=True)
class Snapshot(Message):
    """The full state of a watched range, stamped with the doctor's version."""

    TYPE: ClassVar[str] = "snapshot"
    doctor_id: DoctorId
    version: Annotated[int, Meta(ge=0)]
    timezone: str
    start: date
    end: date
    slots: list[SlotView] = field(default_factory=list)
    # Free slots outside [bookable_from, bookable_until) are refused (notice, horizon).
    bookable_from: Instant | None = None
    bookable_until: Instant | None = None

    def __post_init__(self) -> None:
        _normalize_instants(self, "bookable_from", "bookable_until")


@dataclass(frozen=True, slots=True)
class Delta(Message):
    """What one committed doctor version changed (exactly `previous + 1`).

    `slots` are new or changed slots; `removed` are ids no longer offered. A delta
    may carry neither: the version moved for something only the doctor sees.
    """

    TYPE: ClassVar[str] = "delta"
    doctor_id: DoctorId
    version: Annotated[int, Meta(ge=1)]
    slots: list[SlotView] = field(default_factory=list)
    removed: list[Id] = field(default_factory=list)
    # Set when the server merged several versions for a client that fell behind:
    # the delta then covers (since, version] and applies on top of `since`.
    since: Annotated[int, Meta(ge=0)] | None = None
    # Set when the version changed the doctor's directory entry (renamed, retired):
    # the entry as it now stands, public fields only.
    doctor: DoctorView | None = None


@dataclass(frozen=True, slots=True)
class Resumed(Message):
    """The reply to `watch` with `since`: the missed deltas follow, then live ones."""

    TYPE: ClassVar[str] = "resumed"
    doctor_id: DoctorId
    since: Annotated[int, Meta(ge=0)]
    version: Annotated[int, Meta(ge=0)]  # the deltas that follow bring the client here


@dataclass(frozen=True, slots=True)
class Dashboard(Message):
    """A doctor's day, stamped with the doctor's version; `dashboard_delta`s follow."""

    TYPE: ClassVar[str] = "dashboard"
    doctor_id: DoctorId
    version: Annotated[int, Meta(ge=0)]
    timezone: str
    date: date
    appointments: list[AppointmentView] = field(default_factory=list)
    slots: list[SlotView] = field(default_factory=list)
    conflicts: list[Id] = field(default_factory=list)
    watchers: Annotated[int, Meta(ge=0)] = 0
    blocks: list[BlockNote] = field(default_factory=list)  # reasons of the day's blocked slots


@dataclass(frozen=True, slots=True)
class DashboardDelta(Message):
    """What one doctor version changed, as the doctor sees it (patients included)."""

    TYPE: ClassVar[str] = "dashboard_delta"
    doctor_id: DoctorId
    version: Annotated[int, Meta(ge=1)]
    kinds: list[str] = field(default_factory=list)
    actor: str | None = None
    appointments: list[AppointmentView] = field(default_factory=list)
    slots: list[SlotView] = field(default_factory=list)
    removed: list[Id] = field(default_factory=list)
    conflicts: list[Id] = field(default_factory=list)
    # Reasons of the slots in `slots` blocked with one; any other slot there has none.
    blocks: list[BlockNote] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Presence(Message):
    """How many clients watch the doctor's availability, across all instances."""

    TYPE: ClassVar[str] = "presence"
    doctor_id: DoctorId
    watchers: Annotated[int, Meta(ge=0)]


@dataclass(frozen=True, slots=True)
class AppointmentEvent(Message):
    """One of the patient's own appointments changed (patient room)."""

    TYPE: ClassVar[str] = "appointment_event"
    doctor_id: DoctorId
    version: Annotated[int, Meta(ge=1)]
    appointment: AppointmentView


@dataclass(frozen=True, slots=True)
class Resync(Message):
    """Updates may have been lost (e.g. a broker outage): watch again to catch up."""

    TYPE: ClassVar[str] = "resync"
    room: str  # "availability", "dashboard" or "appointments"
    doctor_id: DoctorId | None = None


@dataclass(frozen=True, slots=True)
class Reconnect(Message):
    """This instance is going away: reconnect (after the delay) and resume."""

    TYPE: ClassVar[str] = "reconnect"
    retry_after_ms: Annotated[int, Meta(ge=0)] = 0


@dataclass(frozen=True, slots=True)
class Unwatched(Message):
    TYPE: ClassVar[str] = "unwatched"
    doctor_id: DoctorId | None = None
    room: str = "availability"  # or "dashboard", "appointments"


@dataclass(frozen=True, slots=True)
class Booked(Message):
    TYPE: ClassVar[str] = "booked"
    appointment: AppointmentView


@dataclass(frozen=True, slots=True)
class Held(Message):
    TYPE: ClassVar[str] = "held"
    appointment: AppointmentView


@dataclass(frozen=True, slots=True)
class AppointmentUpdated(Message):
    """The reply to release, cancel and mark: the appointment as it now stands."""

    TYPE: ClassVar[str] = "appointment"
    appointment: AppointmentView


@dataclass(frozen=True, slots=True)
class Rescheduled(Message):
    TYPE: ClassVar[str] = "rescheduled"
    appointment: AppointmentView  # the new, booked appointment
    replaced: AppointmentView  # the old one, now cancelled


@dataclass(frozen=True, slots=True)
class SlotUpdated(Message):
    TYPE: ClassVar[str] = "slot"
    doctor_id: DoctorId
    slot: SlotView


@dataclass(frozen=True, slots=True)
class ScheduleUpdated(Message):
    TYPE: ClassVar[str] = "schedule_updated"
    doctor_id: DoctorId
    version: Annotated[int, Meta(ge=0)]
    opened: Annotated[int, Meta(ge=0)]  # slots added
    removed: Annotated[int, Meta(ge=0)]  # free slots no longer offered
    conflicts: list[Id] = field(default_factory=list)  # booked slots now outside the schedule


@dataclass(frozen=True, slots=True)
class Schedule(Message):
    """The reply to `get_schedule`: exactly the fields of `set_schedule` (less its
    idempotency key), so an editor can change one and send the rest back unchanged."""

    TYPE: ClassVar[str] = "schedule"
    doctor_id: DoctorId
    weekly: list[WeeklyBlock]
    overrides: list[DayOverride]
    slot_minutes: int
    buffer_minutes: int
    min_notice_minutes: int
    horizon_days: int


@dataclass(frozen=True, slots=True)
class NextSlot(Message):
    """The reply to `next_available`: the slot, or null when no slot can be held
    before the doctor's horizon."""

    TYPE: ClassVar[str] = "next_slot"
    doctor_id: DoctorId
    slot: SlotView | None = None


@dataclass(frozen=True, slots=True)
class DoctorUpdated(Message):
    """The reply to create, update and retire: the entry, and the doctor's version that
    recorded the change (its `delta` carries the same entry to every watcher)."""

    TYPE: ClassVar[str] = "doctor"
    doctor: DoctorView
    version: Annotated[int, Meta(ge=0)]


@dataclass(frozen=True, slots=True)
class Appointments(Message):
    TYPE: ClassVar[str] = "appointments"
    appointments: list[AppointmentView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Doctors(Message):
    TYPE: ClassVar[str] = "doctors"
    doctors: list[DoctorView] = field(default_factory=list)
    limit: int = 20
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"


@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    # Set with `rate_limited`: how long to wait before sending the request again.
    retry_after_ms: Annotated[int, Meta(ge=0)] | None = None


@dataclass(frozen=True, slots=True)
class SlotsUpdated(Message):
    """The reply to `block_range` and `unblock_range`: the slots it changed (none: the
    range held nothing to change, and nothing was recorded)."""

    TYPE: ClassVar[str] = "slots"
    doctor_id: DoctorId
    slots: list[SlotView] = field(default_factory=list)
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SchedulePreview(Message):
    """The reply to `preview_schedule`: the appointments that would become conflicts."""

    TYPE: ClassVar[str] = "schedule_preview"
    doctor_id: DoctorId
    conflicts: list[AppointmentView] = field(default_factory=list)  # the first ones, by start
    total: Annotated[int, Meta(ge=0)] = 0  # how many in all (`conflicts` stops at 200)


def _registry(*types: type[Message]) -> dict[str, type[Message]]:
    return {t.TYPE: t for t in types}


CLIENT_MESSAGES = _registry(
    Auth,
    Watch,
    Unwatch,
    WatchDashboard,
    UnwatchDashboard,
    WatchAppointments,
    UnwatchAppointments,
    Hold,
    Release,
    Book,
    Cancel,
    Reschedule,
    Block,
    Unblock,
    Mark,
    Unmark,
    SetSchedule,
    GetSchedule,
    NextAvailable,
    ListAppointments,
    MyAppointments,
    SearchDoctors,
    CreateDoctor,
    UpdateDoctor,
    RetireDoctor,
    Ping,
    BlockRange,
    UnblockRange,
    PreviewSchedule,
)
SERVER_MESSAGES = _registry(
    Welcome,
    Authenticated,
    Snapshot,
    Delta,
    Resumed,
    Unwatched,
    Dashboard,
    DashboardDelta,
    Presence,
    AppointmentEvent,
    Resync,
    Reconnect,
    Held,
    Booked,
    AppointmentUpdated,
    Rescheduled,
    SlotUpdated,
    ScheduleUpdated,
    Schedule,
    NextSlot,
    DoctorUpdated,
    Appointments,
    Doctors,
    Pong,
    Error,
    SlotsUpdated,
    SchedulePreview,
)
