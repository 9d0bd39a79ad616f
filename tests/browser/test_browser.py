"""The pages in a real browser: Chromium (Debian's) against real `slotcast serve` processes.

The patient page (`/`) and the doctor dashboard (`/doctor`) are built to the
contract in the issue (data-testid attributes, ARIA roles and names); these tests
use a page the way a person does, through that contract only: they click, type
and read what is on screen, never the pages' internals. Everything behind the
pages is real: server processes on their own ports, one PostgreSQL, one Redis,
WebSockets through Chromium's network stack. An uncaught error in any page, or
an error it logs, fails the test (see tests/browser.py).

Waits are Playwright's auto-waiting `expect`s with generous timeouts: a test
never sleeps and hopes, and no test measures how fast anything is.
"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Locator, Page, WebSocketRoute, expect

from protocol.vocabulary import Role
from store.pool import open_store
from testkit.browser import PHONE, TABLET, Pages
from testkit.fixtures import Spawn, seed_doctor, token
from testkit.harness import free_port
from tests.browser.kit import (
    MODULE_MARKS,
    PATIENT_TZ,
    RECONNECT_MS,
    appointments,
    audit,
    calendar,
    calendar_loaded,
    connection,
    countdown_seconds,
    dashboard_day,
    demo_doctor,
    doctor_url,
    first_free_slot,
    get_json,
    hold_panel,
    local,
    message,
    my_appointment,
    online,
    open_slots,
    patient_url,
    post_json,
    row,
    show_slot,
    slot,
    slot_start,
    start,
    wait_for,
)

pytestmark = MODULE_MARKS


async def test_a_booking_shows_up_live_in_every_page_across_instances(
    spawn_server: Spawn,
    redis_url: str,
    database_url: str,
    http: aiohttp.ClientSession,
    pages: Pages,
) -> None:
    """Alice on instance 1 books; Bob on instance 2 and the doctor on 1 see each step live."""
    # A clinic that records arrivals days early: the first free slot may be tomorrow.
    # The attendance window has a test of its own.
    early = {"SLOTCAST_ARRIVE_EARLY_MINUTES": str(60 * 24 * 30)}
    s1, s2 = await start(spawn_server, "s1", "s2", broker_url=redis_url, env=early)
    ada = await demo_doctor(http, s1, "Dr. Ada Moreau")
    doctor_tz = ada["timezone"]

    dash = await pages.open(doctor_url(s1, ada["id"]), name="doctor")
    alice = await pages.open(patient_url(s1, ada["id"], "alice"), name="alice")
    bob = await pages.open(patient_url(s2, ada["id"], "bob"), name="bob")
    for page in (dash, alice, bob):
        await online(page)
    await expect(alice.get_by_test_id("whoami")).to_contain_text(re.compile("alice", re.I))
    await expect(dash.get_by_test_id("whoami")).to_contain_text("Ada Moreau")

    # Both patient pages watch the doctor's calendar, one on each instance.
    watchers = dash.get_by_test_id("watchers")
    await expect(watchers).to_have_text(re.compile(r"^\D*\b2\b\D*$"))

    slot_id = await first_free_slot(alice, ada["id"])
    starts = await slot_start(http, s1, ada["id"], slot_id)
    patient_time = local(starts, PATIENT_TZ).strftime("%H:%M")
    doctor_time = local(starts, doctor_tz).strftime("%H:%M")
    # Times are the patient's own (the browser's zone), not the doctor's or UTC.
    await expect(slot(alice, slot_id)).to_have_text(re.compile(rf"\b{patient_time}\b"))
    # Zones by readable names; the exact IANA ids are in the note's title.
    tz_note = alice.get_by_test_id("tz-note")
    await expect(tz_note).to_contain_text(doctor_tz.split("/")[-1])
    await expect(tz_note).to_have_attribute("title", f"{PATIENT_TZ} · {doctor_tz}")
    on_bob = await show_slot(bob, ada["id"], slot_id)
    await expect(on_bob).to_have_attribute("data-status", "free")
    timeline = await dashboard_day(dash, local(starts, doctor_tz).date())
    await expect(row(timeline, slot_id)).to_contain_text(doctor_time)
    await expect(row(timeline, slot_id)).to_have_attribute("data-status", "free")

    # Alice holds it: Bob's page shows it held by someone, live, from the other instance.
    await slot(alice, slot_id).click()
    await expect(hold_panel(alice)).to_be_visible()
    await expect(hold_panel(alice)).to_contain_text(patient_time)
    assert await countdown_seconds(alice) > 0
    await expect(on_bob).to_have_attribute("data-status", "busy-tentative")
    await expect(on_bob).to_be_disabled()
    await expect(row(timeline, slot_id)).to_have_attribute("data-status", "busy-tentative")

    # Alice confirms: booked everywhere.
    await hold_panel(alice).get_by_role("button", name="Confirm booking").click()
    booked = alice.get_by_test_id("confirmation")  # tests/browser/test_patient_flow.py has the rest
    await expect(booked).to_be_visible()
    await expect(booked).to_contain_text(patient_time)
    await expect(hold_panel(alice)).to_have_count(0)
    await expect(on_bob).to_have_attribute("data-status", "busy")
    await expect(slot(alice, slot_id)).to_have_attribute("data-status", "busy")

    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "booked")]
    appointment_id = rows[0]["id"]

    badge = row(timeline, slot_id).locator(f'[data-appointment-id="{appointment_id}"]')
    await expect(badge).to_have_attribute("data-status", "booked")
    # By her display name (her token's `name`), not the bare subject.
    await expect(row(timeline, slot_id).locator(".row-patient")).to_have_text("Alice Martin")
    feed_top = dash.get_by_test_id("feed").locator("li").first
    await expect(feed_top).to_contain_text(re.compile(rf"{doctor_time}.*booked.*alice", re.I))
    mine = my_appointment(alice, appointment_id)
    await expect(mine).to_have_attribute("data-status", "booked")
    await expect(mine).to_contain_text("Booked")
    await expect(mine).to_contain_text("Ada Moreau")
    await expect(mine).to_contain_text(patient_time)

    # The patient arrives: the doctor marks it, Alice's page follows.
    await row(timeline, slot_id).get_by_role("button", name=f"Mark {doctor_time} arrived").click()
    await expect(badge).to_have_attribute("data-status", "arrived")
    await expect(feed_top).to_contain_text(re.compile(rf"{doctor_time}.*arrived", re.I))
    await expect(mine).to_have_attribute("data-status", "arrived")
    await expect(mine).to_contain_text("Arrived")
    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "arrived")]
    # Bob never saw an appointment that is not his.
    await expect(bob.get_by_test_id("my-appointments").locator("li")).to_have_count(0)


async def test_a_hold_counts_down_and_expires_everywhere(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """A short hold: the countdown runs, then the panel goes and the slot is free again."""
    (server,) = await start(
        spawn_server, "s1", env={"SLOTCAST_HOLD_TTL_S": "6", "SLOTCAST_HOLD_SWEEP_S": "0.5"}
    )
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    bob = await pages.open(patient_url(server, ada["id"], "bob"), name="bob")
    slot_id = await first_free_slot(alice, ada["id"])
    on_bob = await show_slot(bob, ada["id"], slot_id)
    starts = await slot_start(http, server, ada["id"], slot_id)
    patient_time = local(starts, PATIENT_TZ).strftime("%H:%M")

    await slot(alice, slot_id).click()
    await expect(hold_panel(alice)).to_be_visible()
    await expect(on_bob).to_have_attribute("data-status", "busy-tentative")
    first = await countdown_seconds(alice)
    assert 0 < first <= 6
    timer = hold_panel(alice).get_by_role("timer")
    await expect(timer).to_have_attribute("data-testid", "countdown")
    await expect(timer).not_to_have_text(re.compile(rf"^\s*{first // 60}:{first % 60:02d}\s*$"))
    assert await countdown_seconds(alice) < first  # it counts down, not up

    expired = message(alice, "hold_expired")
    await expect(expired).to_be_visible()
    await expect(expired).to_have_attribute("role", "status")
    await expect(expired).to_contain_text(patient_time)
    await expect(hold_panel(alice)).to_have_count(0)
    await expect(on_bob).to_have_attribute("data-status", "free")
    await expect(on_bob).to_be_enabled()
    await expect(slot(alice, slot_id)).to_have_attribute("data-status", "free")


async def test_the_hold_counts_down_by_the_servers_clock_not_the_browsers(
    spawn_server: Spawn, http: aiohttp.ClientSession, database_url: str, pages: Pages
) -> None:
    """A browser clock five minutes fast still shows a fresh hold's two minutes, and books."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open("about:blank", name="alice")
    await alice.clock.install(time=datetime.now().astimezone() + timedelta(minutes=5))
    await alice.goto(patient_url(server, ada["id"], "alice"))
    await online(alice)
    slot_id = await first_free_slot(alice, ada["id"])

    await slot(alice, slot_id).click()
    await expect(hold_panel(alice)).to_be_visible()
    left = await countdown_seconds(alice)
    assert 100 < left <= 120, f"a fresh two-minute hold shows {left} s left"
    await expect(message(alice, "hold_expired")).to_have_count(0)

    await hold_panel(alice).get_by_role("button", name="Confirm booking").click()
    await expect(alice.get_by_test_id("confirmation")).to_be_visible()
    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "booked")]
    # The panel that had the keyboard is gone; the keyboard did not fall back to <body>.
    assert await alice.evaluate("document.activeElement !== document.body")


