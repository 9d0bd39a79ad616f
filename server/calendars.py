"""The calendars a room keeps: snapshots at a known version, advanced by its own deltas.

Why: a popular doctor's page opened by a thousand patients at once would otherwise
be a thousand identical reads of PostgreSQL (and a pool a thousand deep). A room
already receives every committed version of its doctor, in order; so once one
watch has read a range, the room keeps it and applies each delta to it, and the
next watcher of that range is answered from memory.

Never a stale answer, by construction:

- an entry is served only while its version *is* the room's version and no later
  version is waiting behind a gap: everything the entry lacks is then still on its
  way to the new member (offered after its snapshot, like any delta);
- an entry is advanced only by the version right after its own, and only by
  changes that touch slots (`slot.*`, `slots.*`, `appointment.*`); a change of the
  doctor's rules (`schedule.*`, time zone, retirement, anything unknown) drops it,
  since it may move what the range covers or when it is bookable;
- concurrent misses on one range share one read ("single flight"); a member uses
  that read only if it is at least the version the room had when the member
  joined, otherwise it reads for itself (changes the room fanned out before the
  member joined never reach it, so the snapshot must already hold them).

The cache is bounded twice: a few ranges per room, and a slot budget shared by the
instance (`SLOTCAST_SNAPSHOT_CACHE_SLOTS`; 0 turns it off). It lives and dies with
its room, whose broker subscription is what keeps it current.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo

import msgspec

from protocol.messages import Delta, SlotView, Snapshot
from store.changes import Change

log = logging.getLogger(__name__)

RANGES_PER_ROOM: Final = 4
# Kinds of change that only move slots between statuses or open and close slots:
# what a delta says in full. Anything else may change the doctor's rules.
SLOT_KINDS: Final = ("slot.", "slots.", "appointment.")

Range = tuple[date, date]
# Reads the range at the given version or later (a replica behind it is not asked).
Read = Callable[[int], Awaitable[tuple[Snapshot, datetime]]]


class Budget:
    """Slots cached by every room of one instance together."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass(slots=True)
class _Entry:
    """One range of one doctor's calendar at `version`."""

    version: int
    timezone: str
    start: date
    end: date
    lower: datetime  # the range's bounds in UTC: where a newly opened slot belongs
    upper: datetime
    notice: timedelta  # bookable_from - now, and bookable_until - now, at the read
    horizon: timedelta
    slots: dict[int, SlotView]
    charged: int  # slots taken from the budget for this entry
    ordered: list[SlotView] | None = None  # built on first serve after a change

    @classmethod
    def of(cls, snapshot: Snapshot, now: datetime) -> _Entry:
        zone = ZoneInfo(snapshot.timezone)

        def midnight(day: date) -> datetime:
            return datetime.combine(day, time(), zone).astimezone(UTC)

        assert snapshot.bookable_from is not None
        assert snapshot.bookable_until is not None
        return cls(
            version=snapshot.version,
            timezone=snapshot.timezone,
            start=snapshot.start,
            end=snapshot.end,
            lower=midnight(snapshot.start),
            upper=midnight(snapshot.end),
            notice=snapshot.bookable_from - now,
            horizon=snapshot.bookable_until - now,
            slots={s.id: s for s in snapshot.slots},
            charged=len(snapshot.slots),
            ordered=list(snapshot.slots),
        )

    def apply(self, delta: Delta) -> None:
        for slot in delta.slots:
            if slot.id in self.slots or self.lower <= slot.start < self.upper:
                self.slots[slot.id] = slot
        for slot_id in delta.removed:
            self.slots.pop(slot_id, None)
        self.version = delta.version
        self.ordered = None

    def serve(self, doctor_id: int, now: datetime) -> Snapshot:
        if self.ordered is None:
            self.ordered = sorted(self.slots.values(), key=lambda s: s.start)
        return Snapshot(
            doctor_id=doctor_id,
            version=self.version,
            timezone=self.timezone,
            start=self.start,
            end=self.end,
            slots=self.ordered,  # shared by every reply at this version: never mutated
            bookable_from=now + self.notice,
            bookable_until=now + self.horizon,
        )


