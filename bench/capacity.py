"""The capacity model's missing inputs, and its check at reduced scale (docs/capacity.md).

Why this exists: docs/capacity.md sizes a national deployment (1,000,000
connections, 100,000 doctors) from per-unit costs measured on this machine. Most
come from the other benches (KiB per connection and server µs per delivered message
from bench/fanout.py, bookings/s and PostgreSQL ms per booking from bench/booking.py).
This measures the rest, on the topology `python -m testkit.topology` starts (N
instances behind docs/haproxy.cfg, a three-master Redis Cluster, a PostgreSQL primary
and a streaming replica):

  publish   Redis CPU per SPUBLISH: --publishes messages of --payload bytes to
            --channels doctor channels, with S subscriber connections per master
            (one per instance, as Slotcast subscribes), for each S in --subscribers;
            the masters' `used_cpu_sys + used_cpu_user` (INFO) before and after, less
            their idle rate (cluster bus), divided by the publishes.
  snapshot  PostgreSQL CPU per snapshot read (a doctor's week) on the replica:
            --snapshots reads, 8 in flight, the replica's process tree CPU.

Then the check: --watchers watchers (bench/fanout.py's counting watchers, through
HAProxy) spread over --doctors doctors, bookings at --rate per second for --seconds
through HAProxy; each component's CPU over the window is predicted from the model
(docs/capacity.md, "The check") and measured:

  instances   their utime+stime;          predicted: delivered x us/msg + bookings x server ms
  Redis       masters' and replicas' INFO CPU; predicted: publishes x us/publish (measured above)
  primary     PostgreSQL primary's tree;  predicted: bookings x PostgreSQL ms per booking
  replica     the replica's tree;         (measured only: WAL replay, the lag checks)
  HAProxy     its utime+stime;            (measured only: it becomes a model input)

    .venv/bin/python -m bench.capacity --json /tmp/capacity.json

Everything shares this machine's two cores (and other engineers' jobs), so the
watchers' own CPU competes with what is measured; the report says how busy the
machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.fanout import (
    JSON,
    JWT_SECRET,
    WorkerSpec,
    _client_frame,
    _recv,
    cpu_seconds,
    drive,
    machine_jiffies,
    process_tree_cpu,
    raise_nofile,
    rss_kib,
    seed,
    started_workers,
    tree_delta,
)
from protocol.messages import Watch
from store.constants import doctor_channel
from testkit.harness import UNLIMITED, RedisCluster
from testkit.topology import Topology, topology

# Inputs taken from docs/benchmarks.md (the model's, so the prediction's):
SERVER_US_PER_MSG = (8.0, 10.5)  # fan-out, one change per write, booking share included
POSTGRES_MS_PER_BOOKING = (0.57, 0.77)  # bench/booking.py, (a) and (c) rows
SERVER_MS_PER_BOOKING = (0.39, 0.53)  # bench/booking.py, (c): the instance that books
# The model as docs/capacity.md states it after the first checks (runs 1-4 there):
# each change costs every instance with a room of that doctor ~1 ms, each member ~10 us,
# and each room's presence announcement (every 2 s) ~430 us with 4 instances.
ROOM_MS_PER_CHANGE = 1.0
MEMBER_US_PER_MSG = 10.0
PRESENCE_US_PER_ROOM_ANNOUNCEMENT = 430.0
POSTGRES_MS_PER_BOOKING_REVISED = (0.6, 2.9)
PRESENCE_EVERY_S = 2.0  # server/rooms.py


# ---- Redis -------------------------------------------------------------------------------------


def info(cluster: RedisCluster, port: int) -> dict[str, str]:
    text = cluster.command(port, "info", "everything")
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def redis_cpu(fields: dict[str, str]) -> float:
    return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])


def spublish_calls(fields: dict[str, str]) -> int:
    stat = fields.get("cmdstat_spublish", "")
    for part in stat.split(","):
        if part.startswith("calls="):
            return int(part[6:])
    return 0


def roles(cluster: RedisCluster) -> tuple[list[int], list[int]]:
    nodes = [n for n in cluster.nodes() if not n.failed]
    return [n.port for n in nodes if n.master], [n.port for n in nodes if not n.master]


def snapshot_redis(cluster: RedisCluster) -> dict[int, dict[str, str]]:
    return {port: info(cluster, port) for port in cluster.alive()}


async def _sink(port: int, channels: list[str], stop: asyncio.Event) -> None:
    """One subscriber connection, as an instance holds per master: subscribe, then discard."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # One SSUBSCRIBE per channel: channels of different slots in one command are CROSSSLOT.
    for channel in channels:
        name = channel.encode()
        writer.write(b"*2\r\n$10\r\nSSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(name), name))
    await writer.drain()
    confirmed = 0
    async with asyncio.timeout(10):
        while confirmed < len(channels):
            data = await reader.read(1 << 16)
            if not data:
                raise ConnectionError(f"redis {port} closed the subscriber")
            if data.startswith(b"-") or b"\r\n-" in data:
                raise RuntimeError(f"redis {port} refused a subscription: {data[:200]!r}")
            confirmed += data.count(b"ssubscribe")
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    if not await reader.read(1 << 16):
                        return
    finally:
        writer.close()


async def publish_cost(
    cluster: RedisCluster, subscribers: int, channels: int, publishes: int, payload: int
) -> dict[str, Any]:
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.cluster import RedisCluster as Client

    names = [doctor_channel(900_000 + i) for i in range(channels)]
    owners = cluster.owners(names)
    by_master: dict[int, list[str]] = {}
    for name, port in owners.items():
        by_master.setdefault(port, []).append(name)
    stop = asyncio.Event()
    sinks = [
        asyncio.create_task(_sink(port, chans, stop))
        for port, chans in by_master.items()
        for _ in range(subscribers)
    ]
    await asyncio.sleep(0.5)
    for sink in sinks:
        if sink.done():
            sink.result()  # a subscription refused: say so rather than measure nothing
    client = Client(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.alive()])
    data = os.urandom(payload // 2).hex().encode()
    try:
        await client.initialize()
        before = snapshot_redis(cluster)
        t0 = time.monotonic()
        gate = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with gate:
                await client.spublish(names[i % channels], data)

        await asyncio.gather(*(one(i) for i in range(publishes)))
        await asyncio.sleep(0.3)  # the last messages written out to the sinks
        wall = time.monotonic() - t0
        after = snapshot_redis(cluster)
    finally:
        stop.set()
        await asyncio.gather(*sinks, return_exceptions=True)
        await client.aclose()
    masters, replicas = roles(cluster)
    cpu_m = sum(redis_cpu(after[p]) - redis_cpu(before[p]) for p in masters)
    cpu_r = sum(redis_cpu(after[p]) - redis_cpu(before[p]) for p in replicas)
    return {
        "subscribers_per_master": subscribers,
        "channels": channels,
        "publishes": publishes,
        "payload_bytes": len(data),
        "wall_s": round(wall, 2),
        "masters_cpu_s": round(cpu_m, 3),
        "replicas_cpu_s": round(cpu_r, 3),
    }


def idle_redis_rate(cluster: RedisCluster, seconds: float) -> tuple[float, float]:
    """Cores the masters and the replicas use doing nothing (cluster bus, cron)."""
    before = snapshot_redis(cluster)
    time.sleep(seconds)
    after = snapshot_redis(cluster)
    masters, replicas = roles(cluster)
    m = sum(redis_cpu(after[p]) - redis_cpu(before[p]) for p in masters)
    r = sum(redis_cpu(after[p]) - redis_cpu(before[p]) for p in replicas)
    return m / seconds, r / seconds


async def presence_cost(topo: Topology, doctors: int, seconds: float) -> dict[str, Any]:
    """What an idle room costs: every instance re-announces each of its rooms' viewer
    counts every 2 s (server/rooms.py), and every instance with a room of that doctor
    receives each announcement. One connection per instance watches `doctors` doctors
    (no slots), so each doctor has a room on every instance; CPU of the instances and
    the Redis masters with those rooms, less the same connections watching nothing."""
    from datetime import date

    from client import SlotcastClient
    from store.doctors import create_doctor
    from store.pool import open_store

    async with open_store(topo.primary.dsn(), min_size=1, max_size=2) as store:
        ids = [
            await create_doctor(store, name=f"Dr. Presence {i}", timezone="UTC")
            for i in range(doctors)
        ]
    pids = [s.process.pid for s in topo.instances if s.process is not None]

    def sample() -> tuple[float, float, int]:
        stats = snapshot_redis(topo.cluster)
        masters, _ = roles(topo.cluster)
        return (
            sum(cpu_seconds(p) for p in pids),
            sum(redis_cpu(stats[p]) for p in masters),
            sum(spublish_calls(stats[p]) for p in masters),
        )

    async def window() -> tuple[float, float, float]:
        a = sample()
        await asyncio.sleep(seconds)
        b = sample()
        return ((b[0] - a[0]) / seconds, (b[1] - a[1]) / seconds, (b[2] - a[2]) / seconds)

    today = date.today()
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(SlotcastClient.connect(s.ws_url))
            for s in topo.instances
        ]
        quiet = await window()
        for client in clients:
            for doctor_id in ids:
                await client.watch(doctor_id, today, today + timedelta(days=1))
        await asyncio.sleep(3)  # the joins' own announcements done
        busy = await window()
    rooms = doctors * len(pids)
    receipts = busy[2] * len(pids)  # every instance has a room of every doctor
    return {
        "rooms": rooms,
        "seconds": seconds,
        "publishes_per_s": round(busy[2], 1),
        "publishes_per_s_without_rooms": round(quiet[2], 1),
        "instances_cores": [round(quiet[0], 4), round(busy[0], 4)],
        "redis_masters_cores": [round(quiet[1], 4), round(busy[1], 4)],
        "instance_us_per_receipt": round((busy[0] - quiet[0]) / max(receipts, 1) * 1e6, 2),
        "redis_us_per_publish": round((busy[1] - quiet[1]) / max(busy[2] - quiet[2], 1) * 1e6, 2),
    }