async def test_pages_reconnect_and_catch_up_after_a_server_restart(
    spawn_server: Spawn,
    redis_url: str,
    database_url: str,
    http: aiohttp.ClientSession,
    pages: Pages,
) -> None:
    """Instance 1 restarts under Alice's hold; she keeps it, sees what changed, and books."""
    s1, s2 = await start(spawn_server, "s1", "s2", broker_url=redis_url)
    # While s1 is down the browser's reconnect attempts fail, and Chromium logs each one.
    pages.allow(r"WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws' failed")
    ada = await demo_doctor(http, s1, "Dr. Ada Moreau")
    alice = await pages.open(patient_url(s1, ada["id"], "alice"), name="alice")
    dash = await pages.open(doctor_url(s1, ada["id"]), name="doctor")
    await online(alice)
    await online(dash)
    slot_id = await first_free_slot(alice, ada["id"])
    await slot(alice, slot_id).click()
    await expect(hold_panel(alice)).to_be_visible()
    await expect(dash.get_by_test_id("watchers")).to_have_text(re.compile(r"^\D*\b1\b\D*$"))
    # Another slot of the same week, which Bob books while Alice's page is cut off.
    other = calendar(alice).locator(
        f'.slot[data-status="free"]:enabled:not([data-slot-id="{slot_id}"])'
    )
    other_id = int(await other.first.get_attribute("data-slot-id") or "")

    await asyncio.to_thread(s1.stop)
    for page in (alice, dash):
        await expect(connection(page)).to_have_attribute("data-state", "offline")
        await expect(connection(page)).to_have_text("Offline — reconnecting")
    await post_json(
        http,
        f"{s2.http_url}/api/appointments",
        {"slot_id": other_id, "idempotency_key": f"bob-{other_id}"},
        201,
        headers={"Authorization": f"Bearer {token(Role.PATIENT, 'bob')}"},
    )
    await asyncio.to_thread(s1.start)  # the same port: the pages come back on their own

    await online(alice, RECONNECT_MS)
    await online(dash, RECONNECT_MS)
    # Caught up on what happened while away, and the hold is still there, counting.
    await expect(slot(alice, other_id)).to_have_attribute("data-status", "busy")
    await expect(slot(alice, slot_id)).to_have_attribute("data-status", "busy-tentative")
    await expect(hold_panel(alice)).to_be_visible()
    left = await countdown_seconds(alice)
    assert left > 0
    timer = hold_panel(alice).get_by_role("timer")
    await expect(timer).not_to_have_text(re.compile(rf"^\s*{left // 60}:{left % 60:02d}\s*$"))
    await expect(dash.get_by_test_id("watchers")).to_have_text(re.compile(r"^\D*\b1\b\D*$"))

    await hold_panel(alice).get_by_role("button", name="Confirm booking").click()
    await expect(alice.get_by_test_id("confirmation")).to_be_visible()
    await expect(hold_panel(alice)).to_have_count(0)
    await expect(slot(alice, slot_id)).to_have_attribute("data-status", "busy")
    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "booked")]
    await expect(my_appointment(alice, rows[0]["id"])).to_have_attribute("data-status", "booked")


