"""One client WebSocket as a transport: its codec, ordered outbox and close handshake.

Frames arrive here already built (see `server.frames`). While the socket keeps
up they are written straight to the transport, in order; when the kernel buffer
fills they queue in the outbox, drained by a writer task. A client that falls
further behind gets its availability deltas merged (only the latest state of
each slot is kept) instead of queued; one that still cannot keep up is closed
with 4008 and recovers by reconnecting and resuming.

Who the client is and what it watches live in `server.session`, one level up:
rooms hold connections to write to, so a connection knows nothing of rooms or
sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from protocol.codec import Codec, envelope
from protocol.errors import SlotcastError
from protocol.messages import Delta, Error, Message
from server.frames import frame

log = logging.getLogger(__name__)

CLOSE_SLOW_CONSUMER: Final = 4008
CLOSE_SERVICE_RESTART: Final = 1012
HIGH_WATER: Final = 256 * 1024  # bytes buffered in the kernel/transport before we queue
COALESCE_AFTER: Final = 32  # queued frames before availability deltas are merged


@dataclass(slots=True)
class _Merged:
    """Availability deltas of one doctor merged while the client is behind."""

    doctor_id: int
    since: int
    version: int
    slots: dict[int, Any] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)

    def add(self, public: dict[str, Any]) -> None:
        self.version = public["version"]
        for slot in public["slots"]:
            self.slots[slot["id"]] = slot
            self.removed.discard(slot["id"])
        for slot_id in public["removed"]:
            self.slots.pop(slot_id, None)
            self.removed.add(slot_id)

    def body(self) -> dict[str, Any]:
        """The `delta` body covering (since, version]; keys in `Delta`'s field order."""
        return {
            "doctor_id": self.doctor_id,
            "version": self.version,
            "slots": list(self.slots.values()),
            "removed": sorted(self.removed),
            "since": self.since,
        }


class Connection:
    __slots__ = (
        "_close_code",
        "_closer",
        "_closing",
        "_merged",
        "_on_slow",
        "_outbox",
        "_outbox_limit",
        "_reason",
        "_transport",
        "_wakeup",
        "_writer",
        "busy",
        "codec",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: Any,
        codec: Codec,
        *,
        outbox_limit: int,
        on_slow: Any = None,
    ) -> None:
        self.ws = ws
        self.codec = codec
        self.busy = False  # handling a command: a drain waits for it to finish
        self._transport = transport
        self._outbox: deque[bytes | _Merged] = deque()  # built frames, or a merged delta
        self._merged: dict[int, _Merged] = {}  # the merge still open, per doctor
        self._outbox_limit = outbox_limit
        self._on_slow = on_slow
        # The writer task and its event exist only once something has had to queue:
        # most connections never fall behind, and each would cost a task and ~1.5 KiB.
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._close_code: int | None = None
        self._reason = ""
        self._closer: asyncio.Task[bool] | None = None  # our close handshake, once begun

    @property
    def closing(self) -> bool:
        return self._closing

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
            self._too_slow()
            return
        self._outbox.append(data)
        self._kick()

    def send_delta(self, doctor_id: int, public: dict[str, Any], data: bytes) -> None:
        """An availability delta: like `send_frame`, but merged while the client is behind."""
        merged = self._merged.get(doctor_id)
        if merged is not None:
            merged.add(public)
            return
        if len(self._outbox) >= COALESCE_AFTER and not self._closing:
            merged = _Merged(doctor_id, public["version"] - 1, public["version"])
            self._merged[doctor_id] = merged
            merged.add(public)
            self._outbox.append(merged)
            self._kick()
            return
        self.send_frame(data)

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

    def _too_slow(self) -> None:
        log.warning("closing slow consumer after %d queued frames", len(self._outbox))
        if self._on_slow is not None:
            self._on_slow()
        self.close_soon(CLOSE_SLOW_CONSUMER, "slow consumer")

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
                    self._outbox.clear()
                    self._merged.clear()
                    break
                # Slow path only: wait for the kernel to take what is buffered.
                while transport.get_write_buffer_size() >= HIGH_WATER:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                if not self._outbox:  # a close emptied it while we waited
                    break
                item = self._outbox.popleft()
                if isinstance(item, _Merged):
                    if self._merged.get(item.doctor_id) is item:
                        del self._merged[item.doctor_id]
                    wire = envelope(Delta.TYPE, item.body())
                    item = frame(self.codec.dumps(wire), binary=self.codec.binary)
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
        self._closing = True
        self._outbox.clear()
        self._merged.clear()
        task = self._closer = asyncio.create_task(
            self.ws.close(code=self._close_code or 1000, message=self._reason.encode())
        )
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def close(self) -> None:
        """The handler is done with the socket: stop writing, and finish our close handshake.

        Awaiting the handshake we began (4008, 1012) matters: once the handler returns,
        aiohttp closes the socket itself with 1000 if no close frame has gone out yet.
        """
        self._closing = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._closer is not None and not self._closer.done():
            await asyncio.wait([self._closer])  # its outcome is the done callback's business
