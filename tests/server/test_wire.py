"""A WebSocket after its handshake: detached from aiohttp's handler (server.wire).

aiohttp does the handshake; then the transport is Slotcast's, read by aiohttp's frame
reader, and the handler returns, so an idle socket keeps no request, task or response.
These tests hold what that must not lose: frames sent along with the handshake, the
client's pings and close, our close on shutdown, and the connection's place in the
guard's counts. They also pin the aiohttp internals `detach` relies on, so that an
aiohttp upgrade that moves them fails here rather than in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import cast

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from client import SlotcastClient
from protocol.codec import JSON
from protocol.messages import Book, Ping, Watch
from server import lifecycle
from server.app import create_app
from server.connection import HIGH_WATER
from server.keys import CONNECTIONS, GUARD, INBOUND, ROOMS
from server.session import Session
from server.settings import Settings
from server.wire import Wire
from server.ws import INBOX_FRAMES
from testkit import rawws
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.raw import RawWebSocket, masked_frame
from testkit.wire import eventually

AppClient = TestClient[web.Request, web.Application]

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


async def serve(aiohttp_client: AiohttpClient, settings: Settings) -> AppClient:
    return cast(AppClient, await aiohttp_client(create_app(settings)))


@contextlib.asynccontextmanager
async def welcomed(client: AppClient, pipelined: bytes = b"") -> AsyncIterator[RawWebSocket]:
    """A raw socket past its `welcome` (frames `pipelined` with the handshake come after it)."""
    ws = await raw(client, pipelined)
    try:
        assert (await next_message(ws))["type"] == "welcome"
        yield ws
    finally:
        ws.close()


async def raw(client: AppClient, pipelined: bytes = b"") -> RawWebSocket:
    assert client.server.host is not None
    assert client.server.port is not None
    return await RawWebSocket.connect(
        client.server.host, client.server.port, rcvbuf=1 << 16, pipelined=pipelined
    )


async def next_message(ws: RawWebSocket) -> dict[str, object]:
    opcode, payload = await ws.receive()
    assert opcode == OP_TEXT
    message = JSON.loads(payload)
    assert isinstance(message, dict)
    return message


async def test_an_idle_socket_is_detached_from_aiohttp_and_runs_no_task(
    doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """After the watch's reply, nothing of aiohttp's request machinery is left for the
    socket, nor a task of ours; deltas and commands still flow."""
    client = await serve(aiohttp_client, settings)
    async with SlotcastClient.connect(ws_url(client)) as watcher:
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        (session,) = client.app[CONNECTIONS]
        assert isinstance(session.conn._transport.get_protocol(), Wire)
        server = client.server.handler
        assert server is not None
        await eventually(lambda: not server.connections, "aiohttp forgets the socket")
        await eventually(lambda: not client.app[INBOUND], "no task for an idle socket")
        await watcher.ping()  # and the socket still works
        await eventually(lambda: not client.app[INBOUND], "the ping's task is gone too")
    await eventually(lambda: not client.app[CONNECTIONS], "the session ends with the socket")
    assert client.app[GUARD].total == 0, "its place is given back"


async def test_frames_sent_with_the_handshake_are_run_in_order_after_the_welcome(
    settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """A client may pipeline frames behind its upgrade request: aiohttp parses them before
    the socket is detached, and none may be lost or overtaken."""
    client = await serve(aiohttp_client, settings)
    frames = b"".join(
        masked_frame(JSON.dumps({"type": "ping", "id": i, "body": {}})) for i in (1, 2, 3)
    )
    async with welcomed(client, pipelined=frames) as ws:
        replies = [await next_message(ws) for _ in range(3)]
        assert [(r["type"], r["id"]) for r in replies] == [("pong", 1), ("pong", 2), ("pong", 3)]


async def test_a_clients_ping_is_answered_and_its_close_gets_1000_and_ends_the_session(
    settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    client = await serve(aiohttp_client, settings)
    async with welcomed(client) as ws:
        await ws.send(masked_frame(b"are you there", OP_PING))
        assert await ws.receive() == (OP_PONG, b"are you there")
        await ws.send(masked_frame(struct.pack("!H", 1000) + b"bye", OP_CLOSE))
        opcode, payload = await ws.receive()
        assert (opcode, payload[:2]) == (OP_CLOSE, struct.pack("!H", 1000))
        assert await ws.at_eof(), "the server closes the socket after the handshake"
    await eventually(lambda: not client.app[CONNECTIONS], "the session ends")
    assert client.app[GUARD].total == 0
    assert not client.app[INBOUND]


async def test_on_shutdown_a_detached_socket_is_closed_with_1001(
    settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """aiohttp's shutdown no longer knows the socket: ours closes it, handshake and all."""
    client = await serve(aiohttp_client, settings)
    async with welcomed(client) as ws:
        app = client.app
        closing = asyncio.create_task(app.shutdown())  # what a SIGTERM's runner cleanup runs
        opcode, payload = await ws.receive()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, 1001)
        await ws.send(masked_frame(payload[:2], OP_CLOSE))  # the client answers
        await closing
        assert await ws.at_eof()
        assert not app[CONNECTIONS]
        assert not app[INBOUND]


