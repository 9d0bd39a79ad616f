"""The socket after the handshake: aiohttp's frame reader on a protocol of our own.

aiohttp runs a WebSocket as an HTTP handler that never returns: the request, its
task, every middleware's frame and the response object live as long as the socket,
about 12 of the 16.8 KiB an idle connection cost before this module
(bench/connmem.py), for a server whose connections are mostly idle watchers. So
aiohttp accepts the connection, routes it, runs the middlewares and does the
handshake (`Upgrade.prepare`) as for any request; then `detach` moves the transport
to a `Wire`, whose bytes go through aiohttp's own frame reader (the C one, with its
size limits and RFC checks) to a `Listener` called once per frame, and the handler
returns. What stays per socket is the transport, the reader and the listener's
objects; a task exists only while the listener has work (server.ws).

aiohttp is told the connection is gone once its handler has returned, so it
forgets it (its shutdown no longer waits for it; ours does: server.lifecycle)
without closing a transport that is no longer its own. The pieces touched that
aiohttp does not document (the handshake queue's buffer and error, the request
handler's transport, the reader's queue type) are checked by tests/server/test_wire.py
against the aiohttp installed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, Protocol

from aiohttp import WSMessage, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

log = logging.getLogger(__name__)


class Listener(Protocol):
    """What hears a detached socket: every frame, a broken one, and the end."""

    def frame(self, message: WSMessage) -> None: ...

    def broken(self, error: BaseException) -> None: ...

    def lost(self) -> None: ...


class Upgrade(web.WebSocketResponse):
    """A WebSocket response used for the handshake only, once `detach` has run.

    aiohttp ends every response with `write_eof`, which for a WebSocket is a close:
    a detached socket is closed by its listener, not when the handler returns.
    """

    detached = False

    async def write_eof(self) -> None:  # type: ignore[override]
        if self.detached:
            return
        await super().write_eof()


class _Frames(WebSocketDataQueue):
    """Where aiohttp's reader puts each frame it parses: straight to the listener.

    aiohttp's own queue buffers frames for a task awaiting `receive()`; here there is
    no such task, so nothing is buffered, and the queue's fields (its deque alone is
    ~0.6 KiB) are never set up: the C reader only compares two of them, both 0.
    """

    __slots__ = ("_listener",)

    def __init__(self, listener: Listener) -> None:  # no super(): see the docstring
        self._listener = listener

    def feed_data(self, data: Any, size: int) -> None:
        self._listener.frame(data)

    def feed_eof(self) -> None:
        pass  # the end is `Wire.connection_lost`, which has the transport's word for it

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        self._listener.broken(exc)


# Bytes given to aiohttp's reader at a time. It parses all it is given, and a read can
# be 256 KiB: ~40,000 empty frames, where aiohttp's own queue stops parsing past 512 KiB
# of accounted frames (~4,000). Once the listener pauses reading, what is left of a read
# waits here as bytes (`Wire.resume`), not as frames.
SLICE: Final = 1024


class Wire(asyncio.Protocol):
    """The transport's protocol once detached: bytes to the reader, the end to the listener."""

    __slots__ = ("_listener", "_reader", "_transport", "_unread")

    def __init__(self, transport: Any, reader: Any, listener: Listener) -> None:
        self._transport = transport
        self._reader = reader
        self._listener = listener
        self._unread: memoryview | None = None  # the rest of a read, past a pause

    def data_received(self, data: bytes) -> None:
        if self._unread is None and len(data) <= SLICE:
            self._reader.feed_data(data)  # most reads: a frame or a few
            return
        if self._unread is not None:
            data = bytes(self._unread) + data
        self._unread = memoryview(data)
        self.resume()

    def resume(self) -> None:
        """Parse what is left of the last read, for as long as the socket is being read.

        The listener calls this when it resumes reading: the transport will not, since
        the bytes are no longer in the socket.
        """
        while (unread := self._unread) is not None and self._transport.is_reading():
            self._unread = unread[SLICE:] if len(unread) > SLICE else None
            self._reader.feed_data(bytes(unread[:SLICE]))

    def eof_received(self) -> bool:
        return False  # a half-closed client is a gone one: let the transport close

    def connection_lost(self, exc: BaseException | None) -> None:
        self._unread = None
        self._listener.lost()


def detach(request: web.Request, ws: Upgrade, listener: Listener, *, max_msg_size: int) -> Wire:
    """Take the upgraded socket from aiohttp; returns the protocol it now has.

    Call right after `ws.prepare(request)`, with no await between: frames the client
    sent along with its handshake are already parsed into aiohttp's queue, and are
    handed to the listener here, in order, before anything read later.
    """
    transport = request.transport
    handler = request.protocol
    assert transport is not None
    assert handler is not None
    reader = WebSocketReader(_Frames(listener), max_msg_size, False, False)
    wire = Wire(transport, reader, listener)
    transport.set_protocol(wire)
    ws.detached = True
    handshake = getattr(ws, "_reader", None)
    queued = getattr(handshake, "_buffer", None)
    if queued:
        for message, _size in list(queued):
            listener.frame(message)
        queued.clear()
    # A frame it could not parse stopped it: that is the listener's to hear, after them.
    failed = handshake.exception() if handshake is not None else None
    if failed is not None:
        listener.broken(failed)
    # aiohttp's request handler must neither close the transport nor keep waiting for
    # a next request on it: it gets the transport's end as soon as the handler has
    # returned (after which aiohttp writes nothing: `Upgrade.write_eof`).
    handler.transport = None
    task = asyncio.current_task()
    assert task is not None
    task.add_done_callback(lambda _: handler.connection_lost(None))
    return wire
