"""All configuration, as one frozen object read from the environment and CLI flags.

Every field is `SLOTCAST_<NAME>` in the environment; `DATABASE_URL` and
`REDIS_URL` are honoured too, since that is what hosting platforms set. The
docs/configuration.md lists every setting with its default; `slotcast serve --help` shows the
flags that override them.

A field marked `SECRET` (a key, a password-bearing DSN) may also come from a file,
`SLOTCAST_<NAME>_FILE` (and `DATABASE_URL_FILE`, `REDIS_URL_FILE`): that is how
container secrets and systemd credentials are handed over, and it keeps them out of
the environment other processes and crash reports see, and out of `ps`.
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
# Settings that may be read from a file named by `<VARIABLE>_FILE` (module docstring).
SECRET: Mapping[str, bool] = {"secret": True}
# The generic variables hosting platforms set, honoured after the SLOTCAST_ ones.
ALIASES: Mapping[str, str] = {"database_url": "DATABASE_URL", "broker_url": "REDIS_URL"}


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # No DATABASE_URL: run the embedded PostgreSQL with its data under data_dir.
    database_url: str | None = field(default=None, metadata=SECRET)
    # No broker URL: REDIS_URL if set, else the in-process broker (single instance).
    broker_url: str = field(default="memory://", metadata=SECRET)
    data_dir: Path = Path("var")
    jwt_secret: str = field(default=DEV_SECRET, metadata=SECRET)
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
    # Attendance (`mark`): a patient may be marked arrived from this long before the
    # start (no-show and fulfilled only from the start: `too_early` before), and a mark
    # may be undone (`unmark`) for this long after it was made.
    arrive_early_minutes: int = 60
    unmark_window_s: float = 600.0
    # How often each instance sweeps expired holds, and tops slots up to the horizon.
    hold_sweep_s: float = 1.0
    horizon_sweep_s: float = 3600.0
    # The relay republishes changes no publish confirmed after relay_grace_s.
    relay_sweep_s: float = 1.0
    relay_grace_s: float = 2.0
    # A client resuming further behind than this gets a fresh snapshot instead.
    resume_max_versions: int = 1000
    # Slots that rooms may keep in memory, over all doctors, so that watchers joining a
    # watched doctor cost no database read (server/calendars.py); 0 turns it off.
    snapshot_cache_slots: int = 100_000
    # On SIGTERM: fail /readyz, wait drain_grace_s for the load balancer to notice,
    # then close clients (1012) drain_batch at a time, drain_interval_s apart.
    drain_grace_s: float = 1.0
    drain_batch: int = 500
    drain_interval_s: float = 0.05
    static_dir: Path = Path(__file__).resolve().parent.parent / "static"
    # Origins of the host application(s) that may frame the pages and hand them tokens
    # by postMessage, space-separated (e.g. "https://app.clinic.example").
    host_origins: str = ""
    # ---- facing the open internet (docs/protocol.md, "Limits"; docs/operating.md) ----
    # Request budgets, in `limits` notation ("N/P units", e.g. "1000/15 minutes"); "off"
    # turns one off. Each is a sliding window. Per WebSocket connection, every frame:
    rate_connection: str = "100/10 seconds"
    # Per identity (token subject and role), over all its connections, instances and REST:
    rate_identity_reads: str = "1000/15 minutes"
    rate_identity_writes: str = "300/15 minutes"
    # Per client address, for requests without a token (a clinic's patients behind one
    # NAT address each have their own token, so they count per identity instead):
    rate_address: str = "1000/15 minutes"
    # Per client address: tokens refused as invalid (signing in); past it, no token from
    # that address is even checked until the window moves on.
    rate_auth_failures: str = "10/15 minutes"
    # A connection refused this many times in a row for rate is closed (4029).
    rate_close_after: int = 20
    # Bound on each call to the counters' Redis; slower or failing calls admit the request.
    limiter_timeout_ms: int = 100
    # Open WebSockets (and upgrades under way) per client address and per instance;
    # past either, upgrades are refused with 503. 0: no cap.
    max_connections_per_address: int = 500
    max_connections: int = 10_000
    # An anonymous connection that watches nothing is closed (4009) after this long.
    idle_anonymous_s: float = 60.0
    # Slow HTTP: a connection must finish its request head within header_timeout_s of
    # opening (or of its previous response: also the keep-alive idle time), and a
    # request its body within body_timeout_s of its head.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    # Peers (addresses or networks, space-separated) whose X-Forwarded-For is believed:
    # the balancer's. Anyone else's address is the peer's own.
    trusted_proxies: str = ""
    # Who may read /metrics: client addresses or networks (space-separated), or anyone
    # presenting `Authorization: Bearer <metrics_token>` when it is set.
    metrics_allow: str = "127.0.0.0/8 ::1"
    metrics_token: str = field(default="", metadata=SECRET)
    # ---- identity (server/auth.py, server/jwks.py; docs/operating.md, "Signing in in
    # production"). Outside --demo, start-up needs a secret or keys of at least 32 bytes
    # (jwt_secret, jwt_keys) or an identity provider (jwt_jwks_url).
    # Keys with ids, "kid:secret" space-separated: a token names its key in its `kid`
    # header, so a new key can sign while the old one still verifies (rotation).
    jwt_keys: str = field(default="", metadata=SECRET)
    # The jwt_keys entry that signs (`slotcast token`, the demo sign-in); with a single
    # key, that one. Tokens without a `kid` verify against jwt_secret if it is set, else
    # against this key.
    jwt_signing_key_id: str = ""
    # An identity provider's tokens (RS256/ES256), checked against its JWKS. Issuer and
    # audience are required with it; the claims naming Slotcast's subject and role are
    # settings (dotted for nested claims, e.g. "realm_access.roles").
    jwt_jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_algorithms: str = "RS256 ES256"
    jwt_subject_claim: str = "sub"
    jwt_role_claim: str = "role"
    # Its keys are fetched again after jwt_jwks_cache_s, or for a key id not yet seen, but
    # never more often than once per jwt_jwks_refresh_s (random key ids cost the provider
    # nothing); one fetch may take jwt_jwks_timeout_ms.
    jwt_jwks_cache_s: float = 300.0
    jwt_jwks_refresh_s: float = 10.0
    jwt_jwks_timeout_ms: int = 2000
    # ---- logs (docs/operations.md, "Logs") ----
    # `text` (the default) or `json`: one JSON object per line, with instance, request or
    # connection id and subject as fields.
    log_format: str = "text"
    # One line per HTTP request (`slotcast.access`); health checks and scrapes only at DEBUG.
    access_log: bool = True
    # ---- upgrades and data lifecycle (docs/operating.md, "Upgrades"; docs/operations.md,
    # "Retention and erasure"; server/maintenance.py) ----
    # At start, "auto" applies pending expand migrations (never a contract step); "off"
    # applies none and refuses to start while this code needs one (`slotcast migrate`).
    # Either way an instance refuses a database whose schema requires newer code.
    migrate: str = "auto"
    # Stored replies to idempotency keys are kept this long; a retry after that runs anew.
    idempotency_retention_s: float = 86400.0
    # Change records (the audit trail, and what a resume replays) are kept this many days.
    audit_retention_days: int = 400
    # Rows of holds that ended without a booking (released, lapsed) are kept this long (at
    # least the re-hold cool-down); the change log keeps their story for the audit period.
    ended_hold_retention_s: float = 86400.0
    # Each instance tries to prune every prune_interval_s (0: never; see `slotcast prune`),
    # prune_batch rows per transaction, one instance at a time.
    prune_interval_s: float = 3600.0
    prune_batch: int = 1000
    # ---- behind TLS (docs/deploy.md, "HAProxy and TLS at the balancer") ----
    # Strict-Transport-Security max-age, in seconds, sent on responses to requests that
    # came over https (directly, or `X-Forwarded-Proto: https` from a trusted proxy);
    # 0 sends none. Cookies on such responses are always `Secure`, whatever this says.
    hsts_max_age: int = 0
    # ---- read replicas (store/replicas.py; docs/operating.md, "Read replicas") ----
    # PostgreSQL streaming replicas, DSNs separated by spaces (none: every read on the
    # primary). Snapshots, REST slot reads, dashboards, resumes and the doctor search go
    # to them; commands and everything under a lock stay on the primary.
    replica_urls: str = field(default="", metadata=SECRET)
    # A replica read older than the version this instance (or the client's `since`)
    # knows waits this long for the replica to replay it, then the primary answers.
    replica_wait_ms: int = 20
    # A replica further behind than this (or failing) leaves the rotation until it is
    # current again; each replica is checked every replica_check_s.
    replica_max_lag_ms: int = 1000
    replica_check_s: float = 1.0
    # ---- webhooks (server/webhooks.py; docs/webhooks.md) ----
    # Every instance looks for endpoints with work every webhook_poll_s (sooner after a
    # commit of its own) and delivers to at most webhook_concurrency at once, each one
    # leased for webhook_lease_s and renewed while it works: a dead instance's endpoints
    # move to another once that has run out.
    webhook_poll_s: float = 1.0
    webhook_concurrency: int = 16
    webhook_lease_s: float = 30.0
    # One delivery (connect, send, answer) may take this long before it counts as failed.
    webhook_timeout_s: float = 10.0
    # Retries: capped exponential backoff with jitter from webhook_retry_base_s up to
    # webhook_retry_max_s (a receiver's Retry-After is honoured up to that cap). An
    # endpoint failing for webhook_disable_after_s is disabled; its backlog is kept.
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 600.0
    webhook_disable_after_s: float = 259200.0
    # After a rotation, the previous secret signs beside the new one this long.
    webhook_rotation_overlap_s: float = 86400.0
    # Endpoint URLs resolving to loopback, link-local or private addresses are refused
    # (server-side request forgery) unless this is on (tests, a clinic's own network).
    webhook_allow_private: bool = False
    webhook_max_endpoints: int = 100
    # Delivery attempts (the REST view) are pruned after this long, with the rest.
    webhook_attempt_retention_s: float = 2592000.0
    # API keys (server.apikeys). Their hashes are HMAC-SHA256 keyed with this pepper, a
    # secret kept apart from the database (changing it invalidates every key); empty
    # is an empty HMAC key, as strong as plain SHA-256 for 256-bit random secrets. A verified key is
    # trusted in process for api_key_cache_s (a revocation reaches every instance within
    # it), at most api_key_cache_size of them; last use is written every
    # api_key_touch_s at most, per key.
    api_key_pepper: str = field(default="", metadata=SECRET)
    api_key_cache_s: float = 30.0
    api_key_cache_size: int = 1000
    api_key_touch_s: float = 60.0
    # Webhook delivery's own database pool (server/webhooks.py): its connections, apart
    # from the booking pool, so delivery can never take a booking's connection. Per
    # endpoint, at most webhook_inflight messages are in flight at once, one per doctor
    # (a doctor's next only after its previous one was answered 2xx).
    webhook_db_pool: int = 2
    webhook_inflight: int = 8
    # The clinic's name, where a patient reads where to go (the confirmation after booking
    # and the LOCATION of an appointment's .ics, server/ics.py) when the directory has no
    # address for the doctor. Empty: the pages say "at the clinic", the .ics names no place.
    clinic_name: str = ""
    # Connections per instance (docs/operating.md, "Many connections"): the listening
    # socket's accept queue (the kernel caps it at net.core.somaxconn), so a crowd that
    # connects at once waits in it rather than in SYN retries. debug_memory serves
    # GET /debug/memory, a census of live objects for bench/connmem.py: never in production.
    listen_backlog: int = 4096
    debug_memory: bool = False
    # Where webhooks are delivered from (server/webhooks.py; docs/webhooks.md, "A
    # delivery worker"): `inline`, in every serving instance beside the bookings; or
    # `worker`, only in `slotcast webhooks` processes, so delivery's CPU never shares an
    # event loop with bookings (serving instances then deliver nothing).
    webhooks: str = "inline"
    # Where a `slotcast webhooks` worker serves its own /metrics (its attempts and
    # failures per endpoint, and the process), on SLOTCAST_HOST under the same
    # metrics_allow and metrics_token as a serving instance's; 0: none.
    webhooks_metrics_port: int = 9465

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the environment, then explicit overrides (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            secret = bool(f.metadata.get("secret"))
            raw = _lookup(env, f"SLOTCAST_{f.name.upper()}", secret)
            if raw is None and f.name in ALIASES:
                raw = _lookup(env, ALIASES[f.name], secret)
            if raw is not None:
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _lookup(env: Mapping[str, str], name: str, secret: bool) -> str | None:
    """`name`'s value, or for a secret the content of the file `name_FILE` names."""
    raw = env.get(name) or None
    path = env.get(f"{name}_FILE") if secret else None
    if not path:
        return raw
    if raw is not None:
        raise ValueError(f"both {name} and {name}_FILE are set: keep one")
    try:
        content = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{name}_FILE={path!r} cannot be read: {reason}") from None
    if not content:
        raise ValueError(f"{name}_FILE={path!r} is empty")
    return content


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
