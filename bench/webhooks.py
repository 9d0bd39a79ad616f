"""Webhooks under booking load: does delivery cost the bookings anything, how soon do
messages arrive, and does a failing endpoint's backlog drain once it recovers?

Why this exists: issue 13 asks for 1,000 bookings/s for 60 s with three endpoints
registered (one healthy, one slow at 500 ms, one failing then recovering), with the
booking p99 unchanged within noise from a run without webhooks, the commit-to-delivery
p50/p99 to the healthy endpoint, and the failing endpoint's backlog drained after it
recovers. Both variants run in one invocation, alternated (`--rounds`), against one
`slotcast serve` and one database, so their ratio is what counts.

Processes
  - the driver (this process, uvloop): `bench/booking.py`'s open-loop machinery (`drive`
    at `--rate`, latency from each attempt's scheduled start, so a stall cannot hide),
    100 patients each on its own WebSocket with the Python client, booking random free
    slots of 1,000 doctors (the booking bench's (c) server scenario);
  - one `slotcast serve` (memory broker, pool 10, rate limits off as in the other
    benches, `SLOTCAST_WEBHOOK_ALLOW_PRIVATE=1` for the loopback receivers, a retry base
    of `--retry-base-s` capped at `--retry-max-s` so the failing endpoint is retried
    within the run);
  - with `--deliver worker` (the default), `SLOTCAST_WEBHOOKS=worker` for the server and
    one `slotcast webhooks` process beside it (same settings, polling every
    `--worker-poll-s`, at `--nice` 10 as deploy/slotcast-webhooks.service runs it;
    `--sched idle` in the SCHED_IDLE class besides),
    running through both phases as it would in production; with `--deliver inline`,
    the server delivers itself;
  - the receivers, in a process of their own (aiohttp on uvloop, at `--nice` 10, and
    with `--sched idle` in SCHED_IDLE: they stand for the clinic's systems, on
    machines of their own in production), so they
    neither share the driver's event loop nor the server's: `/healthy` answers 204 at once, `/slow`
    after `--slow-ms`, `/failing` answers 503 for the first `--fail-s` seconds of the
    phase and then 204. Every delivery's signature is verified with the Standard Webhooks
    library (`standardwebhooks.Webhook.verify`) on all three; a receipt is the time the
    request arrived (`time.time()`), the doctor, the version and the payload's `timestamp`;
  - the embedded PostgreSQL (as bench/booking.py: a throwaway cluster, fsync on).

Phases, per round (odd rounds `off` first, even rounds `on` first)
  off  no endpoint registered: the booking path alone;
  on   the three endpoints registered over the admin REST API just before the load (so
       they start at every doctor's current version), then `--seconds` of load. After
       the load the bench waits (at most `--drain-timeout`) for the healthy and failing
       endpoints' backlogs to reach 0, then deletes the endpoints.

Measured
  - booking p50/p99 per phase, and the on/off ratio;
  - commit-to-delivery to the healthy endpoint: receipt time minus the payload's
    `timestamp`, the change's `created_at` (PostgreSQL's `now()`, the booking
    transaction's start: the same machine's clock; it counts the transaction's own
    milliseconds too), first receipt of each message;
  - the backlog per endpoint (`store.webhooks.backlog`, what the server's
    `slotcast_webhook_backlog` gauge reads) every `--poll-s`: the failing endpoint's peak,
    when it caught up after recovering (its oldest undelivered change under 1 s old,
    as current as a healthy endpoint) and when each backlog reached 0;
  - nothing lost or reordered, per doctor, at the receivers: for the healthy and failing
    endpoints every change committed during the phase was received (the doctors'
    versions before and after), a version never arrives after a higher one of its doctor
    (duplicates, same `webhook-id`, are counted apart), and no signature failed; the slow
    endpoint cannot drain (two messages a second) so its deliveries are checked to be,
    per doctor, an unbroken run from the first version after registration;
  - CPU seconds of the driver, the server, the worker, PostgreSQL and the receivers per
    phase;
  - bench/booking.py's double-booking checks after all phases.

Usage
    .venv/bin/python bench/webhooks.py                           # 1,000/s for 60 s, 1 round
    .venv/bin/python bench/webhooks.py --rate 600 --rounds 4     # 4 pairs, median p99 ratio
    .venv/bin/python bench/webhooks.py --deliver inline          # the server delivers
    .venv/bin/python bench/webhooks.py --sched idle              # worker in SCHED_IDLE
    .venv/bin/python bench/webhooks.py --py-spy /tmp/wh          # profile server, worker
    .venv/bin/python bench/webhooks.py --rate 200 --seconds 10   # a smoke run
    .venv/bin/python bench/webhooks.py --rate 600 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
from aiohttp import web  # noqa: E402
from standardwebhooks import Webhook, WebhookVerificationError  # noqa: E402

from bench.booking import (  # noqa: E402
    JWT_SECRET,
    WORKDAY,
    UniformPicker,
    client_attempt,
    clients,
    database,
    describe,
    drive,
    free_slots,
    percentile,
    postgres_cpu,
    process_cpu,
    seed_doctors,
    table,
    verify,
)
from protocol.vocabulary import Role  # noqa: E402
from server import auth  # noqa: E402
from store import webhooks  # noqa: E402
from store.migrate import migrate  # noqa: E402
from store.pool import Store, open_store  # noqa: E402
from testkit.harness import UNLIMITED, ServerProcess, free_port, stop_process  # noqa: E402

ENDPOINTS: Final = ("healthy", "slow", "failing")
# The backlog poll (every --poll-s) reads what the gauges read only every this many
# samples: the age of the slow endpoint's oldest change (a probe of the change log for
# each of the 1,000 doctors it is behind on) cost PostgreSQL about 10 ms a read, as much
# as delivery's own statements at 2 reads a second, which no deployment pays (a serving
# instance reads the gauges every 5 s). In between, `light_backlog`.
FULL_POLL_EVERY: Final = 10
# Per endpoint: the changes past its cursors and the age of the oldest, but for `$1`
# (the slow endpoint), whose count only is read and whose age is carried from the last
# full read ($2). The bench's endpoints follow every doctor, which all exist before them
# (so each has a cursor row for every doctor), and queue no replays.
LIGHT_BACKLOG: Final = """
WITH behind AS (
    SELECT w.endpoint_id, d.version - w.version AS n,
           CASE WHEN w.endpoint_id <> $1 THEN (
               SELECT c.created_at FROM changes c
               WHERE c.doctor_id = w.doctor_id AND c.version = w.version + 1) END AS head_at
    FROM webhook_cursors w JOIN doctors d ON d.id = w.doctor_id
    WHERE d.version > w.version
)
SELECT endpoint_id AS id, sum(n)::bigint AS backlog,
       CASE WHEN endpoint_id = $1 THEN $2::float8
            ELSE coalesce(EXTRACT(EPOCH FROM now() - min(head_at)), 0)::float8 END AS oldest_s
