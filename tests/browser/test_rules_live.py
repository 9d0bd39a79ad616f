"""A doctor's new booking rules reach an open patient page live, without a reload.

The page's bookable window (too soon, not bookable yet) comes from the snapshot; a
schedule save that shortens the notice or extends the horizon carries the new rules
on its delta, and the open page slides its window and enables the slots at once.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
from playwright.async_api import expect

from protocol.vocabulary import Role
from testkit.browser import Pages
from testkit.fixtures import Spawn, token
from testkit.harness import ServerProcess
from tests.browser.kit import (
    MODULE_MARKS,
    calendar_loaded,
    demo_doctor,
    get_json,
    hold_panel,
    online,
    patient_url,
    slot,
    start,
)

pytestmark = MODULE_MARKS

EVERY_DAY = [{"weekday": d, "start": "08:00:00", "end": "18:00:00"} for d in range(1, 8)]


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def save_rules(
    http: aiohttp.ClientSession, server: ServerProcess, doctor_id: int, notice: int, horizon: int
) -> None:
    """The doctor saves hours every day with these rules, as the schedule editor does."""
    body = {"weekly": EVERY_DAY, "min_notice_minutes": notice, "horizon_days": horizon}
    auth = {"Authorization": f"Bearer {token(Role.DOCTOR, str(doctor_id))}"}
    url = f"{server.http_url}/api/doctors/{doctor_id}/schedule"
    async with http.put(url, json=body, headers=auth) as resp:
        assert resp.status == 200, await resp.text()


async def free_slots(
    http: aiohttp.ClientSession, server: ServerProcess, doctor_id: int
) -> tuple[dict[int, datetime], Any]:
    """The doctor's free slots this week and next (id -> start), and the snapshot."""
    today = date.today()
    snapshot = await get_json(
        http,
        f"{server.http_url}/api/doctors/{doctor_id}/slots",
        params={"start": today.isoformat(), "end": (today + timedelta(days=9)).isoformat()},
    )
    free = {s["id"]: instant(s["start"]) for s in snapshot["slots"] if s["status"] == "free"}
    return free, snapshot


async def test_shorter_notice_and_longer_horizon_enable_slots_on_the_open_page(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    [s1] = await start(spawn_server, "s1")
    ada = await demo_doctor(http, s1, "Dr. Ada Moreau")
    # A day's notice and three days ahead: the week shows "Too soon" first, then
    # bookable times, then (past the horizon) no times at all.
    await save_rules(http, s1, ada["id"], notice=24 * 60, horizon=3)
    before, snapshot = await free_slots(http, s1, ada["id"])
    now = datetime.now(UTC)
    soon = next(
        i
        for i, at in sorted(before.items(), key=lambda kv: kv[1])
        if now + timedelta(hours=2) < at < instant(snapshot["bookable_from"])
    )

    page = await pages.open(patient_url(s1, ada["id"], "alice"), name="alice")
    await online(page)
    await calendar_loaded(page, ada["id"])
    await expect(slot(page, soon)).to_be_disabled()

    # No notice, two weeks ahead: new days open, and the day within the notice frees up.
    await save_rules(http, s1, ada["id"], notice=0, horizon=14)
    after, _ = await free_slots(http, s1, ada["id"])
    until = instant(snapshot["bookable_until"])  # the window the page was given
    opened = min(
        (i for i in after.keys() - before.keys() if until <= after[i] < now + timedelta(days=5)),
        key=lambda i: after[i],
    )
    await expect(slot(page, opened)).to_be_enabled()
    await expect(slot(page, soon)).to_be_enabled()
    await slot(page, opened).click()
    await expect(hold_panel(page)).to_be_visible()
