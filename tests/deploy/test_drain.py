"""Draining an instance: the command in flight finishes and is answered, nothing after it runs."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import asyncpg
import orjson
import pytest

from protocol.codec import JSON
from store.constants import LOCK_NS_DOCTOR
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
