"""REST endpoints: the same commands as the WebSocket, for clients that only do HTTP.

Bodies are validated with the protocol's own message types, and errors carry the
same stable codes, as `{"error": {"code": ..., "message": ...}}` with a fitting
HTTP status.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

import msgspec
import orjson
from aiohttp import web

from protocol.codec import parse_body
from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from protocol.messages import Book, Booked
from server import auth
from server.keys import BROKER, ROOMS, SCHEDULING, SETTINGS, STORE

log = logging.getLogger(__name__)

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.INVALID: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.TOKEN_INVALID: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.SLOT_TAKEN: 409,
    ErrorCode.SLOT_UNAVAILABLE: 409,
    ErrorCode.TOO_LATE: 409,
    ErrorCode.IDEMPOTENCY_CONFLICT: 422,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.BUSY: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(error: SlotcastError) -> web.Response:
    return json_response(
        {"error": {"code": error.code.value, "message": error.message}},
        status=HTTP_STATUS.get(error.code, 500),
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure under /api becomes a JSON error with a stable code, never a traceback."""
    try:
        return await handler(request)
    except SlotcastError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(SlotcastError("request body too large", code=ErrorCode.TOO_LARGE))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("request failed: %s %s", request.method, request.path)
        return error_response(SlotcastError("internal error", code=ErrorCode.INTERNAL))


def _identity(request: web.Request) -> auth.Identity:
    token = auth.bearer(request.headers.get("Authorization"))
    if token is None:
        raise SlotcastError("send `Authorization: Bearer <token>`", code=ErrorCode.UNAUTHENTICATED)
    return auth.verify(request.app[SETTINGS].jwt_secret, token)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ProtocolError(f"`{name}` must be a whole number", code=ErrorCode.INVALID) from None
    if not low <= value <= high:
        raise ProtocolError(f"`{name}` must be in {low}..{high}", code=ErrorCode.INVALID)
    return value


def _date_param(request: web.Request, name: str) -> date:
    raw = request.query.get(name)
    if raw is None:
        raise ProtocolError(f"`{name}` (YYYY-MM-DD) is required", code=ErrorCode.INVALID)
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ProtocolError(
            f"`{name}` must be a date, YYYY-MM-DD", code=ErrorCode.INVALID
        ) from None


async def _json_body(request: web.Request) -> Any:
    """The JSON body, with an `Idempotency-Key` header folded in to be validated alike."""
    try:
        raw = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ProtocolError("the body must be JSON") from None
    key = request.headers.get("Idempotency-Key")
    if key is not None and isinstance(raw, dict):
        raw.setdefault("idempotency_key", key)
    return raw


def _doctor_id(request: web.Request) -> int:
    try:
        value = int(request.match_info["doctor_id"])
    except ValueError:
        raise ProtocolError("doctor id must be a whole number", code=ErrorCode.INVALID) from None
    if not 1 <= value < 2**31:
        raise SlotcastError(f"no doctor {value}", code=ErrorCode.NOT_FOUND)
    return value


async def list_doctors(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", 20, 1, 100)
    offset = _int_param(request, "offset", 0, 0, 1_000_000)
    query = request.query.get("q")
    if query is not None and (len(query) > 100 or "\x00" in query):
        raise ProtocolError("`q` must be at most 100 characters", code=ErrorCode.INVALID)
    found = await request.app[SCHEDULING].doctors(query, limit, offset)
    return json_response({"doctors": msgspec.to_builtins(found), "limit": limit, "offset": offset})


async def doctor_slots(request: web.Request) -> web.Response:
    snapshot = await request.app[SCHEDULING].snapshot(
        _doctor_id(request), _date_param(request, "start"), _date_param(request, "end")
    )
    return json_response(msgspec.to_builtins(snapshot))


async def book(request: web.Request) -> web.Response:
    who = _identity(request)
    body = parse_body(await _json_body(request), Book)
    assert isinstance(body, Book)
    appointment = await request.app[SCHEDULING].book(who, body.slot_id, body.idempotency_key)
    return json_response(msgspec.to_builtins(Booked(appointment)), status=201)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "instance": request.app[SETTINGS].instance_id})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the database and the broker both answer."""
    try:
        await request.app[STORE].ping()
        await request.app[BROKER].ping()
    except SlotcastError as exc:
        return json_response({"status": "unready", "reason": exc.message}, status=503)
    return json_response({"status": "ready", **request.app[ROOMS].stats()})
