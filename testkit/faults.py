"""The fault suite's machinery: a cluster it may hurt, a load that notices, and the verdict.

`tests/faults` holds one test per fault; everything they share is here, so each
test reads as the fault alone. One test is:

    report = await cluster.survive("PostgreSQL restart", restart_postgres)
    report.assert_recovered()

- **Cluster**: a PostgreSQL the suite controls (`ControlledPostgres`: stop,
  start, restart, SIGSTOP), a Redis it controls (`RedisServer`), three
  `slotcast serve` instances under a **supervisor** (restarts an instance that
  exited, after `RESTART_DELAY_S`, as systemd's `Restart=always` would) behind a
  **balancer** (a TCP proxy that health-checks `/readyz` every 250 ms, as
  docs/haproxy.cfg does, and sends new connections to the ready instance with the
  fewest; when none is ready it tries any that accepts, so that a dependency
  outage does not leave clients with nowhere to go).
- **Load**: watchers (half JSON, half MessagePack, `reconnect=True`) watching
  every doctor, and bookers (half over WebSocket, half over REST) that book a
  random slot and cancel most of what they book, retrying each command with its
  idempotency key until it is answered.
- **Verdict** (`Report.problems`): every acknowledged booking (and cancel) is in
  the database as acknowledged, no slot holds two active appointments and no
  retry booked twice (all in SQL, straight against the database), every watcher
  equal to the database within `RECOVERY_S` of the fault's end, no `internal`
  seen by any client, no traceback in any instance's log, no instance exiting
  unless the test made it, `/readyz` answering within `READYZ_BOUND_S` all along,
  every instance ready within `RECOVERY_S` of the fault's end, and bookings
  acknowledged again within `WRITES_BACK_S` of it.

The numbers measured along the way (how long bookings paused, when every instance
was ready again, when every watcher had converged) are printed with the report;
docs/operations.md records them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from client import ClientError, SlotcastClient
from protocol.messages import AppointmentUpdated, Book, Booked, Cancel, Delta, Error, Message
from protocol.vocabulary import Role
from store.pool import open_store
from testkit.fixtures import JWT_SECRET, SeededDoctor, seed_doctor, token
from testkit.harness import UNLIMITED, ControlledPostgres, RedisServer, ServerProcess, free_port

INSTANCES = 3
DOCTORS = 2
WATCHERS = 24  # half JSON, half MessagePack; each watches every doctor
BOOKERS = 6  # half over WebSocket, half over REST
PACE_S = 0.1  # a booker's pause between commands
CANCEL_SHARE = 0.8  # of its bookings a booker cancels again, so slots keep coming free
WATCHER_MAX_BACKOFF_S = 2.0  # the client's reconnect backoff cap (its default is 5 s)

# The promises each test holds the server to.
RECOVERY_S = 10.0  # after the fault ends: every instance ready, every watcher converged
READYZ_BOUND_S = 2.0  # /readyz answers (200 or 503), whatever the fault; "about a second"
WRITES_BACK_S = 5.0  # after the fault ends, bookings are acknowledged again within this

# The harness around them.
RESTART_DELAY_S = 1.0  # the supervisor's RestartSec
CHECK_EVERY_S = 0.25  # the balancer's health checks (docs/haproxy.cfg: inter 250ms)
OP_TIMEOUT_S = 3.0  # a booker stops waiting for one attempt and retries with the same key
SETTLE_S = 10.0  # after the load stops, each booker's last command must be answered by then
WARM_UP_ACKS = 10  # acknowledged bookings before the fault is injected

INSTANCE_ENV = {
    "SLOTCAST_DRAIN_GRACE_S": "0.5",  # twice the balancer's check interval
    "SLOTCAST_DB_POOL_MIN": "1",
    "SLOTCAST_LOG_LEVEL": "INFO",
    # Six bookers book slot after slot as fast as the faults allow: the faults are under
    # test here; rate limits and a patient's caps have tests of their own.
    **UNLIMITED,
    "SLOTCAST_MAX_ACTIVE_PER_DOCTOR": "1000000",
    "SLOTCAST_MAX_ACTIVE_TOTAL": "1000000",
}
TRANSIENT = {"unavailable", "busy"}
TRACEBACK = "Traceback (most recent call last)"


# ---- clients ---------------------------------------------------------------------------------


class FaultClient(SlotcastClient):
    """The Python client, telling the load every error the server sends it."""

    on_error: Callable[[str, str, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heard: list[float] = []  # when each delta arrived

    def _dispatch(self, rid: str | int | None, message: Message) -> None:
        if isinstance(message, Error) and self.on_error is not None:
            self.on_error(message.code, message.message, "websocket")
        elif isinstance(message, Delta):
            self.heard.append(time.monotonic())
        super()._dispatch(rid, message)


@dataclass(frozen=True)
class Ack:
    """A booking the server acknowledged: it must be in the database from then on."""

    patient: str
    key: str
    slot_id: int
    appointment_id: int
    at: float


GAVE_UP = object()  # a command still unanswered when the settle deadline passed


class Booker:
    """One patient booking random slots, each command retried with its key until answered."""

    def __init__(self, load: Load, index: int, *, websocket: bool) -> None:
        self.load = load
        self.patient = f"booker-{index}"
        self.token = token(Role.PATIENT, self.patient)
        self.websocket = websocket
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: FaultClient | None = None
        self._http: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._drop_client()
            if self._http is not None:
                await self._http.close()

    async def _run(self) -> None:
        load, n = self.load, 0
        while not load.stopping:
            n += 1
            doctor = random.choice(load.cluster.doctors)
            slot_id = random.choice(doctor.slots).id
            key = f"{self.patient}-{n}"
            booked = await self._settle(partial(self._book, slot_id, key))
            if booked is GAVE_UP:
                load.in_doubt.append(f"{self.patient} book slot {slot_id} (key {key})")
                return
            if booked is not None:
                load.acks.append(Ack(self.patient, key, slot_id, booked, load.now()))
                if random.random() < CANCEL_SHARE:
                    cancelled = await self._settle(partial(self._cancel, booked, f"{key}-cancel"))
                    if cancelled is GAVE_UP:
                        load.in_doubt.append(f"{self.patient} cancel {booked} (key {key}-cancel)")
                        return
                    if cancelled is not None:
                        load.cancelled.add(booked)
            await asyncio.sleep(PACE_S * random.uniform(0.5, 1.5))

    async def _settle(self, attempt: Callable[[], Awaitable[tuple[str, Any]]]) -> Any:
        """Retry one command (same key) until it is answered: its value, None if refused."""
        began, backoff = self.load.now(), 0.05
        while True:
            try:
                async with asyncio.timeout(OP_TIMEOUT_S + 1):
                    kind, value = await attempt()
            except TimeoutError:
                await self._drop_client()
                kind, value = "retry", "timeout"
            if kind == "ok":
                self.load.waits.append((began, self.load.now() - began))
                return value
            if kind == "refused":
                return None
            self.load.transport[str(value)] += 1
            if self.load.settle_by is not None and self.load.now() > self.load.settle_by:
                return GAVE_UP
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 1.0)

    async def _book(self, slot_id: int, key: str) -> tuple[str, Any]:
        if self.websocket:
            return await self._over_ws(Book(slot_id, key), Booked)
        return await self._over_rest("/api/appointments", {"slot_id": slot_id}, key)

    async def _cancel(self, appointment_id: int, key: str) -> tuple[str, Any]:
        if self.websocket:
            message = Cancel(appointment_id, "fault test", key)
            return await self._over_ws(message, AppointmentUpdated)
        path = f"/api/appointments/{appointment_id}/cancel"
        return await self._over_rest(path, {"reason": "fault test"}, key)

    async def _over_ws(self, message: Message, reply: type[Booked | AppointmentUpdated]) -> Any:
        try:
            if self._client is None:
                self._stack = contextlib.AsyncExitStack()
                self._client = await self._stack.enter_async_context(
                    FaultClient.connect(self.load.cluster.balancer.ws_url, token=self.token)
                )
                self._client.on_error = self.load.client_error
            answer = await self._client.request(message, reply, timeout=OP_TIMEOUT_S)
        except ClientError as exc:
            if self._client is not None and not self._client.ready.is_set():
                await self._drop_client()  # the socket went away: reconnect next attempt
            if exc.wire_code in TRANSIENT or exc.wire_code == "internal":
                return "retry", exc.wire_code
            return "refused", exc.wire_code
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            await self._drop_client()
            return "retry", type(exc).__name__
        return "ok", answer.appointment.id

    async def _drop_client(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _over_rest(self, path: str, body: dict[str, Any], key: str) -> tuple[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=OP_TIMEOUT_S))
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key}
        url = self.load.cluster.balancer.http_url + path
        try:
            async with self._http.post(url, json=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return "retry", type(exc).__name__
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if status in (200, 201) and isinstance(data, dict):
            return "ok", data["appointment"]["id"]
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            code, message = str(error.get("code")), str(error.get("message"))
        else:
            code, message = f"http {status}", raw[:200].decode(errors="replace")
        self.load.client_error(code, message, f"REST {status}")
        if code in TRANSIENT or code == "internal" or status >= 500:
            return "retry", code
        return "refused", code


@dataclass(frozen=True)
class SeenError:
    at: float
    code: str
    message: str
    via: str


class Load:
    """Watchers and bookers through the balancer, and what they saw."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.now = cluster.now
        self.watchers: list[FaultClient] = []
        self.bookers = [Booker(self, i, websocket=i % 2 == 0) for i in range(BOOKERS)]
        self.acks: list[Ack] = []
        self.cancelled: set[int] = set()
        self.in_doubt: list[str] = []
        self.errors: list[SeenError] = []
        self.transport: Counter[str] = Counter()  # why attempts were retried
        self.waits: list[tuple[float, float]] = []  # (began, seconds until answered)
        self.stopping = False
        self.settle_by: float | None = None
        self.last_unready: float | None = None  # the last time a watcher was seen not ready
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []  # the bookers
        self._sampler: asyncio.Task[None] | None = None

    def client_error(self, code: str, message: str, via: str) -> None:
        self.errors.append(SeenError(self.now(), code, message, via))

    async def __aenter__(self) -> Load:
        await self._stack.__aenter__()
        try:
            watchers = await asyncio.gather(*(self._watcher(i) for i in range(WATCHERS)))
        except BaseException:
            await self._stack.aclose()
            raise
        self.watchers = list(watchers)
        self._tasks = [asyncio.create_task(b.run(), name=b.patient) for b in self.bookers]
        self._sampler = asyncio.create_task(self._sample(), name="watcher sampler")
        return self

    async def _sample(self) -> None:
        while True:
            if not all(w.ready.is_set() for w in self.watchers):
                self.last_unready = self.now()
            await asyncio.sleep(0.02)

    async def _watcher(self, index: int) -> FaultClient:
        codec = "json" if index % 2 == 0 else "msgpack"
        client = await self._stack.enter_async_context(
            FaultClient.connect(
                self.cluster.balancer.ws_url,
                codec=codec,
                reconnect=True,
                max_backoff=WATCHER_MAX_BACKOFF_S,
            )
        )
        client.on_error = self.client_error
        for doctor in self.cluster.doctors:
            await client.watch(doctor.id, doctor.start, doctor.end)
        return client

    async def __aexit__(self, *exc: object) -> None:
        self.stopping = True
        self.settle_by = self.settle_by or self.now()
        tasks = [t for t in (*self._tasks, self._sampler) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stack.aclose()

    async def acked(self, count: int, after: float, timeout: float) -> float | None:
        """When the `count`th booking after `after` was acknowledged, or None by `timeout`."""
        deadline = self.now() + timeout
        while self.now() < deadline:
            later = [a.at for a in self.acks if a.at > after]
            if len(later) >= count:
                return later[count - 1]
            await asyncio.sleep(0.02)
        return None

    async def caught_up(self, versions: dict[int, int], timeout: float) -> float | None:
        """When every watcher was ready and had every doctor at `versions` or later."""
        deadline = self.now() + timeout
        while self.now() < deadline:
            if all(
                w.ready.is_set() and all(w.calendars[d].version >= v for d, v in versions.items())
                for w in self.watchers
            ):
                return self.now()
            await asyncio.sleep(0.02)
        return None

    def heard_during(self, since: float, until: float) -> int:
        """How many watchers received a live update between `since` and `until`."""
        return sum(1 for w in self.watchers if any(since <= t <= until for t in w.heard))

    async def stop_bookers(self) -> None:
        """Ask each booker to stop after its current command, answered (or given up)."""
        self.stopping = True
        self.settle_by = self.now() + SETTLE_S
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ---- the balancer ----------------------------------------------------------------------------


@dataclass
class Probe:
    at: float
    seconds: float
    status: int | None  # None: refused, reset or no answer in time
    reason: str


@dataclass
class Backend:
    server: ServerProcess
    ready: bool = False
    active: int = 0
    probes: list[Probe] = field(default_factory=list)


class Balancer:
    """A TCP proxy in front of the instances that health-checks `/readyz` as HAProxy would."""

    def __init__(self, servers: list[ServerProcess], now: Callable[[], float]) -> None:
        self.backends = [Backend(s) for s in servers]
        self.now = now
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []  # the bookers
        self._sampler: asyncio.Task[None] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._http: aiohttp.ClientSession | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> Balancer:
        self._http = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._check(b)) for b in self.backends]
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._http is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        await self._http.close()

    async def _check(self, backend: Backend) -> None:
        assert self._http is not None
        url = f"{backend.server.http_url}/readyz"
        timeout = aiohttp.ClientTimeout(total=READYZ_BOUND_S)
        while True:
            began = self.now()
            status, reason = None, ""
            try:
                async with self._http.get(url, timeout=timeout) as resp:
                    status = resp.status
                    body = await resp.json(content_type=None)
                    reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
            except TimeoutError:
                reason = "no answer"
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                reason = type(exc).__name__
            backend.probes.append(Probe(began, self.now() - began, status, reason))
            backend.ready = status == 200
            await asyncio.sleep(CHECK_EVERY_S)

    def _history(self) -> Iterator[tuple[float, int]]:
        """(time, instances ready) after each probe, in order of the probes' answers."""
        probes = sorted(
            (p.at + p.seconds, n, p.status == 200)
            for n, b in enumerate(self.backends)
            for p in b.probes
        )
        ready = [False] * len(self.backends)
        for at, n, ok in probes:
            ready[n] = ok
            yield at, sum(ready)

    def fewest_ready(self, since: float, until: float) -> int:
        """The fewest instances the balancer had ready at once between `since` and `until`."""
        counts = [n for at, n in self._history() if since <= at <= until]
        return min(counts, default=len(self.backends))

    def first_unready(self, since: float) -> float | None:
        """When the balancer first saw an instance not ready from `since` on."""
        return next(
            (at - since for at, n in self._history() if at >= since and n < len(self.backends)),
            None,
        )

    def all_ready(self, since: float) -> float | None:
        """When every instance was first seen ready from `since` on (`since` if they all were)."""
        history, everyone = list(self._history()), len(self.backends)
        before = [n for at, n in history if at < since]
        if before and before[-1] == everyone:
            return since
        return next((at for at, n in history if at >= since and n == everyone), None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        ready = [b for b in self.backends if b.ready]
        for backend in sorted(ready or self.backends, key=lambda b: b.active):
            backend.active += 1  # counted before connecting: clients arrive all at once
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", backend.server.port), 1.0
                )
            except (TimeoutError, OSError):
                backend.active -= 1
                continue
            self._writers.add(upstream[1])
            try:
                await asyncio.gather(
                    self._pipe(reader, upstream[1]), self._pipe(upstream[0], writer)
                )
            finally:
                backend.active -= 1
                self._writers.discard(upstream[1])
            break
        writer.close()
        self._writers.discard(writer)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