@dataclass(eq=False, slots=True)
class Calendars:
    """One room's cached ranges and the reads under way for it."""

    doctor_id: int
    budget: Budget
    # Where each snapshot came from: "cache", "shared" (a read under way), "database".
    on_read: Callable[[str], None] = lambda source: None
    _entries: OrderedDict[Range, _Entry] = field(default_factory=OrderedDict)
    _loading: dict[Range, asyncio.Task[tuple[Snapshot, datetime]]] = field(default_factory=dict)

    async def snapshot(
        self,
        start: date,
        end: date,
        *,
        current: Callable[[], int | None],
        joined_at: int,
        read: Read,
        clock: Callable[[], datetime],
    ) -> Snapshot:
        """The range at a version this member can go live from (see the module's rules).

        `current()` is the room's version, or None while a later one waits behind a
        gap; `joined_at` is the room's version when the member joined (or, higher, the
        version a resuming client already has): no answer is older, from memory or read.
        """
        if not self.budget.limit:  # turned off: every watch reads, as before there was a cache
            snapshot, _ = await read(joined_at)
            self.on_read("database")
            return snapshot
        key = (start, end)
        entry = self._entries.get(key)
        if entry is not None and entry.version == current() and entry.version >= joined_at:
            self._entries.move_to_end(key)
            self.on_read("cache")
            return entry.serve(self.doctor_id, clock())
        task = self._loading.get(key)
        source = "shared"  # another member's read, under way
        if task is None:
            source = "database"
            task = self._loading[key] = asyncio.create_task(
                _read(read, joined_at), name=f"calendar-read-{self.doctor_id}"
            )
            task.add_done_callback(lambda t: self._read_done(key, t))
        snapshot, now = await asyncio.shield(task)
        if source == "shared" and snapshot.version < joined_at:
            # Another member's read, fenced lower: it began before this member joined
            # (or the client's `since` asks for more). Read anew at this member's fence;
            # a read of its own is already at it, unless the primary itself is lower.
            source = "database"
            snapshot, now = await read(joined_at)
        self.on_read(source)
        if snapshot.version == current():
            self._keep(key, snapshot, now)
        return snapshot

    def advance(self, change: Change) -> None:
        """The room's next version: apply it to every entry, or drop what it may invalidate."""
        if not self._entries:
            return
        kinds = change.private.kinds
        if not kinds or not all(k.startswith(SLOT_KINDS) for k in kinds):
            self.clear_entries()
            return
        delta = msgspec.convert(change.public, Delta)
        for key, entry in list(self._entries.items()):
            if entry.version + 1 != change.version:
                self._drop(key)
                continue
            entry.apply(delta)
            grown = len(entry.slots) - entry.charged
            if grown > 0:
                if not self.budget.take(grown):
                    self._drop(key)
                    continue
                entry.charged += grown

    def clear_entries(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def close(self) -> None:
        """The room closed: nothing keeps the entries current any more."""
        self.clear_entries()
        for task in self._loading.values():
            task.cancel()
        self._loading.clear()

    def _keep(self, key: Range, snapshot: Snapshot, now: datetime) -> None:
        old = self._entries.get(key)
        if old is not None and old.version >= snapshot.version:
            return
        if old is not None:
            self._drop(key)
        if not self.budget.take(len(snapshot.slots)):
            return
        self._entries[key] = _Entry.of(snapshot, now)
        while len(self._entries) > RANGES_PER_ROOM:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: Range) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.budget.give(entry.charged)

    def _read_done(self, key: Range, task: asyncio.Task[tuple[Snapshot, datetime]]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters raise it themselves


async def _read(read: Read, at_least: int) -> tuple[Snapshot, datetime]:
    return await read(at_least)
