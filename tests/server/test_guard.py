"""Facing the open internet, in process: rate limits, connection caps, origins, idle sockets,
slow bodies, response headers, /metrics access and presence (server/limits.py, server/guard.py).

Each protection is shown refusing what it must and letting through what it must not
refuse (a clinic's patients behind one address, a client without `Origin`). Limits
shared between instances, slow request heads and HAProxy are in tests/deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from client import ClientError, SlotcastClient
from protocol.codec import JSON
from protocol.messages import Presence
from protocol.vocabulary import Role
from server.app import create_app
from server.guard import CLOSE_IDLE, CSP_NONE
from server.keys import METRICS
from server.limits import CLOSE_RATE_LIMITED
from server.metrics import WorkerMetrics
from server.settings import Settings
from server.webhook_worker import serve_metrics, work
from testkit.fixtures import SeededDoctor, token, ws_url
from testkit.harness import free_port
from testkit.wire import WAIT_S, error_code, expect

AppClient = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Any]


@pytest.fixture
def serve(settings: Settings, aiohttp_client: MakeClient) -> Callable[..., Any]:
    """An in-process server with some settings changed."""

    async def start(**changes: Any) -> AppClient:
        client: AppClient = await aiohttp_client(create_app(settings.replace(**changes)))
        return client

    return start


def sample(client: AppClient, name: str, **labels: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def bearer(role: Role = Role.PATIENT, sub: str = "patient-1", **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sub, **kw)}"}


async def request(ws: aiohttp.ClientWebSocketResponse, rid: int, kind: str, **body: Any) -> Any:
    """Send one JSON request on a raw socket and return the reply with its id."""
    await ws.send_json({"type": kind, "id": rid, "body": body})
    while True:
        reply = await ws.receive_json(timeout=WAIT_S)
        if reply["id"] == rid:
            return reply


async def welcomed(client: AppClient, **kw: Any) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/ws", protocols=[JSON.subprotocol], **kw)
    assert (await ws.receive_json(timeout=WAIT_S))["type"] == "welcome"
    return ws


# ---- rate limits -----------------------------------------------------------------------------


async def test_one_connection_flooding_is_refused_with_retry_after_then_closed_4029(
    serve: Callable[..., Any],
) -> None:
    client = await serve(rate_connection="5/minute", rate_close_after=3)
    ws = await welcomed(client)
    for rid in range(5):
        assert (await request(ws, rid, "ping"))["type"] == "pong"
    refused = await request(ws, 5, "ping")
    assert refused["type"] == "error"
    assert refused["body"]["code"] == "rate_limited"
    assert 0 < refused["body"]["retry_after_ms"] <= 60_000
    # A frame that does not even decode spends the same budget (and is refused the same).
    await ws.send_str("not json")
    garbage = await ws.receive_json(timeout=WAIT_S)
    assert garbage["body"]["code"] == "rate_limited"
    # The third refusal in a row closes the connection: it kept sending after being told.
    await ws.send_json({"type": "ping", "id": 7, "body": {}})
    last = await ws.receive_json(timeout=WAIT_S)
    assert last["body"]["code"] == "rate_limited"
    closing = await ws.receive(timeout=WAIT_S)
    assert closing.type is WSMsgType.CLOSE, closing
    assert ws.close_code == CLOSE_RATE_LIMITED
    assert sample(client, "slotcast_rate_limited_total", scope="connection") == 3
    assert sample(client, "slotcast_connections_closed_total", reason="rate_limited") == 1
    # Another connection from the same address has its own budget.
    other = await welcomed(client)
    assert (await request(other, 1, "ping"))["type"] == "pong"
    await other.close()


async def test_a_watch_costs_its_budget_by_the_weeks_it_reads(
    serve: Callable[..., Any], doctor: SeededDoctor
) -> None:
    """A snapshot of two months is nine weeks of slots to read and send: asked over and
    over, it spends the budget nine times as fast as a week does (`limits.cost`)."""
    client = await serve(rate_connection="20/minute")
    start = doctor.start.isoformat()
    weeks = await welcomed(client)
    for rid in range(10):  # a week at a time: well inside the budget
        end = (doctor.start + timedelta(days=7)).isoformat()
        reply = await request(weeks, rid, "watch", doctor_id=doctor.id, start=start, end=end)
        assert reply["type"] == "snapshot"
    months = await welcomed(client)
    end = (doctor.start + timedelta(days=62)).isoformat()
    replies = [
        await request(months, rid, "watch", doctor_id=doctor.id, start=start, end=end)
        for rid in range(3)
    ]
    # 9 + 9 fit in 20; the third would make 27.
    assert [r["type"] for r in replies] == ["snapshot", "snapshot", "error"]
    assert replies[2]["body"]["code"] == "rate_limited"
    await weeks.close()
    await months.close()


async def test_identity_budgets_are_per_identity_and_separate_for_reads_and_writes(
    serve: Callable[..., Any], doctor: SeededDoctor
) -> None:
    """Many patients behind one address each have their own budget; one flooding identity
    is refused across all its connections, for writes without losing its reads."""
    client = await serve(rate_identity_writes="2/minute", rate_identity_reads="4/minute")
    url = ws_url(client)
    async with (
        SlotcastClient.connect(url, token=token(sub="p-flood")) as first,
        SlotcastClient.connect(url, token=token(sub="p-flood")) as second,
        SlotcastClient.connect(url, token=token(sub="p-neighbour")) as neighbour,
    ):
        held = await first.hold(doctor.slots[0].id)
        await second.release(held.id)  # the identity's second write, on another socket
        with pytest.raises(ClientError) as refused:
            await first.hold(doctor.slots[1].id)
        assert refused.value.code.value == "rate_limited"
        assert refused.value.retry_after_ms is not None
        assert refused.value.retry_after_ms > 0
        # Reads have their own budget, and the same address's other patient is untouched.
        await first.ping()
        assert (await neighbour.hold(doctor.slots[2].id)).slot_id == doctor.slots[2].id
        await neighbour.hold(doctor.slots[3].id)
        # REST spends the same identity budget: its third write is refused there too.
        resp = await client.post(
            "/api/holds", json={"slot_id": doctor.slots[4].id}, headers=bearer(sub="p-flood")
        )
        assert await error_code(resp, 429) == "rate_limited"
        retry_after = int(resp.headers["Retry-After"])
        body = await resp.json()
        assert 0 < body["error"]["retry_after_ms"] <= retry_after * 1000 <= 61_000
        for _ in range(3):
            await second.ping()
        with pytest.raises(ClientError, match="identity_reads"):
            await second.ping()
    assert sample(client, "slotcast_rate_limited_total", scope="identity_writes") == 2
    assert sample(client, "slotcast_rate_limited_total", scope="identity_reads") == 1


async def test_anonymous_requests_spend_their_address_budget_signed_in_ones_do_not(
    serve: Callable[..., Any],
) -> None:
    client = await serve(rate_address="3/minute")
    for _ in range(3):
        assert (await client.get("/api/doctors")).status == 200
    resp = await client.get("/api/doctors")
    assert await error_code(resp, 429) == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    # The same address with a token counts as that identity; pages and health are free.
    for _ in range(3):
        assert (await client.get("/api/me/appointments", headers=bearer(sub="p-1"))).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/")).status in {200, 404}
    # A WebSocket without a token spends the same address budget.
    ws = await welcomed(client)
    assert (await request(ws, 1, "ping"))["body"]["code"] == "rate_limited"
    await ws.close()
    assert sample(client, "slotcast_rate_limited_total", scope="address") == 2


async def test_failed_sign_ins_lock_the_address_out_even_for_a_good_token(
    serve: Callable[..., Any],
) -> None:
    client = await serve(rate_auth_failures="3/minute")
    ws = await welcomed(client)
    # An expired token is not a failed sign-in: its signature was good.
    expired = token(sub="p-1", ttl=timedelta(seconds=-5))
    assert (await request(ws, 0, "auth", token=expired))["body"]["code"] == "token_expired"
    for rid in range(1, 4):
        assert (await request(ws, rid, "auth", token="forged"))["body"]["code"] == "token_invalid"
    locked = await request(ws, 4, "auth", token=token(sub="p-1"))
    assert locked["body"]["code"] == "rate_limited"
    assert locked["body"]["retry_after_ms"] > 0
    await ws.close()
    # The lockout is the address's: a header token on a new socket and REST are refused too.
    async with client.session.ws_connect(
        ws_url(client), protocols=[JSON.subprotocol], headers=bearer(sub="p-1")
    ) as again:
        welcome = await again.receive_json(timeout=WAIT_S)
        assert welcome["body"]["subject"] is None
        assert (await again.receive_json(timeout=WAIT_S))["body"]["code"] == "rate_limited"
    resp = await client.get("/api/me/appointments", headers=bearer(sub="p-1"))
    assert await error_code(resp, 429) == "rate_limited"
    # Anonymous reads are another budget: still served.
    assert (await client.get("/api/doctors")).status == 200


async def test_rest_failed_tokens_count_as_sign_in_failures(serve: Callable[..., Any]) -> None:
    client = await serve(rate_auth_failures="2/minute")
    forged = {"Authorization": "Bearer not-a-token"}
    for _ in range(2):
        resp = await client.get("/api/me/appointments", headers=forged)
        assert await error_code(resp, 401) == "token_invalid"
    resp = await client.get("/api/me/appointments", headers=forged)
    assert await error_code(resp, 429) == "rate_limited"
    assert sample(client, "slotcast_rate_limited_total", scope="auth_failures") == 1


async def test_limits_set_to_off_do_not_count(serve: Callable[..., Any]) -> None:
    client = await serve(rate_connection="off", rate_address="off")
    ws = await welcomed(client)
    for rid in range(150):  # over the default 100 per 10 s of one connection
        await ws.send_json({"type": "ping", "id": rid, "body": {}})
    replies = [await ws.receive_json(timeout=WAIT_S) for _ in range(150)]
    assert {r["type"] for r in replies} == {"pong"}
    await ws.close()


# ---- connection caps, origins, idle sockets --------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]


async def upgrade_status(client: AppClient, **headers: str) -> Answer:
    """The answer to a WebSocket upgrade request, read by hand (then the socket is closed)."""
    async with client.get(
        "/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            **headers,
        },
    ) as resp:
        return Answer(resp.status, dict(resp.headers))


async def test_connections_are_capped_per_address_before_the_upgrade(
    serve: Callable[..., Any],
) -> None:
    client = await serve(max_connections_per_address=2, trusted_proxies="127.0.0.1")
    held = [await welcomed(client), await welcomed(client)]
    refused = await upgrade_status(client)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "5"
    # Behind a trusted proxy, X-Forwarded-For names the client: another address has room.
    other = await welcomed(client, headers={"X-Forwarded-For": "198.51.100.7"})
    # Through a chain of trusted proxies, the client is the right-most address that is not one.
    chained = await upgrade_status(client, **{"X-Forwarded-For": "203.0.113.9, 127.0.0.1"})
    assert chained.status == 101
    await held.pop().close()
    await eventually_accepted(client)
    for ws in [*held, other]:
        await ws.close()
    assert sample(client, "slotcast_connections_refused_total", reason="per_address") >= 1


async def eventually_accepted(client: AppClient) -> None:
    deadline = time.monotonic() + WAIT_S
    while (await upgrade_status(client)).status != 101:
        assert time.monotonic() < deadline, "a closed connection's place was never released"
        await asyncio.sleep(0.02)


async def test_untrusted_peers_cannot_choose_their_address(serve: Callable[..., Any]) -> None:
    client = await serve(max_connections_per_address=1)  # no trusted proxies
    ws = await welcomed(client)
    resp = await upgrade_status(client, **{"X-Forwarded-For": "198.51.100.7"})
    assert resp.status == 503
    await ws.close()


async def test_connections_are_capped_per_instance(serve: Callable[..., Any]) -> None:
    client = await serve(max_connections=2, trusted_proxies="127.0.0.1")
    a = await welcomed(client, headers={"X-Forwarded-For": "198.51.100.1"})
    b = await welcomed(client, headers={"X-Forwarded-For": "198.51.100.2"})
    resp = await upgrade_status(client, **{"X-Forwarded-For": "198.51.100.3"})
    assert resp.status == 503
    assert sample(client, "slotcast_connections_refused_total", reason="per_instance") == 1
    await a.close()
    await b.close()


async def test_websocket_origin_must_be_the_pages_own_or_a_host_origin(
    serve: Callable[..., Any],
) -> None:
    client = await serve(host_origins="https://app.clinic.example")
    own = f"http://{client.host}:{client.port}"
    for origin in (own, own.upper(), "https://app.clinic.example"):
        ws = await welcomed(client, headers={"Origin": origin})
        await ws.close()
    for origin in ("https://evil.example", "null", f"http://{client.host}:1", "https://app.clinic"):
        resp = await upgrade_status(client, Origin=origin)
        assert resp.status == 403, origin
    assert sample(client, "slotcast_connections_refused_total", reason="origin") == 4
    ws = await welcomed(client)  # no Origin at all: an app or a server
    await ws.close()


async def test_idle_anonymous_connections_are_closed_4009_but_no_others(
    serve: Callable[..., Any], doctor: SeededDoctor
) -> None:
    client = await serve(idle_anonymous_s=0.3)
    url = ws_url(client)
    idle = await welcomed(client)
    async with (
        SlotcastClient.connect(url) as watching,
        SlotcastClient.connect(url, token=token(sub="p-quiet")) as signed_in,
    ):
        await watching.watch(doctor.id, doctor.start, doctor.end)
        closing = await idle.receive(timeout=WAIT_S)
        assert closing.type is WSMsgType.CLOSE, closing
        assert idle.close_code == CLOSE_IDLE
        await asyncio.sleep(0.6)  # well past the idle time for the other two
        await watching.ping()
        await signed_in.ping()
    assert sample(client, "slotcast_connections_closed_total", reason="idle") == 1


# ---- slow bodies, headers on every response, /metrics ----------------------------------------


async def test_a_request_body_not_sent_in_time_gets_408_and_the_connection_closes(
    serve: Callable[..., Any],
) -> None:
    client = await serve(body_timeout_s=0.3)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /api/holds HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"slot_id"'
    )
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), WAIT_S)  # until the server closes
    elapsed = time.monotonic() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 0.2 < elapsed < 2.0
    assert sample(client, "slotcast_requests_timed_out_total") == 1
    # A body sent in one go is read as before.
    resp = await client.post("/api/holds", json={"slot_id": 1})
    assert await error_code(resp, 401) == "unauthenticated"


async def test_every_response_says_nosniff_and_carries_a_csp(client: AppClient) -> None:
    for path in ("/api/doctors", "/healthz", "/static/js/session.js", "/nowhere", "/api/holds"):
        resp = await client.get(path)
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["Content-Security-Policy"] == CSP_NONE, path
    page = await client.get("/")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src" not in page.headers["Content-Security-Policy"]
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")


async def test_metrics_are_served_to_allowed_addresses_or_the_token_only(
    serve: Callable[..., Any],
) -> None:
    loopback = await serve()
    assert (await loopback.get("/metrics")).status == 200  # the default: loopback only

    client = await serve(
        metrics_allow="10.0.0.0/8", metrics_token="scrape-me", trusted_proxies="127.0.0.1"
    )
    assert (await client.get("/metrics")).status == 403
    wrong = {"Authorization": "Bearer scrape-you"}
    assert (await client.get("/metrics", headers=wrong)).status == 403
    right = {"Authorization": "Bearer scrape-me"}
    resp = await client.get("/metrics", headers=right)
    assert resp.status == 200
    assert "slotcast_metrics_refused_total 2.0" in await resp.text()
    # Behind the trusted balancer, it is the client's address that must be allowed.
    inside = {"X-Forwarded-For": "10.1.2.3"}
    assert (await client.get("/metrics", headers=inside)).status == 200
    outside = {"X-Forwarded-For": "203.0.113.5"}
    assert (await client.get("/metrics", headers=outside)).status == 403


async def test_a_webhook_worker_guards_its_own_metrics_the_same_way(settings: Settings) -> None:
    """`slotcast webhooks` serves /metrics on a port of its own, under the same allow list
    and token; a port already taken (exit 1) or an allow list that is no list of networks
    (exit 2) stops it at start, before any database."""
    port = free_port()
    worker = settings.replace(
        webhooks_metrics_port=port, metrics_allow="10.0.0.0/8", metrics_token="scrape-me"
    )
    metrics = WorkerMetrics()
    metrics.deliveries.attempted(7, ok=False)
    url = f"http://127.0.0.1:{port}/metrics"
    async with serve_metrics(worker, metrics), aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 403
        right = {"Authorization": "Bearer scrape-me"}
        async with http.get(url, headers=right) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'slotcast_webhook_failures_total{endpoint="7"} 1.0' in text
        assert "slotcast_metrics_refused_total 1.0" in text
        taken = worker.replace(database_url="postgresql://127.0.0.1:1/none", webhooks="worker")
        assert await work(taken) == 1
    assert await work(taken.replace(metrics_allow="10.0.0.0/33")) == 2


# ---- behind TLS ------------------------------------------------------------------------------


def instance_cookie(resp: aiohttp.ClientResponse) -> str:
    (cookie,) = [c for c in resp.headers.getall("Set-Cookie") if c.startswith("slotcast_instance=")]
    return cookie


async def test_over_https_cookies_are_secure_and_hsts_is_sent_as_configured(
    serve: Callable[..., Any],
) -> None:
    """TLS ends at the balancer: a request is https when the trusted proxy says so. Then
    the instance cookie is `Secure` and, with SLOTCAST_HSTS_MAX_AGE, HSTS is sent; over
    plain http neither, and a client that writes the header itself is not believed."""
    https = {"X-Forwarded-Proto": "https"}
    behind = await serve(trusted_proxies="127.0.0.1", hsts_max_age=31536000)
    for path in ("/healthz", "/", "/api/doctors"):
        resp = await behind.get(path, headers=https)
        assert "; Secure" in instance_cookie(resp), path
        assert resp.headers["Strict-Transport-Security"] == "max-age=31536000", path
    plain = await behind.get("/healthz", headers={"X-Forwarded-Proto": "http"})
    assert "Secure" not in instance_cookie(plain)
    assert "Strict-Transport-Security" not in plain.headers

    off = await serve(trusted_proxies="127.0.0.1")  # HSTS is opt-in; Secure is not
    resp = await off.get("/healthz", headers=https)
    assert "; Secure" in instance_cookie(resp)
    assert "Strict-Transport-Security" not in resp.headers

    untrusted = await serve(hsts_max_age=31536000)  # no proxy trusted: the header is the client's
    resp = await untrusted.get("/healthz", headers=https)
    assert "Secure" not in instance_cookie(resp)
    assert "Strict-Transport-Security" not in resp.headers


# ---- the pages and demo mode -----------------------------------------------------------------


async def test_the_pages_say_whether_demo_mode_is_on(serve: Callable[..., Any]) -> None:
    """A production page must not ask /api/demo (a 404 and a console error on every load):
    the server tells it in a meta tag whether demo mode is on (static/js/session.js)."""
    production = await serve()
    for path in ("/", "/doctor"):
        html = await (await production.get(path)).text()
        assert '<meta name="slotcast-demo" content="off">' in html, path
    assert (await production.get("/api/demo")).status == 404
    demo = await serve(demo=True)
    html = await (await demo.get("/")).text()
    assert '<meta name="slotcast-demo" content="on">' in html
    assert (await demo.get("/api/demo")).status == 200


# ---- presence --------------------------------------------------------------------------------


async def test_anonymous_sockets_and_second_sockets_do_not_inflate_presence(
    client: AppClient, doctor: SeededDoctor
) -> None:
    url = ws_url(client)
    doctor_token = token(Role.DOCTOR, str(doctor.id))
    async with contextlib.AsyncExitStack() as stack:
        desk = await stack.enter_async_context(SlotcastClient.connect(url, token=doctor_token))
        assert (await desk.watch_dashboard(doctor.id, doctor.start)).watchers == 0
        for _ in range(5):
            anonymous = await stack.enter_async_context(SlotcastClient.connect(url))
            await anonymous.watch(doctor.id, doctor.start, doctor.end)
        async with (
            SlotcastClient.connect(url, token=token(sub="p-view")) as viewer,
            SlotcastClient.connect(url, token=token(sub="p-view")) as same_viewer,
        ):
            await viewer.watch(doctor.id, doctor.start, doctor.end)
            await same_viewer.watch(doctor.id, doctor.start, doctor.end)
            assert (await expect(desk, Presence)).watchers == 1  # not 7, and never more
            assert (await desk.watch_dashboard(doctor.id, doctor.start)).watchers == 1
            await same_viewer.unwatch(doctor.id)  # the viewer still watches on `viewer`
            await desk.ping()
            assert desk.events.empty()
        assert (await expect(desk, Presence)).watchers == 0
