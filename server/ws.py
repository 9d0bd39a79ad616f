"""The WebSocket endpoint: handshake, a receive loop, and a dispatch table.

Every inbound frame is decoded and validated by the codec; every failure becomes
an `error` reply with a stable code and the loop goes on, so one bad frame
never costs a client its connection, nor other clients anything.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from protocol.codec import SUBPROTOCOLS, codec_for
from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from protocol.messages import (
    PROTOCOL,
    Auth,
    Authenticated,
    Message,
    Ping,
    Pong,
    Unwatch,
    Unwatched,
    Watch,
    Welcome,
)
from server import auth
from server.connection import Connection
from server.keys import CONNECTIONS, ROOMS, SCHEDULING, SETTINGS
from server.rooms import Rooms
from server.service import COMMANDS, Scheduling

log = logging.getLogger(__name__)

RequestId = str | int | None


class Context:
    """What a handler may touch: its connection and the app's services."""

    __slots__ = ("conn", "max_frame", "max_watches", "rooms", "scheduling", "secret")

    def __init__(self, conn: Connection, app: web.Application) -> None:
        self.conn = conn
        self.rooms: Rooms = app[ROOMS]
        self.scheduling: Scheduling = app[SCHEDULING]
        self.secret = app[SETTINGS].jwt_secret
        self.max_watches = app[SETTINGS].max_watches
        self.max_frame = app[SETTINGS].max_frame_bytes


async def on_auth(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, Auth)
    identity = auth.verify(ctx.secret, msg.token)
    ctx.conn.identity = identity
    ctx.conn.send(Authenticated(identity.subject, identity.role, identity.expires_at), rid)


async def on_watch(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, Watch)
    conn = ctx.conn
    old = conn.watches.get(msg.doctor_id)  # a new range replaces it, once that succeeds
    if old is None and len(conn.watches) >= ctx.max_watches:
        raise SlotcastError(
            f"at most {ctx.max_watches} watches per connection", code=ErrorCode.LIMIT_EXCEEDED
        )
    # Join (and so subscribe) before reading the snapshot: nothing committed after
    # the snapshot can slip between the two.
    member = await ctx.rooms.join(conn, msg.doctor_id)
    try:
        snapshot = await ctx.scheduling.snapshot(msg.doctor_id, msg.start, msg.end)
    except BaseException:
        await ctx.rooms.leave(member)
        raise
    if old is not None:  # the new member keeps the room open: no unsubscribe, no gap
        await ctx.rooms.leave(old)
    conn.watches[msg.doctor_id] = member
    conn.send(snapshot, rid)
    member.start(snapshot.version)


async def on_unwatch(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, Unwatch)
    member = ctx.conn.watches.pop(msg.doctor_id, None)
    if member is not None:
        await ctx.rooms.leave(member)
    ctx.conn.send(Unwatched(msg.doctor_id), rid)


async def on_ping(ctx: Context, rid: RequestId, msg: Any) -> None:
    ctx.conn.send(Pong(), rid)


Handler = Callable[[Context, RequestId, Any], Awaitable[None]]
# What only a connection can do; every other message is a command in service.COMMANDS.
HANDLERS: dict[type[Message], Handler] = {
    Auth: on_auth,
    Watch: on_watch,
    Unwatch: on_unwatch,
    Ping: on_ping,
}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    settings = app[SETTINGS]
    ws = web.WebSocketResponse(
        protocols=SUBPROTOCOLS,
        heartbeat=settings.heartbeat_s,
        max_msg_size=settings.max_frame_bytes * 4,
        decode_text=False,
    )
    await ws.prepare(request)
    codec = codec_for(ws.ws_protocol)
    conn = Connection(ws, codec, outbox_limit=settings.outbox_limit)
    ctx = Context(conn, app)
    app[CONNECTIONS].add(conn)
    header_error: SlotcastError | None = None
    try:
        token = auth.bearer(request.headers.get("Authorization"))
        if token is not None:
            conn.identity = auth.verify(settings.jwt_secret, token)
    except SlotcastError as exc:
        header_error = exc  # stay connected as anonymous; tell the client why
    who = conn.identity
    conn.send(
        Welcome(
            protocol=PROTOCOL,
            instance=settings.instance_id,
            subject=who.subject if who else None,
            role=who.role if who else None,
        )
    )
    if header_error is not None:
        conn.send_error(header_error)
    try:
        async for frame in ws:
            if frame.type is WSMsgType.BINARY or (
                frame.type is WSMsgType.TEXT and not codec.binary
            ):
                await _handle(ctx, frame.data)
            elif frame.type is WSMsgType.TEXT:
                conn.send_error(ProtocolError("MessagePack connections send binary frames"))
            elif frame.type is WSMsgType.ERROR:
                log.info("connection error: %s", ws.exception())
    finally:
        for member in list(conn.watches.values()):
            await ctx.rooms.leave(member)
        conn.watches.clear()
        app[CONNECTIONS].discard(conn)
        await conn.close()
    return ws


async def _handle(ctx: Context, data: bytes | str) -> None:
    conn = ctx.conn
    request_id: RequestId = None
    try:
        envelope = conn.codec.decode(data, max_size=ctx.max_frame)
        request_id = envelope.id
        kind = type(envelope.body)
        handler = HANDLERS.get(kind)
        if handler is not None:
            await handler(ctx, request_id, envelope.body)
        else:
            reply = await COMMANDS[kind](ctx.scheduling, conn.identity, envelope.body)
            conn.send(reply, request_id)
    except ProtocolError as exc:
        conn.send_error(exc, exc.request_id)
    except SlotcastError as exc:
        conn.send_error(exc, request_id)
    except Exception:
        log.exception("handler failed")
        conn.send_error(SlotcastError("internal error", code=ErrorCode.INTERNAL), request_id)
