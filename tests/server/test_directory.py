"""The doctor directory over REST and WebSocket: admins only, zones checked twice (by the
server and by PostgreSQL), a retired doctor no longer offered, and every change live."""

from __future__ import annotations

from datetime import date, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client import ClientError, SlotcastClient
from protocol.errors import ErrorCode
from protocol.messages import AppointmentEvent, Delta, WeeklyBlock
from protocol.vocabulary import AppointmentStatus, Role
from store import reads
from store.errors import Invalid
from store.pool import Store
from testkit.fixtures import token, ws_url
from testkit.wire import error_code, events_before_pong, expect

AppClient = TestClient[web.Request, web.Application]
ADMIN = {"Authorization": f"Bearer {token(Role.ADMIN, 'root')}"}
EVERY_DAY = [WeeklyBlock(d, time(8), time(12)) for d in range(1, 8)]


def bearer(role: Role, sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sub)}"}


async def search(client: AppClient, headers: dict[str, str] | None = None, **q: str) -> Any:
    resp = await client.get("/api/doctors", params=q, headers=headers or {})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["doctors"]


async def test_admins_create_update_and_retire_over_rest_and_no_one_else_may(
    client: AppClient, store: Store
) -> None:
    body = {"name": " Dr. Lena Fischer ", "timezone": "Europe/Berlin", "external_id": "HR-1"}
    for who, status in ((bearer(Role.PATIENT, "alice"), 403), (bearer(Role.DOCTOR, "1"), 403)):
        resp = await client.post("/api/doctors", json=body, headers=who)
        assert await error_code(resp, status) == "forbidden"
    assert await error_code(await client.post("/api/doctors", json=body), 401) == (
        "unauthenticated"
    )

    resp = await client.post(
        "/api/doctors", json=body, headers={**ADMIN, "Idempotency-Key": "add-HR-1"}
    )
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    doctor_id = created["doctor"]["id"]
    assert created == {
        "doctor": {
            "id": doctor_id,
            "name": "Dr. Lena Fischer",
            "specialty": "",
            "timezone": "Europe/Berlin",
            "external_id": "HR-1",
            "retired_at": None,
            "min_notice_minutes": 0,  # the booking rules a new doctor starts with
            "horizon_days": 28,
        },
        "version": 1,
    }
    again = await client.post(
        "/api/doctors", json=body, headers={**ADMIN, "Idempotency-Key": "add-HR-1"}
    )
    assert await again.json() == created  # a retry creates no second doctor
    dup = await client.post("/api/doctors", json={**body, "name": "Dr. Other"}, headers=ADMIN)
    assert "external_id" in (await dup.json())["error"]["message"]

    path = f"/api/doctors/{doctor_id}"
    patch = {"name": "Dr. Lena Fischer-Wolf", "specialty": "dermatology"}
    resp = await client.patch(path, json=patch, headers=bearer(Role.DOCTOR, str(doctor_id)))
    assert await error_code(resp, 403) == "forbidden"  # not even the doctor
    resp = await client.patch(path, json=patch, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["version"] == 2
    assert [d["name"] for d in await search(client, q="fischer")] == ["Dr. Lena Fischer-Wolf"]

    resp = await client.post(f"{path}/retire", json={}, headers=bearer(Role.PATIENT, "alice"))
    assert await error_code(resp, 403) == "forbidden"
    resp = await client.post(f"{path}/retire", json={}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    retired = await resp.json()
    assert retired["doctor"]["retired_at"] is not None
    assert retired["version"] == 3
    resp = await client.post(f"{path}/retire", json={}, headers=ADMIN)
    assert await error_code(resp, 409) == "invalid_transition"

    assert await search(client, q="fischer") == []  # gone for everyone...
    listed = await search(client, ADMIN, q="fischer", include_retired="true")
    assert [(d["id"], d["external_id"]) for d in listed] == [(doctor_id, "HR-1")]  # ...not admins
    for who, status, code in (
        ({}, 401, "unauthenticated"),
        (bearer(Role.PATIENT, "alice"), 403, "forbidden"),
    ):
        resp = await client.get("/api/doctors", params={"include_retired": "1"}, headers=who)
        assert await error_code(resp, status) == code
    slots = await client.get(f"{path}/slots", params={"start": "2030-01-01", "end": "2030-01-02"})
    assert await error_code(slots, 410) == "doctor_retired"

    kinds = [r["kind"] for r in await reads.change_log(store, doctor_id)]
    assert kinds == ["doctor.created", "doctor.updated", "doctor.retired"]
    actors = {r["actor"] for r in await reads.change_log(store, doctor_id)}
    assert actors == {"admin:root"}


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "UTC+3", "europe/paris", ""])
async def test_a_time_zone_that_is_not_an_iana_name_is_invalid(
    client: AppClient, zone: str
) -> None:
    resp = await client.post(
        "/api/doctors", json={"name": "Dr. Nowhere", "timezone": zone}, headers=ADMIN
    )
    assert await error_code(resp, 422) == "invalid"


