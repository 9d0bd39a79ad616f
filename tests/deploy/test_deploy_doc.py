"""docs/deploy.md, followed literally on one machine: the operator's guide cannot drift.

Every block of the guide is named (`<!-- deploy:NAME -->`, testkit/deploydoc.py) and
handled here, in the guide's order; a block the test does not know fails it. Shell
blocks run in `bash` as written, after the guide's own `shell` block, changing only
addresses, ports and paths (`Site.replacements`). What a test cannot do as root on
a shared machine (apt-get, useradd, chgrp, systemctl, git and pip) is done by the
closest equivalent, named at each step: `systemctl start slotcast@N` runs the unit's
own ExecStart with its environment, `systemctl restart haproxy` runs HAProxy in the
foreground with the environment the guide writes. The services are the guide's:
Debian's PostgreSQL 15 and Redis 7, HAProxy with TLS (a self-signed certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import aiohttp
import pytest

from client import SlotcastClient
from protocol.vocabulary import SlotStatus
from testkit.deploydoc import Block, assignments, blocks, substitute, unit_sections
from testkit.harness import (
    REPO,
    ControlledPostgres,
    RedisServer,
    free_port,
    own_postgres,
    read_log,
    stop_process,
)
from testkit.tools import (
    SEARCH_PATH,
    ensure_deploy_tools,
    ensure_haproxy,
    ensure_postgres15,
    ensure_redis7,
    self_signed_certificate,
)

pytestmark = pytest.mark.processes

UNIT = REPO / "deploy" / "slotcast@.service"
# Every block the guide has, each handled below; a new one must be handled too.
STEPS = [
    "packages",
    "roles",
    "redis",
    "secrets",
    "secrets-group",
    "settings",
    "shell",
    "migrate",
    "doctors",
    "systemd",
    "ready",
    "haproxy-env",
    "haproxy-check",
    "haproxy-start",
    "schedules",
    "watch",
    "book",
    "upgrade-install",
    "upgrade-migrate",
    "upgrade-restart-1",
    "upgrade-ready-1",
    "upgrade-restart-2",
    "upgrade-ready-2",
]
WAIT_S = 20.0


# ---- the machine the guide describes -----------------------------------------------------------


@dataclass
class Instance:
    """One `systemctl start slotcast@<name>`: the unit's ExecStart with its environment."""

    name: str  # the guide's instance name (its port there)
    port: int
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    stop_timeout_s: float
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd="/"
            )

    def stop(self) -> int | None:
        """KillSignal=SIGTERM, then SIGKILL after TimeoutStopSec, as systemd would."""
        if self.process is None:
            return None
        code = stop_process(self.process, signal.SIGTERM, self.stop_timeout_s)
        self.process = None
        return code

    def logs(self) -> str:
        return read_log(self.log_path)


