"""Webhook delivery across real `slotcast serve` processes: one instance delivers to an
endpoint at a time, and when it is killed mid-delivery another resumes from the
endpoint's cursor once the lease has run out; nothing lost, order kept per doctor,
a message sent twice only under the same `webhook-id`. The same with `slotcast
webhooks` workers (SLOTCAST_WEBHOOKS=worker), while the serving instance sends nothing.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from protocol.vocabulary import Role
from store import commands
from store.pool import Store
from testkit.fixtures import SeededDoctor, Spawn, token
from testkit.harness import REPO, ServerProcess, free_port
from testkit.webhooks import Receiver, eventually

pytestmark = pytest.mark.processes

WEBHOOK_ENV = {
    "SLOTCAST_WEBHOOK_ALLOW_PRIVATE": "1",
    "SLOTCAST_WEBHOOK_POLL_S": "0.1",
    "SLOTCAST_WEBHOOK_LEASE_S": "1.5",
    "SLOTCAST_WEBHOOK_TIMEOUT_S": "0.5",
    "SLOTCAST_WEBHOOK_RETRY_BASE_S": "0.1",
    "SLOTCAST_WEBHOOK_RETRY_MAX_S": "0.5",
}


async def test_a_killed_instance_hands_its_endpoint_to_another_that_resumes_from_the_cursor(
    spawn_server: Spawn, store: Store, doctor: SeededDoctor
) -> None:
    receiver = Receiver(delay_s=0.2)  # slow enough to be caught mid-delivery
    await receiver.start()
    try:
        servers = await asyncio.gather(
            *(asyncio.to_thread(spawn_server, n, env=WEBHOOK_ENV) for n in ("wh-a", "wh-b"))
        )
        by_name = {s.name: s for s in servers}
        await register(servers[0], receiver)
        holder = await kill_the_holder_mid_delivery(store, doctor, receiver, by_name)
        assert await store.fetchval("SELECT leased_by FROM webhook_endpoints") in {
            None,
            *(set(by_name) - {holder}),
        }
        assert_all_twelve_in_order(receiver, doctor)
        senders = await store.fetch("SELECT DISTINCT instance FROM webhook_attempts")
        assert {r["instance"] for r in senders} == set(by_name)  # both took a turn
    finally:
        await receiver.stop()


async def register(server: ServerProcess, receiver: Receiver) -> dict[str, Any]:
    """The receiver as an endpoint, through an instance's admin API; its secret kept."""
    admin = {"Authorization": f"Bearer {token(Role.ADMIN, 'root')}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{server.http_url}/api/webhooks", json={"url": receiver.url}, headers=admin
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
    receiver.secret = created["secret"]
    return created


async def kill_the_holder_mid_delivery(
    store: Store, doctor: SeededDoctor, receiver: Receiver, senders: dict[str, ServerProcess]
) -> str:
    """Twelve bookings; the process delivering them is SIGKILLed with one in flight, and
    the rest arrive all the same. Returns the killed process's name."""
    for slot in doctor.slots[:12]:
        await commands.book_slot(store, slot_id=slot.id, patient_id="alice")
    await eventually(lambda: len(receiver.deliveries) >= 3, what="deliveries under way")
    holder = await store.fetchval("SELECT leased_by FROM webhook_endpoints")
    assert holder in senders
    await eventually(
        lambda: receiver.requests > len(receiver.deliveries), what="a delivery in flight"
    )
    senders[holder].stop(signal.SIGKILL)
    await eventually(lambda: len(receiver.distinct()) >= 12, what="all twelve", timeout=30)
    return str(holder)


def assert_all_twelve_in_order(receiver: Receiver, doctor: SeededDoctor) -> None:
    versions = receiver.versions(doctor.id)
    assert len(set(versions)) == 12
    # In order: a version only ever follows a lower one, or repeats (a resend).
    distinct_in_order = list(dict.fromkeys(versions))
    assert distinct_in_order == sorted(distinct_in_order)
    assert receiver.bad_signatures == 0


def spawn_worker(spawn: Spawn, name: str, env: dict[str, str]) -> ServerProcess:
    """A `slotcast webhooks` process with a serving instance's environment and log; the
    fixture stops it (SIGTERM) and prints its log if the test fails, as for `serve`."""
    proc = spawn(name, env=env, start=False)
    with proc.log_path.open("ab") as log:
        proc.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "webhooks"],
            cwd=REPO,
            env=proc.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc


async def test_workers_deliver_instead_of_the_serving_instance_and_take_over_from_a_killed_one(
    spawn_server: Spawn, store: Store, doctor: SeededDoctor
) -> None:
    receiver = Receiver(delay_s=0.2)  # slow enough to be caught mid-delivery
    await receiver.start()
    env = {**WEBHOOK_ENV, "SLOTCAST_WEBHOOKS": "worker"}
    try:
        metrics_ports = {n: free_port() for n in ("wh-worker-a", "wh-worker-b")}
        workers = {
            n: spawn_worker(spawn_server, n, {**env, "SLOTCAST_WEBHOOKS_METRICS_PORT": str(port)})
            for n, port in metrics_ports.items()
        }
        server = await asyncio.to_thread(spawn_server, "wh-serving", env=env)
        created = await register(server, receiver)
        holder = await kill_the_holder_mid_delivery(store, doctor, receiver, workers)
        assert_all_twelve_in_order(receiver, doctor)
        senders = await store.fetch("SELECT DISTINCT instance FROM webhook_attempts")
        # Both workers took a turn; the serving instance, in worker mode, sent nothing.
        assert {r["instance"] for r in senders} == set(workers)
        assert "delivered by `slotcast webhooks` workers" in server.logs()
        # The survivor counts its attempts on its own /metrics (the serving instance cannot).
        (survivor,) = set(workers) - {holder}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{metrics_ports[survivor]}/metrics") as resp,
        ):
            assert resp.status == 200
            exposition = await resp.text()
        attempts = next(
            line
            for line in exposition.splitlines()
            if line.startswith(f'slotcast_webhook_attempts_total{{endpoint="{created["id"]}"}}')
        )
        assert float(attempts.split()[-1]) >= 1
        assert "process_cpu_seconds_total" in exposition
    finally:
        await receiver.stop()
