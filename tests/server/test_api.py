"""The REST front door: the same commands and error codes as the WebSocket, over HTTP.

Clients that only speak HTTP branch on `error.code` exactly like WebSocket clients
do, so every failure here is checked for both its HTTP status and its stable code.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.vocabulary import Role, SlotStatus
from store import reads
from store.doctors import create_doctor
from store.pool import Store
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.wire import error_code

AppClient = TestClient[web.Request, web.Application]
BOOK = "/api/appointments"


def bearer(role: Role = Role.PATIENT, sub: str = "patient-1", **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sub, **kw)}"}


READY = {
    "status": "ready",
    "database": "up",
    "broker": "up",
    "rooms": 0,
    "watchers": 0,
    "dashboards": 0,
    "patient_rooms": 0,
}


# ---- doctors ---------------------------------------------------------------------------------


@pytest.fixture
async def directory(store: Store) -> dict[str, int]:
    """A few doctors whose names and specialties overlap only where the tests need them to."""
    doctors = [
        ("Dr. Maya Patel", "Pediatrics", "America/New_York"),
        ("Dr. Kenji Sato", "Cardiology", "Asia/Tokyo"),
        ("Dr. Ada Moreau", "General practice", "Europe/Paris"),
        ("Dr. Carla Diaz", "Pediatric cardiology", "America/Mexico_City"),
    ]
    return {
        name: await create_doctor(store, name=name, specialty=specialty, timezone=tz)
        for name, specialty, tz in doctors
    }


async def names(client: AppClient, **query: str) -> list[str]:
    resp = await client.get("/api/doctors", params=query)
    assert resp.status == 200, await resp.text()
    return [d["name"] for d in (await resp.json())["doctors"]]


async def test_list_doctors_without_query_returns_all_sorted_by_name(
    client: AppClient, directory: dict[str, int]
) -> None:
    resp = await client.get("/api/doctors")
    assert resp.status == 200
    body = await resp.json()
    assert (body["limit"], body["offset"]) == (20, 0)
    assert [d["name"] for d in body["doctors"]] == sorted(directory)
    moreau = next(d for d in body["doctors"] if d["name"] == "Dr. Ada Moreau")
    assert moreau == {
        "id": directory["Dr. Ada Moreau"],
        "name": "Dr. Ada Moreau",
        "specialty": "General practice",
        "timezone": "Europe/Paris",
        "external_id": None,  # admins only
        "retired_at": None,
        "min_notice_minutes": 0,  # public: a patient page's bookable window needs them
        "horizon_days": 28,
    }


async def test_search_doctors_by_name_and_specialty(
    client: AppClient, directory: dict[str, int]
) -> None:
    """Patients type either a name or a specialty into one box, in any case."""
    assert await names(client, q="PATEL") == ["Dr. Maya Patel"]
    assert await names(client, q="cardio") == ["Dr. Carla Diaz", "Dr. Kenji Sato"]
    assert await names(client, q="pediatric") == ["Dr. Carla Diaz", "Dr. Maya Patel"]
    assert await names(client, q="nobody-by-this-name") == []


async def test_doctor_paging(client: AppClient, directory: dict[str, int]) -> None:
    everyone = sorted(directory)
    assert await names(client, limit="2") == everyone[:2]
    assert await names(client, limit="2", offset="2") == everyone[2:4]
    assert await names(client, offset="4") == []


async def test_search_treats_wildcards_literally(
    client: AppClient, directory: dict[str, int]
) -> None:
    """No doctor's name or specialty holds `%` or `_`; a search for them must find nobody."""
    assert await names(client, q="%") == []
    assert await names(client, q="_") == []


