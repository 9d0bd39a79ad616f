"""All configuration, as one frozen object read from the environment and CLI flags.

Every field is `SLOTCAST_<NAME>` in the environment; `DATABASE_URL` and
`REDIS_URL` are honoured too, since that is what hosting platforms set. The
docs/configuration.md lists every setting with its default; `slotcast serve --help` shows the
flags that override them.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEV_SECRET = "slotcast-dev-secret-change-me-in-production"


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # No DATABASE_URL: run the embedded PostgreSQL with its data under data_dir.
    database_url: str | None = None
    # No broker URL: REDIS_URL if set, else the in-process broker (single instance).
    broker_url: str = "memory://"
    data_dir: Path = Path("var")
    jwt_secret: str = DEV_SECRET
    instance_id: str = field(default_factory=_default_instance_id)
    demo: bool = False
    log_level: str = "INFO"
    db_pool_min: int = 2
    db_pool_max: int = 10
    lock_timeout_ms: int = 1000
    statement_timeout_ms: int = 2000
    # Frames above max_frame_bytes get a `too_large` error and the connection lives on;
    # above 4x that, aiohttp closes the connection (1009), since it must not buffer more.
    max_frame_bytes: int = 64 * 1024
    # Frames waiting to be written to one connection; a client this far behind is cut off.
    outbox_limit: int = 1024
    # Bytes one connection may have pending (its transport's buffer and its outbox,
    # replies included) before it is cut off (4008); from 256 KiB on, its requests wait.
    outbox_bytes: int = 1024 * 1024
    # Bytes all connections together may have pending; past it the biggest are cut off.
    server_outbox_bytes: int = 64 * 1024 * 1024
    # A connection whose output stays over 256 KiB this long is cut off (4008); every
    # connection is checked against that and the budget every outbox_sweep_s.
    slow_consumer_s: float = 20.0
    outbox_sweep_s: float = 1.0
    # Slots one snapshot (a watch, GET .../slots) or dashboard may carry; more is `invalid`.
    max_snapshot_slots: int = 3000
    # Slots a schedule may open on one local date; a `set_schedule` opening more is `invalid`.
    max_slots_per_day: int = 144
    max_watches: int = 32
    max_watch_days: int = 62
    heartbeat_s: float = 20.0
    # Holds: how long a held slot waits for confirmation, and how many one patient may have.
    hold_ttl_s: float = 120.0
    max_holds_per_patient: int = 3
    # A patient's active future appointments (booked or held), per doctor and in all
    # (`appointment_limit` beyond), and how long a slot whose hold its patient released or
    # let lapse stays barred to that patient (`cooldown`; 0 turns it off). See
    # docs/scheduling.md#what-one-patient-may-claim.
    max_active_per_doctor: int = 2
    max_active_total: int = 6
    rehold_cooldown_s: float = 300.0
    # How often each instance sweeps expired holds, and tops slots up to the horizon.
    hold_sweep_s: float = 1.0
    horizon_sweep_s: float = 3600.0
    # The relay republishes changes no publish confirmed after relay_grace_s.
    relay_sweep_s: float = 1.0
    relay_grace_s: float = 2.0
    # A client resuming further behind than this gets a fresh snapshot instead.
    resume_max_versions: int = 1000
    # On SIGTERM: fail /readyz, wait drain_grace_s for the load balancer to notice,
    # then close clients (1012) drain_batch at a time, drain_interval_s apart.
    drain_grace_s: float = 1.0
    drain_batch: int = 500
    drain_interval_s: float = 0.05
    static_dir: Path = Path(__file__).resolve().parent.parent / "static"
    # Origins of the host application(s) that may frame the pages and hand them tokens
    # by postMessage, space-separated (e.g. "https://app.clinic.example").
    host_origins: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the environment, then explicit overrides (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("DATABASE_URL"):
            values["database_url"] = env["DATABASE_URL"]
        if env.get("REDIS_URL"):
            values["broker_url"] = env["REDIS_URL"]
        for f in fields(cls):
            raw = env.get(f"SLOTCAST_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(kind: Any, raw: str, name: str) -> Any:
    kind = str(kind)
    try:
        if kind == "bool":
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise ValueError(f"SLOTCAST_{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
