"""Frame codecs: JSON (orjson) and MessagePack (msgpack), chosen by WebSocket subprotocol.

Decoding is the only gate between untrusted bytes and handlers: it checks size,
shape, message type and every field's type and range, and raises `ProtocolError`
with a stable code instead of letting a bad frame reach further. Encoding is
split in two so fan-out can convert a message to builtins once and serialize it
once per codec, however many watchers receive it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import msgspec
import orjson

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import CLIENT_MESSAGES, PROTOCOL, Envelope, Message

DEFAULT_MAX_FRAME: Final = 64 * 1024


def to_wire(message: Message, request_id: str | int | None = None) -> dict[str, Any]:
    """The codec-neutral envelope: builtins only, times as RFC 3339 strings."""
    return {
        "type": message.TYPE,
        "id": request_id,
        "body": msgspec.to_builtins(message),
    }


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

    def encode(self, message: Message, request_id: str | int | None = None) -> bytes:
        return self.dumps(to_wire(message, request_id))

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


class MsgpackCodec(Codec):
    def dumps(self, wire: Mapping[str, Any]) -> bytes:
        result: bytes = msgpack.packb(wire, use_bin_type=True)
        return result

    def loads(self, data: bytes | str) -> Any:
        if isinstance(data, str):
            raise ValueError("MessagePack frames must be binary")
        return msgpack.unpackb(data, raw=False, strict_map_key=True)


JSON: Final[Codec] = JsonCodec("json", f"{PROTOCOL}.json", binary=False)
MSGPACK: Final[Codec] = MsgpackCodec("msgpack", f"{PROTOCOL}.msgpack", binary=True)
CODECS: Final = {c.subprotocol: c for c in (JSON, MSGPACK)}
SUBPROTOCOLS: Final = tuple(CODECS)


def codec_for(subprotocol: str | None) -> Codec:
    """JSON when the client asked for no subprotocol (or one we don't speak)."""
    return CODECS.get(subprotocol or "", JSON)
