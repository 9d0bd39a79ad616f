"""One doctor's room and one fan-out round: what `server.rooms.Rooms` keeps per room.

A `Room` holds the local members of one doctor's stream, the versions ready to fan
out, and the round under way. A `Member` is one connection in it, which waits
(its backlog) until its snapshot is sent. A `Round` writes consecutive changes to
the members the room had when it began, `Frames` building each change's frames
once per codec and kind. Patient rooms are simpler: a set of members and the
notes already seen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from protocol.codec import Codec
from protocol.messages import DashboardDelta, Delta
from server.calendars import Calendars
from server.connection import Connection
from server.frames import frame
from store.changes import Change

log = logging.getLogger(__name__)

Kind = Literal["availability", "dashboard"]


class Frames:
    """The frames of one change, built on first use per (kind, codec) and then shared."""

    __slots__ = ("_built", "change")

    def __init__(self, change: Change) -> None:
        self.change = change
        self._built: dict[tuple[str, str], bytes] = {}

    def get(self, kind: Kind, codec: Codec) -> bytes:
        key = (kind, codec.name)
        data = self._built.get(key)
        if data is None:
            if kind == "availability":
                payload = codec.wrap(Delta.TYPE, codec.encode_body(self.change.public))
            else:
                body = codec.encode_body(self.change.dashboard_body())
                payload = codec.wrap(DashboardDelta.TYPE, body)
            data = self._built[key] = frame(payload, binary=codec.binary)
        return data


@dataclass(eq=False, slots=True)
class Member:
    """A connection in a doctor's room. Until its snapshot is sent, changes wait."""

    conn: Connection
    room: Room
    kind: Kind
    since: int | None = None
    backlog: list[Frames] = field(default_factory=list)
    left: bool = False  # set on leave: a round already under way skips it
    viewer: str | None = None  # who watches (role:subject) for presence; None: anonymous
    joined_at: int = 0  # the room's version once it had joined: its snapshot needs this much

    def offer(self, frames: Frames) -> None:
        if self.since is None:
            self.backlog.append(frames)
        elif frames.change.version > self.since:
            self._send(frames)

    def _send(self, frames: Frames) -> None:
        data = frames.get(self.kind, self.conn.codec)
        if self.kind == "availability":
            self.conn.send_delta(frames.change.doctor_id, frames.change.public, data)
        else:
            self.conn.send_frame(data)

    def start(self, version: int) -> None:
        """Go live after the snapshot (or resume) at `version`: forward what is newer."""
        self.since = version
        backlog, self.backlog = self.backlog, []
        for frames in backlog:
            if frames.change.version > version:
                self._send(frames)


@dataclass(eq=False, slots=True)
class Room:
    doctor_id: int
    calendars: Calendars  # ranges read before, kept at the room's version
    members: set[Member] = field(default_factory=set)  # availability
    dashboards: set[Member] = field(default_factory=set)
    version: int | None = None  # highest contiguous version (delivered, or ready to be)
    pending: dict[int, Change] = field(default_factory=dict)
    ready: list[Change] = field(default_factory=list)  # contiguous, awaiting the next round
    ready_at: float = 0.0  # when `ready` last stopped being empty (`time.perf_counter()`)
    round: Round | None = None  # the fan-out under way
    fanning: bool = False  # a fan-out step is scheduled
    opened: asyncio.Task[None] | None = None
    catching_up: asyncio.Task[None] | None = None
    presence: dict[str, tuple[int, float]] = field(default_factory=dict)  # other instances
    watchers: int = 0  # the total last told to dashboards
    # Presence: this instance's availability members by signed-in viewer. Anonymous
    # members are not counted, and one viewer's many sockets count once.
    viewers: Counter[str] = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.members or self.dashboards)

    def current(self) -> int | None:
        """The version a cached calendar must have to be served: None while one waits."""
        return None if self.pending else self.version


class Round:
    """One fan-out: consecutive changes, to the members the room had when it began.

    Members that join later need none of these changes (their snapshot, read after
    joining, already holds them); members that leave meanwhile are skipped.
    """

    __slots__ = (
        "at",
        "batches",
        "dashboards",
        "first",
        "frames",
        "members",
        "publics",
        "started",
    )

    def __init__(self, changes: list[Change], room: Room) -> None:
        self.frames = [Frames(change) for change in changes]
        self.publics = [change.public for change in changes]
        self.first = changes[0].version
        self.members = tuple(room.members)
        self.dashboards = tuple(room.dashboards)
        self.at = 0  # members written so far
        self.started = time.perf_counter()  # for the stage timings (`store.timing`)
        # Per codec: each change's availability frame, and all of them joined.
        self.batches: dict[str, tuple[list[bytes], bytes]] = {}

    def batch(self, codec: Codec) -> tuple[list[bytes], bytes]:
        built = self.batches.get(codec.name)
        if built is None:
            frames = [f.get("availability", codec) for f in self.frames]
            built = self.batches[codec.name] = (frames, b"".join(frames))
        return built

    def step(self, doctor_id: int, limit: int) -> bool:
        """Write to the next `limit` members (dashboards with the first slice); True when done."""
        if self.at == 0:
            for member in self.dashboards:
                if not member.left:
                    for frames in self.frames:
                        member.offer(frames)
        members = self.members
        end = min(self.at + limit, len(members))
        first, publics = self.first, self.publics
        codec: Codec | None = None
        frames_of: list[bytes] = []
        data = b""
        for member in members[self.at : end]:
            since = member.since
            if since is not None and since < first and not member.left:
                # Live and behind this whole batch: the common case, one write.
                conn = member.conn
                if conn.codec is not codec:
                    codec = conn.codec
                    frames_of, data = self.batch(codec)
                conn.send_deltas(doctor_id, publics, frames_of, data)
            elif not member.left:
                for frames in self.frames:  # waiting for its snapshot, or just started
                    member.offer(frames)
        self.at = end
        return end == len(members)


@dataclass(eq=False, slots=True)
class PatientMember:
    conn: Connection
    room: PatientRoom


@dataclass(eq=False, slots=True)
class PatientRoom:
    patient_id: str
    members: set[PatientMember] = field(default_factory=set)
    seen: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=256))
