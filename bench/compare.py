"""Slotcast against Node Socket.IO, side by side: one W x R matrix, one table of ratios.

Why this exists: on a shared 2-core machine absolute latency and CPU figures say more
about the neighbours than about Slotcast. What holds is the ratio against the system
users would pick instead, measured in the same run by the same load generator. So this
runs bench/fanout.py twice per changes rate R, once per system, over the same watcher
counts W, with everything else equal:

  slotcast   2 `slotcast serve` instances, PostgreSQL and Redis; the change source is a
             booking over WebSocket, so each change includes a PostgreSQL commit.
  socketio   2 instances of bench/socketio/server.js (Socket.IO 4 + the official Redis
             adapter, `npm ci`-ed from its lock file on first use) behind the same kind of
             Redis; the change source is POST /change, which emits a delta of the same
             shape and size to the doctor's room: no database, no commit.

Both are watched by the same code (fanout.py's Watcher; SioWatcher only speaks Engine.IO
v4's handshake and packet types), sampled and counted the same way. The runs alternate
(Slotcast then Socket.IO at each R) so that a disturbance of the machine hits both, and
share one Redis: a throwaway redis-server started here, unless `-- --redis-url URL` is
given (fanout.py then reports no Redis CPU beside the servers': it did not start it).

Columns (ratio = Slotcast / Socket.IO; below 1 means Slotcast is better, except for
msg/s where above 1 is better):
  p50, p99         send -> receipt latency at the sampled watchers (ms)
  CPU/msg          server CPU us (both instances, user + sys) per delivered message
  KiB/conn         server RSS growth per connected watcher
  msg/s            delivered messages per second in the window
  max sustained    per system, the highest delivered msg/s of any cell of the matrix
                   that was *sustained*: nothing lost or late, and changes committed at
                   >= 95% of the rate sent. A lower bound: the matrix's largest W x R is
                   its ceiling; widen the matrix to find where each system stops keeping up.

Usage
  .venv/bin/python bench/compare.py                          # W 1000,5000 x R 10,20, 20 s
  .venv/bin/python bench/compare.py --watchers 1000 --rates 20 --seconds 10   # a smoke run
  .venv/bin/python bench/compare.py --out docs/compare.md --json /tmp/compare.json
Arguments after `--` go to every fanout.py run (e.g. `-- --client-procs 2`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

FANOUT: Final = Path(__file__).resolve().parent / "fanout.py"
REPO: Final = FANOUT.parent.parent
if str(REPO) not in sys.path:  # `python bench/compare.py` without PYTHONPATH
    sys.path.insert(0, str(REPO))
SYSTEMS: Final = ("slotcast", "socketio")


def run_fanout(system: str, watchers: str, rate: float, args: argparse.Namespace) -> list[Any]:
    """One fanout.py run (every W at one R) for one system; its reports."""
    fd, name = tempfile.mkstemp(prefix=f"compare-{system}-r{rate:g}-", suffix=".json")
    os.close(fd)
    out = Path(name)
    command = [
        sys.executable,
        str(FANOUT),
        "--system",
        system,
        "--watchers",
        watchers,
        "--rate",
        str(rate),
        "--seconds",
        str(args.seconds),
        "--json",
        str(out),
        *args.fanout_args,
    ]
    print(f"\n### {system}, W {watchers}, R {rate:g}/s: {' '.join(command)}", flush=True)
    proc = subprocess.run(command, check=False)
    reports: list[Any] = json.loads(out.read_text()) if out.stat().st_size else []
    out.unlink()
    if proc.returncode:
        print(f"warning: {system} at R {rate:g} exited {proc.returncode}", flush=True)
    return reports


def sustained(r: dict[str, Any]) -> bool:
    """The system kept up: nothing lost, nothing late, committed at the rate sent."""
    return (
        r["missing"] == 0
        and r["late"] == 0
        and not r["counting_mismatched"]
        and r["connected"] == r["watchers"]
        and r["commit_rate"] >= 0.95 * r["send_rate"]
    )


def ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}"


def table(cells: dict[tuple[str, int, float], dict[str, Any]]) -> str:
    head = (
        "| W x R | p50 ms S / N (ratio) | p99 ms S / N (ratio) "
        "| CPU µs/msg S / N (ratio) | KiB/conn S / N (ratio) | msg/s S / N (ratio) "
        "| lost S / N |"
    )
    rows = [head, "|" + "---|" * 7]
    keys = sorted({(w, r) for _, w, r in cells})
    for w, rate in keys:
        s, n = cells.get(("slotcast", w, rate)), cells.get(("socketio", w, rate))
        if s is None or n is None:
            rows.append(f"| {w:,} x {rate:g} | (a run is missing) |||||")
            continue
        sl, nl = s["latency_after_send"], n["latency_after_send"]

        def pair(a: float, b: float, fmt: str = ".1f") -> str:
            return f"{a:{fmt}} / {b:{fmt}} ({ratio(a, b)})"

        rows.append(
            f"| {w:,} x {rate:g} | {pair(sl['p50_ms'], nl['p50_ms'])} "
            f"| {pair(sl['p99_ms'], nl['p99_ms'])} "
            f"| {pair(s['us_per_delivered'], n['us_per_delivered'])} "
            f"| {pair(s['kib_per_connection'], n['kib_per_connection'])} "
            f"| {pair(s['delivered_per_second'], n['delivered_per_second'], ',.0f')} "
            f"| {s['missing']} / {n['missing']} |"
        )
    best = {
        system: max(
            (
                c["delivered_per_second"]
                for (sy, _, _), c in cells.items()
                if sy == system and sustained(c)
            ),
            default=0,
        )
        for system in SYSTEMS
    }
    rows.append(
        f"\nMax sustained msg/s over this matrix (lossless, on time, committed at ≥ 95% of "
        f"the rate sent): Slotcast {best['slotcast']:,}, Socket.IO {best['socketio']:,} "
        f"(ratio {ratio(best['slotcast'], best['socketio'])}). S = Slotcast (its latency "
        "includes the PostgreSQL commit), N = Node Socket.IO 4 + Redis adapter (no "
        "database); ratio = S / N."
    )
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--watchers", default="1000,5000", help="W: a comma list")
    p.add_argument("--rates", default="10,20", help="R: changes per second, a comma list")
    p.add_argument("--seconds", type=float, default=20.0, help="how long each cell drives")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which to run (both for ratios)")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--json", type=Path, help="also write every fanout report here")
    p.add_argument("fanout_args", nargs="*", help="after `--`: passed to every fanout.py run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    started = time.time()
    cells: dict[tuple[str, int, float], dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if "--redis-url" not in args.fanout_args:  # one Redis for every run of both systems
            from testkit.harness import redis_server

            url, _ = stack.enter_context(redis_server())
            args.fanout_args = [*args.fanout_args, "--redis-url", url]
        for rate in rates:
            for system in systems:
                for report in run_fanout(system, args.watchers, rate, args):
                    cells[system, report["watchers"], rate] = report
    text = (
        f"Slotcast vs Socket.IO, {os.cpu_count()} cores, {args.seconds:g} s per cell, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}\n\n" + table(cells)
    )
    print("\n" + text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(
            json.dumps([{"key": list(k), **v} for k, v in cells.items()], indent=2, default=str)
        )
    expected = len(rates) * len(systems) * len(args.watchers.split(","))
    return 0 if len(cells) == expected and all(sustained(c) for c in cells.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
