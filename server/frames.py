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
