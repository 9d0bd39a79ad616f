"""The schedule editor on the doctor's dashboard, in Chromium against a real server.

The doctor changes the weekly hours and a patient's open page follows at once; before
saving, the editor names the booked patient the change would strand; a whole day is
blocked with a reason the dashboard shows and the patient never sees; and a booked
appointment is moved to another free time from the dashboard while a patient watches
the old time free up and the new one fill. The editor passes axe-core's audit on a
desktop and on a phone.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Any

import aiohttp
from playwright.async_api import expect

from protocol.vocabulary import Role
from testkit.browser import PHONE, Pages
from testkit.fixtures import Spawn, token
from testkit.harness import ServerProcess
from tests.browser.kit import (
    MODULE_MARKS,
    appointments,
    audit,
    dashboard_day,
    demo_doctor,
    doctor_url,
    get_json,
    local,
    message,
    open_slots,
    patient_url,
    post_json,
    row,
    show_slot,
    slot,
    start,
)

pytestmark = MODULE_MARKS

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


async def book_for(
    http: aiohttp.ClientSession, server: ServerProcess, slot_id: int, sub: str
) -> int:
    booked = await post_json(
        http,
        f"{server.http_url}/api/appointments",
        {"slot_id": slot_id, "idempotency_key": f"{sub}-{slot_id}"},
        201,
        headers={"Authorization": f"Bearer {token(Role.PATIENT, sub, name='Alice Martin')}"},
    )
    appointment_id: int = booked["appointment"]["id"]
    return appointment_id


async def free_slot_on_another_day(
    http: aiohttp.ClientSession, server: ServerProcess, doctor: dict[str, Any], not_on: date
) -> tuple[int, date]:
    """A free slot of the doctor on a later local date than `not_on`, and that date."""
    snapshot = await get_json(
        http,
        f"{server.http_url}/api/doctors/{doctor['id']}/slots",
        params={"start": not_on.isoformat(), "end": (not_on + timedelta(days=7)).isoformat()},
    )
    for s in snapshot["slots"]:
        day = local(_instant(s["start"]), doctor["timezone"]).date()
        if s["status"] == "free" and day > not_on:
            return s["id"], day
    raise AssertionError("no free slot in the week after")


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_editing_the_weekly_hours_previews_the_conflict_and_every_page_follows(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """Close the weekday of Alice's booking: the preview names her before anything is
    saved; once saved, Bob's open page loses that day's free times at once, her booking
    stays, and the dashboard marks it as a conflict."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    zone = ada["timezone"]
    (booked_id, booked_at), (free_id, _) = await open_slots(http, server, ada, 2)
    await book_for(http, server, booked_id, "alice")
    day = local(booked_at, zone).date()
    weekday = WEEKDAYS[day.isoweekday() - 1]

    bob = await pages.open(patient_url(server, ada["id"], "bob"), name="bob")
    on_bob = await show_slot(bob, ada["id"], free_id)
    await expect(on_bob).to_have_attribute("data-status", "free")
    dash = await pages.open(doctor_url(server, ada["id"]), name="doctor")
    timeline = await dashboard_day(dash, day)

    await dash.get_by_role("button", name="Edit schedule").click()
    editor = dash.get_by_test_id("schedule-editor")
    await expect(editor).to_be_visible()
    await expect(dash.get_by_role("button", name="Edit schedule")).to_have_attribute(
        "aria-expanded", "true"
    )
    assert await audit(dash) == ""

    # Close that weekday: remove each of its blocks of hours.
    remove = editor.get_by_role("button", name=re.compile(rf"^Remove {weekday} "))
    while await remove.count():
        await remove.first.click()
    await expect(
        editor.locator(f'[data-testid=weekday][data-weekday="{day.isoweekday()}"]')
    ).to_contain_text("Closed")

    # Preview first: Alice's booking is named, nothing is saved yet.
    await editor.get_by_role("button", name="Preview changes").click()
    preview = dash.get_by_test_id("schedule-preview")
    await expect(preview).to_contain_text("1 appointment would fall outside these hours")
    await expect(preview.get_by_test_id("preview-conflicts")).to_contain_text(
        f"{local(booked_at, zone):%H:%M}, booked by Alice Martin"
    )
    await expect(on_bob).to_have_attribute("data-status", "free")
    assert await audit(dash) == ""

    await editor.get_by_role("button", name="Save anyway").click()
    await expect(message(dash, "schedule_saved")).to_be_visible()
    await expect(editor).to_be_hidden()
    # Live: Bob's free time on that day is gone; Alice's booking stays, as a conflict.
    await expect(slot(bob, free_id)).to_have_count(0)
    await expect(slot(bob, booked_id)).to_have_attribute("data-status", "busy")
    await expect(row(timeline, booked_id)).to_have_attribute("data-conflict", "true")
    await expect(row(timeline, free_id)).to_have_count(0)


