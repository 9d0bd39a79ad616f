"""Visit details against the real server: a reason (the patient's or the front desk's)
and a contact are stored with the appointment, bounded, shown to staff and the patient
themselves, and never to other patients; a move keeps them and erasure clears them.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client import ClientError, SlotcastClient
from protocol.errors import ErrorCode
from protocol.messages import AppointmentEvent
from protocol.vocabulary import Role
from store.lifecycle import erase_patient
from store.pool import Store
from testkit.fixtures import SeededDoctor, token, ws_url

AppClient = TestClient[web.Request, web.Application]
LONG = timedelta(hours=2)
ADMIN = {"Authorization": f"Bearer {token(Role.ADMIN, 'desk', ttl=LONG)}"}


async def test_the_front_desk_books_with_visit_details_that_staff_and_the_patient_see(
    store: Store, doctor: SeededDoctor, client: AppClient
) -> None:
    url = ws_url(client)
    day = doctor.slots[0].start.date()
    async with (
        SlotcastClient.connect(url, token=token(Role.ADMIN, "desk", ttl=LONG)) as desk,
        SlotcastClient.connect(url, token=token(Role.PATIENT, "gina", ttl=LONG)) as gina,
        SlotcastClient.connect(url, token=token(Role.PATIENT, "hugo", ttl=LONG)) as hugo,
    ):
        await gina.watch_appointments()
        await hugo.watch(doctor.id, doctor.start, doctor.end)
        booked = await desk.book(
            doctor.slots[0].id,
            patient_id="gina",
            patient_name="Gina Rossi",
            visit_reason="Sore throat for a week",
            patient_contact="+44 20 7946 0958",
        )
        details = (booked.patient_name, booked.visit_reason, booked.patient_contact)
        assert details == ("Gina Rossi", "Sore throat for a week", "+44 20 7946 0958")

        # The patient's own room and list carry them.
        event = await gina.next_event()
        assert isinstance(event, AppointmentEvent)
        assert event.appointment.visit_reason == "Sore throat for a week"
        [mine] = await gina.my_appointments()
        assert mine.patient_contact == "+44 20 7946 0958"

        # Staff: the dashboard and the day list.
        dashboard = await desk.watch_dashboard(doctor.id, day)
        [row] = [a for a in dashboard.appointments if a.id == booked.id]
        assert (row.visit_reason, row.patient_contact) == details[1:]
        listed = await client.get(
            f"/api/doctors/{doctor.id}/appointments", params={"date": str(day)}, headers=ADMIN
        )
        assert listed.status == 200
        [got] = (await listed.json())["appointments"]
        assert (got["visit_reason"], got["patient_contact"]) == details[1:]

        # Another patient sees only the slot turn busy, and cannot list the day.
        delta = await hugo.next_delta()
        assert [s.id for s in delta.slots] == [doctor.slots[0].id]
        with pytest.raises(ClientError) as other:
            await hugo.list_appointments(doctor.id, day)
        assert other.value.code is ErrorCode.FORBIDDEN

        # A move keeps the details; the patient may give a reason when confirming a hold.
        moved = await desk.reschedule(booked.id, doctor.slots[1].id)
        assert (moved.appointment.visit_reason, moved.appointment.patient_contact) == details[1:]
        hold = await gina.hold(doctor.slots[2].id)
        assert hold.visit_reason is None
        confirmed = await gina.book(hold_id=hold.id, visit_reason="Follow-up")
        assert (confirmed.visit_reason, confirmed.patient_contact) == ("Follow-up", None)

    # The change log (whence dashboards and webhook payloads) carries them, named.
    logged_reasons = await store.fetchval(
        "SELECT array_agg(DISTINCT a->>'visit_reason') FROM changes,"
        " jsonb_array_elements(private->'appointments') a WHERE a->>'patient_id' = 'gina'"
    )
    assert set(logged_reasons) == {None, "Sore throat for a week", "Follow-up"}

    # Erasure forgets them, in the rows and in the change log.
    assert (await erase_patient(store, "gina")).total > 0
    left = await store.fetchval(
        "SELECT count(*) FROM appointments"
        " WHERE visit_reason IS NOT NULL OR patient_contact IS NOT NULL"
    )
    logged = await store.fetchval(
        "SELECT count(*) FROM changes, jsonb_array_elements(private->'appointments') a"
        " WHERE a->>'visit_reason' IS NOT NULL OR a->>'patient_contact' IS NOT NULL"
    )
    assert (left, logged) == (0, 0)


OUT_OF_BOUNDS = [
    ("visit_reason", "x" * 301),
    ("visit_reason", ""),
    ("visit_reason", "a\x00b"),
    ("patient_contact", "call me maybe"),
    ("patient_contact", "12"),
    ("patient_contact", "@example.org"),
    ("patient_contact", "a@" + "b" * 120 + ".org"),
]


async def test_visit_details_out_of_bounds_are_invalid(
    doctor: SeededDoctor, client: AppClient
) -> None:
    for field, value in OUT_OF_BOUNDS:
        body = {"slot_id": doctor.slots[0].id, "patient_id": "ivy", field: value}
        resp = await client.post("/api/appointments", json=body, headers=ADMIN)
        assert resp.status == 422, (field, value)
        assert (await resp.json())["error"]["code"] == ErrorCode.INVALID.value


async def test_a_contact_is_a_phone_number_or_an_e_mail_address(
    doctor: SeededDoctor, client: AppClient
) -> None:
    contacts = ["ivy.chen@example.org", "(020) 7946-0958", "+1 415 555 0100"]
    for n, (slot, contact) in enumerate(zip(doctor.slots, contacts, strict=False)):
        body = {"slot_id": slot.id, "patient_id": f"ivy{n}", "patient_contact": contact}
        resp = await client.post("/api/appointments", json=body, headers=ADMIN)
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["appointment"]["patient_contact"] == contact
