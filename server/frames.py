"""Whole WebSocket frames, built once and written to many sockets.

A server-to-client frame is unmasked (RFC 6455 §5.1), so the very same bytes are
valid on every connection: fan-out builds a frame once per codec and writes it
with `transport.write`, skipping per-connection framing entirely. This is why
Slotcast turns per-message deflate off: compressed frames differ per connection.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81
_FIN_BINARY = 0x82


def frame(payload: bytes, *, binary: bool) -> bytes:
    """A complete, final, unmasked data frame carrying `payload`."""
    first = _FIN_BINARY if binary else _FIN_TEXT
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


# Control frames (RFC 6455 §5.5): the server's are unmasked and carry at most 125 bytes.
_FIN_CLOSE = 0x88
_FIN_PONG = 0x8A

# A ping with no payload: the heartbeat's (server.connection.heartbeat).
PING = b"\x89\x00"


def pong(payload: bytes) -> bytes:
    """The answer to a client's ping, with its payload (at most 125 bytes: the reader
    refuses a longer control frame before it gets here)."""
    return bytes((_FIN_PONG, len(payload))) + payload


def close(code: int, reason: str = "") -> bytes:
    """A close frame: the code, then a reason cut to the 123 bytes a control frame allows."""
    cut = reason.encode()[:123].decode(errors="ignore").encode()  # whole characters only
    body = struct.pack("!H", code) + cut
    return bytes((_FIN_CLOSE, len(body))) + body
