"""A WebSocket client with nothing hidden: the tests decide when it reads and when it closes.

WebSocket libraries read for you (and answer a close frame for you, at once), which
hides what a server does to a peer that is slow to read or slow to finish the
closing handshake. This one does only what the test says, frame by frame (RFC 6455).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from dataclasses import dataclass

import orjson

from protocol.codec import JSON

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


@dataclass
class RawSocket:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, payload: bytes, opcode: int = TEXT) -> None:
        """One masked frame, as a client must send it."""
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    async def send_json(self, message: dict[str, object]) -> None:
        await self.send(orjson.dumps(message))

    async def receive(self) -> tuple[int, bytes]:
        """The next frame's opcode and payload (server frames are unmasked, unfragmented)."""
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(size)

    async def close_frame(self, timeout: float) -> tuple[int, str]:
        """Read until the server's close frame, answering its pings; its code and reason."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.receive()
                if opcode == PING:
                    await self.send(payload, PONG)
                elif opcode == CLOSE:
                    (code,) = struct.unpack("!H", payload[:2])
                    return code, payload[2:].decode()

    async def aclose(self) -> None:
        """Close the TCP connection (FIN), whatever state the WebSocket is in."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def abort(self) -> None:
        """Drop the connection with a TCP reset: no close frame, no FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def connect(
    port: int, *, token: str | None = None, receive_buffer: int | None = None
) -> RawSocket:
    """Upgrade GET /ws (JSON) and read past the 101; `receive_buffer` shrinks SO_RCVBUF
    before connecting, so that a client that does not read backs the server up early."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: {JSON.subprotocol}",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.decode(errors="replace"))
    return RawSocket(reader, writer)
