"""deploy/: the systemd unit and the environment file an operator installs as shipped.

The unit's numbers must follow the settings they serve: a stop timeout shorter than
the drain would SIGKILL an instance in the middle of moving its clients away, and a
descriptor limit under the connection cap would refuse clients the cap allows. Both
are derived here from the settings' defaults and the env file's values, so raising
one without the other fails this test. `systemd-analyze verify` checks the syntax.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.connection import CLOSE_HANDSHAKE_S
from server.lifecycle import DRAIN_SLACK_S
from server.settings import Settings
from testkit.deploydoc import unit_sections
from testkit.harness import REPO
from testkit.tools import ensure_systemd_analyze

UNIT = REPO / "deploy" / "slotcast@.service"
ENV_FILE = REPO / "deploy" / "slotcast.env"


def env_file() -> dict[str, str]:
    """deploy/slotcast.env as systemd reads it: VAR=value lines, comments skipped."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string("[env]\n" + ENV_FILE.read_text())
    return dict(parser["env"])


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "").isdigit():
            return float(value[: -len(suffix)]) * factor
    return float(value)


def test_the_unit_outlasts_the_drain_and_holds_every_allowed_connection() -> None:
    service = unit_sections(UNIT)["Service"]
    env = env_file()
    settings = Settings.from_env({k: v for k, v in env.items() if not k.endswith("_FILE")})

    # Every bound of the drain (docs/operating.md, "Draining on SIGTERM"), at its worst.
    batches = -(-settings.max_connections // settings.drain_batch) * settings.drain_interval_s
    drain = settings.drain_grace_s + batches + CLOSE_HANDSHAKE_S + DRAIN_SLACK_S
    worst = drain + settings.shutdown_timeout_s
    (stop,) = service["TimeoutStopSec"]
    assert seconds(stop) > worst, f"TimeoutStopSec={stop}: the drain may take {worst:g} s"
    assert service["KillSignal"] == ["SIGTERM"]  # the signal that drains
    assert service["KillMode"] == ["mixed"]  # SIGTERM to slotcast alone, SIGKILL to all

    (nofile,) = service["LimitNOFILE"]
    needed = settings.max_connections + settings.db_pool_max + 1024  # + Redis, files, slack
    assert int(nofile) >= needed, f"LimitNOFILE={nofile} for {settings.max_connections} sockets"

    assert service["Restart"] == ["on-failure"]  # exit 1 (gave up) retried; exit 0 not
    assert service["User"] == ["slotcast"]
    assert service["Group"] == ["slotcast"]
    assert "/etc/slotcast/slotcast.env" in service["EnvironmentFile"]
    (exec_start,) = service["ExecStart"]
    assert exec_start.split()[1:] == ["serve"]
    # The instance name is the port, and each instance has its own id.
    assert "SLOTCAST_PORT=%i" in service["Environment"]
    assert any(v.startswith("SLOTCAST_INSTANCE_ID=") and "%i" in v for v in service["Environment"])


def test_the_env_file_names_only_real_settings_and_keeps_secrets_in_files() -> None:
    env = env_file()
    known = {f"SLOTCAST_{name.upper()}" for name in Settings.__dataclass_fields__}
    for name in env:
        base = name.removesuffix("_FILE")
        assert base in known, f"{name} in deploy/slotcast.env is no setting"
    # Secrets and DSNs only as *_FILE: a value here is readable by the service's group
    # and shows in `systemctl show`.
    for secret in ("SLOTCAST_JWT_SECRET", "SLOTCAST_DATABASE_URL", "DATABASE_URL"):
        assert secret not in env, f"{secret} must be given as a file ({secret}_FILE)"
    assert env["SLOTCAST_JWT_SECRET_FILE"].startswith("/etc/slotcast/")
    assert env["SLOTCAST_DATABASE_URL_FILE"].startswith("/etc/slotcast/")
    assert "@" not in env.get("SLOTCAST_BROKER_URL", ""), "a Redis password belongs in a file"
    settings = Settings.from_env({k: v for k, v in env.items() if not k.endswith("_FILE")})
    assert settings.hsts_max_age > 0
    assert settings.trusted_proxies


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit as shipped, but for ExecStart, which must name
    an executable that exists: here, this checkout's own `slotcast`."""
    reasons: list[str] = []
    analyze = ensure_systemd_analyze(reasons)
    if analyze is None:
        pytest.skip(reasons[0])
    slotcast = shutil.which("slotcast", path=str(Path(sys.executable).parent))
    assert slotcast is not None, "no `slotcast` beside this Python to stand in for /opt/slotcast"
    text = UNIT.read_text()
    assert "ExecStart=/opt/slotcast/venv/bin/slotcast serve" in text
    (tmp_path / UNIT.name).write_text(text.replace("/opt/slotcast/venv/bin/slotcast", slotcast))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "slotcast@8081.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stderr.strip(), f"systemd-analyze warned:\n{done.stderr}"


def test_systemd_accepts_the_webhook_worker_unit(tmp_path: Path) -> None:
    """The same for deploy/slotcast-webhooks.service, which runs `slotcast webhooks`."""
    reasons: list[str] = []
    analyze = ensure_systemd_analyze(reasons)
    if analyze is None:
        pytest.skip(reasons[0])
    slotcast = shutil.which("slotcast", path=str(Path(sys.executable).parent))
    assert slotcast is not None, "no `slotcast` beside this Python to stand in for /opt/slotcast"
    unit = REPO / "deploy" / "slotcast-webhooks.service"
    text = unit.read_text()
    assert "ExecStart=/opt/slotcast/venv/bin/slotcast webhooks" in text
    (tmp_path / unit.name).write_text(text.replace("/opt/slotcast/venv/bin/slotcast", slotcast))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / unit.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stderr.strip(), f"systemd-analyze warned:\n{done.stderr}"
