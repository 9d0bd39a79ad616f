"""The WebSocket endpoint: handshake, a receive loop, and a dispatch table.

Every inbound frame is decoded and validated by the codec; every failure becomes
an `error` reply with a stable code and the loop goes on, so one bad frame
never costs a client its connection, nor other clients anything.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, Final, TypeVar

from aiohttp import WSMsgType, web

from protocol.codec import SUBPROTOCOLS, RequestId, codec_for
from protocol.errors import ErrorCode, ProtocolError, SlotcastError
from protocol.messages import (
    PROTOCOL,
    Auth,
    Authenticated,
    Message,
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
from server import logs
from server.commands import REGISTRY
from server.connection import Connection
from server.keys import (
    CONNECTIONS,
    GUARD,
    LIMITER,
    METRICS,
    ROOMS,
    SCHEDULING,
    SETTINGS,
    STATE,
    VERIFIER,
)
from server.limits import API_KEY, Throttle, identity_key
from server.room import Frames
from server.session import Session

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[Session, RequestId, M], Awaitable[None]]

# What only a session can do; every other message is a command in server.commands.REGISTRY.
HANDLERS: dict[type[Message], Handler[Any]] = {}


def handles(kind: type[M]) -> Callable[[Handler[M]], Handler[M]]:
    """Register the handler of `kind`: the one place its message type is paired with it.

    The decoder hands over a body of the frame's type, so a handler receives only its
    own message; the type checker holds each registration to that, here and nowhere else.
    """

    def register(handler: Handler[M]) -> Handler[M]:
        if kind in HANDLERS:
            raise ValueError(f"two handlers for {kind.TYPE!r}")
        HANDLERS[kind] = handler
        return handler

    return register


@handles(Auth)
async def on_auth(session: Session, rid: RequestId, msg: Auth) -> None:
    identity = await session.verifier.verify(msg.token)
    logs.identify(identity)
    session.api_key = None  # a token replaces the handshake's key, if there was one
    # Another identity leaves the private rooms joined as the previous one; the client
    # hears which (id null) before the reply, as after a token expiry.
    for notice in await session.authenticate(identity):
        session.conn.send(notice)
    session.conn.send(Authenticated(identity.subject, identity.role, identity.expires_at), rid)


@handles(Watch)
async def on_watch(session: Session, rid: RequestId, msg: Watch) -> None:
    conn, rooms, scheduling = session.conn, session.rooms, session.scheduling
    old = session.watches.get(msg.doctor_id)  # a new range replaces it, once that succeeds
    if old is None and len(session.watches) >= session.max_watches:
        raise SlotcastError(
            f"at most {session.max_watches} watches per connection", code=ErrorCode.LIMIT_EXCEEDED
        )
    scheduling.check_range(msg.start, msg.end)
    # Join (and so subscribe) before reading anything: nothing committed after the
    # read can slip between the two.
    # Presence counts signed-in viewers only: anonymous sockets cannot inflate it.
    viewer = identity_key(session.identity) if session.identity else None
    member = await rooms.join(conn, msg.doctor_id, viewer=viewer)
    try:
        # Neither a resume nor a snapshot may be older than what the member missed
        # before joining (`joined_at`) or than what the client already applied (`since`):
        # a read replica behind either is not asked (server/service.py).
        missed = None
        if msg.since is not None:
            missed = await scheduling.missed(msg.doctor_id, msg.since, member.joined_at)
        snapshot = None
        if missed is None:
            snapshot = await rooms.snapshot(
                member,
                msg.start,
                msg.end,
                read=partial(scheduling.snapshot_at, msg.doctor_id, msg.start, msg.end),
                clock=scheduling.clock,
                at_least=msg.since or 0,
            )
    except BaseException:
        await rooms.leave(member)
        raise
    if old is not None:  # the new member keeps the room open: no unsubscribe, no gap
        await rooms.leave(old)
    session.watches[msg.doctor_id] = member
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


@handles(Unwatch)
async def on_unwatch(session: Session, rid: RequestId, msg: Unwatch) -> None:
    member = session.watches.pop(msg.doctor_id, None)
    if member is not None:
        await session.rooms.leave(member)
    session.conn.send(Unwatched(msg.doctor_id), rid)


@handles(WatchDashboard)
async def on_watch_dashboard(session: Session, rid: RequestId, msg: WatchDashboard) -> None:
    rooms = session.rooms
    session.scheduling.require_doctor(session.identity, msg.doctor_id)
    old = session.dashboards.get(msg.doctor_id)
    if old is None and len(session.dashboards) >= session.max_watches:
        raise SlotcastError(
            f"at most {session.max_watches} dashboards per connection",
            code=ErrorCode.LIMIT_EXCEEDED,
        )
    member = await rooms.join(session.conn, msg.doctor_id, "dashboard")
    try:
        dashboard = await session.scheduling.dashboard(msg.doctor_id, msg.date, member.joined_at)
    except BaseException:
        await rooms.leave(member)
        raise
    if old is not None:
        await rooms.leave(old)
    session.dashboards[msg.doctor_id] = member
    watchers = rooms.watchers(msg.doctor_id)
    member.room.watchers = watchers
    session.conn.send(replace(dashboard, watchers=watchers), rid)
    member.start(dashboard.version)


@handles(UnwatchDashboard)
async def on_unwatch_dashboard(session: Session, rid: RequestId, msg: UnwatchDashboard) -> None:
    member = session.dashboards.pop(msg.doctor_id, None)
    if member is not None:
        await session.rooms.leave(member)
    session.conn.send(Unwatched(msg.doctor_id, room="dashboard"), rid)


@handles(WatchAppointments)
async def on_watch_appointments(session: Session, rid: RequestId, msg: WatchAppointments) -> None:
    patient = session.scheduling.require_patient(session.identity)
    if session.appointments is None:
        session.appointments = await session.rooms.join_patient(session.conn, patient.subject)
    reply = await session.scheduling.my_appointments(patient)
    session.conn.send(reply, rid)


@handles(UnwatchAppointments)
async def on_unwatch_appointments(
    session: Session, rid: RequestId, msg: UnwatchAppointments
) -> None:
    member, session.appointments = session.appointments, None
    if member is not None:
        await session.rooms.leave_patient(member)
    session.conn.send(Unwatched(room="appointments"), rid)


@handles(Ping)
async def on_ping(session: Session, rid: RequestId, msg: Ping) -> None:
    session.conn.send(Pong(), rid)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    settings = app[SETTINGS]
    if app[STATE].draining:
        raise web.HTTPServiceUnavailable(text="draining: reconnect to another instance")
    ws = web.WebSocketResponse(
        protocols=SUBPROTOCOLS,
        # The heartbeat is one sweep over every connection (server.connection.heartbeat),
        # not a timer per socket; the handler answers pings and hears pongs itself.
        heartbeat=None,
        autoping=False,
        max_msg_size=settings.max_frame_bytes * 4,
        decode_text=False,
        compress=False,  # frames are built once and shared; see server.frames
    )
    await ws.prepare(request)
    _shed_http_parser(request)
    # Every line about this connection, from any of its tasks, names it.
    logs.CONNECTION_ID.set(logs.REQUEST_ID.get())
    codec = codec_for(ws.ws_protocol)
    metrics = app[METRICS]
    conn = Connection(
        ws,
        request.transport,
        codec,
        outbox_limit=settings.outbox_limit,
        outbox_bytes=settings.outbox_bytes,
        on_slow=metrics.slow_consumer,
    )
    session = Session(
        conn,
        app[ROOMS],
        app[SCHEDULING],
        metrics,
        verifier=app[VERIFIER],
        max_watches=settings.max_watches,
        max_frame=settings.max_frame_bytes,
    )
    app[CONNECTIONS].add(session)
    throttle = app[LIMITER].throttle(conn, app[GUARD].address(request))
    header_error: SlotcastError | None = None
    try:
        api_key = request.headers.get(API_KEY) or None
        session.identity = await throttle.authenticate(
            request.headers.get("Authorization"), api_key
        )
        if session.identity is not None and session.identity.key is not None:
            session.api_key = api_key
    except SlotcastError as exc:
        header_error = exc  # stay connected as anonymous; tell the client why
    who = session.identity
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
    session.watch_expiry()
    try:
        # `receive()` itself, not `async for`: the iterator's coroutine would be one more
        # frame every idle connection keeps alive (server.memory, bench/connmem.py).
        while (frame := await ws.receive()).type not in _CLOSED:
            if conn.closing:
                # Closing after the command in flight: a frame pipelined behind it must
                # not run, since its reply could no longer be sent. The client resends.
                break
            conn.heard_from(time.monotonic())
            if frame.type is WSMsgType.PING:
                await ws.pong(frame.data)
                continue
            if frame.type is WSMsgType.PONG:
                continue
            if frame.type is WSMsgType.BINARY or (
                frame.type is WSMsgType.TEXT and not codec.binary
            ):
                metrics.messages_in.inc()
                async with session.turn:
                    conn.busy = True
                    try:
                        await _handle(session, frame.data, throttle)
                    finally:
                        conn.command_done()
            elif frame.type is WSMsgType.TEXT:
                conn.send_error(ProtocolError("MessagePack connections send binary frames"))
            elif frame.type is WSMsgType.ERROR:
                log.info("connection error: %s", ws.exception())
            if conn.backed_up():
                # Back-pressure: take no more requests while the client leaves its replies
                # unread, so pipelining cannot queue work (frames wait in the socket).
                await conn.drained()
    finally:
        await session.stop_expiry()
        app[CONNECTIONS].discard(session)
        await session.leave_all()
        await conn.close()
    return ws


def _shed_http_parser(request: web.Request) -> None:
    """Let go of what only parsed HTTP requests, once the socket has been upgraded.

    aiohttp keeps its HTTP request parser and request queue for the connection's life,
    though after the upgrade every byte goes to the WebSocket reader: ~1.5 KiB for each
    socket (bench/connmem.py). Both are private, so this touches them only if they are
    what they were in the aiohttp it was written against (3.11-3.14): a later one that
    changed them just keeps its ~1.5 KiB. aiohttp drops the parser itself at
    connection_lost, and never queues a request on an upgraded connection.
    """
    protocol = request.protocol
    if getattr(protocol, "_upgraded", False) is not True:
        return
    if getattr(protocol, "_payload_parser", None) is None:  # not ours to judge
        return
    if hasattr(protocol, "_parser"):
        protocol._parser = None
    if isinstance(getattr(protocol, "_messages", None), deque) and not protocol._messages:
        protocol._messages = _NO_REQUESTS


_NO_REQUESTS: Final[deque[Any]] = deque(maxlen=0)  # what an upgraded connection has queued

_CLOSED: Final = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})


async def _handle(session: Session, data: bytes | str, throttle: Throttle) -> None:
    conn = session.conn
    request_id: RequestId = None
    started = time.perf_counter()
    kind_name = "invalid"
    outcome = "ok"
    doctor_id: int | None = None
    try:
        try:
            envelope = conn.codec.decode(data, max_size=session.max_frame)
        except ProtocolError as exc:
            request_id = exc.request_id
            await throttle.admit(None, session.identity)  # unreadable frames spend too
            raise
        request_id = envelope.id
        kind = type(envelope.body)
        kind_name = kind.TYPE
        doctor_id = getattr(envelope.body, "doctor_id", None)
        await throttle.admit(envelope.body, session.identity)  # RateLimited if spent
        if session.api_key is not None:  # still valid? (cached: no round trip)
            session.identity = await session.verifier.verify_key(session.api_key)
        handler = HANDLERS.get(kind)
        if handler is not None:
            await handler(session, request_id, envelope.body)
        else:
            reply = await REGISTRY[kind](session.scheduling, session.identity, envelope.body)
            conn.send(reply, request_id)
            if doctor_id is None:  # a booking names its doctor only in the reply
                doctor_id = logs.doctor_of(reply)
    except ProtocolError as exc:
        outcome = _refuse(session, await throttle.refusal(exc), exc.request_id)
    except SlotcastError as exc:
        outcome = _refuse(session, await throttle.refusal(exc), request_id)
    except Exception:
        log.exception("handler failed")
        outcome = _refuse(
            session, SlotcastError("internal error", code=ErrorCode.INTERNAL), request_id
        )
    finally:
        elapsed = time.perf_counter() - started
        session.metrics.command_latency.labels(kind_name).observe(elapsed)
        logs.command_done("ws", kind_name, outcome, elapsed, doctor_id)


def _refuse(session: Session, error: SlotcastError, request_id: RequestId) -> str:
    """Send the error reply; its code is the command's outcome."""
    session.metrics.error(error.code, "ws")
    session.conn.send_error(error, request_id)
    return error.code.value