async def test_a_blocked_day_shows_its_reason_and_a_booking_moves_live(
    spawn_server: Spawn, http: aiohttp.ClientSession, database_url: str, pages: Pages
) -> None:
    """Block a whole day with a reason: the dashboard shows why, the patient sees it
    unavailable. Then move Alice's booking to another time from the dashboard while Bob
    watches: the old time frees and the new fills, in one change."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    zone = ada["timezone"]
    (old_id, old_at), (taken_id, taken_at), (new_id, new_at) = await open_slots(
        http, server, ada, 3
    )
    appointment_id = await book_for(http, server, old_id, "alice")
    day = local(old_at, zone).date()
    off_id, off_day = await free_slot_on_another_day(http, server, ada, day)

    bob = await pages.open(patient_url(server, ada["id"], "bob"), name="bob")
    on_bob_off = await show_slot(bob, ada["id"], off_id)
    await expect(on_bob_off).to_have_attribute("data-status", "free")
    dash = await pages.open(doctor_url(server, ada["id"]), name="doctor")
    timeline = await dashboard_day(dash, off_day)

    # The block form follows the day shown: a whole day, with a reason.
    form = dash.get_by_test_id("block-form")
    await expect(form.get_by_label("Date")).to_have_value(off_day.isoformat())
    await expect(form.get_by_label("Whole days")).to_be_checked()
    await expect(form.get_by_label("From")).to_be_disabled()
    await form.get_by_label("Reason").fill("Training day")
    await form.get_by_role("button", name="Block", exact=True).click()
    await expect(message(dash, "blocked")).to_contain_text("Training day")
    await expect(row(timeline, off_id)).to_have_attribute("data-status", "busy-unavailable")
    await expect(row(timeline, off_id).get_by_test_id("block-reason")).to_have_text("Training day")
    feed_top = dash.get_by_test_id("feed").locator("li").first
    await expect(feed_top).to_contain_text(re.compile(r"Blocked \d+ slots from .*: Training day"))
    await expect(on_bob_off).to_have_attribute("data-status", "busy-unavailable")
    await expect(on_bob_off).to_be_disabled()
    await expect(bob.get_by_text("Training day")).to_have_count(0)

    # Reschedule Alice from the dashboard while Bob watches both times.
    on_bob_old = await show_slot(bob, ada["id"], old_id)
    on_bob_new = slot(bob, new_id)
    await expect(on_bob_old).to_have_attribute("data-status", "busy")
    await expect(on_bob_new).to_have_attribute("data-status", "free")
    timeline = await dashboard_day(dash, day)
    old_time, new_time = f"{local(old_at, zone):%H:%M}", f"{local(new_at, zone):%H:%M}"
    await row(timeline, old_id).get_by_role("button", name=f"Reschedule {old_time}").click()
    picker = row(timeline, old_id).get_by_test_id("reschedule-form")
    await expect(picker.get_by_label("Day")).to_be_focused()  # the keyboard follows
    await expect(picker.get_by_label("Day")).to_have_value(day.isoformat())
    # Chloé books the time the doctor is about to pick: the lost race is explained in words.
    await picker.get_by_label("New time").select_option(label=f"{local(taken_at, zone):%H:%M}")
    await book_for(http, server, taken_id, "chloe")
    await picker.get_by_role("button", name="Move appointment").click()
    await expect(picker.get_by_role("alert")).to_contain_text("Someone else took that time")
    await expect(
        picker.get_by_label("New time").locator(f'option[value="{taken_id}"]')
    ).to_have_count(0)
    await picker.get_by_label("New time").select_option(label=new_time)
    await picker.get_by_role("button", name="Move appointment").click()
    await expect(row(timeline, old_id)).to_have_attribute("data-status", "free")
    await expect(row(timeline, new_id)).to_have_attribute("data-status", "busy")
    await expect(row(timeline, new_id)).to_contain_text("Alice Martin")
    await expect(on_bob_old).to_have_attribute("data-status", "free")
    await expect(on_bob_new).to_have_attribute("data-status", "busy")
    moved = await appointments(database_url, new_id)
    assert [(r["patient_id"], r["status"]) for r in moved] == [("alice", "booked")]
    assert [r["status"] for r in await appointments(database_url, old_id)] == ["cancelled"]
    assert appointment_id not in {r["id"] for r in moved}

    # On a phone, the editor and the block form pass the audit too.
    phone = await pages.open(doctor_url(server, ada["id"]), name="phone", viewport=PHONE)
    await dashboard_day(phone, off_day)
    await expect(
        row(phone.get_by_test_id("timeline"), off_id).get_by_test_id("block-reason")
    ).to_have_text("Training day")
    await phone.get_by_role("button", name="Edit schedule").click()
    await expect(phone.get_by_test_id("schedule-editor")).to_be_visible()
    assert await audit(phone) == ""
