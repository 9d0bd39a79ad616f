"""Rooms: the local members of each doctor's stream and of each patient's, fed by the broker.

A doctor's room has two kinds of member: availability watchers (anyone; they get
the public half of each change) and dashboard watchers (the doctor and admins;
they get the private half, patients included). Both ride one broker channel and
one version sequence, so ordering and recovery are shared:

- an instance subscribes to a channel only while it has local members, and
  subscribes *before* a new member's snapshot is read, so nothing committed after
  the snapshot can be missed; until its snapshot is sent a member's changes wait
  in a backlog, and only versions above the snapshot's are forwarded;
- versions are delivered contiguously: duplicates are dropped, an early version
  waits, and a gap that does not close within GAP_WAIT_S is filled from the
  change log, as is everything after a broker reconnect;
- each change's body is encoded once per codec and kind, spliced into its
  envelope (`Codec.wrap`) and framed, and the same bytes go to every member;
- fan-out runs in rounds, off the broker's read path: a round takes every
  change that is ready, joins their frames into one buffer per codec, and
  writes that buffer to each live member with one `write` (so when the loop is
  behind, k changes cost one syscall per member, not k). A big room is written
  FANOUT_SLICE members per event-loop turn, so commands, pings and the broker
  reader run between slices; rounds never overlap, so each connection still
  sees versions in order.

Presence (how many watch a doctor's availability, on all instances) travels on
the same channel: each instance announces its own count, and dashboards hear
the total whenever it changes. What one room holds, and one round, is `server.room`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import date, datetime
from typing import Final

from protocol.messages import AppointmentEvent, Presence, Resync, Snapshot
from server import logs
from server.calendars import Budget, Calendars, Read
from server.connection import Connection
from server.frames import frame
from server.room import Kind, Member, PatientMember, PatientRoom, Room, Round
from store import reads
from store.broker import Broker
from store.changes import Change, PatientNote, PresenceNote, unpack
from store.constants import doctor_channel, patient_channel
from store.errors import StoreError
from store.pool import Store
from store.timing import StageTimes

log = logging.getLogger(__name__)

GAP_WAIT_S: Final = 0.05  # a missing version is usually a publish still in flight
PRESENCE_EVERY_S: Final = 2.0  # each instance re-announces its counts this often
PRESENCE_TTL_S: Final = 6.0  # a silent instance's count is dropped after this
FANOUT_SLICE: Final = 100  # members written per event-loop turn in a big room


class Rooms:
    def __init__(
        self,
        store: Store,
        broker: Broker,
        instance: str,
        *,
        on_fanout: Callable[[int, float], None] | None = None,
        on_snapshot: Callable[[str], None] | None = None,
        fanout_slice: int = FANOUT_SLICE,
        cache_slots: int = 0,
        on_close: Callable[[int, int], None] | None = None,
        timings: StageTimes | None = None,
    ) -> None:
        self._store = store
        # Where the stage timings go: the store's, so one scrape reads them all.
        self._timings = timings or StageTimes()
        # Told (doctor, version) when a room closes: what its members were last sent,
        # which later reads of the doctor must not go back on (store.replicas).
        self._on_close = on_close or (lambda doctor_id, version: None)
        self._budget = Budget(cache_slots)
        self._on_snapshot = on_snapshot or (lambda source: None)
        self._slice = fanout_slice
        self._broker = broker
        self._instance = instance
        self._rooms: dict[int, Room] = {}
        self._patients: dict[str, PatientRoom] = {}
        self._subscription_lock = asyncio.Lock()
        self._on_fanout = on_fanout or (lambda delivered, latency: None)
        self._presence_dirty: set[int] = set()
        self._presence_task = asyncio.create_task(self._presence_loop(), name="presence")
        broker.listen(self._on_message, self._on_reconnect)

    def __len__(self) -> int:
        return len(self._rooms)

    def watchers(self, doctor_id: int) -> int:
        """Availability watchers of a doctor on every instance we have heard from."""
        room = self._rooms.get(doctor_id)
        if room is None:
            return 0
        now = time.monotonic()
        others = sum(n for n, at in room.presence.values() if now - at < PRESENCE_TTL_S)
        return len(room.viewers) + others

    def stats(self) -> dict[str, int]:
        return {
            "rooms": len(self._rooms),
            "watchers": sum(len(r.members) for r in self._rooms.values()),
            "dashboards": sum(len(r.dashboards) for r in self._rooms.values()),
            "patient_rooms": len(self._patients),
        }

    # ---- membership --------------------------------------------------------------------------

    async def join(
        self,
        conn: Connection,
        doctor_id: int,
        kind: Kind = "availability",
        *,
        viewer: str | None = None,
    ) -> Member:
        """Add a member; returns once the room hears every change from now on.

        `viewer` (a signed-in identity) is what presence counts; anonymous members are not.
        """
        room = self._rooms.get(doctor_id)
        if room is None:
            calendars = Calendars(doctor_id, self._budget, self._on_snapshot)
            room = self._rooms[doctor_id] = Room(doctor_id, calendars)
            # The room's own work serves every member: no request's ids on its lines.
            room.opened = asyncio.create_task(
                self._open(room), name=f"room-open-{doctor_id}", context=logs.detached()
            )
        member = Member(conn, room, kind, viewer=viewer)
        (room.members if kind == "availability" else room.dashboards).add(member)
        if kind == "availability":
            if viewer is not None:
                room.viewers[viewer] += 1
            self._presence_dirty.add(doctor_id)
        assert room.opened is not None
        try:
            await asyncio.shield(room.opened)
        except BaseException:
            await self.leave(member)
            raise
        member.joined_at = room.version or 0
        self._tell_presence(room)
        return member

    def version_of(self, doctor_id: int) -> int:
        """The version this instance's room of the doctor is at (0: no room here)."""
        room = self._rooms.get(doctor_id)
        return 0 if room is None or room.version is None else room.version

    async def snapshot(
        self,
        member: Member,
        start: date,
        end: date,
        read: Read,
        clock: Callable[[], datetime],
        *,
        at_least: int = 0,
    ) -> Snapshot:
        """A joined member's snapshot: from its room's calendars when they are current.

        Never older than the room's version when the member joined, nor than `at_least`
        (a resuming client's `since`): `read(min_version)` is told the same.
        """
        room = member.room
        return await room.calendars.snapshot(
            start,
            end,
            current=room.current,
            joined_at=max(member.joined_at, at_least),
            read=read,
            clock=clock,
        )

    async def leave(self, member: Member) -> None:
        if member.left:
            return
        member.left = True
        room = member.room
        (room.members if member.kind == "availability" else room.dashboards).discard(member)
        if member.kind == "availability":
            if member.viewer is not None:
                room.viewers[member.viewer] -= 1
                if room.viewers[member.viewer] <= 0:
                    del room.viewers[member.viewer]
            self._presence_dirty.add(room.doctor_id)
        if not room and self._rooms.get(room.doctor_id) is room:
            del self._rooms[room.doctor_id]
            if room.version is not None:
                self._on_close(room.doctor_id, room.version)
            room.calendars.close()
            for task in (room.catching_up, room.opened):
                if task is not None and not task.done():
                    task.cancel()
            await self._sync(doctor_channel(room.doctor_id), lambda: room.doctor_id in self._rooms)
        else:
            self._tell_presence(room)

    async def join_patient(self, conn: Connection, patient_id: str) -> PatientMember:
        room = self._patients.get(patient_id)
        if room is None:
            room = self._patients[patient_id] = PatientRoom(patient_id)
        member = PatientMember(conn, room)
        room.members.add(member)
        await self._sync(patient_channel(patient_id), lambda: patient_id in self._patients)
        return member

    async def leave_patient(self, member: PatientMember) -> None:
        room = member.room
        room.members.discard(member)
        if not room.members and self._patients.get(room.patient_id) is room:
            del self._patients[room.patient_id]
            await self._sync(
                patient_channel(room.patient_id), lambda: room.patient_id in self._patients
            )

    async def _open(self, room: Room) -> None:
        await self._sync(doctor_channel(room.doctor_id), lambda: room.doctor_id in self._rooms)
        version = await reads.doctor_version(self._store, room.doctor_id)
        if room.version is None:
            room.version = version
        self._drain(room)

    async def _sync(self, channel: str, wanted: Callable[[], bool]) -> None:
        """Make the broker subscription match whether the room exists, whatever raced before."""
        async with self._subscription_lock:
            want, have = wanted(), channel in self._broker.channels
            if want and not have:
                await self._broker.subscribe(channel)
            elif have and not want:
                await self._broker.unsubscribe(channel)

    async def close(self) -> None:
        self._presence_task.cancel()
        tasks = [self._presence_task]
        tasks += [t for r in self._rooms.values() for t in (r.opened, r.catching_up) if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for room in self._rooms.values():
            room.calendars.close()
        self._rooms.clear()
        self._patients.clear()

    # ---- delivery ----------------------------------------------------------------------------

    def _on_message(self, channel: str, data: bytes) -> None:
        try:
            note = unpack(data)
        except Exception:
            log.exception("dropping undecodable broker message on %s", channel)
            return
        if isinstance(note, Change):
            if note.sent_at:
                self._timings.observe("broker_hop", time.time() - note.sent_at)
            self.receive(note)
        elif isinstance(note, PresenceNote):
            self._on_presence(note)
        else:
            self._on_patient(note)

    def deliver(self, change: Change) -> None:
        """A change committed by this instance: to its members at once, broker or not.

        The outbox calls this on the committing task. The broker's copy, arriving
        later, is dropped as a duplicate: by version in a doctor's room, by (doctor,
        version, appointment) in a patient's.
        """
        self.receive(change)
        for note in PatientNote.of_change(change):
            self._on_patient(note)

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
        """Queue every contiguous pending version for fan-out; leave a catch-up behind a gap."""
        assert room.version is not None
        for stale in [v for v in room.pending if v <= room.version]:
            del room.pending[stale]
        while (change := room.pending.pop(room.version + 1, None)) is not None:
            room.version = change.version
            if not room.ready:
                room.ready_at = time.perf_counter()
            room.ready.append(change)
            room.calendars.advance(change)
        if room.ready and not room.fanning:
            room.fanning = True
            # Not now: let the broker reader take whatever else has arrived first,
            # so that a loop that is behind sends it all in one round.
            asyncio.get_running_loop().call_soon(self._fan_out, room, context=logs.detached())
        if room.pending and room.catching_up is None:
            self._start_catch_up(room, GAP_WAIT_S)

    def _fan_out(self, room: Room) -> None:
        """One step of the room's fan-out: a slice of a round, then schedule the next step."""
        if self._rooms.get(room.doctor_id) is not room:
            room.fanning = False  # the room closed
            room.round = None
            return
        current = room.round
        if current is None:
            if not room.ready:
                room.fanning = False
                return
            current = room.round = Round(room.ready, room)
            room.ready = []
            self._timings.observe("fanout_wait", current.started - room.ready_at)
        if current.step(room.doctor_id, self._slice):
            room.round = None
            self._timings.observe("fanout_write", time.perf_counter() - current.started)
            delivered = len(current.members) + len(current.dashboards)
            now = time.time()
            for frames in current.frames:
                if frames.change.committed_at:
                    self._on_fanout(delivered, now - frames.change.committed_at)
        asyncio.get_running_loop().call_soon(self._fan_out, room)

    def _on_reconnect(self, channels: frozenset[str]) -> None:
        """Messages published while the broker was away are lost: recover them.

        Doctor rooms read the missed versions from the change log (replacing any
        catch-up that may aim too low); patient rooms have no single version to
        resume from, so their members are told to resync.
        """
        for room in self._rooms.values():
            if doctor_channel(room.doctor_id) in channels:
                if room.catching_up is not None:
                    room.catching_up.cancel()
                self._start_catch_up(room, 0)
        for patient_room in self._patients.values():
            if patient_channel(patient_room.patient_id) in channels:
                for member in tuple(patient_room.members):
                    member.conn.send(Resync(room="appointments"))

    def _start_catch_up(self, room: Room, delay: float) -> None:
        room.catching_up = asyncio.create_task(
            self._catch_up(room, delay),
            name=f"room-catch-up-{room.doctor_id}",
            context=logs.detached(),
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
                    latest = await reads.doctor_version(self._store, room.doctor_id)
                    target = max(latest, max(room.pending, default=0))
                    if target > room.version:
                        for change in await reads.changes_between(
                            self._store, room.doctor_id, room.version, target
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

    # ---- patients ----------------------------------------------------------------------------

    def _on_patient(self, note: PatientNote) -> None:
        room = self._patients.get(note.patient_id)
        if room is None:
            return
        key = (note.doctor_id, note.version, int(note.appointment["id"]))
        if key in room.seen:
            return  # a relay's duplicate
        room.seen.append(key)
        # The `appointment_event` body, keys in the message's field order.
        body = {
            "doctor_id": note.doctor_id,
            "version": note.version,
            "appointment": note.appointment,
        }
        built: dict[str, bytes] = {}
        for member in tuple(room.members):
            codec = member.conn.codec
            data = built.get(codec.name)
            if data is None:
                payload = codec.wrap(AppointmentEvent.TYPE, codec.encode_body(body))
                data = built[codec.name] = frame(payload, binary=codec.binary)
            member.conn.send_frame(data)

    # ---- presence ----------------------------------------------------------------------------

    def _on_presence(self, note: PresenceNote) -> None:
        if note.instance == self._instance:
            return
        room = self._rooms.get(note.doctor_id)
        if room is None:
            return
        room.presence[note.instance] = (note.watchers, time.monotonic())
        self._tell_presence(room)

    def _tell_presence(self, room: Room) -> None:
        total = self.watchers(room.doctor_id)
        if total != room.watchers:
            room.watchers = total
            message = Presence(room.doctor_id, total)
            for member in tuple(room.dashboards):
                if member.since is not None:
                    member.conn.send(message)

    async def _presence_loop(self) -> None:
        """Announce changed counts quickly and all counts regularly; expire silent peers."""
        last_full = 0.0
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            if now - last_full >= PRESENCE_EVERY_S:
                last_full = now
                self._presence_dirty.update(r for r, room in self._rooms.items() if room.members)
                for room in self._rooms.values():
                    self._tell_presence(room)
            dirty, self._presence_dirty = self._presence_dirty, set()
            for doctor_id in dirty:
                local = self._rooms.get(doctor_id)
                count = len(local.viewers) if local else 0
                note = PresenceNote(doctor_id, self._instance, count)
                try:
                    await self._broker.publish(doctor_channel(doctor_id), note.pack())
                except StoreError as exc:
                    log.debug("presence publish failed: %s", exc)
