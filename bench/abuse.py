"""Hostile neighbours: ordinary clients alone, then again while attackers run (issue 10).

Two `slotcast serve` instances share one PostgreSQL and one Redis. The ordinary
load is `--watchers` patients watching a week of one of `--doctors` doctors and
`--bookers` patients each booking (then cancelling) a slot of their own once a
second, every one with its own token, spread over 50 client addresses (sent as
`X-Forwarded-For`, which the instances trust from loopback, as they would behind
HAProxy). It runs `--seconds` quiet, then `--seconds` beside the attackers below
(each from an address of its own), `--pairs` times in turn, pooled so that a
shared machine's hiccups weigh on both:

- pipeliners: raw sockets that upgrade, then send `watch` frames for 62 days as
  fast as they can and never read;
- a command flood: one identity on 4 connections sending `search_doctors`
  back to back;
- a connection flood: up to `--flood` anonymous sockets that upgrade and idle;
- slowloris: `--slowloris` sockets that send a header line every 5 s and never
  finish the request;
- a failed sign-in storm: bad tokens over REST, and `auth` frames with bad
  tokens on one socket.

It prints, side by side, the ordinary clients' p99 command latency and
send->delta latency (and their ratio to the quiet run), their errors (any error
counts: the target is 0), each server's RSS peak, and how each attacker was
refused or closed. Targets (issue 10): ordinary p99 <= 2x quiet, RSS <= quiet +
64 MiB, 0 ordinary errors.

Usage
  .venv/bin/python bench/abuse.py                      # starts its own PostgreSQL and Redis
  .venv/bin/python bench/abuse.py --seconds 30 --watchers 500 --bookers 50
  .venv/bin/python bench/abuse.py --database-url postgresql://… --redis-url redis://…

The load generator and the attackers share the machine with the servers (2 cores
here): the quiet run is the baseline measured the same way, so compare ratios.
The attackers' process runs at a lower CPU priority (`--attacker-nice`, 10 by
default): a real attacker's CPU is not the server's, and on two shared cores an
attacker at full priority measures the machine as much as the server.
`--attacker-nice 0` gives them the same priority as everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import random
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `testkit` is not an installed package

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402

from client import ClientError, SlotcastClient  # noqa: E402
from protocol.codec import JSON  # noqa: E402
from protocol.messages import Delta  # noqa: E402
from protocol.vocabulary import Role  # noqa: E402
from server import auth  # noqa: E402
from store import commands, doctors  # noqa: E402
from store.migrate import migrate  # noqa: E402
from store.pool import open_store  # noqa: E402
from store.schedule import Block  # noqa: E402
from testkit.harness import (  # noqa: E402
    ServerProcess,
    free_port,
    postgres_server,
    redis_server,
    with_database,
)

SECRET = "bench-abuse-secret-that-is-long-enough-for-hs256"
ADDRESSES = [f"10.20.{n // 250}.{n % 250 + 1}" for n in range(50)]  # ordinary clients' NATs


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def patient_token(subject: str) -> str:
    return auth.issue(SECRET, subject=subject, role=Role.PATIENT)


# ---- the topology -------------------------------------------------------------------------------


@dataclass
class Topology:
    dsn: str
    servers: list[ServerProcess]
    doctor_ids: list[int]


@contextlib.contextmanager
def services(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    with contextlib.ExitStack() as stack:
        admin = args.database_url or stack.enter_context(postgres_server())
        redis = args.redis_url or stack.enter_context(redis_server())[0]
        yield admin, redis


async def seed(admin_dsn: str, count: int) -> tuple[str, list[int]]:
    """A fresh database with `count` doctors open every day, round the clock, for a week."""
    name = f"bench_abuse_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, name)
    await migrate(dsn)
    week = [Block(day, clock(0, 0), clock(23, 59)) for day in range(1, 8)]
    ids = []
    async with open_store(dsn, min_size=1, max_size=2) as store:
        for n in range(count):
            doctor_id = await doctors.create_doctor(
                store,
                name=f"Dr Bench {n}",
                timezone="UTC",
                slot_minutes=15,
                horizon_days=7,
                schedule=week,
            )
            await commands.materialize_slots(store, doctor_id)
            ids.append(doctor_id)
    return dsn, ids


@contextlib.contextmanager
def instances(
    dsn: str, redis: str, count: int, logs: Path, extra_env: dict[str, str]
) -> Iterator[list[ServerProcess]]:
    servers = []
    try:
        for n in range(count):
            env = {
                **os.environ,
                "SLOTCAST_DATABASE_URL": dsn,
                "SLOTCAST_BROKER_URL": redis,
                "SLOTCAST_JWT_SECRET": SECRET,
                "SLOTCAST_INSTANCE_ID": f"i{n + 1}",
                "SLOTCAST_TRUSTED_PROXIES": "127.0.0.1",
                "SLOTCAST_LOG_LEVEL": "WARNING",
                **extra_env,
            }
            server = ServerProcess(f"i{n + 1}", free_port(), env, logs / f"i{n + 1}.log")
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.stop()


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def sample_rss(
    servers: list[ServerProcess], peaks: dict[str, int], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        for server in servers:
            assert server.process is not None
            peaks[server.name] = max(peaks.get(server.name, 0), rss_kib(server.process.pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


class Gate:
    """Everyone starts together: each client arrives once connected (or failed); the owner
    says go once every client process has arrived."""

    def __init__(self, parties: int) -> None:
        self.waiting = parties
        self.arrived = asyncio.Event()
        self.go = asyncio.Event()
        if parties <= 0:
            self.arrived.set()

    def arrive(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.arrived.set()


# ---- the ordinary load --------------------------------------------------------------------------


@dataclass
class Ordinary:
    command_ms: list[float] = field(default_factory=list)
    delta_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)  # transient, retried as clients do
    sent_at: dict[int, float] = field(default_factory=dict)  # slot id -> book sent (monotonic)
    bookings: int = 0


@contextlib.asynccontextmanager
async def http_as(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"X-Forwarded-For": address}) as http:
        yield http


async def watcher(
    n: int, url: str, doctor_id: int, out: Ordinary, ready: Gate, stop: asyncio.Event
) -> None:
    today = datetime.now(UTC).date()
    try:
        async with (
            http_as(ADDRESSES[n % len(ADDRESSES)]) as http,
            SlotcastClient.connect(url, token=patient_token(f"w{n}"), session=http) as client,
        ):
            for attempt in range(20):  # as a page does: `unavailable` is retried, jittered
                try:
                    await client.watch(doctor_id, today, today + timedelta(days=7))
                    break
                except ClientError as exc:
                    if exc.code != "unavailable" or attempt == 19:
                        raise
                    out.retried[f"watch {exc.code}"] += 1
                    await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))
            ready.arrive()
            await ready.go.wait()
            seen: dict[int, float] = {}  # slot -> the booking whose delta was timed
            while not stop.is_set():
                try:
                    delta: Delta = await client.next_delta(timeout=0.5)
                except TimeoutError:
                    continue
                now = time.monotonic()
                for slot in delta.slots:
                    # The first delta after a booking was sent, whatever it says: a watcher
                    # that fell behind gets booking and cancel merged into one (`since`).
                    sent = out.sent_at.get(slot.id)
                    if sent is not None and seen.get(slot.id) != sent:
                        seen[slot.id] = sent
                        out.delta_ms.append((now - sent) * 1000)
    except ClientError as exc:
        out.errors[f"watcher {exc.code}"] += 1
    except (aiohttp.ClientError, OSError) as exc:
        out.errors[f"watcher {type(exc).__name__}"] += 1
    finally:
        if not ready.go.is_set():
            ready.arrive()


async def booker(
    n: int,
    url: str,
    slot_ids: list[int],
    out: Ordinary,
    ready: Gate,
    stop: asyncio.Event,
    rate: float,
) -> None:
    # New in every phase: the same key again would replay, not book; and a patient of
    # its own, since one that books and cancels every second for minutes on end spends
    # the 300 writes per 15 minutes an identity may make, which no patient does.
    tag = uuid.uuid4().hex[:8]
    try:
        async with (
            http_as(ADDRESSES[n % len(ADDRESSES)]) as http,
            SlotcastClient.connect(url, token=patient_token(f"b{n}-{tag}"), session=http) as client,
        ):
            ready.arrive()
            await ready.go.wait()
            await asyncio.sleep(random.random() / rate)
            for slot_id in slot_ids:
                if stop.is_set():
                    break
                started = time.monotonic()
                out.sent_at[slot_id] = started
                try:
                    booked = await client.book(slot_id, idempotency_key=f"{tag}-b{n}-{slot_id}")
                    out.command_ms.append((time.monotonic() - started) * 1000)
                    began = time.monotonic()
                    await client.cancel(booked.id, "bench", idempotency_key=f"{tag}-c{n}-{slot_id}")
                    out.command_ms.append((time.monotonic() - began) * 1000)
                    out.bookings += 1
                except ClientError as exc:
                    out.errors[f"booker {exc.code}"] += 1
                elapsed = time.monotonic() - started
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, 1 / rate - elapsed))
    except (aiohttp.ClientError, OSError) as exc:
        out.errors[f"booker {type(exc).__name__}"] += 1
    finally:
        if not ready.go.is_set():
            ready.arrive()


async def free_slots(url: str, doctor_ids: list[int]) -> dict[int, list[int]]:
    today = datetime.now(UTC).date()
    found: dict[int, list[int]] = {}
    async with http_as("10.99.0.1") as http:
        for doctor_id in doctor_ids:
            async with http.get(
                f"{url}/api/doctors/{doctor_id}/slots",
                params={
                    "start": str(today + timedelta(days=1)),
                    "end": str(today + timedelta(days=3)),
                },
            ) as response:
                body = await response.json()
            found[doctor_id] = [s["id"] for s in body["slots"] if s["status"] == "free"]
    return found


# ---- the attackers ------------------------------------------------------------------------------


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (RFC 6455 5.2), built by hand: a library would read for us."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def raw_upgrade(
    port: int, address: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Open a WebSocket by hand; returns the HTTP status of the upgrade."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {JSON.subprotocol}\r\nX-Forwarded-For: {address}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/") else 0
    while await asyncio.wait_for(reader.readline(), 10) not in (b"\r\n", b""):
        pass
    return reader, writer, status


async def close_code(reader: asyncio.StreamReader, timeout: float) -> int | str:
    """Read to the end (what the server queued for us) and return its close code, if any."""
    code: int | str = "open"
    deadline = time.monotonic() + timeout
    buffered = b""
    try:
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(1 << 16), deadline - time.monotonic())
            if not chunk:
                return code if code != "open" else "eof"
            buffered = (buffered + chunk)[-4096:]
            at = buffered.rfind(b"\x88")
            if at >= 0 and at + 4 <= len(buffered):
                code = struct.unpack("!H", buffered[at + 2 : at + 4])[0]
    except TimeoutError:
        return code
    except (ConnectionError, OSError):
        return "reset"
    return code


async def pipeliner(port: int, doctor_id: int, frames: int, report: Counter[str]) -> None:
    today = datetime.now(UTC).date()
    try:
        reader, writer, status = await raw_upgrade(port, "198.51.100.1")
    except (OSError, TimeoutError) as exc:
        report[f"upgrade failed: {type(exc).__name__}"] += 1
        return
    if status != 101:
        report[f"refused HTTP {status}"] += 1
        writer.close()
        return
    sent = 0
    try:
        for n in range(frames):
            body = {
                "doctor_id": doctor_id,
                "start": str(today),
                "end": str(today + timedelta(days=62)),
            }
            writer.write(ws_frame(orjson.dumps({"type": "watch", "id": n, "body": body})))
            sent += 1
            if n % 50 == 0:
                await asyncio.wait_for(writer.drain(), 2)
    except (ConnectionError, OSError, TimeoutError):
        pass
    report["frames sent"] += sent
    report[f"closed: {await close_code(reader, 8)}"] += 1
    writer.close()


async def command_flood(url: str, stop: asyncio.Event, report: Counter[str]) -> None:
    async def one() -> None:
        try:
            async with (
                http_as("198.51.100.2") as http,
                SlotcastClient.connect(url, token=patient_token("flooder"), session=http) as client,
            ):
                while not stop.is_set():
                    try:
                        await client.search_doctors()
                        report["ok"] += 1
                    except ClientError as exc:
                        if client.close_code is not None:
                            break  # the server closed us
                        report[exc.code] += 1
                    except (aiohttp.ClientError, OSError):
                        break
                    await asyncio.sleep(0)  # a refusal can come back without a pause
                closed = client.close_code
                report["open at the end" if closed is None else f"closed {closed}"] += 1
        except (aiohttp.ClientError, OSError, ClientError) as exc:
            report[f"connection ended: {type(exc).__name__}"] += 1

    await asyncio.gather(*(one() for _ in range(4)))


async def connection_flood(
    port: int, count: int, stop: asyncio.Event, report: Counter[str]
) -> None:
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(count):
        if stop.is_set():
            break
        try:
            reader, writer, status = await raw_upgrade(port, "198.51.100.3")
        except (OSError, TimeoutError) as exc:
            report[f"failed: {type(exc).__name__}"] += 1
            continue
        report[f"HTTP {status}"] += 1
        if status == 101:
            held.append((reader, writer))
        else:
            writer.close()
    await stop.wait()
    for reader, writer in held:
        try:
            data = await asyncio.wait_for(reader.read(4096), 0.05)
            closed = data == b"" or b"\x88" in data  # EOF, or a close frame (4009: idle)
        except TimeoutError:
            closed = False
        except (ConnectionError, OSError):
            closed = True
        report["closed by server" if closed else "still open"] += 1
        writer.close()


async def slowloris(port: int, count: int, stop: asyncio.Event, report: Counter[str]) -> None:
    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            report["connect failed"] += 1
            return
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: 198.51.100.4\r\n"
        )
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 5)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                if reader.at_eof():
                    break
            data = await asyncio.wait_for(reader.read(1024), 0.5)
            report[
                "closed by server"
                if data == b"" or data.startswith(b"HTTP/1.1 4")
                else "still open"
            ] += 1
        except (ConnectionError, OSError):
            report["closed by server"] += 1
        except TimeoutError:
            report["still open"] += 1
        writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


async def sign_in_storm(url: str, port: int, tries: int, report: Counter[str]) -> None:
    async with http_as("198.51.100.5") as http:
        for n in range(tries):
            async with http.get(
                f"{url}/api/me/appointments", headers={"Authorization": f"Bearer bad.{n}.token"}
            ) as response:
                report[f"REST {response.status}"] += 1
    try:
        reader, writer, _ = await raw_upgrade(port, "198.51.100.6")
    except (OSError, TimeoutError):
        report["WS upgrade failed"] += 1
        return
    try:
        for n in range(tries):
            writer.write(
                ws_frame(orjson.dumps({"type": "auth", "id": n, "body": {"token": f"bad.{n}"}}))
            )
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    refusals = Counter[str]()
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 2):  # until 2 s of quiet
            data += chunk
    for code in ("token_invalid", "rate_limited"):
        refusals[code] = data.count(code.encode())
    refusals["closed"] = int(reader.at_eof())
    report.update({f"WS auth {k}": v for k, v in refusals.items()})
    writer.close()


@dataclass(frozen=True)
class Target:
    port: int  # the attacked instance
    ws_url: str
    doctor_id: int


def run_attackers(target: Target, options: dict[str, Any]) -> dict[str, Counter[str]]:
    """Every attacker at once for `seconds`, in a process of its own (see `phase`)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_attack_in_process, (target, options))


