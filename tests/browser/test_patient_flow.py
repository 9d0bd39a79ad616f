"""The patient's side after the slot is picked (issue 16, items 3, 7 and 8), in Chromium.

Booking ends on a confirmation that says whom, when (both clocks), how long and where,
and hands over a calendar file; a booking moves to another time from My appointments,
live on every page, and a lost race leaves it where it was, in words; on a phone My
appointments is one tap away; offline, the week is visibly inactive and nothing pressed
is sent later; a hold warns before it lapses, and a lapsed one names doctor and day
with "Book again". Real server processes, real PostgreSQL, real WebSockets, as in
test_browser.py; each test starts one instance.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from icalendar import Calendar
from playwright.async_api import Page, expect

from protocol.vocabulary import Role
from testkit.browser import PHONE, Pages
from testkit.fixtures import Spawn, token
from testkit.harness import ServerProcess
from tests.browser.kit import (
    MODULE_MARKS,
    PATIENT_TZ,
    RECONNECT_MS,
    appointments,
    audit,
    calendar,
    calendar_loaded,
    connection,
    demo_doctor,
    first_free_slot,
    hold_panel,
    local,
    message,
    my_appointment,
    online,
    open_slots,
    patient_url,
    post_json,
    show_slot,
    slot,
    start,
)

pytestmark = MODULE_MARKS

CLINIC = "Clinique du Parc"
ADA_TZ = "Europe/Paris"
LOS_ANGELES = "America/Los_Angeles"


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(Role.PATIENT, sub)}"}


async def book(http: aiohttp.ClientSession, url: str, sub: str, slot_id: int) -> dict[str, Any]:
    body = await post_json(
        http, f"{url}/api/appointments", {"slot_id": slot_id}, 201, headers=bearer(sub)
    )
    appointment: dict[str, Any] = body["appointment"]
    return appointment


def hm(at: datetime, zone: str) -> str:
    return f"{local(at, zone):%H:%M}"


def confirmation(page: Page) -> Any:
    return page.get_by_test_id("confirmation")


def reschedule_bar(page: Page) -> Any:
    return page.get_by_role("region", name="Choose a new time")


async def test_the_confirmation_names_both_times_and_adds_the_booking_to_a_calendar(
    spawn_server: Spawn,
    database_url: str,
    http: aiohttp.ClientSession,
    pages: Pages,
    tmp_path: Path,
) -> None:
    """A patient in Los Angeles books a Paris doctor: the confirmation (focused) gives
    the doctor, her time and the clinic's, the length and the clinic's name; "Add to
    calendar" downloads a calendar file whose one event is this appointment, in UTC."""
    (server,) = await start_one(spawn_server, {"SLOTCAST_CLINIC_NAME": CLINIC})
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open(
        patient_url(server, ada["id"], "alice"), name="alice", timezone=LOS_ANGELES
    )
    slot_id = await first_free_slot(alice, ada["id"])
    await slot(alice, slot_id).click()
    # Why she comes, told with the booking (optional): the clinic's staff read it.
    await hold_panel(alice).get_by_label("Reason for your visit").fill("Knee pain after running")
    await hold_panel(alice).get_by_role("button", name="Confirm booking").click()

    view = confirmation(alice)
    await expect(view).to_be_visible()
    heading = view.get_by_role("heading", name="You are booked")
    await expect(heading).to_be_focused()
    await expect(message(alice, "booked")).to_have_count(0)  # no toast over the header
    (row,) = await appointments(database_url, slot_id)
    appointment_id = row["id"]
    await expect(view).to_have_attribute("data-appointment-id", str(appointment_id))
    starts, ends = await slot_times(http, server.http_url, ada["id"], slot_id)
    facts = view.locator("dd")
    await expect(view.locator('[data-field="doctor"]')).to_have_text("Dr. Ada Moreau")
    await expect(view.locator('[data-field="when"]')).to_contain_text(hm(starts, LOS_ANGELES))
    await expect(view.locator('[data-field="clinic-when"]')).to_contain_text(hm(starts, ADA_TZ))
    minutes = int((ends - starts).total_seconds() // 60)
    await expect(view.locator('[data-field="length"]')).to_have_text(f"{minutes} minutes")
    await expect(view.locator('[data-field="place"]')).to_have_text(CLINIC)
    await expect(view.locator('[data-field="reason"]')).to_have_text("Knee pain after running")
    await expect(facts).to_have_count(6)
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT visit_reason FROM appointments WHERE id = $1", appointment_id
        )
    finally:
        await conn.close()
    assert stored == "Knee pain after running"

    async with alice.expect_download() as downloading:
        await view.get_by_role("button", name="Add to calendar").click()
    download = await downloading.value
    assert download.suggested_filename == f"appointment-{appointment_id}.ics"
    saved = tmp_path / "appointment.ics"
    await download.save_as(saved)
    (event,) = Calendar.from_ical(saved.read_bytes()).walk("VEVENT")
    assert str(event["UID"]).startswith(f"appointment-{appointment_id}@")
    assert event.decoded("DTSTART") == starts
    assert event.decoded("DTEND") == ends
    assert event.decoded("DTSTART").utcoffset() == timedelta(0)  # written in UTC
    assert str(event["SUMMARY"]) == "Appointment with Dr. Ada Moreau"
    assert str(event["LOCATION"]) == CLINIC
    assert str(event["STATUS"]) == "CONFIRMED"

    assert await audit(alice) == ""
    await alice.set_viewport_size(PHONE)  # type: ignore[arg-type]
    await expect(heading).to_be_visible()
    assert await audit(alice) == ""

    await view.get_by_role("button", name="Done").click()
    await expect(view).to_be_hidden()