# ---- a second look: commands in flight, pipelining, broken frames, back-pressure ------------
#
# A command held in flight by a row lock the test owns: the booking's `FOR UPDATE` of its slot
# waits until the test lets go, so "the socket went away during a command" is not a race.
# The lock and statement bounds are lifted, so that a slow machine cannot fail the booking.


def patient_waits(settings: Settings) -> Settings:
    return replace(
        settings, lock_timeout_ms=60_000, statement_timeout_ms=60_000, db_timeout_ms=60_000
    )


async def watching_and_booking(
    client: AppClient, doctor: SeededDoctor, sub: str
) -> tuple[rawws.RawSocket, Session]:
    """A patient watching `doctor`, whose booking of the first slot is now in flight."""
    assert client.server.port is not None
    ws = await rawws.connect(client.server.port, token=token(sub=sub))
    assert (await next_frame(ws))["type"] == "welcome"
    await ws.send(JSON.encode(Watch(doctor.id, doctor.start, doctor.end), 1))
    assert (await next_frame(ws))["type"] == "snapshot"
    (session,) = client.app[CONNECTIONS]
    await ws.send(JSON.encode(Book(slot_id=doctor.slots[0].id), 2))
    await eventually(lambda: session.conn.busy, "the booking is in flight")
    return ws, session


@contextlib.asynccontextmanager
async def booking_in_flight(
    client: AppClient, db: asyncpg.Connection, doctor: SeededDoctor, sub: str
) -> AsyncIterator[tuple[rawws.RawSocket, Session]]:
    """`watching_and_booking`, the booking held by a row lock until the block ends."""
    async with db.transaction():
        await db.execute("SELECT 1 FROM slots WHERE id = $1 FOR UPDATE", doctor.slots[0].id)
        yield await watching_and_booking(client, doctor, sub)


async def next_frame(ws: rawws.RawSocket) -> dict[str, object]:
    opcode, payload = await ws.receive()
    assert opcode == OP_TEXT
    message = JSON.loads(payload)
    assert isinstance(message, dict)
    return message


async def everything_let_go(app: web.Application) -> None:
    """The session is over: no session, room, task or guard place is left of it."""
    await eventually(lambda: not app[CONNECTIONS], "the session ends")
    await eventually(lambda: not app[INBOUND], "its task ends")
    assert len(app[ROOMS]) == 0, "its rooms are left (and so closed)"
    assert app[GUARD].total == 0, "its place is given back"


async def test_a_socket_lost_during_a_command_is_cleaned_up_once_the_command_is_done(
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    settings: Settings,
    aiohttp_client: AiohttpClient,
) -> None:
    client = await serve(aiohttp_client, patient_waits(settings))
    async with booking_in_flight(client, db, doctor, "p-lost") as (ws, session):
        ws.abort()
        await eventually(lambda: session.conn.peer_closed, "the server hears the socket go")
        assert session in client.app[CONNECTIONS], "the command in flight is not cut short"
    await everything_let_go(client.app)
    status = await db.fetchval("SELECT status FROM slots WHERE id = $1", doctor.slots[0].id)
    assert status != "free", "the booking the client sent was made"


