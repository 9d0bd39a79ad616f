"""Memory per connection: what one instance's RSS grows by per watcher, and where it goes.

Why this exists: issue 14 asks for ≤ 10 KiB of server memory per connection that
watches one doctor (Socket.IO: 13-17 KiB at scale), at 10,000 and at 50,000
connections. RSS says how much; it takes a census to say what.

Setup
  Throwaway PostgreSQL and Redis (as bench/fanout.py), one doctor, ONE `slotcast
  serve` instance started with SLOTCAST_DEBUG_MEMORY=1, which serves
  GET /debug/memory (server/memory.py) and nothing else differently. --watchers N
  raw WebSocket watchers (bench/fanout.py's counting watchers, spread over
  --client-procs processes and --sources loopback addresses) connect and each
  watch the doctor (a one-day snapshot), then sit idle: heartbeats answered,
  nothing else.

What is measured
  RSS         VmRSS before and after the N connect (1 s after the last snapshot):
              KiB per connection = growth / N. Connect rate = N / connect time.
  idle CPU    the server's utime + stime over --idle-seconds with everyone
              connected and nothing happening (heartbeats, timers), per 10,000
              connections.
  census      then the route marks a census of live objects (gc, by type,
              getsizeof) and starts tracemalloc; --probe more watchers connect;
              the route answers with what grew, by type and by allocating line,
              divided here by the probe's size: bytes per connection per kind.
              Tracing costs memory of its own, which is why the RSS figure is
              taken before it starts. What RSS grew by beyond the traced growth
              is outside Python's allocator: uvloop/libuv handles, the kernel's
              part is not in RSS at all.

Usage
  .venv/bin/python bench/connmem.py                              # 10,000 watchers
  .venv/bin/python bench/connmem.py --watchers 50000 --sources 4 --client-procs 4
  .venv/bin/python bench/connmem.py --watchers 2000 --probe 1000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fanout
from fanout import (
    WorkerSpec,
    _client_frame,
    _recv,
    cpu_seconds,
    load_average,
    prepare_database,
    raise_nofile,
    rss_kib,
    seed,
    started_servers,
    started_workers,
)

from protocol.codec import JSON
from protocol.messages import Watch


def memory_route(base: str, query: str = "") -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/debug/memory{query}", timeout=600) as resp:
        body: dict[str, Any] = json.load(resp)
        return body


def connect(
    port: int, count: int, procs: int, sources: int, watch: bytes, deadline: float, first: int
) -> tuple[contextlib.ExitStack, int, float]:
    """`count` counting watchers over `procs` processes; they stay until the stack closes."""
    specs = [
        WorkerSpec(
            first + w,
            [("127.0.0.1", port, count // procs + (w < count % procs))],
            "json",
            watch,
            max(8, 256 // procs),
            deadline,
            sample=1 << 30,  # every watcher counts: nothing is parsed after the snapshot
            drain_ms=500.0,
            sources=sources,
        )
        for w in range(procs)
    ]
    stack = contextlib.ExitStack()
    workers = stack.enter_context(started_workers(specs))
    t0 = time.time()
    hellos = [_recv(pipe, deadline) for _, pipe in workers]
    seconds = time.time() - t0
    errors = [h["errors"] for h in hellos if h["errors"]]
    if errors:
        print(f"  connect errors: {errors}", flush=True)
    return stack, sum(h["connected"] for h in hellos), seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    from testkit.harness import postgres_server, redis_server

    report: dict[str, Any] = {
        "watchers": args.watchers,
        "nproc": os.cpu_count(),
        "load_before": load_average(),
        "python": sys.version.split()[0],
    }
    logs = Path(tempfile.mkdtemp(prefix="slotcast-connmem-"))
    deadline = time.time() + args.timeout
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(postgres_server())
        dsn = asyncio.run(prepare_database(admin, external=False))
        redis_url, _ = stack.enter_context(redis_server())
        doctor_id, first, _ = asyncio.run(seed(dsn, 10))
        watch = _client_frame(
            0x1, JSON.encode(Watch(doctor_id, first, first + timedelta(days=1)), 1)
        )
        extra = {"SLOTCAST_DEBUG_MEMORY": "1", "SLOTCAST_HEARTBEAT_S": str(args.heartbeat)}
        with started_servers(1, dsn, redis_url, logs, "connmem", extra_env=extra) as servers:
            server = servers[0]
            pid = server.pid
            time.sleep(1.0)
            # Warms the route and the gc up; a build without the route (an older one, to
            # compare against) is measured by RSS alone (--probe 0).
            with contextlib.suppress(urllib.error.HTTPError):
                memory_route(server.http_url, "?mark=1")
            rss0 = rss_kib(pid)
            crowd, connected, seconds = connect(
                server.port, args.watchers, args.client_procs, args.sources, watch, deadline, 0
            )
            with crowd:
                time.sleep(1.0)
                rss1 = rss_kib(pid)
                report.update(
                    connected=connected,
                    connect_seconds=round(seconds, 1),
                    connects_per_second=round(connected / seconds),
                    rss_kib_before=rss0,
                    rss_kib_after=rss1,
                    kib_per_connection=round((rss1 - rss0) / max(connected, 1), 2),
                )
                print(
                    f"  {connected}/{args.watchers} connected in {seconds:.1f} s "
                    f"({connected / seconds:,.0f}/s); RSS {rss0 / 1024:.1f} -> "
                    f"{rss1 / 1024:.1f} MiB: {report['kib_per_connection']} KiB per connection",
                    flush=True,
                )
                cpu0 = cpu_seconds(pid)
                time.sleep(args.idle_seconds)
                idle = (cpu_seconds(pid) - cpu0) / args.idle_seconds
                report["idle_cores"] = round(idle, 4)
                report["idle_cores_per_10k"] = round(idle * 10000 / max(connected, 1), 4)
                print(
                    f"  idle: {idle:.3f} cores ({report['idle_cores_per_10k']:.3f} per 10,000 "
                    f"connections; heartbeat {args.heartbeat:g} s)",
                    flush=True,
                )
                if args.probe:
                    memory_route(server.http_url, "?mark=1&trace=1")
                    probe, n, _ = connect(
                        server.port, args.probe, 1, args.sources, watch, deadline, 1000
                    )
                    with probe:
                        time.sleep(1.0)
                        grown = memory_route(server.http_url)
                    report["census_probe"] = n
                    report["census"] = grown
                    print_census(grown, n)
    return report


def print_census(grown: dict[str, Any], n: int) -> None:
    print(f"\n  census: what grew per connection ({n} probe connections)")
    print("  bytes/conn  objs/conn  type (gc-tracked, shallow getsizeof)")
    for name, count, size in grown["types"][:25]:
        print(f"  {size / n:10.0f} {count / n:10.2f}  {name}")
    if "lines" in grown:
        print(f"\n  tracemalloc: {grown['traced_growth'] / n:,.0f} bytes/conn traced; by line:")
        for where, count, size in grown["lines"][:25]:
            print(f"  {size / n:10.0f} {count / n:10.2f}  {where}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--watchers", type=int, default=10000, help="connections measured by RSS")
    p.add_argument("--probe", type=int, default=1000, help="connections the census diffs (0: none)")
    p.add_argument("--client-procs", type=int, default=2, help="watcher processes")
    p.add_argument("--sources", type=int, default=1, help="loopback source addresses (>28k: 2+)")
    p.add_argument("--heartbeat", type=float, default=20.0, help="SLOTCAST_HEARTBEAT_S")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window")
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args()

    def stop(signum: int, _frame: Any) -> None:  # so that every server and child is stopped
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    raise_nofile()
    print(
        f"connmem: nproc {os.cpu_count()}, load {load_average()}, "
        f"python {sys.version.split()[0]}, fanout {fanout.__file__}",
        flush=True,
    )
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report.get("connected") == args.watchers else 1


if __name__ == "__main__":
    raise SystemExit(main())
