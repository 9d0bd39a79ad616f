"""Joins: thousands of watchers opening ONE doctor at once, with and without rooms' calendars.

Why this exists: issue 12 asks what a crowd opening one popular doctor costs,
in database work per join and in joins per second, before and after the
versioned snapshot cache (`server/calendars.py`). Both variants run in the same
invocation, alternated (`--rounds`), on the same machine and database, so their
ratio is what counts; absolute rates drift with what else the two cores do.

Per variant and round: one fresh `slotcast serve` (rate limits and caps off, as
in `bench/fanout.py`: thousands of clients share loopback), `--watchers` raw
WebSocket clients over `--client-procs` processes (bench/fanout.py's `Watcher`:
handshake, a masked `watch` of one week, then nothing), at most
`--concurrency` handshakes and watches in flight. Measured:

- joins/s: watchers connected and answered with their snapshot, over the wall
  time from the first connect to the last snapshot;
- database transactions per join: `xact_commit` of the benchmark's database in
  `pg_stat_database`, across the joins, less what the instance commits idle
  (its sweeps), measured over as long beforehand;
- snapshot reads per join by source, from the server's
  `slotcast_snapshot_reads_total{source}` (cache, shared, database);
- errors: watches answered with an error (`unavailable` when the pool is
  exhausted) or connections that failed.

    .venv/bin/python bench/joins.py                       # 10,000 watchers, 2 rounds
    .venv/bin/python bench/joins.py --watchers 2000 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from bench.fanout import (  # noqa: E402
    JWT_SECRET,
    BenchServer,
    WorkerSpec,
    _client_frame,
    _recv,
    cpu_seconds,
    prepare_database,
    rss_kib,
    seed,
    started_workers,
)
from protocol.codec import JSON  # noqa: E402
from protocol.messages import Watch  # noqa: E402
from testkit.harness import UNLIMITED, free_port  # noqa: E402

VARIANTS: Final = {"no cache": "0", "cache": "100000"}


@contextlib.contextmanager
def server(dsn: str, cache_slots: str, logs: Path, tag: str) -> Iterator[BenchServer]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        SLOTCAST_DATABASE_URL=dsn,
        SLOTCAST_JWT_SECRET=JWT_SECRET,
        SLOTCAST_LOG_LEVEL="WARNING",
        SLOTCAST_SNAPSHOT_CACHE_SLOTS=cache_slots,
        **UNLIMITED,
    )
    s = BenchServer(tag, free_port(), env, logs / f"{tag}.log")
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=15)


def snapshot_reads(s: BenchServer) -> dict[str, float]:
    with urllib.request.urlopen(f"{s.http_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'^slotcast_snapshot_reads_total\{source="(\w+)"\} (\S+)$', text, re.M)
    return {source: float(value) for source, value in found}


async def commits(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value: int = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return value
    finally:
        await conn.close()


def one_run(args: argparse.Namespace, dsn: str, variant: str, round_: int) -> dict[str, Any]:
    doctor_id, first, _ = asyncio.run(seed(dsn, 1))
    watch = _client_frame(0x1, JSON.encode(Watch(doctor_id, first, first + timedelta(days=7)), 1))
    tag = f"{variant.replace(' ', '-')}-{round_}"
    with server(dsn, VARIANTS[variant], args.logs, tag) as s:
        time.sleep(1.0)
        c0, idle0 = asyncio.run(commits(dsn)), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_rate = (asyncio.run(commits(dsn)) - c0) / (time.monotonic() - idle0)
        rss0, reads0 = rss_kib(s.pid), snapshot_reads(s)
        deadline = time.time() + args.timeout
        per = [
            args.watchers // args.client_procs + (w < args.watchers % args.client_procs)
            for w in range(args.client_procs)
        ]
        specs = [
            WorkerSpec(
                w,
                [("127.0.0.1", s.port, n)],
                "json",
                watch,
                max(1, args.concurrency // args.client_procs),
                deadline,
            )
            for w, n in enumerate(per)
        ]
        cpu0 = cpu_seconds(s.pid)
        c1, t0 = asyncio.run(commits(dsn)), time.monotonic()
        with started_workers(specs) as workers:
            hellos = [_recv(pipe, deadline) for _, pipe in workers]
            wall = max(h["seconds"] for h in hellos)
            elapsed = time.monotonic() - t0
            c2 = asyncio.run(commits(dsn))
            cpu = cpu_seconds(s.pid) - cpu0
            rss1, reads1 = rss_kib(s.pid), snapshot_reads(s)
        joined = sum(h["connected"] for h in hellos)
        errors: dict[str, int] = {}
        for h in hellos:
            for k, v in h["errors"].items():
                errors[k] = errors.get(k, 0) + v
        net = (c2 - c1) - idle_rate * elapsed
        return {
            "variant": variant,
            "round": round_,
            "joined": joined,
            "seconds": wall,
            "joins_per_s": joined / wall if wall else 0.0,
            "xact_per_join": net / max(joined, 1),
            "reads": {k: reads1.get(k, 0) - reads0.get(k, 0) for k in reads1},
            "server_cpu_ms_per_join": 1000 * cpu / max(joined, 1),
            "kib_per_join": (rss1 - rss0) / max(joined, 1),
            "errors": errors,
        }


def report(results: list[dict[str, Any]]) -> None:
    print(
        "\n| variant | round | joined | seconds | joins/s | DB transactions per join "
        "| snapshot reads (database / shared / cache) | server CPU ms per join | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        reads = r["reads"]
        print(
            f"| {r['variant']} | {r['round']} | {r['joined']:,} | {r['seconds']:.1f} "
            f"| {r['joins_per_s']:,.0f} | {r['xact_per_join']:.3f} "
            f"| {reads.get('database', 0):,.0f} / {reads.get('shared', 0):,.0f} / "
            f"{reads.get('cache', 0):,.0f} | {r['server_cpu_ms_per_join']:.2f} "
            f"| {r['errors'] or 0} |"
        )
    by = {v: [r for r in results if r["variant"] == v] for v in VARIANTS}
    if all(by.values()):
        base, cached = by["no cache"], by["cache"]

        def mean(rows: list[dict[str, Any]], key: str) -> float:
            return sum(r[key] for r in rows) / len(rows)

        print(
            f"\njoins/s, cache / no cache: "
            f"{mean(cached, 'joins_per_s') / max(mean(base, 'joins_per_s'), 1e-9):.2f}x; "
            f"DB transactions per join: {mean(base, 'xact_per_join'):.3f} -> "
            f"{mean(cached, 'xact_per_join'):.4f}; server CPU per join: "
            f"{mean(base, 'server_cpu_ms_per_join'):.2f} -> "
            f"{mean(cached, 'server_cpu_ms_per_join'):.2f} ms"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--watchers", type=int, default=10_000)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=1000, help="joins in flight, in all")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--database-url")
    args = p.parse_args()
    args.logs = Path(tempfile.mkdtemp(prefix="slotcast-bench-joins-"))
    with contextlib.ExitStack() as stack:
        from testkit.harness import postgres_server

        admin = args.database_url or stack.enter_context(postgres_server())
        dsn = asyncio.run(prepare_database(admin, external=bool(args.database_url)))
        print(
            f"{args.watchers:,} watchers of one doctor over {args.client_procs} processes, "
            f"{args.concurrency} joins in flight; logs in {args.logs}",
            flush=True,
        )
        results = []
        for round_ in range(1, args.rounds + 1):
            for variant in VARIANTS:
                r = one_run(args, dsn, variant, round_)
                print(f"  {variant}, round {round_}: {r}", flush=True)
                results.append(r)
        report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
