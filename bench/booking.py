"""Booking throughput and latency: the Store's booking path, and optionally the whole server.

Why this exists: the target is at least 1,000 bookings/s on one instance with p99
under 50 ms, and zero double bookings. This script measures the code the server
really runs, on a database shaped like a deployment, and then checks the
invariants with SQL instead of trusting the replies.

Scenarios
  uniform  --doctors doctors (1,000), open 08:00-18:00 every day in 30-minute slots.
           Each attempt books a random free slot of a random doctor, never one a
           booker already took, so every attempt should succeed: the throughput
           of bookings that do not conflict, spread over many doctors' locks.
  hot      one doctor with thousands of 5-minute slots; every booker wants one of
           the --hot-window earliest free slots (as patients want the soonest
           appointment), so bookers collide, the losers get `slot_taken`, and
           every attempt queues on that one doctor's advisory lock.
  server   (--via-server) like uniform, through a real `slotcast serve` process:
           one WebSocket per booker with the Python client (JSON frames), so the
           number includes auth, framing, dispatch and the publisher on loopback.
           The change log written before it starts is marked published first, as
           in a running deployment, so the relay does not replay it mid-run.
  rest     like server, over HTTP: `POST /api/appointments` with a bearer token and an
           `Idempotency-Key`, on a keep-alive pool of --bookers connections.
  server-hot  hot, through the server over WebSockets: the hot doctor's lock queue
           with the server's framing, dispatch and publisher in front of it.

  Through the server (server, rest, server-hot), the server's own stage timings
  (`slotcast_stage_seconds`, scraped from /metrics before and after) say where a
  booking's time went: pool wait, BEGIN and locks, statements, commit, publish.
  --py-spy OUT samples the server process during each measured run into OUT with the
  scenario's name added (/tmp/b.txt -> /tmp/b-rest.txt): a flame graph if OUT ends in
  .svg, else py-spy's raw collapsed stacks, summed up by function in the report.

How
  uniform and hot call `commands.book_slot`, which runs the same `runner.run` transaction
  as the server's `book` command (BEGIN; the slot's doctor found and its advisory
  lock taken; one read of the versions, expired holds, idempotency record and the
  slot FOR UPDATE; INSERT with the slot's UPDATE; version bump, change record and
  idempotency record in one statement; COMMIT), from one asyncio process on uvloop like one
  server instance, through a pool of --pool-size connections with the server's
  lock and statement timeouts. Every attempt carries a fresh idempotency key, as
  a careful client's would (--no-keys leaves it out).

  Load is closed-loop by default: --bookers tasks each book, wait, book again.
  Little's law applies: with B bookers, mean latency = B / throughput, so 100
  bookers at 1,000/s have 100 ms mean latency whatever the code does. --rate R
  is the fair test of "p99 under 50 ms at 1,000/s": attempts start on a fixed
  schedule of R per second, and each latency counts from the scheduled start,
  so a stalled client cannot hide queueing (no coordinated omission).

  A warm-up (--warmup attempts) runs first, so asyncpg's prepared statements and
  PostgreSQL's caches are warm; it is not in the numbers, but its bookings are
  in the checks. CPU time comes from /proc: this process, the PostgreSQL
  processes (the postmaster, its children and the children it reaped, when it
  runs on this machine) and the server process, reported as CPU milliseconds per
  booking, which says which side saturates the machine. --profile times each SQL
  statement, the pool acquire and the transaction (at some cost in overhead), to
  show where a booking's time goes. --timeline prints p99 second by second, with
  the bench's own full garbage collections, since a spike confined to a second
  or two has a cause outside the booking path; each scenario also reports the
  autovacuums, checkpoints and WAL written meanwhile. --pg-set NAME=VALUE tries
  a PostgreSQL setting on the embedded cluster (e.g. wal_init_zero=off).

Checks, after each scenario (the script exits 1 if any fails)
  - no slot has more than one active (not cancelled) appointment;
  - no doctor has two active appointments that overlap in time;
  - busy and busy-tentative slots == active appointments;
  - every booking reported as made exists and is active, and no other does;
  - every doctor's version == its number of change records (one per commit).

Usage
  .venv/bin/python bench/booking.py                        # embedded PostgreSQL; uniform, hot
  .venv/bin/python bench/booking.py --scenarios uniform --rate 1000 --duration 20
  .venv/bin/python bench/booking.py --via-server           # adds the server scenario
  .venv/bin/python bench/booking.py --scenarios server,rest,server-hot --rate 2000 --duration 15
  .venv/bin/python bench/booking.py --scenarios server --rate 2000 --py-spy /tmp/book.txt
  .venv/bin/python bench/booking.py --database-url postgresql://u@h/db  # migrates db, adds rows

Other processes on the machine (test suites, other benchmarks) skew every
number here; the load average before and after each scenario is printed so a
disturbed run can be spotted and repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import time as clock
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `testkit` is not an installed package

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from client import ClientError, SlotcastClient  # noqa: E402
from protocol.errors import ErrorCode, SlotcastError  # noqa: E402
from protocol.vocabulary import Role  # noqa: E402
from server import auth  # noqa: E402
from store import commands, doctors, embedded, sql  # noqa: E402
from store import runner as store_runner  # noqa: E402
from store.migrate import migrate  # noqa: E402
from store.pool import Store, open_store  # noqa: E402
from store.schedule import Block  # noqa: E402
from testkit.harness import UNLIMITED, ServerProcess, free_port, with_database  # noqa: E402

BENCH_DB = "slotcast_bench"
JWT_SECRET = "bench-secret-that-is-long-enough-for-hs256"
WORKDAY = [Block(d, clock(8), clock(18)) for d in range(1, 8)]
ALL_DAY = [Block(d, clock(0), clock(23, 59)) for d in range(1, 8)]
# Slots starting sooner than this are left out, so none starts (too_late) mid-run.
MARGIN = "1 hour"
perf = time.perf_counter


class Exhausted(Exception):
    """No free slot is left for this scenario."""


# ---- CPU accounting from /proc -------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU seconds, reaped children's CPU seconds), or None if not here."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
    ticks = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / ticks
    return int(fields[1]), own, (int(fields[13]) + int(fields[14])) / ticks


def process_cpu(pid: int | None) -> float | None:
    stat = _proc_stat(pid) if pid is not None else None
    return stat[1] if stat else None


def postgres_cpu(postmaster: int | None) -> float | None:
    """CPU seconds of the whole cluster: the postmaster, its live children, and the exited.

    A backend or autovacuum worker that exits mid-run moves its CPU time into the
    postmaster's reaped-children counters, so counting those keeps the total
    from going backwards.
    """
    top = _proc_stat(postmaster) if postmaster is not None else None
    if postmaster is None or top is None:
        return None
    total = top[1] + top[2]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] == postmaster:
                total += stat[1]
    return total


# ---- profiling ------------------------------------------------------------------------------


class Profiler:
    """Wall time per SQL statement (named after its constant in store/sql.py) and per phase.

    Times are measured in this process, so they include the round trip and any
    wait for the event loop to resume the caller, which is part of the cost too.
    """

    def __init__(self) -> None:
        self.names = {v: k for k, v in vars(sql).items() if k.isupper() and isinstance(v, str)}
        self.times: dict[str, list[float]] = defaultdict(list)

    def label(self, query: str) -> str:
        name = self.names.get(query)
        if name is not None:
            return name
        if query.startswith("SELECT pg_advisory_unlock_all()"):
            return "pool reset on release"  # asyncpg's default Connection.reset()
        words = query.replace(";", "").split()
        return " ".join(words[:2]) if words[0] in ("RELEASE", "ROLLBACK") else words[0]

    def _wrap(self, owner: Any, method: str, label: Callable[[tuple[Any, ...]], str]) -> None:
        original = getattr(owner, method)
        times = self.times

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = perf()
            try:
                return await original(*args, **kwargs)
            finally:
                times[label(args)].append(perf() - started)

        setattr(owner, method, timed)

    def install(self) -> None:
        for method in ("execute", "fetch", "fetchrow", "fetchval"):
            self._wrap(asyncpg.Connection, method, lambda a: "sql " + self.label(a[1]))
        self._wrap(asyncpg.pool.Pool, "_acquire", lambda a: "pool acquire (wait)")
        self._wrap(store_runner, "_attempt", lambda a: "runner._attempt (acquire..commit)")
        self._wrap(commands, "book", lambda a: "commands.book (whole booking)")

    def reset(self) -> None:
        self.times.clear()

    def report(self, bookings: int) -> str:
        rows = []
        for name, samples in sorted(self.times.items(), key=lambda kv: -sum(kv[1])):
            ordered = sorted(samples)
            rows.append(
                [
                    name,
                    str(len(samples)),
                    f"{sum(samples) / max(bookings, 1) * 1000:.3f}",
                    f"{percentile(ordered, 0.5) * 1000:.2f}",
                    f"{percentile(ordered, 0.99) * 1000:.2f}",
                ]
            )
        return table(["step", "calls", "ms per booking", "p50 ms", "p99 ms"], rows)


# ---- statistics and printing ----------------------------------------------------------------


def percentile(ordered: list[float], p: float) -> float:
    """Nearest rank: the value below which a fraction p of the samples lie."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def timeline(run: Run, gc_pauses: GcPauses) -> str:
    """Second by second: a spike confined to a few seconds points at something else running
    (a checkpoint, a new WAL segment, the bench's own garbage collector, another process)."""
    seconds: dict[int, list[float]] = defaultdict(list)
    for at, latency in zip(run.finished, run.latencies, strict=True):
        seconds[int(at)].append(latency)
    collected: dict[int, float] = defaultdict(float)
    for when, generation, pause in gc_pauses.pauses:
        if generation == 2:
            collected[int(when - run.started)] += pause
    rows = [
        [
            str(second),
            str(len(samples)),
            f"{percentile(sorted(samples), 0.5) * 1000:.1f}",
            f"{percentile(sorted(samples), 0.99) * 1000:.1f}",
            f"{collected[second] * 1000:.0f}" if second in collected else "",
        ]
        for second, samples in sorted(seconds.items())
    ]
    return table(["second", "done", "p50 ms", "p99 ms", "full GC ms"], rows)