@dataclass
class Site:
    root: Path
    postgres: ControlledPostgres
    redis: RedisServer
    cert: Path
    haproxy_bin: str
    lb_port: int = field(default_factory=free_port)
    redirect_port: int = field(default_factory=free_port)
    ports: dict[str, int] = field(default_factory=dict)  # the guide's instance name: real port
    instances: dict[str, Instance] = field(default_factory=dict)
    haproxy: subprocess.Popen[bytes] | None = None
    shell_prelude: str = ""

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.lb_port}"

    @property
    def replacements(self) -> dict[str, str]:
        """The only changes made to the guide's text: addresses, ports and paths."""
        bin_dir = Path(sys.executable).parent
        found = {
            "/etc/slotcast": str(self.etc / "slotcast"),
            "/etc/haproxy/haproxy.cfg": str(self.etc / "haproxy" / "haproxy.cfg"),
            "/etc/haproxy/certs/slotcast.pem": str(self.cert),
            "/etc/default/haproxy": str(self.etc / "default" / "haproxy"),
            "/opt/slotcast/src": str(REPO),
            "/opt/slotcast/venv/bin": str(bin_dir),
            "slotcast.clinic.example": f"localhost:{self.lb_port}",
            "127.0.0.1:5432": f"127.0.0.1:{self.postgres.port}",
            "127.0.0.1:6379": f"127.0.0.1:{self.redis.port}",
        }
        for name, port in self.ports.items():
            found[f"127.0.0.1:{name}"] = f"127.0.0.1:{port}"
        return found

    def env(self) -> dict[str, str]:
        """A root shell's environment on the guide's host (no SLOTCAST_* of the suite's)."""
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SLOTCAST_") and k not in {"DATABASE_URL", "REDIS_URL"}
        }
        return {
            **clean,
            "PATH": f"{os.environ.get('PATH', '')}:{SEARCH_PATH}",
            # This checkout's code, whatever the shared virtualenv was installed from.
            "PYTHONPATH": str(REPO),
            # The self-signed certificate stands in for a real one: trust it, as
            # browsers trust a real one (curl, and Python's ssl for slotcast watch/book).
            "CURL_CA_BUNDLE": str(self.cert),
            "SSL_CERT_FILE": str(self.cert),
        }

    def script(self, block: Block) -> str:
        assert block.lang == "sh", f"{block.name} is not a shell block"
        prelude = substitute(self.shell_prelude, self.replacements)
        return f"set -euo pipefail\n{prelude}\n{substitute(block.text, self.replacements)}\n"

    async def run(self, block: Block, timeout: float = 60) -> str:
        """Run a shell block as the guide's operator would; its stdout."""
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", self.script(block)],
            env=self.env(),
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, (
            f"docs/deploy.md block {block.name!r} exited {done.returncode}:\n"
            f"{self.script(block)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
        return done.stdout

    def spawn(self, block: Block) -> subprocess.Popen[str]:
        """Run a long-lived shell block (a second terminal) in the background."""
        return subprocess.Popen(
            ["bash", "-c", self.script(block)],
            env=self.env(),
            cwd=self.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def instance(self, name: str) -> Instance:
        """What `systemctl start slotcast@<name>` starts, read from the shipped unit."""
        service = unit_sections(UNIT)["Service"]
        specifiers = {"%i": str(self.ports[name]), "%H": socket.gethostname(), "%%": "%"}

        def expand(value: str) -> str:
            return substitute(value, specifiers)

        env = self.env()
        for path in service["EnvironmentFile"]:
            optional = path.startswith("-")
            file = Path(substitute(expand(path.lstrip("-")), self.replacements))
            if optional and not file.exists():
                continue
            found = assignments(file.read_text())
            env.update({k: substitute(v, self.replacements) for k, v in found.items()})
        for assignment in service.get("Environment", []):
            key, _, value = expand(assignment).partition("=")
            env[key] = value
        (exec_start,) = service["ExecStart"]
        argv = substitute(exec_start, self.replacements).split()
        (stop,) = service["TimeoutStopSec"]
        return Instance(name, self.ports[name], argv, env, self.root / f"{name}.log", float(stop))

    def start_haproxy(self, env: dict[str, str]) -> None:
        with (self.root / "haproxy.log").open("ab") as log:
            self.haproxy = subprocess.Popen(
                [self.haproxy_bin, "-f", str(self.etc / "haproxy" / "haproxy.cfg"), "-db"],
                env={**self.env(), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def logs(self) -> str:
        parts = [f"----- slotcast@{n} -----\n{i.logs()}" for n, i in self.instances.items()]
        haproxy_log = self.root / "haproxy.log"
        if haproxy_log.exists():
            parts.append(f"----- haproxy -----\n{haproxy_log.read_text(errors='replace')}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def tools() -> dict[str, str | Path]:
    reasons = ensure_deploy_tools()
    haproxy = ensure_haproxy(reasons)
    postgres15 = ensure_postgres15(reasons)
    redis7 = ensure_redis7(reasons)
    if reasons or haproxy is None or postgres15 is None or redis7 is None:
        pytest.skip("; ".join(reasons))
    return {"haproxy": haproxy, "postgres15": postgres15, "redis7": redis7}


@pytest.fixture
def site(tools: dict[str, str | Path], request: pytest.FixtureRequest) -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="slotcast-deploy-"))
    redis = RedisServer(free_port(), root / "redis", binary=str(tools["redis7"]))
    redis.workdir.mkdir()
    redis.start()
    cert = self_signed_certificate(root)
    assert cert is not None
    try:
        with own_postgres(Path(tools["postgres15"])) as postgres:
            site = Site(root, postgres, redis, cert, str(tools["haproxy"]))
            site.work.mkdir()
            yield site
            for instance in site.instances.values():
                instance.stop()
            if site.haproxy is not None:
                site.haproxy.terminate()
                site.haproxy.wait(10)
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                print(f"\n{site.logs()}")
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---- helpers -----------------------------------------------------------------------------------


async def until(what: str, check: object, site: Site, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            if await check():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{site.logs()}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def https(site: Site) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that trusts the site's certificate and keeps no cookies or connections."""
    context = ssl.create_default_context(cafile=str(site.cert))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=5),
    ) as session:
        yield session


async def ready(port: int) -> bool:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        return resp.status == 200


async def start(site: Site, name: str) -> None:
    instance = site.instances.get(name) or site.instance(name)
    site.instances[name] = instance
    instance.start()
    await until(f"slotcast@{name} to be ready", lambda: ready(instance.port), site)


async def routed_to_all(site: Site) -> bool:
    """HAProxy sends some request to each instance (cookieless requests are spread)."""
    seen = set()
    async with https(site) as http:
        for _ in range(3 * len(site.ports)):
            async with http.get(f"{site.origin}/healthz") as resp:
                seen.add(resp.headers["X-Slotcast-Instance"])
    return len(seen) == len(site.ports)


def lines_until(process: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """Read the process's output until a line matches; that line."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


# ---- the guide, step by step ---------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_docs_deploy_md_followed_literally(site: Site) -> None:
    guide = blocks()
    assert list(guide) == STEPS, "docs/deploy.md's blocks changed: follow them here too"

    # 1. Packages, user and release. Stand-in: Debian's packages are what `tools` gave
    #    this test (make tools); the release is this checkout, in the shared virtualenv.
    packages = guide["packages"].text
    for package in ("postgresql-15", "redis-server", "haproxy", "jq", "openssl"):
        assert f" {package}" in packages
    assert "useradd --system" in packages

    # 2. The roles, as PostgreSQL 15's superuser (sudo -u postgres psql -f ...).
    admin = site.postgres.dsn()
    roles = await asyncio.to_thread(
        subprocess.run,
        [str(site.postgres.bin / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-f", "-", admin],
        input=guide["roles"].text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert roles.returncode == 0, roles.stdout + roles.stderr

    # 3. Redis 7. Stand-in: the fixture runs Debian's redis-server with these settings.
    redis_conf = guide["redis"].text
    assert 'save ""' in redis_conf
    assert "appendonly no" in redis_conf

    # 4. Secrets and settings.
    await site.run(guide["secrets"])
    assert "chgrp slotcast" in guide["secrets-group"].text  # stand-in: no such group here
    env_file = site.etc / "slotcast" / "slotcast.env"
    changes = {
        k: substitute(v, site.replacements) for k, v in assignments(guide["settings"].text).items()
    }
    lines = env_file.read_text().splitlines()
    changed = [
        f"{line.split('=', 1)[0]}={changes[line.split('=', 1)[0]]}"
        if "=" in line and not line.startswith("#") and line.split("=", 1)[0] in changes
        else line
        for line in lines
    ]
    missing = set(changes) - set(assignments(env_file.read_text()))
    assert not missing, f"the guide changes lines deploy/slotcast.env does not have: {missing}"
    env_file.write_text("\n".join(changed) + "\n")
    site.shell_prelude = guide["shell"].text

    # 5. The schema, as the owner.
    await site.run(guide["migrate"])

    # 6. Doctors.
    imported = await site.run(guide["doctors"])
    assert "doctors.csv" in imported

    # 7. Two instances under systemd. Stand-in for `systemctl enable --now`: each named
    #    instance runs the unit's own ExecStart with its environment (and its sandbox's
    #    absence). The guide's instance names become free ports.
    names = re.findall(r"slotcast@(\d+)", guide["systemd"].text.split("enable --now", 1)[1])
    assert names == ["8081", "8082"], names
    site.ports = {name: free_port() for name in names}
    await asyncio.gather(*(start(site, name) for name in names))
    await site.run(guide["ready"])

    # 8. HAProxy and TLS.
    haproxy_env = site.etc / "default" / "haproxy"
    haproxy_env.parent.mkdir(parents=True)
    values = {
        ":443": f"127.0.0.1:{site.lb_port}",
        ":80": f"127.0.0.1:{site.redirect_port}",
    }
    written = {
        k: values.get(v, substitute(v, site.replacements))
        for k, v in assignments(guide["haproxy-env"].text).items()
    }
    haproxy_env.write_text("".join(f"{k}={v}\n" for k, v in written.items()))
    (site.etc / "haproxy").mkdir(exist_ok=True)
    checked = await site.run(guide["haproxy-check"])
    assert "Configuration file is valid" in checked
    # Stand-in for `systemctl restart haproxy`: Debian's unit runs haproxy with
    # /etc/default/haproxy as its environment; here in the foreground (-db).
    assert guide["haproxy-start"].text == "systemctl restart haproxy"
    site.start_haproxy(written)
    await until("HAProxy to route to every instance over TLS", lambda: routed_to_all(site), site)

    # TLS at the balancer: plain http is redirected; over https every cookie is Secure
    # (HAProxy's and the instance's, told by X-Forwarded-Proto) and HSTS is on.
    plain = f"http://127.0.0.1:{site.redirect_port}/"
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(plain, allow_redirects=False) as resp,
    ):
        assert resp.status == 301
        assert resp.headers["Location"].startswith("https://")
    async with https(site) as http, http.get(f"{site.origin}/") as resp:
        assert resp.status == 200
        cookies = resp.headers.getall("Set-Cookie")
        for name in ("SLOTCAST_LB=", "slotcast_instance="):
            (cookie,) = [c for c in cookies if c.startswith(name)]
            assert "; Secure" in cookie or "; secure" in cookie, cookie
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        assert '<meta name="slotcast-demo" content="off">' in await resp.text()

    # 9. Schedules, through the balancer, as an admin.
    updated = await site.run(guide["schedules"])
    assert '"doctor_id"' in updated

    # 10. A booking, live: the watcher (one terminal) sees what the booker (another) books.
    watcher = site.spawn(guide["watch"])
    try:
        first = await asyncio.to_thread(lines_until, watcher, r"watching", WAIT_S)
        doctor_id = int(re.findall(r"doctor (\d+)", first)[0])
        booked = await site.run(guide["book"])
        slot_id = int(re.findall(r"slot (\d+)", booked)[0])
        await asyncio.to_thread(lines_until, watcher, rf"slot {slot_id} at .* is now busy", WAIT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watcher.pid, signal.SIGTERM)
        watcher.wait(10)
        if watcher.stdout is not None:
            watcher.stdout.close()

    # 11. Rolling upgrade, while a reconnecting client watches and patients book.
    assert 'pip" install' in guide["upgrade-install"].text  # stand-in: the same release
    assert "ln -sfn" in guide["upgrade-install"].text
    await site.run(guide["upgrade-migrate"])
    start_day = date.today() + timedelta(days=1)
    end_day = start_day + timedelta(days=14)
    context = ssl.create_default_context(cafile=str(site.cert))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        SlotcastClient.connect(
            f"wss://localhost:{site.lb_port}/ws", session=session, reconnect=True, max_backoff=1.0
        ) as follower,
    ):
        await follower.watch(doctor_id, start_day, end_day)
        for n, name in enumerate(names, start=1):
            restart = guide[f"upgrade-restart-{n}"].text
            assert restart == f"systemctl restart slotcast@{name}"
            # Stand-in for `systemctl restart`: SIGTERM (the drain), then start again.
            code = await asyncio.to_thread(site.instances[name].stop)
            assert code == 0, f"slotcast@{name} exited {code} on SIGTERM\n{site.logs()}"
            site.instances[name].start()
            await site.run(guide[f"upgrade-ready-{n}"], timeout=WAIT_S)
            # A patient books through the balancer; the follower sees it, reconnected.
            patient = await site.run(
                Block("token", "sh", f"slotcast token --role patient --sub upgrade-{n}")
            )
            free = [
                s.id
                for s in follower.calendars[doctor_id].slots.values()
                if s.status is SlotStatus.FREE
            ]
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as rest,
                rest.post(
                    f"{site.origin}/api/appointments",
                    json={"slot_id": free[0]},
                    headers={
                        "Authorization": f"Bearer {patient.strip()}",
                        "Idempotency-Key": f"upgrade-{n}",
                    },
                ) as resp,
            ):
                assert resp.status == 201, await resp.text()

            async def seen(slot: int = free[0]) -> bool:
                calendar = follower.calendars[doctor_id]
                return follower.ready.is_set() and calendar.slots[slot].status is SlotStatus.BUSY

            await until(f"the follower to see the booking after restarting {name}", seen, site)

        # Converged: the follower's calendar is the balancer's truth.
        async with https(site) as http:
            url = f"{site.origin}/api/doctors/{doctor_id}/slots"
            params = {"start": start_day.isoformat(), "end": end_day.isoformat()}
            async with http.get(url, params=params) as resp:
                truth = {s["id"]: s["status"] for s in (await resp.json())["slots"]}
        mine = {i: s.status.value for i, s in follower.calendars[doctor_id].slots.items()}
        assert mine == truth
        assert follower.reconnects >= 1, "the follower never moved, though both restarted"