FROM behind GROUP BY endpoint_id"""
CAUGHT_UP_S: Final = 1.0  # an endpoint whose oldest waiting change is younger is current
perf = time.perf_counter


# ---- the receivers (a process of their own) ----------------------------------------------------


@dataclass
class Inbox:
    """One endpoint's receiver state: its secret, how it behaves, what it got."""

    hook: Webhook | None = None
    failing: bool = False
    delay_s: float = 0.0
    # (doctor, version, payload timestamp, receipt time) per verified delivery
    receipts: list[tuple[int, int, str, float]] = field(default_factory=list)
    refused: int = 0  # answered 503 while failing
    bad_signatures: int = 0
    previous: Webhook | None = None  # the last phase's endpoint's secret

    def late(self, body: bytes, headers: dict[str, str]) -> bool:
        """Signed for the last phase's endpoint: deleting an endpoint stops its sends
        within one message per doctor in flight, which may land in the next phase."""
        if self.previous is None:
            return False
        try:
            self.previous.verify(body, headers)
        except WebhookVerificationError:
            return False
        return True


def receivers_app(slow_s: float) -> web.Application:
    inboxes = {name: Inbox() for name in ENDPOINTS}
    inboxes["slow"].delay_s = slow_s

    async def deliver(request: web.Request) -> web.Response:
        received = time.time()
        box = inboxes[request.match_info["name"]]
        body = await request.read()
        # The secret of the phase the request arrived in: a request still being answered
        # when the next phase registers new endpoints was signed for the one before.
        hook = box.hook
        if box.delay_s:
            await asyncio.sleep(box.delay_s)
            if box.hook is not hook:
                return web.Response(status=204)  # the last phase's: neither counted nor checked
        if box.failing:
            box.refused += 1
            return web.Response(status=503)
        try:
            assert hook is not None
            payload = hook.verify(body, dict(request.headers))
        except (AssertionError, WebhookVerificationError):
            if box.late(body, dict(request.headers)):
                return web.Response(status=204)  # sent to the last phase's (deleted) endpoint
            box.bad_signatures += 1
            return web.Response(status=400)
        data = payload["data"]
        box.receipts.append((data["doctor_id"], data["version"], payload["timestamp"], received))
        return web.Response(status=204)

    async def setup(request: web.Request) -> web.Response:
        """Secrets for a new phase; everything received before is forgotten."""
        body = await request.json()
        for name, box in inboxes.items():
            box.previous = box.hook or box.previous
            box.hook = Webhook(body["secrets"][name]) if name in body["secrets"] else None
            box.receipts, box.refused, box.bad_signatures = [], 0, 0
            box.failing = name == "failing"
        return web.Response(status=204)

    async def recover(request: web.Request) -> web.Response:
        inboxes["failing"].failing = False
        return web.Response(status=204)

    async def report(request: web.Request) -> web.Response:
        return web.json_response(
            {
                name: {
                    "receipts": box.receipts,
                    "refused": box.refused,
                    "bad_signatures": box.bad_signatures,
                }
                for name, box in inboxes.items()
            }
        )

    app = web.Application(client_max_size=2**20)
    app.router.add_post("/hook/{name}", deliver)
    app.router.add_post("/control/setup", setup)
    app.router.add_post("/control/recover", recover)
    app.router.add_get("/control/report", report)
    return app


