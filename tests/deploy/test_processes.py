"""Real `slotcast serve` processes: what only a deployment shows.

Cross-instance fan-out through Redis, the `--demo` first run and graceful shutdown
all depend on the CLI, signal handling and process boundaries, which the in-process
app used elsewhere never crosses. Each process start costs a second or two, so each
test starts as few as it can and starts them concurrently where it can.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from client import SlotcastClient
from protocol.codec import JSON
from protocol.vocabulary import SlotStatus
from testkit.fixtures import SeededDoctor, Spawn, token
from testkit.harness import ServerProcess

pytestmark = pytest.mark.processes


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def spawn_many(spawn: Spawn, *names: str, **kw: Any) -> list[ServerProcess]:
    """Start processes side by side: startup dominates this module's runtime."""
    return list(await asyncio.gather(*(asyncio.to_thread(spawn, n, **kw) for n in names)))


async def get_json(http: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with http.get(url, params=params) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_bookings_fan_out_across_instances_through_redis(
    spawn_server: Spawn, redis_url: str, doctor: SeededDoctor, http: aiohttp.ClientSession
) -> None:
    """A watcher must see every booking, whichever instance it and the booker are on."""
    a, b = await spawn_many(spawn_server, "a", "b", broker_url=redis_url)
    async with (
        SlotcastClient.connect(a.ws_url, codec="json") as on_a,
        SlotcastClient.connect(b.ws_url, codec="msgpack") as on_b,
        SlotcastClient.connect(b.ws_url, token=token(sub="p-b")) as patient_on_b,
    ):
        assert (await on_a.welcome()).instance == "a"
        assert (await on_b.welcome()).instance == "b"
        snap_a = await on_a.watch(doctor.id, doctor.start, doctor.end)
        snap_b = await on_b.watch(doctor.id, doctor.start, doctor.end)
        assert snap_a.version == snap_b.version  # one database behind both
        base = snap_a.version

        # Booked over B's WebSocket: B's watcher hears it locally, A's through Redis.
        slot = doctor.slots[0]
        await patient_on_b.book(slot.id)
        for watcher in (on_a, on_b):
            delta = await watcher.next_delta(timeout=5)
            assert delta.version == base + 1
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]

        # Booked over A's REST API: B's watcher hears it through Redis.
        slot = doctor.slots[1]
        async with http.post(
            f"{a.http_url}/api/appointments",
            json={"slot_id": slot.id},
            headers={"Authorization": f"Bearer {token(sub='p-a')}"},
        ) as resp:
            assert resp.status == 201, await resp.text()
        for watcher in (on_b, on_a):
            delta = await watcher.next_delta(timeout=5)
            assert delta.version == base + 2
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]
        assert on_b.calendars[doctor.id].slots[slot.id].status == SlotStatus.BUSY
        assert on_b.calendars[doctor.id].resyncs == 0


async def test_demo_seeds_an_empty_database_once(
    spawn_server: Spawn, database_url: str, http: aiohttp.ClientSession
) -> None:
    """`make run` must show a live calendar on first start and keep bookings on restarts."""
    first = spawn_server("demo-1", database=database_url, args=["--demo"])
    doctors = (await get_json(http, f"{first.http_url}/api/doctors"))["doctors"]
    assert len(doctors) >= 3
    assert len({d["timezone"] for d in doctors}) >= 3
    today = date.today()
    window = {"start": today.isoformat(), "end": (today + timedelta(days=14)).isoformat()}
    free: dict[int, list[int]] = {}
    for d in doctors:
        snapshot = await get_json(http, f"{first.http_url}/api/doctors/{d['id']}/slots", **window)
        assert snapshot["timezone"] == d["timezone"]
        free[d["id"]] = [s["id"] for s in snapshot["slots"] if s["status"] == "free"]
        assert free[d["id"]], f"{d['name']} has no free slots in the next two weeks"

    chosen = free[doctors[0]["id"]][-1]  # the last one: it cannot have started yet
    async with http.post(
        f"{first.http_url}/api/appointments",
        json={"slot_id": chosen},
        headers={"Authorization": f"Bearer {token(sub='p-demo')}"},
    ) as resp:
        assert resp.status == 201, await resp.text()
    assert first.stop() == 0

    # A restart with --demo finds doctors already there: nothing is re-seeded or reset.
    second = spawn_server("demo-2", database=database_url, args=["--demo"])
    again = (await get_json(http, f"{second.http_url}/api/doctors"))["doctors"]
    assert again == doctors
    snapshot = await get_json(
        http, f"{second.http_url}/api/doctors/{doctors[0]['id']}/slots", **window
    )
    assert {s["id"]: s["status"] for s in snapshot["slots"]}[chosen] == "busy"


async def test_sigterm_tells_clients_to_reconnect_closes_1012_and_exits_cleanly(
    spawn_server: Spawn, doctor: SeededDoctor, http: aiohttp.ClientSession
) -> None:
    """A restart moves clients elsewhere gently: readiness fails first, then a reconnect
    notice and 1012 (service restart); a deployment waits on a clean, prompt exit."""
    server = spawn_server("doomed")
    assert server.process is not None
    async with http.ws_connect(server.ws_url, protocols=[JSON.subprotocol]) as ws:
        welcome = orjson.loads((await ws.receive(timeout=5)).data)
        assert welcome["type"] == "welcome"
        # Hold a watch, so shutdown has a room and a subscription to tear down as well.
        watch = {
            "type": "watch",
            "id": "w",
            "body": {
                "doctor_id": doctor.id,
                "start": doctor.start.isoformat(),
                "end": doctor.end.isoformat(),
            },
        }
        await ws.send_str(orjson.dumps(watch).decode())
        snapshot = orjson.loads((await ws.receive(timeout=5)).data)
        assert (snapshot["type"], snapshot["id"]) == ("snapshot", "w")

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Readiness fails first, before any client is closed, so the balancer moves on.
        # (Polled: the signal reaches the server's loop a moment after it is sent.)
        while True:
            async with http.get(f"{server.http_url}/readyz") as ready:
                if ready.status == 503:
                    assert (await ready.json())["reason"] == "draining"
                    break
                assert ready.status == 200
            assert time.monotonic() - started < 5, "readiness never failed"
            await asyncio.sleep(0.01)
        notice = orjson.loads((await ws.receive(timeout=10)).data)
        assert notice["type"] == "reconnect"
        assert notice["body"]["retry_after_ms"] >= 0
        closing = await ws.receive(timeout=10)
        assert closing.type is aiohttp.WSMsgType.CLOSE, closing
        assert closing.data == aiohttp.WSCloseCode.SERVICE_RESTART
        assert ws.close_code == 1012
        code = await asyncio.to_thread(server.process.wait, 10)
        elapsed = time.monotonic() - started
    assert code == 0, server.logs()
    assert elapsed < 5, f"took {elapsed:.1f}s to exit"
