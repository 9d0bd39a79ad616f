"""The WebSocket endpoint: handshake, a receive loop, and a dispatch table.

Every inbound frame is decoded and validated by the codec; every failure becomes
an `error` reply with a stable code and the loop goes on, so one bad frame
never costs a client its connection, nor other clients anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from protocol.codec import SUBPROTOCOLS, codec_for
from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from protocol.messages import (
    PROTOCOL,
    Auth,
    Authenticated,
    Message,
    MyAppointments,
    Ping,
    Pong,
    Resumed,
    Unwatch,
    UnwatchAppointments,
    UnwatchDashboard,
    Unwatched,
    Watch,
    WatchAppointments,
    WatchDashboard,
    Welcome,
)
from server import auth
from server.connection import Connection
from server.keys import CONNECTIONS, METRICS, ROOMS, SCHEDULING, SETTINGS, STATE
from server.rooms import Frames, Rooms
from server.service import COMMANDS, Scheduling

log = logging.getLogger(__name__)

RequestId = str | int | None


class Context:
    """What a handler may touch: its connection and the app's services."""

    __slots__ = (
        "conn",
        "max_frame",
        "max_watches",
        "metrics",
        "reauthed",
        "rooms",
        "scheduling",
        "secret",
        "turn",
    )

    def __init__(self, conn: Connection, app: web.Application) -> None:
        self.conn = conn
        # One message at a time, and the token expiry waits its turn like a message.
        self.turn = asyncio.Lock()
        self.reauthed = asyncio.Event()
        self.rooms: Rooms = app[ROOMS]
        self.scheduling: Scheduling = app[SCHEDULING]
        self.secret = app[SETTINGS].jwt_secret
        self.max_watches = app[SETTINGS].max_watches
        self.max_frame = app[SETTINGS].max_frame_bytes
        self.metrics = app[METRICS]


async def on_auth(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, Auth)
    identity = auth.verify(ctx.secret, msg.token)
    conn, before = ctx.conn, ctx.conn.identity
    if before is not None and (before.subject, before.role) != (identity.subject, identity.role):
        # Private rooms were joined as someone else: leave them (public watches stay).
        await leave_private_rooms(ctx)
    conn.identity = identity
    ctx.reauthed.set()
    ctx.conn.send(Authenticated(identity.subject, identity.role, identity.expires_at), rid)


async def leave_private_rooms(ctx: Context) -> list[Unwatched]:
    conn, left = ctx.conn, []
    for doctor_id, member in list(conn.dashboards.items()):
        await ctx.rooms.leave(member)
        left.append(Unwatched(doctor_id, room="dashboard"))
    conn.dashboards.clear()
    if conn.appointments is not None:
        await ctx.rooms.leave_patient(conn.appointments)
        conn.appointments = None
        left.append(Unwatched(room="appointments"))
    return left


async def expire_identity(ctx: Context) -> None:
    """Dashboards and patient rooms carry patient details: they stop when the token does.

    Commands check the token when they run; a room is joined once and then streams,
    so its membership is what has to end. A fresh `auth` before then keeps it.
    """
    while True:
        who = ctx.conn.identity
        wait = None
        if who is not None and who.expires_at is not None:
            wait = max(0.0, (who.expires_at - datetime.now(UTC)).total_seconds())
        try:
            async with asyncio.timeout(wait):
                await ctx.reauthed.wait()
        except TimeoutError:
            async with ctx.turn:
                expired = ctx.conn.identity is who  # not renewed while waiting for the turn
                if expired:
                    left = await leave_private_rooms(ctx)
                    ctx.conn.send_error(
                        auth.AuthError("the token has expired", code=ErrorCode.TOKEN_EXPIRED)
                    )
                    for notice in left:
                        ctx.conn.send(notice)
            if expired:
                await ctx.reauthed.wait()  # until then nothing is left to expire
        ctx.reauthed.clear()


async def on_watch(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, Watch)
    conn = ctx.conn
    old = conn.watches.get(msg.doctor_id)  # a new range replaces it, once that succeeds
    if old is None and len(conn.watches) >= ctx.max_watches:
        raise SlotcastError(
            f"at most {ctx.max_watches} watches per connection", code=ErrorCode.LIMIT_EXCEEDED
        )
    ctx.scheduling.check_range(msg.start, msg.end)
    # Join (and so subscribe) before reading anything: nothing committed after the
    # read can slip between the two.
    member = await ctx.rooms.join(conn, msg.doctor_id)
    try:
        missed = None
        if msg.since is not None:
            missed = await ctx.scheduling.missed(msg.doctor_id, msg.since)
        snapshot = None
        if missed is None:
            snapshot = await ctx.scheduling.snapshot(msg.doctor_id, msg.start, msg.end)
    except BaseException:
        await ctx.rooms.leave(member)
        raise
    if old is not None:  # the new member keeps the room open: no unsubscribe, no gap
        await ctx.rooms.leave(old)
    conn.watches[msg.doctor_id] = member
    conn.seal(msg.doctor_id)  # later deltas must follow the reply, not merge ahead of it
    if snapshot is not None:
        conn.send(snapshot, rid)
        member.start(snapshot.version)
        return
    assert missed is not None
    assert msg.since is not None
    version = missed[-1].version if missed else msg.since
    conn.send(Resumed(msg.doctor_id, msg.since, version), rid)
    for change in missed:
        conn.send_frame(Frames(change).get("availability", conn.codec))
    member.start(version)


async def on_unwatch(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, Unwatch)
    member = ctx.conn.watches.pop(msg.doctor_id, None)
    if member is not None:
        await ctx.rooms.leave(member)
    ctx.conn.send(Unwatched(msg.doctor_id), rid)


