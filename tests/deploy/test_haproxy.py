"""docs/haproxy.cfg in front of three real instances: what a deployment relies on.

The README promises that Slotcast runs behind a load balancer and survives a
rolling restart without losing or doubling a booking and without any watcher's
calendar drifting. Those promises only hold if the balancer configuration, the
drain sequence (server.lifecycle) and the client's reconnect/resume
(client/) fit together, so this module runs the shipped configuration
file, unchanged, with real HAProxy, three `slotcast serve` processes, one
PostgreSQL and one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from client import ClientError, SlotcastClient
from protocol.messages import AppointmentView, SlotView
from protocol.vocabulary import SlotStatus
from store import reads
from store.pool import Store
from testkit.fixtures import SeededDoctor, Spawn, seed_doctor, token
from testkit.harness import REPO, ServerProcess, free_port, read_log, stop_process
from testkit.tools import ensure_haproxy, self_signed_certificate

pytestmark = pytest.mark.processes

CONFIG = REPO / "docs" / "haproxy.cfg"
SERVERS = ("s1", "s2", "s3")  # the `server` names (and cookie values) in docs/haproxy.cfg
DRAIN_GRACE_S = 1.5
# Errors after which the same command, with the same idempotency key, must be sent
# again: the connection dropped (or was refused) mid-command, or a lock timed out.
RETRYABLE = {"unavailable", "busy"}


# ---- HAProxy ---------------------------------------------------------------------------------


@dataclass
class Balancer:
    """HAProxy running docs/haproxy.cfg in the foreground, plus the instances behind it."""

    port: int
    log_path: Path
    servers: dict[str, ServerProcess]  # by the cookie value that pins a client to it
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. SLOTCAST_LB_CERT

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, haproxy: str) -> None:
        # The file reads every address from the environment ("${SLOTCAST_S1}" ...).
        env = {
            **os.environ,
            "SLOTCAST_LB_BIND": f"127.0.0.1:{self.port}",
            **{
                f"SLOTCAST_{name.upper()}": f"127.0.0.1:{s.port}"
                for name, s in self.servers.items()
            },
            **self.extra_env,
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [haproxy, "-f", str(CONFIG), "-db"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> int | None:
        if self.process is None:
            return None
        # SIGUSR1 would wait for the tunnels to end; the test is over, so stop now.
        code = stop_process(self.process, signal.SIGTERM, 10)
        self.process = None
        return code

    def logs(self) -> str:
        return read_log(self.log_path)

    def exited(self) -> str | None:
        """Why HAProxy is gone, if it is: every wait checks, so a crash fails fast."""
        if self.process is not None and self.process.poll() is not None:
            return f"haproxy exited with {self.process.returncode}:\n{self.logs()}"
        return None


@pytest.fixture(scope="module")
def haproxy() -> str:
    reasons: list[str] = []
    path = ensure_haproxy(reasons)
    if path is None:
        pytest.skip(reasons[0])
    return path


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest,
    haproxy: str,
    spawn_server: Spawn,
    redis_url: str,
    tmp_path: Path,
) -> AsyncIterator[Balancer]:
    """Three instances sharing this test's database and Redis, behind docs/haproxy.cfg."""
    env = {
        "SLOTCAST_DRAIN_GRACE_S": str(DRAIN_GRACE_S),
        # Each booker books slot after slot across the restarts: lift the per-patient caps,
        # which tests/server/test_booking_limits.py proves.
        "SLOTCAST_MAX_ACTIVE_PER_DOCTOR": "100000",
        "SLOTCAST_MAX_ACTIVE_TOTAL": "100000",
        # As docs/operating.md says to: believe X-Forwarded-For from HAProxy, and only it.
        "SLOTCAST_TRUSTED_PROXIES": "127.0.0.1",
        # The rolling restart's bookers book ~10 times a second each, faster than people:
        # the restarts are under test here, the rate limits in tests/deploy/test_limits.py.
        "SLOTCAST_RATE_CONNECTION": "off",
        "SLOTCAST_RATE_IDENTITY_WRITES": "off",
    }
    procs = await asyncio.gather(
        *(asyncio.to_thread(spawn_server, name, broker_url=redis_url, env=env) for name in SERVERS)
    )
    balancer = Balancer(
        free_port(), tmp_path / "haproxy.log", dict(zip(SERVERS, procs, strict=True))
    )
    balancer.start(haproxy)
    try:
        async with fresh_session() as http:
            for name in SERVERS:  # every instance reachable through it, not just one
                await until(
                    functools.partial(instance_behind, http, balancer, name),
                    10,
                    f"haproxy to route cookie {name} to instance {name}",
                    balancer,
                )
        yield balancer
    finally:
        balancer.stop()
        # Side by side: each drains for DRAIN_GRACE_S, one after another would add up.
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"\n----- haproxy log -----\n{balancer.logs()}")


