"""Webhooks end to end: endpoints registered over REST, deliveries to real HTTP receivers,
every signature verified with the Standard Webhooks library (testkit/webhooks.py).

What is held: each doctor's changes arrive in version order, nothing is lost when a
receiver fails, hangs or goes away for a while, a duplicate always has the same
`webhook-id` and body, a slow endpoint never holds up a healthy one, a rotated
secret signs beside the old one, and a disabled endpoint keeps its backlog. Short
backoffs and timeouts come from the settings, so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks import Webhook

from protocol.vocabulary import Role
from server.settings import Settings
from server.webhooks import Dispatcher
from store import commands, webhooks
from store.lifecycle import Retention, erase_patient, prune
from store.pool import Store
from testkit.fixtures import SeededDoctor, seed_doctor, token
from testkit.webhooks import Receiver, eventually

AppClient = TestClient[web.Request, web.Application]
ADMIN = {"Authorization": f"Bearer {token(Role.ADMIN, 'root')}"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(
        webhook_allow_private=True,
        webhook_poll_s=0.05,
        webhook_retry_base_s=0.05,
        webhook_retry_max_s=0.2,
        webhook_timeout_s=0.5,
        webhook_lease_s=3.0,
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def register(client: AppClient, receiver: Receiver, **fields: Any) -> dict[str, Any]:
    resp = await client.post("/api/webhooks", json={"url": receiver.url, **fields}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    created: dict[str, Any] = await resp.json()
    receiver.secret = created["secret"]
    return created


async def book(store: Store, doctor: SeededDoctor, slots: range, patient: str = "alice") -> None:
    for i in slots:
        await commands.book_slot(store, slot_id=doctor.slots[i].id, patient_id=patient)


async def test_each_doctors_changes_arrive_signed_and_in_order(
    client: AppClient, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    other = await seed_doctor(store, name="Dr. Other")
    created = await register(client, receiver, event_types=["appointment.booked"])
    assert created["secret"].startswith("whsec_")
    for i in range(6):  # interleaved, so the two doctors' backlogs overlap
        await book(store, doctor, range(i, i + 1))
        await book(store, other, range(i, i + 1), patient="bob")
    await eventually(lambda: len(receiver.deliveries) >= 12, what="12 deliveries")
    assert receiver.bad_signatures == 0
    for seeded in (doctor, other):
        versions = receiver.versions(seeded.id)
        assert versions == sorted(versions)
        assert len(set(versions)) == 6
    first = receiver.deliveries[0].payload
    assert first["type"] == "appointment.booked"
    assert first["timestamp"].endswith("Z")
    (appointment,) = first["data"]["appointments"]
    assert appointment["status"] == "booked"
    assert appointment["patient_id"] in {"alice", "bob"}
    assert first["data"]["doctor_id"] in {doctor.id, other.id}
    assert receiver.deliveries[0].id.startswith("msg_")
    # A doctor created later is followed from its first version; the kinds the endpoint
    # did not ask for (its slots opening) move the cursor without a request.
    await seed_doctor(store, name="Dr. Later")

    async def caught_up() -> bool:
        return (await webhooks.backlog(store))[created["id"]] == (0, 0.0)

    await eventually(caught_up, what="the unwanted changes skipped")
    assert len(receiver.deliveries) == 12
    # The secret is shown once: never in a listing or a read.
    listed = await (await client.get("/api/webhooks", headers=ADMIN)).json()
    assert "secret" not in listed["endpoints"][0]


async def test_a_failing_hanging_then_absent_receiver_loses_nothing(
    client: AppClient, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    created = await register(client, receiver)
    receiver.fail_next, receiver.retry_after = 3, "0"
    receiver.hang_next = 1  # past the 0.5 s timeout
    await book(store, doctor, range(3))
    await eventually(lambda: len(receiver.deliveries) >= 1, what="the first delivery")
    await receiver.stop()  # away for a while, with changes piling up
    await book(store, doctor, range(3, 6))
    attempts_url = f"/api/webhooks/{created['id']}/attempts"

    async def refused() -> bool:  # the dispatcher tried the closed port
        log = (await (await client.get(attempts_url, headers=ADMIN)).json())["attempts"]
        return any(a["status"] is None and "Connect" in a["error"] for a in log)

    await eventually(refused, what="an attempt against the absent receiver")
    await receiver.start()
    await eventually(lambda: len(receiver.distinct()) >= 6, what="all six, after recovery")
    assert receiver.versions(doctor.id) == sorted(receiver.versions(doctor.id))
    assert len(receiver.distinct()) == 6  # duplicates only as the same id and body

    async def written() -> bool:  # cursors and attempts are written in batches
        return (await webhooks.backlog(store))[created["id"]] == (0, 0.0)

    await eventually(written, what="the cursors written")
    log = (await (await client.get(attempts_url, headers=ADMIN)).json())["attempts"]
    failed = [a for a in log if not a["ok"]]
    assert any(a["status"] == 500 for a in failed)
    assert any(a["status"] is None and "no answer" in a["error"] for a in failed)
    assert all(a["latency_ms"] >= 0 for a in log)
    metrics = await (await client.get("/metrics")).text()
    assert f'slotcast_webhook_failures_total{{endpoint="{created["id"]}"}}' in metrics
    # Attempts are pruned with the rest, after their own retention.
    keep_none = Retention(webhook_attempts=timedelta(0))
    pruned = await prune(store, keep_none, now=datetime.now(UTC) + timedelta(seconds=1))
    assert pruned.counts["webhook_attempts"] == len(log)


async def test_a_slow_endpoint_never_holds_up_a_healthy_one(
    client: AppClient, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    slow = Receiver(delay_s=0.3)
    await slow.start()
    try:
        await register(client, slow)
        await register(client, receiver)
        await book(store, doctor, range(8))
        await eventually(lambda: len(receiver.deliveries) >= 8, what="the healthy endpoint")
        assert len(slow.deliveries) < 8  # still working through its backlog
        await eventually(lambda: len(slow.deliveries) >= 8, what="the slow endpoint, later")
        assert slow.bad_signatures == receiver.bad_signatures == 0
    finally:
        await slow.stop()


async def test_doctors_are_sent_side_by_side_each_one_in_order(
    client: AppClient,
    settings: Settings,
    store: Store,
    doctor: SeededDoctor,
    receiver: Receiver,
    aiohttp_client: Any,
) -> None:
    from server.app import create_app

    # A held message must not time out (and be sent again) while the test looks.
    patient = settings.replace(webhook_timeout_s=10.0, webhook_lease_s=30.0)
    await client.close()  # one dispatcher only: this one
    client = await aiohttp_client(create_app(patient))
    other = await seed_doctor(store, name="Dr. Other")
    created = await register(client, receiver, event_types=["appointment.booked"])
    receiver.held_doctor = doctor.id  # its first message is answered only when released
    await book(store, doctor, range(3))
    await eventually(lambda: receiver.in_flight.get(doctor.id) == 1, what="the held message")
    await book(store, other, range(4), patient="bob")
    # The other doctor's messages overlap the held one in flight, all of them through.
    await eventually(lambda: len(receiver.versions(other.id)) == 4, what="the other doctor's")
    assert receiver.in_flight[doctor.id] == 1
    assert receiver.versions(doctor.id) == []  # its next waits for its first
    receiver.release.set()
    await eventually(lambda: len(receiver.versions(doctor.id)) == 3, what="the held doctor's")
    for seeded in (doctor, other):
        versions = receiver.versions(seeded.id)
        assert versions == sorted(versions)
        assert receiver.most_in_flight[seeded.id] == 1  # one message per doctor at a time
    assert receiver.bad_signatures == 0

    async def recorded() -> bool:  # attempts and cursors are written in batches
        return (await webhooks.backlog(store))[created["id"]] == (0, 0.0)

    await eventually(recorded, what="the cursors written")
    attempts = await store.fetch("SELECT message_id FROM webhook_attempts WHERE ok")
    assert len(attempts) == len({a["message_id"] for a in attempts}) == 7
    # Delivery has connections of its own, apart from the booking pool.
    assert await store.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'slotcast-webhooks'"
    )


async def test_a_rotated_secret_signs_beside_the_old_one(
    client: AppClient, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    created = await register(client, receiver)
    old = created["secret"]
    await book(store, doctor, range(1))
    await eventually(lambda: len(receiver.deliveries) == 1, what="a delivery")
    resp = await client.post(f"/api/webhooks/{created['id']}/rotate", headers=ADMIN)
    rotated = await resp.json()
    new = rotated["secret"]
    assert new != old
    assert rotated["rotation_overlap_until"] is not None
    await book(store, doctor, range(1, 2))  # the receiver still holds the old secret
    await eventually(lambda: len(receiver.deliveries) == 2, what="a delivery after rotation")
    assert receiver.bad_signatures == 0
    last = receiver.deliveries[-1]
    assert len(last.signature.split(" ")) == 2
    for secret in (old, new):  # either secret verifies the same delivery
        assert Webhook(secret).verify(last.body, last.headers()) == last.payload
    receiver.secret = new
    await book(store, doctor, range(2, 3))
    await eventually(lambda: len(receiver.deliveries) == 3, what="verified with the new one")
    assert receiver.bad_signatures == 0


async def test_a_disabled_endpoint_keeps_its_backlog_until_enabled_again(
    client: AppClient, settings: Settings, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    created = await register(client, receiver)
    url = f"/api/webhooks/{created['id']}"
    receiver.fail_next = 10**6  # failing for good
    await book(store, doctor, range(2))

    # settings.webhook_disable_after_s is long: disable by hand, as an admin would.
    await eventually(lambda: receiver.requests >= 2, what="some failed attempts")
    resp = await client.patch(url, json={"enabled": False}, headers=ADMIN)
    assert (await resp.json())["disabled_reason"] == "disabled by an admin"
    requests = receiver.requests
    await book(store, doctor, range(2, 4))  # while disabled: kept
    assert not (await (await client.get(url, headers=ADMIN)).json())["enabled"]
    waiting, oldest = (await webhooks.backlog(store))[created["id"]]
    assert waiting >= 3  # the one that failed, and the two booked since
    assert oldest > 0
    assert receiver.requests <= requests + 1  # at most the one already on its way
    receiver.fail_next = 0
    resp = await client.patch(url, json={"enabled": True}, headers=ADMIN)
    assert (await resp.json())["enabled"] is True
    await eventually(lambda: len(receiver.distinct()) >= 4, what="the backlog, delivered")
    assert receiver.versions(doctor.id) == sorted(receiver.versions(doctor.id))


async def test_an_endpoint_failing_past_the_period_is_disabled_with_its_backlog(
    client: AppClient,
    settings: Settings,
    store: Store,
    doctor: SeededDoctor,
    receiver: Receiver,
    aiohttp_client: Any,
) -> None:
    from server.app import create_app

    quick = await aiohttp_client(create_app(settings.replace(webhook_disable_after_s=0.3)))
    await client.close()  # one dispatcher only
    created = await register(quick, receiver)
    url = f"/api/webhooks/{created['id']}"
    receiver.fail_next = 10**6
    await book(store, doctor, range(2))
    state: dict[str, Any] = {}

    async def poll() -> bool:
        state.update(await (await quick.get(url, headers=ADMIN)).json())
        return not state["enabled"]

    await eventually(poll, what="the endpoint disabled")
    assert state["enabled"] is False
    assert state["disabled_reason"].startswith("failing since")
    receiver.fail_next = 0
    await quick.patch(url, json={"enabled": True}, headers=ADMIN)
    await eventually(lambda: len(receiver.distinct()) >= 2, what="the kept backlog")


async def test_a_replay_sends_a_time_range_again_with_the_same_ids(
    client: AppClient, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    created = await register(client, receiver)
    since = datetime.now(UTC)  # after the doctor was seeded
    await book(store, doctor, range(3))
    await eventually(lambda: len(receiver.deliveries) >= 3, what="three deliveries")
    first = [d.id for d in receiver.deliveries]
    body = {"since": since.isoformat(), "until": (datetime.now(UTC) + timedelta(1)).isoformat()}
    resp = await client.post(f"/api/webhooks/{created['id']}/replay", json=body, headers=ADMIN)
    assert resp.status == 202
    assert (await resp.json())["queued"] == 3
    await eventually(lambda: len(receiver.deliveries) >= 6, what="the replay")
    assert [d.id for d in receiver.deliveries[3:]] == first


async def test_erasure_reaches_messages_not_yet_sent(
    client: AppClient, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    created = await register(client, receiver)
    url = f"/api/webhooks/{created['id']}"
    await client.patch(url, json={"enabled": False}, headers=ADMIN)
    await book(store, doctor, range(2), patient="carol")
    erased = await erase_patient(store, "carol")
    assert erased.total > 0
    await client.patch(url, json={"enabled": True}, headers=ADMIN)
    await eventually(lambda: len(receiver.deliveries) >= 2, what="the backlog")
    for d in receiver.deliveries:
        assert b"carol" not in d.body
        assert d.payload["data"]["appointments"][0]["patient_id"].startswith("erased-")


async def test_only_an_admin_manages_endpoints_and_private_urls_are_refused(
    client: AppClient, settings: Settings, aiohttp_client: Any, receiver: Receiver
) -> None:
    from server.app import create_app

    doctor_token = {"Authorization": f"Bearer {token(Role.DOCTOR, '1')}"}
    resp = await client.post("/api/webhooks", json={"url": receiver.url}, headers=doctor_token)
    assert resp.status == 403
    resp = await client.get("/api/webhooks")
    assert resp.status == 401
    resp = await client.post(
        "/api/webhooks", json={"url": receiver.url, "event_types": ["nope"]}, headers=ADMIN
    )
    assert resp.status == 422
    assert (await client.get("/api/webhooks/999", headers=ADMIN)).status == 404
    strict = await aiohttp_client(create_app(settings.replace(webhook_allow_private=False)))
    for url in (receiver.url, "http://localhost/x", "http://[::1]/x", "http://169.254.169.254/"):
        resp = await strict.post("/api/webhooks", json={"url": url}, headers=ADMIN)
        assert resp.status == 422, url
        assert (await resp.json())["error"]["code"] == "invalid"
    resp = await strict.post("/api/webhooks", json={"url": "ftp://example.com/"}, headers=ADMIN)
    assert resp.status == 422


async def test_a_stopped_deliverer_writes_what_was_answered_before_letting_go(
    settings: Settings, store: Store, doctor: SeededDoctor, receiver: Receiver
) -> None:
    """Cursors and attempts are written before each read and otherwise only every
    quarter second; a deliverer stopped in between (SIGTERM) writes what its receivers
    had answered before it gives the lease back, so none of it is sent again."""
    ep = await webhooks.create_endpoint(
        store, url=receiver.url, description="", event_types=[], doctor_ids=[], max_endpoints=5
    )
    receiver.secret = ep.secret
    await book(store, doctor, range(3))
    answered: list[bool] = []
    dispatcher = Dispatcher(
        store, settings, on_attempt=lambda endpoint_id, ok: answered.append(ok), linger=True
    )
    running = asyncio.create_task(dispatcher.run())
    await eventually(lambda: len(answered) >= 3, what="three answers")
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert answered == [True, True, True]
    assert (await webhooks.backlog(store))[ep.id] == (0, 0.0)
    attempts = await webhooks.attempts(store, ep.id, limit=10)
    assert sorted(a["version"] for a in attempts) == sorted(receiver.versions(doctor.id))
    assert len(attempts) == 3
    assert all(a["ok"] for a in attempts)
    lease = await store.fetchrow("SELECT leased_by FROM webhook_endpoints WHERE id = $1", ep.id)
    assert lease["leased_by"] is None  # given back, for another instance at once
