"""REST endpoints: the same commands as the WebSocket, for clients that only do HTTP.

Bodies are validated with the protocol's own message types, and errors carry the
same stable codes, as `{"error": {"code": ..., "message": ...}}` with a fitting
HTTP status.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

import msgspec
import orjson
from aiohttp import web

from protocol.codec import parse_body
from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from protocol.messages import check_date
from server import auth, logs
from server.commands import Command, PublicCommand
from server.keys import HEALTH, METRICS, ROOMS, SCHEDULING, SETTINGS, STATE, VERIFIER

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
    ErrorCode.OUTSIDE_HORIZON: 409,
    ErrorCode.HOLD_EXPIRED: 409,
    ErrorCode.NOT_HOLDER: 403,
    ErrorCode.HOLD_LIMIT: 409,
    ErrorCode.APPOINTMENT_LIMIT: 409,
    ErrorCode.COOLDOWN: 409,
    ErrorCode.INVALID_TRANSITION: 409,
    ErrorCode.TOO_EARLY: 409,
    ErrorCode.DOCTOR_RETIRED: 410,
    ErrorCode.IDEMPOTENCY_CONFLICT: 422,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BUSY: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(error: SlotcastError) -> web.Response:
    body: dict[str, Any] = {"code": error.code.value, "message": error.message}
    if error.retry_after_ms is None:
        return json_response({"error": body}, status=HTTP_STATUS.get(error.code, 500))
    # Rate limits: the same wait in the body (ms) and in the standard header (whole seconds).
    body["retry_after_ms"] = error.retry_after_ms
    response = json_response({"error": body}, status=HTTP_STATUS.get(error.code, 500))
    response.headers["Retry-After"] = str(math.ceil(error.retry_after_ms / 1000))
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure under /api becomes a JSON error with a stable code, never a traceback."""
    try:
        return await handler(request)
    except SlotcastError as exc:
        return _counted(request, exc)
    except web.HTTPRequestEntityTooLarge:
        return _counted(request, SlotcastError("request body too large", code=ErrorCode.TOO_LARGE))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("request failed: %s %s", request.method, request.path)
        return _counted(request, SlotcastError("internal error", code=ErrorCode.INTERNAL))


def _counted(request: web.Request, error: SlotcastError) -> web.Response:
    """The error response, counted by code like a WebSocket's `error` reply."""
    request.app[METRICS].error(error.code, "rest")
    return error_response(error)


def _date_param(request: web.Request, name: str) -> date:
    raw = request.query.get(name)
    if raw is None:
        raise ProtocolError(f"`{name}` (YYYY-MM-DD) is required", code=ErrorCode.INVALID)
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise ProtocolError(
            f"`{name}` must be a date, YYYY-MM-DD", code=ErrorCode.INVALID
        ) from None
    try:
        return check_date(day, name)
    except ValueError as exc:
        raise ProtocolError(str(exc), code=ErrorCode.INVALID) from None


# A POST, PUT or PATCH always carries its message's fields, `{}` at least: an empty body is a
# client that lost its payload, and acting on it (a block!) would be a guess. A DELETE
# may carry none.
BODY_REQUIRED = frozenset({"POST", "PUT", "PATCH"})


async def read_json(request: web.Request) -> Any:
    """JSON is UTF-8 (RFC 8259), whatever charset the request claims."""
    data = await request.read()
    if not data.strip():
        raise ProtocolError(f"a {request.method} needs a JSON body (`{{}}` at least)")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("the body must be JSON") from None


def _doctor_id(request: web.Request) -> int:
    """A whole number in ASCII digits (else `invalid`); one out of range is `not_found`."""
    raw = request.match_info["doctor_id"]
    if not (raw.isascii() and raw.isdigit()):
        raise ProtocolError("doctor id must be a whole number", code=ErrorCode.INVALID)
    digits = raw.lstrip("0")
    value = int(digits) if len(digits) <= 10 else 2**31  # never int() thousands of digits
    if not 1 <= value < 2**31:
        raise SlotcastError(f"no doctor {value}", code=ErrorCode.NOT_FOUND)
    return value