async def test_search_with_nul_is_invalid(client: AppClient, directory: dict[str, int]) -> None:
    resp = await client.get("/api/doctors", params={"q": "Pa\x00tel"})
    assert await error_code(resp, 422) == "invalid"


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"limit": "2.5"},
        {"offset": "-1"},
        {"offset": "x"},
    ],
)
async def test_bad_paging_is_invalid(
    client: AppClient, directory: dict[str, int], query: dict[str, str]
) -> None:
    resp = await client.get("/api/doctors", params=query)
    assert await error_code(resp, 422) == "invalid"


# ---- slots -----------------------------------------------------------------------------------


def slots_url(doctor_id: int | str) -> str:
    return f"/api/doctors/{doctor_id}/slots"


def dates(start: date, end: date) -> dict[str, str]:
    return {"start": start.isoformat(), "end": end.isoformat()}


async def test_slots_match_the_websocket_snapshot(client: AppClient, doctor: SeededDoctor) -> None:
    """REST and WebSocket read the same snapshot; a client may mix them."""
    resp = await client.get(slots_url(doctor.id), params=dates(doctor.start, doctor.end))
    assert resp.status == 200
    body = await resp.json()
    assert body["doctor_id"] == doctor.id
    assert body["timezone"] == "UTC"
    assert (body["start"], body["end"]) == (doctor.start.isoformat(), doctor.end.isoformat())
    assert [s["id"] for s in body["slots"]] == [s.id for s in doctor.slots]
    assert {s["status"] for s in body["slots"]} == {"free"}
    async with SlotcastClient.connect(ws_url(client)) as ws:
        snapshot = await ws.watch(doctor.id, doctor.start, doctor.end)
    assert body["version"] == snapshot.version


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"end": "2030-01-08"}, id="no start"),
        pytest.param({"start": "2030-01-01"}, id="no end"),
        pytest.param({}, id="neither"),
        pytest.param({"start": "tomorrow", "end": "2030-01-08"}, id="start not a date"),
        pytest.param({"start": "2030-01-01", "end": "2030-13-01"}, id="no such month"),
        pytest.param({"start": "2030-01-08", "end": "2030-01-08"}, id="empty range"),
        pytest.param({"start": "2030-01-08", "end": "2030-01-01"}, id="backwards"),
        pytest.param({"start": "2030-01-01", "end": "2030-03-05"}, id="over 62 days"),
    ],
)
async def test_bad_slot_dates_are_invalid(
    client: AppClient, doctor: SeededDoctor, query: dict[str, str]
) -> None:
    resp = await client.get(slots_url(doctor.id), params=query)
    assert await error_code(resp, 422) == "invalid"


@pytest.mark.parametrize("doctor_id", ["abc", "1.5", "1e3"])
async def test_non_numeric_doctor_id_is_invalid(
    client: AppClient, doctor: SeededDoctor, doctor_id: str
) -> None:
    resp = await client.get(slots_url(doctor_id), params=dates(doctor.start, doctor.end))
    assert await error_code(resp, 422) == "invalid"


@pytest.mark.parametrize("offset", [1000, None])
async def test_unknown_doctor_is_not_found(
    client: AppClient, doctor: SeededDoctor, offset: int | None
) -> None:
    """Both an unused id and one beyond int4 are 404s, not database errors."""
    doctor_id = doctor.id + offset if offset is not None else 2**31
    resp = await client.get(slots_url(doctor_id), params=dates(doctor.start, doctor.end))
    assert await error_code(resp, 404) == "not_found"


# ---- booking ---------------------------------------------------------------------------------


