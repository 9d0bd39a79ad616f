"""Memory bounded in bytes: clients that never read, and replies capped in size.

The hostile clients here are raw sockets (`testkit.raw`): a library client would
read for them, and the server's output would pile up in the test instead. Each
pipelines `watch` frames and reads nothing. The server must stop reading its
requests once a little output is pending (back-pressure), keep what it holds for
it under `SLOTCAST_OUTBOX_BYTES`, close it with 4008 even though it answers pings,
let go of the bytes, and meanwhile serve ordinary clients on the same instance as
if nothing happened. tests/unit/test_outbox.py pins the exact rules with a fake
transport. The last tests hold the size of a snapshot, a dashboard, a REST slots
read and a day of a schedule to their settings.

Tests that serve an app list the database fixtures (`doctor`, `settings`) before
the app's client, so the app and its pool close before the database is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import time, timedelta
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.codec import JSON
from protocol.errors import ErrorCode
from protocol.messages import DayOverride, Delta, WeeklyBlock
from protocol.vocabulary import Role
from server import connection
from server.app import create_app
from server.connection import HIGH_WATER, Connection
from server.keys import CONNECTIONS
from server.settings import Settings
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.raw import RawWebSocket, masked_frame
from testkit.wire import WAIT_S, error_code, eventually, expect

AppClient = TestClient[web.Request, web.Application]

PIPELINED = 1000  # watch frames each attacker sends at once


async def serve(aiohttp_client: AiohttpClient, settings: Settings) -> AppClient:
    return cast(AppClient, await aiohttp_client(create_app(settings)))


async def scrape(client: AppClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def metric(client: AppClient, name: str, **labels: str) -> float:
    return (await scrape(client)).get((name, frozenset(labels.items())), 0.0)


@contextlib.asynccontextmanager
async def attacker(client: AppClient) -> AsyncIterator[tuple[RawWebSocket, Connection]]:
    """A raw socket that upgraded and will never read, and the server's side of it.

    The server's kernel send buffer is made small, as the client's receive buffer is,
    so the server's writes back up into its transport after a few kilobytes rather than
    after the megabytes loopback autotuning would otherwise absorb.
    """
    before = {s.conn for s in client.app[CONNECTIONS]}
    assert client.server.host is not None
    assert client.server.port is not None
    raw = await RawWebSocket.connect(client.server.host, client.server.port)
    try:
        await eventually(lambda: len(client.app[CONNECTIONS]) > len(before), "the session")
        (server,) = [s.conn for s in client.app[CONNECTIONS] if s.conn not in before]
        server._transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        yield raw, server
    finally:
        raw.close()


def watches(doctor: SeededDoctor, count: int) -> bytes:
    """`count` pipelined watches of the doctor's whole range: a ~14 kB snapshot each."""
    body = {
        "doctor_id": doctor.id,
        "start": doctor.start.isoformat(),
        "end": doctor.end.isoformat(),
    }
    return b"".join(
        masked_frame(JSON.dumps({"type": "watch", "id": i, "body": body})) for i in range(count)
    )


async def keep_answering(raw: RawWebSocket) -> None:
    """Pongs every 100 ms: the server always hears from this client, which reads nothing."""
    with contextlib.suppress(OSError):
        while True:
            await raw.pong()
            await asyncio.sleep(0.1)