async def test_a_network_loss_keeps_the_hold_and_a_confirm_pressed_offline_is_not_sent(
    spawn_server: Spawn, database_url: str, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """The browser goes offline with a hold; the patient presses Confirm anyway. The page
    says it could not be sent and sends nothing later by itself (issue 16, item 8: nothing
    pressed offline is sent without the patient's say). Back online, the page catches up,
    the patient presses Confirm again, and the slot is booked exactly once."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    slot_id = await first_free_slot(alice, ada["id"])
    await slot(alice, slot_id).click()
    await expect(hold_panel(alice)).to_be_visible()
    other = calendar(alice).locator(
        f'.slot[data-status="free"]:enabled:not([data-slot-id="{slot_id}"])'
    )
    other_id = int(await other.first.get_attribute("data-slot-id") or "")

    await alice.context.set_offline(True)
    await expect(connection(alice)).to_have_attribute("data-state", "offline")
    await post_json(
        http,
        f"{server.http_url}/api/appointments",
        {"slot_id": other_id, "idempotency_key": f"bob-{other_id}"},
        201,
        headers={"Authorization": f"Bearer {token(Role.PATIENT, 'bob')}"},
    )
    confirm = hold_panel(alice).get_by_role("button", name="Confirm booking")
    await confirm.click()
    note = alice.get_by_test_id("hold-note")
    await expect(note).to_contain_text("not sent")
    await alice.context.set_offline(False)

    await online(alice, RECONNECT_MS)
    await expect(slot(alice, other_id)).to_have_attribute("data-status", "busy")  # caught up
    await expect(note).to_contain_text("back online")
    await expect(confirm).to_be_enabled()
    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "pending")]

    await confirm.click()
    await expect(alice.get_by_test_id("confirmation")).to_be_visible()
    await expect(slot(alice, slot_id)).to_have_attribute("data-status", "busy")
    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "booked")]
    await expect(my_appointment(alice, rows[0]["id"])).to_have_attribute("data-status", "booked")
    await expect(alice.get_by_role("alert")).to_have_count(0)  # no second attempt refused


async def test_pages_keep_rejoining_while_the_server_answers_unavailable(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """Back from a drop, the instance cannot read its database yet: every re-join is
    answered `unavailable`. The pages say they are not live, keep trying with backoff,
    and catch up once the database answers (what they missed meanwhile included)."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    refusing = False
    refused: list[str] = []
    routes: list[WebSocketRoute] = []

    async def database_down(ws: WebSocketRoute) -> None:
        server_side = ws.connect_to_server()
        routes.append(ws)

        def to_server(frame: str | bytes) -> None:
            message = orjson.loads(frame)
            if refusing and message["type"].startswith("watch"):
                refused.append(message["type"])
                error = {"code": "unavailable", "message": "the database is unreachable"}
                ws.send(
                    orjson.dumps({"type": "error", "id": message["id"], "body": error}).decode()
                )
            else:
                server_side.send(frame)

        ws.on_message(to_server)

    alice = await pages.open("about:blank", name="alice")
    dash = await pages.open("about:blank", name="doctor")
    for page in (alice, dash):
        await page.route_web_socket(re.compile(r"/ws$"), database_down)
    await alice.goto(patient_url(server, ada["id"], "alice"))
    await dash.goto(doctor_url(server, ada["id"]))
    await online(alice)
    await online(dash)
    slot_id = await first_free_slot(alice, ada["id"])

    refusing = True
    for route in list(routes):
        await route.close(code=1012, reason="service restart")
    for page in (alice, dash):
        await expect(connection(page)).to_have_attribute("data-state", "recovering")
        await expect(connection(page)).to_have_text("Not live — retrying")
    await post_json(
        http,
        f"{server.http_url}/api/appointments",
        {"slot_id": slot_id, "idempotency_key": f"bob-{slot_id}"},
        201,
        headers={"Authorization": f"Bearer {token(Role.PATIENT, 'bob')}"},
    )
    await wait_for(lambda: refused.count("watch_dashboard") >= 2, "the dashboard to retry")
    await wait_for(lambda: refused.count("watch") >= 2, "the calendar to retry")
    await expect(connection(alice)).to_have_attribute("data-state", "recovering")
    await expect(alice.get_by_role("alert")).to_have_count(0)  # the indicator says it all

    refusing = False
    await online(alice, RECONNECT_MS)
    await online(dash, RECONNECT_MS)
    await expect(slot(alice, slot_id)).to_have_attribute("data-status", "busy")
    assert refused.count("watch_appointments") >= 2


async def test_demo_sign_in_as_patient_then_doctor(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """The demo form lists patients and doctors; each lands on its own page."""
    (server,) = await start(spawn_server, "s1")
    demo = await get_json(http, f"{server.http_url}/api/demo")
    ada = next(d for d in demo["doctors"] if d["name"] == "Dr. Ada Moreau")
    page = await pages.open(f"{server.http_url}/", name="visitor")

    form = page.get_by_test_id("signin")
    await expect(form).to_be_visible()
    identity = form.get_by_label("Demo identity")
    options = identity.locator("option")
    expected = [f"patient:{p['subject']}" for p in demo["patients"]] + [
        f"doctor:{d['id']}" for d in demo["doctors"]
    ]
    for value in expected:
        await expect(options.and_(page.locator(f'[value="{value}"]'))).to_have_count(1)
    await expect(identity.locator('option[value="patient:alice"]')).to_have_text(
        "Alice Martin (patient)"
    )
    ada_option = identity.locator(f'option[value="doctor:{ada["id"]}"]')
    await expect(ada_option).to_contain_text("Dr. Ada Moreau")
    await expect(ada_option).to_contain_text("General practice")

    await identity.select_option("patient:alice")
    await form.get_by_role("button", name="Sign in").click()
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_contain_text("Alice")
    await expect(page.get_by_test_id("signin")).to_be_hidden()
    search = page.get_by_role("searchbox", name="Find a doctor")
    await expect(search).to_be_visible()
    results = page.get_by_test_id("doctor-results").get_by_role("button")
    await expect(results).to_have_count(len(demo["doctors"]))
    await search.fill("cardio")
    await expect(results).to_have_count(1)
    await expect(results).to_have_accessible_name(re.compile("Dr. Kenji Sato.*Cardiology"))
    await results.click()
    sato = next(d for d in demo["doctors"] if d["name"] == "Dr. Kenji Sato")
    await calendar_loaded(page, sato["id"])
    await expect(page.get_by_test_id("tz-note")).to_contain_text("works in Tokyo")

    await page.get_by_role("button", name="Sign out").click()
    await expect(form).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('slotcast.token')") is None

    await form.get_by_label("Demo identity").select_option(f"doctor:{ada['id']}")
    await form.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"/doctor(#.*)?$"))
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_contain_text("Ada Moreau")
    await expect(page.get_by_test_id("timeline")).to_have_attribute(
        "data-version", re.compile(r"^\d+$")
    )
    await expect(page.get_by_role("tablist", name="Days").get_by_role("tab")).to_have_count(7)

    # And back: a patient chosen on the dashboard's form goes to the patient page.
    await page.get_by_role("button", name="Sign out").click()
    await expect(form).to_be_visible()
    await form.get_by_label("Demo identity").select_option("patient:bob")
    await form.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"^http://127\.0\.0\.1:\d+/(\?[^#]*)?(#.*)?$"))
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_contain_text("Bob")


