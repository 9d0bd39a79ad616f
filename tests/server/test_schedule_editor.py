"""The schedule editor's commands through the real server: REST routes and WebSockets.

What the store tests cannot show: that a reason reaches the doctor's dashboard live and
never a patient's socket, that the preview is a read behind the same gate as the save,
and that staff can move a patient's appointment (the dashboard's *Reschedule*), the old
slot freed in the same version every watcher receives.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.messages import BlockRange, DashboardDelta, Delta, SlotsUpdated
from protocol.vocabulary import Role
from testkit.fixtures import SeededDoctor, token, ws_url

AppClient = TestClient[web.Request, web.Application]
LONG = timedelta(hours=2)


def bearer(role: Role, sub: str, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sub, ttl=LONG, **claims)}"}


async def json_of(resp: ClientResponse, status: int) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


async def next_dashboard_delta(doc: SlotcastClient) -> DashboardDelta:
    while not isinstance(event := await doc.next_event(), DashboardDelta):
        pass  # presence counts and the like
    return event


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_a_blocked_day_reaches_the_dashboard_with_its_reason_and_patients_without(
    client: AppClient, doctor: SeededDoctor
) -> None:
    day = doctor.start
    start = datetime.combine(day, time(0), tzinfo=UTC)
    url = ws_url(client)
    staff = token(Role.DOCTOR, str(doctor.id), ttl=LONG)
    async with (
        SlotcastClient.connect(url, token=staff) as doc,
        SlotcastClient.connect(url, token=token(Role.PATIENT, "pat", ttl=LONG)) as pat,
    ):
        await doc.watch_dashboard(doctor.id, day)
        await pat.watch(doctor.id, day, day + timedelta(days=1))
        body = {"start": iso(start), "end": iso(start + timedelta(days=1)), "reason": "flu"}
        doctor_auth = bearer(Role.DOCTOR, str(doctor.id))
        reply = await json_of(
            await client.post(f"/api/doctors/{doctor.id}/blocks", json=body, headers=doctor_auth),
            200,
        )
        assert len(reply["slots"]) == 20
        assert reply["reason"] == "flu"

        pushed = await next_dashboard_delta(doc)
        assert pushed.kinds == ["slots.blocked"]
        assert {(b.slot_id, b.reason) for b in pushed.blocks} == {
            (s["id"], "flu") for s in reply["slots"]
        }
        delta = await pat.next_delta()
        assert {s.status.value for s in delta.slots} == {"busy-unavailable"}
        assert len(delta.slots) == 20
        dashboard = await doc.watch_dashboard(doctor.id, day)
        assert len(dashboard.blocks) == 20

        # The same over the socket, with a key: replayed, not blocked twice.
        again = await doc.request(
            BlockRange(doctor.id, start, start + timedelta(days=1), "flu", "k1"), SlotsUpdated
        )
        assert again.slots == []  # nothing free left to block

        # Unblocked over REST: one version, every slot free again.
        back = await json_of(
            await client.delete(
                f"/api/doctors/{doctor.id}/blocks",
                json={"start": body["start"], "end": body["end"]},
                headers=doctor_auth,
            ),
            200,
        )
        assert {s["status"] for s in back["slots"]} == {"free"}
        freed = await pat.next_delta()
        assert isinstance(freed, Delta)
        assert len(freed.slots) == 20

    patient = bearer(Role.PATIENT, "pat")
    refused = await client.post(f"/api/doctors/{doctor.id}/blocks", json=body, headers=patient)
    assert (refused.status, (await refused.json())["error"]["code"]) == (403, "forbidden")
    too_long = {**body, "end": iso(start + timedelta(days=30))}
    refused = await client.post(
        f"/api/doctors/{doctor.id}/blocks", json=too_long, headers=doctor_auth
    )
    assert (await refused.json())["error"]["code"] == "outside_horizon"


async def test_the_preview_lists_a_booked_patient_by_name_and_saves_nothing(
    client: AppClient, doctor: SeededDoctor
) -> None:
    slot = doctor.slots[0]  # 08:00 UTC on the first day
    booked = await json_of(
        await client.post(
            "/api/appointments",
            json={"slot_id": slot.id},
            headers=bearer(Role.PATIENT, "alice", name="Alice Martin"),
        ),
        201,
    )
    path = f"/api/doctors/{doctor.id}/schedule"
    doctor_auth = bearer(Role.DOCTOR, str(doctor.id))
    current = await json_of(await client.get(path, headers=doctor_auth), 200)
    later = {
        **current,
        "weekly": [{**b, "start": "09:00:00"} for b in current["weekly"]],
    }
    preview = await json_of(
        await client.post(f"{path}/preview", json=later, headers=doctor_auth), 200
    )
    assert preview["total"] == 1
    [conflict] = preview["conflicts"]
    assert (conflict["id"], conflict["patient_name"]) == (
        booked["appointment"]["id"],
        "Alice Martin",
    )
    assert await json_of(await client.get(path, headers=doctor_auth), 200) == current

    bad = {**later, "weekly": [{"weekday": 1, "start": "12:00:00", "end": "09:00:00"}]}
    refused = await client.post(f"{path}/preview", json=bad, headers=doctor_auth)
    assert (refused.status, (await refused.json())["error"]["code"]) == (422, "invalid")
    refused = await client.post(
        f"{path}/preview", json=later, headers=bearer(Role.PATIENT, "alice")
    )
    assert refused.status == 403


async def test_the_doctor_reschedules_a_patients_appointment_live(
    client: AppClient, doctor: SeededDoctor
) -> None:
    old, new = doctor.slots[0], doctor.slots[3]
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(Role.PATIENT, "alice", ttl=LONG)) as alice,
        SlotcastClient.connect(url, token=token(Role.PATIENT, "pat", ttl=LONG)) as watcher,
    ):
        booked = await alice.book(old.id)
        await watcher.watch(doctor.id, doctor.start, doctor.start + timedelta(days=1))
        moved = await json_of(
            await client.post(
                f"/api/appointments/{booked.id}/reschedule",
                json={"slot_id": new.id},
                headers=bearer(Role.DOCTOR, str(doctor.id)),
            ),
            201,
        )
        assert moved["appointment"]["slot_id"] == new.id
        assert moved["appointment"]["patient_id"] == "alice"
        assert moved["replaced"]["status"] == "cancelled"
        delta = await watcher.next_delta()  # one version: old freed, new taken
        assert {s.id: s.status.value for s in delta.slots} == {old.id: "free", new.id: "busy"}
