"""Webhook delivery across real `slotcast serve` processes: one instance delivers to an
endpoint at a time, and when it is killed mid-delivery another resumes from the
endpoint's cursor once the lease has run out; nothing lost, order kept per doctor,
a message sent twice only under the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from protocol.vocabulary import Role
from store import commands
from store.pool import Store
from testkit.fixtures import SeededDoctor, Spawn, token
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
        admin = {"Authorization": f"Bearer {token(Role.ADMIN, 'root')}"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{servers[0].http_url}/api/webhooks", json={"url": receiver.url}, headers=admin
            ) as resp,
        ):
            assert resp.status == 201, await resp.text()
            receiver.secret = (await resp.json())["secret"]
        for slot in doctor.slots[:12]:
            await commands.book_slot(store, slot_id=slot.id, patient_id="alice")
        await eventually(lambda: len(receiver.deliveries) >= 3, what="deliveries under way")
        holder = await store.fetchval("SELECT leased_by FROM webhook_endpoints")
        assert holder in by_name
        await eventually(
            lambda: receiver.requests > len(receiver.deliveries), what="a delivery in flight"
        )
        by_name[holder].stop(signal.SIGKILL)
        await eventually(lambda: len(receiver.distinct()) >= 12, what="all twelve", timeout=30)
        assert await store.fetchval("SELECT leased_by FROM webhook_endpoints") in {
            None,
            *(set(by_name) - {holder}),
        }
        versions = receiver.versions(doctor.id)
        assert len(set(versions)) == 12
        # In order: a version only ever follows a lower one, or repeats (a resend).
        distinct_in_order = list(dict.fromkeys(versions))
        assert distinct_in_order == sorted(distinct_in_order)
        assert receiver.bad_signatures == 0
        senders = await store.fetch("SELECT DISTINCT instance FROM webhook_attempts")
        assert {r["instance"] for r in senders} == set(by_name)  # both took a turn
    finally:
        await receiver.stop()