async def test_a_client_that_pipelines_watches_and_never_reads_is_bounded_then_closed(
    doctor: SeededDoctor,
    settings: Settings,
    aiohttp_client: AiohttpClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,000 pipelined watches would be ~14 MB of snapshots. The server reads a few, stops
    reading while the replies sit unread, holds well under the byte limit for the socket,
    closes it as stalled (4008) although it answers pings past the heartbeat's deadline,
    aborts it, and ordinary clients get every delta meanwhile."""
    monkeypatch.setattr(connection, "ABORT_AFTER_S", 0.5)
    settings = settings.replace(
        heartbeat_s=1.0,
        slow_consumer_s=2.5,
        outbox_sweep_s=0.1,
        max_active_per_doctor=10,  # one patient books several slots of one doctor below
    )
    client = await serve(aiohttp_client, settings)
    url = ws_url(client)
    async with (
        attacker(client) as (raw, server),
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-mem")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        pongs = asyncio.create_task(keep_answering(raw))
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, server.pending())
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.wait_for(raw.send(watches(doctor, PIPELINED)), WAIT_S)
            await eventually(server.backed_up, "the attacker's output to back up")
            watched = await metric(client, "slotcast_command_seconds_count", type="watch")
            # Ordinary clients are served while the attacker waits: every booking's delta.
            for slot in doctor.slots[:3]:
                await patient.book(slot.id)
            versions = [(await expect(watcher, Delta)).version for _ in range(3)]
            assert versions == [snapshot.version + 1, snapshot.version + 2, snapshot.version + 3]
            # Back-pressure: the attacker's requests are not being read any more.
            assert await metric(client, "slotcast_command_seconds_count", type="watch") == watched
            assert watched < 60, "the server kept reading requests whose replies sat unread"
            assert await metric(client, "slotcast_backed_up_connections") == 1
            outbox = await metric(client, "slotcast_outbox_bytes")
            assert outbox >= HIGH_WATER

            await eventually(lambda: server.ending, "the stalled client to be closed", 10)
            assert await metric(client, "slotcast_slow_consumers_total", reason="stalled") == 1
            transport = server._transport
            await eventually(
                lambda: transport.is_closing() and transport.get_write_buffer_size() == 0,
                "the stalled client's bytes to be let go",
            )
            # It answered to the end: its pongs stop only when the server drops it.
            await eventually(pongs.done, "the attacker's socket to be reset")
        finally:
            for task in (sampler, pongs):
                task.cancel()
            await asyncio.gather(sampler, pongs, return_exceptions=True)
        assert HIGH_WATER <= peak <= settings.outbox_bytes, peak
        await eventually(lambda: server not in {s.conn for s in client.app[CONNECTIONS]}, "gone")
        assert await metric(client, "slotcast_outbox_bytes") == 0
        assert await metric(client, "slotcast_backed_up_connections") == 0
        # The ordinary clients never noticed.
        await patient.book(doctor.slots[3].id)
        assert (await expect(watcher, Delta)).version == snapshot.version + 4
        assert await metric(client, "slotcast_slow_consumers_total", reason="bytes") == 0


async def test_when_the_server_budget_is_spent_the_biggest_client_is_closed(
    doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """Under SLOTCAST_SERVER_OUTBOX_BYTES the instance as a whole is bounded: the client
    holding the most is closed first, and the one that reads keeps its connection."""
    settings = settings.replace(
        server_outbox_bytes=HIGH_WATER // 2, slow_consumer_s=60.0, outbox_sweep_s=0.1
    )
    client = await serve(aiohttp_client, settings)
    url = ws_url(client)
    async with (
        attacker(client) as (raw, server),
        SlotcastClient.connect(url) as watcher,
        SlotcastClient.connect(url, token=token(sub="p-budget")) as patient,
    ):
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        await asyncio.wait_for(raw.send(watches(doctor, 100)), WAIT_S)
        await eventually(lambda: server.ending, "the biggest client to be closed")
        assert await metric(client, "slotcast_slow_consumers_total", reason="budget") == 1
        assert await metric(client, "slotcast_slow_consumers_total", reason="stalled") == 0
        await patient.book(doctor.slots[0].id)
        assert (await expect(watcher, Delta)).version == snapshot.version + 1
        assert await metric(client, "slotcast_slow_consumers_total", reason="budget") == 1


# ---- the size of a reply -----------------------------------------------------------------


async def test_snapshots_rest_reads_and_dashboards_are_capped_in_slots(
    doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """The seeded doctor has 20 slots a day. With a cap of 20, one day is served (the
    limit is inclusive) and two are `invalid`, on a watch and over REST; a dashboard of
    a day with 40 slots is refused too. A refused watch leaves the old one in place."""
    client = await serve(aiohttp_client, settings.replace(max_snapshot_slots=20))
    url = ws_url(client)
    one_day, two_days = doctor.start + timedelta(days=1), doctor.start + timedelta(days=2)
    async with SlotcastClient.connect(url, token=token(Role.DOCTOR, str(doctor.id))) as doc:
        snapshot = await doc.watch(doctor.id, doctor.start, one_day)
        assert len(snapshot.slots) == 20
        with pytest.raises(ClientError) as caught:
            await doc.watch(doctor.id, doctor.start, two_days)
        assert caught.value.code is ErrorCode.INVALID
        assert "more than 20 slots" in caught.value.message
        (session,) = client.app[CONNECTIONS]
        assert doctor.id in session.watches  # the first watch still stands

        path = f"/api/doctors/{doctor.id}/slots"
        async with client.get(path, params={"start": str(doctor.start), "end": str(one_day)}) as r:
            assert r.status == 200
            assert len((await r.json())["slots"]) == 20
        async with client.get(path, params={"start": str(doctor.start), "end": str(two_days)}) as r:
            assert await error_code(r, 422) == "invalid"

        assert len((await doc.watch_dashboard(doctor.id, doctor.start)).slots) == 20
        weekly = [WeeklyBlock(d, time(8), time(18)) for d in range(1, 8)]
        await doc.set_schedule(doctor.id, weekly, slot_minutes=15, horizon_days=9)
        with pytest.raises(ClientError) as caught:
            await doc.watch_dashboard(doctor.id, doctor.start)
        assert caught.value.code is ErrorCode.INVALID
        assert "more than 20 slots" in caught.value.message


async def test_a_schedule_opening_more_than_the_daily_cap_is_invalid(
    doctor: SeededDoctor, client: AppClient
) -> None:
    """Five-minute slots around the clock (287 a day) are refused by default (144), on
    the WebSocket and over REST, whether by weekly blocks or by a date's overrides; the
    message names the day and the limit, and nothing changes."""
    url = ws_url(client)
    doctor_token = token(Role.DOCTOR, str(doctor.id))
    around_the_clock = [WeeklyBlock(3, time(0), time(23, 55))]
    async with SlotcastClient.connect(url, token=doctor_token) as doc:
        with pytest.raises(ClientError) as caught:
            await doc.set_schedule(doctor.id, around_the_clock, slot_minutes=5)
        assert caught.value.code is ErrorCode.INVALID
        assert caught.value.message == (
            "weekday 3 would open 287 slots: a schedule opens at most 144 slots a day"
        )
        day = doctor.start + timedelta(days=3)
        overrides = [DayOverride(day, time(0), time(12)), DayOverride(day, time(12), time(23))]
        with pytest.raises(ClientError) as caught:
            await doc.set_schedule(doctor.id, [], overrides, slot_minutes=5)
        assert caught.value.message.startswith(f"{day.isoformat()} would open 276 slots")
        # At the limit it is accepted: five-minute slots for twelve hours.
        updated = await doc.set_schedule(
            doctor.id, [WeeklyBlock(3, time(6), time(18))], slot_minutes=5, horizon_days=9
        )
        assert updated.opened >= 144  # at least one whole Wednesday

    body = {"weekly": [{"weekday": 1, "start": "00:00:00", "end": "23:55:00"}], "slot_minutes": 5}
    async with client.put(
        f"/api/doctors/{doctor.id}/schedule",
        json=body,
        headers={"Authorization": f"Bearer {doctor_token}"},
    ) as resp:
        assert await error_code(resp, 422) == "invalid"


async def test_the_memory_census_is_served_only_when_the_benchmark_asks_for_it(
    doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """bench/connmem.py names where a connection's bytes go through /debug/memory; a
    server started without SLOTCAST_DEBUG_MEMORY has no such route. The census counts
    what a watching connection keeps alive, Slotcast's own objects among them."""
    paths = {r.canonical for r in create_app(settings).router.resources()}
    assert "/debug/memory" not in paths
    client = await serve(aiohttp_client, settings.replace(debug_memory=True))
    async with client.get("/debug/memory?mark=1") as resp:
        assert resp.status == 200
        assert await resp.json() == {"marked": True, "tracing": False}
    async with SlotcastClient.connect(ws_url(client)) as watcher:
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        async with client.get("/debug/memory?top=100000") as resp:
            grown = await resp.json()
    kinds = {name: count for name, count, _ in grown["types"]}
    assert kinds.get("server.connection.Connection") == 1
    assert kinds.get("server.session.Session") == 1
    assert "lines" not in grown  # tracemalloc only when asked (`trace=1`)