async def test_without_demo_mode_the_page_takes_the_host_apps_token(
    spawn_server: Spawn, database_url: str, pages: Pages
) -> None:
    """No demo: the page says to sign in through the clinic's app; `#token=` signs in; and
    it never asks a demo endpoint (which would answer 404, an error in every console)."""
    # (Not the `store` fixture: its pool belongs to another event loop than this module's.)
    async with open_store(database_url, min_size=1, max_size=2) as store:
        doctor = await seed_doctor(store, name="Dr. Real", timezone="Europe/London")
    (server,) = await start(spawn_server, "s1", args=[])
    page = await pages.open(f"{server.http_url}/", name="visitor")
    await expect(page.get_by_text("Sign in through your clinic's application")).to_be_visible()
    await expect(page.get_by_test_id("signin")).to_be_hidden()

    zoe = token(Role.PATIENT, "zoe")
    page = await pages.open(f"{server.http_url}/?doctor={doctor.id}#token={zoe}", name="zoe")
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_contain_text("zoe")
    assert "token=" not in page.url  # the fragment is gone from the address bar (and history)
    assert await page.evaluate("sessionStorage.getItem('slotcast.token')") == zoe
    await calendar_loaded(page, doctor.id)
    await expect(calendar(page).locator('.slot[data-status="free"]').first).to_be_visible()

    await page.reload()  # the token survives a reload, from sessionStorage
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_contain_text("zoe")
    assert any(url.endswith("/healthz") for url in pages.requested)  # the clock, set by it
    demo = [url for url in pages.requested if "/api/demo" in url]
    assert not demo, f"a production page asked demo endpoints: {demo}"


async def test_a_token_link_for_someone_else_asks_before_switching_the_tab(
    spawn_server: Spawn, database_url: str, pages: Pages
) -> None:
    """A `#token=` link for another identity never silently replaces the one signed in:
    the page asks (a modal dialog, the safe choice focused), and only a yes switches."""
    async with open_store(database_url, min_size=1, max_size=2) as store:
        doctor = await seed_doctor(store, name="Dr. Link", timezone="Europe/London")
    (server,) = await start(spawn_server, "s1", args=[])
    zoe = token(Role.PATIENT, "zoe")
    page = await pages.open(f"{server.http_url}/?doctor={doctor.id}#token={zoe}", name="zoe")
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_have_text("zoe")

    async def follow(sub: str, hop: int) -> Locator:
        # A new query string: a real navigation (a new fragment alone would not reload).
        link = f"{server.http_url}/?doctor={doctor.id}&hop={hop}#token={token(Role.PATIENT, sub)}"
        await page.goto(link)
        return page.get_by_role("dialog", name="Switch who is signed in?")

    dialog = await follow("mallory", 1)
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("signed in as zoe")
    stay = dialog.get_by_role("button", name="Stay signed in as zoe")
    await expect(stay).to_be_focused()
    assert "token=" not in page.url
    await page.keyboard.press("Escape")  # the same as staying
    await expect(dialog).to_be_hidden()
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_have_text("zoe")
    assert await page.evaluate("sessionStorage.getItem('slotcast.token')") == zoe

    dialog = await follow("mallory", 2)
    await dialog.get_by_role("button", name="Sign in as mallory").click()
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_have_text("mallory")

    # A fresh token for the identity already signed in is taken without asking.
    await follow("mallory", 3)
    await online(page)
    await expect(page.get_by_test_id("whoami")).to_have_text("mallory")
    await expect(page.get_by_role("dialog")).to_have_count(0)


