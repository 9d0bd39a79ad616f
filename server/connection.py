"""One client WebSocket as a transport: its codec, ordered outbox and close handshake.

Frames arrive here already built (see `server.frames`). While the socket keeps
up they are written straight to the transport, in order; when the kernel buffer
fills they queue in the outbox, drained by a writer task. A client that falls
further behind gets its availability deltas merged (only the latest state of
each slot is kept) instead of queued; one that still cannot keep up is closed
with 4008 and recovers by reconnecting and resuming.

What a connection holds is counted in bytes: its outbox plus whatever sits in the
transport's write buffer (`pending`), replies as well as deltas. Over `HIGH_WATER`
the session stops taking its requests (`backed_up`, `drained`: back-pressure, so
pipelining cannot queue work); past `outbox_bytes` (or `outbox_limit` frames) it
is closed. `police` runs over every connection now and then: one that stays over
`HIGH_WATER` too long is closed, and when all of them together hold more than the
server's budget the biggest are closed first. A slow consumer's close frame waits
behind what it did not read, so its transport is aborted if it has not drained
`ABORT_AFTER_S` later (as is any connection whose session ends with bytes still
unsent): the memory comes back even from a client that never reads. The close
handshake is ours to run, both ways, since the socket is no longer aiohttp's
after the upgrade (server.wire).

Who the client is and what it watches live in `server.session`, one level up:
rooms hold connections to write to, so a connection knows nothing of rooms or
sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from protocol.codec import Codec, envelope
from protocol.errors import SlotcastError
from protocol.messages import Delta, Error, Message
from server import frames
from server.frames import PING, frame

log = logging.getLogger(__name__)

CLOSE_SLOW_CONSUMER: Final = 4008
CLOSE_SERVICE_RESTART: Final = 1012
# How long our close waits for the client's close frame before the socket is cut.
CLOSE_HANDSHAKE_S: Final = 5.0
HIGH_WATER: Final = 256 * 1024  # bytes buffered in the kernel/transport before we queue
COALESCE_AFTER: Final = 32  # queued frames before availability deltas are merged
ABORT_AFTER_S: Final = 5.0  # a slow consumer's close frame waits this long for it to read
_DRAIN_POLL_S: Final = (0.005, 0.05)  # back-pressure polls the socket, backing off to 50 ms

# Why a slow consumer was closed: the `reason` label of slotcast_slow_consumers_total.
SlowReason = Literal["frames", "bytes", "stalled", "budget"]


@dataclass(slots=True)
class _Merged:
    """Availability deltas of one doctor merged while the client is behind."""

    doctor_id: int
    since: int
    version: int
    slots: dict[int, Any] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)
    size: int = 0  # the bytes of the deltas merged in: what the outbox counts for it
    doctor: Any = None  # the latest directory entry a merged delta carried

    def add(self, public: dict[str, Any]) -> None:
        self.version = public["version"]
        for slot in public["slots"]:
            self.slots[slot["id"]] = slot
            self.removed.discard(slot["id"])
        for slot_id in public["removed"]:
            self.slots.pop(slot_id, None)
            self.removed.add(slot_id)
        if public.get("doctor") is not None:
            self.doctor = public["doctor"]

    def body(self) -> dict[str, Any]:
        """The `delta` body covering (since, version]; keys in `Delta`'s field order."""
        return {
            "doctor_id": self.doctor_id,
            "version": self.version,
            "slots": list(self.slots.values()),
            "removed": sorted(self.removed),
            "since": self.since,
            "doctor": self.doctor,
        }