async def test_book_returns_201_with_the_appointment(
    client: AppClient, doctor: SeededDoctor
) -> None:
    slot = doctor.slots[3]
    resp = await client.post(BOOK, json={"slot_id": slot.id}, headers=bearer(sub="p-rest"))
    assert resp.status == 201, await resp.text()
    appointment = (await resp.json())["appointment"]
    assert appointment["slot_id"] == slot.id
    assert appointment["doctor_id"] == doctor.id
    assert appointment["patient_id"] == "p-rest"
    assert appointment["status"] == "booked"
    assert isinstance(appointment["id"], int)
    assert datetime.fromisoformat(appointment["start"]) == slot.start
    assert datetime.fromisoformat(appointment["end"]) == slot.end
    after = await client.get(slots_url(doctor.id), params=dates(doctor.start, doctor.end))
    statuses = {s["id"]: s["status"] for s in (await after.json())["slots"]}
    assert statuses[slot.id] == SlotStatus.BUSY


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        pytest.param({}, 401, "unauthenticated", id="no token"),
        pytest.param(bearer(ttl=timedelta(minutes=-1)), 401, "token_expired", id="expired token"),
        pytest.param({"Authorization": "Bearer nope"}, 401, "token_invalid", id="garbage"),
        pytest.param({"Authorization": "Basic cDpx"}, 401, "token_invalid", id="basic auth"),
        pytest.param(bearer(Role.DOCTOR, "doc-1"), 403, "forbidden", id="doctor"),
        pytest.param(bearer(Role.ADMIN, "admin-1"), 403, "forbidden", id="admin"),
    ],
)
async def test_booking_needs_a_patient(
    client: AppClient,
    doctor: SeededDoctor,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    resp = await client.post(BOOK, json={"slot_id": doctor.slots[0].id}, headers=headers)
    assert await error_code(resp, status) == code
    # Nothing was booked on the way to the refusal.
    ok = await client.post(BOOK, json={"slot_id": doctor.slots[0].id}, headers=bearer())
    assert ok.status == 201


async def test_second_booking_of_a_slot_is_slot_taken(
    client: AppClient, doctor: SeededDoctor
) -> None:
    slot_id = doctor.slots[0].id
    first = await client.post(BOOK, json={"slot_id": slot_id}, headers=bearer(sub="p-1"))
    assert first.status == 201
    second = await client.post(BOOK, json={"slot_id": slot_id}, headers=bearer(sub="p-2"))
    assert await error_code(second, 409) == "slot_taken"
    # Even the same patient, without an idempotency key, is told the truth.
    third = await client.post(BOOK, json={"slot_id": slot_id}, headers=bearer(sub="p-1"))
    assert await error_code(third, 409) == "slot_taken"


async def test_booking_an_unknown_slot_is_not_found(
    client: AppClient, doctor: SeededDoctor
) -> None:
    resp = await client.post(BOOK, json={"slot_id": 10**9}, headers=bearer())
    assert await error_code(resp, 404) == "not_found"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no slot"),
        pytest.param({"slot_id": "seven"}, id="slot not a number"),
        pytest.param({"slot_id": 0}, id="slot zero"),
        pytest.param({"slot_id": 1, "idempotency_key": ""}, id="empty key"),
        pytest.param({"slot_id": 1, "idempotency_key": "k" * 129}, id="key too long"),
        pytest.param([1], id="array"),
        pytest.param("slot 1", id="string"),
    ],
)
async def test_bad_booking_body_is_invalid(
    client: AppClient, doctor: SeededDoctor, body: Any
) -> None:
    resp = await client.post(BOOK, json=body, headers=bearer())
    assert await error_code(resp, 422) == "invalid"


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        pytest.param(b"slot_id=1", "application/x-www-form-urlencoded", id="form"),
        pytest.param(b'{"slot_id": 1', "application/json", id="truncated json"),
        pytest.param(b"\xff\xfe{}", "application/json", id="not utf-8"),
    ],
)
async def test_non_json_body_is_bad_message(
    client: AppClient, doctor: SeededDoctor, data: bytes, content_type: str
) -> None:
    headers = {**bearer(), "Content-Type": content_type}
    resp = await client.post(BOOK, data=data, headers=headers)
    assert await error_code(resp, 400) == "bad_message"