@dataclass
class Result:
    scenario: str
    mode: str
    latencies: list[float]
    outcomes: Counter[str]
    wall: float
    client_cpu: float
    pg_cpu: float | None
    server_cpu: float | None
    load_before: float
    load_after: float
    checks: dict[str, int] = field(default_factory=dict)

    @property
    def booked(self) -> int:
        return self.outcomes["booked"]

    def row(self) -> list[str]:
        ordered = sorted(self.latencies)
        per = max(self.booked, 1)

        def ms(p: float) -> str:
            return f"{percentile(ordered, p) * 1000:.1f}"

        def cpu(seconds: float | None) -> str:
            return "-" if seconds is None else f"{seconds / per * 1000:.2f}"

        refused = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()) if k != "booked")
        return [
            self.scenario,
            self.mode,
            str(sum(self.outcomes.values())),
            str(self.booked),
            refused or "-",
            f"{sum(self.outcomes.values()) / self.wall:.0f}",
            f"{self.booked / self.wall:.0f}",
            ms(0.5),
            ms(0.95),
            ms(0.99),
            f"{ordered[-1] * 1000:.1f}" if ordered else "-",
            cpu(self.client_cpu),
            cpu(self.pg_cpu),
            cpu(self.server_cpu),
            f"{self.load_before:.1f}/{self.load_after:.1f}",
        ]