async def test_a_booking_moves_to_another_time_and_a_lost_race_keeps_it(
    spawn_server: Spawn, database_url: str, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """From My appointments, Reschedule: the week of that doctor with a "choose a new
    time" bar. A time Bob books first is explained and the booking stays; the next time
    moves it, freeing the old slot in the same change, live on Bob's page."""
    (server,) = await start_one(spawn_server)
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    (old_id, old_at), (lost_id, lost_at), (new_id, new_at) = await open_slots(http, server, ada, 3)
    booked = await book(http, server.http_url, "alice", old_id)
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    bob = await pages.open(patient_url(server, ada["id"], "bob"), name="bob")
    on_bob = {i: await show_slot(bob, ada["id"], i) for i in (old_id, new_id)}
    await expect(on_bob[old_id]).to_have_attribute("data-status", "busy")

    mine = my_appointment(alice, booked["id"])
    await expect(mine).to_have_attribute("data-status", "booked")
    await mine.get_by_role("button", name=re.compile(r"^Reschedule")).click()
    bar = reschedule_bar(alice)
    await expect(bar).to_be_visible()
    await expect(bar.get_by_role("heading")).to_be_focused()
    await expect(bar).to_contain_text(hm(old_at, PATIENT_TZ))
    await calendar_loaded(alice, ada["id"])

    # Bob takes the time Alice picked while she reads the question.
    await (await show_slot(alice, ada["id"], lost_id)).click()
    move = bar.get_by_role("button", name="Move appointment")
    await expect(move).to_be_focused()
    await expect(bar).to_contain_text(hm(lost_at, PATIENT_TZ))
    await book(http, server.http_url, "bob", lost_id)
    await move.click()
    problem = bar.get_by_role("alert")
    await expect(problem).to_contain_text("Someone else took")
    # (Times as patientWhen words them: the clock time is in there, whatever label follows.)
    await expect(problem).to_contain_text(
        re.compile(rf"{hm(old_at, PATIENT_TZ)}.* is still booked")
    )
    assert [(r["patient_id"], r["status"]) for r in await appointments(database_url, old_id)] == [
        ("alice", "booked")
    ]
    await expect(mine).to_have_attribute("data-status", "booked")

    # Another time: moved, the old slot free again, on both pages.
    await (await show_slot(alice, ada["id"], new_id)).click()
    await move.click()
    view = confirmation(alice)
    await expect(view.get_by_role("heading", name="Your appointment is moved")).to_be_focused()
    await expect(view).to_contain_text(hm(new_at, PATIENT_TZ))
    await expect(bar).to_be_hidden()
    await expect(on_bob[new_id]).to_have_attribute("data-status", "busy")
    await expect(on_bob[old_id]).to_have_attribute("data-status", "free")
    await expect(slot(alice, old_id)).to_have_attribute("data-status", "free")
    rows = {i: await appointments(database_url, i) for i in (old_id, new_id)}
    assert [(r["patient_id"], r["status"]) for r in rows[old_id]] == [("alice", "cancelled")]
    assert [(r["patient_id"], r["status"]) for r in rows[new_id]] == [("alice", "booked")]
    await expect(my_appointment(alice, rows[new_id][0]["id"])).to_have_attribute(
        "data-status", "booked"
    )
    await expect(mine).to_contain_text("Rescheduled")

    # The clinic cancels the moved booking: a warning naming doctor and day, Book again.
    await post_json(
        http,
        f"{server.http_url}/api/appointments/{rows[new_id][0]['id']}/cancel",
        {"reason": "The doctor is ill"},
        200,
        headers={"Authorization": f"Bearer {token(Role.DOCTOR, str(ada['id']))}"},
    )
    cancelled = message(alice, "cancelled")
    await expect(cancelled).to_have_class(re.compile(r"\bmessage-warning\b"))
    await expect(cancelled).to_contain_text("Dr. Ada Moreau")
    await expect(cancelled).to_contain_text(hm(new_at, PATIENT_TZ))
    await expect(cancelled.get_by_role("button", name="Book again")).to_be_visible()


async def test_on_a_phone_my_appointments_are_one_tap_from_the_top(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """Below the week on a phone, My appointments are reached from a link at the top
    that counts them; on a desktop, where they sit beside the week, there is no link."""
    (server,) = await start_one(spawn_server)
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    (first_id, _), (second_id, _) = await open_slots(http, server, ada, 2)
    for slot_id in (first_id, second_id):
        await book(http, server.http_url, "alice", slot_id)
    phone = await pages.open(
        patient_url(server, ada["id"], "alice"),
        name="phone",
        viewport=PHONE,
        is_mobile=True,
        has_touch=True,
    )
    await calendar_loaded(phone, ada["id"])
    jump = phone.get_by_role("link", name="My appointments (2)")
    await expect(jump).to_be_in_viewport()
    await jump.click()
    heading = phone.get_by_role("heading", name="My appointments")
    await expect(heading).to_be_focused()
    await expect(heading).to_be_in_viewport()
    assert "#" not in phone.url  # the address keeps no fragment (tokens travel there)

    desktop = await pages.open(patient_url(server, ada["id"], "alice"), name="desktop")
    await calendar_loaded(desktop, ada["id"])
    await expect(desktop.get_by_test_id("jump-appointments")).to_be_hidden()


async def test_offline_the_week_is_inactive_and_nothing_pressed_is_sent_later(
    spawn_server: Spawn, database_url: str, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """Offline, the week says so and its slots cannot be pressed; a press then sends
    nothing, then or after reconnecting (Bob's page and the database see no hold).
    Back online the slots work again, and a hold taken then is taken once."""
    (server,) = await start_one(spawn_server)
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    bob = await pages.open(patient_url(server, ada["id"], "bob"), name="bob")
    slot_id = await first_free_slot(alice, ada["id"])
    on_bob = await show_slot(bob, ada["id"], slot_id)

    await alice.context.set_offline(True)
    await expect(connection(alice)).to_have_attribute("data-state", "offline")
    note = alice.get_by_test_id("offline-note")
    await expect(note).to_be_visible()
    await expect(note).to_contain_text("Nothing you press now is sent later")
    target = slot(alice, slot_id)
    await expect(target).to_be_disabled()
    await expect(calendar(alice).locator(".slot:enabled")).to_have_count(0)
    await target.click(force=True)
    assert await audit(alice) == ""
    await alice.set_viewport_size(PHONE)  # type: ignore[arg-type]
    assert await audit(alice) == ""

    await alice.context.set_offline(False)
    await online(alice, RECONNECT_MS)
    await expect(note).to_be_hidden()
    await expect(target).to_be_enabled()
    await expect(hold_panel(alice)).to_have_count(0)
    await expect(on_bob).to_have_attribute("data-status", "free")
    assert await appointments(database_url, slot_id) == []

    await target.click()
    await expect(hold_panel(alice)).to_be_visible()
    await expect(on_bob).to_have_attribute("data-status", "busy-tentative")
    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "pending")]


async def test_a_hold_warns_before_it_lapses_and_the_lapse_offers_book_again(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """A short hold: the panel warns once (an alert) and its countdown turns urgent; then
    a warning (not a success) names the doctor and the day, and Book again brings that
    doctor's week back with the time free again."""
    (server,) = await start_one(
        spawn_server, {"SLOTCAST_HOLD_TTL_S": "8", "SLOTCAST_HOLD_SWEEP_S": "0.5"}
    )
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    slot_id = await first_free_slot(alice, ada["id"])
    starts, _ = await slot_times(http, server.http_url, ada["id"], slot_id)
    await slot(alice, slot_id).click()
    panel = hold_panel(alice)
    await expect(panel).to_be_visible()
    await expect(panel.get_by_role("alert")).to_contain_text("Less than 30 seconds left")
    await expect(panel).to_have_attribute("data-urgency", "now")

    lapsed = message(alice, "hold_expired")
    await expect(lapsed).to_be_visible()
    await expect(lapsed).to_have_class(re.compile(r"\bmessage-warning\b"))
    await expect(lapsed).to_contain_text("Dr. Ada Moreau")
    await expect(lapsed).to_contain_text(hm(starts, PATIENT_TZ))
    day = local(starts, PATIENT_TZ)
    await expect(lapsed).to_contain_text(re.compile(rf"{day:%a}\w*,? {day.day} {day:%b}"))
    await expect(panel).to_have_count(0)

    # Away to another doctor first: Book again must bring Ada's week back.
    await (
        alice.get_by_test_id("doctor-results")
        .get_by_role("button", name=re.compile("Kenji"))
        .click()
    )
    await expect(calendar(alice)).not_to_have_attribute("data-doctor-id", str(ada["id"]))
    await lapsed.get_by_role("button", name="Book again").click()
    await calendar_loaded(alice, ada["id"])
    await expect(alice.get_by_role("heading", name="Dr. Ada Moreau")).to_be_focused()
    await expect(slot(alice, slot_id)).to_have_attribute("data-status", "free")


# ---- helpers -----------------------------------------------------------------------------------


async def start_one(spawn: Spawn, env: dict[str, str] | None = None) -> list[ServerProcess]:
    return await start(spawn, "s1", env=env or {})


async def slot_times(
    http: aiohttp.ClientSession, url: str, doctor_id: int, slot_id: int
) -> tuple[datetime, datetime]:
    today = datetime.now(UTC).date()
    async with http.get(
        f"{url}/api/doctors/{doctor_id}/slots",
        params={
            "start": (today - timedelta(days=1)).isoformat(),
            "end": (today + timedelta(days=22)).isoformat(),
        },
    ) as resp:
        snapshot = await resp.json()
    found = next(s for s in snapshot["slots"] if s["id"] == slot_id)
    return datetime.fromisoformat(found["start"]), datetime.fromisoformat(found["end"])
