"""Log lines an operator can search and join: who, which request or connection, where.

Every line names its instance, and inside an HTTP request or a WebSocket connection
its request id (taken from a well-formed `X-Request-Id`, so a balancer's id joins
its own log, else made here), the connection id (a WebSocket's upgrade request's
id) and the token's subject and role once known. They travel in `contextvars`,
which every task started from a request inherits, so no function takes them as
arguments; work that belongs to no request (a room's fan-out, the readiness probe
shared by many) runs in `detached()` so it is not blamed on whichever request
happened to start it.

Nothing else personal is logged: no token, no client address, no query string
(the balancer's log has the addresses; the subject is the host application's
opaque id). `SLOTCAST_LOG_FORMAT=json` gives one JSON object per line
(python-json-logger, encoded with orjson); `text`, the default, gives the same ids
in brackets.

Hot path: the command-outcome line (`command_done`) is built only when INFO is
on for its logger, with `%` arguments, so a disabled line costs one level check.
Fan-out deliveries are never logged per message.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
from collections.abc import Awaitable, Callable
from contextvars import Context, ContextVar
from typing import IO, TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

if TYPE_CHECKING:
    from server.auth import Identity

FORMATS = ("text", "json")
REQUEST_ID_HEADER = "X-Request-Id"
# A balancer's id is believed only if it looks like one: bounded, no spaces or quotes.
_GOOD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

REQUEST_ID: ContextVar[str | None] = ContextVar("slotcast_request_id", default=None)
CONNECTION_ID: ContextVar[str | None] = ContextVar("slotcast_connection_id", default=None)
IDENTITY: ContextVar[Identity | None] = ContextVar("slotcast_identity", default=None)

# Names of their own, so a log collector can route or filter them.
access_log = logging.getLogger("slotcast.access")
command_log = logging.getLogger("slotcast.commands")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s"
# Paths a balancer or Prometheus asks every few seconds: logged at DEBUG unless they fail.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class ContextFields(logging.Filter):
    """Puts the instance and the context's ids on every record (a handler's filter, so
    library records get them too)."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.instance = self.instance
        ids = []
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
            ids.append(f"req={request_id}")
        connection_id = CONNECTION_ID.get()
        if connection_id is not None:
            record.connection_id = connection_id
            ids.append(f"conn={connection_id}")
        identity = IDENTITY.get()
        if identity is not None:
            record.subject = identity.subject
            # An API key is named as the change log names it (`key:<id>`), not as a person.
            role = "key" if identity.key is not None else identity.role.value
            record.role = role
            ids.append(f"sub={role}:{identity.subject}")
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return True


def configure(*, level: str, fmt: str, instance: str) -> None:
    """The root logger's one handler (stderr), in `fmt`, with the context on every line."""
    logging.basicConfig(
        level=level.upper(), handlers=[handler(fmt, instance, sys.stderr)], force=True
    )


def handler(fmt: str, instance: str, stream: IO[str]) -> logging.Handler:
    """A handler writing `fmt` lines to `stream`; ValueError for an unknown format."""
    if fmt not in FORMATS:
        raise ValueError(f"SLOTCAST_LOG_FORMAT={fmt!r}: expected one of {', '.join(FORMATS)}")
    out = logging.StreamHandler(stream)
    out.addFilter(ContextFields(instance))
    if fmt == "json":
        out.setFormatter(
            OrjsonFormatter(
                JSON_FIELDS,
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",
                # The text format's helper; everything else the filter adds is a field.
                reserved_attrs=[*RESERVED_ATTRS, "ids"],
            )
        )
    else:
        out.setFormatter(logging.Formatter(TEXT_FORMAT))
    return out


def identify(identity: Identity | None) -> None:
    """From now on in this request or connection, lines name this identity (or none)."""
    IDENTITY.set(identity)


def detached() -> Context:
    """A context without request, connection or identity, for work that serves many."""
    return Context()


# ---- HTTP ---------------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: this request's id, for every line logged while it runs.

    aiohttp runs each request in a task of its own, so what is set here ends with it.
    """
    given = request.headers.get(REQUEST_ID_HEADER)
    REQUEST_ID.set(given if given is not None and _GOOD_ID.fullmatch(given) else _new_id())
    return await handler(request)


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Echo the id, so a client's bug report can name the very lines that concern it."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


def _new_id() -> str:
    return secrets.token_hex(8)


class AccessLogger(AbstractAccessLogger):
    """One line per HTTP request, after its response (a WebSocket's when it closes, with
    status 101 and the connection's lifetime): method, path, status, size, duration.

    Runs in the request's own task, so the request id and subject are on the line.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        status = response.status
        quiet = request.path in QUIET_PATHS and status < 400
        level = logging.DEBUG if quiet else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        ms = round(time * 1000, 1)
        self.logger.log(
            level,
            "%s %s %s %s B %.1f ms",
            request.method,
            request.path,
            status,
            response.body_length,
            ms,
            extra={
                "method": request.method,
                "path": request.path,
                "status": status,
                "bytes": response.body_length,
                "duration_ms": ms,
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO) or self.logger.isEnabledFor(logging.DEBUG)


# ---- commands -----------------------------------------------------------------------------------


def doctor_of(reply: object) -> int | None:
    """The doctor a command's reply concerns, when the request did not name one."""
    appointment = getattr(reply, "appointment", None)
    doctor_id = getattr(appointment, "doctor_id", None)
    return doctor_id if isinstance(doctor_id, int) else None


def command_done(
    transport: str, command: str, outcome: str, seconds: float, doctor_id: int | None
) -> None:
    """One line per command: what, how it ended (`ok` or an error code), how long it took.

    `ping` is DEBUG: a page sends one whenever it wants proof of life.
    """
    level = logging.DEBUG if command == "ping" else logging.INFO
    if not command_log.isEnabledFor(level):
        return
    ms = round(seconds * 1000, 2)
    fields: dict[str, Any] = {
        "transport": transport,
        "command": command,
        "outcome": outcome,
        "latency_ms": ms,
    }
    if doctor_id is not None:
        fields["doctor_id"] = doctor_id
    command_log.log(
        level,
        "%s %s %s %.2f ms doctor %s",
        transport,
        command,
        outcome,
        ms,
        doctor_id if doctor_id is not None else "-",
        extra=fields,
    )
