"""The week grid across time zones and with the keyboard only, in Chromium.

A patient in Los Angeles with an American browser books a doctor in Tokyo: times on
the browser's 12-hour clock with a readable zone, the clinic's time beside them, the
days whose times fall on another date in Tokyo marked, "Next available" jumping to
the week of the first free time, and the booking marked as theirs in the week. A
patient in London with a British browser uses the page by keyboard alone: the focus
on the main heading after signing in, Enter in the search, the grid as one Tab stop
with the arrow keys inside, Enter to hold. Both screens pass the axe-core audit at
desktop and phone sizes.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
from playwright.async_api import Page, expect

from protocol.vocabulary import Role
from testkit.browser import PHONE, Pages
from testkit.fixtures import Spawn, token
from testkit.harness import ServerProcess
from tests.browser.kit import (
    MODULE_MARKS,
    audit,
    calendar,
    calendar_loaded,
    demo_doctor,
    get_json,
    hold_panel,
    local,
    online,
    patient_url,
    post_json,
    slot,
    start,
)

pytestmark = MODULE_MARKS

LOS_ANGELES = "America/Los_Angeles"
TOKYO = "Asia/Tokyo"
DAYS_OFF = 10  # the Tokyo doctor's first days off: the first free time is in a later week


async def tokyo_doctor(http: aiohttp.ClientSession, server: ServerProcess) -> dict[str, Any]:
    """A doctor in Tokyo, 09:00-11:00 every day, on leave for the first days from today."""
    admin = {"Authorization": f"Bearer {token(Role.ADMIN, 'ops')}"}
    created = await post_json(
        http,
        f"{server.http_url}/api/doctors",
        {"name": "Dr. Yui Tanaka", "timezone": TOKYO, "idempotency_key": "tanaka"},
        201,
        headers=admin,
    )
    doctor: dict[str, Any] = created["doctor"]
    tokyo_today = local(datetime.now(UTC), TOKYO).date()
    schedule = {
        "weekly": [{"weekday": d, "start": "09:00:00", "end": "11:00:00"} for d in range(1, 8)],
        "overrides": [
            {"date": (tokyo_today + timedelta(days=i)).isoformat(), "start": None, "end": None}
            for i in range(DAYS_OFF)
        ],
        "slot_minutes": 60,
        "buffer_minutes": 0,
        "min_notice_minutes": 0,
        "horizon_days": 28,
    }
    async with http.put(
        f"{server.http_url}/api/doctors/{doctor['id']}/schedule",
        json=schedule,
        headers={**admin, "Idempotency-Key": "tanaka-hours"},
    ) as resp:
        assert resp.status == 200, await resp.text()
    return doctor


def twelve_hour(at: datetime, zone: str) -> str:
    """A pattern for "4:00 PM", what an American browser's clock shows (ICU may put a
    narrow no-break space before "PM")."""
    return local(at, zone).strftime("%I:%M %p").lstrip("0").replace(" ", r"\s")


async def focused_slot(page: Page) -> int | None:
    return await page.evaluate(  # type: ignore[no-any-return]
        "() => document.activeElement?.matches('.slot')"
        " ? Number(document.activeElement.dataset.slotId) : null"
    )


async def tab_to_grid(page: Page, most: int) -> int:
    """Press Tab until a slot of the grid has the focus; at most `most` presses."""
    for _ in range(most):
        await page.keyboard.press("Tab")
        found = await focused_slot(page)
        if found is not None:
            return found
    raise AssertionError(f"no slot took the focus within {most} presses of Tab")


async def test_a_patient_in_los_angeles_books_a_doctor_in_tokyo(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """12-hour times with zone labels, the clinic's time beside them, the shifted days
    marked, "Next available" to the right week, and the booking marked in the week."""
    (server,) = await start(spawn_server, "s1")
    doctor = await tokyo_doctor(http, server)
    nxt = await get_json(http, f"{server.http_url}/api/doctors/{doctor['id']}/next-available")
    first_id = nxt["slot"]["id"]
    first_at = datetime.fromisoformat(nxt["slot"]["start"].replace("Z", "+00:00"))
    la_today = local(datetime.now(UTC), LOS_ANGELES).date()
    la_day = local(first_at, LOS_ANGELES).date()
    tokyo_day = local(first_at, TOKYO).date()
    assert tokyo_day != la_day, "09:00 in Tokyo is the afternoon before in Los Angeles"
    week_start = la_today + timedelta(days=(la_day - la_today).days // 7 * 7)
    assert week_start > la_today, "the doctor's days off push the first free time past this week"

    page = await pages.open(
        patient_url(server, doctor["id"], "alice"),
        name="los-angeles",
        timezone=LOS_ANGELES,
        locale="en-US",
    )
    await online(page)
    await calendar_loaded(page, doctor["id"])

    # The zone note: readable names, how far apart, and what the date marks mean.
    note = page.get_by_test_id("tz-note")
    await expect(note).to_contain_text(re.compile(r"Pacific Time \(P[SD]T\)"))
    await expect(note).to_contain_text("works in Tokyo (Japan Standard Time)")
    await expect(note).to_have_attribute("title", f"{LOS_ANGELES} · {TOKYO}")
    await expect(calendar(page).locator(".slot")).to_have_count(0)  # all days off this week

    # The one door for times outside the grid, in this browser: 12-hour, zone, clinic time.
    when = await page.evaluate(
        "async (at) => (await import('/static/js/format.js'))"
        ".patientWhen(at, 'America/Los_Angeles', 'Asia/Tokyo')",
        nxt["slot"]["start"],
    )
    la_time, tokyo_time = twelve_hour(first_at, LOS_ANGELES), twelve_hour(first_at, TOKYO)
    assert re.fullmatch(
        rf"\w{{3}} {la_day.day} \w+, {la_time} P[SD]T"
        rf" \(\w{{3}} {tokyo_day.day} \w+, {tokyo_time} in Tokyo\)",
        when,
    ), when

    # Next available: the right week, the keyboard on that time.
    await page.get_by_role("button", name="Next available").click()
    target = slot(page, first_id)
    await expect(target).to_be_focused()
    days = calendar(page).get_by_test_id("day")
    await expect(days.first).to_have_attribute("data-date", week_start.isoformat())
    await expect(target).to_have_text(re.compile(rf"^\s*{la_time}\s*$"))
    await expect(target).to_have_accessible_name(
        re.compile(rf"{la_time} \(\w+day {tokyo_day.day} \w+, {tokyo_time} in Tokyo\), available")
    )
    # Its day, a Los Angeles date, holds Tokyo's next day: marked, in words.
    shift = calendar(page).locator(f'[data-testid=day][data-date="{la_day}"]')
    await expect(shift.get_by_test_id("day-shift")).to_have_text(
        re.compile(rf"^In Tokyo: {tokyo_day:%a} {tokyo_day.day} \w+$")
    )
    await expect(note).to_contain_text("Days marked “In Tokyo”")
    assert await audit(page) == ""

    # Book it by keyboard: Enter holds, the focus is on Confirm, Enter books.
    await page.keyboard.press("Enter")
    await expect(hold_panel(page)).to_be_visible()
    confirm = hold_panel(page).get_by_role("button", name="Confirm booking")
    await expect(confirm).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(hold_panel(page)).to_have_count(0)
    # The booking stays in the week, marked as the patient's own in words.
    await expect(target).to_have_attribute("data-status", "busy")
    await expect(target).to_be_visible()
    await expect(target).to_contain_text("Your appointment")
    await expect(target).to_have_accessible_name(re.compile(r", your appointment$"))

    # A doctor with no hours yet: "Next available" says so, in words.
    await post_json(
        http,
        f"{server.http_url}/api/doctors",
        {"name": "Dr. Noor Idle", "timezone": TOKYO, "idempotency_key": "idle"},
        201,
        headers={"Authorization": f"Bearer {token(Role.ADMIN, 'ops')}"},
    )
    await page.get_by_role("searchbox", name="Find a doctor").fill("Idle")
    await page.get_by_role("searchbox", name="Find a doctor").press("Enter")
    await expect(page.get_by_role("heading", name="Dr. Noor Idle", level=1)).to_be_focused()
    await page.get_by_role("button", name="Next available").click()
    await expect(page.get_by_role("status").filter(has_text="no free time")).to_have_text(
        "Dr. Noor Idle has no free time to book yet."
    )

    # On a phone: the same week passes the audit, shift marks and all.
    phone = await pages.open(
        patient_url(server, doctor["id"], "bob"),
        name="phone",
        timezone=LOS_ANGELES,
        locale="en-US",
        viewport=PHONE,
        is_mobile=True,
        has_touch=True,
    )
    await online(phone)
    await calendar_loaded(phone, doctor["id"])
    await phone.get_by_role("button", name="Next available").click()
    await expect(slot(phone, first_id)).to_have_attribute("data-status", "busy")
    await expect(
        phone.get_by_test_id("day-shift").filter(has_text="In Tokyo").first
    ).to_be_visible()
    assert await audit(phone) == ""


async def test_a_patient_books_with_the_keyboard_alone(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """Signed in, the focus is on the main heading; Enter in the search picks the doctor;
    the week is one Tab stop, arrows move inside it, Enter holds; 24-hour in en-GB."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    page = await pages.open(f"{server.http_url}/", name="keyboard")
    form = page.get_by_test_id("signin")
    await form.get_by_label("Demo identity").select_option("patient:alice")
    await form.get_by_role("button", name="Sign in").press("Enter")
    await online(page)
    await expect(page.get_by_role("heading", name="Doctors")).to_be_focused()

    search = page.get_by_role("searchbox", name="Find a doctor")
    await search.focus()
    await page.keyboard.type("Moreau")
    await page.keyboard.press("Enter")
    await calendar_loaded(page, ada["id"])
    await expect(page.get_by_role("heading", name="Dr. Ada Moreau", level=1)).to_be_focused()
    await expect(calendar(page)).to_have_attribute("role", "grid")

    # One Tab stop: from the heading past the week's buttons into the grid, then out.
    first = await tab_to_grid(page, 5)
    await expect(slot(page, first)).to_have_text(re.compile(r"^\s*\d\d:\d\d\s*"))  # 24-hour
    stops = await page.evaluate("() => document.querySelectorAll('.slot[tabindex=\"0\"]').length")
    assert stops == 1
    await page.keyboard.press("Tab")
    assert await focused_slot(page) is None, "Tab leaves the grid in one press"
    await page.keyboard.press("Shift+Tab")
    assert await focused_slot(page) == first

    # Arrows: down the day, across to the next day with times, Home back to the top.
    day_of = (
        "(id) => document.querySelector(`.slot[data-slot-id='${id}']`)"
        ".closest('[role=row]').dataset.date"
    )
    first_day = await page.evaluate(day_of, first)
    await page.keyboard.press("ArrowDown")
    below = await focused_slot(page)
    assert below not in (None, first)
    assert await page.evaluate(day_of, below) == first_day
    await page.keyboard.press("ArrowRight")
    across = await focused_slot(page)
    assert across is not None
    assert await page.evaluate(day_of, across) > first_day
    await page.keyboard.press("Home")
    top = await focused_slot(page)
    assert top is not None
    assert await page.evaluate(day_of, top) == await page.evaluate(day_of, across)
    assert await slot(page, top).get_attribute("tabindex") == "0"

    # Enter holds; Confirm and Release are the next stops.
    await page.keyboard.press("Enter")
    await expect(hold_panel(page)).to_be_visible()
    await expect(slot(page, top)).to_have_attribute("data-status", "busy-tentative")
    confirm = hold_panel(page).get_by_role("button", name="Confirm booking")
    await expect(confirm).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(hold_panel(page).get_by_role("button", name="Release")).to_be_focused()
    assert await audit(page) == ""

    # PageDown: the next week, the keyboard on its first free time.
    before = await calendar(page).get_by_test_id("day").first.get_attribute("data-date")
    # Back past Confirm and the visit reason: the grid comes just before the hold panel.
    for _ in range(3):
        await page.keyboard.press("Shift+Tab")
    assert await focused_slot(page) is not None
    await page.keyboard.press("PageDown")
    await expect(calendar(page).get_by_test_id("day").first).not_to_have_attribute(
        "data-date", before or ""
    )
    await expect(calendar(page).locator(".slot:focus")).to_have_count(1)
    later = await calendar(page).locator(".slot:focus").get_attribute("data-start")
    assert later is not None
    assert date.fromisoformat(later[:10]) > date.fromisoformat(before or "")

    # The keyboard screen on a phone passes the audit too.
    phone = await pages.open(
        patient_url(server, ada["id"], "bob"), name="phone", viewport=PHONE, is_mobile=True
    )
    await online(phone)
    await calendar_loaded(phone, ada["id"])
    assert await audit(phone) == ""