@asynccontextmanager
async def another_origin() -> AsyncIterator[str]:
    """A site of someone else's on this machine (its own port, so its own origin): its page
    frames whatever `?frame=` names, as a host application embedding Slotcast would."""

    async def page(request: web.Request) -> web.Response:
        src = html.escape(request.query.get("frame", "about:blank"))
        body = f'<!doctype html><iframe id="app" src="{src}" width="1200" height="800"></iframe>'
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_only_the_configured_host_app_may_hand_the_page_a_token(
    spawn_server: Spawn, database_url: str, pages: Pages
) -> None:
    """The host app (another origin, listed in SLOTCAST_HOST_ORIGINS) frames the page and
    signs it in by postMessage; a site that is not listed cannot slip its token in."""
    async with open_store(database_url, min_size=1, max_size=2) as store:
        doctor = await seed_doctor(store, name="Dr. Framed", timezone="Europe/London")
    async with another_origin() as host, another_origin() as stranger:
        (server,) = await start(spawn_server, "s1", args=[], env={"SLOTCAST_HOST_ORIGINS": host})
        app_url = f"{server.http_url}/?doctor={doctor.id}"

        page = await pages.open(f"{host}/?{urlencode({'frame': app_url})}", name="host app")
        framed = page.frame_locator("#app")
        await expect(
            framed.get_by_text("Sign in through your clinic's application")
        ).to_be_visible()
        await page.evaluate(
            "t => document.getElementById('app').contentWindow.postMessage("
            "{type: 'slotcast:token', token: t}, '*')",
            token(Role.PATIENT, "zoe"),
        )
        await expect(framed.get_by_test_id("whoami")).to_contain_text("zoe")
        await expect(framed.get_by_test_id("connection")).to_have_attribute("data-state", "online")

        # A stranger may not frame it (CSP frame-ancestors): it opens it and posts a token.
        lure = await pages.open(f"{stranger}/", name="stranger")
        async with lure.expect_popup() as opened:
            await lure.evaluate("u => { window.app = window.open(u); }", app_url)
        popup = await opened.value
        await expect(popup.get_by_text("Sign in through your clinic's application")).to_be_visible()
        # The page's own origin is heard (the listener is live)...
        mine = token(Role.PATIENT, "yara")
        await popup.evaluate(
            "t => window.postMessage({type: 'slotcast:token', token: t}, location.origin)", mine
        )
        await expect(popup.get_by_test_id("whoami")).to_contain_text("yara")
        # ...the stranger's token is not, though it is a real one: only its sender is wrong.
        # (Its messages arrive in order, so once the barrier is in, the token was handled.)
        await popup.evaluate(
            "() => { window.barrier = new Promise(r => addEventListener("
            "'message', e => e.data === 'barrier' && r())); }"
        )
        await lure.evaluate(
            "t => { window.app.postMessage({type: 'slotcast:token', token: t}, '*');"
            " window.app.postMessage('barrier', '*'); }",
            token(Role.PATIENT, "mallory"),
        )
        await popup.evaluate("() => window.barrier")
        assert await popup.evaluate("sessionStorage.getItem('slotcast.token')") == mine
        await expect(popup.get_by_test_id("whoami")).to_contain_text("yara")


async def test_after_the_token_expires_the_host_apps_next_token_rejoins_the_rooms(
    spawn_server: Spawn, http: aiohttp.ClientSession, database_url: str, pages: Pages
) -> None:
    """The server ends the private rooms with the token; a fresh one brings them back live."""
    async with open_store(database_url, min_size=1, max_size=2) as store:
        doctor = await seed_doctor(store, name="Dr. Brief", timezone="Europe/London")
    (server,) = await start(spawn_server, "s1", args=[])
    slot_id = doctor.slots[0].id
    short = timedelta(seconds=8)  # long enough to open the page, short enough to wait for

    dash_token = token(Role.DOCTOR, str(doctor.id), ttl=short)
    dash = await pages.open(f"{server.http_url}/doctor#token={dash_token}", name="doctor")
    timeline = await dashboard_day(dash, doctor.start)
    zoe_token = token(Role.PATIENT, "zoe", ttl=short)
    zoe = await pages.open(f"{server.http_url}/?doctor={doctor.id}#token={zoe_token}", name="zoe")
    await online(zoe)
    await expect(slot(zoe, slot_id)).to_have_attribute("data-status", "free")

    for page in (dash, zoe):
        await expect(message(page, "token_expired")).to_be_visible()
    # The host application (same origin here) hands each page a fresh token.
    for page, fresh in (
        (dash, token(Role.DOCTOR, str(doctor.id))),
        (zoe, token(Role.PATIENT, "zoe")),
    ):
        await page.evaluate(
            "t => window.postMessage({type: 'slotcast:token', token: t}, location.origin)", fresh
        )
        await page.wait_for_function(
            "t => sessionStorage.getItem('slotcast.token') === t", arg=fresh
        )

    booked = await post_json(
        http,
        f"{server.http_url}/api/appointments",
        {"slot_id": slot_id, "idempotency_key": f"zoe-{slot_id}"},
        201,
        headers={"Authorization": f"Bearer {token(Role.PATIENT, 'zoe')}"},
    )
    # Her appointments and the doctor's day are live again, not only the public calendar.
    await expect(my_appointment(zoe, booked["appointment"]["id"])).to_have_attribute(
        "data-status", "booked"
    )
    await expect(row(timeline, slot_id)).to_have_attribute("data-status", "busy")
    await expect(row(timeline, slot_id).locator("[data-appointment-id]")).to_have_attribute(
        "data-status", "booked"
    )
    await expect(slot(zoe, slot_id)).to_have_attribute("data-status", "busy")
    for page in (dash, zoe):
        await online(page)