def _attack_in_process(target: Target, options: dict[str, Any]) -> dict[str, Counter[str]]:
    os.nice(options["attacker_nice"])
    return asyncio.run(_attack(target, argparse.Namespace(**options)))


async def _attack(target: Target, args: argparse.Namespace) -> dict[str, Counter[str]]:
    names = ("pipeliners", "command flood", "connection flood", "slowloris", "sign-in storm")
    report = {name: Counter[str]() for name in names}
    stop = asyncio.Event()
    http_url = f"http://127.0.0.1:{target.port}"
    tasks = [
        *(
            asyncio.create_task(
                pipeliner(target.port, target.doctor_id, args.pipeline_frames, report["pipeliners"])
            )
            for _ in range(args.pipeliners)
        ),
        asyncio.create_task(command_flood(target.ws_url, stop, report["command flood"])),
        asyncio.create_task(
            connection_flood(target.port, args.flood, stop, report["connection flood"])
        ),
        asyncio.create_task(slowloris(target.port, args.slowloris, stop, report["slowloris"])),
        asyncio.create_task(
            sign_in_storm(http_url, target.port, args.bad_auth, report["sign-in storm"])
        ),
    ]
    await asyncio.sleep(args.seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return report


# ---- a phase: the ordinary load, maybe beside the attackers -------------------------------------


@dataclass
class Phase:
    ordinary: Ordinary
    rss_peak_kib: dict[str, int]
    attackers: dict[str, Counter[str]]


@dataclass(frozen=True)
class Share:
    """One client process's part of the ordinary load: some doctors, with their watchers and
    bookers, so that a booking and the deltas it causes are timed by one process's clock."""

    watchers: list[tuple[int, str, int]]  # (n, instance url, doctor id)
    bookers: list[tuple[int, str, list[int]]]  # (n, instance url, the slots it books in turn)


def shares(args: argparse.Namespace, top: Topology, slots: dict[int, list[int]]) -> list[Share]:
    """The ordinary load cut into `--client-procs` shares by doctor."""
    procs = min(args.client_procs, len(top.doctor_ids))
    urls = [s.ws_url for s in top.servers]
    owner = {d: i % procs for i, d in enumerate(top.doctor_ids)}
    watchers: list[list[tuple[int, str, int]]] = [[] for _ in range(procs)]
    for n in range(args.watchers):
        doctor_id = top.doctor_ids[n % len(top.doctor_ids)]
        watchers[owner[doctor_id]].append((n, urls[n % len(urls)], doctor_id))
    bookers: list[list[tuple[int, str, list[int]]]] = [[] for _ in range(procs)]
    for k in range(procs):
        # Each booker takes every `count`-th free slot of its share: no two ordinary bookers race.
        mine = [s for d, ids in slots.items() if owner[d] == k for s in ids]
        ns = [n for n in range(args.bookers) if n % procs == k]
        for j, n in enumerate(ns):
            bookers[k].append((n, urls[n % len(urls)], mine[j :: len(ns)]))
    return [Share(w, b) for w, b in zip(watchers, bookers, strict=True)]


def _ordinary_in_process(share: Share, options: dict[str, Any], ready: Any, start: Any) -> Ordinary:
    return asyncio.run(_ordinary(share, argparse.Namespace(**options), ready, start))


async def _ordinary(share: Share, args: argparse.Namespace, ready_q: Any, start: Any) -> Ordinary:
    out = Ordinary()
    stop = asyncio.Event()
    gate = Gate(len(share.watchers) + len(share.bookers))
    tasks = [
        asyncio.create_task(watcher(n, url, doctor_id, out, gate, stop))
        for n, url, doctor_id in share.watchers
    ]
    tasks += [
        asyncio.create_task(booker(n, url, ids, out, gate, stop, args.rate))
        for n, url, ids in share.bookers
    ]
    await asyncio.wait_for(gate.arrived.wait(), 120)
    ready_q.put(True)
    await asyncio.to_thread(start.wait)
    gate.go.set()
    await asyncio.sleep(args.seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    out.sent_at.clear()  # only this process's clock can read them
    return out


@dataclass
class Clients:
    """The client processes, started once for the whole run (spawning is slow), and the
    manager whose queue and events let them start each phase together."""

    pool: concurrent.futures.ProcessPoolExecutor
    manager: Any


async def phase(
    args: argparse.Namespace,
    top: Topology,
    slots: dict[int, list[int]],
    attack: bool,
    clients: Clients,
) -> Phase:
    loop = asyncio.get_running_loop()
    rss_stop = asyncio.Event()
    peaks: dict[str, int] = {}
    sampler = asyncio.create_task(sample_rss(top.servers, peaks, rss_stop))
    ready, start = clients.manager.Queue(), clients.manager.Event()
    parts = shares(args, top, slots)
    running = [
        loop.run_in_executor(clients.pool, _ordinary_in_process, part, vars(args), ready, start)
        for part in parts
    ]
    for _ in parts:
        await asyncio.to_thread(ready.get, True, 180)
    attackers: dict[str, Counter[str]] = {}
    attacking: asyncio.Future[dict[str, Counter[str]]] | None = None
    if attack:
        # In a process of their own: attackers sharing the ordinary clients' event loop
        # would delay the very timers that measure those clients.
        target = Target(top.servers[0].port, top.servers[0].ws_url, top.doctor_ids[0])
        attacking = loop.run_in_executor(None, run_attackers, target, vars(args))
    start.set()
    out = Ordinary()
    for part_out in await asyncio.gather(*running):
        out.command_ms += part_out.command_ms
        out.delta_ms += part_out.delta_ms
        out.errors.update(part_out.errors)
        out.retried.update(part_out.retried)
        out.bookings += part_out.bookings
    if attacking is not None:
        attackers = await attacking
    rss_stop.set()
    await sampler
    return Phase(out, peaks, attackers)


def report(quiet: Phase, loud: Phase) -> None:
    def p99(values: list[float]) -> float:
        return percentile(values, 99)

    rows = [
        (
            "command p50 ms",
            percentile(quiet.ordinary.command_ms, 50),
            percentile(loud.ordinary.command_ms, 50),
        ),
        ("command p99 ms", p99(quiet.ordinary.command_ms), p99(loud.ordinary.command_ms)),
        (
            "send->delta p50 ms",
            percentile(quiet.ordinary.delta_ms, 50),
            percentile(loud.ordinary.delta_ms, 50),
        ),
        ("send->delta p99 ms", p99(quiet.ordinary.delta_ms), p99(loud.ordinary.delta_ms)),
        ("bookings", quiet.ordinary.bookings, loud.ordinary.bookings),
        (
            "ordinary errors",
            sum(quiet.ordinary.errors.values()),
            sum(loud.ordinary.errors.values()),
        ),
    ]
    for name in sorted(quiet.rss_peak_kib):
        rows.append(
            (
                f"RSS peak {name} MiB",
                quiet.rss_peak_kib[name] / 1024,
                loud.rss_peak_kib.get(name, 0) / 1024,
            )
        )
    print("\n| figure | quiet | under attack | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        ratio = f"{b / a:.2f}" if isinstance(a, float) and a and not math.isnan(a) else "-"
        print(
            f"| {name} | {a:.1f} | {b:.1f} | {ratio} |"
            if isinstance(a, float)
            else f"| {name} | {a} | {b} | - |"
        )
    for what, phase_ in (("quiet", quiet), ("under attack", loud)):
        if phase_.ordinary.errors:
            print(f"ordinary errors ({what}): {dict(phase_.ordinary.errors)}")
        if phase_.ordinary.retried:
            print(f"retried, then served ({what}): {dict(phase_.ordinary.retried)}")
    print("\n| attacker | outcome |\n|---|---|")
    for name, outcome in loud.attackers.items():
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(outcome.items()))
        print(f"| {name} | {seen or 'nothing'} |")
    worst = max(
        p99(loud.ordinary.command_ms) / p99(quiet.ordinary.command_ms),
        p99(loud.ordinary.delta_ms) / p99(quiet.ordinary.delta_ms),
    )
    growth = max(loud.rss_peak_kib[n] - quiet.rss_peak_kib[n] for n in quiet.rss_peak_kib) / 1024
    errors = sum(loud.ordinary.errors.values())
    print(
        f"\ntargets: p99 ratio {worst:.2f} (<= 2: {'met' if worst <= 2 else 'MISSED'}); "
        f"RSS growth {growth:.1f} MiB (<= 64: {'met' if growth <= 64 else 'MISSED'}); "
        f"ordinary errors {errors} (0: {'met' if errors == 0 else 'MISSED'})"
    )


async def run(args: argparse.Namespace, admin_dsn: str, redis: str) -> None:
    dsn, doctor_ids = await seed(admin_dsn, args.doctors)
    logs = Path(tempfile.mkdtemp(prefix="slotcast-bench-abuse-"))
    extra = dict(item.split("=", 1) for item in args.server_env)
    with instances(dsn, redis, args.instances, logs, extra) as servers:
        top = Topology(dsn, servers, doctor_ids)
        slots = await free_slots(servers[0].http_url, doctor_ids)
        print(f"instance settings beyond the defaults: {extra}")
        print(
            f"{args.instances} instances (logs in {logs}), {args.doctors} doctors, "
            f"{sum(map(len, slots.values()))} free slots; {args.watchers} watchers, "
            f"{args.bookers} bookers at {args.rate}/s each, {args.seconds:.0f} s per phase",
            flush=True,
        )
        ctx = multiprocessing.get_context("spawn")
        with (
            concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=ctx) as pool,
            ctx.Manager() as manager,
        ):
            quiets, louds = await pairs(args, top, slots, Clients(pool, manager))
        if args.pairs > 1:
            for n, (q, loud) in enumerate(zip(quiets, louds, strict=True)):
                print(
                    f"pair {n + 1}: command p99 {p99_of(q, 'command_ms'):.1f} -> "
                    f"{p99_of(loud, 'command_ms'):.1f} ms, send->delta p99 "
                    f"{p99_of(q, 'delta_ms'):.1f} -> {p99_of(loud, 'delta_ms'):.1f} ms"
                )
        report(pooled(quiets), pooled(louds))


async def pairs(
    args: argparse.Namespace, top: Topology, slots: dict[int, list[int]], clients: Clients
) -> tuple[list[Phase], list[Phase]]:
    if args.warmup:  # caches, pools and connections warm before anything is measured
        warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
        await phase(warm, top, slots, False, clients)
        print("warm-up done", flush=True)
    quiets, louds = [], []
    for n in range(args.pairs):
        quiets.append(await phase(args, top, slots, False, clients))
        print(f"quiet phase {n + 1} done", flush=True)
        louds.append(await phase(args, top, slots, True, clients))
        print(f"attacked phase {n + 1} done", flush=True)
        if n + 1 < args.pairs:
            await asyncio.sleep(args.settle)  # the attackers' leftovers closed by the server
    return quiets, louds


def p99_of(phase_: Phase, figure: str) -> float:
    return percentile(getattr(phase_.ordinary, figure), 99)


def pooled(phases: list[Phase]) -> Phase:
    """Several phases of one kind as one: their latencies together, their peaks' peak."""
    out = Ordinary()
    peaks: dict[str, int] = {}
    attackers: dict[str, Counter[str]] = {}
    for p in phases:
        out.command_ms += p.ordinary.command_ms
        out.delta_ms += p.ordinary.delta_ms
        out.errors.update(p.ordinary.errors)
        out.retried.update(p.ordinary.retried)
        out.bookings += p.ordinary.bookings
        for name, kib in p.rss_peak_kib.items():
            peaks[name] = max(peaks.get(name, 0), kib)
        for name, seen in p.attackers.items():
            attackers.setdefault(name, Counter()).update(seen)
    return Phase(out, peaks, attackers)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--watchers", type=int, default=500)
    p.add_argument("--bookers", type=int, default=50)
    p.add_argument("--rate", type=float, default=1.0, help="bookings per second per booker")
    p.add_argument("--doctors", type=int, default=10)
    p.add_argument(
        "--client-procs",
        type=int,
        default=4,
        help="processes the ordinary clients are spread over, by doctor (one event loop for"
        " 550 clients measures its own lag as much as the server's)",
    )
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=8.0, help="an unmeasured quiet phase first")
    p.add_argument("--pipeliners", type=int, default=8)
    p.add_argument("--pipeline-frames", type=int, default=1000)
    p.add_argument("--flood", type=int, default=2000, help="anonymous sockets from one address")
    p.add_argument("--slowloris", type=int, default=300)
    p.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="quiet and attacked phases, alternated this many times and pooled "
        "(a shared machine's hiccups then weigh on both alike)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=12.0,
        help="seconds after an attacked phase before the next quiet one",
    )
    p.add_argument(
        "--attacker-nice",
        type=int,
        default=10,
        help="CPU niceness of the attackers' process (0: the same priority as the servers)",
    )
    p.add_argument(
        "--bad-auth", type=int, default=1000, help="failed sign-ins, REST and WebSocket each"
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=["SLOTCAST_IDLE_ANONYMOUS_S=10"],
        metavar="KEY=VALUE",
        help="a setting for the instances (default: idle anonymous sockets closed after 10 s,"
        " so that it shows within a phase; the product's default is 60 s)",
    )
    p.add_argument("--database-url")
    p.add_argument("--redis-url")
    args = p.parse_args()
    with services(args) as (admin_dsn, redis):
        asyncio.run(run(args, admin_dsn, redis))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
