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
    # Client-side bounds, for when PostgreSQL or Redis cannot enforce their own (frozen,
    # unreachable): a statement or a whole transaction, waiting for a pooled connection,
    # one broker call, the /readyz probe. Past them a request gets `unavailable`.
    db_timeout_ms: int = 3000
    db_acquire_timeout_ms: int = 1000
    broker_timeout_ms: int = 1000
    ready_timeout_ms: int = 800
    # At start, how long to wait for PostgreSQL, then for Redis, before giving up;
    # at exit, how long closing may take after the drain before the process just exits.
    startup_wait_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    # Frames above max_frame_bytes get a `too_large` error and the connection lives on;
    # above 4x that, aiohttp closes the connection (1009), since it must not buffer more.
    max_frame_bytes: int = 64 * 1024
    # Frames waiting to be written to one connection; a client this far behind is cut off.
    outbox_limit: int = 1024
    max_watches: int = 32
    max_watch_days: int = 62
    heartbeat_s: float = 20.0
    # Holds: how long a held slot waits for confirmation, and how many one patient may have.
    hold_ttl_s: float = 120.0
    max_holds_per_patient: int = 3
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
