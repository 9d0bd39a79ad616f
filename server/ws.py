"""The WebSocket endpoint: the handshake, each socket's frames (`Client`), a dispatch table.

Every inbound frame is decoded and validated by the codec; every failure becomes
an `error` reply with a stable code and the next frame runs, so one bad frame
never costs a client its connection, nor other clients anything.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, Final, TypeVar

from aiohttp import WebSocketError, WSMessage, WSMsgType, web

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
    INBOUND,
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
from server.wire import Upgrade, Wire, detach

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


async def websocket(request: web.Request, address: str) -> web.StreamResponse:
    """The handshake; then the socket is detached (server.wire) and this returns.

    The caller has taken a place for `address` (server.guard): it is this handler's
    to give back if the upgrade fails, and the session's once the socket is detached.
    """
    app = request.app
    settings = app[SETTINGS]
    try:
        if app[STATE].draining:
            raise web.HTTPServiceUnavailable(text="draining: reconnect to another instance")
        ws = Upgrade(
            protocols=SUBPROTOCOLS,
            # The heartbeat is one sweep over every connection (server.connection.heartbeat),
            # not a timer per socket; `Client.frame` answers pings and hears pongs.
            heartbeat=None,
            autoping=False,
            max_msg_size=settings.max_frame_bytes * 4,
            decode_text=False,
            compress=False,  # frames are built once and shared; see server.frames
        )
        await ws.prepare(request)
        # Every line about this connection, from any of its tasks, names it.
        logs.CONNECTION_ID.set(logs.REQUEST_ID.get())
        metrics = app[METRICS]
        conn = Connection(
            request.transport,
            codec_for(ws.ws_protocol),
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
        throttle = app[LIMITER].throttle(conn, address)
        client = Client(app, session, throttle, address)
        client.wire = detach(request, ws, client, max_msg_size=settings.max_frame_bytes * 4)
    except BaseException:
        app[GUARD].release(address)
        raise
    app[CONNECTIONS].add(session)
    try:
        await _greet(request, session, throttle)
    except Exception:
        log.exception("handshake failed")
        conn.close_soon(CLOSE_INTERNAL_ERROR, "internal error")
    finally:
        client.start()  # what the client sent meanwhile waited for the greeting
    return ws


async def _greet(request: web.Request, session: Session, throttle: Throttle) -> None:
    """Who the handshake's credentials say the client is, in a `welcome`."""
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
    conn = session.conn
    conn.send(
        Welcome(
            protocol=PROTOCOL,
            instance=request.app[SETTINGS].instance_id,
            subject=who.subject if who else None,
            role=who.role if who else None,
        )
    )
    if header_error is not None:
        conn.send_error(header_error)
    session.watch_expiry()


