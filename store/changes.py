"""A committed change as it travels between instances.

`public` is the `delta` message body as builtins, produced once at commit and
stored in the change log, so the live stream, a resume from the log and an audit
all read the very same thing. `private` is the doctor's side (appointments with
patient identity); it is stored, never published on the public channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import msgspec

from protocol.messages import Delta, SlotView


@dataclass(frozen=True, slots=True)
class Change:
    doctor_id: int
    version: int
    public: dict[str, Any]  # `Delta` body as builtins; carries no patient identity
    private: dict[str, Any] = field(default_factory=dict)

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
        return cls(doctor_id, version, msgspec.to_builtins(delta), private or {})

    def pack(self) -> bytes:
        """The public half only: this is what crosses the broker."""
        data: bytes = msgpack.packb(self.public, use_bin_type=True)
        return data

    @classmethod
    def unpack(cls, data: bytes) -> Change:
        public = msgpack.unpackb(data, raw=False)
        return cls(int(public["doctor_id"]), int(public["version"]), public)