async def test_errors_and_blocked_slots_are_shown_clearly(
    spawn_server: Spawn, http: aiohttp.ClientSession, database_url: str, pages: Pages
) -> None:
    """The loser of a race is told so in words; a slot the doctor blocks turns unavailable."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")

    # Bob is on a slow network: what the server sends him can be held back, then let go in
    # order. Everything still goes through the real server; only the timing is Bob's.
    routes: list[WebSocketRoute] = []
    held_back: list[str | bytes] = []
    delaying = False

    async def slow_network(ws: WebSocketRoute) -> None:
        server_side = ws.connect_to_server()
        routes.append(ws)

        def to_page(frame: str | bytes) -> None:
            if delaying:
                held_back.append(frame)
            else:
                ws.send(frame)

        server_side.on_message(to_page)

    def let_go() -> None:
        nonlocal delaying
        for frame in held_back:
            routes[-1].send(frame)
        held_back.clear()
        delaying = False

    def heard(code: str) -> bool:
        needle = f'"{code}"'.encode()
        return any(needle in (f if isinstance(f, bytes) else f.encode()) for f in held_back)

    bob = await pages.open("about:blank", name="bob")
    await bob.route_web_socket(re.compile(r"/ws$"), slow_network)
    await bob.goto(patient_url(server, ada["id"], "bob"))
    await online(bob)
    slot_id = await first_free_slot(alice, ada["id"])
    on_bob = await show_slot(bob, ada["id"], slot_id)
    await expect(on_bob).to_have_attribute("data-status", "free")

    delaying = True
    await slot(alice, slot_id).click()
    await expect(hold_panel(alice)).to_be_visible()
    # Alice has it. Bob's page has not heard yet, so he clicks the slot he still sees free.
    await expect(on_bob).to_have_attribute("data-status", "free")
    await on_bob.click()
    # His hold reached the server and was refused; the answer waits with the rest.
    await wait_for(lambda: heard("slot_taken"), "the server to refuse Bob's hold")
    let_go()
    alert = message(bob, "slot_taken")
    await expect(alert).to_be_visible()
    await expect(alert).to_have_attribute("role", "alert")
    await expect(alert).to_contain_text("Someone else just took that slot")
    await expect(on_bob).to_have_attribute("data-status", "busy-tentative")
    await expect(hold_panel(bob)).to_have_count(0)
    await alert.get_by_role("button", name="Dismiss").click()
    await expect(alert).to_have_count(0)
    rows = await appointments(database_url, slot_id)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "pending")]

    # The doctor blocks another slot of that day: both patients see it unavailable.
    blocked_id = await first_free_slot(bob, ada["id"])
    on_alice = await show_slot(alice, ada["id"], blocked_id)
    starts = await slot_start(http, server, ada["id"], blocked_id)
    doctor_time = local(starts, ada["timezone"]).strftime("%H:%M")
    dash = await pages.open(doctor_url(server, ada["id"]), name="doctor")
    timeline = await dashboard_day(dash, local(starts, ada["timezone"]).date())
    await row(timeline, blocked_id).get_by_role("button", name=f"Block {doctor_time}").click()
    await expect(row(timeline, blocked_id)).to_have_attribute("data-status", "busy-unavailable")
    for page_slot in (on_alice, slot(bob, blocked_id)):
        await expect(page_slot).to_have_attribute("data-status", "busy-unavailable")
        await expect(page_slot).to_be_disabled()
        await expect(page_slot).to_have_accessible_name(re.compile(r"unavailable$"))

    await row(timeline, blocked_id).get_by_role("button", name=f"Unblock {doctor_time}").click()
    await expect(on_alice).to_have_attribute("data-status", "free")
    await expect(on_alice).to_be_enabled()
    await expect(on_alice).to_have_accessible_name(re.compile(r"available$"))


async def test_a_rename_and_a_retirement_reach_an_open_patient_page(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """An admin changes the directory over REST; the page watching that doctor follows."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    await first_free_slot(alice, ada["id"])
    admin = {"Authorization": f"Bearer {token(Role.ADMIN, 'root')}"}
    doctor_url = f"{server.http_url}/api/doctors/{ada['id']}"
    async with http.patch(doctor_url, json={"name": "Dr. Ada Moreau-Blanc"}, headers=admin) as r:
        assert r.status == 200, await r.text()
    await expect(alice.locator("#doctor-heading")).to_have_text("Dr. Ada Moreau-Blanc")
    await post_json(http, f"{doctor_url}/retire", {}, 200, headers=admin)
    await expect(message(alice, "doctor_retired")).to_be_visible()
    await expect(calendar(alice).locator('.slot[data-status="free"]')).to_have_count(0)
    results = alice.get_by_test_id("doctor-results")
    await expect(results).not_to_contain_text("Ada Moreau")