class Client:
    """A detached socket's inbound side: its frames, one command at a time, and its end.

    Frames arrive in callbacks (`server.wire.Listener`) and wait in an inbox; a task
    runs them in order while there are any, and ends when there are none, so an idle
    connection has no task at all. While a command runs, or the client's output is
    backed up, its next frames wait (the socket stops being read past `INBOX_FRAMES`):
    pipelining cannot queue work. The end (our close, the client's, or a lost socket)
    runs in that same task after the command in flight: leave the rooms, close the
    socket, give back the connection's place.
    """

    __slots__ = (
        "_address",
        "_app",
        "_context",
        "_ending",
        "_inbox",
        "_paused",
        "_started",
        "_task",
        "session",
        "throttle",
        "wire",
    )

    def __init__(self, app: web.Application, session: Session, throttle: Throttle, address: str):
        self._app = app
        self.session = session
        self.throttle = throttle
        self._address = address
        self._context: contextvars.Context | None = None  # the handshake's, from `start`
        self._inbox: deque[WSMessage | BaseException] = _NO_FRAMES
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._ending = False
        self._paused = False
        # The socket's protocol, once `detach` returns: `_resume` has it parse what a pause
        # left unread.
        self.wire: Wire | None = None
        session.conn.on_end = self._end

    # ---- server.wire.Listener: called from the transport's callbacks ---------------------------

    def frame(self, message: WSMessage) -> None:
        conn = self.session.conn
        if conn.peer_closed:
            return
        conn.heard_from(time.monotonic())
        kind = message.type
        if kind is WSMsgType.PING:
            if conn.backed_up():
                # A pong is output like any reply: behind unread output it waits its turn
                # (`_run`), so a client that pings without reading stops being read
                # rather than have its pongs buffered without end.
                self._queue(message)
            else:
                conn.pong(message.data)
        elif kind is WSMsgType.CLOSE:
            # Answered at once, even behind a command in flight or a close of ours (whose
            # handshake this completes); what the client sent before it no longer runs.
            conn.closed_by_peer()
            self._end()
        elif kind is not WSMsgType.PONG:
            self._queue(message)

    def broken(self, error: BaseException) -> None:
        self._queue(error)  # after the frames that came before it

    def lost(self) -> None:
        self.session.conn.closed_by_peer()
        self._end()

    # ---- the task ----------------------------------------------------------------------------

    def start(self) -> None:
        """The greeting is sent: run what came meanwhile, and what comes next.

        Every task of this connection runs in the handshake's context as it is now (its
        connection id, the subject the greeting found), as the handler's task did.
        """
        self._context = contextvars.copy_context()
        self._started = True
        if self._inbox or self._ending:
            self._kick()

    def _queue(self, item: WSMessage | BaseException) -> None:
        if self._ending:
            return
        if self._inbox is _NO_FRAMES:
            self._inbox = deque()
        self._inbox.append(item)
        if len(self._inbox) >= INBOX_FRAMES:
            self._pause()
        self._kick()

    def _end(self) -> None:
        """Leave the rooms and close, once the command in flight (if any) is done."""
        if not self._ending:
            self._ending = True
            self._kick()

    def _kick(self) -> None:
        if self._task is None and self._started:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="ws-client", context=self._context
            )
            tasks = self._app[INBOUND]
            tasks.add(self._task)
            self._task.add_done_callback(_forget(tasks), context=self._context)

    async def _run(self) -> None:
        conn = self.session.conn
        try:
            while not self._ending:
                if not self._inbox:
                    # Reading again may parse what a pause left unread (`Wire.resume`): new
                    # frames, or the client's close, for this task while it is still set.
                    self._resume()
                    if self._inbox or self._ending:
                        continue
                    self._task = None  # with no await since the check: a new frame starts one
                    self._inbox = _NO_FRAMES  # an empty deque is ~0.6 KiB: idle sockets share one
                    return
                item = self._inbox.popleft()
                if len(self._inbox) < INBOX_FRAMES // 2:
                    self._resume()
                if conn.closing:
                    # Closing after the command in flight: a frame pipelined behind it must
                    # not run, since its reply could no longer be sent. The client resends.
                    continue
                await self._one(item)
                if conn.backed_up():
                    # Back-pressure: take no more requests while the client leaves its
                    # replies unread, so pipelining cannot queue work (frames wait in the
                    # socket).
                    self._pause()
                    await conn.drained()
        except BaseException:
            # A command cancelled by shutdown (it outlived the wait for it), or a failure
            # past `_handle`'s own: the session still ends, or its rooms, socket and place
            # would be kept with no task left to give them back.
            self._ending = True
            raise
        finally:
            if self._ending:
                self._inbox = _NO_FRAMES
                await self._finish()  # `_task` stays set: no task runs after this one

    async def _one(self, item: WSMessage | BaseException) -> None:
        session, conn = self.session, self.session.conn
        if isinstance(item, BaseException):
            log.info("connection error: %s", item)
            code = item.code if isinstance(item, WebSocketError) else CLOSE_PROTOCOL_ERROR
            # aiohttp's reader hears nothing past a broken frame, the client's answer to
            # our close included: `close` must not wait for it (aiohttp did not either).
            conn.peer_closed = True
            conn.close_soon(code, str(item)[:120])
            return
        kind = item.type
        if kind is WSMsgType.PING:  # queued behind unread output (`frame`)
            conn.pong(item.data)
            return
        if kind is WSMsgType.BINARY or (kind is WSMsgType.TEXT and not conn.codec.binary):
            session.metrics.messages_in.inc()
            async with session.turn:
                conn.busy = True
                try:
                    await _handle(session, item.data, self.throttle)
                finally:
                    conn.command_done()
        elif kind is WSMsgType.TEXT:
            conn.send_error(ProtocolError("MessagePack connections send binary frames"))

    async def _finish(self) -> None:
        session = self.session
        self._app[CONNECTIONS].discard(session)  # first: nothing below may skip it
        try:
            await session.stop_expiry()
            await session.leave_all()
        finally:
            try:
                await session.conn.close()
            finally:
                self._app[GUARD].release(self._address)

    # ---- reading ---------------------------------------------------------------------------

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.session.conn.pause_reading()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.session.conn.resume_reading()
            if self.wire is not None:
                self.wire.resume()  # what the last read left unparsed


def _forget(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection task failed", exc_info=task.exception())

    return done


# Frames waiting for the command in flight before the socket stops being read.
INBOX_FRAMES: Final = 32
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INTERNAL_ERROR: Final = 1011

# The inbox of every connection with nothing waiting: always empty (`Client._queue`).
_NO_FRAMES: Final[deque[WSMessage | BaseException]] = deque(maxlen=0)


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