def receivers_main(port: int, slow_s: float, nice: int, idle: bool, ready: Pipe) -> None:
    """The receivers' process: an aiohttp server on uvloop until terminated, at `nice`
    (and, with `idle`, in the SCHED_IDLE class): they stand for the clinic's systems,
    which run on machines of their own, so here they take only CPU nothing else wants."""
    os.nice(nice)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    async def serve() -> None:
        runner = web.AppRunner(receivers_app(slow_s), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        ready.send("ready")
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(serve())


@contextlib.contextmanager
def receivers_process(slow_s: float, nice: int, idle: bool) -> Any:
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=receivers_main, args=(port, slow_s, nice, idle, theirs), daemon=True)
    proc.start()
    try:
        if not mine.poll(30):
            raise RuntimeError("the receivers did not start")
        mine.recv()
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.join(5)


async def light_backlog(store: Store, slow: int, slow_age: float) -> dict[int, tuple[int, float]]:
    """`store.webhooks.backlog` for the bench's endpoints, but for the slow one's age."""
    rows = await store.fetch(LIGHT_BACKLOG, slow, slow_age)
    return {r["id"]: (int(r["backlog"]), float(r["oldest_s"])) for r in rows}


# ---- one phase ------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    round: int
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)
    # on phases only
    healthy_delays: list[float] = field(default_factory=list)
    backlog_samples: list[tuple[float, dict[str, tuple[int, float]]]] = field(default_factory=list)
    recovered_at: float | None = None  # seconds into the phase
    load_ended_at: float = 0.0
    drained_at: dict[str, float | None] = field(default_factory=dict)
    caught_up_at: float | None = None
    checks: dict[str, dict[str, int]] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    expected: int = 0
    healthy_rate: float = 0.0  # first receipt to last (the load and the drain after it)
    healthy_rate_loaded: float = 0.0  # receipts while the load ran, over its duration
    load_epoch: tuple[float, float] = (0.0, 0.0)  # time.time() at the load's start and end
    attempts: dict[str, tuple[int, int, float, float, float]] = field(default_factory=dict)

    def ms(self, p: float) -> float:
        return percentile(sorted(self.latencies), p) * 1000


async def doctor_versions(conn: asyncpg.Connection, doctors: list[int]) -> dict[int, int]:
    rows = await conn.fetch("SELECT id, version FROM doctors WHERE id = ANY($1::int[])", doctors)
    return {r["id"]: r["version"] for r in rows}


# The server's own record of its requests: how long the HTTP part of a delivery took.
# `cycle`: the median time from one attempt's record to the next (each is written in the
# transaction that moves the cursor), i.e. what one message costs the endpoint's sender.
ATTEMPTS: Final = """
SELECT count(*) AS n, count(*) FILTER (WHERE NOT ok) AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY gap_ms) AS cycle
FROM (SELECT latency_ms, ok,
             1000 * EXTRACT(EPOCH FROM attempted_at - lag(attempted_at) OVER (ORDER BY id))
               AS gap_ms
      FROM webhook_attempts WHERE endpoint_id = $1) a"""