async def until(
    check: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    balancer: Balancer,
    explain: Callable[[], str] = str,
) -> None:
    """Poll `check` until true; fail with `what` (and `explain()`) after `timeout` s,
    or at once if HAProxy died, since nothing can pass through it then."""
    deadline = time.monotonic() + timeout
    while True:
        if (died := balancer.exited()) is not None:
            pytest.fail(died)
        if await check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{explain()}")
        await asyncio.sleep(0.05)


def fresh_session(cookie: str | None = None) -> aiohttp.ClientSession:
    """No keep-alive and no cookie jar: each request is balanced on its own merits."""
    headers = {"Cookie": f"SLOTCAST_LB={cookie}"} if cookie else {}
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=5),
    )


async def answered_by(
    http: aiohttp.ClientSession, balancer: Balancer, cookie: str | None = None
) -> tuple[str, str | None]:
    """(the instance that answered /healthz through HAProxy, the SLOTCAST_LB it set)."""
    headers = {"Cookie": f"SLOTCAST_LB={cookie}"} if cookie else {}
    async with http.get(f"{balancer.http_url}/healthz", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        sticky = resp.cookies.get("SLOTCAST_LB")
        return resp.headers["X-Slotcast-Instance"], sticky.value if sticky else None


async def instance_behind(http: aiohttp.ClientSession, balancer: Balancer, cookie: str) -> bool:
    try:
        return (await answered_by(http, balancer, cookie))[0] == cookie
    except (aiohttp.ClientError, AssertionError, TimeoutError):
        return False


# ---- the file itself -------------------------------------------------------------------------


def check_config(haproxy: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`haproxy -c` on the shipped file with exactly these SLOTCAST_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLOTCAST_")}
    return subprocess.run(
        [haproxy, "-c", "-f", str(CONFIG)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def self_signed_pem(directory: Path) -> Path:
    reasons: list[str] = []
    pem = self_signed_certificate(directory, reasons)
    if pem is None:
        pytest.skip(reasons[0])
    return pem


def test_the_shipped_config_takes_any_number_of_instances_and_tls(
    haproxy: str, tmp_path: Path
) -> None:
    """Unset SLOTCAST_Sn are no servers: one, two or nine instances all pass `haproxy -c`,
    none is refused with a line saying what to set, and TLS is one variable away."""
    bind = {"SLOTCAST_LB_BIND": "127.0.0.1:8443"}
    for count in (1, 2, 3, 9):
        servers = {f"SLOTCAST_S{n}": f"10.0.0.{10 + n}:8080" for n in range(1, count + 1)}
        done = check_config(haproxy, **bind, **servers)
        assert done.returncode == 0, f"{count} instances: {done.stdout}{done.stderr}"
    two = {"SLOTCAST_S1": "10.0.0.11:8080", "SLOTCAST_S2": "10.0.0.12:8080"}
    done = check_config(haproxy, **bind)
    assert done.returncode != 0
    assert "SLOTCAST_S1 is not set" in done.stdout + done.stderr
    done = check_config(haproxy, **two)
    assert done.returncode != 0
    assert "SLOTCAST_LB_BIND is not set" in done.stdout + done.stderr

    pem = self_signed_pem(tmp_path)
    tls = {"SLOTCAST_LB_CERT": str(pem), "SLOTCAST_LB_REDIRECT_BIND": "127.0.0.1:8080"}
    done = check_config(haproxy, **bind, **two, **tls)
    assert done.returncode == 0, f"with TLS: {done.stdout}{done.stderr}"
    missing = {**tls, "SLOTCAST_LB_CERT": str(tmp_path / "nowhere.pem")}
    assert check_config(haproxy, **bind, **two, **missing).returncode != 0


async def test_behind_tls_every_cookie_is_secure_hsts_is_sent_and_http_redirects(
    haproxy: str, spawn_server: Spawn, tmp_path: Path
) -> None:
    """SLOTCAST_LB_CERT: HAProxy terminates TLS and marks its own cookie `Secure`; it
    tells the instance `X-Forwarded-Proto: https` (whatever the client claimed), so the
    instance marks its cookie `Secure` too and sends HSTS; plain http is redirected."""
    pem = self_signed_pem(tmp_path)
    env = {"SLOTCAST_TRUSTED_PROXIES": "127.0.0.1", "SLOTCAST_HSTS_MAX_AGE": "600"}
    proc = await asyncio.to_thread(spawn_server, "tls", env=env)
    redirect = free_port()
    tls = {"SLOTCAST_LB_CERT": str(pem), "SLOTCAST_LB_REDIRECT_BIND": f"127.0.0.1:{redirect}"}
    balancer = Balancer(free_port(), tmp_path / "haproxy.log", {"s1": proc}, extra_env=tls)
    balancer.start(haproxy)
    origin = f"https://localhost:{balancer.port}"
    context = ssl.create_default_context(cafile=str(pem))
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as http:

            async def served() -> bool:
                try:
                    async with http.get(f"{origin}/healthz") as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await until(served, 10, "HAProxy to serve https", balancer)
            lie = {"X-Forwarded-Proto": "http"}  # overwritten by HAProxy: it saw TLS
            async with http.get(f"{origin}/", headers=lie) as resp:
                assert resp.status == 200
                cookies = resp.headers.getall("Set-Cookie")
                assert resp.headers["Strict-Transport-Security"] == "max-age=600"
            for name in ("SLOTCAST_LB=s1", "slotcast_instance=tls"):
                (cookie,) = [c for c in cookies if c.startswith(name)]
                assert "; secure" in cookie.lower(), cookie
            plain = f"http://127.0.0.1:{redirect}/doctor"
            async with http.get(plain, allow_redirects=False) as resp:
                assert resp.status == 301
                assert resp.headers["Location"] == f"https://127.0.0.1:{redirect}/doctor"
    finally:
        balancer.stop()


# ---- stickiness and readiness ----------------------------------------------------------------


async def test_cookie_stickiness_websockets_and_readiness(
    cluster: Balancer, doctor: SeededDoctor
) -> None:
    """New clients spread over the instances, a client keeps its instance, and an
    instance that fails /readyz stops getting clients before it closes any."""
    async with fresh_session() as http:
        # Without the cookie: spread (leastconn round-robins between equally idle servers),
        # and the cookie HAProxy hands out names the instance that answered.
        seen: dict[str, int] = {}
        for _ in range(12):
            instance, sticky = await answered_by(http, cluster)
            assert sticky == instance, f"SLOTCAST_LB={sticky} set by a reply from {instance}"
            seen[instance] = seen.get(instance, 0) + 1
        assert set(seen) == set(SERVERS), f"12 cookieless requests were answered by {seen}"

        # With it: every request sticks, and HAProxy does not set it again (`indirect`).
        for name in SERVERS:
            answers = [await answered_by(http, cluster, name) for _ in range(6)]
            assert answers == [(name, None)] * 6, f"SLOTCAST_LB={name} got {answers}"

        # Metrics are scraped from each instance, never through the public entrance.
        async with http.get(f"{cluster.http_url}/metrics") as resp:
            assert resp.status == 404, f"/metrics through HAProxy answered {resp.status}"

    # WebSockets go through the same stickiness, and work end to end.
    for name in SERVERS:
        async with (
            fresh_session(cookie=name) as session,
            SlotcastClient.connect(cluster.ws_url, session=session) as client,
        ):
            assert client.instance == name, f"SLOTCAST_LB={name} upgraded on {client.instance}"
            snapshot = await client.watch(doctor.id, doctor.start, doctor.end)
            assert len(snapshot.slots) == len(doctor.slots)
            await client.ping()

    # Readiness: on SIGTERM s3 fails /readyz at once but serves for DRAIN_GRACE_S more.
    # HAProxy must stop sending it even its sticky clients within that grace.
    doomed = cluster.servers["s3"]
    assert doomed.process is not None
    doomed.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    async with fresh_session() as http:
        await until(
            lambda: _moved_off(http, cluster, "s3"),
            DRAIN_GRACE_S,
            "HAProxy to send SLOTCAST_LB=s3 elsewhere while s3 drains",
            cluster,
        )
        left_after = time.monotonic() - signalled
        for _ in range(6):
            instance, sticky = await answered_by(http, cluster, "s3")
            assert instance in {"s1", "s2"}, f"a draining s3 still answered ({left_after:.2f}s)"
            assert sticky == instance, "the client was not re-pinned to its new instance"
    assert await asyncio.to_thread(doomed.stop) == 0, doomed.logs()
    print(f"draining instance left rotation {left_after:.2f}s after SIGTERM")


async def _moved_off(http: aiohttp.ClientSession, balancer: Balancer, cookie: str) -> bool:
    return (await answered_by(http, balancer, cookie))[0] != cookie


# ---- facing the internet: slow requests, the client's address ----------------------------------


@pytest.fixture
async def single(haproxy: str, spawn_server: Spawn, tmp_path: Path) -> AsyncIterator[Balancer]:
    """One instance behind docs/haproxy.cfg (its three `server` lines all point at it),
    believing HAProxy's X-Forwarded-For, with a small anonymous budget to observe it."""
    env = {"SLOTCAST_TRUSTED_PROXIES": "127.0.0.1", "SLOTCAST_RATE_ADDRESS": "2/minute"}
    proc = await asyncio.to_thread(spawn_server, "solo", env=env)
    balancer = Balancer(free_port(), tmp_path / "haproxy.log", dict.fromkeys(SERVERS, proc))
    balancer.start(haproxy)

    async def routed() -> bool:
        async with fresh_session() as http:
            try:
                return (await answered_by(http, balancer))[0] == "solo"
            except (aiohttp.ClientError, AssertionError, TimeoutError):
                return False

    try:
        await until(routed, 10, "HAProxy to route to the instance", balancer)
        yield balancer
    finally:
        balancer.stop()


def _closed_after(request: bytes, port: int, source: str = "127.0.0.1") -> tuple[float, bytes]:
    """Send `request` (maybe half of one) and read until the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        s.sendall(request)
        started = time.monotonic()
        received = b""
        while chunk := s.recv(4096):
            received += chunk
        return time.monotonic() - started, received


async def test_haproxy_cuts_slow_request_heads_and_bodies(single: Balancer) -> None:
    """`timeout http-request` (10 s) with `http-buffer-request`: a half-sent head or body
    gets 408 from HAProxy and is closed; the instance never waits on it."""
    half_head = b"GET /healthz HTTP/1.1\r\nHost: slotcast\r\nX-Slow: "
    half_body = (
        b"POST /api/holds HTTP/1.1\r\nHost: slotcast\r\nContent-Type: application/json\r\n"
        b'Content-Length: 64\r\n\r\n{"slot'
    )
    (head_s, head), (body_s, body) = await asyncio.gather(
        asyncio.to_thread(_closed_after, half_head, single.port),
        asyncio.to_thread(_closed_after, half_body, single.port),
    )
    for elapsed, answer in ((head_s, head), (body_s, body)):
        assert 8 < elapsed < 16, f"closed after {elapsed:.1f}s"
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]


async def test_instances_count_the_address_haproxy_saw_not_one_the_client_wrote(
    single: Balancer,
) -> None:
    """HAProxy appends the address it saw to X-Forwarded-For; the instance believes only
    that (SLOTCAST_TRUSTED_PROXIES), so a forged header does not buy a fresh budget.
    Clients connect from 127.0.0.2 and 127.0.0.3, HAProxy to the instance from 127.0.0.1."""

    def get(source: str, forged: str) -> bytes:
        request = (
            f"GET /api/doctors HTTP/1.1\r\nHost: slotcast\r\nConnection: close\r\n"
            f"X-Forwarded-For: {forged}\r\n\r\n"
        ).encode()
        return _closed_after(request, single.port, source)[1]

    answers = [
        await asyncio.to_thread(get, "127.0.0.2", forged)
        for forged in ("198.51.100.1", "198.51.100.2", "198.51.100.3")
    ]
    statuses = [a.split(b" ", 2)[1] for a in answers]
    assert statuses == [b"200", b"200", b"429"], answers[-1][:300]
    assert (await asyncio.to_thread(get, "127.0.0.3", "198.51.100.3")).startswith(b"HTTP/1.1 200")


# ---- fan-out through the balancer ------------------------------------------------------------


async def test_watchers_on_every_instance_see_bookings_made_through_any(
    cluster: Balancer, doctor: SeededDoctor
) -> None:
    """Whichever instance HAProxy picks for a watcher and for a booker, the watcher
    hears every booking: the balancer may split a clinic's clients arbitrarily."""
    async with contextlib.AsyncExitStack() as stack:
        clients: list[SlotcastClient] = []
        by_instance: dict[str, list[SlotcastClient]] = {}
        for i in range(15):  # leastconn puts 3 on 3 servers; 15 bounds a bad spread
            client = await stack.enter_async_context(
                SlotcastClient.connect(cluster.ws_url, token=token(sub=f"watcher-{i}"))
            )
            await client.watch(doctor.id, doctor.start, doctor.end)
            assert client.instance is not None
            clients.append(client)
            by_instance.setdefault(client.instance, []).append(client)
            if len(by_instance) == len(SERVERS):
                break
        spread = {k: len(v) for k, v in by_instance.items()}
        assert set(by_instance) == set(SERVERS), f"{len(clients)} watchers landed on {spread}"

        for n, name in enumerate(SERVERS):
            slot = doctor.slots[n]
            booked = await by_instance[name][0].book(slot.id, idempotency_key=f"fan-{n}")
            assert booked.slot_id == slot.id
            for client in clients:
                delta = await client.next_delta(timeout=5)
                assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)], (
                    f"a watcher on {client.instance} got {delta} after a booking on {name}"
                )
        for client in clients:
            statuses = {s.id: s.status for s in client.calendars[doctor.id].slots.values()}
            assert [statuses[s.id] for s in doctor.slots[:3]] == [SlotStatus.BUSY] * 3
            assert client.calendars[doctor.id].resyncs == 0, "a delta was missed on the way"


# ---- rolling restart -------------------------------------------------------------------------


@dataclass
class Bookings:
    """What the bookers were told, to hold against the database afterwards."""

    done: dict[str, tuple[int, AppointmentView]] = field(default_factory=dict)  # key: slot, reply
    finished_at: list[float] = field(default_factory=list)  # monotonic, one per booking
    retries: int = 0
    reconnects: int = 0  # of the bookers' connections
    failures: list[str] = field(default_factory=list)


async def book_once(
    client: SlotcastClient, slot_id: int, key: str, bookings: Bookings, deadline: float
) -> AppointmentView:
    """Book `slot_id` under `key`, resending the same key until a definite answer.

    A dropped connection leaves it unknown whether the booking committed; only the
    idempotency key makes resending safe, and that is exactly what is under test.
    """
    while True:
        try:
            await asyncio.wait_for(client.ready.wait(), max(deadline - time.monotonic(), 0.1))
            return await client.book(slot_id, idempotency_key=key)
        except ClientError as exc:
            if exc.wire_code not in RETRYABLE:
                raise
            why = f"{exc.wire_code}: {exc.message}"
        except TimeoutError:
            why = "no reply"
        if time.monotonic() > deadline:
            raise AssertionError(f"booking {key} (slot {slot_id}) still failing: {why}")
        bookings.retries += 1
        # Back off a little: `ready` may still be set for a socket that just closed.
        await asyncio.sleep(random.uniform(0.02, 0.1))


async def booker(
    url: str, n: int, slots: list[SlotView], stop: asyncio.Event, bookings: Bookings
) -> None:
    """Book this booker's own slots one after another until told to stop."""
    async with SlotcastClient.connect(
        url, token=token(sub=f"booker-{n}"), reconnect=True, max_backoff=1.0
    ) as client:
        try:
            await _book_until_stopped(client, n, slots, stop, bookings)
        finally:
            bookings.reconnects += client.reconnects


async def _book_until_stopped(
    client: SlotcastClient, n: int, slots: list[SlotView], stop: asyncio.Event, bookings: Bookings
) -> None:
    for i, slot in enumerate(slots):
        if stop.is_set():
            return
        key = f"booker-{n}-{i}"
        try:
            reply = await book_once(client, slot.id, key, bookings, time.monotonic() + 20)
        except (ClientError, AssertionError) as exc:
            bookings.failures.append(f"{key} on slot {slot.id}: {exc!r}")
            return
        bookings.done[key] = (slot.id, reply)
        bookings.finished_at.append(time.monotonic())
        # Pace: enough bookings to overlap every drain, not so many the slots run out.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.08)
    bookings.failures.append(f"booker {n} ran out of slots before the restarts ended")


async def restart(balancer: Balancer, name: str) -> tuple[float, float]:
    """SIGTERM, wait for a clean exit, start on the same port, wait until HAProxy
    routes to it again; returns when it went down and when it was back."""
    proc = balancer.servers[name]
    down = time.monotonic()
    code = await asyncio.to_thread(proc.stop)
    assert code == 0, f"{name} exited with {code} on SIGTERM:\n{proc.logs()}"
    await asyncio.to_thread(proc.start)  # returns once its own /readyz answers 200
    async with fresh_session() as http:
        await until(
            lambda: instance_behind(http, balancer, name),
            10,
            f"HAProxy to route to the restarted {name}",
            balancer,
        )
    return down, time.monotonic()


@pytest.mark.timeout(120)
async def test_rolling_restart_through_haproxy_loses_and_doubles_nothing(
    cluster: Balancer,
    store: Store,
    database_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Restart every instance, one after another, under watchers and bookers: every
    booking a client was told about exists exactly once, none exists that nobody
    was told about, and every watcher's calendar ends equal to the database."""
    # 1200 slots: ~30 s of booking at the bookers' pace; the restarts take 10-20 s.
    doctor = await seed_doctor(store, days=60)
    mine = [doctor.slots[n :: len(SERVERS)] for n in range(len(SERVERS))]  # disjoint
    bookings = Bookings()
    stop = asyncio.Event()
    started = time.monotonic()

    async with contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(
                SlotcastClient.connect(cluster.ws_url, reconnect=True, max_backoff=1.0)
            )
            for _ in range(9)
        ]
        for watcher in watchers:
            await watcher.watch(doctor.id, doctor.start, doctor.end)
        spread = sorted(w.instance or "?" for w in watchers)
        assert set(spread) == set(SERVERS), f"watchers landed on {spread}"

        tasks = [
            asyncio.create_task(booker(cluster.ws_url, n, mine[n], stop, bookings))
            for n in range(len(SERVERS))
        ]
        outages: dict[str, tuple[float, float]] = {}
        try:
            for name in SERVERS:
                await asyncio.sleep(1.0)  # pacing: bookings in flight before each restart
                outages[name] = await restart(cluster, name)
            await asyncio.sleep(1.0)  # and some on the fully restarted cluster
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for task in tasks:
            assert task.exception() is None, f"a booker crashed: {task.exception()!r}"
        assert not bookings.failures, "\n".join(bookings.failures)
        assert len(bookings.done) >= 30, f"only {len(bookings.done)} bookings were made"
        for name, (down, back) in outages.items():
            during = sum(down <= t <= back for t in bookings.finished_at)
            assert during > 0, f"no booking succeeded in the {back - down:.1f}s {name} was away"

        # Settle: every watcher reconnected, restored its watch and applied every delta.
        truth: dict[int, SlotStatus] = {}

        async def converged() -> bool:
            nonlocal truth
            snapshot = await reads.snapshot(store, doctor.id, doctor.start, doctor.end)
            truth = {s.id: s.status for s in snapshot.slots}
            return all(w.ready.is_set() and statuses(w, doctor.id) == truth for w in watchers)

        def drift() -> str:
            lines = []
            for i, w in enumerate(watchers):
                seen = statuses(w, doctor.id)
                wrong = {k: (seen.get(k), truth.get(k)) for k in seen.keys() | truth.keys()}
                wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
                if wrong or not w.ready.is_set():
                    sample = dict(list(wrong.items())[:5])
                    lines.append(
                        f"watcher {i} on {w.instance}: ready={w.ready.is_set()}, "
                        f"{len(wrong)} slots differ (watcher, database), e.g. {sample}"
                    )
            return "\n".join(lines)

        await until(converged, 15, "every watcher's calendar to equal the database", cluster, drift)
        watcher_reconnects = sum(w.reconnects for w in watchers)
        lazy = [i for i, w in enumerate(watchers) if w.reconnects == 0]
        assert not lazy, f"watchers {lazy} never reconnected, though every instance restarted"

    await check_bookings(database_url, doctor, bookings, truth)
    elapsed = time.monotonic() - started
    record_property("bookings", len(bookings.done))
    record_property("resent", bookings.retries)
    record_property("watcher_reconnects", watcher_reconnects)
    record_property("booker_reconnects", bookings.reconnects)
    print(
        f"\nrolling restart: {len(bookings.done)} bookings ({bookings.retries} resent), "
        f"reconnects: {watcher_reconnects} by 9 watchers, {bookings.reconnects} by 3 bookers; "
        f"{elapsed:.1f}s"
    )


def statuses(client: SlotcastClient, doctor_id: int) -> dict[int, SlotStatus]:
    calendar = client.calendars.get(doctor_id)
    return {} if calendar is None else {i: s.status for i, s in calendar.slots.items()}


async def check_bookings(
    dsn: str, doctor: SeededDoctor, bookings: Bookings, truth: dict[int, SlotStatus]
) -> None:
    """Hold the database against what the bookers were told."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, slot_id, patient_id, status FROM appointments WHERE doctor_id = $1",
            doctor.id,
        )
        keys = await conn.fetch(
            "SELECT subject, key, response FROM idempotency_keys WHERE key = ANY($1::text[])",
            list(bookings.done),
        )
    finally:
        await conn.close()
    active = [r for r in rows if r["status"] != "cancelled"]
    by_id = {r["id"]: r for r in active}

    per_slot: dict[int, int] = {}
    for r in active:
        per_slot[r["slot_id"]] = per_slot.get(r["slot_id"], 0) + 1
    doubled = {s: n for s, n in per_slot.items() if n > 1}
    assert not doubled, f"slots with more than one active appointment: {doubled}"

    told = {key: reply.id for key, (_, reply) in bookings.done.items()}
    assert len(set(told.values())) == len(told), "two keys were told the same appointment"
    for key, (slot_id, reply) in bookings.done.items():
        row = by_id.get(reply.id)
        assert row is not None, f"{key} was told appointment {reply.id}, which is not active"
        assert row["slot_id"] == slot_id == reply.slot_id, f"{key}: {dict(row)} vs slot {slot_id}"
        assert row["patient_id"] == key.rsplit("-", 1)[0], f"{key} booked as {row['patient_id']}"
        assert row["status"] == "booked", f"{key}: appointment {reply.id} is {row['status']}"
        assert truth.get(slot_id) == SlotStatus.BUSY, f"{key}: slot {slot_id} is not busy"
    untold = sorted(set(by_id) - set(told.values()))
    assert not untold, f"appointments no booker was told about (a retry booked twice?): {untold}"
    assert len(active) == len(told), f"{len(active)} appointments for {len(told)} keys"

    remembered: dict[str, list[int]] = {}
    for r in keys:
        response = orjson.loads(r["response"])
        remembered.setdefault(r["key"], []).append(response["body"]["appointment"]["id"])
    wrong = {k: remembered.get(k) for k, a in told.items() if remembered.get(k) != [a]}
    assert not wrong, f"idempotency keys not remembered as exactly their one booking: {wrong}"
