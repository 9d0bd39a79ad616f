"""The front desk (/clinic) in a real browser, against a real `slotcast serve --demo`.

Staff with an admin token see every doctor's day side by side, live; search the doctors
(Enter goes to the first), pick any date, print the day list, and book, move and cancel
for a patient who phoned in, whose own page follows each step live. One server serves
the whole flow (startup is most of a browser test's time).
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Any

import aiohttp
from playwright.async_api import Locator, Page, expect

from protocol.vocabulary import Role
from testkit.browser import DESKTOP, PHONE, TABLET, Pages
from testkit.fixtures import Spawn, token
from testkit.harness import ServerProcess
from tests.browser.kit import (
    MODULE_MARKS,
    appointments,
    audit,
    dashboard_day,
    demo_doctor,
    get_json,
    hold_panel,
    local,
    message,
    my_appointment,
    online,
    patient_url,
    post_json,
    row,
    show_slot,
    slot,
    start,
)

pytestmark = MODULE_MARKS

Free = dict[date, list[tuple[int, datetime]]]
WEEK = timedelta(days=7)


def clinic_url(server: ServerProcess) -> str:
    return f"{server.http_url}/clinic#token={token(Role.ADMIN, 'desk')}"


async def free_by_day(http: aiohttp.ClientSession, server: ServerProcess, doctor: Any) -> Free:
    """The doctor's free slots of the next two weeks, by the doctor's local date."""
    today = date.today()
    snapshot = await get_json(
        http,
        f"{server.http_url}/api/doctors/{doctor['id']}/slots",
        params={"start": today.isoformat(), "end": (today + timedelta(days=16)).isoformat()},
    )
    found: Free = {}
    for s in snapshot["slots"]:
        if s["status"] == "free":
            at = datetime.fromisoformat(s["start"].replace("Z", "+00:00"))
            found.setdefault(local(at, doctor["timezone"]).date(), []).append((s["id"], at))
    return found


def doctor_card(page: Page, doctor_id: int) -> Locator:
    return page.locator(f'[data-testid=clinic-doctor][data-doctor-id="{doctor_id}"]')


def clinic_row(page: Page, doctor_id: int, slot_id: int) -> Locator:
    return doctor_card(page, doctor_id).locator(
        f'[data-testid=clinic-row][data-slot-id="{slot_id}"]'
    )


async def day_shown(page: Page, doctor_id: int, day: date) -> None:
    listed = doctor_card(page, doctor_id).get_by_test_id("clinic-day")
    await expect(listed).to_have_attribute("data-date", day.isoformat())
    await expect(listed).to_have_attribute("data-version", re.compile(r"^\d+$"))


async def fits_width(page: Page) -> bool:
    return bool(
        await page.evaluate(
            "() => document.scrollingElement.scrollWidth <= document.documentElement.clientWidth"
        )
    )


async def pick_date(page: Page, day: date) -> None:
    await page.get_by_label("Day", exact=True).fill(day.isoformat())


async def test_the_front_desk_runs_every_doctors_day_live(
    spawn_server: Spawn, database_url: str, http: aiohttp.ClientSession, pages: Pages
) -> None:
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    amara = await demo_doctor(http, server, "Dr. Amara Okafor")
    ada_free = await free_by_day(http, server, ada)
    amara_free = await free_by_day(http, server, amara)
    # A day on which both doctors have free times, as has Dr. Okafor a week later.
    day = next(
        d
        for d in sorted(ada_free)
        if len(ada_free[d]) >= 2 and len(amara_free.get(d, [])) >= 2 and d + WEEK in amara_free
    )
    (a0, a0_at) = ada_free[day][0]
    (m0, m0_at), (m1, _) = amara_free[day][:2]
    at = lambda when, doctor: local(when, doctor["timezone"]).strftime("%H:%M")  # noqa: E731

    desk = await pages.open(clinic_url(server), name="desk")
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    bob = await pages.open(patient_url(server, amara["id"], "bob"), name="bob")
    for page in (desk, alice, bob):
        await online(page)
    # Every demo doctor, each with a link to their own dashboard (no typing ?doctor=).
    await expect(desk.get_by_test_id("clinic-doctor")).to_have_count(6)
    link = desk.get_by_role("link", name="Dashboard of Dr. Ada Moreau")
    await expect(link).to_have_attribute("href", f"/doctor?doctor={ada['id']}")

    # Any date, through the date picker: a week later, then the day of the test.
    later = day + WEEK
    await pick_date(desk, later)
    await day_shown(desk, ada["id"], later)
    await expect(clinic_row(desk, ada["id"], a0)).to_have_count(0)
    await pick_date(desk, day)
    for doctor in (ada, amara):
        await day_shown(desk, doctor["id"], day)
    await expect(clinic_row(desk, ada["id"], a0)).to_have_attribute("data-status", "free")
    await expect(clinic_row(desk, ada["id"], a0)).to_contain_text(at(a0_at, ada))
    await expect(clinic_row(desk, amara["id"], m0)).to_have_attribute("data-status", "free")

    # A patient books on her own page: the front desk sees it live, by name.
    await show_slot(alice, ada["id"], a0)
    await slot(alice, a0).click()
    await hold_panel(alice).get_by_role("button", name="Confirm booking").click()
    await expect(alice.get_by_test_id("confirmation")).to_be_visible()
    alice_row = clinic_row(desk, ada["id"], a0)
    await expect(alice_row).to_have_attribute("data-status", "busy")
    await expect(alice_row.get_by_test_id("patient")).to_have_text("Alice Martin")

    # Bob phones in: the desk books him with Dr. Okafor; his own page shows it live.
    await desk.get_by_role("button", name=f"Book {at(m0_at, amara)} with Dr. Amara Okafor").click()
    dialog = desk.get_by_test_id("desk-dialog")
    await expect(dialog).to_be_visible()
    await expect(dialog.get_by_label("Patient's sign-in ID")).to_be_focused()
    assert await audit(desk) == ""
    await dialog.get_by_label("Patient's sign-in ID").fill("bob")
    await dialog.get_by_label("Patient's name").fill("Bob Nguyen")
    await dialog.get_by_label("Phone or e-mail").fill("+44 20 7946 0958")
    await dialog.get_by_label("Reason for the visit").fill("Back pain since Monday")
    await dialog.get_by_role("button", name="Book", exact=True).click()
    await expect(dialog).to_have_count(0)
    bob_row = clinic_row(desk, amara["id"], m0)
    # The keyboard stays on the row the booking was made from.
    await desk.wait_for_function(
        """slotId => document.activeElement?.closest("[data-testid=clinic-row]")
            ?.dataset.slotId === String(slotId)""",
        arg=m0,
    )
    await expect(bob_row.get_by_test_id("patient")).to_have_text("Bob Nguyen")
    await expect(bob_row.get_by_test_id("reason")).to_contain_text("Back pain since Monday")
    await expect(bob_row.get_by_test_id("contact")).to_contain_text("+44 20 7946 0958")
    [booked] = await appointments(database_url, m0)
    assert (booked["patient_id"], booked["status"]) == ("bob", "booked")
    await expect(my_appointment(bob, booked["id"])).to_have_attribute("data-status", "booked")

    # The printed day list: appointments only, with patient, reason and contact.
    await desk.emulate_media(media="print")
    await expect(desk.get_by_test_id("doctor-filter")).to_be_hidden()
    await expect(clinic_row(desk, amara["id"], m1)).to_be_hidden()
    await expect(bob_row).to_be_visible()
    await expect(bob_row).to_contain_text(at(m0_at, amara))
    await expect(bob_row).to_contain_text("Bob Nguyen")
    await expect(bob_row).to_contain_text("Back pain since Monday")
    await expect(bob_row).to_contain_text("+44 20 7946 0958")
    # Its buttons are there but not printed (nor exposed while printing).
    await expect(bob_row.locator("button")).to_have_count(2)
    await expect(bob_row.locator("button").first).to_be_hidden()
    await expect(alice_row).to_contain_text("Alice Martin")
    await desk.emulate_media(media="screen")

    # Moved on his behalf to a week later: the old time frees in the same step, and
    # his page follows.
    (m7, m7_at) = amara_free[later][0]
    await bob_row.get_by_role("button", name=f"Reschedule {at(m0_at, amara)}, Bob Nguyen").click()
    await dialog.get_by_label("New day").fill(later.isoformat())
    new_time = dialog.get_by_label("New time")
    await expect(new_time.locator("option", has_text=at(m7_at, amara))).to_have_count(1)
    await new_time.select_option(label=at(m7_at, amara))
    await dialog.get_by_role("button", name="Move appointment").click()
    await expect(message(desk, "rescheduled")).to_be_visible()
    await expect(bob_row).to_have_attribute("data-status", "free")
    moved = [r for r in await appointments(database_url, m7) if r["status"] == "booked"]
    await expect(my_appointment(bob, moved[0]["id"])).to_have_attribute("data-status", "booked")
    await pick_date(desk, later)
    moved_row = clinic_row(desk, amara["id"], m7)
    await expect(moved_row.get_by_test_id("patient")).to_have_text("Bob Nguyen")
    await expect(moved_row.get_by_test_id("reason")).to_contain_text("Back pain since Monday")

    # Cancelled on his behalf.
    await moved_row.get_by_role("button", name=f"Cancel {at(m7_at, amara)}, Bob Nguyen").click()
    await dialog.get_by_role("button", name="Cancel appointment").click()
    await expect(moved_row).to_have_attribute("data-status", "free")
    await expect(my_appointment(bob, moved[0]["id"])).to_have_attribute("data-status", "cancelled")

    # The overview with appointments passes the audit on a desktop, a phone and a tablet,
    # and never scrolls sideways.
    assert await audit(desk) == ""
    phone = await pages.open(clinic_url(server), name="desk-phone", viewport=PHONE)
    await online(phone)
    await pick_date(phone, day)
    await expect(clinic_row(phone, ada["id"], a0).get_by_test_id("patient")).to_have_text(
        "Alice Martin"
    )
    assert await audit(phone) == ""
    assert await fits_width(phone), "the front desk scrolls sideways on a phone"
    await desk.set_viewport_size(TABLET)  # type: ignore[arg-type]
    assert await audit(desk) == ""
    assert await fits_width(desk), f"the front desk scrolls sideways at {TABLET['width']} px"
    await desk.set_viewport_size(DESKTOP)  # type: ignore[arg-type]

    # Search: Enter goes to the first match, and clearing it brings every doctor back.
    search = desk.get_by_role("searchbox", name="Find a doctor")
    await search.fill("cardio")
    await search.press("Enter")
    await expect(desk.get_by_test_id("clinic-doctor")).to_have_count(1)
    await expect(desk.get_by_role("heading", name="Dr. Kenji Sato")).to_be_focused()
    await search.fill("")
    await search.press("Enter")
    await expect(desk.get_by_test_id("clinic-doctor")).to_have_count(6)

    # A doctor who opens the front desk sees their own day only, with nothing to search.
    own = await pages.open(
        f"{server.http_url}/clinic#token={token(Role.DOCTOR, str(ada['id']))}", name="ada"
    )
    await online(own)
    await expect(own.get_by_test_id("clinic-doctor")).to_have_count(1)
    await expect(own.get_by_role("heading", name="Dr. Ada Moreau")).to_be_visible()
    await expect(own.get_by_role("searchbox", name="Find a doctor")).to_be_hidden()

    # The dashboard link opens that doctor's own page, signed in as the same admin, where
    # a booking's visit reason and contact show beside the patient's name.
    a1 = ada_free[day][1][0]
    admin = {"Authorization": f"Bearer {token(Role.ADMIN, 'desk')}"}
    body = {
        "slot_id": a1,
        "patient_id": "chloe",
        "visit_reason": "Vaccination",
        "patient_contact": "chloe@example.org",
    }
    await post_json(http, f"{server.http_url}/api/appointments", body, 201, headers=admin)
    await desk.get_by_role("link", name="Dashboard of Dr. Ada Moreau").click()
    await expect(desk).to_have_url(re.compile(rf"/doctor\?doctor={ada['id']}$"))
    timeline = await dashboard_day(desk, day)
    await expect(row(timeline, a1).get_by_test_id("visit-reason")).to_have_text("Vaccination")
    await expect(row(timeline, a1).get_by_test_id("contact")).to_have_text("chloe@example.org")


async def test_the_demo_signs_the_front_desk_in(spawn_server: Spawn, pages: Pages) -> None:
    """`make run` needs no token from anywhere: the demo's sign-in form on /clinic offers
    the front desk (an admin), and signing in shows every doctor's day."""
    (server,) = await start(spawn_server, "s1")
    desk = await pages.open(f"{server.http_url}/clinic", name="desk")
    form = desk.get_by_test_id("signin")
    await expect(form).to_be_visible()
    await expect(desk.get_by_label("Demo identity")).to_have_value("admin:desk")
    await form.get_by_role("button", name="Sign in").click()
    await expect(desk.get_by_test_id("whoami")).to_have_text("Front desk")
    await expect(desk.get_by_test_id("clinic-doctor")).to_have_count(6)
