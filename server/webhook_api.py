"""The admin's REST routes for webhook endpoints (docs/protocol.md, "Webhooks").

Not commands of the registry: they administer the server's integrations, never a
calendar, so they have no WebSocket form and no idempotency key (creating twice
makes two endpoints; each is listed and deletable). Only an admin's token passes.
A secret is in a response exactly twice in its life: when the endpoint is created
and when it is rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import msgspec
from aiohttp import web

from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from server.api import caller, json_response, read_json
from server.keys import CLOCK, SETTINGS, STORE
from server.service import actor_of, forbidden
from server.webhooks import check_url
from store import webhooks
from store.webhooks import KNOWN_EVENTS

T = TypeVar("T")

MAX_ATTEMPTS_PAGE = 500
MAX_REPLAY = 10_000


@dataclass(frozen=True, slots=True)
class NewEndpoint:
    url: str
    description: str = ""
    event_types: list[str] = field(default_factory=list)
    doctor_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EndpointChange:
    url: str | None = None
    description: str | None = None
    event_types: list[str] | None = None
    doctor_ids: list[int] | None = None
    enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    since: datetime
    until: datetime


def _invalid(message: str) -> SlotcastError:
    return SlotcastError(message, code=ErrorCode.INVALID)


async def _admin(request: web.Request) -> None:
    actor = actor_of(await caller(request), request.app[CLOCK]())
    if not actor.is_admin:
        raise forbidden("only an admin manages webhook endpoints")


async def _body(request: web.Request, kind: type[T]) -> T:
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise ProtocolError("the body must be a JSON object", code=ErrorCode.INVALID)
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None


def _endpoint_id(request: web.Request) -> int:
    raw = request.match_info["endpoint_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 16:
        raise _invalid("`endpoint_id` must be a whole number")
    return int(raw)


def _check_filters(event_types: list[str] | None, doctor_ids: list[int] | None) -> None:
    if event_types is not None:
        unknown = sorted(set(event_types) - KNOWN_EVENTS)
        if unknown:
            raise _invalid(f"unknown event types {unknown}; see docs/webhooks.md")
        if len(event_types) > len(KNOWN_EVENTS):
            raise _invalid("too many event types")
    if doctor_ids is not None:
        if len(doctor_ids) > 1000:
            raise _invalid("at most 1000 doctors per endpoint")
        if any(not 1 <= d < 2**31 for d in doctor_ids):
            raise _invalid("doctor ids are whole numbers from 1")


def _description(value: str | None) -> None:
    if value is not None and len(value) > 500:
        raise _invalid("a description is at most 500 characters")


async def create(request: web.Request) -> web.Response:
    await _admin(request)
    body = await _body(request, NewEndpoint)
    settings = request.app[SETTINGS]
    _check_filters(body.event_types, body.doctor_ids)
    _description(body.description)
    url = await check_url(body.url, allow_private=settings.webhook_allow_private)
    ep = await webhooks.create_endpoint(
        request.app[STORE],
        url=url,
        description=body.description,
        event_types=sorted(set(body.event_types)),
        doctor_ids=sorted(set(body.doctor_ids)),
        max_endpoints=settings.webhook_max_endpoints,
    )
    return json_response({**ep.view(), "secret": ep.secret}, status=201)


async def listing(request: web.Request) -> web.Response:
    await _admin(request)
    found = await webhooks.endpoints(request.app[STORE])
    return json_response({"endpoints": [ep.view() for ep in found]})


async def show(request: web.Request) -> web.Response:
    await _admin(request)
    ep = await webhooks.endpoint(request.app[STORE], _endpoint_id(request))
    return json_response(ep.view())


async def change(request: web.Request) -> web.Response:
    await _admin(request)
    endpoint_id = _endpoint_id(request)
    body = await _body(request, EndpointChange)
    _check_filters(body.event_types, body.doctor_ids)
    _description(body.description)
    url = body.url
    if url is not None:
        url = await check_url(url, allow_private=request.app[SETTINGS].webhook_allow_private)
    ep = await webhooks.update_endpoint(
        request.app[STORE],
        endpoint_id,
        url=url,
        description=body.description,
        event_types=None if body.event_types is None else sorted(set(body.event_types)),
        doctor_ids=None if body.doctor_ids is None else sorted(set(body.doctor_ids)),
        enabled=body.enabled,
    )
    return json_response(ep.view())


async def delete(request: web.Request) -> web.Response:
    await _admin(request)
    await webhooks.delete_endpoint(request.app[STORE], _endpoint_id(request))
    return json_response({"deleted": True})


async def rotate(request: web.Request) -> web.Response:
    await _admin(request)
    overlap = timedelta(seconds=request.app[SETTINGS].webhook_rotation_overlap_s)
    ep = await webhooks.rotate_secret(
        request.app[STORE], _endpoint_id(request), overlap_until=datetime.now(UTC) + overlap
    )
    return json_response({**ep.view(), "secret": ep.secret})


async def attempts(request: web.Request) -> web.Response:
    await _admin(request)
    limit = _query_int(request, "limit", 100, 1, MAX_ATTEMPTS_PAGE)
    before = _query_int(request, "before", 2**62, 1, 2**62)
    found = await webhooks.attempts(
        request.app[STORE], _endpoint_id(request), limit=limit, before=before
    )
    return json_response({"attempts": found})


async def replay(request: web.Request) -> web.Response:
    await _admin(request)
    body = await _body(request, Replay)
    since, until = (_aware(body.since, "since"), _aware(body.until, "until"))
    if until <= since:
        raise _invalid("`until` must be after `since`")
    queued = await webhooks.replay(
        request.app[STORE], _endpoint_id(request), since=since, until=until, limit=MAX_REPLAY
    )
    return json_response({"queued": queued}, status=202)


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise _invalid(f"`{name}` needs a time zone (…Z)")
    return value


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not low <= int(raw) <= high:
        raise _invalid(f"`{name}` must be a whole number from {low} to {high}")
    return int(raw)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/webhooks", create)
    r.add_get("/api/webhooks", listing)
    r.add_get("/api/webhooks/{endpoint_id}", show)
    r.add_patch("/api/webhooks/{endpoint_id}", change)
    r.add_delete("/api/webhooks/{endpoint_id}", delete)
    r.add_post("/api/webhooks/{endpoint_id}/rotate", rotate)
    r.add_get("/api/webhooks/{endpoint_id}/attempts", attempts)
    r.add_post("/api/webhooks/{endpoint_id}/replay", replay)
