"""Demo sign-in and the pages: development tokens only in demo mode, pages at `/` and `/doctor`.

The pages themselves are exercised in a real browser by tests/browser/test_browser.py;
this checks the HTTP contract they rely on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from protocol.vocabulary import Role
from server import auth
from server.app import create_app
from server.settings import Settings
from store import demo
from testkit.fixtures import JWT_SECRET, SeededDoctor
from testkit.wire import error_code

AppClient = TestClient[web.Request, web.Application]


@pytest.fixture
async def demo_client(
    settings: Settings, doctor: SeededDoctor, aiohttp_client: Callable[..., Any]
) -> AppClient:
    app = create_app(settings.replace(demo=True))
    return await aiohttp_client(app)  # type: ignore[no-any-return]


async def test_demo_lists_patients_and_every_doctor(
    demo_client: AppClient, doctor: SeededDoctor
) -> None:
    resp = await demo_client.get("/api/demo")
    assert resp.status == 200
    body = await resp.json()
    assert body["patients"] == demo.PATIENTS
    ids = [d["id"] for d in body["doctors"]]
    assert doctor.id in ids
    assert set(body["doctors"][0]) == {
        "id",
        "name",
        "specialty",
        "timezone",
        "external_id",
        "retired_at",
        "min_notice_minutes",  # the public booking rules an open page needs
        "horizon_days",
    }


@pytest.mark.parametrize(
    ("role", "subject"), [("patient", "alice"), ("doctor", None), ("admin", "desk")]
)
async def test_demo_token_signs_a_working_identity(
    demo_client: AppClient, doctor: SeededDoctor, role: str, subject: str | None
) -> None:
    subject = subject or str(doctor.id)
    resp = await demo_client.post("/api/demo/token", json={"role": role, "subject": subject})
    assert resp.status == 201
    body = await resp.json()
    who = auth.verify(JWT_SECRET, body["token"])
    assert (who.subject, who.role) == (subject, Role(role))
    assert (body["subject"], body["role"]) == (subject, role)
    assert body["expires_at"].endswith("Z")
    # The token is good for what that role may do, e.g. the patient's own appointments.
    if role == "patient":
        mine = await demo_client.get(
            "/api/me/appointments", headers={"Authorization": f"Bearer {body['token']}"}
        )
        assert mine.status == 200
    if role == "admin":  # the front desk's: every doctor's day
        day = await demo_client.get(
            f"/api/doctors/{doctor.id}/appointments",
            params={"date": "2026-12-07"},
            headers={"Authorization": f"Bearer {body['token']}"},
        )
        assert day.status == 200, await day.text()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"role": "admin", "subject": "ops"}, 422, "invalid"),  # the demo's one admin: "desk"
        ({"role": "patient", "subject": "mallory"}, 422, "invalid"),  # not a demo patient
        ({"role": "doctor", "subject": "seven"}, 422, "invalid"),
        ({"role": "doctor", "subject": "99999999999"}, 422, "invalid"),
        ({"role": "doctor", "subject": "424242"}, 404, "not_found"),
        ({"role": "patient"}, 422, "invalid"),
        (["patient", "alice"], 422, "invalid"),
    ],
)
async def test_demo_token_refuses_what_it_cannot_sign(
    demo_client: AppClient, body: object, status: int, code: str
) -> None:
    resp = await demo_client.post("/api/demo/token", json=body)
    assert await error_code(resp, status) == code


async def test_demo_token_refuses_a_body_that_is_not_json(demo_client: AppClient) -> None:
    resp = await demo_client.post("/api/demo/token", data=b"role=patient")
    assert await error_code(resp, 400) == "bad_message"


async def test_without_demo_mode_there_are_no_dev_tokens(client: AppClient) -> None:
    """Production: the host application signs tokens; the pages say so on this 404."""
    assert await error_code(await client.get("/api/demo"), 404) == "not_found"
    resp = await client.post("/api/demo/token", json={"role": "patient", "subject": "alice"})
    assert await error_code(resp, 404) == "not_found"


@pytest.mark.parametrize("path", ["/", "/doctor"])
async def test_pages_are_served_as_html(client: AppClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert '<script type="module"' in await resp.text()
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self';")


async def test_pages_name_the_configured_host_origins_and_only_they_may_frame_them(
    settings: Settings, aiohttp_client: Callable[..., Any]
) -> None:
    """The page accepts postMessage tokens only from the origins its meta tag lists."""
    hosts = "https://app.clinic.example http://localhost:3000"
    client: AppClient = await aiohttp_client(create_app(settings.replace(host_origins=hosts)))
    for path in ("/", "/doctor"):
        resp = await client.get(path)
        html = await resp.text()
        assert f'<meta name="slotcast-host-origins" content="{hosts}">' in html
        csp = resp.headers["Content-Security-Policy"]
        assert csp.endswith(f"frame-ancestors 'self' {hosts}")


async def test_without_host_origins_only_the_pages_own_origin_frames_them(
    client: AppClient,
) -> None:
    resp = await client.get("/")
    assert '<meta name="slotcast-host-origins" content="">' in await resp.text()
    assert resp.headers["Content-Security-Policy"].endswith("frame-ancestors 'self'")


@pytest.mark.parametrize(
    "origins",
    ['https://ok.example "><script>', "app.clinic.example", "https://x.example/path", "*"],
)
def test_a_host_origin_that_is_not_an_origin_stops_the_server_at_startup(
    settings: Settings, origins: str
) -> None:
    with pytest.raises(ValueError, match="SLOTCAST_HOST_ORIGINS"):
        create_app(settings.replace(host_origins=origins))