async def on_watch_dashboard(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, WatchDashboard)
    conn = ctx.conn
    ctx.scheduling.require_doctor(conn.identity, msg.doctor_id)
    old = conn.dashboards.get(msg.doctor_id)
    if old is None and len(conn.dashboards) >= ctx.max_watches:
        raise SlotcastError(
            f"at most {ctx.max_watches} dashboards per connection", code=ErrorCode.LIMIT_EXCEEDED
        )
    member = await ctx.rooms.join(conn, msg.doctor_id, "dashboard")
    try:
        dashboard = await ctx.scheduling.dashboard(msg.doctor_id, msg.date)
    except BaseException:
        await ctx.rooms.leave(member)
        raise
    if old is not None:
        await ctx.rooms.leave(old)
    conn.dashboards[msg.doctor_id] = member
    watchers = ctx.rooms.watchers(msg.doctor_id)
    member.room.watchers = watchers
    conn.send(replace(dashboard, watchers=watchers), rid)
    member.start(dashboard.version)


async def on_unwatch_dashboard(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, UnwatchDashboard)
    member = ctx.conn.dashboards.pop(msg.doctor_id, None)
    if member is not None:
        await ctx.rooms.leave(member)
    ctx.conn.send(Unwatched(msg.doctor_id, room="dashboard"), rid)


async def on_watch_appointments(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, WatchAppointments)
    conn = ctx.conn
    patient = ctx.scheduling.require_patient(conn.identity)
    if conn.appointments is None:
        conn.appointments = await ctx.rooms.join_patient(conn, patient.subject)
    conn.send(await ctx.scheduling.my_appointments(conn.identity, MyAppointments()), rid)


async def on_unwatch_appointments(ctx: Context, rid: RequestId, msg: Any) -> None:
    assert isinstance(msg, UnwatchAppointments)
    member, ctx.conn.appointments = ctx.conn.appointments, None
    if member is not None:
        await ctx.rooms.leave_patient(member)
    ctx.conn.send(Unwatched(room="appointments"), rid)


async def on_ping(ctx: Context, rid: RequestId, msg: Any) -> None:
    ctx.conn.send(Pong(), rid)


Handler = Callable[[Context, RequestId, Any], Awaitable[None]]
# What only a connection can do; every other message is a command in service.COMMANDS.
HANDLERS: dict[type[Message], Handler] = {
    Auth: on_auth,
    Watch: on_watch,
    Unwatch: on_unwatch,
    WatchDashboard: on_watch_dashboard,
    UnwatchDashboard: on_unwatch_dashboard,
    WatchAppointments: on_watch_appointments,
    UnwatchAppointments: on_unwatch_appointments,
    Ping: on_ping,
}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    settings = app[SETTINGS]
    if app[STATE].draining:
        raise web.HTTPServiceUnavailable(text="draining: reconnect to another instance")
    ws = web.WebSocketResponse(
        protocols=SUBPROTOCOLS,
        heartbeat=settings.heartbeat_s,
        max_msg_size=settings.max_frame_bytes * 4,
        decode_text=False,
        compress=False,  # frames are built once and shared; see server.frames
    )
    await ws.prepare(request)
    codec = codec_for(ws.ws_protocol)
    metrics = app[METRICS]
    conn = Connection(
        ws,
        request.transport,
        codec,
        outbox_limit=settings.outbox_limit,
        on_slow=metrics.slow_consumers.inc,
    )
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
    expiry = asyncio.create_task(expire_identity(ctx), name="token-expiry")
    try:
        async for frame in ws:
            if conn.closing:
                # Closing after the command in flight: a frame pipelined behind it must
                # not run, since its reply could no longer be sent. The client resends.
                break
            if frame.type is WSMsgType.BINARY or (
                frame.type is WSMsgType.TEXT and not codec.binary
            ):
                metrics.messages_in.inc()
                async with ctx.turn:
                    conn.busy = True
                    try:
                        await _handle(ctx, frame.data)
                    finally:
                        conn.command_done()
            elif frame.type is WSMsgType.TEXT:
                conn.send_error(ProtocolError("MessagePack connections send binary frames"))
            elif frame.type is WSMsgType.ERROR:
                log.info("connection error: %s", ws.exception())
    finally:
        expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry
        app[CONNECTIONS].discard(conn)
        for member in conn.watches.values():
            await ctx.rooms.leave(member)
        conn.watches.clear()
        await leave_private_rooms(ctx)
        await conn.close()
    return ws


async def _handle(ctx: Context, data: bytes | str) -> None:
    conn = ctx.conn
    request_id: RequestId = None
    started = time.perf_counter()
    kind_name = "invalid"
    try:
        envelope = conn.codec.decode(data, max_size=ctx.max_frame)
        request_id = envelope.id
        kind = type(envelope.body)
        kind_name = kind.TYPE
        handler = HANDLERS.get(kind)
        if handler is not None:
            await handler(ctx, request_id, envelope.body)
        else:
            reply = await COMMANDS[kind](ctx.scheduling, conn.identity, envelope.body)
            conn.send(reply, request_id)
    except ProtocolError as exc:
        _refuse(ctx, exc, exc.request_id)
    except SlotcastError as exc:
        _refuse(ctx, exc, request_id)
    except Exception:
        log.exception("handler failed")
        _refuse(ctx, SlotcastError("internal error", code=ErrorCode.INTERNAL), request_id)
    finally:
        ctx.metrics.command_latency.labels(kind_name).observe(time.perf_counter() - started)


def _refuse(ctx: Context, error: SlotcastError, request_id: RequestId) -> None:
    ctx.metrics.errors.labels(error.code.value).inc()
    ctx.conn.send_error(error, request_id)