def check_deliveries(
    receipts: list[tuple[int, int, str, float]],
    before: dict[int, int],
    after: dict[int, int],
    *,
    complete: bool,
) -> dict[str, int]:
    """Counted, per doctor: lost (complete) or gaps (a prefix only), reordered, duplicates."""
    seen: dict[int, set[int]] = defaultdict(set)
    highest: dict[int, int] = {}
    reordered = duplicates = 0
    for doctor, version, _, _ in receipts:
        if version in seen[doctor]:
            duplicates += 1
            continue
        if version < highest.get(doctor, 0):
            reordered += 1
        seen[doctor].add(version)
        highest[doctor] = max(highest.get(doctor, 0), version)
    missing = unexpected = 0
    for doctor, first in before.items():
        got = seen.get(doctor, set())
        upto = after[doctor] if complete else max(got, default=first)
        wanted = set(range(first + 1, upto + 1))
        missing += len(wanted - got)
        unexpected += len(got - set(range(first + 1, after[doctor] + 1)))
    unexpected += sum(len(v) for d, v in seen.items() if d not in before)
    return {
        "lost" if complete else "gaps": missing,
        "unexpected": unexpected,
        "reordered": reordered,
        "duplicates": duplicates,
    }


def iso_epoch(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


@dataclass
class Bench:
    args: argparse.Namespace
    store: Store
    conn: asyncpg.Connection
    server: ServerProcess
    receivers_url: str
    receivers_pid: int | None
    worker_pid: int | None
    postmaster: int | None
    doctors: list[int]
    idle: asyncio.Queue[Any]
    ledger: set[int] = field(default_factory=set)
    admin: str = field(
        default_factory=lambda: auth.issue(JWT_SECRET, subject="bench", role=Role.ADMIN)
    )

    def cpu(self) -> dict[str, float]:
        server_pid = self.server.process.pid if self.server.process else None
        return {
            "driver": time.process_time(),
            "server": process_cpu(server_pid) or 0.0,
            "worker": process_cpu(self.worker_pid) or 0.0,
            "PostgreSQL": postgres_cpu(self.postmaster) or 0.0,
            "receivers": process_cpu(self.receivers_pid) or 0.0,
        }

    async def profile(self, number: int) -> list[asyncio.subprocess.Process]:
        """py-spy for the load's duration (--py-spy), as raw flame graphs: the server, and
        the worker when one delivers (where delivery's own CPU goes)."""
        if not self.args.py_spy or self.server.process is None:
            return []
        targets = {"server": self.server.process.pid}
        if self.worker_pid is not None:
            targets["worker"] = self.worker_pid
        spies = []
        for name, pid in targets.items():
            out = f"{self.args.py_spy}.round{number}.{name}.txt"
            print(f"py-spy: {out}")
            spies.append(
                await asyncio.create_subprocess_exec(
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(self.args.seconds)),
                    "--rate",
                    "50",
                    "--format",
                    "raw",
                    "--output",
                    out,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        return spies

    async def load(self, phase: Phase) -> None:
        a = self.args
        picker = UniformPicker(await free_slots(self.conn, self.doctors))
        attempt = client_attempt(self.idle, picker, self.ledger, True)
        run = await drive(
            attempt, bookers=a.bookers, bookings=10**9, duration=a.seconds, rate=a.rate
        )
        phase.latencies, phase.outcomes, phase.wall = run.latencies, run.outcomes, run.wall

    async def off(self, number: int) -> Phase:
        phase = Phase("off", number)
        phase.load = (os.getloadavg()[0], 0.0)
        before = self.cpu()
        await self.load(phase)
        after = self.cpu()
        phase.cpu = {k: after[k] - before[k] for k in after}
        phase.load = (phase.load[0], os.getloadavg()[0])
        return phase

    async def on(self, http: aiohttp.ClientSession, number: int) -> Phase:
        a = self.args
        phase = Phase("on", number)
        api = f"{self.server.http_url}/api/webhooks"
        headers = {"Authorization": f"Bearer {self.admin}"}
        versions_before = await doctor_versions(self.conn, self.doctors)
        ids: dict[str, int] = {}
        secrets: dict[str, str] = {}
        for name in ENDPOINTS:
            async with http.post(
                api,
                json={"url": f"{self.receivers_url}/hook/{name}", "description": f"bench {name}"},
                headers=headers,
            ) as resp:
                assert resp.status == 201, await resp.text()
                created = await resp.json()
            ids[name], secrets[name] = created["id"], created["secret"]
        async with http.post(
            f"{self.receivers_url}/control/setup", json={"secrets": secrets}
        ) as resp:
            assert resp.status == 204
        names = {i: n for n, i in ids.items()}
        started = perf()
        stop = asyncio.Event()

        async def poll() -> None:
            slow_age = 0.0
            for n in itertools.count():
                if stop.is_set():
                    break
                if n % FULL_POLL_EVERY == 0:  # what the server's gauges read, every 5 s
                    found = await webhooks.backlog(self.store)
                    slow_age = found.get(ids["slow"], (0, 0.0))[1]
                else:  # an endpoint with nothing waiting has no row here
                    found = await light_backlog(self.store, ids["slow"], slow_age)
                    found = {i: found.get(i, (0, 0.0)) for i in names}
                phase.backlog_samples.append(
                    (perf() - started, {names[i]: v for i, v in found.items() if i in names})
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), a.poll_s)

        async def recover() -> None:
            await asyncio.sleep(a.fail_s)
            async with http.post(f"{self.receivers_url}/control/recover") as resp:
                assert resp.status == 204
            phase.recovered_at = perf() - started

        poller = asyncio.create_task(poll())
        recovery = asyncio.create_task(recover())
        spies = await self.profile(number)
        phase.load = (os.getloadavg()[0], 0.0)
        before = self.cpu()
        load_from = time.time()
        await self.load(phase)
        phase.load_epoch = (load_from, time.time())
        after = self.cpu()
        phase.load = (phase.load[0], os.getloadavg()[0])
        phase.cpu = {k: after[k] - before[k] for k in after}
        phase.load_ended_at = perf() - started
        for spy in spies:
            await spy.wait()
        await recovery
        # Drain: the healthy and failing endpoints reach a backlog of 0.
        deadline = perf() + a.drain_timeout
        while perf() < deadline:
            last = phase.backlog_samples[-1][1] if phase.backlog_samples else {}
            if all(last.get(n, (1, 0.0))[0] == 0 for n in ("healthy", "failing")):
                break
            await asyncio.sleep(a.poll_s)
        await asyncio.sleep(a.poll_s * 2)  # the last receipts land; another sample or two
        stop.set()
        await poller
        versions_after = await doctor_versions(self.conn, self.doctors)
        for name, endpoint_id in ids.items():  # before the endpoints (and these) are deleted
            row = await self.conn.fetchrow(ATTEMPTS, endpoint_id)
            phase.attempts[name] = (
                row["n"],
                row["failed"],
                row["p50"] or 0.0,
                row["p99"] or 0.0,
                float(row["cycle"] or 0.0),
            )
        async with http.get(f"{self.receivers_url}/control/report") as resp:
            report = await resp.json()
        for name in ENDPOINTS:
            async with http.delete(f"{api}/{ids[name]}", headers=headers) as resp:
                assert resp.status in (200, 204), await resp.text()
        self.summarize(phase, report, versions_before, versions_after)
        return phase

    def summarize(
        self,
        phase: Phase,
        report: dict[str, Any],
        before: dict[int, int],
        after: dict[int, int],
    ) -> None:
        phase.expected = sum(after[d] - before[d] for d in before)
        last = phase.backlog_samples[-1][1] if phase.backlog_samples else {}
        for name in ENDPOINTS:
            got = [(r[0], r[1], r[2], r[3]) for r in report[name]["receipts"]]
            # An endpoint whose backlog reached 0 must have everything; one that did not
            # (the slow one, or a drain cut off by --drain-timeout) an unbroken run per doctor.
            drained = last.get(name, (1, 0.0))[0] == 0
            checks = check_deliveries(got, before, after, complete=drained)
            checks["bad signatures"] = report[name]["bad_signatures"]
            checks["refused (503)"] = report[name]["refused"]
            phase.checks[name] = checks
            phase.received[name] = len({(r[0], r[1]) for r in got})
        first: dict[tuple[int, int], float] = {}
        for doctor, version, stamp, received in report["healthy"]["receipts"]:
            if (doctor, version) not in first:
                first[(doctor, version)] = received - iso_epoch(stamp)
        phase.healthy_delays = list(first.values())
        receipts = report["healthy"]["receipts"]
        if receipts:
            span = receipts[-1][3] - receipts[0][3]
            phase.healthy_rate = len(first) / span if span > 0 else math.nan
        start, end = phase.load_epoch
        during = {(r[0], r[1]) for r in receipts if start <= r[3] <= end}
        phase.healthy_rate_loaded = len(during) / (end - start) if end > start else math.nan
        for name in ("healthy", "failing"):
            phase.drained_at[name] = next(
                (
                    t
                    for t, found in phase.backlog_samples
                    if t >= phase.load_ended_at and found.get(name, (1, 0))[0] == 0
                ),
                None,
            )
        if phase.recovered_at is not None:
            phase.caught_up_at = next(
                (
                    t
                    for t, found in phase.backlog_samples
                    if t > phase.recovered_at
                    and (found["failing"][0] == 0 or found["failing"][1] < CAUGHT_UP_S)
                ),
                None,
            )


# ---- reporting ----------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def booking_rows(phases: list[Phase]) -> list[list[str]]:
    rows = []
    for p in phases:
        booked = max(p.outcomes["booked"], 1)
        refused = ", ".join(f"{k} {v}" for k, v in sorted(p.outcomes.items()) if k != "booked")
        rows.append(
            [
                f"{p.round}",
                p.name,
                str(sum(p.outcomes.values())),
                f"{p.outcomes['booked'] / p.wall:,.0f}" if p.wall else "-",
                refused or "-",
                fmt(p.ms(0.5)),
                fmt(p.ms(0.95)),
                fmt(p.ms(0.99)),
                fmt(max(p.latencies, default=math.nan) * 1000),
                " / ".join(f"{p.cpu.get(k, 0) / booked * 1000:.2f}" for k in CPU_OF),
                f"{p.load[0]:.1f}/{p.load[1]:.1f}",
            ]
        )
    return rows


CPU_OF: Final = ("driver", "server", "worker", "PostgreSQL", "receivers")
BOOKING_HEADER: Final = [
    "round",
    "webhooks",
    "attempts",
    "booked/s",
    "refused",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "CPU ms/bkg driver / server / worker / PG / receivers",
    "loadavg before/after",
]


def peak(phase: Phase, name: str) -> tuple[int, float]:
    counts = [found[name][0] for _, found in phase.backlog_samples if name in found]
    ages = [found[name][1] for _, found in phase.backlog_samples if name in found]
    return max(counts, default=0), max(ages, default=0.0)


def webhook_report(phase: Phase) -> str:
    d = sorted(phase.healthy_delays)
    lines = [
        f"round {phase.round} webhooks on: {phase.expected} changes committed; healthy endpoint "
        f"delivered {phase.healthy_rate_loaded:,.0f} messages/s during the load, "
        f"{phase.healthy_rate:,.0f}/s from its first receipt to its last",
        f"  commit-to-delivery, healthy: p50 {fmt(percentile(d, 0.5) * 1000)} ms, "
        f"p99 {fmt(percentile(d, 0.99) * 1000)} ms, max {fmt(d[-1] * 1000 if d else math.nan)} ms"
        f" ({len(d)} messages)",
    ]
    for name in ENDPOINTS:
        most, oldest = peak(phase, name)
        left = phase.backlog_samples[-1][1].get(name, (0, 0.0))[0] if phase.backlog_samples else 0
        lines.append(
            f"  {name}: received {phase.received.get(name, 0)} of {phase.expected}; peak backlog "
            f"{most} (oldest {oldest:.1f} s); "
            + (
                f"backlog 0 at {fmt(phase.drained_at.get(name))} s"
                if not left
                else f"{left} left undelivered when the endpoint was deleted"
            )
        )
        lines.append(
            "    checks: " + ", ".join(f"{k} {v}" for k, v in phase.checks.get(name, {}).items())
        )
        if name in phase.attempts:
            n, failed, p50, p99, cycle = phase.attempts[name]
            lines.append(
                f"    server's attempts: {n} ({failed} failed), HTTP latency p50 {p50:.1f} ms, "
                f"p99 {p99:.1f} ms; median {cycle:.1f} ms from one attempt to the next"
            )
    lines.append(
        f"  failing endpoint: recovered at {fmt(phase.recovered_at)} s, caught up (oldest "
        f"< {CAUGHT_UP_S:g} s) at {fmt(phase.caught_up_at)} s, i.e. "
        f"{fmt((phase.caught_up_at or math.nan) - (phase.recovered_at or math.nan))} s after "
        f"recovering; load ended at {phase.load_ended_at:.1f} s"
    )
    return "\n".join(lines)


def timeline(phase: Phase, every: float = 5.0) -> str:
    rows = []
    next_at = 0.0
    for t, found in phase.backlog_samples:
        if t + 1e-9 < next_at:
            continue
        next_at = t + every
        rows.append(
            [f"{t:.1f}"]
            + [f"{found[n][0]} / {found[n][1]:.1f}" if n in found else "-" for n in ENDPOINTS]
        )
    return table(["s", *(f"{n} backlog / oldest s" for n in ENDPOINTS)], rows)


def failed_checks(phases: list[Phase]) -> list[str]:
    out = []
    for p in phases:
        for name, checks in p.checks.items():
            bad = {
                k: v
                for k, v in checks.items()
                if v and k in ("lost", "gaps", "unexpected", "reordered", "bad signatures")
            }
            if bad:
                out.append(f"round {p.round} {name}: {bad}")
    return out


# ---- main ---------------------------------------------------------------------------------


def server_env(args: argparse.Namespace, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(
        SLOTCAST_DATABASE_URL=dsn,
        SLOTCAST_BROKER_URL="memory://",
        SLOTCAST_JWT_SECRET=JWT_SECRET,
        SLOTCAST_INSTANCE_ID="bench",
        SLOTCAST_LOG_LEVEL="WARNING",
        SLOTCAST_MAX_ACTIVE_PER_DOCTOR="1000000",
        SLOTCAST_MAX_ACTIVE_TOTAL="1000000",
        SLOTCAST_WEBHOOK_ALLOW_PRIVATE="1",  # the receivers are on loopback
        SLOTCAST_WEBHOOK_RETRY_BASE_S=str(args.retry_base_s),
        SLOTCAST_WEBHOOK_RETRY_MAX_S=str(args.retry_max_s),
        SLOTCAST_WEBHOOKS=args.deliver,
        **UNLIMITED,
    )
    return env


@contextlib.asynccontextmanager
async def running_server(args: argparse.Namespace, dsn: str) -> AsyncIterator[ServerProcess]:
    logs = Path(tempfile.mkdtemp(prefix="slotcast-bench-webhooks-"))
    proc = ServerProcess("bench", free_port(), server_env(args, dsn), logs / "server.log")
    t = perf()
    await asyncio.to_thread(proc.start, 300)  # it materializes every doctor at start
    print(f"server up in {perf() - t:.1f}s (log {proc.log_path})")
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)


@contextlib.contextmanager
def running_worker(args: argparse.Namespace, dsn: str, logs: Path) -> Any:
    """`slotcast webhooks` beside the server (--deliver worker): its pid, or None."""
    if args.deliver != "worker":
        yield None
        return
    env = server_env(args, dsn)
    env.update(SLOTCAST_INSTANCE_ID="bench-worker", SLOTCAST_WEBHOOK_POLL_S=str(args.worker_poll_s))
    # Its /metrics is not read here: no port to collide with on a shared machine.
    env.update(SLOTCAST_WEBHOOKS_METRICS_PORT="0")
    idle = ["chrt", "--idle", "0"] if args.sched == "idle" else []
    with (logs / "worker.log").open("ab") as log:
        proc = subprocess.Popen(
            # At lower CPU priority, as deploy/slotcast-webhooks.service runs it (Nice=);
            # --sched idle: in SCHED_IDLE too.
            [*idle, "nice", "-n", str(args.nice), sys.executable, "-m", "server.cli", "webhooks"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    print(f"worker started (log {logs / 'worker.log'})")
    try:
        yield proc.pid
    finally:
        stop_process(proc, signal.SIGTERM, 20)


async def main(args: argparse.Namespace, dsn: str) -> int:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        about, postmaster = await describe(conn)
        print(f"PostgreSQL: {about}")
        print(
            f"machine: {os.cpu_count()} CPUs, loadavg {os.getloadavg()[0]:.2f}; rate "
            f"{args.rate:g}/s for {args.seconds:g} s per phase, {args.rounds} round(s); "
            f"slow {args.slow_ms} ms, failing for {args.fail_s:g} s; delivery: {args.deliver}, "
            f"worker and receivers at nice {args.nice}"
            f"{' in SCHED_IDLE' if args.sched == 'idle' else ''}\n"
        )
        async with open_store(dsn, min_size=2, max_size=2) as store:
            t = perf()
            doctors = await seed_doctors(
                store,
                args.doctors,
                prefix="Dr. Bench",
                schedule=WORKDAY,
                slot_minutes=30,
                days=args.days,
            )
            print(f"seeded {args.doctors} doctors ({args.days} days of slots) in {perf() - t:.1f}s")
            # Steady state, as bench/booking.py's server scenario: what was committed before
            # the server started was published long ago.
            await conn.execute(
                "UPDATE relay_cursor r SET published_version = d.version"
                " FROM doctors d WHERE d.id = r.doctor_id"
            )
            with (
                receivers_process(args.slow_ms / 1000, args.nice, args.sched == "idle") as (
                    port,
                    receivers_pid,
                ),
                running_worker(
                    args, dsn, Path(tempfile.mkdtemp(prefix="slotcast-bench-worker-"))
                ) as worker_pid,
            ):
                async with (
                    running_server(args, dsn) as server,
                    clients(server.ws_url, args.bookers, "json") as idle,
                    aiohttp.ClientSession() as http,
                ):
                    bench = Bench(
                        args,
                        store,
                        conn,
                        server,
                        f"http://127.0.0.1:{port}",
                        receivers_pid,
                        worker_pid,
                        postmaster,
                        doctors,
                        idle,
                    )
                    picker = UniformPicker(await free_slots(conn, doctors))
                    await drive(
                        client_attempt(idle, picker, bench.ledger, True),
                        bookers=args.bookers,
                        bookings=args.warmup,
                        duration=None,
                        rate=None,
                    )
                    phases: list[Phase] = []
                    for number in range(1, args.rounds + 1):
                        order = ("off", "on") if number % 2 else ("on", "off")
                        for name in order:
                            print(f"round {number}: webhooks {name} ...", flush=True)
                            phase = await (
                                bench.off(number) if name == "off" else bench.on(http, number)
                            )
                            phases.append(phase)
                            print(table(BOOKING_HEADER, booking_rows([phase])))
                            if name == "on":
                                print(webhook_report(phase))
                                if args.timeline:
                                    print(timeline(phase))
                            print(flush=True)
            checks = await verify(conn, doctors, bench.ledger)
    finally:
        await conn.close()
    print("summary")
    print(table(BOOKING_HEADER, booking_rows(phases)))
    offs = [p for p in phases if p.name == "off"]
    ons = [p for p in phases if p.name == "on"]
    for off, on in zip(offs, ons, strict=True):
        print(
            f"round {on.round}: booking p99 on/off {on.ms(0.99) / off.ms(0.99):.2f} "
            f"({on.ms(0.99):.1f} / {off.ms(0.99):.1f} ms), p50 on/off "
            f"{on.ms(0.5) / off.ms(0.5):.2f} ({on.ms(0.5):.1f} / {off.ms(0.5):.1f} ms)"
        )
    if offs:
        ratios = [on.ms(0.99) / off.ms(0.99) for off, on in zip(offs, ons, strict=True)]
        p50s = [on.ms(0.5) / off.ms(0.5) for off, on in zip(offs, ons, strict=True)]
        print(
            f"delivered {args.deliver}; over {len(ratios)} pair(s): booking p99 on/off median "
            f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
            f"p50 on/off median {statistics.median(p50s):.2f}"
        )
    for on in ons:
        print(webhook_report(on))
    bad = failed_checks(phases)
    doubles = {k: v for k, v in checks.items() if v}
    print(f"delivery checks: {'FAILED ' + '; '.join(bad) if bad else 'nothing lost or reordered'}")
    print(f"double-booking checks: {'FAILED ' + str(doubles) if doubles else 'all zero: OK'}")
    return 1 if bad or doubles else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Webhooks under booking load (see the docstring).")
    p.add_argument("--database-url", help="a migratable database (default: embedded, throwaway)")
    p.add_argument("--rate", type=float, default=1000, help="bookings started per second")
    p.add_argument("--seconds", type=float, default=60, help="load per phase")
    p.add_argument("--rounds", type=int, default=1, help="each round: one off and one on phase")
    p.add_argument("--doctors", type=int, default=1000)
    p.add_argument("--days", type=int, help="days of slots (default: enough for every phase)")
    p.add_argument("--bookers", type=int, default=100, help="WebSocket connections")
    p.add_argument("--warmup", type=int, default=300, help="bookings before measuring")
    p.add_argument("--slow-ms", type=int, default=500, help="the slow endpoint's answer time")
    p.add_argument("--fail-s", type=float, help="the failing endpoint fails this long (seconds/3)")
    p.add_argument("--retry-base-s", type=float, default=0.5, help="SLOTCAST_WEBHOOK_RETRY_BASE_S")
    p.add_argument("--retry-max-s", type=float, default=2.0, help="SLOTCAST_WEBHOOK_RETRY_MAX_S")
    p.add_argument("--drain-timeout", type=float, default=180, help="seconds to wait for drain")
    p.add_argument("--poll-s", type=float, default=0.5, help="backlog sampling period")
    p.add_argument("--timeline", action="store_true", help="the backlogs every 5 s")
    p.add_argument("--py-spy", metavar="PREFIX", help="profile server and worker per on phase")
    p.add_argument(
        "--deliver",
        choices=("worker", "inline"),
        default="worker",
        help="SLOTCAST_WEBHOOKS: a `slotcast webhooks` process delivers, or the server",
    )
    p.add_argument("--worker-poll-s", type=float, default=0.1, help="the worker's poll")
    p.add_argument("--nice", type=int, default=10, help="niceness of the worker and the receivers")
    p.add_argument(
        "--sched",
        choices=("idle", "nice"),
        default="nice",
        help="the worker and receivers only niced (as the unit runs the worker), or SCHED_IDLE",
    )
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.fail_s is None:
        args.fail_s = args.seconds / 3
    if args.days is None:
        # 20 slots a doctor a day; the bookings of every phase and the warm-up, with room.
        needed = args.rate * args.seconds * 2 * args.rounds * 1.5 + args.warmup
        args.days = max(2, math.ceil(needed / (args.doctors * 20)) + 1)
    return args


def run() -> int:
    args = parse()
    random.seed(args.seed)
    with database(args.database_url, no_fsync=False, settings=[]) as dsn:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main(args, dsn))


if __name__ == "__main__":
    raise SystemExit(run())