HEADER = [
    "scenario",
    "load",
    "attempts",
    "booked",
    "refused",
    "attempts/s",
    "booked/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "bench CPU ms/bkg",
    "PG CPU ms/bkg",
    "server CPU ms/bkg",
    "loadavg before/after",
]


# ---- load generation ------------------------------------------------------------------------

Attempt = Callable[[int], Awaitable[str]]  # booker index -> "booked" or an error code


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)  # seconds into the run, per latency
    outcomes: Counter[str] = field(default_factory=Counter)
    started: float = 0.0  # perf() at the start
    wall: float = 0.0


async def drive(
    attempt: Attempt,
    *,
    bookers: int,
    bookings: int,
    duration: float | None,
    rate: float | None,
) -> Run:
    """Closed loop (`bookers` tasks back to back) or open loop (`rate` starts per second).

    Stops at `bookings` bookings (closed loop) or attempts (open loop), after
    `duration` seconds, or when the slots run out, whichever comes first.
    """
    run = Run()
    exhausted = False
    started = run.started = perf()
    deadline = started + duration if duration else math.inf

    async def timed(index: int, since: float) -> None:
        nonlocal exhausted
        try:
            outcome = await attempt(index)
        except Exhausted:
            exhausted = True
            return
        now = perf()
        run.latencies.append(now - since)
        run.finished.append(now - started)
        run.outcomes[outcome] += 1

    if rate is None:

        def more() -> bool:
            return (
                not exhausted
                and run.outcomes["booked"] < bookings
                and run.outcomes.total() < 10 * bookings  # a run of refusals must end too
                and perf() < deadline
            )

        async def booker(index: int) -> None:
            while more():
                await timed(index, perf())

        await asyncio.gather(*(booker(i) for i in range(bookers)))
    else:
        tasks: set[asyncio.Task[None]] = set()
        for launched in itertools.count():
            if exhausted or launched >= bookings:
                break
            due = started + launched / rate
            if due >= deadline:
                break
            delay = due - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(timed(launched % bookers, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    run.wall = perf() - started
    return run


class UniformPicker:
    """A random free slot of a random doctor; each slot handed out once."""

    def __init__(self, free: dict[int, list[int]]) -> None:
        self.free = free
        for slots in free.values():
            random.shuffle(slots)
        self.doctors = [d for d, slots in free.items() if slots]

    def pick(self) -> int:
        while self.doctors:
            i = random.randrange(len(self.doctors))
            slots = self.free[self.doctors[i]]
            if slots:
                return slots.pop()
            self.doctors[i] = self.doctors[-1]
            self.doctors.pop()
        raise Exhausted

    def gone(self, slot_id: int) -> None:
        """Already removed when picked."""


class HotPicker:
    """One of the `window` earliest slots not yet known to be taken: bookers collide."""

    def __init__(self, free_in_order: list[int], window: int) -> None:
        self.free = free_in_order
        self.window = window

    def pick(self) -> int:
        if not self.free:
            raise Exhausted
        return random.choice(self.free[: self.window])

    def gone(self, slot_id: int) -> None:
        with contextlib.suppress(ValueError):
            self.free.remove(slot_id)


Picker = UniformPicker | HotPicker
TRANSIENT = {ErrorCode.BUSY, ErrorCode.UNAVAILABLE}


def store_attempt(store: Store, picker: Picker, ledger: set[int], keys: bool) -> Attempt:
    serial = itertools.count()

    async def attempt(index: int) -> str:
        slot_id = picker.pick()
        try:
            booking = await commands.book_slot(
                store,
                slot_id=slot_id,
                patient_id=f"bench-{index}-{next(serial)}",
                idempotency_key=uuid.uuid4().hex if keys else None,
            )
        except SlotcastError as exc:
            if exc.code not in TRANSIENT:
                picker.gone(slot_id)  # whatever refused it will refuse it again
            return exc.code.value
        picker.gone(slot_id)
        ledger.add(booking.appointment.id)
        return "booked"

    return attempt


def client_attempt(
    clients: asyncio.Queue[SlotcastClient], picker: Picker, ledger: set[int], keys: bool
) -> Attempt:
    async def attempt(index: int) -> str:
        slot_id = picker.pick()
        client = await clients.get()  # a connection handles one request at a time
        try:
            appointment = await client.book(
                slot_id, idempotency_key=uuid.uuid4().hex if keys else None
            )
        except ClientError as exc:
            if exc.code not in TRANSIENT:
                picker.gone(slot_id)
            return exc.wire_code
        finally:
            clients.put_nowait(client)
        picker.gone(slot_id)
        ledger.add(appointment.id)
        return "booked"

    return attempt


def rest_attempt(
    session: aiohttp.ClientSession,
    url: str,
    tokens: list[str],
    picker: Picker,
    ledger: set[int],
    keys: bool,
) -> Attempt:
    """`POST /api/appointments` as patient `index`, on the session's keep-alive pool."""

    async def attempt(index: int) -> str:
        slot_id = picker.pick()
        headers = {"Authorization": f"Bearer {tokens[index]}"}
        if keys:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        async with session.post(url, json={"slot_id": slot_id}, headers=headers) as resp:
            body = await resp.json()
        if resp.status != 201:
            code = str(body["error"]["code"])
            if code not in {c.value for c in TRANSIENT}:
                picker.gone(slot_id)
            return code
        picker.gone(slot_id)
        ledger.add(body["appointment"]["id"])
        return "booked"

    return attempt


# ---- the server's own view ------------------------------------------------------------------

STAGES = ("pool_wait", "lock_wait", "statements", "commit", "outbox_wait", "publish")


def scrape_stages(http_url: str) -> dict[tuple[str, str], float]:
    """`slotcast_stage_seconds` from the server's /metrics: (sample, stage/le) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "slotcast_stage_seconds":
            for sample in family.samples:
                key = sample.labels["stage"] + "/" + sample.labels.get("le", "")
                found[(sample.name, key)] = sample.value
    return found


def stage_report(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> str:
    """Per stage over the run: observations, mean, and p50/p99 interpolated within buckets."""
    rows = []
    for stage in STAGES:

        def moved(name: str, le: str = "", stage: str = stage) -> float:
            key = (f"slotcast_stage_seconds_{name}", f"{stage}/{le}")
            return after.get(key, 0.0) - before.get(key, 0.0)

        n = moved("count")
        if not n:
            continue
        bounds = sorted(
            float(k[1].split("/")[1])
            for k in after
            if k[0] == "slotcast_stage_seconds_bucket" and k[1].startswith(stage + "/")
        )
        buckets = [(b, moved("bucket", _le(b))) for b in bounds]
        p50, p99 = (_quantile(q, buckets, n) * 1000 for q in (0.5, 0.99))
        mean = moved("sum") / n * 1000
        rows.append([stage, f"{n:,.0f}", f"{mean:.2f}", f"{p50:.2f}", f"{p99:.2f}"])
    return "server stages (slotcast_stage_seconds)\n" + table(
        ["stage", "n", "mean ms", "p50 ms", "p99 ms"], rows
    )


def _quantile(q: float, buckets: list[tuple[float, float]], n: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket holding the q-th."""
    rank, lower, below = q * n, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def spy(pid: int, out: str, seconds: float) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "200",
        "--nonblocking",
        "-o",
        out,
    ]
    if not out.endswith(".svg"):
        command += ["--format", "raw"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def spy_top(raw: str, limit: int = 25) -> str:
    """Own and total share of samples per function, from py-spy's raw collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in Path(raw).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
            if " (" in f
            else f
            for f in stack.split(";")
        ]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    rows = [
        [name, f"{own[name] / samples:.1%}", f"{total[name] / samples:.1%}"]
        for name, _ in total.most_common(limit)
    ]
    top_own = [[name, f"{n / samples:.1%}"] for name, n in own.most_common(limit)]
    return (
        f"py-spy: {samples} samples\n"
        + table(["function (by total)", "own", "total"], rows)
        + "\n"
        + table(["function (by own)", "own"], top_own)
    )


# ---- the database ---------------------------------------------------------------------------


@contextlib.contextmanager
def database(url: str | None, *, no_fsync: bool, settings: list[str]) -> Iterator[str]:
    """The DSN to benchmark against: the given one, or a throwaway embedded cluster's."""
    if url is not None:
        yield url
        return
    root = Path(tempfile.mkdtemp(prefix="slotcast-bench-"))
    admin, handle = embedded.start(root / "pg", throwaway=True)
    try:

        async def prepare() -> None:
            conn = await asyncpg.connect(admin)
            try:
                chosen = [s.split("=", 1) for s in settings]
                if no_fsync:  # what testkit/harness.py does; not what `make run` does
                    unsafe = ("fsync", "synchronous_commit", "full_page_writes")
                    chosen += [[name, "off"] for name in unsafe]
                for name, value in chosen:
                    await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                await conn.execute("SELECT pg_reload_conf()")
                await conn.execute(f"CREATE DATABASE {BENCH_DB}")
            finally:
                await conn.close()

        asyncio.run(prepare())
        yield with_database(admin, BENCH_DB)
    finally:
        handle.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def describe(conn: asyncpg.Connection) -> tuple[str, int | None]:
    """A header line about the server, and the postmaster's pid if it runs here."""
    settings = {
        name: await conn.fetchval(f"SHOW {name}")
        for name in (
            "server_version",
            "max_connections",
            "shared_buffers",
            "fsync",
            "synchronous_commit",
        )
    }
    stat = _proc_stat(await conn.fetchval("SELECT pg_backend_pid()"))
    return ", ".join(f"{k}={v}" for k, v in settings.items()), stat[0] if stat else None


async def background_work(conn: asyncpg.Connection) -> dict[str, int]:
    """Counters of what PostgreSQL does on its own and may stall bookings for a moment."""
    tables = await conn.fetchrow(
        """SELECT sum(autovacuum_count) AS autovacuums, sum(autoanalyze_count) AS autoanalyzes
           FROM pg_stat_user_tables"""
    )
    try:  # PostgreSQL 17 moved these out of pg_stat_bgwriter
        checkpoints = await conn.fetchval(
            "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
        )
    except asyncpg.UndefinedTableError:
        checkpoints = await conn.fetchval(
            "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        )
    wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
    return {
        **{k: int(v or 0) for k, v in tables.items()},
        "checkpoints": int(checkpoints),
        "WAL bytes": int(wal),
    }


class GcPauses:
    """The bench process's own garbage-collection pauses: every task stalls during one."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (when, generation, seconds)
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = perf()
        else:
            self.pauses.append((self._started, info["generation"], perf() - self._started))

    def close(self) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> str:
        full = [t for _, g, t in self.pauses if g == 2]
        longest = max((t for _, _, t in self.pauses), default=0.0)
        return (
            f"bench GC meanwhile: {len(self.pauses)} collections "
            f"({len(full)} full, {sum(full) * 1000:.0f} ms), longest {longest * 1000:.1f} ms"
        )


async def seed_doctors(
    store: Store, count: int, *, prefix: str, schedule: list[Block], slot_minutes: int, days: int
) -> list[int]:
    """Doctors with their slots materialized, a few at a time (seeding is not measured)."""
    gate = asyncio.Semaphore(8)

    async def one(n: int) -> int:
        async with gate:
            doctor_id = await doctors.create_doctor(
                store,
                name=f"{prefix} {n}",
                timezone="UTC",
                specialty="bench",
                slot_minutes=slot_minutes,
                horizon_days=days,
                schedule=schedule,
            )
            await commands.materialize_slots(store, doctor_id)
            return doctor_id

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def free_slots(conn: asyncpg.Connection, doctors: list[int]) -> dict[int, list[int]]:
    rows = await conn.fetch(
        f"""SELECT doctor_id, id FROM slots
            WHERE doctor_id = ANY($1::int[]) AND status = 'free' AND retired_at IS NULL
              AND starts_at > now() + interval '{MARGIN}'
            ORDER BY doctor_id, starts_at""",
        doctors,
    )
    free: dict[int, list[int]] = {d: [] for d in doctors}
    for r in rows:
        free[r["doctor_id"]].append(r["id"])
    return free


CHECKS = {
    "slots with >1 active appointment": """
        SELECT count(*) FROM (
            SELECT slot_id FROM appointments
            WHERE doctor_id = ANY($1::int[]) AND status <> 'cancelled'
            GROUP BY slot_id HAVING count(*) > 1) t""",
    "overlapping active appointments": """
        SELECT count(*) FROM (
            SELECT starts_at, max(ends_at) OVER (
                PARTITION BY doctor_id ORDER BY starts_at, id
                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_end
            FROM appointments WHERE doctor_id = ANY($1::int[]) AND status <> 'cancelled') t
        WHERE earlier_end > starts_at""",
    "|busy slots - active appointments|": """
        SELECT abs(
            (SELECT count(*) FROM slots WHERE doctor_id = ANY($1::int[])
                AND status IN ('busy', 'busy-tentative'))
          - (SELECT count(*) FROM appointments WHERE doctor_id = ANY($1::int[])
                AND status <> 'cancelled'))""",
    "doctors whose version != change count": """
        SELECT count(*) FROM doctors d
        WHERE d.id = ANY($1::int[])
          AND d.version <> (SELECT count(*) FROM changes c WHERE c.doctor_id = d.id)""",
}


async def verify(conn: asyncpg.Connection, doctors: list[int], ledger: set[int]) -> dict[str, int]:
    """Every invariant, counted: all zeros means no double booking and nothing lost."""
    found = {name: int(await conn.fetchval(query, doctors)) for name, query in CHECKS.items()}
    active = {
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM appointments"
            " WHERE doctor_id = ANY($1::int[]) AND status <> 'cancelled'",
            doctors,
        )
    }
    found["reported bookings missing"] = len(ledger - active)
    found["bookings never reported"] = len(active - ledger)
    return found


# ---- scenarios ------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    dsn: str
    postmaster: int | None
    store: Store
    conn: asyncpg.Connection
    profiler: Profiler | None
    uniform_doctors: list[int] = field(default_factory=list)
    uniform_ledger: set[int] = field(default_factory=set)

    async def uniform_scope(self) -> list[int]:
        if not self.uniform_doctors:
            days = self.args.days
            t = perf()
            self.uniform_doctors = await seed_doctors(
                self.store,
                self.args.doctors,
                prefix="Dr. Bench",
                schedule=WORKDAY,
                slot_minutes=30,
                days=days,
            )
            print(f"seeded {self.args.doctors} doctors ({days} days of slots) in {perf() - t:.1f}s")
        return self.uniform_doctors

    async def measure(
        self,
        name: str,
        attempt: Attempt,
        doctors: list[int],
        ledger: set[int],
        *,
        bookings: int,
        server_pid: int | None = None,
        server_http: str | None = None,
    ) -> Result:
        a = self.args
        await drive(attempt, bookers=a.bookers, bookings=a.warmup, duration=None, rate=None)
        stages = scrape_stages(server_http) if server_http is not None else None
        # One profile per scenario: OUT with the scenario's name before its suffix.
        spied = str(Path(a.py_spy).with_stem(f"{Path(a.py_spy).stem}-{name}")) if a.py_spy else ""
        spying = (
            spy(server_pid, spied, a.duration or 10.0) if spied and server_pid is not None else None
        )
        load_before = os.getloadavg()[0]
        housekeeping = await background_work(self.conn)
        gc_pauses = GcPauses()
        if self.profiler is not None:
            self.profiler.reset()
        cpu = time.process_time(), postgres_cpu(self.postmaster), process_cpu(server_pid)
        run = await drive(
            attempt, bookers=a.bookers, bookings=bookings, duration=a.duration, rate=a.rate
        )
        after = time.process_time(), postgres_cpu(self.postmaster), process_cpu(server_pid)
        gc_pauses.close()
        stage_lines = (
            stage_report(stages, scrape_stages(server_http))
            if stages is not None and server_http is not None
            else None
        )
        if spying is not None:
            await asyncio.to_thread(spying.wait)
        done = await background_work(self.conn)
        pg = None if cpu[1] is None or after[1] is None else after[1] - cpu[1]
        server = None if cpu[2] is None or after[2] is None else after[2] - cpu[2]
        mode = f"open {a.rate:.0f}/s" if a.rate else f"closed x{a.bookers}"
        result = Result(
            name,
            mode,
            run.latencies,
            run.outcomes,
            run.wall,
            after[0] - cpu[0],
            pg,
            server,
            load_before,
            os.getloadavg()[0],
        )
        # Before the checks, whose own queries must not count.
        profile = self.profiler.report(result.booked) if self.profiler is not None else None
        result.checks = await verify(self.conn, doctors, ledger)
        print(table(HEADER, [result.row()]))
        failed = {k: v for k, v in result.checks.items() if v}
        print(f"checks: {'all zero: OK' if not failed else f'FAILED {failed}'}")
        extra = {k: done[k] - housekeeping[k] for k in done}
        wal = extra.pop("WAL bytes")
        print(
            "PostgreSQL housekeeping meanwhile: "
            + ", ".join(f"{k} {v}" for k, v in extra.items())
            + f"; WAL {wal / 2**20:.0f} MiB ({wal / max(result.booked, 1) / 1024:.1f} KiB/booking)"
        )
        print(gc_pauses.summary())
        if profile is not None:
            print(profile)
        if stage_lines is not None:
            print(stage_lines)
        if spying is not None:
            print(f"py-spy wrote {spied} (exit {spying.returncode})")
            if not spied.endswith(".svg") and spying.returncode == 0:
                print(spy_top(spied))
        if a.timeline:
            print(timeline(run, gc_pauses))
        print()
        return result

    async def uniform(self) -> Result:
        doctors = await self.uniform_scope()
        picker = UniformPicker(await free_slots(self.conn, doctors))
        attempt = store_attempt(self.store, picker, self.uniform_ledger, self.args.keys)
        return await self.measure(
            "uniform", attempt, doctors, self.uniform_ledger, bookings=self.args.bookings
        )

    async def hot_doctor(self) -> tuple[int, list[int]]:
        [doctor] = await seed_doctors(
            self.store,
            1,
            prefix="Dr. Hot",
            schedule=ALL_DAY,
            slot_minutes=5,
            days=self.args.hot_days,
        )
        free = (await free_slots(self.conn, [doctor]))[doctor]
        print(f"hot doctor {doctor}: {len(free)} free slots, window {self.args.hot_window}")
        return doctor, free

    async def hot(self) -> Result:
        doctor, free = await self.hot_doctor()
        ledger: set[int] = set()
        attempt = store_attempt(
            self.store, HotPicker(free, self.args.hot_window), ledger, self.args.keys
        )
        return await self.measure("hot", attempt, [doctor], ledger, bookings=self.args.hot_bookings)

    async def server(self) -> Result:
        doctors = await self.uniform_scope()
        picker = UniformPicker(await free_slots(self.conn, doctors))
        return await self.through_server("server", "ws", picker, doctors, self.uniform_ledger)

    async def rest(self) -> Result:
        doctors = await self.uniform_scope()
        picker = UniformPicker(await free_slots(self.conn, doctors))
        return await self.through_server("rest", "rest", picker, doctors, self.uniform_ledger)

    async def server_hot(self) -> Result:
        doctor, free = await self.hot_doctor()
        ledger: set[int] = set()
        picker = HotPicker(free, self.args.hot_window)
        return await self.through_server(
            "server-hot", "ws", picker, [doctor], ledger, bookings=self.args.hot_bookings
        )

    async def through_server(
        self,
        name: str,
        transport: Literal["ws", "rest"],
        picker: Picker,
        doctors: list[int],
        ledger: set[int],
        *,
        bookings: int | None = None,
    ) -> Result:
        a = self.args
        env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
        env.update(
            SLOTCAST_DATABASE_URL=self.dsn,
            SLOTCAST_BROKER_URL=a.broker_url,
            SLOTCAST_JWT_SECRET=JWT_SECRET,
            SLOTCAST_INSTANCE_ID="bench",
            SLOTCAST_DB_POOL_MIN=str(a.pool_size),
            SLOTCAST_DB_POOL_MAX=str(a.pool_size),
            SLOTCAST_LOCK_TIMEOUT_MS=str(a.lock_timeout_ms),
            SLOTCAST_STATEMENT_TIMEOUT_MS=str(a.statement_timeout_ms),
            SLOTCAST_LOG_LEVEL="WARNING",
            # A few driver patients book every slot: caps out of reach (still counted).
            SLOTCAST_MAX_ACTIVE_PER_DOCTOR="1000000",
            SLOTCAST_MAX_ACTIVE_TOTAL="1000000",
            **UNLIMITED,  # 1,000 bookings/s from one address: the booking path is measured
        )
        # Steady state: what was committed before this server started was published long
        # ago. The Store scenarios and the seeding never publish, and left unpublished the
        # server's relay would replay all of it, 500 changes a second, during the run.
        if await self.conn.fetchval("SELECT to_regclass('relay_cursor') IS NOT NULL"):
            await self.conn.execute(
                "UPDATE relay_cursor r SET published_version = d.version"
                " FROM doctors d WHERE d.id = r.doctor_id"
            )
        logs = Path(tempfile.mkdtemp(prefix="slotcast-bench-server-"))
        proc = ServerProcess("bench", free_port(), env, logs / "server.log")
        t = perf()
        try:
            await asyncio.to_thread(proc.start, 300)  # it materializes every doctor at start
            print(f"server up in {perf() - t:.1f}s (log {proc.log_path})")
            pid = proc.process.pid if proc.process else None
            async with self.attempts(proc, transport, picker, ledger) as attempt:
                return await self.measure(
                    name,
                    attempt,
                    doctors,
                    ledger,
                    bookings=bookings if bookings is not None else a.bookings,
                    server_pid=pid,
                    server_http=proc.http_url,
                )
        finally:
            await asyncio.to_thread(proc.stop)

    @contextlib.asynccontextmanager
    async def attempts(
        self,
        proc: ServerProcess,
        transport: Literal["ws", "rest"],
        picker: Picker,
        ledger: set[int],
    ) -> AsyncIterator[Attempt]:
        a = self.args
        if transport == "ws":
            codec: Literal["json", "msgpack"] = "msgpack" if a.codec == "msgpack" else "json"
            async with clients(proc.ws_url, a.bookers, codec) as idle:
                yield client_attempt(idle, picker, ledger, a.keys)
            return
        tokens = [
            auth.issue(JWT_SECRET, subject=f"rest-patient-{n}", role=Role.PATIENT)
            for n in range(a.bookers)
        ]
        connector = aiohttp.TCPConnector(limit=a.bookers)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"{proc.http_url}/api/appointments"
            yield rest_attempt(session, url, tokens, picker, ledger, a.keys)


@contextlib.asynccontextmanager
async def clients(
    url: str, count: int, codec: Literal["json", "msgpack"]
) -> AsyncIterator[asyncio.Queue[SlotcastClient]]:
    """`count` patients, each on its own WebSocket, queued as idle connections."""
    idle: asyncio.Queue[SlotcastClient] = asyncio.Queue()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        contextlib.AsyncExitStack() as stack,
    ):
        gate = asyncio.Semaphore(20)

        async def one(n: int) -> None:
            tok = auth.issue(JWT_SECRET, subject=f"ws-patient-{n}", role=Role.PATIENT)
            async with gate:
                client = await stack.enter_async_context(
                    SlotcastClient.connect(url, token=tok, codec=codec, session=session)
                )
            idle.put_nowait(client)

        await asyncio.gather(*(one(n) for n in range(count)))
        yield idle


async def main(args: argparse.Namespace, dsn: str) -> int:
    applied = await migrate(dsn)
    profiler = Profiler() if args.profile else None
    if profiler is not None:
        profiler.install()
    conn = await asyncpg.connect(dsn)
    try:
        about, postmaster = await describe(conn)
        print(f"PostgreSQL: {about}; migrations applied now: {applied or 'none'}")
        print(
            f"machine: {os.cpu_count()} CPUs, loadavg {os.getloadavg()[0]:.2f}; "
            f"pool {args.pool_size}, bookers {args.bookers}, "
            f"idempotency keys {'on' if args.keys else 'off'}\n"
        )
        async with open_store(
            dsn,
            min_size=args.pool_size,
            max_size=args.pool_size,
            lock_timeout_ms=args.lock_timeout_ms,
            statement_timeout_ms=args.statement_timeout_ms,
        ) as store:
            bench = Bench(args, dsn, postmaster, store, conn, profiler)
            scenarios = list(args.scenarios)
            if args.via_server and "server" not in scenarios:
                scenarios.append("server")
            results = [await getattr(bench, name.replace("-", "_"))() for name in scenarios]
    finally:
        await conn.close()
    print("summary")
    print(table(HEADER, [r.row() for r in results]))
    failed = [r.scenario for r in results if any(r.checks.values())]
    print(f"double-booking checks: {'FAILED in ' + ', '.join(failed) if failed else 'all OK'}")
    return 1 if failed else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Booking throughput, latency and double-booking checks (see the docstring)."
    )
    p.add_argument("--database-url", help="a migratable database (default: embedded, throwaway)")
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="embedded only: fsync, synchronous_commit, full_page_writes off, as the tests run",
    )
    p.add_argument(
        "--pg-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="embedded only: ALTER SYSTEM SET a reloadable setting (repeatable)",
    )
    p.add_argument(
        "--scenarios",
        type=lambda s: [x for x in s.split(",") if x],
        default=["uniform", "hot"],
        help="comma-separated: uniform, hot, server, rest, server-hot (default: uniform,hot)",
    )
    p.add_argument("--via-server", action="store_true", help="also run the server scenario")
    p.add_argument("--doctors", type=int, default=1000)
    p.add_argument("--days", type=int, default=8, help="days of slots per uniform doctor")
    p.add_argument("--hot-days", type=int, default=30, help="days of 5-minute slots, hot doctor")
    p.add_argument("--hot-window", type=int, default=100, help="earliest slots hot bookers want")
    p.add_argument("--hot-bookings", type=int, default=2000, help="hot: stop after this many")
    p.add_argument("--bookers", type=int, default=100, help="concurrent bookers / connections")
    p.add_argument("--bookings", type=int, default=10_000, help="uniform, server: stop after")
    p.add_argument("--duration", type=float, help="or after this many seconds")
    p.add_argument("--rate", type=float, help="open loop: start this many attempts per second")
    p.add_argument("--warmup", type=int, default=300, help="attempts before measuring")
    p.add_argument("--pool-size", type=int, default=10, help="the server's default is 10")
    p.add_argument("--lock-timeout-ms", type=int, default=1000)
    p.add_argument("--statement-timeout-ms", type=int, default=2000)
    p.add_argument("--no-keys", dest="keys", action="store_false", help="no idempotency keys")
    p.add_argument("--codec", choices=["json", "msgpack"], default="json", help="server scenario")
    p.add_argument("--profile", action="store_true", help="time every statement and phase")
    p.add_argument("--timeline", action="store_true", help="throughput and p99 second by second")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--broker-url",
        default="memory://",
        help="through the server: its broker (redis://... to publish as a deployment does)",
    )
    p.add_argument("--py-spy", help="through the server: py-spy record it (.svg, else raw)")
    args = p.parse_args(argv)
    unknown = set(args.scenarios) - {"uniform", "hot", "server", "rest", "server-hot"}
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def run() -> int:
    args = parse()
    random.seed(args.seed)
    with database(args.database_url, no_fsync=args.no_fsync, settings=args.pg_set) as dsn:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop ships everywhere but Windows
            return asyncio.run(main(args, dsn))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main(args, dsn))


if __name__ == "__main__":
    raise SystemExit(run())