async def test_patient_page_on_a_phone_and_with_the_keyboard(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """390x844: nothing scrolls sideways, slots are reachable; Tab and Enter hold a slot."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    page = await pages.open(
        patient_url(server, ada["id"], "alice"),
        name="phone",
        viewport=PHONE,
        is_mobile=True,
        has_touch=True,
    )
    await online(page)
    slot_id = await first_free_slot(page, ada["id"])
    overflow = await page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"

    target = slot(page, slot_id)
    await target.scroll_into_view_if_needed()
    await expect(target).to_be_in_viewport()
    box = await target.bounding_box()
    assert box is not None
    assert box["x"] >= 0
    assert box["x"] + box["width"] <= PHONE["width"]
    assert box["height"] >= 24, "a slot should be big enough to tap"

    # Keyboard only: Tab until a free slot has the focus, then Enter holds it.
    await page.locator("body").click(position={"x": 1, "y": 1})
    focused: str | None = None
    for _ in range(80):
        await page.keyboard.press("Tab")
        focused = await page.evaluate(
            "() => document.activeElement?.matches('.slot[data-status=free]')"
            " ? document.activeElement.dataset.slotId : null"
        )
        if focused is not None:
            break
    assert focused is not None, "no free slot took the focus within 80 presses of Tab"
    await expect(slot(page, int(focused))).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(hold_panel(page)).to_be_visible()
    await expect(slot(page, int(focused))).to_have_attribute("data-status", "busy-tentative")
    held = await countdown_seconds(page)

    # A reload (the phone locked, the tab discarded) keeps the sign-in and the hold.
    await page.reload()
    await online(page)
    await expect(hold_panel(page)).to_be_visible()
    await expect(hold_panel(page)).to_contain_text("Ada Moreau")
    assert 0 < await countdown_seconds(page) <= held
    overflow = await page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"with the hold panel the page is {overflow}px too wide"


async def test_cancelling_from_either_side_frees_the_slot_live(
    spawn_server: Spawn, http: aiohttp.ClientSession, database_url: str, pages: Pages
) -> None:
    """Alice cancels one visit and the clinic cancels the other: every page follows live."""
    (server,) = await start(spawn_server, "s1")
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    zone = ada["timezone"]
    (mine_id, mine_at), (theirs_id, theirs_at) = await open_slots(http, server, ada, 2)
    ids = []
    for slot_id in (mine_id, theirs_id):
        booked = await post_json(
            http,
            f"{server.http_url}/api/appointments",
            {"slot_id": slot_id, "idempotency_key": f"alice-{slot_id}"},
            201,
            headers={"Authorization": f"Bearer {token(Role.PATIENT, 'alice')}"},
        )
        ids.append(booked["appointment"]["id"])

    alice = await pages.open(patient_url(server, ada["id"], "alice"), name="alice")
    bob = await pages.open(patient_url(server, ada["id"], "bob"), name="bob")
    dash = await pages.open(doctor_url(server, ada["id"]), name="doctor")
    timeline = await dashboard_day(dash, local(mine_at, zone).date())
    for appointment_id in ids:  # booked before the page opened: it lists them on load
        await expect(my_appointment(alice, appointment_id)).to_have_attribute(
            "data-status", "booked"
        )
    on_bob = [await show_slot(bob, ada["id"], i) for i in (mine_id, theirs_id)]
    for button in on_bob:
        await expect(button).to_have_attribute("data-status", "busy")

    # Alice cancels the first, after confirming with a reason.
    mine = my_appointment(alice, ids[0])
    await mine.get_by_role(
        "button", name=re.compile(rf"^Cancel .*{local(mine_at, PATIENT_TZ):%H:%M}")
    ).click()
    reason = alice.get_by_label("Reason", exact=True)
    await expect(reason).to_have_value("Cancelled by patient")
    await alice.get_by_role("button", name="Confirm cancel").click()
    await expect(mine).to_have_attribute("data-status", "cancelled")
    await expect(on_bob[0]).to_have_attribute("data-status", "free")
    await expect(on_bob[0]).to_be_enabled()
    await expect(row(timeline, mine_id)).to_have_attribute("data-status", "free")
    feed_top = dash.get_by_test_id("feed").locator("li").first
    await expect(feed_top).to_contain_text(re.compile(rf"{local(mine_at, zone):%H:%M}.*cancelled"))

    # The clinic cancels the second: Alice is told, in words, that it was the clinic.
    doctor_time = f"{local(theirs_at, zone):%H:%M}"
    await row(timeline, theirs_id).get_by_role("button", name=f"Cancel {doctor_time}").click()
    await dash.get_by_role("button", name="Confirm cancel").click()
    theirs = my_appointment(alice, ids[1])
    await expect(theirs).to_have_attribute("data-status", "cancelled")
    await expect(theirs).to_contain_text("Cancelled by the clinic")
    await expect(on_bob[1]).to_have_attribute("data-status", "free")
    await expect(row(timeline, theirs_id)).to_have_attribute("data-status", "free")
    for slot_id in (mine_id, theirs_id):
        rows = await appointments(database_url, slot_id)
        assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "cancelled")]


async def test_attendance_waits_for_its_time_asks_before_a_no_show_and_can_be_undone(
    spawn_server: Spawn, http: aiohttp.ClientSession, database_url: str, pages: Pages
) -> None:
    """A booking whose time has come and one days ahead, each on its doctor's timeline.

    The clock cannot be moved under real processes, and the API books no past slot, so
    the booking whose time has come is written to the database: a doctor of the test's
    own, with no hours (so no other slot), given one slot that began five minutes ago
    and Alice's booking of it. Its zone is one far from midnight, so that slot's local
    date is today and has a tab.
    """
    (server,) = await start(spawn_server, "s1")
    now = datetime.now(UTC)
    zone = min(  # the one nearest its noon
        ("Europe/Paris", "Asia/Tokyo", "America/New_York"),
        key=lambda z: abs(local(now, z).hour * 60 + local(now, z).minute - 12 * 60),
    )
    admin = {"Authorization": f"Bearer {token(Role.ADMIN, 'ops')}"}
    created = await post_json(
        http,
        f"{server.http_url}/api/doctors",
        {"name": "Dr. Due Now", "timezone": zone, "idempotency_key": "due-now"},
        201,
        headers=admin,
    )
    doctor_id = created["doctor"]["id"]
    due_at = now - timedelta(minutes=5)
    conn = await asyncpg.connect(database_url)
    try:
        due_slot = await conn.fetchval(
            "INSERT INTO slots (doctor_id, starts_at, ends_at, status)"
            " VALUES ($1, $2::timestamptz, $2::timestamptz + interval '30 minutes', 'busy')"
            " RETURNING id",
            doctor_id,
            due_at,
        )
        due_id = await conn.fetchval(
            "INSERT INTO appointments (doctor_id, slot_id, patient_id, starts_at, ends_at,"
            " status) SELECT doctor_id, id, 'alice', starts_at, ends_at, 'booked' FROM slots"
            " WHERE id = $1 RETURNING id",
            due_slot,
        )
    finally:
        await conn.close()

    # Days ahead, booked through the API: nothing to record yet; the buttons say from when.
    ada = await demo_doctor(http, server, "Dr. Ada Moreau")
    later = await get_json(
        http,
        f"{server.http_url}/api/doctors/{ada['id']}/slots",
        params={
            "start": (date.today() + timedelta(days=3)).isoformat(),
            "end": (date.today() + timedelta(days=10)).isoformat(),
        },
    )
    ahead_slot, ahead_start = next(
        (s["id"], s["start"]) for s in later["slots"] if s["status"] == "free"
    )
    ahead_at = datetime.fromisoformat(ahead_start.replace("Z", "+00:00"))
    await post_json(
        http,
        f"{server.http_url}/api/appointments",
        {"slot_id": ahead_slot, "idempotency_key": f"alice-{ahead_slot}"},
        201,
        headers={"Authorization": f"Bearer {token(Role.PATIENT, 'alice')}"},
    )
    ada_page = await pages.open(doctor_url(server, ada["id"]), name="ada")
    timeline = await dashboard_day(ada_page, local(ahead_at, ada["timezone"]).date())
    ahead = row(timeline, ahead_slot)
    ahead_time = f"{local(ahead_at, ada['timezone']):%H:%M}"
    for what in ("arrived", "no-show"):
        button = ahead.get_by_role("button", name=re.compile(rf"Mark {ahead_time} {what} \(from "))
        await expect(button).to_be_disabled()

    # The no-show asks first; keeping the booking sends nothing.
    dash = await pages.open(doctor_url(server, doctor_id), name="doctor")
    timeline = await dashboard_day(dash, local(due_at, zone).date())
    due, due_time = row(timeline, due_slot), f"{local(due_at, zone):%H:%M}"
    badge = due.locator(f'[data-appointment-id="{due_id}"]')
    await expect(badge).to_have_attribute("data-status", "booked")
    await due.get_by_role("button", name=f"Mark {due_time} no-show").click()
    ask = due.get_by_role("group", name=f"Confirm no-show at {due_time}")
    await expect(ask).to_contain_text("alice")
    await ask.get_by_role("button", name="Keep as booked").click()
    await expect(ask).to_have_count(0)
    await expect(badge).to_have_attribute("data-status", "booked")

    await due.get_by_role("button", name=f"Mark {due_time} no-show").click()
    await due.get_by_role("button", name="Confirm no-show").click()
    await expect(badge).to_have_attribute("data-status", "noshow")
    rows = await appointments(database_url, due_slot)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "noshow")]

    # The wrong button after all: undone, live, and in the feed.
    await due.get_by_role("button", name=f"Undo no-show at {due_time}").click()
    await expect(badge).to_have_attribute("data-status", "booked")
    await expect(due.get_by_role("button", name=re.compile("^Undo"))).to_have_count(0)
    feed_top = dash.get_by_test_id("feed").locator("li").first
    await expect(feed_top).to_contain_text("mark undone")
    rows = await appointments(database_url, due_slot)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("alice", "booked")]


async def test_every_screen_passes_a_wcag_aa_audit(
    spawn_server: Spawn, http: aiohttp.ClientSession, pages: Pages
) -> None:
    """Sign-in, the slot picker with a hold, the dashboard, and the phone and tablet
    layouts: no missing label or name, no contrast below AA, no misused ARIA (axe-core's
    rules), and nothing wider than the tablet's screen."""
    (server,) = await start(spawn_server, "s1")
    doctor = await demo_doctor(http, server, "Dr. Ada Moreau")

    visitor = await pages.open(f"{server.http_url}/", name="visitor")
    await expect(visitor.get_by_test_id("signin")).to_be_visible()
    assert await audit(visitor) == ""

    alice = await pages.open(patient_url(server, doctor["id"], "alice"), name="alice")
    slot_id = await first_free_slot(alice, doctor["id"])
    await slot(alice, slot_id).click()
    await expect(hold_panel(alice)).to_be_visible()
    assert await audit(alice) == ""

    bob = await pages.open(patient_url(server, doctor["id"], "bob"), name="bob", viewport=PHONE)
    await expect(slot(bob, slot_id)).to_have_attribute("data-status", "busy-tentative")
    assert await audit(bob) == ""

    dash = await pages.open(doctor_url(server, doctor["id"]), name="doctor")
    slot_day = local(await slot_start(http, server, doctor["id"], slot_id), "Europe/Paris").date()
    timeline = await dashboard_day(dash, slot_day)
    await expect(row(timeline, slot_id)).to_have_attribute("data-status", "busy-tentative")
    assert await audit(dash) == ""

    for page in (alice, dash):
        await page.set_viewport_size(TABLET)  # type: ignore[arg-type]
        assert await audit(page) == ""
        assert await fits_width(page), f"{page.url} scrolls sideways at {TABLET['width']} px"


async def fits_width(page: Page) -> bool:
    return bool(
        await page.evaluate(
            "() => document.scrollingElement.scrollWidth <= document.documentElement.clientWidth"
        )
    )
