"""A committed change as it travels between instances.

The payload is the `delta` message body as builtins, produced once at commit and
stored in the change log, so the live stream, a resume from the log and an audit
all read the very same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

from protocol.messages import Delta, SlotView


@dataclass(frozen=True, slots=True)
class Change:
    doctor_id: int
    version: int
    public: dict[str, Any]  # `Delta` body as builtins; carries no patient identity

    @classmethod
    def of_slots(cls, doctor_id: int, version: int, slots: list[SlotView]) -> Change:
        body = msgspec.to_builtins(Delta(doctor_id=doctor_id, version=version, slots=slots))
        return cls(doctor_id, version, body)

    def pack(self) -> bytes:
        data: bytes = msgpack.packb(self.public, use_bin_type=True)
        return data

    @classmethod
    def unpack(cls, data: bytes) -> Change:
        public = msgpack.unpackb(data, raw=False)
        return cls(int(public["doctor_id"]), int(public["version"]), public)
