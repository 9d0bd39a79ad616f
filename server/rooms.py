"""Rooms: the local watchers of each doctor, fed by the broker, in version order.

An instance subscribes to a doctor's channel only while it has local watchers,
and subscribes *before* a new watcher's snapshot is read, so nothing committed
after the snapshot can be missed. Each room delivers versions contiguously:
duplicates are dropped, and a gap (a publish lost or overtaken by a later one)
is filled from the change log after a short wait. Each change is encoded once
per codec and the same bytes go to every member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from protocol.codec import Codec
from server.connection import Connection
from store.broker import Broker
from store.changes import Change
from store.constants import availability_channel
from store.database import Store
from store.errors import StoreError

log = logging.getLogger(__name__)

GAP_WAIT_S = 0.05  # a missing version is usually a publish still in flight


@dataclass(eq=False, slots=True)
class Member:
    """A connection watching a room. Until its snapshot is sent, changes wait in a backlog."""

    conn: Connection
    room: Room
    since: int | None = None
    backlog: list[tuple[int, dict[str, bytes], Change]] = field(default_factory=list)

    def offer(self, change: Change, frames: dict[str, bytes]) -> None:
        if self.since is None:
            self.backlog.append((change.version, frames, change))
        elif change.version > self.since:
            self.conn.send_frame(_frame(self.conn.codec, change, frames))

    def start(self, snapshot_version: int) -> None:
        """Go live after the snapshot: forward what arrived meanwhile and is newer."""
        self.since = snapshot_version
        backlog, self.backlog = self.backlog, []
        for version, frames, change in backlog:
            if version > snapshot_version:
                self.conn.send_frame(_frame(self.conn.codec, change, frames))


def _frame(codec: Codec, change: Change, frames: dict[str, bytes]) -> bytes:
    frame = frames.get(codec.name)
    if frame is None:
        frame = frames[codec.name] = codec.dumps(
            {"type": "delta", "id": None, "body": change.public}
        )
    return frame


@dataclass(eq=False, slots=True)
class Room:
    doctor_id: int
    members: set[Member] = field(default_factory=set)
    version: int | None = None  # highest version delivered contiguously
    pending: dict[int, Change] = field(default_factory=dict)
    opened: asyncio.Task[None] | None = None
    catching_up: asyncio.Task[None] | None = None


class Rooms:
    def __init__(self, store: Store, broker: Broker) -> None:
        self._store = store
        self._broker = broker
        self._rooms: dict[int, Room] = {}
        self._subscription_lock = asyncio.Lock()
        broker.listen(self._on_message, self._on_reconnect)

    def __len__(self) -> int:
        return len(self._rooms)

    def watchers(self, doctor_id: int) -> int:
        room = self._rooms.get(doctor_id)
        return len(room.members) if room else 0

    # ---- membership ---------------------------------------------------------------------------

    async def join(self, conn: Connection, doctor_id: int) -> Member:
        """Add a watcher; returns once the room hears every change from now on."""
        room = self._rooms.get(doctor_id)
        if room is None:
            room = self._rooms[doctor_id] = Room(doctor_id)
            room.opened = asyncio.create_task(self._open(room), name=f"room-open-{doctor_id}")
        member = Member(conn, room)
        room.members.add(member)
        assert room.opened is not None
        try:
            await asyncio.shield(room.opened)
        except BaseException:
            await self.leave(member)
            raise
        return member

    async def leave(self, member: Member) -> None:
        room = member.room
        room.members.discard(member)
        if not room.members and self._rooms.get(room.doctor_id) is room:
            del self._rooms[room.doctor_id]
            if room.catching_up is not None:
                room.catching_up.cancel()
            await self._sync_subscription(room.doctor_id)

    async def _open(self, room: Room) -> None:
        await self._sync_subscription(room.doctor_id)
        version = await self._store.doctor_version(room.doctor_id)
        if room.version is None:
            room.version = version
        self._drain(room)

    async def _sync_subscription(self, doctor_id: int) -> None:
        """Make the broker subscription match whether a room exists, whatever raced before."""
        channel = availability_channel(doctor_id)
        async with self._subscription_lock:
            wanted = doctor_id in self._rooms
            have = channel in self._broker.channels
            if wanted and not have:
                await self._broker.subscribe(channel)
            elif have and not wanted:
                await self._broker.unsubscribe(channel)

    async def close(self) -> None:
        tasks = [t for r in self._rooms.values() for t in (r.opened, r.catching_up) if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._rooms.clear()

    # ---- delivery -------------------------------------------------------------------------------

    def _on_message(self, channel: str, data: bytes) -> None:
        try:
            change = Change.unpack(data)
        except Exception:
            log.exception("dropping undecodable broker message on %s", channel)
            return
        self.receive(change)

    def receive(self, change: Change) -> None:
        room = self._rooms.get(change.doctor_id)
        if room is None:
            return
        if room.version is not None and change.version <= room.version:
            return  # already delivered
        room.pending[change.version] = change
        if room.version is not None:
            self._drain(room)

    def _drain(self, room: Room) -> None:
        """Deliver every contiguous pending version; leave a catch-up behind a gap."""
        assert room.version is not None
        for stale in [v for v in room.pending if v <= room.version]:
            del room.pending[stale]
        while (change := room.pending.pop(room.version + 1, None)) is not None:
            room.version = change.version
            frames: dict[str, bytes] = {}
            for member in tuple(room.members):
                member.offer(change, frames)
        if room.pending and room.catching_up is None:
            self._start_catch_up(room, GAP_WAIT_S)

    def _on_reconnect(self, channels: frozenset[str]) -> None:
        """Messages published while the broker was away are lost: read them from the log.

        A catch-up already running may aim too low (at a pending version), so it is
        replaced by one that aims at the doctor's latest version.
        """
        for room in self._rooms.values():
            if availability_channel(room.doctor_id) in channels:
                if room.catching_up is not None:
                    room.catching_up.cancel()
                self._start_catch_up(room, 0)

    def _start_catch_up(self, room: Room, delay: float) -> None:
        room.catching_up = asyncio.create_task(
            self._catch_up(room, delay), name=f"room-catch-up-{room.doctor_id}"
        )

    async def _catch_up(self, room: Room, delay: float) -> None:
        """Read every version up to the doctor's latest from the change log, then deliver.

        Retries (every second) until the store answers or the room closes, so a
        catch-up that fails during an outage is not forgotten.
        """
        me = asyncio.current_task()
        try:
            await asyncio.sleep(delay)
            while room.version is not None and self._rooms.get(room.doctor_id) is room:
                try:
                    latest = await self._store.doctor_version(room.doctor_id)
                    target = max(latest, max(room.pending, default=0))
                    if target > room.version:
                        for change in await self._store.changes_between(
                            room.doctor_id, room.version, target
                        ):
                            room.pending.setdefault(change.version, change)
                    break
                except StoreError as exc:
                    log.warning("catch-up of doctor %s failed, retrying: %s", room.doctor_id, exc)
                    await asyncio.sleep(1.0)
        finally:
            if room.catching_up is me:
                room.catching_up = None
        if self._rooms.get(room.doctor_id) is room and room.version is not None:
            self._drain(room)

    def stats(self) -> dict[str, Any]:
        return {
            "rooms": len(self._rooms),
            "watchers": sum(len(r.members) for r in self._rooms.values()),
        }
