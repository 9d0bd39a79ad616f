"""`slotcast serve` when PostgreSQL or Redis is not there: starting, running, stopping.

- Start-up waits for each dependency (capped, jittered backoff, up to
  `SLOTCAST_STARTUP_WAIT_S`), says once what it waits for (host and port, never
  the password), then gives up with one ERROR line and exit code 1: no traceback.
  A dependency that turns up in time is simply used; SIGTERM stops the wait.
- A PostgreSQL restart under a running instance costs requests `unavailable`,
  logs no traceback and no error, and the instance is ready again by itself.
- SIGTERM with PostgreSQL frozen still ends the process in bounded time.

Real processes, because exit codes and what reaches the log are the point.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from client import SlotcastClient
from store.pool import open_store
from testkit.fixtures import SeededDoctor, Spawn, seed_doctor, token
from testkit.harness import (
    UNLIMITED,
    ControlledPostgres,
    RedisServer,
    ServerProcess,
    free_port,
)

pytestmark = pytest.mark.processes

WAIT_S = 1.5  # SLOTCAST_STARTUP_WAIT_S in the tests that give up
FAST_DRAIN = {"SLOTCAST_DRAIN_GRACE_S": "0.2"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def start_failing(proc: ServerProcess, timeout: float = 30) -> float:
    """Start a process that must exit by itself; how long it ran."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with"):
        proc.start(timeout=timeout)
    assert proc.process is not None
    proc.process.wait(5)
    return time.monotonic() - started


def lines(proc: ServerProcess, level: str) -> list[str]:
    return [line for line in proc.logs().splitlines() if f" {level} " in line]


def assert_one_clear_line(proc: ServerProcess, *, names: str, secret: str) -> None:
    assert proc.process is not None
    assert proc.process.returncode == 1
    logs = proc.logs()
    errors = lines(proc, "ERROR")
    assert len(errors) == 1, logs
    assert "cannot start: " in errors[0]
    assert names in errors[0]
    assert f"did not answer within {WAIT_S:g} s" in errors[0]
    assert logs.count(f"waiting up to {WAIT_S:g} s for {names}") == 1, logs
    assert "Traceback" not in logs
    assert "athrow" not in logs
    assert secret not in logs


def test_start_up_with_postgres_down_waits_then_exits_with_one_line(spawn_server: Spawn) -> None:
    port = free_port()  # nothing listens there
    proc = spawn_server(
        "no-db",
        database=f"postgresql://slotcast:hunter2@127.0.0.1:{port}/slotcast",
        env={"SLOTCAST_STARTUP_WAIT_S": str(WAIT_S)},
        start=False,
    )
    ran = start_failing(proc)
    assert ran >= WAIT_S  # it waited
    assert_one_clear_line(proc, names=f"PostgreSQL at 127.0.0.1:{port}", secret="hunter2")


def test_start_up_with_redis_down_waits_then_exits_with_one_line(spawn_server: Spawn) -> None:
    port = free_port()
    proc = spawn_server(
        "no-redis",
        broker_url=f"redis://:hunter2@127.0.0.1:{port}/0",
        env={"SLOTCAST_STARTUP_WAIT_S": str(WAIT_S)},
        start=False,
    )
    ran = start_failing(proc)
    assert ran >= WAIT_S
    assert_one_clear_line(proc, names=f"Redis at 127.0.0.1:{port}", secret="hunter2")


def test_start_up_uses_redis_that_turns_up_while_it_waits(
    spawn_server: Spawn, tmp_path: Path
) -> None:
    redis = RedisServer(free_port(), tmp_path)
    proc = spawn_server(
        "late-redis",
        broker_url=redis.url,
        env={"SLOTCAST_STARTUP_WAIT_S": "30"},
        start=False,
    )
    later = threading.Timer(1.5, redis.start)
    later.start()
    try:
        proc.start(timeout=30)  # returns once its /readyz answers 200
        logs = proc.logs()
        assert f"waiting up to 30 s for Redis at 127.0.0.1:{redis.port}" in logs
        assert f"Redis at 127.0.0.1:{redis.port} answers" in logs
        assert " ERROR " not in logs
    finally:
        later.join()
        proc.stop()
        redis.stop()