class Connection:
    __slots__ = (
        "_close_code",
        "_close_sent",
        "_closing",
        "_finished",
        "_handshake",
        "_merged",
        "_on_slow",
        "_outbox",
        "_outbox_bytes",
        "_outbox_limit",
        "_queued",
        "_reason",
        "_transport",
        "_wakeup",
        "_writer",
        "busy",
        "codec",
        "heard",
        "on_end",
        "peer_closed",
        "pinged",
        "stalled_since",
    )

    def __init__(
        self,
        transport: Any,
        codec: Codec,
        *,
        outbox_limit: int,
        outbox_bytes: int = 1024 * 1024,
        on_slow: Callable[[SlowReason], object] | None = None,
    ) -> None:
        self.codec = codec
        self.busy = False  # handling a command: a drain waits for it to finish
        self._transport = transport
        # Built frames, or a merged delta. Most connections never queue anything, and an
        # empty deque is ~620 bytes, so they all share one that stays empty (`_queue`).
        self._outbox: deque[bytes | _Merged] = _NO_OUTBOX
        self._merged: dict[int, _Merged] = {}  # the merge still open, per doctor
        self._outbox_limit = outbox_limit
        self._outbox_bytes = outbox_bytes
        self._queued = 0  # bytes in the outbox (a merged delta counts what was merged in)
        self.stalled_since: float | None = None  # over HIGH_WATER since then (`police`)
        # The heartbeat (`heartbeat`, one sweep over every connection): when a frame last
        # came from the client, and when it was pinged for not sending any (0: it was not).
        self.heard = time.monotonic()
        self.pinged = 0.0
        self._on_slow = on_slow
        # The writer task and its event exist only once something has had to queue:
        # most connections never fall behind, and each would cost a task and ~1.5 KiB.
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._close_code: int | None = None
        self._reason = ""
        self._finished = False  # the session is done and the close handshake is over
        self._close_sent = False
        # The client's close frame has come (or the socket is gone, or its frames can no
        # longer be read: server.ws); `close` waits for it.
        self.peer_closed = False
        self._handshake: asyncio.Future[None] | None = None
        # Called once the connection has decided to close (`close_soon`, after the command
        # in flight): whoever reads the socket then ends the session (server.ws).
        self.on_end: Callable[[], object] | None = None

    @property
    def finished(self) -> bool:
        """The socket is closed for good: a drain waits for this, not for the close frame."""
        return self._finished

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def ending(self) -> bool:
        """Closing, or to be closed once the command in flight is done."""
        return self._closing or self._close_code is not None

    def pending(self) -> int:
        """Bytes written or queued but not yet taken by the kernel: what this client costs."""
        buffered: int = self._transport.get_write_buffer_size()
        return buffered + self._queued

    def backed_up(self) -> bool:
        """Output at or over the high-water mark: take no more of this client's requests."""
        buffered: int = self._transport.get_write_buffer_size()
        return buffered + self._queued >= HIGH_WATER

    async def drained(self) -> None:
        """Until the output is back under the high-water mark, or the connection closes.

        Only a client that has stopped reading waits here, so polling (backing off to
        50 ms) costs nothing on the fast path and little per stalled client.
        """
        delay, longest = _DRAIN_POLL_S
        while self.backed_up() and not self.ending and not self._transport.is_closing():
            await asyncio.sleep(delay)  # the transport has no event to wait on for this
            delay = min(delay * 2, longest)

    def heard_from(self, now: float) -> None:
        """A frame came from the client (a pong, or anything else): it is alive."""
        self.heard = now
        self.pinged = 0.0

    def ping(self, now: float) -> None:
        """Ask a silent client to show it is alive: written ahead of anything queued."""
        self.pinged = now
        if not self._closing and not self._transport.is_closing():
            self._transport.write(PING)

    def pong(self, payload: bytes) -> None:
        """Answer the client's ping: written ahead of anything queued, as control frames may."""
        if not self._closing and not self._transport.is_closing():
            self._transport.write(frames.pong(payload))

    def pause_reading(self) -> None:
        """Read no more of the client's frames for now (server.ws: the inbox is full)."""
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def drop(self) -> None:
        """The client stopped answering: cut the socket (no close handshake to wait on)."""
        log.info("no pong from the client: dropping the connection")
        self._closing = True
        self._drop_outbox()
        self._transport.abort()

    # ---- sending ----------------------------------------------------------------------------

    def send(self, message: Message, request_id: str | int | None = None) -> None:
        self.send_frame(frame(self.codec.encode(message, request_id), binary=self.codec.binary))

    def send_now(self, message: Message) -> None:
        """Write ahead of anything queued: for a notice that must precede a close."""
        if not self._closing and not self._transport.is_closing():
            self._transport.write(frame(self.codec.encode(message), binary=self.codec.binary))

    def send_error(self, error: SlotcastError, request_id: str | int | None = None) -> None:
        self.send(Error(error.code.value, error.message, error.retry_after_ms), request_id)

    def send_frame(self, data: bytes) -> None:
        """Write a built frame now if the socket keeps up, else queue it. Never awaits."""
        if self._closing:
            return
        if not self._outbox:
            transport = self._transport
            if transport.is_closing():
                return
            if transport.get_write_buffer_size() < HIGH_WATER:
                transport.write(data)
                return
        if len(self._outbox) >= self._outbox_limit:
            self.too_slow("frames")
            return
        if self.pending() + len(data) > self._outbox_bytes:
            self.too_slow("bytes")
            return
        self._queue(data)
        self._queued += len(data)
        self._kick()

    def send_delta(self, doctor_id: int, public: dict[str, Any], data: bytes) -> None:
        """An availability delta: like `send_frame`, but merged while the client is behind."""
        merged = self._merged.get(doctor_id)
        if merged is None and (len(self._outbox) < COALESCE_AFTER or self._closing):
            self.send_frame(data)
            return
        if self.pending() + len(data) > self._outbox_bytes:
            self.too_slow("bytes")
            return
        if merged is None:
            merged = _Merged(doctor_id, public["version"] - 1, public["version"])
            self._merged[doctor_id] = merged
            self._queue(merged)
            self._kick()
        merged.add(public)
        merged.size += len(data)  # an upper bound: a slot changed twice is counted twice
        self._queued += len(data)

    def send_deltas(
        self,
        doctor_id: int,
        publics: Sequence[dict[str, Any]],
        frames: Sequence[bytes],
        data: bytes,
    ) -> None:
        """Consecutive availability deltas of one doctor; `data` is `frames` joined.

        The fan-out's hot path, once per member and batch: while the socket keeps
        up, the whole batch is one `write` (one syscall, however many changes it
        carries). Otherwise each delta goes the way of `send_delta`, so queueing,
        merging and the slow-consumer close see every change on its own.
        """
        if not self._outbox and not self._closing:
            transport = self._transport
            if transport.get_write_buffer_size() < HIGH_WATER and not transport.is_closing():
                transport.write(data)
                return
        for public, built in zip(publics, frames, strict=True):
            self.send_delta(doctor_id, public, built)

    def seal(self, doctor_id: int) -> None:
        """Close the doctor's open merge: what follows a new snapshot must come after it."""
        self._merged.pop(doctor_id, None)

    def too_slow(self, reason: SlowReason) -> None:
        """Close with 4008: the client has fallen too far behind (or costs too much)."""
        if self._close_code is not None:
            return
        log.warning(
            "closing slow consumer (%s): %d queued frames, %d bytes pending",
            reason,
            len(self._outbox),
            self.pending(),
        )
        if self._on_slow is not None:
            self._on_slow(reason)
        self.close_soon(CLOSE_SLOW_CONSUMER, "slow consumer")

    def _queue(self, item: bytes | _Merged) -> None:
        if self._outbox is _NO_OUTBOX:
            self._outbox = deque()
        self._outbox.append(item)

    def _kick(self) -> None:
        """Wake the writer, starting it on the first frame that had to queue."""
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
            self._writer = asyncio.create_task(self._write_forever(self._wakeup), name="ws-writer")
        self._wakeup.set()

    async def _write_forever(self, wakeup: asyncio.Event) -> None:
        transport = self._transport
        while True:
            await wakeup.wait()
            wakeup.clear()
            while self._outbox:
                if transport.is_closing():
                    self._drop_outbox()
                    break
                # Slow path only: wait for the kernel to take what is buffered.
                while (  # noqa: ASYNC110
                    transport.get_write_buffer_size() >= HIGH_WATER and not transport.is_closing()
                ):
                    await asyncio.sleep(0.005)
                # A close emptied the outbox while we waited, or the socket was lost (its
                # buffer is gone, not drained): look again before writing, since writing to
                # a closed transport raises (uvloop) and would end this task with an error.
                if not self._outbox or transport.is_closing():
                    continue
                item = self._outbox.popleft()
                if isinstance(item, _Merged):
                    self._queued -= item.size
                    if self._merged.get(item.doctor_id) is item:
                        del self._merged[item.doctor_id]
                    wire = envelope(Delta.TYPE, item.body())
                    item = frame(self.codec.dumps(wire), binary=self.codec.binary)
                else:
                    self._queued -= len(item)
                transport.write(item)

    # ---- closing ----------------------------------------------------------------------------

    def close_soon(self, code: int, reason: str) -> None:
        """Close as soon as no command is in flight (immediately if idle)."""
        if self._close_code is not None:
            return
        self._close_code = code
        self._reason = reason
        if not self.busy:
            self._close_now()

    def command_done(self) -> None:
        self.busy = False
        if self._close_code is not None:
            self._close_now()

    def _close_now(self) -> None:
        """Stop sending, and have the session end: it leaves its rooms, then `close`s."""
        self._closing = True
        self._drop_outbox()
        if self.on_end is not None:
            self.on_end()

    def closed_by_peer(self) -> None:
        """The client's close frame came, or the socket is gone: answer it, stop sending.

        A close of ours already sent is the answer (its handshake is then complete);
        otherwise the answer is 1000, as aiohttp gives. The transport itself is closed
        by `close`, once the session has left its rooms.
        """
        self.peer_closed = True
        self._closing = True
        self._drop_outbox()
        if not self._close_sent and not self._transport.is_closing():
            self._close_sent = True
            self._transport.write(frames.close(1000))
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(None)

    def _drop_outbox(self) -> None:
        self._outbox.clear()
        self._merged.clear()
        self._queued = 0

    def _abort_if_stuck(self) -> None:
        """A client that has not read what is buffered by now never will: drop the
        connection, and with it the bytes its transport still holds."""
        if self._transport.get_write_buffer_size():
            log.info("aborting a connection whose client does not read")
            self._transport.abort()

    async def close(self) -> None:
        """The session is over: stop writing, and close the socket with our code.

        Ours is sent, and the client's close frame awaited (the handshake), up to
        CLOSE_HANDSHAKE_S; a client that does not answer by then (or does not even read)
        is cut off. A client still sending when we cut would get a reset, which can
        destroy the close frame it has not read yet: it would see 1006, not 4008 or
        1012. Closing a transport waits for its buffer to be sent, which for a client
        that stopped reading is never: if bytes are still there `ABORT_AFTER_S` from
        now, the transport is aborted.
        """
        self._closing = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        transport = self._transport
        # A client that has not read what is buffered reads our close frame no sooner:
        # its handshake gets the slow consumer's bound.
        wait = ABORT_AFTER_S if transport.get_write_buffer_size() else CLOSE_HANDSHAKE_S
        try:
            if not transport.is_closing():
                if not self._close_sent:
                    self._close_sent = True
                    code = self._close_code if self._close_code is not None else 1000
                    transport.write(frames.close(code, self._reason))
                if not self.peer_closed:
                    self._handshake = asyncio.get_running_loop().create_future()
                    try:
                        async with asyncio.timeout(wait):
                            await self._handshake
                    except TimeoutError:
                        log.info("no close frame from the client in %gs: cut off", wait)
                        transport.abort()  # unanswered: buffered bytes are not worth waiting on
                transport.close()
        finally:
            self._handshake = None
            self._finished = True
            if not transport.is_closing():  # cancelled while waiting (shutdown): cut it
                transport.abort()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(ABORT_AFTER_S, self._abort_if_stuck)


