"""What every browser test shares: the world behind the pages and the contract's selectors.

The pages are read only through their contract (data-testid attributes, ARIA roles and
names), so a test reads like a person using the page; these helpers are that vocabulary.
"""

from __future__ import annotations

import asyncio
import re
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Locator, Page, expect

from protocol.vocabulary import Role
from store import demo
from testkit.fixtures import Spawn, token
from testkit.harness import ServerProcess
from testkit.tools import APT_TIMEOUT_S, find_chromium

# The first test installs Chromium if it is missing (apt-get update, then install): give
# that run the time apt-get may take, and every other run the usual generous limit.
TIMEOUT_S = 90 + (0 if find_chromium() else 2 * APT_TIMEOUT_S)


# Every browser test module's marks: one browser for the module (launching is the slow
# part), so one event loop too.
MODULE_MARKS = [
    pytest.mark.browser,
    pytest.mark.processes,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(TIMEOUT_S),
]

# Generous: 2 shared cores run Chromium, two servers, PostgreSQL and Redis at once.
EXPECT_MS = 15_000
# Back from a restart: the page's reconnect backoff is capped at about 10 s plus jitter.
RECONNECT_MS = 30_000
# No load balancer in front: stopping an instance need not wait for one to notice.
FAST_DRAIN = {"SLOTCAST_DRAIN_GRACE_S": "0.2"}
PATIENT_TZ = "Europe/London"  # the browser's zone: what the patient page shows times in


async def start(spawn: Spawn, *names: str, **kw: Any) -> list[ServerProcess]:
    """Start instances side by side (startup is most of a test's time)."""
    kw.setdefault("args", ["--demo"])
    kw["env"] = {**FAST_DRAIN, **kw.get("env", {})}
    return list(await asyncio.gather(*(asyncio.to_thread(spawn, n, **kw) for n in names)))


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with http.get(url, **kw) as resp:
        assert resp.status == 200, f"GET {url}: {resp.status} {await resp.text()}"
        return await resp.json()


async def post_json(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], status: int, **kw: Any
) -> Any:
    async with http.post(url, json=body, **kw) as resp:
        assert resp.status == status, f"POST {url}: {resp.status} {await resp.text()}"
        return await resp.json()


async def demo_doctor(http: aiohttp.ClientSession, server: ServerProcess, name: str) -> Any:
    demo = await get_json(http, f"{server.http_url}/api/demo")
    return next(d for d in demo["doctors"] if d["name"] == name)


async def slot_start(
    http: aiohttp.ClientSession, server: ServerProcess, doctor_id: int, slot_id: int
) -> datetime:
    """When a slot starts (UTC), from the REST API: what the pages must agree with."""
    today = date.today()
    snapshot = await get_json(
        http,
        f"{server.http_url}/api/doctors/{doctor_id}/slots",
        params={
            "start": (today - timedelta(days=1)).isoformat(),
            "end": (today + timedelta(days=15)).isoformat(),
        },
    )
    found = next(s for s in snapshot["slots"] if s["id"] == slot_id)
    return datetime.fromisoformat(found["start"].replace("Z", "+00:00"))


async def open_slots(
    http: aiohttp.ClientSession, server: ServerProcess, doctor: dict[str, Any], count: int
) -> list[tuple[int, datetime]]:
    """The first `count` free slots of the doctor's first local date that has that many."""
    today = date.today()
    snapshot = await get_json(
        http,
        f"{server.http_url}/api/doctors/{doctor['id']}/slots",
        params={"start": today.isoformat(), "end": (today + timedelta(days=7)).isoformat()},
    )
    by_day: dict[date, list[tuple[int, datetime]]] = {}
    for s in snapshot["slots"]:
        if s["status"] == "free":
            at = datetime.fromisoformat(s["start"].replace("Z", "+00:00"))
            by_day.setdefault(local(at, doctor["timezone"]).date(), []).append((s["id"], at))
    return next(slots[:count] for _, slots in sorted(by_day.items()) if len(slots) >= count)


def local(at: datetime, zone: str) -> datetime:
    return at.astimezone(ZoneInfo(zone))


async def appointments(database_url: str, slot_id: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT id, patient_id, status FROM appointments WHERE slot_id = $1 ORDER BY id",
                slot_id,
            )
        )
    finally:
        await conn.close()


def patient_url(server: ServerProcess, doctor_id: int, sub: str) -> str:
    # A demo patient's token carries their display name, as the host application's would.
    name = next((p["name"] for p in demo.PATIENTS if p["subject"] == sub), None)
    return f"{server.http_url}/?doctor={doctor_id}#token={token(Role.PATIENT, sub, name=name)}"