async def test_sigterm_while_waiting_stops_start_up(spawn_server: Spawn) -> None:
    proc = spawn_server(
        "stopped-early",
        database=f"postgresql://slotcast@127.0.0.1:{free_port()}/slotcast",
        env={"SLOTCAST_STARTUP_WAIT_S": "60"},
        start=False,
    )
    starting = asyncio.create_task(asyncio.to_thread(start_failing, proc, 60))
    deadline = time.monotonic() + 20
    while "waiting up to 60 s" not in proc.logs():
        assert time.monotonic() < deadline, proc.logs()
        await asyncio.sleep(0.05)
    assert proc.process is not None
    signalled = time.monotonic()
    proc.process.send_signal(signal.SIGTERM)
    await starting
    assert time.monotonic() - signalled < 3
    assert proc.process.returncode == 0
    logs = proc.logs()
    assert "stopped while starting" in logs
    assert " ERROR " not in logs
    assert "Traceback" not in logs


@pytest.fixture
async def doctor_on_cluster(cluster: ControlledPostgres) -> SeededDoctor:
    async with open_store(cluster.dsn(), min_size=1, max_size=2) as store:
        return await seed_doctor(store)


async def test_a_postgres_restart_under_a_running_instance_costs_only_unavailable(
    spawn_server: Spawn,
    cluster: ControlledPostgres,
    doctor_on_cluster: SeededDoctor,
    http: aiohttp.ClientSession,
) -> None:
    doctor = doctor_on_cluster
    # One patient books slot after slot through the restart: the outage is under test, not
    # what one patient may claim nor how fast (tests of their own).
    uncapped = {
        **UNLIMITED,
        "SLOTCAST_MAX_ACTIVE_PER_DOCTOR": "1000000",
        "SLOTCAST_MAX_ACTIVE_TOTAL": "1000000",
    }
    proc = await asyncio.to_thread(spawn_server, "restarted", database=cluster.dsn(), env=uncapped)
    url = f"{proc.http_url}/api/appointments"
    outcomes: list[str] = []
    stop = asyncio.Event()

    async def bookings(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            slot = doctor.slots[(11 * i + n) % len(doctor.slots)]
            headers = {
                "Authorization": f"Bearer {token(sub=f'p{i}')}",
                "Idempotency-Key": f"k{i}-{n}",
            }
            async with http.post(url, json={"slot_id": slot.id}, headers=headers) as resp:
                body = await resp.json()
                outcomes.append("ok" if resp.status == 201 else body["error"]["code"])
            await asyncio.sleep(0.01)

    workers = [asyncio.create_task(bookings(i)) for i in range(2)]
    await asyncio.sleep(0.3)
    await asyncio.to_thread(cluster.restart)
    deadline = time.monotonic() + 15
    # Answered again: booked, or the slot was taken by then (the slots run out).
    while len(outcomes) <= 4 or "unavailable" in outcomes[-4:]:
        assert time.monotonic() < deadline, outcomes[-20:]
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*workers)
    async with http.get(f"{proc.http_url}/readyz") as resp:
        assert resp.status == 200  # ready again by itself
    assert "unavailable" in outcomes
    assert not [o for o in outcomes if o not in {"ok", "unavailable", "slot_taken"}]
    logs = proc.logs()
    assert "Traceback" not in logs
    assert " ERROR " not in logs
    assert "unexpected database error" not in logs


async def test_sigterm_with_postgres_frozen_still_exits_in_bounded_time(
    spawn_server: Spawn, cluster: ControlledPostgres, doctor_on_cluster: SeededDoctor
) -> None:
    """Leaving rooms, the outbox's last publishes and closing the pool all wait on the
    database; each is bounded, and so is the whole (SLOTCAST_SHUTDOWN_TIMEOUT_S)."""
    doctor = doctor_on_cluster
    proc = await asyncio.to_thread(
        spawn_server, "frozen-exit", database=cluster.dsn(), env=FAST_DRAIN
    )
    async with SlotcastClient.connect(proc.ws_url) as watcher:
        await watcher.watch(doctor.id, doctor.start, doctor.end)
        with cluster.frozen_for():
            assert proc.process is not None
            signalled = time.monotonic()
            proc.process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(proc.process.wait, 20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running 20 s after SIGTERM:\n{proc.logs()}")
            took = time.monotonic() - signalled
    assert code == 0
    # Drain (0.2 s grace, the watcher's close) plus at most the 10 s closing bound.
    assert took < 12, f"took {took:.1f} s"
    logs = proc.logs()
    assert "drained 1 connections" in logs
    assert "Traceback" not in logs
    assert " ERROR " not in logs
