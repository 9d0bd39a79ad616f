"""Every message of protocol v1, as frozen, slotted dataclasses.

A message's wire name is its `TYPE`. The envelope around it is
`{"type": TYPE, "id": <client request id or null>, "body": {...fields...}}`;
replies echo the request's `id`. Field constraints (ranges, lengths, time zone
awareness) are declared here with `Annotated` and enforced when a frame is decoded,
so handlers only ever see valid values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
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
Instant = Annotated[datetime, Meta(tz=True)]


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


# ---- shared value types -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotView:
    """A slot as anyone may see it: time and status, never who holds it."""

    id: Id
    start: Instant
    end: Instant
    status: SlotStatus

    def __post_init__(self) -> None:
        _normalize_instants(self, "start", "end")


@dataclass(frozen=True, slots=True)
class AppointmentView:
    id: Id
    slot_id: Id
    doctor_id: DoctorId
    patient_id: Key
    start: Instant
    end: Instant
    status: AppointmentStatus

    def __post_init__(self) -> None:
        _normalize_instants(self, "start", "end")


@dataclass(frozen=True, slots=True)
class DoctorView:
    id: DoctorId
    name: str
    specialty: str
    timezone: str


# ---- client -> server ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """Present a bearer token after connecting (browsers cannot set headers)."""

    TYPE: ClassVar[str] = "auth"
    token: Token


@dataclass(frozen=True, slots=True)
class Watch(Message):
    """Subscribe to a doctor's public availability for [start, end) in the doctor's zone."""

    TYPE: ClassVar[str] = "watch"
    doctor_id: DoctorId
    start: date
    end: date


@dataclass(frozen=True, slots=True)
class Unwatch(Message):
    TYPE: ClassVar[str] = "unwatch"
    doctor_id: DoctorId


@dataclass(frozen=True, slots=True)
class Book(Message):
    """Book a free slot. Resending with the same key returns the first result."""

    TYPE: ClassVar[str] = "book"
    slot_id: Id
    idempotency_key: Key | None = None


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"


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


@dataclass(frozen=True, slots=True)
class Delta(Message):
    """Slots that changed in one committed doctor version (exactly `previous + 1`)."""

    TYPE: ClassVar[str] = "delta"
    doctor_id: DoctorId
    version: Annotated[int, Meta(ge=1)]
    slots: list[SlotView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Unwatched(Message):
    TYPE: ClassVar[str] = "unwatched"
    doctor_id: DoctorId


@dataclass(frozen=True, slots=True)
class Booked(Message):
    TYPE: ClassVar[str] = "booked"
    appointment: AppointmentView


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"


@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str


def _registry(*types: type[Message]) -> dict[str, type[Message]]:
    return {t.TYPE: t for t in types}


CLIENT_MESSAGES = _registry(Auth, Watch, Unwatch, Book, Ping)
SERVER_MESSAGES = _registry(Welcome, Authenticated, Snapshot, Delta, Unwatched, Booked, Pong, Error)