def endpoint(command: Command[Any] | PublicCommand[Any]) -> Handler:
    """A command's REST endpoint: path, query and body make the message, as on a socket.

    Query strings are coerced (numbers, dates); JSON bodies are validated strictly.
    """
    cls = command.message

    async def handler(request: web.Request) -> web.StreamResponse:
        raw: dict[str, Any] = {}
        if request.method == "GET":
            raw.update(request.query)
        elif request.body_exists or request.method in BODY_REQUIRED:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ProtocolError("the body must be a JSON object", code=ErrorCode.INVALID)
            raw.update(body)
        key = request.headers.get("Idempotency-Key")
        if key is not None and command.idempotent:
            raw.setdefault("idempotency_key", key)
        for name, value in request.match_info.items():
            raw[name] = _path_id(name, value)
        started = time.perf_counter()
        outcome = "ok"
        doctor_id = raw.get("doctor_id")
        try:
            message = parse_body(raw, cls, strict=request.method != "GET")
            reply = await command(request.app[SCHEDULING], await caller(request), message)
            if doctor_id is None:
                doctor_id = logs.doctor_of(reply)
        except SlotcastError as exc:
            outcome = exc.code.value
            raise
        except Exception:
            outcome = ErrorCode.INTERNAL.value
            raise
        finally:
            doctor = doctor_id if isinstance(doctor_id, int) else None
            logs.command_done("rest", cls.TYPE, outcome, time.perf_counter() - started, doctor)
        return json_response(msgspec.to_builtins(reply), status=command.route.status)

    handler.__name__ = f"{cls.TYPE}_endpoint"
    return handler


async def caller(request: web.Request) -> auth.Identity | None:
    """The request's token or API key (`X-Api-Key`), checked; None without either."""
    identity = await request.app[VERIFIER].caller(
        request.headers.get("Authorization"), request.headers.get("X-Api-Key")
    )
    logs.identify(identity)
    return identity


def _path_id(name: str, value: str) -> int:
    """ASCII digits only: int() would also take U+0661 (Arabic-Indic one), "1_0" and " 7"."""
    if not (value.isascii() and value.isdigit()) or len(value) > 16:
        raise ProtocolError(f"`{name}` must be a whole number", code=ErrorCode.INVALID)
    return int(value)


async def doctor_slots(request: web.Request) -> web.Response:
    snapshot = await request.app[SCHEDULING].snapshot(
        _doctor_id(request), _date_param(request, "start"), _date_param(request, "end")
    )
    return json_response(msgspec.to_builtins(snapshot))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "instance": request.app[SETTINGS].instance_id})


async def readyz(request: web.Request) -> web.Response:
    """Ready: not draining and the database answers, within about a second whatever the
    dependencies do (`server.health`). A broker outage degrades, it does not unready:
    the body says `"broker": "down"`."""
    app = request.app
    if app[STATE].draining:
        return json_response({"status": "unready", "reason": "draining"}, status=503)
    probe = await app[HEALTH].probe()
    body: dict[str, Any] = {
        "status": "ready" if probe.database is None else "unready",
        "database": "up" if probe.database is None else "down",
        "broker": "up" if probe.broker is None else "down",
    }
    if probe.broker is not None:
        body["broker_error"] = probe.broker
    if probe.database is not None:
        body["reason"] = f"database: {probe.database}"
        return json_response(body, status=503)
    return json_response({**body, **app[ROOMS].stats()})


async def metrics(request: web.Request) -> web.Response:
    """The metrics, readiness included: the same bounded, shared probe as `/readyz`, so an
    alert on `slotcast_ready` needs no balancer in front of the instance."""
    app = request.app
    probe = await app[HEALTH].probe()
    draining = app[STATE].draining
    found = app[METRICS]
    found.draining.set(draining)
    found.database_up.set(probe.database is None)
    found.ready.set(not draining and probe.database is None)
    return web.Response(
        body=found.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
