"""Frame codecs: JSON (orjson) and MessagePack (msgpack), chosen by WebSocket subprotocol.

Decoding is the only gate between untrusted bytes and handlers: it checks size,
shape, message type and every field's type and range, and raises `ProtocolError`
with a stable code instead of letting a bad frame reach further.

Encoding is split so fan-out pays for a change once, however many watchers
receive it: a body is serialized once per codec (`encode_body`), then put in its
envelope by `wrap`, which splices the bytes in rather than re-encoding them. Both
produce exactly the bytes `encode` would, so a client cannot tell the paths apart.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import msgspec
import orjson

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import CLIENT_MESSAGES, PROTOCOL, Envelope, Message

DEFAULT_MAX_FRAME: Final = 64 * 1024

RequestId = str | int | None


def envelope(kind: str, body: Any, request_id: RequestId = None) -> dict[str, Any]:
    """The one place the envelope's shape is spelled: `body` is already builtins.

    For bodies the server holds as builtins (a change's delta, a merge of several),
    which would only be converted back and forth by going through a `Message`.
    """
    return {"type": kind, "id": request_id, "body": body}


def to_wire(message: Message, request_id: RequestId = None) -> dict[str, Any]:
    """The codec-neutral envelope: builtins only, times as RFC 3339 strings."""
    return envelope(message.TYPE, msgspec.to_builtins(message), request_id)


@dataclass(frozen=True, slots=True)
class Codec:
    """One wire encoding. `binary` says whether frames travel as binary or text."""

    name: str
    subprotocol: str
    binary: bool

    def dumps(self, wire: Mapping[str, Any]) -> bytes:
        raise NotImplementedError

    def loads(self, data: bytes | str) -> Any:
        raise NotImplementedError

    def encode(self, message: Message, request_id: RequestId = None) -> bytes:
        return self.dumps(to_wire(message, request_id))

    def encode_body(self, body: Any) -> bytes:
        """A body (builtins) alone, serialized once to be `wrap`ped for many frames."""
        raise NotImplementedError

    def wrap(self, kind: str, body: bytes, request_id: RequestId = None) -> bytes:
        """The envelope around a body `encode_body` made: the bytes `dumps(envelope(...))` gives.

        The head before the body is built once per message type (for `id` null,
        as fan-out sends), so framing a shared body costs one concatenation.
        """
        raise NotImplementedError

    def decode(
        self,
        data: bytes | str,
        registry: Mapping[str, type[Message]] = CLIENT_MESSAGES,
        *,
        max_size: int = DEFAULT_MAX_FRAME,
    ) -> Envelope:
        """Decode and validate one frame against `registry` (client or server messages)."""
        if len(data) > max_size:
            raise ProtocolError(
                f"frame of {len(data)} bytes exceeds the {max_size}-byte limit",
                code=ErrorCode.TOO_LARGE,
            )
        try:
            raw = self.loads(data)
        except Exception as exc:  # each library raises its own family; all mean "not ours"
            raise ProtocolError(f"not valid {self.name}: {exc}") from None
        if not isinstance(raw, dict):
            raise ProtocolError("a frame must be an object with `type`, `id` and `body`")
        request_id = raw.get("id")
        if request_id is not None and not _valid_request_id(request_id):
            raise ProtocolError("`id` must be a string of 1-64 characters or a whole number")
        kind = raw.get("type")
        if not isinstance(kind, str):
            raise ProtocolError("`type` must be a string", request_id=request_id)
        cls = registry.get(kind)
        if cls is None:
            raise ProtocolError(
                f"unknown message type {kind!r}", code=ErrorCode.UNKNOWN_TYPE, request_id=request_id
            )
        try:
            message = parse_body(raw.get("body"), cls)
        except ProtocolError as exc:
            exc.request_id = request_id
            raise
        return Envelope(id=request_id, body=message)


def parse_body(body: Any, cls: type[Message], *, strict: bool = True) -> Message:
    """Validate a message body (already parsed from JSON or MessagePack) into its type.

    `strict=False` lets strings stand for numbers and dates, as in a URL's query.
    """
    try:
        message: Message = msgspec.convert({} if body is None else body, cls, strict=strict)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {cls.TYPE}: {exc}", code=ErrorCode.INVALID) from None
    return message


def _valid_request_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return 1 <= len(value) <= 64
    return isinstance(value, int) and 0 <= value < 2**53


class JsonCodec(Codec):
    def dumps(self, wire: Mapping[str, Any]) -> bytes:
        return orjson.dumps(wire)

    def loads(self, data: bytes | str) -> Any:
        return orjson.loads(data)

    def encode_body(self, body: Any) -> bytes:
        return orjson.dumps(body)

    def wrap(self, kind: str, body: bytes, request_id: RequestId = None) -> bytes:
        # orjson writes keys in insertion order with no spaces, as `envelope` orders them.
        head = _json_head(kind) if request_id is None else _json_head_with_id(kind, request_id)
        return b"".join((head, body, b"}"))


@functools.cache
def _json_head(kind: str) -> bytes:
    return _json_head_with_id(kind, None)


def _json_head_with_id(kind: str, request_id: RequestId) -> bytes:
    return b'{"type":%b,"id":%b,"body":' % (orjson.dumps(kind), orjson.dumps(request_id))


class MsgpackCodec(Codec):
    def dumps(self, wire: Mapping[str, Any]) -> bytes:
        return _packb(wire)

    def loads(self, data: bytes | str) -> Any:
        if isinstance(data, str):
            raise ValueError("MessagePack frames must be binary")
        return msgpack.unpackb(data, raw=False, strict_map_key=True)

    def encode_body(self, body: Any) -> bytes:
        return _packb(body)

    def wrap(self, kind: str, body: bytes, request_id: RequestId = None) -> bytes:
        # A map's entries follow its header back to back, so the body's bytes can
        # simply come last, where packing the whole envelope would have put them.
        head = (
            _msgpack_head(kind) if request_id is None else _msgpack_head_with_id(kind, request_id)
        )
        return head + body


def _packb(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


_FIXMAP_3: Final = b"\x83"  # a map of three entries: type, id, body


@functools.cache
def _msgpack_head(kind: str) -> bytes:
    return _msgpack_head_with_id(kind, None)


def _msgpack_head_with_id(kind: str, request_id: RequestId) -> bytes:
    return b"".join(
        (_FIXMAP_3, _packb("type"), _packb(kind), _packb("id"), _packb(request_id), _packb("body"))
    )


JSON: Final[Codec] = JsonCodec("json", f"{PROTOCOL}.json", binary=False)
MSGPACK: Final[Codec] = MsgpackCodec("msgpack", f"{PROTOCOL}.msgpack", binary=True)
CODECS: Final = {c.subprotocol: c for c in (JSON, MSGPACK)}
SUBPROTOCOLS: Final = tuple(CODECS)


def codec_for(subprotocol: str | None) -> Codec:
    """JSON when the client asked for no subprotocol (or one we don't speak)."""
    return CODECS.get(subprotocol or "", JSON)
