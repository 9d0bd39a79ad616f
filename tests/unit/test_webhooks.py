"""The pure parts of webhook delivery: which addresses a webhook may reach, how long a
retry waits, what a change becomes on the wire, and that its signature is what the
Standard Webhooks library verifies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from server.settings import Settings
from server.webhook_worker import work
from server.webhooks import (
    GuardedResolver,
    RefusedAddress,
    backoff_s,
    delivery_mode,
    headers_for,
    public_address,
    retry_after,
)
from store.webhooks import KNOWN_EVENTS, Endpoint, Message, event_types, new_secret

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("0.0.0.0", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("224.0.0.1", False),
    ],
)
def test_only_public_addresses_are_reachable(address: str, public: bool) -> None:
    assert public_address(address) is public


def test_backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    for failures in range(8):
        step = min(60.0, 1.0 * 2**failures)
        delay = backoff_s(failures, base_s=1.0, cap_s=60.0, retry_after_s=None)
        assert step / 2 <= delay <= step
    assert backoff_s(0, base_s=1.0, cap_s=60.0, retry_after_s=30) == 30
    assert backoff_s(0, base_s=1.0, cap_s=60.0, retry_after_s=3600) == 60  # capped
    assert backoff_s(10**6, base_s=1.0, cap_s=60.0, retry_after_s=None) <= 60


def test_retry_after_is_seconds_or_an_http_date() -> None:
    assert retry_after("120", NOW) == 120
    assert retry_after("Tue, 01 Dec 2026 09:01:00 GMT", NOW) == 60
    assert retry_after("Tue, 01 Dec 2026 08:00:00 GMT", NOW) == 0
    assert retry_after("soon", NOW) is None
    assert retry_after(None, NOW) is None


def test_every_change_kind_has_an_event_type_and_repeats_collapse() -> None:
    assert event_types(["hold.expired", "slot.booked"]) == [
        "appointment.expired",
        "appointment.booked",
    ]
    assert event_types(["schedule.changed", "slots.opened", "slots.opened"]) == [
        "schedule.updated",
        "slots.opened",
    ]
    assert {"appointment.booked", "appointment.noshow", "schedule.updated"} <= KNOWN_EVENTS


def endpoint(**kw: Any) -> Endpoint:
    fields: dict[str, Any] = {
        "id": 1,
        "url": "https://records.example/hook",
        "description": "",
        "event_types": [],
        "doctor_ids": [],
        "secret": new_secret(),
        "previous_secret": None,
        "previous_until": None,
        "enabled": True,
        "disabled_reason": None,
        "created_at": NOW,
        "updated_at": NOW,
        "failing_since": None,
        "failures": 0,
        "next_attempt_at": None,
    }
    return Endpoint(**{**fields, **kw})


RECORD = {
    "doctor_id": 7,
    "version": 42,
    "public": {"doctor_id": 7, "version": 42, "slots": [], "removed": []},
    "private": {
        "kind": ["hold.expired", "slot.booked"],
        "actor": "patient:alice",
        "appointments": [{"id": 1, "patient_id": "alice", "status": "booked"}],
    },
    "created_at": NOW,
}


def test_a_message_is_the_change_as_documented_and_the_same_bytes_every_time() -> None:
    message = Message.of_record(RECORD)  # type: ignore[arg-type]
    assert message.id == "msg_d7v42"
    assert message.event_type == "appointment.booked"
    assert message.body == Message.of_record(RECORD).body  # type: ignore[arg-type]
    assert message.body.startswith(b'{"type":"appointment.booked","timestamp":"2026-12-01T09:00')


def test_signatures_verify_with_the_library_with_either_secret_during_an_overlap() -> None:
    old, new = new_secret(), new_secret()
    now = datetime.now(UTC)  # the library refuses timestamps five minutes off
    ep = endpoint(secret=new, previous_secret=old, previous_until=now + timedelta(hours=1))
    message = Message.of_record(RECORD)  # type: ignore[arg-type]
    headers = headers_for(ep, message, now)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(message.body, headers)["data"]["version"] == 42
    after = endpoint(secret=new, previous_secret=old, previous_until=now - timedelta(seconds=1))
    assert len(headers_for(after, message, now)["webhook-signature"].split(" ")) == 1


def test_a_kept_signer_signs_with_the_secret_it_was_made_for_after_a_rotation() -> None:
    """Signers are kept per secret (not per endpoint): once rotated, a message is signed
    with the new secret only, and a receiver holding the old one refuses it."""
    old, new = new_secret(), new_secret()
    now = datetime.now(UTC)
    message = Message.of_record(RECORD)  # type: ignore[arg-type]
    before = headers_for(endpoint(secret=old), message, now)
    after = headers_for(endpoint(secret=new), message, now)
    assert before["webhook-signature"] != after["webhook-signature"]
    assert Webhook(new).verify(message.body, after)["data"]["version"] == 42
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(message.body, after)
    assert headers_for(endpoint(secret=old), message, now) == before  # kept, same bytes


def test_filters_pick_event_types() -> None:
    assert endpoint().wants(["slot.blocked"])
    picky = endpoint(event_types=["appointment.cancelled"])
    assert picky.wants(["appointment.booked", "appointment.cancelled"])
    assert not picky.wants(["appointment.booked"])


async def test_the_resolver_refuses_a_name_that_points_inward_when_connecting() -> None:
    """Checked on the addresses actually used, so a name re-pointed after registration
    (DNS rebinding) is refused too."""
    resolver = GuardedResolver()
    try:
        with pytest.raises(RefusedAddress):
            await resolver.resolve("localhost", 80)
        with pytest.raises(RefusedAddress):
            await resolver.resolve("127.0.0.1", 80)
    finally:
        await resolver.close()


def test_a_blocked_range_carries_its_reasons_and_other_messages_keep_their_bytes() -> None:
    """A reason is for the clinic's systems; a message without one is byte for byte what
    it was before reasons existed (a replay sends the very same body)."""
    before = Message.of_record(RECORD)  # type: ignore[arg-type]
    assert b'"blocks"' not in before.body
    blocks = [{"slot_id": 9, "reason": "training day"}]
    private = {"kind": ["slots.blocked"], "actor": "doctor:7", "blocks": blocks}
    record = {**RECORD, "private": private}
    message = Message.of_record(record)  # type: ignore[arg-type]
    assert message.event_type == "slots.blocked"
    assert orjson.loads(message.body)["data"]["blocks"] == blocks


def test_the_delivery_mode_is_inline_or_worker_and_anything_else_is_refused_by_name() -> None:
    assert delivery_mode(Settings()) == "inline"
    assert delivery_mode(Settings(webhooks="worker")) == "worker"
    with pytest.raises(ValueError, match="SLOTCAST_WEBHOOKS='workers': use one of inline, worker"):
        delivery_mode(Settings(webhooks="workers"))


async def test_a_worker_refuses_to_start_without_a_database_url_or_with_an_unknown_mode() -> None:
    # The embedded PostgreSQL belongs to one serving instance: a worker cannot share it.
    assert await work(Settings(database_url=None, webhooks="worker")) == 2
    assert await work(Settings(database_url="postgresql://h/db", webhooks="off")) == 2
