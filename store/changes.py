"""What travels between instances over the broker, and how it is packed.

A `Change` is one committed doctor version: `public` is the `delta` body (slot
states, no patient identity), produced once at commit and stored in the change
log, so the live stream, a resume from the log and an audit read the very same
thing; `private` is the doctor's side (appointments with patients, actor, kinds).
Both cross the broker on the doctor's channel, which only instances read: the
server gives `private` to dashboard members only.

A `PresenceNote` is one instance's count of availability watchers of a doctor.
A `PatientNote` tells a patient's room that one of their appointments changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import msgspec

from protocol.messages import Delta, SlotView


def _pack(data: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


@dataclass(frozen=True, slots=True)
class Change:
    doctor_id: int
    version: int
    public: dict[str, Any]  # `Delta` body as builtins; carries no patient identity
    private: dict[str, Any] = field(default_factory=dict)
    committed_at: float = 0.0  # epoch seconds, for fan-out latency

    @classmethod
    def build(
        cls,
        doctor_id: int,
        version: int,
        slots: list[SlotView],
        removed: list[int] | None = None,
        private: dict[str, Any] | None = None,
    ) -> Change:
        delta = Delta(doctor_id=doctor_id, version=version, slots=slots, removed=removed or [])
        return cls(doctor_id, version, msgspec.to_builtins(delta), private or {}, time.time())

    def dashboard_body(self) -> dict[str, Any]:
        """The `dashboard_delta` body: the public slots with the doctor's private side."""
        private = self.private
        return {
            "doctor_id": self.doctor_id,
            "version": self.version,
            "kinds": private.get("kind", []),
            "actor": private.get("actor"),
            "appointments": private.get("appointments", []),
            "slots": self.public["slots"],
            "removed": self.public["removed"],
            "conflicts": private.get("conflicts", []),
        }

    def pack(self) -> bytes:
        return _pack(
            {"k": "change", "pub": self.public, "prv": self.private, "at": self.committed_at}
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
            for a in change.private.get("appointments", [])
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
            int(public["doctor_id"]), int(public["version"]), public, raw["prv"], raw["at"]
        )
    if kind == "presence":
        return PresenceNote(int(raw["d"]), str(raw["i"]), int(raw["w"]))
    if kind == "patient":
        return PatientNote(str(raw["p"]), int(raw["d"]), int(raw["v"]), raw["a"])
    raise ValueError(f"unknown note kind {kind!r}")
