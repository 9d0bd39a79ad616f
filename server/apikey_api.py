"""The admin's REST routes for API keys (docs/protocol.md, "API keys").

Not commands of the registry, like the webhook routes: they administer the server's
integrations, not a calendar. Only an admin (a person, or a key with the `admin` scope
on every doctor) passes. A key's text is in exactly one response: its creation's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

import msgspec
from aiohttp import web

from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from protocol.vocabulary import KeyScope
from server.api import caller, json_response, read_json
from server.keys import API_KEYS, CLOCK
from server.service import actor_of, forbidden
from store import apikeys
from store.tx import Actor

log = logging.getLogger(__name__)

MAX_KEYS_LISTED = 10_000


@dataclass(frozen=True, slots=True)
class NewKey:
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern="^[^\x00]*$")]
    scopes: Annotated[list[KeyScope], msgspec.Meta(min_length=1, max_length=4)] = field(
        default_factory=lambda: [KeyScope.READ]
    )
    doctor_id: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None
    expires_at: datetime | None = None


async def _admin(request: web.Request) -> Actor:
    actor = actor_of(await caller(request), request.app[CLOCK]())
    if not actor.is_admin:
        raise forbidden("only an admin manages API keys")
    return actor


def _key_id(request: web.Request) -> int:
    raw = request.match_info["key_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 16:
        raise SlotcastError("`key_id` must be a whole number", code=ErrorCode.INVALID)
    return int(raw)


async def create(request: web.Request) -> web.Response:
    actor = await _admin(request)
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise ProtocolError("the body must be a JSON object", code=ErrorCode.INVALID)
    try:
        body = msgspec.convert(raw, NewKey, strict=False)
    except msgspec.ValidationError as exc:
        raise SlotcastError(f"invalid key: {exc}", code=ErrorCode.INVALID) from None
    if body.expires_at is not None:
        if body.expires_at.tzinfo is None:
            raise SlotcastError("`expires_at` needs a UTC offset", code=ErrorCode.INVALID)
        if body.expires_at <= request.app[CLOCK]():
            raise SlotcastError("`expires_at` is in the past", code=ErrorCode.INVALID)
    view, text = await request.app[API_KEYS].create(
        name=body.name,
        scopes=sorted(set(body.scopes)),
        doctor_id=body.doctor_id,
        expires_at=body.expires_at,
        created_by=str(actor),
    )
    return json_response({**msgspec.to_builtins(view), "key": text}, status=201)


async def listing(request: web.Request) -> web.Response:
    await _admin(request)
    found = await apikeys.listed(request.app[API_KEYS].store)
    return json_response({"keys": msgspec.to_builtins(found[:MAX_KEYS_LISTED])})


async def revoke(request: web.Request) -> web.Response:
    await _admin(request)
    view = await request.app[API_KEYS].revoke(_key_id(request))
    return json_response(msgspec.to_builtins(view))


def setup(app: web.Application) -> None:
    app.router.add_post("/api/keys", create)
    app.router.add_get("/api/keys", listing)
    app.router.add_delete("/api/keys/{key_id}", revoke)