@pytest.mark.parametrize("content_type", ["application/json", None])
@pytest.mark.parametrize("data", [b"", b"  \r\n"], ids=["empty", "blank"])
async def test_an_empty_post_or_put_body_is_bad_message_and_does_nothing(
    client: AppClient,
    doctor: SeededDoctor,
    db: asyncpg.Connection,
    data: bytes,
    content_type: str | None,
) -> None:
    """`{}` at least: a POST or PUT that lost its body must not run as if it had said
    nothing, least of all a block (which has no required field) or a schedule."""
    slot = doctor.slots[0]
    headers = bearer(Role.DOCTOR, str(doctor.id))
    if content_type is not None:
        headers["Content-Type"] = content_type
    before = await db.fetchval("SELECT version FROM doctors WHERE id = $1", doctor.id)
    for method, url in [
        ("POST", f"/api/slots/{slot.id}/block"),
        ("PUT", f"/api/doctors/{doctor.id}/schedule"),
        ("POST", BOOK),
    ]:
        resp = await client.request(method, url, data=data, headers=headers)
        assert await error_code(resp, 400) == "bad_message", (method, url)
    assert await db.fetchval("SELECT status FROM slots WHERE id = $1", slot.id) == "free"
    assert await db.fetchval("SELECT version FROM doctors WHERE id = $1", doctor.id) == before
    # `{}` is a body: the block runs.
    resp = await client.post(f"/api/slots/{slot.id}/block", json={}, headers=headers)
    assert resp.status == 200, await resp.text()


