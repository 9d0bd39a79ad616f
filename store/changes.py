"""What travels between instances over the broker, and how it is packed.

A `Change` is one committed doctor version: `public` is the `delta` body (slot
states, no patient identity), produced once at commit and stored in the change
log, so the live stream, a resume from the log and an audit read the very same
thing; `private` is the doctor's side (a `ChangeDetail`: appointments with
patients, actor, kinds). Both cross the broker on the doctor's channel, which
only instances read: the server gives `private` to dashboard members only.

A `PresenceNote` is one instance's count of availability watchers of a doctor.
A `PatientNote` tells a patient's room that one of their appointments changed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import msgspec

from protocol.messages import Delta, DoctorView, SlotView


def _pack(data: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


@dataclass(frozen=True, slots=True)
class ChangeDetail:
    """The private half of a change: what the doctor's dashboard and the audit need.

    Its builtin form is a contract with the past and with other instances: the change
    log already holds it as jsonb and older instances read it from the broker, so
    `to_builtins` keeps the keys they know (`kind`, `actor`, `appointments`, and
    `conflicts` only when there are some), and a detail without an actor (rows
    recorded before there was a private half, deltas built without one) stays `{}`.
    """

    kinds: list[str] = field(default_factory=list)
    actor: str | None = None  # `role:subject`, as `Actor.__str__` writes it
    # `AppointmentView`s as builtins: encoded once at commit, then carried as they are
    # into dashboard deltas and patient notes without being encoded again.
    appointments: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[int] = field(default_factory=list)  # slots newly flagged
    # The patient a doctor, an admin or an API key acted for (`on_behalf_of` only then):
    # the audit names both the actor and the patient.
    on_behalf_of: str | None = None
    # `BlockNote`s as builtins (`blocks` only when some): the reasons of slots this change
    # blocked with one, which the dashboard shows and the public delta never carries.
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def to_builtins(self) -> dict[str, Any]:
        if self.actor is None:
            return {}
        out: dict[str, Any] = {
            "kind": self.kinds,
            "actor": self.actor,
            "appointments": self.appointments,
        }
        if self.conflicts:
            out["conflicts"] = self.conflicts
        if self.on_behalf_of is not None:
            out["on_behalf_of"] = self.on_behalf_of
        if self.blocks:
            out["blocks"] = self.blocks
        return out

    @classmethod
    def of_builtins(cls, raw: Mapping[str, Any]) -> ChangeDetail:
        return cls(
            list(raw.get("kind", [])),
            raw.get("actor"),
            list(raw.get("appointments", [])),
            list(raw.get("conflicts", [])),
            raw.get("on_behalf_of"),
            list(raw.get("blocks", [])),
        )


@dataclass(frozen=True, slots=True)
class Change:
    doctor_id: int
    version: int
    public: dict[str, Any]  # `Delta` body as builtins; carries no patient identity
    private: ChangeDetail = field(default_factory=ChangeDetail)
    committed_at: float = 0.0  # epoch seconds, for fan-out latency
    # Epoch seconds when its publisher sent it to the broker (0: not from the broker), so
    # the receiving instance can time the broker hop (`store.timing`, on node clocks).
    sent_at: float = 0.0

    @classmethod
    def build(
        cls,
        doctor_id: int,
        version: int,
        slots: list[SlotView],
        removed: list[int] | None = None,
        private: ChangeDetail | None = None,
        *,
        doctor: DoctorView | None = None,
    ) -> Change:
        delta = Delta(
            doctor_id=doctor_id, version=version, slots=slots, removed=removed or [], doctor=doctor
        )
        return cls(
            doctor_id, version, msgspec.to_builtins(delta), private or ChangeDetail(), time.time()
        )

    @classmethod
    def of_record(cls, doctor_id: int, row: Mapping[str, Any]) -> Change:
        """A change as the change log holds it (`version, public, private, created_at`)."""
        return cls(
            doctor_id,
            row["version"],
            row["public"],
            ChangeDetail.of_builtins(row["private"]),
            row["created_at"].timestamp(),
        )

    def dashboard_body(self) -> dict[str, Any]:
        """The `dashboard_delta` body: the public slots with the doctor's private side."""
        private = self.private
        return {
            "doctor_id": self.doctor_id,
            "version": self.version,
            "kinds": private.kinds,
            "actor": private.actor,
            "appointments": private.appointments,
            "slots": self.public["slots"],
            "removed": self.public["removed"],
            "conflicts": private.conflicts,
            "blocks": private.blocks,
        }

    def pack(self, *, sent_at: float = 0.0) -> bytes:
        return _pack(
            {
                "k": "change",
                "pub": self.public,
                "prv": self.private.to_builtins(),
                "at": self.committed_at,
                "st": sent_at,
            }
        )


@dataclass(frozen=True, slots=True)
class PresenceNote:
    doctor_id: int
    instance: str
    watchers: int

    def pack(self) -> bytes:
        return _pack({"k": "presence", "d": self.doctor_id, "i": self.instance, "w": self.watchers})


@dataclass(frozen=True, slots=True)
class PatientNote:
    patient_id: str
    doctor_id: int
    version: int
    appointment: dict[str, Any]  # AppointmentView as builtins

    def pack(self) -> bytes:
        return _pack(
            {
                "k": "patient",
                "p": self.patient_id,
                "d": self.doctor_id,
                "v": self.version,
                "a": self.appointment,
            }
        )

    @classmethod
    def of_change(cls, change: Change) -> list[PatientNote]:
        return [
            cls(a["patient_id"], change.doctor_id, change.version, a)
            for a in change.private.appointments
        ]


Note = Change | PresenceNote | PatientNote


def unpack(data: bytes) -> Note:
    """Decode a broker message; raises ValueError for anything else."""
    raw = msgpack.unpackb(data, raw=False)
    if not isinstance(raw, dict):
        raise ValueError("not a slotcast note")
    kind = raw.get("k")
    if kind == "change":
        public = raw["pub"]
        return Change(
            int(public["doctor_id"]),
            int(public["version"]),
            public,
            ChangeDetail.of_builtins(raw["prv"]),
            raw["at"],
            raw.get("st", 0.0),  # absent from an older instance's changes
        )
    if kind == "presence":
        return PresenceNote(int(raw["d"]), str(raw["i"]), int(raw["w"]))
    if kind == "patient":
        return PatientNote(str(raw["p"]), int(raw["d"]), int(raw["v"]), raw["a"])
    raise ValueError(f"unknown note kind {kind!r}")
