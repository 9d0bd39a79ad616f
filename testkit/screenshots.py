"""Screenshots of the pages for the README: `make screenshots` (or `python -m testkit.screenshots`).

Starts a throwaway PostgreSQL and a demo server (`slotcast serve --demo`), makes a
little activity through the REST API (bookings, a hold, a blocked slot, an
arrival) while the doctor's dashboard is open, holds a slot in Alice's page, and
writes docs/screenshots/patient.png, doctor.png, patient-phone.png and clinic.png with
Debian's Chromium (installed like the browser tests do, testkit/tools.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
from playwright.async_api import Browser, Page, async_playwright, expect

from protocol.vocabulary import Role
from server import auth
from store import demo
from store.migrate import migrate
from testkit.browser import DESKTOP, PHONE, launch
from testkit.harness import REPO, ServerProcess, free_port, postgres_server, with_database
from testkit.tools import ensure_chromium

OUT = REPO / "docs" / "screenshots"
SECRET = "screenshots-secret-that-is-long-enough-for-hs256"
DATABASE = "slotcast_screenshots"
PATIENT_TZ = "Europe/London"
DOCTOR = "Dr. Ada Moreau"


def issue(role: Role, subject: str) -> str:
    """A token as the host application would issue it: a patient's carries their name."""
    name = next((p["name"] for p in demo.PATIENTS if p["subject"] == subject), None)
    return auth.issue(SECRET, subject=subject, role=role, name=name)


def bearer(role: Role, subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue(role, subject)}"}


async def call(http: aiohttp.ClientSession, method: str, url: str, status: int, **kw: Any) -> Any:
    async with http.request(method, url, **kw) as resp:
        if resp.status != status:
            raise RuntimeError(f"{method} {url}: {resp.status} {await resp.text()}")
        return await resp.json()


async def first_open_day(
    http: aiohttp.ClientSession, base: str, doctor: dict[str, Any]
) -> tuple[date, list[int], list[int]]:
    """The doctor's first local date with free slots, its free slots, and later ones."""
    today = date.today()
    snapshot = await call(
        http,
        "GET",
        f"{base}/api/doctors/{doctor['id']}/slots",
        200,
        params={"start": today.isoformat(), "end": (today + timedelta(days=8)).isoformat()},
    )
    zone = ZoneInfo(doctor["timezone"])
    free = [s for s in snapshot["slots"] if s["status"] == "free"]
    day = datetime.fromisoformat(free[0]["start"].replace("Z", "+00:00")).astimezone(zone).date()
    slots = [
        s["id"]
        for s in free
        if datetime.fromisoformat(s["start"].replace("Z", "+00:00")).astimezone(zone).date() == day
    ]
    return day, slots, [s["id"] for s in free if s["id"] not in slots]


async def activity(
    http: aiohttp.ClientSession, base: str, doctor: dict[str, Any], slots: list[int], later: int
) -> list[int]:
    """Bookings, a hold, an arrival and a blocked slot; returns the slots still free."""
    bob, chloe, dev, blocked = slots[1], slots[2], slots[4], slots[6]
    doctor_auth = bearer(Role.DOCTOR, str(doctor["id"]))
    await call(
        http, "POST", f"{base}/api/appointments", 201,
        json={"slot_id": bob, "visit_reason": "Follow-up on blood test"},
        headers=bearer(Role.PATIENT, "bob"),
    )  # fmt: skip
    booked = await call(
        http, "POST", f"{base}/api/appointments", 201, json={"slot_id": chloe},
        headers=bearer(Role.PATIENT, "chloe"),
    )  # fmt: skip
    await call(
        http, "POST", f"{base}/api/holds", 201, json={"slot_id": dev},
        headers=bearer(Role.PATIENT, "dev"),
    )  # fmt: skip
    await call(http, "POST", f"{base}/api/slots/{blocked}/block", 200, json={}, headers=doctor_auth)
    await call(
        http, "POST", f"{base}/api/appointments/{booked['appointment']['id']}/status", 200,
        json={"status": "arrived"}, headers=doctor_auth,
    )  # fmt: skip
    # Alice already has a visit booked later in the week.
    await call(
        http, "POST", f"{base}/api/appointments", 201, json={"slot_id": later},
        headers=bearer(Role.PATIENT, "alice"),
    )  # fmt: skip
    return [s for s in slots if s not in (bob, chloe, dev, blocked)]


async def online(page: Page) -> None:
    await expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "online")


