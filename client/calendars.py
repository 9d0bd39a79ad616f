"""The client's copy of a watched range, and the one rule for applying deltas to it.

Kept free of I/O so the convergence rule (apply in version order, ask for a
fresh snapshot on a gap) can be read, and reasoned about, without the socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from protocol.messages import Delta, SlotView


@dataclass(slots=True)
class Calendar:
    """The client's copy of one watched range, kept current by deltas."""

    doctor_id: int
    start: date
    end: date
    version: int
    slots: dict[int, SlotView] = field(default_factory=dict)
    resyncs: int = 0

    def apply(self, delta: Delta) -> bool:
        """False when the delta skips a version: the caller must fetch a fresh snapshot."""
        if delta.version <= self.version:
            return True  # already part of the snapshot
        # A merged delta (`since` set) applies on top of any version from `since` on.
        base = delta.since if delta.since is not None else delta.version - 1
        if self.version < base:
            return False
        self.version = delta.version
        for slot in delta.slots:
            if slot.id in self.slots or self._within(slot):
                self.slots[slot.id] = slot
        for slot_id in delta.removed:
            self.slots.pop(slot_id, None)
        return True

    def _within(self, slot: SlotView) -> bool:
        # The snapshot decided which slots the range holds; new slots are kept if they
        # fall on or between the first and last dates in UTC terms (a cheap superset).
        return self.start <= slot.start.date() <= self.end