# ---- PostgreSQL --------------------------------------------------------------------------------


async def snapshot_cost(topo: Topology, doctor_id: int, first: Any, reads_n: int) -> dict[str, Any]:
    from store import reads
    from store.pool import open_store

    assert topo.standby.process is not None
    root = topo.standby.process.pid
    async with open_store(topo.standby.dsn(), min_size=8, max_size=8) as store:
        await reads.snapshot(store, doctor_id, first, first + timedelta(days=6))  # warm
        gate = asyncio.Semaphore(8)

        async def one() -> int:
            async with gate:
                snap = await reads.snapshot(store, doctor_id, first, first + timedelta(days=6))
                return len(snap.slots)

        cpu0 = process_tree_cpu([root])
        t0 = time.monotonic()
        sizes = await asyncio.gather(*(one() for _ in range(reads_n)))
        wall = time.monotonic() - t0
        cpu = tree_delta(cpu0, process_tree_cpu([root]))
    return {
        "reads": reads_n,
        "slots_per_read": sizes[0],
        "wall_s": round(wall, 2),
        "replica_cpu_s": round(cpu, 3),
        "replica_ms_per_read": round(cpu / reads_n * 1000, 3),
    }


# ---- the check ---------------------------------------------------------------------------------


def scrape_total(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def check(topo: Topology, args: argparse.Namespace, per_publish_us: float) -> dict[str, Any]:
    deadline = time.time() + 600
    per_doctor = int(args.rate / args.doctors * args.seconds) + 10
    seeded = [asyncio.run(seed(topo.primary.dsn(), per_doctor)) for _ in range(args.doctors)]
    pids = [s.process.pid for s in topo.instances if s.process is not None]
    assert topo.haproxy is not None
    assert topo.primary.process is not None
    assert topo.standby.process is not None
    rss0 = [rss_kib(p) for p in pids]
    specs = [
        WorkerSpec(
            index=i,
            targets=[("127.0.0.1", topo.lb_port, args.watchers // args.doctors)],
            codec="json",
            watch_frame=_client_frame(
                0x1, JSON.encode(Watch(doctor_id, first, first + timedelta(days=1)), 1)
            ),
            concurrency=32,
            deadline=deadline,
            sample=10**9,  # every watcher counts frames (bench/fanout.py's counting watchers)
            drain_ms=500,
        )
        for i, (doctor_id, first, _) in enumerate(seeded)
    ]
    report: dict[str, Any] = {}
    with started_workers(specs) as workers:
        hellos = [_recv(pipe, deadline) for _, pipe in workers]
        connected = sum(h["connected"] for h in hellos)
        time.sleep(1.0)
        rss1 = [rss_kib(p) for p in pids]
        report["connected"] = connected
        report["rss_kib_per_instance_before_after"] = list(zip(rss0, rss1, strict=True))
        report["kib_per_connection"] = round((sum(rss1) - sum(rss0)) / max(connected, 1), 1)
        print(f"  {connected} watchers connected", flush=True)

        def counted() -> int:
            for _, pipe in workers:
                pipe.send("count")
            return sum(sum(_recv(pipe, deadline)) for _, pipe in workers)

        roots = {
            "instances": pids,
            "haproxy": [topo.haproxy.pid],
            "primary": [topo.primary.process.pid],
            "replica": [topo.standby.process.pid],
            "watchers": [p.pid for p, _ in workers],
        }

        def sample() -> tuple[dict[str, dict[int, float]], dict[int, dict[str, str]], float]:
            return (
                {k: process_tree_cpu(v) for k, v in roots.items()},
                snapshot_redis(topo.cluster),
                cpu_seconds(os.getpid()),
            )

        # Idle: everyone connected, nothing happening.
        idle0, ridle0, _ = sample()
        time.sleep(args.idle_seconds)
        idle1, ridle1, _ = sample()
        idle = {k: tree_delta(idle0[k], idle1[k]) / args.idle_seconds for k in roots}

        # The window.
        slots = [s for group in zip(*(free for _, _, free in seeded), strict=False) for s in group]
        frames0 = counted()
        cpu0, redis0, me0 = sample()
        busy0, total0, _ = machine_jiffies()
        w0 = time.time()
        bookings = asyncio.run(drive(topo.ws_url, slots, args.rate, args.seconds, 8))
        committed = sum(1 for b in bookings if b.error is None)
        expected = committed * (args.watchers // args.doctors)
        while time.time() < w0 + args.seconds + 15 and counted() - frames0 < expected:
            time.sleep(0.2)
        w1 = time.time()
        delivered = counted() - frames0
        cpu1, redis1, me1 = sample()
        busy1, total1, _ = machine_jiffies()
    window = w1 - w0
    cores = {k: tree_delta(cpu0[k], cpu1[k]) / window for k in roots}
    masters, replicas = roles(topo.cluster)
    rcpu = {
        "masters": sum(redis_cpu(redis1[p]) - redis_cpu(redis0[p]) for p in masters) / window,
        "replicas": sum(redis_cpu(redis1[p]) - redis_cpu(redis0[p]) for p in replicas) / window,
    }
    ridle = {
        "masters": sum(redis_cpu(ridle1[p]) - redis_cpu(ridle0[p]) for p in masters)
        / args.idle_seconds,
        "replicas": sum(redis_cpu(ridle1[p]) - redis_cpu(ridle0[p]) for p in replicas)
        / args.idle_seconds,
    }
    publishes = sum(spublish_calls(redis1[p]) - spublish_calls(redis0[p]) for p in masters)
    net_in = sum(
        int(redis1[p]["total_net_input_bytes"]) - int(redis0[p]["total_net_input_bytes"])
        for p in masters
    )
    errors: dict[str, int] = {}
    for b in bookings:
        if b.error:
            errors[b.error] = errors.get(b.error, 0) + 1
    bps = committed / window
    mps = delivered / window
    # The model's prediction, per component, in cores over the window (idle added).
    predicted = {
        "instances": [
            idle["instances"] + mps * us / 1e6 + bps * ms / 1e3
            for us, ms in zip(SERVER_US_PER_MSG, SERVER_MS_PER_BOOKING, strict=True)
        ],
        "redis_masters": ridle["masters"] + publishes / window * per_publish_us / 1e6,
        "primary": [idle["primary"] + bps * ms / 1e3 for ms in POSTGRES_MS_PER_BOOKING],
    }
    # Every doctor has a room on every instance here (watchers spread by HAProxy).
    rooms = args.doctors * len(pids)
    changes_per_doctor = bps / args.doctors
    revised = {
        "instances": idle["instances"]
        + rooms * changes_per_doctor * ROOM_MS_PER_CHANGE / 1e3
        + mps * MEMBER_US_PER_MSG / 1e6
        + bps * sum(SERVER_MS_PER_BOOKING) / 2 / 1e3
        + rooms / PRESENCE_EVERY_S * PRESENCE_US_PER_ROOM_ANNOUNCEMENT / 1e6,
        "primary": [idle["primary"] + bps * ms / 1e3 for ms in POSTGRES_MS_PER_BOOKING_REVISED],
    }
    report.update(
        {
            "window_s": round(window, 2),
            "bookings_committed": committed,
            "booking_errors": errors,
            "bookings_per_s": round(bps, 2),
            "delivered": delivered,
            "expected": expected,
            "delivered_per_s": round(mps, 1),
            "publishes": publishes,
            "publish_bytes_avg": round(net_in / max(publishes, 1)),
            "idle_cores": {k: round(v, 4) for k, v in {**idle, **ridle}.items()},
            "measured_cores": {k: round(v, 4) for k, v in {**cores, **rcpu}.items()},
            "driver_cores": round((me1 - me0) / window, 4),
            "machine_busy_cores": round((busy1 - busy0) / (total1 - total0) * os.cpu_count(), 3)
            if os.cpu_count()
            else None,
            "predicted_cores": predicted,
            "predicted_cores_revised_model": revised,
            "measured_server_us_per_msg": round(
                (cores["instances"] - idle["instances"]) / max(mps, 1) * 1e6, 2
            ),
            "measured_primary_ms_per_booking": round(
                (cores["primary"] - idle["primary"]) / max(bps, 1e-9) * 1e3, 3
            ),
            "measured_redis_us_per_publish": round(
                (rcpu["masters"] - ridle["masters"]) / max(publishes / window, 1e-9) * 1e6, 2
            ),
            "measured_haproxy_us_per_msg": round(
                (cores["haproxy"] - idle["haproxy"]) / max(mps, 1) * 1e6, 2
            ),
        }
    )
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--publishes", type=int, default=20_000)
    p.add_argument("--channels", type=int, default=60)
    p.add_argument("--payload", type=int, default=600, help="bytes per published message")
    p.add_argument("--subscribers", default="1,4", help="subscriber connections per master")
    p.add_argument("--snapshots", type=int, default=2_000)
    p.add_argument("--watchers", type=int, default=2_000)
    p.add_argument("--doctors", type=int, default=4, help="one watcher process each")
    p.add_argument("--rate", type=float, default=20.0, help="bookings per second, all doctors")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--idle-seconds", type=float, default=5.0)
    p.add_argument("--presence-doctors", type=int, default=250, help="0: skip presence")
    p.add_argument("--inputs-only", action="store_true", help="publish and snapshot only")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    raise_nofile()
    env = {
        **UNLIMITED,
        "SLOTCAST_JWT_SECRET": JWT_SECRET,
        "SLOTCAST_LOG_LEVEL": "WARNING",
        "SLOTCAST_MAX_ACTIVE_PER_DOCTOR": "1000000",
        "SLOTCAST_MAX_ACTIVE_TOTAL": "1000000",
        "SLOTCAST_MAX_WATCHES": str(max(32, args.presence_doctors)),
    }
    out: dict[str, Any] = {"host": socket.gethostname(), "started": time.strftime("%FT%TZ")}
    print(f"starting the topology: {args.instances} instances …", flush=True)
    with topology(args.instances, env=env, demo=False) as topo:
        print(topo.describe(), flush=True)
        idle_m, idle_r = idle_redis_rate(topo.cluster, args.idle_seconds)
        out["redis_idle_cores"] = {"masters": round(idle_m, 4), "replicas": round(idle_r, 4)}
        out["publish"] = []
        for s in (int(x) for x in args.subscribers.split(",")):
            r = asyncio.run(
                publish_cost(topo.cluster, s, args.channels, args.publishes, args.payload)
            )
            busy_m = r["masters_cpu_s"] - idle_m * r["wall_s"]
            busy_r = r["replicas_cpu_s"] - idle_r * r["wall_s"]
            r["masters_us_per_publish"] = round(busy_m / r["publishes"] * 1e6, 2)
            r["replicas_us_per_publish"] = round(busy_r / r["publishes"] * 1e6, 2)
            print(f"  publish: {r}", flush=True)
            out["publish"].append(r)
        doctor_id, first, _ = asyncio.run(seed(topo.primary.dsn(), 10))
        out["snapshot"] = asyncio.run(snapshot_cost(topo, doctor_id, first, args.snapshots))
        print(f"  snapshot: {out['snapshot']}", flush=True)
        if args.presence_doctors:
            out["presence"] = asyncio.run(
                presence_cost(topo, args.presence_doctors, max(args.idle_seconds, 10.0))
            )
            print(f"  presence: {out['presence']}", flush=True)
        if args.inputs_only:
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
            return 0
        # The check's instances subscribe each doctor once per instance: S = instances.
        nearest = min(out["publish"], key=lambda r: abs(r["subscribers_per_master"] - 4))
        out["check"] = check(topo, args, nearest["masters_us_per_publish"])
        print(json.dumps(out["check"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
