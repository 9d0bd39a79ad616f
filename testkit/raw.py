"""A WebSocket client over a bare socket, which reads only what it is told to read.

aiohttp's client and asyncio's streams read whatever arrives into their own buffers,
so a client built on them can never stop reading: the server's output would pile up
in the test process instead of in the server. This one does the handshake by hand,
masks its own frames (RFC 6455 §5.3) and otherwise leaves the socket alone; with a
small receive buffer the server's writes back up after a few kilobytes. It is the
hostile client of tests/server/test_memory.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from typing import Final, Self

OP_TEXT: Final = 0x1
OP_PONG: Final = 0xA


def masked_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """A final client frame carrying `payload`, masked as every client frame must be."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


class RawWebSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        path: str = "/ws",
        protocol: str = "slotcast.v1.json",
        rcvbuf: int = 4096,
        pipelined: bytes = b"",
    ) -> Self:
        """Upgrade a fresh socket to a WebSocket, reading nothing past the response head.

        `pipelined` (frames) goes out in the same write as the request, before the answer.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
            )
            await loop.sock_sendall(sock, request.encode() + pipelined)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                byte = await loop.sock_recv(sock, 1)  # byte by byte: not one past the head
                if not byte:
                    raise ConnectionError(f"closed during the handshake: {head!r}")
                head += byte
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status:
                raise ConnectionError(f"upgrade refused: {status!r}")
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> None:
        """Write bytes as they are (frames built with `masked_frame`)."""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def send_text(self, text: str) -> None:
        await self.send(masked_frame(text.encode()))

    async def pong(self) -> None:
        """An unsolicited pong: the server hears from the client without it reading anything."""
        await self.send(masked_frame(b"", OP_PONG))

    async def receive(self) -> tuple[int, bytes]:
        """The next server frame, whole: its opcode and payload (server frames are unmasked)."""
        head = await self._read(2)
        n = head[1] & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._read(8))
        return head[0] & 0x0F, await self._read(n)

    async def _read(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < n:
            chunk = await loop.sock_recv(self.sock, n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    async def at_eof(self) -> bool:
        """Whether the server has closed the socket (after whatever it sent first)."""
        return await asyncio.get_running_loop().sock_recv(self.sock, 1) == b""

    def close(self) -> None:
        self.sock.close()