def police(connections: Iterable[Connection], *, budget: int, stall_s: float, now: float) -> int:
    """Close what costs too much; returns the bytes all `connections` have pending.

    A connection over `HIGH_WATER` for `stall_s` is closed ("stalled"): a client
    that stopped reading, whether or not it answers pings. Then, while all of them
    together hold more than `budget` bytes, the biggest are closed first ("budget");
    connections already closing count as freed, since their bytes are on the way out.
    """
    total = 0
    freeing = 0
    candidates: list[tuple[int, Connection]] = []
    for conn in connections:
        pending = conn.pending()
        total += pending
        if conn.ending:
            freeing += pending
            continue
        if pending < HIGH_WATER:
            conn.stalled_since = None
        elif conn.stalled_since is None:
            conn.stalled_since = now
        elif now - conn.stalled_since >= stall_s:
            conn.too_slow("stalled")
            freeing += pending
            continue
        if pending:
            candidates.append((pending, conn))
    kept = total - freeing
    if kept > budget:
        candidates.sort(key=lambda c: c[0], reverse=True)
        for pending, conn in candidates:
            if kept <= budget:
                break
            conn.too_slow("budget")
            kept -= pending
    return total


def heartbeat(connections: Iterable[Connection], *, interval: float, now: float) -> None:
    """Ping the clients silent for `interval`; drop those that do not answer in half that.

    One sweep over every connection, instead of aiohttp's timer per socket: a timer
    (its handle, libuv's timer and their callbacks) costs every idle connection ~0.6 KiB,
    and each ping was a task of its own. A client whose output is backed up, or whose
    command is still running, is not dropped here: the handler is not reading its
    frames, so its pong may be waiting unread. `police` closes one that stays backed up.
    """
    timeout = interval / 2
    for conn in connections:
        if conn.ending:
            continue
        if conn.pinged:
            if now - conn.pinged >= timeout and not conn.busy and not conn.backed_up():
                conn.drop()
        elif now - conn.heard >= interval:
            conn.ping(now)


def pending_total(connections: Iterable[Connection]) -> tuple[int, int]:
    """Bytes pending over all `connections`, and how many of them are backed up."""
    total = backed_up = 0
    for conn in connections:
        pending = conn.pending()
        total += pending
        backed_up += pending >= HIGH_WATER
    return total, backed_up


# The outbox of every connection that never had to queue: always empty (`Connection._queue`).
_NO_OUTBOX: Final[deque[bytes | _Merged]] = deque(maxlen=0)