# ---- the cluster -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Exit:
    name: str
    code: int | None
    at: float
    expected: bool


class Cluster:
    """PostgreSQL, Redis and the instances behind a balancer, all the test's to hurt."""

    def __init__(
        self,
        postgres: ControlledPostgres,
        database_url: str,
        redis: RedisServer,
        instances: list[ServerProcess],
        doctors: list[SeededDoctor],
    ) -> None:
        self.postgres = postgres
        self.database_url = database_url
        self.redis = redis
        self.instances = instances
        self.doctors = doctors
        self.began = time.monotonic()  # when the fault was injected
        self.balancer = Balancer(instances, self.now)
        self.exits: list[Exit] = []
        self.launches: Counter[str] = Counter()
        self._expected: set[str] = set()
        self._relaunch_at: dict[str, float] = {}
        self._supervisor: asyncio.Task[None] | None = None

    now = staticmethod(time.monotonic)  # every time recorded; reports say `rel(t)`

    def rel(self, t: float) -> float:
        """Seconds since the fault was injected (negative before), as reports give times."""
        return t - self.began

    # -- the supervisor --

    async def _supervise(self) -> None:
        while True:
            for server in self.instances:
                process = server.process
                if process is not None and process.poll() is not None:
                    expected = server.name in self._expected
                    self._expected.discard(server.name)
                    self.exits.append(Exit(server.name, process.returncode, self.now(), expected))
                    server.process = None
                    self._relaunch_at[server.name] = self.now() + RESTART_DELAY_S
                if server.process is None and self._relaunch_at.get(server.name, 0) <= self.now():
                    server.launch()
                    self.launches[server.name] += 1
            await asyncio.sleep(0.05)

    # -- faults --

    def kill(self, server: ServerProcess) -> None:
        """kill -9: no drain, no goodbye; the supervisor starts it again."""
        assert server.process is not None
        self._expected.add(server.name)
        server.process.send_signal(signal.SIGKILL)

    async def terminate(self, server: ServerProcess) -> None:
        """SIGTERM, as a deploy does: the instance drains and exits; the supervisor restarts it."""
        assert server.process is not None
        exited = len(self.exits)
        self._expected.add(server.name)
        server.process.send_signal(signal.SIGTERM)
        await self._until(lambda: len(self.exits) > exited, f"{server.name} to exit", 20)

    async def relaunched(self, server: ServerProcess) -> None:
        """Until the supervisor has started `server` again (not yet ready)."""
        launches = self.launches[server.name]
        await self._until(
            lambda: self.launches[server.name] > launches, f"{server.name} relaunched", 20
        )

    async def ready(self, server: ServerProcess, timeout: float = RECOVERY_S) -> None:
        backend = next(b for b in self.balancer.backends if b.server is server)
        began = self.now()
        await self._until(
            lambda: any(p.status == 200 and p.at > began for p in backend.probes),
            f"{server.name} ready",
            timeout,
        )

    @staticmethod
    async def _until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.02)

    # -- one run --

    async def survive(self, fault: str, inject: Callable[[], Awaitable[None]]) -> Report:
        """Run the load, inject the fault, and judge what happened around it."""
        report = Report(fault)
        self._supervisor = asyncio.create_task(self._supervise(), name="supervisor")
        client_log, client_logger = ClientLog(), logging.getLogger("client")
        level = client_logger.level
        client_logger.addHandler(client_log)
        client_logger.setLevel(logging.INFO)  # its word on a failed restore is INFO
        try:
            async with self.balancer:
                await self._until(
                    lambda: all(b.ready for b in self.balancer.backends), "the balancer", 10
                )
                async with Load(self) as load:
                    await self._run(report, load, inject)
                    self._judge_clients(report, load, client_log)
                self._judge_instances(report)
        finally:
            client_logger.removeHandler(client_log)
            client_logger.setLevel(level)
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        print(report.summary())
        return report

    async def _run(self, report: Report, load: Load, inject: Callable[[], Awaitable[None]]) -> None:
        assert await load.acked(WARM_UP_ACKS, 0.0, 15) is not None, "no bookings to begin with"
        self.began = self.now()
        await inject()
        end = self.now()
        report.fault_ended = self.rel(end)
        if report.fault_ended > 1.0:
            report.heard = load.heard_during(self.began + 0.5, end)
        report.fewest_ready = self.balancer.fewest_ready(self.began, end)
        report.unready_at = self.balancer.first_unready(self.began)
        async with _connect(self.database_url) as db:
            versions = {d.id: await _version(db, d.id) for d in self.doctors}
        caught_up = asyncio.create_task(load.caught_up(versions, RECOVERY_S))
        back = await load.acked(1, end, WRITES_BACK_S)
        if back is None:
            report.problems.append(
                f"no booking acknowledged within {WRITES_BACK_S:.0f} s of the fault's end"
            )
        # A little load after the fault, so that a watcher that stopped listening shows.
        await asyncio.sleep(max(0.0, (back or self.now()) + 1.0 - self.now()))
        await load.stop_bookers()
        stopped = self.now()
        report.load_stopped = self.rel(stopped)
        report.longest_wait = max((w for _, w in load.waits), default=0.0)
        report.pause = _longest_pause(load.acks, self.began, stopped)
        report.acks, report.cancels = len(load.acks), len(load.cancelled)
        caught = await caught_up
        report.caught_up_after = None if caught is None else caught - end
        if load.last_unready is not None and load.last_unready > self.began:
            report.watchers_back = self.rel(load.last_unready) if caught is not None else None
        await self._judge_readiness(report, end)
        async with _connect(self.database_url) as db:
            await self._judge_convergence(report, load, db, end)
            await _audit(report, load, db, self.doctors)

    async def _judge_readiness(self, report: Report, end: float) -> None:
        deadline = end + RECOVERY_S
        while (ready := self.balancer.all_ready(end)) is None and self.now() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if ready is None or ready > deadline:
            late = [b.server.name for b in self.balancer.backends if not b.ready]
            report.problems.append(
                f"{', '.join(late)} not ready {RECOVERY_S:.0f} s after the fault ended"
            )
        if ready is not None:
            report.ready_after = ready - end
        for backend in self.balancer.backends:
            name = backend.server.name
            slow = [
                p for p in backend.probes if p.reason == "no answer" or p.seconds > READYZ_BOUND_S
            ]
            if slow:
                report.problems.append(
                    f"/readyz of {name} unanswered for over {READYZ_BOUND_S:.0f} s"
                    f" ({len(slow)} probes, from t={self.rel(slow[0].at):+.1f} s)"
                )
            unready = Counter(
                p.reason or str(p.status)
                for p in backend.probes
                if p.at > self.began and p.status != 200
            )
            report.readyz[name] = dict(unready)
            report.readyz_slowest[name] = max((p.seconds for p in backend.probes), default=0.0)

    async def _judge_convergence(
        self, report: Report, load: Load, db: asyncpg.Connection, end: float
    ) -> None:
        deadline = end + RECOVERY_S
        while True:
            behind = await _behind(load.watchers, self.doctors, db)
            if not behind:
                report.converged_after = self.now() - end
                report.converged_after_stop = self.now() - self.began - report.load_stopped
                return
            if self.now() > deadline:
                report.problems.append(
                    f"{len(behind)} of {len(load.watchers)} watchers not equal to the database"
                    f" {RECOVERY_S:.0f} s after the fault ended, e.g. {behind[0]}"
                )
                return
            await asyncio.sleep(0.1)

    def _judge_clients(self, report: Report, load: Load, client_log: ClientLog) -> None:
        report.codes = Counter(f"{e.code} ({e.via})" for e in load.errors)
        internal = [e for e in load.errors if e.code == "internal" or e.via == "REST 500"]
        if internal:
            first = internal[0]
            report.problems.append(
                f"`internal` seen by clients {len(internal)} times,"
                f" first at t={self.rel(first.at):+.1f} s"
                f" over {first.via}: {first.message!r}"
            )
        if load.in_doubt:
            report.problems.append(
                f"{len(load.in_doubt)} commands unanswered {SETTLE_S:.0f} s after the load"
                f" stopped, e.g. {load.in_doubt[0]}"
            )
        report.retried = dict(load.transport)
        report.reconnected = sum(1 for w in load.watchers if w.reconnects)
        report.close_codes = dict(Counter(str(w.close_code) for w in load.watchers if w.reconnects))
        report.snapshots = sum(c.resyncs for w in load.watchers for c in w.calendars.values())
        report.restore_failures = client_log.restore_failures

    def _judge_instances(self, report: Report) -> None:
        for server in self.instances:
            tracebacks = _tracebacks(server.logs())
            if tracebacks:
                kinds = Counter(tracebacks)
                worst = ", ".join(f"{k} x{n}" for k, n in kinds.most_common(3))
                report.problems.append(f"tracebacks in {server.name}'s log: {worst}")
        for exit_ in self.exits:
            if not exit_.expected:
                report.problems.append(
                    f"{exit_.name} exited by itself with code {exit_.code}"
                    f" at t={self.rel(exit_.at):+.1f} s"
                )
        report.exits = [
            f"{e.name}: {e.code} at t={self.rel(e.at):+.1f} s"
            + ("" if e.expected else " (unexpected)")
            for e in self.exits
        ]