async def shoot(browser: Browser, server: ServerProcess) -> None:
    base = server.http_url
    async with aiohttp.ClientSession() as http:
        demo = await call(http, "GET", f"{base}/api/demo", 200)
        doctor = next(d for d in demo["doctors"] if d["name"] == DOCTOR)
        doctor_token = auth.issue(SECRET, subject=str(doctor["id"]), role=Role.DOCTOR)
        alice_token = issue(Role.PATIENT, "alice")

        dash_ctx = await browser.new_context(
            viewport=DESKTOP,  # type: ignore[arg-type]
            timezone_id=doctor["timezone"],
            locale="en-GB",
        )
        dash = await dash_ctx.new_page()
        await dash.goto(f"{base}/doctor#token={doctor_token}")
        await online(dash)
        patient_ctx = await browser.new_context(
            viewport=DESKTOP,  # type: ignore[arg-type]
            timezone_id=PATIENT_TZ,
            locale="en-GB",
        )
        alice = await patient_ctx.new_page()
        await alice.goto(f"{base}/?doctor={doctor['id']}#token={alice_token}")
        await online(alice)

        # The dashboard opens on today; the activity is on the first day with open slots.
        day, slots, later = await first_open_day(http, base, doctor)
        tab = dash.get_by_role("tablist", name="Days").locator(
            f'[role=tab][data-date="{day.isoformat()}"]'
        )
        await tab.click()
        await expect(dash.get_by_test_id("timeline")).to_have_attribute(
            "data-date", day.isoformat()
        )
        free = await activity(http, base, doctor, slots, later[3])

        slot = alice.locator(f'.slot[data-slot-id="{free[2]}"]')
        for _ in range(2):
            if await slot.count():
                break
            await alice.get_by_role("button", name="Next week").click()
            await expect(slot.or_(alice.locator(".slot").first)).to_be_attached()
        await slot.click()
        await expect(alice.get_by_role("region", name="Your hold")).to_be_visible()
        await expect(dash.get_by_test_id("feed")).to_contain_text("arrived")
        await dash.mouse.move(0, 0)
        await alice.mouse.move(0, 0)
        OUT.mkdir(parents=True, exist_ok=True)
        await alice.screenshot(path=OUT / "patient.png", animations="disabled")
        await dash.screenshot(path=OUT / "doctor.png", animations="disabled")

        phone_ctx = await browser.new_context(
            viewport=PHONE,  # type: ignore[arg-type]
            timezone_id=PATIENT_TZ,
            locale="en-GB",
            is_mobile=True,
            has_touch=True,
            device_scale_factor=2,
        )
        phone = await phone_ctx.new_page()
        await phone.goto(f"{base}/?doctor={doctor['id']}#token={alice_token}")
        await online(phone)
        await expect(phone.get_by_role("region", name="Your hold")).to_be_visible()
        # The calendar, not the doctor list above it, is what a phone user came for.
        await phone.get_by_role("button", name="Previous week").evaluate(
            "b => { b.scrollIntoView({block: 'start'}); window.scrollBy(0, -64); }"
        )
        await phone.screenshot(path=OUT / "patient-phone.png", animations="disabled")

        # The front desk on the same day: every doctor's day side by side.
        desk_ctx = await browser.new_context(
            viewport=DESKTOP,  # type: ignore[arg-type]
            timezone_id=doctor["timezone"],
            locale="en-GB",
        )
        desk = await desk_ctx.new_page()
        admin_token = auth.issue(SECRET, subject="desk", role=Role.ADMIN)
        await desk.goto(f"{base}/clinic#token={admin_token}")
        await online(desk)
        await desk.get_by_label("Day", exact=True).fill(day.isoformat())
        listed = desk.locator(
            f'[data-testid=clinic-doctor][data-doctor-id="{doctor["id"]}"] [data-testid=clinic-day]'
        )
        await expect(listed).to_have_attribute("data-date", day.isoformat())
        await desk.evaluate("() => document.activeElement?.blur()")
        await desk.mouse.move(0, 0)
        await desk.screenshot(path=OUT / "clinic.png", animations="disabled")
        for ctx in (dash_ctx, patient_ctx, phone_ctx, desk_ctx):
            await ctx.close()


async def run(chromium: str, admin_dsn: str, workdir: Path) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, DATABASE)
    await migrate(dsn)
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(
        {
            "SLOTCAST_DATABASE_URL": dsn,
            "SLOTCAST_BROKER_URL": "memory://",
            "SLOTCAST_JWT_SECRET": SECRET,
            "SLOTCAST_INSTANCE_ID": "screenshots",
            "SLOTCAST_DRAIN_GRACE_S": "0.2",
            # The picture shows an arrival on a booking that may be days ahead.
            "SLOTCAST_ARRIVE_EARLY_MINUTES": str(60 * 24 * 30),
        }
    )
    server = ServerProcess(
        "screenshots", free_port(), env, workdir / "server.log", extra_args=["--demo"]
    )
    await asyncio.to_thread(server.start)
    try:
        async with async_playwright() as playwright:
            browser = await launch(playwright, chromium)
            try:
                await shoot(browser, server)
            finally:
                await browser.close()
    except BaseException:
        print(server.logs(), file=sys.stderr)
        raise
    finally:
        server.stop()
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        finally:
            await conn.close()


def main() -> int:
    reasons: list[str] = []
    chromium = ensure_chromium(reasons)
    if chromium is None:
        print(f"cannot take screenshots: {reasons[0]}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="slotcast-shots-") as tmp, postgres_server() as dsn:
        asyncio.run(run(chromium, dsn, Path(tmp)))
    for name in ("patient.png", "doctor.png", "patient-phone.png", "clinic.png"):
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