async def test_a_client_closing_during_a_command_gets_1000_at_once_and_is_cleaned_up_after(
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    settings: Settings,
    aiohttp_client: AiohttpClient,
) -> None:
    client = await serve(aiohttp_client, patient_waits(settings))
    async with booking_in_flight(client, db, doctor, "p-close") as (ws, session):
        await ws.send(struct.pack("!H", 1000), OP_CLOSE)
        assert await ws.close_frame(timeout=5) == (1000, "")
        assert session.conn.busy, "answered while the booking is still in flight"
    await everything_let_go(client.app)
    assert await ws.reader.read() == b"", "then the server closes the socket"
    await ws.aclose()


async def test_more_pipelined_frames_than_the_inbox_holds_are_all_answered_in_order(
    settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """Reading pauses when the inbox is full and resumes as it empties: nothing is lost."""
    client = await serve(aiohttp_client, replace(settings, rate_connection="1000/10 seconds"))
    async with welcomed(client) as ws:
        n = INBOX_FRAMES * 6
        await ws.send(b"".join(masked_frame(JSON.encode(Ping(), i)) for i in range(n)))
        replies = [await next_message(ws) for _ in range(n)]
        assert [(r["type"], r["id"]) for r in replies] == [("pong", i) for i in range(n)]
        (session,) = client.app[CONNECTIONS]
        await eventually(lambda: not client.app[INBOUND], "the task ends with the inbox empty")
        assert session.conn._transport.is_reading(), "and reading is resumed"
    await everything_let_go(client.app)


@pytest.mark.parametrize(
    ("broken", "code"),
    [
        # A header announcing a text frame far over the limit: refused before its payload.
        (struct.pack("!BBQ", 0x80 | OP_TEXT, 0x80 | 127, 1 << 30) + b"mask", 1009),
        (masked_frame(b"", 0x3), 1002),  # a reserved opcode
    ],
    ids=["too-big", "protocol-error"],
)
async def test_a_broken_frame_closes_after_the_replies_to_the_frames_before_it(
    broken: bytes,
    code: int,
    settings: Settings,
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp's reader stops at a broken frame and hears nothing after it, the client's
    close answer included: the server closes at once instead of waiting for it."""
    caplog.set_level(logging.INFO, logger="server.connection")
    client = await serve(aiohttp_client, settings)
    async with welcomed(client) as ws:
        pings = b"".join(masked_frame(JSON.encode(Ping(), i)) for i in (1, 2, 3))
        await ws.send(pings + broken)
        replies = [await next_message(ws) for _ in range(3)]
        assert [(r["type"], r["id"]) for r in replies] == [("pong", 1), ("pong", 2), ("pong", 3)]
        opcode, payload = await ws.receive()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, code)
        assert await ws.at_eof()
    await everything_let_go(client.app)
    assert "no close frame from the client" not in caplog.text


async def test_a_client_that_pings_without_reading_is_not_read_either(
    settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """Pongs are output like any reply: once they back up, the server stops reading the
    client's frames, so a ping flood cannot make it buffer pongs without end."""
    client = await serve(aiohttp_client, settings)
    ws = await raw(client)
    flood: asyncio.Task[None] | None = None
    try:
        assert (await next_message(ws))["type"] == "welcome"
        (session,) = client.app[CONNECTIONS]
        conn = session.conn
        # Loopback would otherwise absorb megabytes of pongs in the kernel (test_memory.py).
        conn._transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        flood = asyncio.create_task(ws.send(masked_frame(b"p" * 125, OP_PING) * 32_000))  # 4 MiB
        await eventually(conn.backed_up, "the pongs back up")
        await eventually(lambda: not conn._transport.is_reading(), "reading is paused")
        assert conn.pending() < 4 * HIGH_WATER, "the pongs held are bounded"
    finally:
        ws.close()
        if flood is not None:
            flood.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await flood
    await everything_let_go(client.app)


async def test_on_shutdown_a_command_in_flight_is_answered_before_the_1001(
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    settings: Settings,
    aiohttp_client: AiohttpClient,
) -> None:
    client = await serve(aiohttp_client, patient_waits(settings))
    app = client.app
    async with db.transaction():
        await db.execute("SELECT 1 FROM slots WHERE id = $1 FOR UPDATE", doctor.slots[0].id)
        ws, session = await watching_and_booking(client, doctor, "p-shutdown")
        closing = asyncio.create_task(app.shutdown())
        await eventually(lambda: session.conn.ending, "the close waits for the booking")
    replies = []
    opcode, payload = await ws.receive()
    while opcode == OP_TEXT:  # the booking's reply, and maybe its availability delta
        replies.append(JSON.loads(payload))
        opcode, payload = await ws.receive()
    assert ("booked", 2) in [(r["type"], r.get("id")) for r in replies]
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, 1001)
    await ws.send(payload[:2], OP_CLOSE)
    await closing
    assert await ws.reader.read() == b""
    await ws.aclose()
    assert not app[CONNECTIONS]
    assert not app[INBOUND]
    assert app[GUARD].total == 0


async def test_a_command_that_outlives_shutdowns_wait_is_cancelled_and_the_session_still_ends(
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    settings: Settings,
    aiohttp_client: AiohttpClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shutdown waits a bounded time for commands in flight, then cancels their tasks: the
    session must end all the same (rooms left, place given back, socket closed)."""
    monkeypatch.setattr(lifecycle, "CLOSE_HANDSHAKE_S", 0.0)  # time only: wait 0.1 s, not 7 s
    monkeypatch.setattr(lifecycle, "DRAIN_SLACK_S", 0.1)
    client = await serve(aiohttp_client, patient_waits(settings))
    app = client.app
    async with db.transaction():
        await db.execute("SELECT 1 FROM slots WHERE id = $1 FOR UPDATE", doctor.slots[0].id)
        ws, _ = await watching_and_booking(client, doctor, "p-cancelled")
        closing = asyncio.create_task(app.shutdown())
        assert await ws.close_frame(timeout=5) == (1001, "server shutdown")
        await ws.send(struct.pack("!H", 1001), OP_CLOSE)
        await closing
        assert await ws.reader.read() == b""
        await ws.aclose()
        assert not app[CONNECTIONS]
        assert not app[INBOUND]
        assert len(app[ROOMS]) == 0
        assert app[GUARD].total == 0


async def test_frames_read_in_one_go_are_parsed_only_as_far_as_the_inbox_takes_them(
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    settings: Settings,
    aiohttp_client: AiohttpClient,
) -> None:
    """aiohttp's reader parses a whole read at once: 64 KiB of empty frames would be ~10,000
    parsed frames waiting behind a command. Past a pause, the rest waits as bytes."""
    client = await serve(aiohttp_client, patient_waits(settings))
    async with db.transaction():
        await db.execute("SELECT 1 FROM slots WHERE id = $1 FOR UPDATE", doctor.slots[0].id)
        ws, session = await watching_and_booking(client, doctor, "p-burst")
        transport = session.conn._transport
        wire = transport.get_protocol()
        ws.writer.write(masked_frame(b"") * 10_000)  # in one write
        await ws.writer.drain()
        await eventually(lambda: not transport.is_reading(), "reading is paused")
        inbox = len(wire._listener._inbox)
        assert INBOX_FRAMES <= inbox < 10 * INBOX_FRAMES
    await ws.aclose()
    await everything_let_go(client.app)


async def test_a_broken_frame_sent_with_the_handshake_closes_after_the_frames_before_it(
    settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """aiohttp's handshake reader may already have failed on it: that is handed over too."""
    client = await serve(aiohttp_client, settings)
    async with welcomed(
        client, pipelined=masked_frame(JSON.encode(Ping(), 1)) + masked_frame(b"", 0x3)
    ) as ws:
        assert (await next_message(ws))["type"] == "pong"
        opcode, payload = await ws.receive()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, 1002)
        assert await ws.at_eof()
    await everything_let_go(client.app)


async def test_a_close_handshake_cut_short_by_shutdown_still_closes_the_socket(
    settings: Settings, aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that does not answer our 1001 is still waited for when shutdown's own wait
    ends and cancels the task: the socket must be closed all the same."""
    monkeypatch.setattr(lifecycle, "CLOSE_HANDSHAKE_S", 0.0)  # time only: wait 0.1 s, not 7 s
    monkeypatch.setattr(lifecycle, "DRAIN_SLACK_S", 0.1)
    client = await serve(aiohttp_client, settings)
    app = client.app
    async with welcomed(client) as ws:
        (session,) = app[CONNECTIONS]
        closing = asyncio.create_task(app.shutdown())
        opcode, payload = await ws.receive()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, 1001)
        await closing  # without an answer from the client
        assert session.conn._transport.is_closing()
        assert await ws.at_eof()
    assert not app[CONNECTIONS]
    assert app[GUARD].total == 0