async def test_the_database_refuses_a_zone_the_application_did_not_check(
    db: asyncpg.Connection, store: Store
) -> None:
    """Rows written behind the server's back (psql, an old script) are checked too, and
    the store says so as `invalid` naming the field, not as an internal error."""
    with pytest.raises(Invalid, match=r"^timezone: Mars/Base is not an IANA time zone name"):
        await store.execute("INSERT INTO doctors (name, timezone) VALUES ('Dr. X', 'Mars/Base')")
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await db.execute("INSERT INTO doctors (name, timezone) VALUES ('Dr. X', 'Mars/Base')")
    assert caught.value.constraint_name == "doctors_timezone_iana"
    doctor_id = await db.fetchval(
        "INSERT INTO doctors (name, timezone) VALUES ('Dr. Y', 'Asia/Tokyo') RETURNING id"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE doctors SET timezone = 'UTC+3' WHERE id = $1", doctor_id)
    await db.execute("UPDATE doctors SET version = version + 1 WHERE id = $1", doctor_id)


async def test_over_websocket_a_watcher_sees_the_rename_and_the_retirement_live(
    client: AppClient, store: Store
) -> None:
    """An admin's socket runs the directory; a patient watching the doctor sees each
    change as it commits; afterwards the doctor is offered nowhere, history stays."""
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(Role.ADMIN, "root")) as admin,
        SlotcastClient.connect(url, token=token(Role.PATIENT, "alice")) as alice,
        SlotcastClient.connect(url, token=token(Role.DOCTOR, "1")) as doctor,
    ):
        with pytest.raises(ClientError) as caught:
            await doctor.create_doctor("Dr. Self-Made", "UTC")
        assert caught.value.code == ErrorCode.FORBIDDEN
        with pytest.raises(ClientError) as caught:
            await alice.retire_doctor(1)
        assert caught.value.code == ErrorCode.FORBIDDEN

        created = await admin.create_doctor("Dr. Kenji Sato", "Asia/Tokyo", "cardiology")
        doctor_id = created.doctor.id
        await admin.set_schedule(doctor_id, EVERY_DAY, horizon_days=10)
        start = date.today() + timedelta(days=2)
        snapshot = await alice.watch(doctor_id, start, start + timedelta(days=3))
        first, second, third = snapshot.slots[:3]
        booked = await alice.book(first.id)
        held = await alice.hold(second.id)
        await alice.watch_appointments()
        await events_before_pong(alice)  # the deltas of her own booking and hold

        await admin.update_doctor(doctor_id, name="Dr. Kenji Sato-Ito")
        renamed = await expect(alice, Delta)
        assert renamed.doctor is not None
        assert renamed.doctor.name == "Dr. Kenji Sato-Ito"
        assert renamed.doctor.external_id is None  # the staff id is for admins

        retired = await admin.retire_doctor(doctor_id)
        assert retired.doctor.retired_at is not None
        delta = await expect(alice, Delta, skip=(AppointmentEvent,))
        assert delta.doctor is not None
        assert delta.doctor.retired_at is not None
        assert {second.id, third.id} <= set(delta.removed)  # the held slot too, once released
        assert first.id not in delta.removed  # booked: kept, as a conflict

        released = await reads.patient_appointments(store, "alice")
        assert [(a.id, a.status) for a in released] == [(booked.id, AppointmentStatus.BOOKED)]
        assert held.id not in {a.id for a in released}

        for attempt, code in (
            (alice.watch(doctor_id, start, start + timedelta(days=1)), ErrorCode.DOCTOR_RETIRED),
            (alice.hold(third.id), ErrorCode.SLOT_UNAVAILABLE),
            (alice.book(third.id), ErrorCode.SLOT_UNAVAILABLE),
            (admin.set_schedule(doctor_id, EVERY_DAY), ErrorCode.DOCTOR_RETIRED),
        ):
            with pytest.raises(ClientError) as caught:
                await attempt
            assert caught.value.code == code
        assert await alice.search_doctors("sato") == []
        assert [d.id for d in await admin.search_doctors("sato", include_retired=True)] == [
            doctor_id
        ]
        local_day = first.start.astimezone(ZoneInfo("Asia/Tokyo")).date()
        dashboard = await admin.watch_dashboard(doctor_id, local_day)
        assert first.id in dashboard.conflicts  # the clinic's to resolve


async def test_a_new_time_zone_keeps_the_hours_on_the_wall_clock(
    client: AppClient, store: Store
) -> None:
    """09:00 in Paris becomes 09:00 in Tokyo: the free slots move, in one version."""
    resp = await client.post(
        "/api/doctors", json={"name": "Dr. Away", "timezone": "Europe/Paris"}, headers=ADMIN
    )
    doctor_id = (await resp.json())["doctor"]["id"]
    hours = {
        "weekly": [{"weekday": d, "start": "09:00:00", "end": "10:00:00"} for d in range(1, 8)]
    }
    resp = await client.put(f"/api/doctors/{doctor_id}/schedule", json=hours, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    start = date.today() + timedelta(days=3)
    before = await reads.snapshot(store, doctor_id, start, start + timedelta(days=1))

    resp = await client.patch(
        f"/api/doctors/{doctor_id}", json={"timezone": "Asia/Tokyo"}, headers=ADMIN
    )
    assert resp.status == 200, await resp.text()
    after = await reads.snapshot(store, doctor_id, start, start + timedelta(days=1))
    assert after.timezone == "Asia/Tokyo"
    assert {s.start.astimezone(ZoneInfo("Asia/Tokyo")).time() for s in after.slots} == {
        time(9),
        time(9, 30),
    }
    assert not {s.id for s in before.slots} & {s.id for s in after.slots}
    last = (await reads.change_log(store, doctor_id))[-1]
    assert last["version"] == after.version
    assert "doctor.updated" in last["kind"].split("+")
