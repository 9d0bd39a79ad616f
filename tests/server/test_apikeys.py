"""API keys, booking on a patient's behalf and patients by name, against the real server.

A key is made by an admin over REST and shown once; the database holds its hash only;
it works on REST and on the WebSocket upgrade within its scopes and its doctor, stops
when revoked (here at once, on other instances within the cache's lifetime) or expired,
and wrong keys spend the address's sign-in failures like wrong tokens. Whoever acts for
a patient (the doctor, an admin, a key) books under that patient's limits, the patient's
own room sees it live, and the change log names both. A token's `name` is stored with
the appointment, shown on the dashboard and sent in webhooks, and erasure clears it.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from client import ClientError, SlotcastClient
from protocol.errors import ErrorCode
from protocol.messages import AppointmentEvent
from protocol.vocabulary import Role
from server.app import create_app
from server.keys import API_KEYS
from server.settings import Settings
from store import apikeys
from store.lifecycle import erase_patient
from store.pool import Store
from testkit.fixtures import SeededDoctor, seed_doctor, token, ws_url
from testkit.webhooks import Receiver, eventually

AppClient = TestClient[web.Request, web.Application]
LONG = timedelta(hours=2)
ADMIN = {"Authorization": f"Bearer {token(Role.ADMIN, 'root', ttl=LONG)}"}
PEPPER = "test-pepper-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(
        api_key_pepper=PEPPER,
        api_key_cache_s=0.3,
        rate_auth_failures="4/minute",
        webhook_allow_private=True,
        webhook_poll_s=0.05,
        webhook_retry_base_s=0.05,
        webhook_retry_max_s=0.2,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(settings: Settings, clock: Clock, aiohttp_client: AiohttpClient) -> AppClient:
    return await aiohttp_client(create_app(settings, clock=clock))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def key_header(key: str) -> dict[str, str]:
    return {"X-Api-Key": key}


async def json_of(resp: ClientResponse, status: int) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


async def refused(resp: ClientResponse, code: ErrorCode, status: int) -> None:
    body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (status, code.value), body


async def new_key(client: AppClient, **fields: Any) -> dict[str, Any]:
    created: dict[str, Any] = await json_of(
        await client.post("/api/keys", json={"name": "front desk", **fields}, headers=ADMIN), 201
    )
    return created


def appointments_url(doctor_id: int, day: Any) -> str:
    return f"/api/doctors/{doctor_id}/appointments?date={day.isoformat()}"


async def test_a_key_is_shown_once_stored_hashed_and_used_within_its_grant(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    other = await seed_doctor(store, name="Dr. Other")
    created = await new_key(client, scopes=["read"], doctor_id=doctor.id)
    key, key_id = created["key"], created["id"]
    assert key.startswith(f"sk_{key_id}_")
    assert len(key.split("_", 2)[2]) == 43
    assert created["scopes"] == ["read"]
    assert created["doctor_id"] == doctor.id

    listed = await json_of(await client.get("/api/keys", headers=ADMIN), 200)
    assert [k["id"] for k in listed["keys"]] == [key_id]
    assert key not in str(listed)
    assert "key" not in listed["keys"][0]
    stored = await store.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert stored is not None
    secret = key.split("_", 2)[2]
    assert bytes(stored["secret_hash"]) == hmac.digest(PEPPER.encode(), secret.encode(), "sha256")
    assert secret not in str(dict(stored))

    # Read its doctor; not another doctor, not a write, not the admin's routes.
    day = doctor.slots[0].start.date()
    await json_of(await client.get(appointments_url(doctor.id, day), headers=key_header(key)), 200)
    await refused(
        await client.get(appointments_url(other.id, day), headers=key_header(key)),
        ErrorCode.FORBIDDEN,
        403,
    )
    await refused(
        await client.post(
            f"/api/slots/{doctor.slots[0].id}/block", json={}, headers=key_header(key)
        ),
        ErrorCode.FORBIDDEN,
        403,
    )
    body = {"slot_id": doctor.slots[0].id, "patient_id": "carol"}
    await refused(
        await client.post("/api/appointments", json=body, headers=key_header(key)),
        ErrorCode.FORBIDDEN,
        403,
    )
    await refused(await client.get("/api/keys", headers=key_header(key)), ErrorCode.FORBIDDEN, 403)
    await refused(
        await client.get("/api/webhooks", headers=key_header(key)), ErrorCode.FORBIDDEN, 403
    )

    # Last use is written behind, not per request.
    assert stored["last_used_at"] is None
    await client.app[API_KEYS].flush()
    used = await store.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
    assert used is not None


async def test_revoked_and_expired_keys_are_refused(
    store: Store, doctor: SeededDoctor, client: AppClient, clock: Clock
) -> None:
    day = doctor.slots[0].start.date()
    url = appointments_url(doctor.id, day)
    here = (await new_key(client, scopes=["admin"]))["key"]
    elsewhere = await new_key(client, scopes=["read"])
    await json_of(await client.get(url, headers=key_header(here)), 200)
    await json_of(await client.get(url, headers=key_header(elsewhere["key"])), 200)  # cached

    # Revoked here: refused at once.
    here_id = int(here.split("_")[1])
    revoked = await json_of(await client.delete(f"/api/keys/{here_id}", headers=ADMIN), 200)
    assert revoked["revoked_at"] is not None
    await refused(await client.get(url, headers=key_header(here)), ErrorCode.TOKEN_INVALID, 401)

    # Revoked by another instance (straight in the table): refused once the cache lets go.
    await apikeys.revoke(store, elsewhere["id"], now=clock.now)

    async def refused_now() -> bool:
        resp = await client.get(url, headers=key_header(elsewhere["key"]))
        return resp.status == 401

    await eventually(refused_now, timeout=5, what="the revocation to reach the cache")

    expiring = await new_key(
        client, scopes=["read"], expires_at=(clock.now + timedelta(hours=1)).isoformat()
    )
    await json_of(await client.get(url, headers=key_header(expiring["key"])), 200)
    clock.now += timedelta(hours=1, seconds=1)
    await refused(
        await client.get(url, headers=key_header(expiring["key"])), ErrorCode.TOKEN_EXPIRED, 401
    )


async def test_wrong_keys_spend_the_sign_in_budget(client: AppClient) -> None:
    created = await new_key(client, scopes=["read"])
    forged = created["key"][:-4] + "AAAA"
    statuses = [
        (await client.get("/api/keys", headers=key_header(k))).status
        for k in [forged, "sk_999999_" + "A" * 43, "nonsense", forged, forged]
    ]
    assert statuses == [401, 401, 401, 401, 429]
    # Spent: even the right key is not checked from this address for a while.
    await refused(
        await client.get("/api/keys", headers=key_header(created["key"])),
        ErrorCode.RATE_LIMITED,
        429,
    )


async def test_a_key_books_for_a_patient_live_in_their_room_and_audited(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    created = await new_key(client, scopes=["book"], doctor_id=doctor.id)
    url = ws_url(client)
    carol = token(Role.PATIENT, "carol", ttl=LONG)
    async with (
        SlotcastClient.connect(url, token=carol) as patient,
        SlotcastClient.connect(url, api_key=created["key"]) as desk,
    ):
        await patient.watch_appointments()
        booked = await desk.book(doctor.slots[0].id, patient_id="carol", patient_name="Carol Ng")
        assert (booked.patient_id, booked.patient_name) == ("carol", "Carol Ng")
        event = await patient.next_event()
        assert isinstance(event, AppointmentEvent)
        assert event.appointment.id == booked.id

        # Without a patient, or as a patient for someone else: refused.
        with pytest.raises(ClientError) as no_patient:
            await desk.book(doctor.slots[1].id)
        assert no_patient.value.code is ErrorCode.FORBIDDEN
        with pytest.raises(ClientError) as for_someone_else:
            await patient.book(doctor.slots[1].id, patient_id="dave")
        assert for_someone_else.value.code is ErrorCode.FORBIDDEN

        cancelled = await desk.cancel(booked.id, "phoned to cancel", patient_id="carol")
        assert cancelled.status.value == "cancelled"

    rows = await store.fetch(
        "SELECT actor, private FROM changes WHERE doctor_id = $1 ORDER BY version", doctor.id
    )
    key_rows = [r for r in rows if r["actor"] == f"key:{created['id']}"]
    assert len(key_rows) == 2
    assert all(r["private"]["on_behalf_of"] == "carol" for r in key_rows)
    assert key_rows[0]["private"]["appointments"][0]["patient_name"] == "Carol Ng"


async def test_the_doctor_books_for_a_patient_under_the_patients_limits(
    store: Store, doctor: SeededDoctor, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    app = create_app(settings.replace(max_active_per_doctor=1))
    client: AppClient = await aiohttp_client(app)
    other = await seed_doctor(store, name="Dr. Other")
    staff = {"Authorization": f"Bearer {token(Role.DOCTOR, str(doctor.id), ttl=LONG)}"}
    body = {"slot_id": doctor.slots[0].id, "patient_id": "erin"}
    booked = await json_of(await client.post("/api/appointments", json=body, headers=staff), 201)
    assert booked["appointment"]["patient_id"] == "erin"
    # Erin's cap with this doctor is spent, whoever books for her.
    again = {"slot_id": doctor.slots[1].id, "patient_id": "erin"}
    await refused(
        await client.post("/api/appointments", json=again, headers=staff),
        ErrorCode.APPOINTMENT_LIMIT,
        409,
    )
    # Not another doctor's slot.
    theirs = {"slot_id": other.slots[0].id, "patient_id": "erin"}
    await refused(
        await client.post("/api/appointments", json=theirs, headers=staff),
        ErrorCode.FORBIDDEN,
        403,
    )
    actor = await store.fetchval(
        "SELECT actor FROM changes WHERE doctor_id = $1 AND private->>'on_behalf_of' = 'erin'",
        doctor.id,
    )
    assert actor == f"doctor:{doctor.id}"


async def test_a_patients_name_reaches_the_dashboard_and_webhooks_and_erasure_clears_it(
    store: Store, doctor: SeededDoctor, client: AppClient, receiver: Receiver
) -> None:
    hook = await json_of(
        await client.post(
            "/api/webhooks",
            json={"url": receiver.url, "event_types": ["appointment.booked"]},
            headers=ADMIN,
        ),
        201,
    )
    receiver.secret = hook["secret"]
    named = token(Role.PATIENT, "frank", ttl=LONG, name="Frank O'Hara")
    staff = token(Role.DOCTOR, str(doctor.id), ttl=LONG)
    url = ws_url(client)
    day = doctor.slots[0].start.date()
    async with (
        SlotcastClient.connect(url, token=staff) as doc,
        SlotcastClient.connect(url, token=named) as frank,
    ):
        await doc.watch_dashboard(doctor.id, day)
        booked = await frank.book(doctor.slots[0].id)
        assert booked.patient_name == "Frank O'Hara"
        dashboard = await doc.watch_dashboard(doctor.id, day)
        assert [a.patient_name for a in dashboard.appointments] == ["Frank O'Hara"]

    await eventually(lambda: len(receiver.deliveries) >= 1, what="the booking's webhook")
    sent = receiver.deliveries[0].payload["data"]["appointments"][0]
    assert (sent["patient_id"], sent["patient_name"]) == ("frank", "Frank O'Hara")

    erased = await erase_patient(store, "frank")
    assert erased.total > 0
    assert (
        await store.fetchval("SELECT count(*) FROM appointments WHERE patient_name IS NOT NULL")
        == 0
    )
    names = await store.fetchval(
        "SELECT count(*) FROM changes, jsonb_array_elements(private->'appointments') a"
        " WHERE a->>'patient_name' IS NOT NULL"
    )
    assert names == 0


async def test_a_token_sent_after_a_key_replaces_it(client: AppClient) -> None:
    created = await new_key(client, scopes=["admin"])
    async with SlotcastClient.connect(ws_url(client), api_key=created["key"]) as ws:
        with pytest.raises(ClientError) as as_key:  # a key is nobody's patient
            await ws.my_appointments()
        assert as_key.value.code is ErrorCode.FORBIDDEN
        who = await ws.auth(token(Role.PATIENT, "hank", ttl=LONG))
        assert (who.subject, who.role) == ("hank", Role.PATIENT)
        assert await ws.my_appointments() == []


async def test_a_key_reschedules_for_a_patient_within_its_doctor(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    other = await seed_doctor(store, name="Dr. Other")
    created = await new_key(client, scopes=["book"], doctor_id=doctor.id)
    desk = key_header(created["key"])
    body = {"slot_id": doctor.slots[0].id, "patient_id": "ivy", "patient_name": "Ivy Chen"}
    booked = await json_of(await client.post("/api/appointments", json=body, headers=desk), 201)
    appointment_id = booked["appointment"]["id"]
    url = f"/api/appointments/{appointment_id}"

    # Not to another doctor (the key is this doctor's), nor naming someone else.
    away = {"slot_id": other.slots[0].id, "patient_id": "ivy"}
    await refused(
        await client.post(f"{url}/reschedule", json=away, headers=desk), ErrorCode.FORBIDDEN, 403
    )
    wrong = {"reason": "phoned", "patient_id": "jack"}
    await refused(
        await client.post(f"{url}/cancel", json=wrong, headers=desk), ErrorCode.FORBIDDEN, 403
    )

    moved = await json_of(
        await client.post(
            f"{url}/reschedule",
            json={"slot_id": doctor.slots[1].id, "patient_id": "ivy"},
            headers=desk,
        ),
        201,
    )
    new = moved["appointment"]
    assert (new["patient_id"], new["patient_name"], new["replaces_id"]) == (
        "ivy",
        "Ivy Chen",
        appointment_id,
    )
    audit = await store.fetchrow(
        "SELECT actor, private FROM changes WHERE doctor_id = $1 ORDER BY version DESC LIMIT 1",
        doctor.id,
    )
    assert audit is not None
    assert (audit["actor"], audit["private"]["on_behalf_of"]) == (f"key:{created['id']}", "ivy")
