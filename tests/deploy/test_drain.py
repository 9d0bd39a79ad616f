"""Draining an instance: the command in flight finishes and is answered, nothing after it runs."""

from __future__ import annotations

import asyncio
import signal
import struct
import time

import aiohttp
import asyncpg
import orjson
import pytest

from protocol.codec import JSON
from store.constants import LOCK_NS_DOCTOR
from testkit import rawws
from testkit.fixtures import SeededDoctor, Spawn, token

pytestmark = pytest.mark.processes


def book(request_id: str, slot_id: int) -> str:
    return orjson.dumps({"type": "book", "id": request_id, "body": {"slot_id": slot_id}}).decode()


async def test_a_command_pipelined_behind_the_one_in_flight_does_not_run(
    spawn_server: Spawn, doctor: SeededDoctor, database_url: str
) -> None:
    """A reply that can no longer be sent must belong to a command that never ran,
    so the client may resend it elsewhere without booking twice."""
    server = spawn_server(
        "draining",
        env={
            "SLOTCAST_DRAIN_GRACE_S": "0.2",
            "SLOTCAST_LOCK_TIMEOUT_MS": "10000",
            "SLOTCAST_STATEMENT_TIMEOUT_MS": "10000",
        },
    )
    assert server.process is not None
    first, second = doctor.slots[0].id, doctor.slots[1].id
    # Hold the doctor's lock so the first booking is still in flight when SIGTERM lands.
    locker = await asyncpg.connect(database_url)
    held = locker.transaction()
    await held.start()
    await locker.execute(
        "SELECT pg_advisory_xact_lock($1::int4, $2::int4)", LOCK_NS_DOCTOR, doctor.id
    )
    headers = {"Authorization": f"Bearer {token(sub='p-1')}"}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(server.ws_url, protocols=[JSON.subprotocol], headers=headers) as ws,
    ):
        assert orjson.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
        await ws.send_str(book("A", first))
        await ws.send_str(book("B", second))  # queued behind A on the same connection
        await asyncio.sleep(0.3)  # A waits on the lock; B sits in the receive buffer
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # past the drain grace: the close waits for A
        await held.rollback()
        await locker.close()
        received = []
        while (frame := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:
            message = orjson.loads(frame.data)
            received.append((message["type"], message["id"]))
        assert ws.close_code == 1012
    assert ("booked", "A") in received, received
    assert not any(rid == "B" for _, rid in received), received
    assert await asyncio.to_thread(server.process.wait, 15) == 0
    conn = await asyncpg.connect(database_url)
    try:
        booked = [r["slot_id"] for r in await conn.fetch("SELECT slot_id FROM appointments")]
    finally:
        await conn.close()
    assert booked == [first]  # B never ran


async def test_the_process_waits_for_each_close_handshake_before_it_exits(
    spawn_server: Spawn, doctor: SeededDoctor
) -> None:
    """1012 tells a client to reconnect elsewhere at once; it must arrive as a close frame
    and a clean close, not as a reset. A client may answer the close frame a little late
    (a busy page, a slow network), and a client still sending when the server closes gets
    a reset that can destroy the close frame it has not read yet (so it sees 1006): the
    server closes each socket only once the client's close frame is in, and the process
    waits for those handshakes (up to a bound) before it exits."""
    server = spawn_server("draining", env={"SLOTCAST_DRAIN_GRACE_S": "0.2"})
    assert server.process is not None
    slow = await rawws.connect(server.port)
    prompt = await rawws.connect(server.port)
    silent = await rawws.connect(server.port)
    try:
        for ws in (slow, prompt, silent):
            assert orjson.loads((await ws.receive())[1])["type"] == "welcome"
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for ws in (slow, prompt, silent):
            _, notice = await ws.receive()  # the reconnect notice comes first
            assert orjson.loads(notice)["type"] == "reconnect"
            assert await ws.close_frame(timeout=10) == (1012, "service restart")
        await prompt.send(struct.pack("!H", 1012), rawws.CLOSE)
        assert await asyncio.wait_for(prompt.reader.read(), 5) == b""  # closed once answered

        await asyncio.sleep(1.5)  # the slow client thinks; the server must still be there
        assert server.process.poll() is None, "the process exited before the handshake"
        await slow.send(b"", rawws.PING)  # still sending: a reset would show here...
        await slow.send(struct.pack("!H", 1012), rawws.CLOSE)
        assert await asyncio.wait_for(slow.reader.read(), 5) == b""  # ...a clean FIN instead

        # The one that never answers holds the exit up only so long.
        assert await asyncio.to_thread(server.process.wait, 15) == 0
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"took {elapsed:.1f}s to exit"
        assert await asyncio.wait_for(silent.reader.read(), 5) == b""
    finally:
        for ws in (slow, prompt, silent):
            await ws.aclose()
    logs = server.logs()
    assert "Traceback" not in logs, logs
    assert logs.count("no close frame from the client in 5s: cut off") == 1, logs