def doctor_url(server: ServerProcess, doctor_id: int) -> str:
    return f"{server.http_url}/doctor#token={token(Role.DOCTOR, str(doctor_id))}"


# ---- reading the pages (the contract's selectors) -----------------------------------------------


def connection(page: Page) -> Locator:
    return page.get_by_test_id("connection")


async def online(page: Page, timeout: float = EXPECT_MS) -> None:
    await expect(connection(page)).to_have_attribute("data-state", "online", timeout=timeout)
    await expect(connection(page)).to_have_text("Live")


def calendar(page: Page) -> Locator:
    return page.get_by_test_id("calendar")


def slot(page: Page, slot_id: int) -> Locator:
    return calendar(page).locator(f'.slot[data-slot-id="{slot_id}"]')


def message(page: Page, code: str) -> Locator:
    return page.locator(f'[data-testid=message][data-code="{code}"]')


def hold_panel(page: Page) -> Locator:
    return page.get_by_role("region", name="Your hold")


def my_appointment(page: Page, appointment_id: int) -> Locator:
    return page.get_by_test_id("my-appointments").locator(
        f'li[data-appointment-id="{appointment_id}"]'
    )


async def calendar_loaded(page: Page, doctor_id: int) -> None:
    cal = calendar(page)
    await expect(cal).to_have_attribute("data-doctor-id", str(doctor_id))
    await expect(cal).to_have_attribute("data-version", re.compile(r"^\d+$"))
    await expect(cal.get_by_test_id("day").first).to_be_visible()


async def next_week(page: Page) -> None:
    first_day = calendar(page).get_by_test_id("day").first
    before = await first_day.get_attribute("data-date")
    await page.get_by_role("button", name="Next week").click()
    await expect(first_day).not_to_have_attribute("data-date", before or "")


async def first_free_slot(page: Page, doctor_id: int) -> int:
    """The first slot a patient could pick, going to the next weeks if this one is full."""
    await calendar_loaded(page, doctor_id)
    for _ in range(3):
        free = calendar(page).locator('.slot[data-status="free"]:enabled')
        if await free.count():
            return int(await free.first.get_attribute("data-slot-id") or "")
        await next_week(page)
    raise AssertionError("no free slot in three weeks of the calendar")


async def show_slot(page: Page, doctor_id: int, slot_id: int) -> Locator:
    """The slot's button, after going to the week that has it."""
    await calendar_loaded(page, doctor_id)
    for _ in range(3):
        if await slot(page, slot_id).count():
            return slot(page, slot_id)
        await next_week(page)
    raise AssertionError(f"slot {slot_id} is in none of three weeks of the calendar")


async def countdown_seconds(page: Page) -> int:
    timer = hold_panel(page).get_by_role("timer")
    await expect(timer).to_have_text(re.compile(r"^\s*\d+:[0-5]\d\s*$"))
    minutes, seconds = (await timer.inner_text()).strip().split(":")
    return int(minutes) * 60 + int(seconds)


async def dashboard_day(page: Page, day: date) -> Locator:
    """The timeline of one of the doctor's local dates, after picking its tab."""
    tab = page.get_by_role("tablist", name="Days").locator(
        f'[role=tab][data-date="{day.isoformat()}"]'
    )
    await tab.click()
    await expect(tab).to_have_attribute("aria-selected", "true")
    timeline = page.get_by_test_id("timeline")
    await expect(timeline).to_have_attribute("data-date", day.isoformat())
    await expect(timeline).to_have_attribute("data-version", re.compile(r"^\d+$"))
    return timeline


def row(timeline: Locator, slot_id: int) -> Locator:
    return timeline.locator(f'[data-testid=slot-row][data-slot-id="{slot_id}"]')


# ---- the tests ---------------------------------------------------------------------------------


async def wait_for(predicate: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EXPECT_MS / 1000
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# WCAG 2.1 levels A and AA: labels and names, contrast, landmarks, ARIA use, and the rest.
WCAG_AA = {
    "runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]},
    "resultTypes": ["violations"],
}


async def audit(page: Page) -> str:
    """axe-core's WCAG 2.1 AA violations on the page as it is now; empty when none."""
    # Finish what will finish (a fade mid-way has the contrast of neither end); an endless
    # one (a spinner while reconnecting) cannot be finished, and is stopped instead.
    await page.evaluate(
        """() => document.getAnimations().forEach(a => {
            const end = a.effect ? a.effect.getComputedTiming().endTime : Infinity;
            if (Number.isFinite(end)) a.finish(); else a.cancel();
        })"""
    )
    results = await Axe().run(page, options=WCAG_AA)
    return results.generate_report() if results.violations_count else ""
