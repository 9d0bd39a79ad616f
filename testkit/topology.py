"""The whole scaled-out topology on one machine, for trying it out:

    .venv/bin/python -m testkit.topology --instances 4

A PostgreSQL primary and a streaming replica of it, a Redis Cluster (three masters,
one replica each, Redis 7), N `slotcast serve` processes using all of them
(`SLOTCAST_REPLICA_URLS`, `redis+cluster://…`) and HAProxy running the shipped
docs/haproxy.cfg in front of them. It prints where everything listens, runs until
Ctrl-C (or SIGTERM) and removes everything it started.

Why it is built from the test harness's parts rather than a compose file: those
parts (`replicated_postgres`, `RedisCluster`, `ServerProcess`) are what the suite
already proves against, they need nothing but the wheels and Debian's packages that
`make tools` installs, and the capacity check (bench/capacity.py) runs on exactly
this topology. The instances run in demo mode (demo doctors, the sign-in form), so a
browser at the printed address works at once; nothing here is a deployment recipe
(docs/deploy.md is).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from testkit.harness import (
    REPO,
    ControlledPostgres,
    RedisCluster,
    ServerProcess,
    StandbyPostgres,
    free_port,
    redis_cluster,
    replicated_postgres,
    wait_until,
)
from testkit.tools import ensure_haproxy, ensure_redis7

HAPROXY_CFG = REPO / "docs" / "haproxy.cfg"
MAX_INSTANCES = 9  # docs/haproxy.cfg has SLOTCAST_S1..S9


@dataclass
class Topology:
    """Everything one `topology()` started; URLs for a person or a test to use."""

    primary: ControlledPostgres
    standby: StandbyPostgres
    cluster: RedisCluster
    instances: list[ServerProcess]
    lb_port: int
    workdir: Path
    haproxy: subprocess.Popen[bytes] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.lb_port}/ws"

    def describe(self) -> str:
        lines = [
            f"Slotcast through HAProxy:  {self.http_url}/  (doctors: {self.http_url}/doctor)",
            f"WebSocket:                 {self.ws_url}",
            *(f"instance {s.name}:               {s.http_url}" for s in self.instances),
            f"PostgreSQL primary:        {self.primary.dsn()}",
            f"PostgreSQL replica:        {self.standby.dsn()}",
            f"Redis Cluster:             {self.cluster.url}",
            f"logs:                      {self.workdir}",
        ]
        return "\n".join(lines)


def _lb_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def topology(
    instances: int = 2,
    *,
    lb_port: int | None = None,
    env: Mapping[str, str] | None = None,
    demo: bool = True,
) -> Iterator[Topology]:
    """Start the whole topology, yield it, tear all of it down (in reverse order).

    `env`: settings for every instance on top of the ones that wire it together (the
    tests and the capacity bench lift the rate limits, or set a known JWT secret).
    """
    if not 1 <= instances <= MAX_INSTANCES:
        raise ValueError(f"--instances must be 1..{MAX_INSTANCES} (docs/haproxy.cfg's servers)")
    reasons: list[str] = []
    haproxy = ensure_haproxy(reasons)
    if haproxy is None or ensure_redis7(reasons) is None:
        raise RuntimeError(f"cannot start the topology: {reasons[0]}")
    workdir = Path(tempfile.mkdtemp(prefix="slotcast-topology-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        primary, standby = stack.enter_context(replicated_postgres())
        from store.migrate import migrate

        asyncio.run(migrate(primary.dsn()))
        cluster = stack.enter_context(redis_cluster())
        base = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
        base.update(
            {
                "SLOTCAST_DATABASE_URL": primary.dsn(),
                "SLOTCAST_REPLICA_URLS": standby.dsn(),
                "SLOTCAST_BROKER_URL": cluster.url,
                # As docs/operating.md says: believe X-Forwarded-For from HAProxy only.
                "SLOTCAST_TRUSTED_PROXIES": "127.0.0.1",
                "SLOTCAST_DB_POOL_MIN": "1",
                **(env or {}),
            }
        )
        servers = [
            ServerProcess(
                f"s{n}",
                free_port(),
                {**base, "SLOTCAST_INSTANCE_ID": f"s{n}"},
                workdir / f"s{n}.log",
                extra_args=["--demo"] if demo else [],
            )
            for n in range(1, instances + 1)
        ]
        for server in servers:
            stack.callback(server.stop)
        # The first seeds the demo doctors alone; the others then start side by side.
        servers[0].start()
        for server in servers[1:]:
            server.launch()
        for server in servers[1:]:
            wait_until(server._ready, 60, f"{server.name} to become ready")
        port = lb_port or free_port()
        lb_env = {
            **os.environ,
            "SLOTCAST_LB_BIND": f"127.0.0.1:{port}",
            **{f"SLOTCAST_{s.name.upper()}": f"127.0.0.1:{s.port}" for s in servers},
        }
        with (workdir / "haproxy.log").open("ab") as log:
            balancer = subprocess.Popen(
                [haproxy, "-f", str(HAPROXY_CFG), "-db"],
                env=lb_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack.callback(_stop_haproxy, balancer)
        topo = Topology(primary, standby, cluster, servers, port, workdir, balancer)

        def lb_up() -> bool:
            if balancer.poll() is not None:
                raise RuntimeError(f"haproxy exited with {balancer.returncode}")
            return _lb_ready(topo.http_url)

        wait_until(lb_up, 20, "HAProxy to pass requests to an instance")
        yield topo


def _stop_haproxy(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # not SIGUSR1: that would wait for every tunnel to end
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.topology",
        description="Start N Slotcast instances behind HAProxy, a Redis Cluster and a "
        "PostgreSQL primary with a streaming replica; Ctrl-C stops and removes it all.",
    )
    parser.add_argument("--instances", type=int, default=2, help="1..9 (default 2)")
    parser.add_argument("--port", type=int, default=8000, help="HAProxy's port (default 8000)")
    args = parser.parse_args(argv)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting {args.instances} instances, a Redis Cluster, a primary and a replica…")
    try:
        with topology(args.instances, lb_port=args.port) as topo:
            print(topo.describe())
            print(
                "a patient token: .venv/bin/slotcast token --demo --role patient --sub alice\n"
                "Ctrl-C stops everything.",
                flush=True,
            )
            signal.signal(signal.SIGINT, on_signal)
            while not stop:
                time.sleep(0.2)
                for server in topo.instances:
                    if server.process is not None and server.process.poll() is not None:
                        print(f"{server.name} exited:\n{server.logs()[-3000:]}", file=sys.stderr)
                        stop = True
            print("stopping…", flush=True)
    except KeyboardInterrupt:
        print("stopping…", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