class ClientLog(logging.Handler):
    """Counts the Python client's own word that a restore after a reconnect failed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.restore_failures: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("restore after reconnect failed"):
            self.restore_failures[message.split(": ", 1)[-1][:80]] += 1


# ---- the verdict -----------------------------------------------------------------------------


@dataclass
class Report:
    fault: str
    problems: list[str] = field(default_factory=list)
    fault_ended: float = 0.0
    load_stopped: float = 0.0
    ready_after: float | None = None
    converged_after: float | None = None
    converged_after_stop: float | None = None
    caught_up_after: float | None = None
    heard: int | None = None  # watchers that got a live update during the fault
    unready_at: float | None = None  # the balancer first saw an instance unready
    watchers_back: float | None = None  # every watcher connected and restored again
    fewest_ready: int = 0  # instances the balancer saw ready, at worst, during the fault
    pause: float = 0.0
    longest_wait: float = 0.0
    acks: int = 0
    cancels: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    retried: dict[str, int] = field(default_factory=dict)
    reconnected: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)
    snapshots: int = 0
    restore_failures: Counter[str] = field(default_factory=Counter)
    readyz: dict[str, dict[str, int]] = field(default_factory=dict)
    readyz_slowest: dict[str, float] = field(default_factory=dict)
    exits: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def secs(value: float | None) -> str:
            return "never" if value is None else f"{value:.2f} s"

        lines = [
            f"== {self.fault}: fault lasted {self.fault_ended:.2f} s;"
            f" {self.acks} bookings and {self.cancels} cancels acknowledged",
            f"   bookings paused at most {self.pause:.2f} s; longest wait for an answer"
            f" {self.longest_wait:.2f} s;"
            f" load stopped at +{self.load_stopped - self.fault_ended:.2f} s",
            f"   after the fault ended: all instances ready {secs(self.ready_after)},"
            f" every watcher back with every change committed by then {secs(self.caught_up_after)},"
            f" all equal to the database {secs(self.converged_after)}"
            f" ({secs(self.converged_after_stop)} after the load stopped)",
            f"   during the fault: first instance unready at {secs(self.unready_at)},"
            f" watchers all back at"
            f" {secs(self.watchers_back) if self.reconnected else '- (none left)'};"
            f" instances ready at worst {self.fewest_ready} of {INSTANCES};"
            f" watchers that heard a live update {self.heard if self.heard is not None else '-'}"
            f" of {WATCHERS}",
            f"   errors clients saw: {dict(self.codes) or 'none'}",
            f"   attempts retried for: {self.retried or 'nothing'}",
            f"   watchers reconnected: {self.reconnected} (close codes {self.close_codes}),"
            f" snapshots instead of resume: {self.snapshots},"
            f" restores given up: {dict(self.restore_failures) or 0}",
            f"   /readyz not 200 during and after the fault: {self.readyz};"
            f" slowest answer {max(self.readyz_slowest.values(), default=0):.2f} s",
            f"   exits: {self.exits or 'none'}",
        ]
        lines += [f"   PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)

    def assert_recovered(self) -> None:
        assert not self.problems, self.summary()


def _longest_pause(acks: list[Ack], since: float, until: float) -> float:
    """The longest time between two acknowledged bookings from the fault on."""
    times = sorted([since, *(a.at for a in acks if a.at > since), until])
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def _version(db: asyncpg.Connection, doctor_id: int) -> int:
    version: int = await db.fetchval("SELECT version FROM doctors WHERE id = $1", doctor_id)
    return version


async def _behind(
    watchers: list[FaultClient], doctors: list[SeededDoctor], db: asyncpg.Connection
) -> list[str]:
    """Each watcher whose calendars differ from the database, said in a few words."""
    truth = {}
    for doctor in doctors:
        version = await _version(db, doctor.id)
        rows = await db.fetch(
            "SELECT id, status FROM slots WHERE id = ANY($1::bigint[])",
            [s.id for s in doctor.slots],
        )
        truth[doctor.id] = (version, {r["id"]: r["status"] for r in rows})
    behind = []
    for n, watcher in enumerate(watchers):
        if not watcher.ready.is_set():
            behind.append(f"watcher {n} not ready (instance {watcher.instance})")
            continue
        for doctor_id, (version, statuses) in truth.items():
            calendar = watcher.calendars[doctor_id]
            mine = {i: s.status.value for i, s in calendar.slots.items() if i in statuses}
            if calendar.version != version or mine != statuses:
                wrong = sum(1 for i, s in statuses.items() if mine.get(i) != s)
                behind.append(
                    f"watcher {n} on {watcher.instance}: doctor {doctor_id} at v{calendar.version}"
                    f" of v{version}, {wrong} slots differ"
                )
                break
    return behind


async def _audit(
    report: Report, load: Load, db: asyncpg.Connection, doctors: list[SeededDoctor]
) -> None:
    """Lost, doubled and double-booked, asked of the database itself."""
    rows = {
        r["id"]: r
        for r in await db.fetch(
            "SELECT id, slot_id, patient_id, status FROM appointments"
            " WHERE patient_id LIKE 'booker-%'"
        )
    }
    lost, undone = [], []
    for ack in load.acks:
        row = rows.get(ack.appointment_id)
        if row is None or (row["slot_id"], row["patient_id"]) != (ack.slot_id, ack.patient):
            lost.append(ack)
        elif row["status"] != ("cancelled" if ack.appointment_id in load.cancelled else "booked"):
            undone.append(f"appointment {ack.appointment_id} is {row['status']}")
    if lost:
        report.problems.append(f"{len(lost)} acknowledged bookings lost, e.g. {lost[0]}")
    if undone:
        report.problems.append(
            f"{len(undone)} acknowledged bookings or cancels not as acknowledged: {undone[:3]}"
        )
    acked = {a.appointment_id for a in load.acks}
    unacked = [r for i, r in rows.items() if i not in acked]
    if len(unacked) > len(load.in_doubt):
        report.problems.append(
            f"{len(unacked)} bookings in the database that no acknowledgement accounts for"
            f" ({len(load.in_doubt)} commands in doubt): a retry booked twice?"
        )
    double = await db.fetch(
        "SELECT slot_id, count(*) AS n FROM appointments WHERE status <> 'cancelled'"
        " GROUP BY slot_id HAVING count(*) > 1"
    )
    overlapping = await db.fetchval(
        "SELECT count(*) FROM appointments a JOIN appointments b"
        " ON a.doctor_id = b.doctor_id AND a.id < b.id"
        " AND tstzrange(a.starts_at, a.ends_at) && tstzrange(b.starts_at, b.ends_at)"
        " WHERE a.status <> 'cancelled' AND b.status <> 'cancelled'"
    )
    if double or overlapping:
        report.problems.append(
            f"double-booked: {len(double)} slots with two active appointments,"
            f" {overlapping} overlapping pairs"
        )
    disagree = await db.fetchval(
        "SELECT count(*) FROM slots s WHERE s.doctor_id = ANY($1::int[])"
        " AND (s.status = 'busy') <> EXISTS (SELECT 1 FROM appointments a"
        " WHERE a.slot_id = s.id AND a.status = 'booked')",
        [d.id for d in doctors],
    )
    if disagree:
        report.problems.append(f"{disagree} slots whose status disagrees with their appointments")


STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \S+ ")  # a log record's first line (server/logs.py)


def _tracebacks(log_text: str) -> list[str]:
    """Each log record with a traceback: what it said, and the exception that ended it."""
    records: list[list[str]] = []
    for line in log_text.splitlines():
        if STAMPED.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    found = []
    for record in records:
        if not any(TRACEBACK in line for line in record):
            continue
        ends = [ln for ln in record[1:] if ln and not ln[0].isspace() and TRACEBACK not in ln]
        exception = re.sub(r"^[\w.]*\.(\w+:)", r"\1", ends[-1]) if ends else "?"
        said = STAMPED.sub("", record[0])
        if said.startswith(("INFO", "DEBUG")):  # nothing logs these with a traceback
            said = "uncaught, the process died"
        found.append(re.sub(r"\d+", "N", f"{said} <- {exception}")[:160])
    return found


@contextlib.asynccontextmanager
async def _connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


# ---- setting it up ---------------------------------------------------------------------------


async def seed(database_url: str) -> list[SeededDoctor]:
    async with open_store(database_url, min_size=1, max_size=2) as store:
        return [
            await seed_doctor(store, name=f"Dr. Fault {n}", days=7) for n in range(1, DOCTORS + 1)
        ]


@contextlib.asynccontextmanager
async def cluster(
    postgres: ControlledPostgres, database_url: str, workdir: Path
) -> AsyncIterator[Cluster]:
    """A fresh Redis and `INSTANCES` instances on `database_url`, stopped afterwards."""
    doctors = await seed(database_url)
    redis = RedisServer(free_port(), workdir / "redis")
    redis.workdir.mkdir()
    await asyncio.to_thread(redis.start)
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    servers = [
        ServerProcess(
            name,
            free_port(),
            {
                **env,
                **INSTANCE_ENV,
                "SLOTCAST_DATABASE_URL": database_url,
                "SLOTCAST_BROKER_URL": redis.url,
                "SLOTCAST_JWT_SECRET": JWT_SECRET,
                "SLOTCAST_INSTANCE_ID": name,
            },
            workdir / f"{name}.log",
        )
        for name in ("a", "b", "c")[:INSTANCES]
    ]
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
        yield Cluster(postgres, database_url, redis, servers, doctors)
    finally:
        postgres.thaw()  # a frozen database would hold every drain up
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
        await asyncio.to_thread(redis.stop)