async def test_a_delete_needs_no_body(client: AppClient, doctor: SeededDoctor) -> None:
    headers = bearer(Role.DOCTOR, str(doctor.id))
    slot = doctor.slots[0]
    assert (await client.post(f"/api/slots/{slot.id}/block", json={}, headers=headers)).ok
    resp = await client.delete(f"/api/slots/{slot.id}/block", headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["slot"]["status"] == "free"


async def test_json_is_utf8_whatever_charset_is_claimed(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """RFC 8259: JSON is UTF-8 and `charset` means nothing for it, so an odd claim is ignored."""
    headers = {**bearer(), "Content-Type": "application/json; charset=no-such-charset"}
    body = b'{"slot_id": %d}' % doctor.slots[0].id
    resp = await client.post(BOOK, data=body, headers=headers)
    assert resp.status == 201, await resp.text()


async def test_body_that_is_not_utf8_is_bad_message(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Undecodable bytes are the client's error, never a 500."""
    headers = {**bearer(), "Content-Type": "application/json"}
    resp = await client.post(BOOK, data=b"\xff\xfe{", headers=headers)
    assert await error_code(resp, 400) == "bad_message"


async def test_nul_in_idempotency_key_is_invalid(client: AppClient, doctor: SeededDoctor) -> None:
    """PostgreSQL text cannot hold NUL; the protocol must refuse it before the database does."""
    body = {"slot_id": doctor.slots[0].id, "idempotency_key": "a\x00b"}
    resp = await client.post(BOOK, json=body, headers=bearer())
    assert await error_code(resp, 422) == "invalid"


async def test_idempotency_key_header_is_held_to_the_body_rules(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """The header and the body field are one key; one must not store what the other refuses."""
    headers = {**bearer(), "Idempotency-Key": "k" * 129}
    resp = await client.post(BOOK, json={"slot_id": doctor.slots[0].id}, headers=headers)
    assert await error_code(resp, 422) == "invalid"


async def test_oversized_body_is_too_large(client: AppClient, doctor: SeededDoctor) -> None:
    """The body limit is the frame limit: REST is no back door for big payloads."""
    body = {"slot_id": doctor.slots[0].id, "pad": "x" * (128 * 1024)}
    resp = await client.post(BOOK, json=body, headers=bearer())
    assert await error_code(resp, 413) == "too_large"


async def test_idempotency_key_header_books_once(
    client: AppClient, doctor: SeededDoctor, store: Store
) -> None:
    """A retried POST (lost response, impatient user) must return the first booking."""
    slot_id = doctor.slots[0].id
    version_before = await reads.doctor_version(store, doctor.id)
    headers = {**bearer(sub="p-idem"), "Idempotency-Key": "retry-me"}
    first = await client.post(BOOK, json={"slot_id": slot_id}, headers=headers)
    second = await client.post(BOOK, json={"slot_id": slot_id}, headers=headers)
    assert (first.status, second.status) == (201, 201)
    assert await first.json() == await second.json()
    assert await reads.doctor_version(store, doctor.id) == version_before + 1  # one commit, not two
    # The key is the patient's: another patient with the same key is a different request.
    other = {**bearer(sub="p-other"), "Idempotency-Key": "retry-me"}
    resp = await client.post(BOOK, json={"slot_id": slot_id}, headers=other)
    assert await error_code(resp, 409) == "slot_taken"
    # Reusing a key for another slot is a client bug, reported as such.
    resp = await client.post(BOOK, json={"slot_id": doctor.slots[1].id}, headers=headers)
    assert await error_code(resp, 422) == "idempotency_conflict"


async def test_rest_booking_reaches_websocket_watchers(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """Both front doors feed the same rooms: a REST booking is a live delta like any other."""
    async with (
        SlotcastClient.connect(ws_url(client), codec="json") as json_watcher,
        SlotcastClient.connect(ws_url(client), codec="msgpack") as msgpack_watcher,
    ):
        snapshots = [
            await w.watch(doctor.id, doctor.start, doctor.end)
            for w in (json_watcher, msgpack_watcher)
        ]
        slot = doctor.slots[5]
        resp = await client.post(BOOK, json={"slot_id": slot.id}, headers=bearer())
        assert resp.status == 201
        for watcher, snapshot in zip((json_watcher, msgpack_watcher), snapshots, strict=True):
            delta = await watcher.next_delta(timeout=5)
            assert delta.doctor_id == doctor.id
            assert delta.version == snapshot.version + 1
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]


# ---- health ----------------------------------------------------------------------------------


async def test_healthz(client: AppClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == {"status": "ok", "instance": "test-instance"}


async def test_readyz_reports_rooms_and_watchers(client: AppClient, doctor: SeededDoctor) -> None:
    """Operators read load off /readyz, so its counts must follow watches live."""
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == {**READY, "rooms": 0, "watchers": 0}
    async with (
        SlotcastClient.connect(ws_url(client)) as a,
        SlotcastClient.connect(ws_url(client)) as b,
    ):
        await a.watch(doctor.id, doctor.start, doctor.end)
        await b.watch(doctor.id, doctor.start, doctor.end)
        resp = await client.get("/readyz")
        assert await resp.json() == {**READY, "rooms": 1, "watchers": 2}


# "²" (isdigit but not int), U+0661 (Arabic-Indic one), "1_0", " 1", "+3" (int() takes them).
NOT_ASCII_NUMBERS = ["%C2%B2", "%D9%A1", "1_0", "%201", "1%20", "x", "1.5", "-3", "+3"]


@pytest.mark.parametrize("raw", [*NOT_ASCII_NUMBERS, "99999999999999999"])
async def test_path_ids_are_plain_ascii_numbers(client: AppClient, raw: str) -> None:
    """`str.isdigit` accepts "²", which int() refuses: that must be `invalid`, not a 500;
    int() accepts U+0661 and "1_0", which no client means as 1 and 10."""
    resp = await client.delete(f"/api/holds/{raw}", headers=bearer())
    assert await error_code(resp, 422) == "invalid"


@pytest.mark.parametrize("raw", NOT_ASCII_NUMBERS)
async def test_doctor_path_ids_are_plain_ascii_numbers(
    client: AppClient, doctor: SeededDoctor, raw: str
) -> None:
    """The slots route parses its own id: the same rule, on a doctor that exists (1)."""
    assert doctor.id == 1
    resp = await client.get(slots_url(raw), params=dates(doctor.start, doctor.end))
    assert await error_code(resp, 422) == "invalid"
    headers = bearer(Role.ADMIN, "ops")
    resp = await client.get(f"/api/doctors/{raw}/appointments?date=2030-01-01", headers=headers)
    assert await error_code(resp, 422) == "invalid"


async def test_a_doctor_id_of_many_digits_is_not_found_not_a_crash(
    client: AppClient, doctor: SeededDoctor
) -> None:
    for raw in ("9" * 5000, "0" * 30 + str(doctor.id)):
        resp = await client.get(slots_url(raw), params=dates(doctor.start, doctor.end))
        if raw.startswith("0"):
            assert resp.status == 200, await resp.text()
        else:
            assert await error_code(resp, 404) == "not_found"


async def test_a_time_of_day_with_an_offset_is_invalid(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """The doctor's zone decides what 09:00 means; an offset would contradict it."""
    body = {"weekly": [{"weekday": 1, "start": "09:00:00+02:00", "end": "17:00:00"}]}
    headers = {"Authorization": f"Bearer {token(Role.DOCTOR, str(doctor.id))}"}
    resp = await client.put(f"/api/doctors/{doctor.id}/schedule", json=body, headers=headers)
    assert await error_code(resp, 422) == "invalid"


# ---- the schedule, read back -------------------------------------------------------------


async def test_a_schedule_reads_back_as_set_schedule_takes_it(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """What `get_schedule` answers is a `set_schedule` body: sent back, it changes nothing."""
    url = f"/api/doctors/{doctor.id}/schedule"
    owner = bearer(Role.DOCTOR, str(doctor.id))
    body = {
        "weekly": [
            {"weekday": 3, "start": "14:00:00", "end": "18:00:00"},
            {"weekday": 1, "start": "09:00:00", "end": "12:00:00"},
        ],
        "overrides": [
            {"date": (doctor.start + timedelta(days=3)).isoformat(), "start": None, "end": None},
            {"date": doctor.start.isoformat(), "start": "10:00:00", "end": "11:00:00"},
        ],
        "slot_minutes": 20,
        "buffer_minutes": 5,
        "min_notice_minutes": 60,
        "horizon_days": 21,
    }
    resp = await client.put(url, json=body, headers={**owner, "Idempotency-Key": "set-1"})
    assert resp.status == 200, await resp.text()

    resp = await client.get(url, headers=owner)
    assert resp.status == 200, await resp.text()
    got = await resp.json()
    assert got == {
        "doctor_id": doctor.id,
        "weekly": sorted(body["weekly"], key=lambda b: (b["weekday"], b["start"])),
        "overrides": sorted(body["overrides"], key=lambda o: o["date"]),
        **{k: body[k] for k in ("slot_minutes", "buffer_minutes", "min_notice_minutes")},
        "horizon_days": 21,
    }
    again = await client.put(url, json=got, headers={**owner, "Idempotency-Key": "set-2"})
    assert again.status == 200, await again.text()
    unchanged = await again.json()
    assert (unchanged["opened"], unchanged["removed"]) == (0, 0)

    # The same over the WebSocket, for an admin.
    async with SlotcastClient.connect(ws_url(client), token=token(Role.ADMIN, "ops")) as admin:
        schedule = await admin.get_schedule(doctor.id)
    assert [b.weekday for b in schedule.weekly] == [1, 3]
    assert schedule.slot_minutes == 20


async def test_only_the_doctor_or_an_admin_reads_a_schedule(
    client: AppClient, doctor: SeededDoctor
) -> None:
    url = f"/api/doctors/{doctor.id}/schedule"
    assert await error_code(await client.get(url), 401) == "unauthenticated"
    patient = await client.get(url, headers=bearer())
    assert await error_code(patient, 403) == "forbidden"
    other = await client.get(url, headers=bearer(Role.DOCTOR, str(doctor.id + 1000)))
    assert await error_code(other, 403) == "forbidden"
    missing = await client.get("/api/doctors/999999/schedule", headers=bearer(Role.ADMIN, "ops"))
    assert await error_code(missing, 404) == "not_found"


# ---- next available --------------------------------------------------------------------------


async def test_next_available_is_the_first_slot_a_patient_may_hold(
    client: AppClient, doctor: SeededDoctor, store: Store
) -> None:
    """What a page's "next available" jumps to: public, past holds, bounded by the horizon."""
    url = f"/api/doctors/{doctor.id}/next-available"
    now = datetime.now(UTC)
    today = date.today()
    seen = await reads.snapshot(
        store, doctor.id, today - timedelta(days=1), today + timedelta(days=12)
    )
    free = [s for s in seen.slots if s.status is SlotStatus.FREE and s.start > now]

    resp = await client.get(url)  # availability is public: no token
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["slot"]["id"] == free[0].id

    held = await client.post(
        "/api/holds", json={"slot_id": free[0].id, "idempotency_key": "next-1"}, headers=bearer()
    )
    assert held.status == 201, await held.text()
    assert (await (await client.get(url)).json())["slot"]["id"] == free[1].id

    later = free[len(free) // 2]
    resp = await client.get(url, params={"after": later.start.isoformat().replace("+00:00", "Z")})
    assert (await resp.json())["slot"]["id"] == later.id
    beyond = (now + timedelta(days=60)).isoformat().replace("+00:00", "Z")
    assert await (await client.get(url, params={"after": beyond})).json() == {
        "doctor_id": doctor.id,
        "slot": None,
    }
    missing = await client.get("/api/doctors/999999/next-available")
    assert await error_code(missing, 404) == "not_found"

    # The same over the WebSocket.
    async with SlotcastClient.connect(ws_url(client), token=token(Role.PATIENT, "p2")) as ws:
        found = await ws.next_available(doctor.id, after=later.start)
    assert found is not None
    assert found.id == later.id


# ---- add to calendar ---------------------------------------------------------------------------


async def test_an_appointment_ics_goes_to_its_patient_and_staff_only(
    client: AppClient, doctor: SeededDoctor
) -> None:
    """The patient, the doctor and an admin get the file; another patient or doctor is told
    it does not exist (ids cannot be probed), and nobody signed out gets anything."""
    resp = await client.post(
        BOOK, json={"slot_id": doctor.slots[2].id}, headers=bearer(sub="p-ics")
    )
    appointment = (await resp.json())["appointment"]
    url = f"/api/appointments/{appointment['id']}.ics"
    for headers in (
        bearer(sub="p-ics"),
        bearer(Role.DOCTOR, str(doctor.id)),
        bearer(Role.ADMIN, "admin-1"),
    ):
        resp = await client.get(url, headers=headers)
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/calendar"
        assert "attachment" in resp.headers["Content-Disposition"]
        assert b"UID:appointment-" in await resp.read()
    for headers, status, code in (
        (bearer(sub="p-other"), 404, "not_found"),
        (bearer(Role.DOCTOR, str(doctor.id + 1)), 404, "not_found"),
        ({}, 401, "unauthenticated"),
    ):
        assert await error_code(await client.get(url, headers=headers), status) == code
    missing = await client.get("/api/appointments/999999.ics", headers=bearer(sub="p-ics"))
    assert await error_code(missing, 404) == "not_found"
    # Cancelled, the same file says so: a calendar that imports it again updates the event.
    cancel = f"/api/appointments/{appointment['id']}/cancel"
    assert (
        await client.post(cancel, json={"reason": "x"}, headers=bearer(sub="p-ics"))
    ).status == 200
    resp = await client.get(url, headers=bearer(sub="p-ics"))
    assert b"STATUS:CANCELLED" in await resp.read()
