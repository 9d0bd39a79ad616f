"""One client WebSocket: its codec, identity, watches and ordered outbox.

Every frame to a client goes through its outbox, drained by one writer task, so
replies and live deltas leave in the order they were produced and one slow
client never stalls the fan-out to everyone else: a full outbox closes that
client (code 4008) and it recovers by reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Final

from aiohttp import WSMsgType, web

from protocol.codec import Codec
from protocol.errors import SlotcastError
from protocol.messages import Error, Message
from server.auth import Identity

if TYPE_CHECKING:
    from server.rooms import Member

log = logging.getLogger(__name__)

CLOSE_SLOW_CONSUMER: Final = 4008


class Connection:
    def __init__(self, ws: web.WebSocketResponse, codec: Codec, *, outbox_limit: int) -> None:
        self.ws = ws
        self.codec = codec
        self.identity: Identity | None = None
        self.watches: dict[int, Member] = {}
        self._opcode = WSMsgType.BINARY if codec.binary else WSMsgType.TEXT
        self._outbox: deque[bytes] = deque()
        self._outbox_limit = outbox_limit
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer = asyncio.create_task(self._write_forever(), name="ws-writer")

    # ---- sending --------------------------------------------------------------------------

    def send(self, message: Message, request_id: str | int | None = None) -> None:
        self.send_frame(self.codec.encode(message, request_id))

    def send_error(self, error: SlotcastError, request_id: str | int | None = None) -> None:
        self.send(Error(code=error.code.value, message=error.message), request_id)

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame; never awaits, so fan-out can call it for every member."""
        if self._closing:
            return
        if len(self._outbox) >= self._outbox_limit:
            log.warning("closing slow consumer after %d queued frames", len(self._outbox))
            self._closing = True
            self._outbox.clear()
            task = asyncio.create_task(
                self.ws.close(code=CLOSE_SLOW_CONSUMER, message=b"slow consumer")
            )
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
            return
        self._outbox.append(frame)
        self._wakeup.set()

    async def _write_forever(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._outbox:
                    await self.ws.send_frame(self._outbox.popleft(), self._opcode)
        except (ConnectionError, RuntimeError) as exc:
            # The peer went away mid-write; the reader loop will notice and clean up.
            log.debug("writer stopped: %s", exc)

    async def close(self) -> None:
        self._closing = True
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
