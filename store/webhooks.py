"""Webhook endpoints, their cursors over the change log, their backlog and attempts.

The change log is the source: every committed change of a doctor is a candidate
message for every endpoint that follows that doctor. Each endpoint keeps a durable
cursor per doctor (`webhook_cursors`): the last version it was sent (or skipped,
as a kind it did not ask for). Its backlog is the change log past that cursor, so
nothing is copied per endpoint, a disabled endpoint keeps its backlog for as long
as the audit period keeps the change log, and erasing a patient from the change
log (store.lifecycle) erases them from every message not yet sent: the payload is
built from the change record when it is sent. Attempts record no payload and no
response body, so they name no patient either.

One instance delivers to a given endpoint at a time: it holds the endpoint's lease
(`leased_by`, `lease_until`), claimed with `FOR UPDATE SKIP LOCKED` and renewed
while it works; a dead holder's lease runs out and another instance claims it.
Every write that moves the cursor checks the lease first, so an instance that lost
it stops rather than race its successor. HTTP is not here (the store knows no
HTTP): `server/webhooks.py` sends.
"""

from __future__ import annotations

import base64
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from store import sql
from store.errors import Invalid, NotFound
from store.pool import Store

log = logging.getLogger(__name__)

# Change kinds (store.commands, store.steps) as the webhook event types the clinic's
# systems subscribe to; docs/webhooks.md has the table. A kind not listed is sent under
# its own name.
EVENT_TYPES: dict[str, str] = {
    "slot.held": "appointment.held",
    "hold.released": "appointment.released",
    "hold.expired": "appointment.expired",
    "slot.booked": "appointment.booked",
    "appointment.cancelled": "appointment.cancelled",
    "appointment.rescheduled": "appointment.rescheduled",
    "appointment.arrived": "appointment.arrived",
    "appointment.fulfilled": "appointment.fulfilled",
    "appointment.noshow": "appointment.noshow",
    "appointment.booked": "appointment.booked",
    "slot.blocked": "slot.blocked",
    "slot.unblocked": "slot.unblocked",
    "schedule.changed": "schedule.updated",
    "slots.opened": "slots.opened",
    "slots.closed": "slots.closed",
    "slots.conflict": "slots.conflict",
    "slots.conflict_resolved": "slots.conflict_resolved",
    "slots.blocked": "slots.blocked",
    "slots.unblocked": "slots.unblocked",
}
KNOWN_EVENTS = frozenset(EVENT_TYPES.values())
SECRET_PREFIX = "whsec_"


def event_types(kinds: list[str]) -> list[str]:
    """A change's event types, in the order its kinds happened, without repeats."""
    out: list[str] = []
    for kind in kinds:
        event = EVENT_TYPES.get(kind, kind)
        if event not in out:
            out.append(event)
    return out


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: int
    url: str
    description: str
    event_types: list[str]
    doctor_ids: list[int]
    secret: str
    previous_secret: str | None
    previous_until: datetime | None
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    failing_since: datetime | None
    failures: int
    next_attempt_at: datetime | None

    @classmethod
    def of_row(cls, row: asyncpg.Record) -> Endpoint:
        return cls(**dict(row))

    def signing_secrets(self, now: datetime) -> list[str]:
        """The current secret, and the previous one during a rotation's overlap."""
        out = [self.secret]
        if self.previous_secret and self.previous_until and self.previous_until > now:
            out.append(self.previous_secret)
        return out

    def wants(self, events: list[str]) -> bool:
        return not self.event_types or any(e in self.event_types for e in events)

    def view(self) -> dict[str, Any]:
        """What the admin API shows: everything but the secrets."""
        return {
            "id": self.id,
            "url": self.url,
            "description": self.description,
            "event_types": self.event_types,
            "doctor_ids": self.doctor_ids,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "created_at": _instant(self.created_at),
            "updated_at": _instant(self.updated_at),
            "failing_since": _instant(self.failing_since),
            "failures": self.failures,
            "next_attempt_at": _instant(self.next_attempt_at),
            "rotation_overlap_until": _instant(self.previous_until),
        }


def _instant(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Message:
    """One change as one webhook message: the same id and bytes on every retry."""

    doctor_id: int
    version: int
    events: list[str]
    body: bytes
    committed_at: datetime

    @property
    def id(self) -> str:
        return f"msg_d{self.doctor_id}v{self.version}"

    @property
    def event_type(self) -> str:
        # The last kind is the command's own; earlier ones are work it did first (a
        # hold that had expired, freed before the booking).
        return self.events[-1] if self.events else "change"

    @classmethod
    def of_record(cls, row: asyncpg.Record) -> Message:
        private = row["private"] or {}
        public = row["public"]
        events = event_types(list(private.get("kind", [])))
        data = {
            "doctor_id": row["doctor_id"],
            "version": row["version"],
            "events": events,
            "actor": private.get("actor"),
            # The patient a doctor, an admin or an API key acted for (null otherwise).
            "on_behalf_of": private.get("on_behalf_of"),
            "appointments": private.get("appointments", []),
            "slots": public.get("slots", []),
            "removed": public.get("removed", []),
        }
        if private.get("blocks"):  # only then: every earlier message keeps its very bytes
            data["blocks"] = private["blocks"]
        payload = {
            "type": events[-1] if events else "change",
            "timestamp": _instant(row["created_at"]),
            "data": data,
        }
        return cls(
            row["doctor_id"], row["version"], events, orjson.dumps(payload), row["created_at"]
        )


@dataclass(slots=True)
class Batch:
    """What to send next: replays first, then the backlog past the cursors."""

    replays: list[Message] = field(default_factory=list)
    backlog: list[Message] = field(default_factory=list)


# ---- administration ----------------------------------------------------------------------------


async def create_endpoint(
    store: Store,
    *,
    url: str,
    description: str,
    event_types: list[str],
    doctor_ids: list[int],
    max_endpoints: int,
) -> Endpoint:
    async with store.connection() as conn, conn.transaction():
        if await conn.fetchval(sql.WEBHOOK_COUNT) >= max_endpoints:
            raise Invalid(f"at most {max_endpoints} webhook endpoints")
        row = await conn.fetchrow(
            sql.WEBHOOK_CREATE, url, description, event_types, doctor_ids, new_secret()
        )
    return Endpoint.of_row(row)


async def endpoints(store: Store) -> list[Endpoint]:
    return [Endpoint.of_row(r) for r in await store.fetch(sql.WEBHOOK_LIST)]


async def endpoint(store: Store, endpoint_id: int) -> Endpoint:
    row = await store.fetchrow(sql.WEBHOOK_GET, endpoint_id)
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return Endpoint.of_row(row)


async def update_endpoint(
    store: Store,
    endpoint_id: int,
    *,
    url: str | None = None,
    description: str | None = None,
    event_types: list[str] | None = None,
    doctor_ids: list[int] | None = None,
    enabled: bool | None = None,
) -> Endpoint:
    row = await store.fetchrow(
        sql.WEBHOOK_UPDATE, endpoint_id, url, description, event_types, doctor_ids, enabled
    )
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return Endpoint.of_row(row)


async def delete_endpoint(store: Store, endpoint_id: int) -> None:
    if await store.execute(sql.WEBHOOK_DELETE, endpoint_id) == "DELETE 0":
        raise NotFound(f"no webhook endpoint {endpoint_id}")


async def rotate_secret(store: Store, endpoint_id: int, *, overlap_until: datetime) -> Endpoint:
    row = await store.fetchrow(sql.WEBHOOK_ROTATE, endpoint_id, new_secret(), overlap_until)
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return Endpoint.of_row(row)


@dataclass(frozen=True, slots=True)
class Attempt:
    message_id: str
    doctor_id: int
    version: int
    event_type: str
    status: int | None
    ok: bool
    latency_ms: float
    error: str | None = None


async def attempts(
    store: Store, endpoint_id: int, *, limit: int, before: int | None = None
) -> list[dict[str, Any]]:
    await endpoint(store, endpoint_id)  # not_found for an unknown endpoint
    rows = await store.fetch(sql.WEBHOOK_ATTEMPTS, endpoint_id, before or 2**62, limit)
    return [{**dict(r), "attempted_at": _instant(r["attempted_at"])} for r in rows]


async def replay(
    store: Store, endpoint_id: int, *, since: datetime, until: datetime, limit: int
) -> int:
    """Queue the endpoint's changes committed in [since, until) to be sent again."""
    await endpoint(store, endpoint_id)
    queued: int = await store.fetchval(sql.WEBHOOK_REPLAY, endpoint_id, since, until, limit)
    return queued


# ---- delivery ----------------------------------------------------------------------------------


async def claim(
    store: Store, instance: str, *, lease_s: float, limit: int, serving: list[int]
) -> list[Endpoint]:
    rows = await store.fetch(sql.WEBHOOK_CLAIM, instance, lease_s, limit, serving)
    return [Endpoint.of_row(r) for r in rows]


async def renew(
    store: Store, endpoint_id: int, instance: str, *, lease_s: float
) -> Endpoint | None:
    row = await store.fetchrow(sql.WEBHOOK_RENEW, endpoint_id, instance, lease_s)
    return None if row is None else Endpoint.of_row(row)


async def release(store: Store, endpoint_id: int, instance: str) -> None:
    await store.execute(sql.WEBHOOK_RELEASE, endpoint_id, instance)


async def forget_orphaned_replays(store: Store, endpoint_id: int) -> None:
    """Replays of changes pruned meanwhile have nothing left to send."""
    await store.execute(sql.WEBHOOK_REPLAYS_ORPHANED, endpoint_id)


async def next_batch(
    store: Store, endpoint_id: int, instance: str, *, busy: list[int], per_doctor: int, limit: int
) -> tuple[Endpoint, Batch] | None:
    """The endpoint as it is now and its next messages for many doctors at once (replays
    first), leaving out the doctors in `busy` (a message of theirs in flight: their next
    comes after it); None if `instance` no longer holds it (or it was disabled)."""
    async with store.connection() as conn:
        row = await conn.fetchrow(sql.WEBHOOK_HELD, endpoint_id, instance)
        if row is None:
            return None
        held = dict(row)
        queued = held.pop("replays_queued")
        ep = Endpoint(**held)
        replays = await conn.fetch(sql.WEBHOOK_REPLAYS_NEXT, ep.id, limit, busy) if queued else []
        backlog = (
            []
            if replays
            else await conn.fetch(
                sql.WEBHOOK_BACKLOG_NEXT, ep.id, ep.doctor_ids, per_doctor, limit, busy
            )
        )
    return ep, Batch(
        [Message.of_record(r) for r in replays], [Message.of_record(r) for r in backlog]
    )


async def delivered(
    store: Store,
    endpoint_id: int,
    instance: str,
    *,
    cursors: dict[int, int],
    replayed: list[Message],
    attempts: list[Attempt],
) -> bool:
    """Move the cursors past what was sent or skipped and record the attempts, in one
    statement for a whole batch of doctors. False: stop sending, the lease was lost
    (nothing written) or the endpoint was disabled meanwhile (written all the same)."""
    held: bool = await store.fetchval(
        sql.WEBHOOK_DELIVERED,
        endpoint_id,
        list(cursors),
        list(cursors.values()),
        [m.doctor_id for m in replayed],
        [m.version for m in replayed],
        instance,
        [a.message_id for a in attempts],
        [a.doctor_id for a in attempts],
        [a.version for a in attempts],
        [a.event_type for a in attempts],
        [a.status for a in attempts],
        [a.ok for a in attempts],
        [a.latency_ms for a in attempts],
        [a.error for a in attempts],
    )
    return held


async def failed(
    store: Store,
    endpoint_id: int,
    instance: str,
    attempt: Attempt,
    *,
    retry_at: datetime,
    disable_after_s: float,
) -> bool | None:
    """Record a failed attempt and when to retry: whether the endpoint is still enabled,
    or None if the lease had been lost meanwhile (its holder decides)."""
    row = await store.fetchrow(
        sql.WEBHOOK_FAILED,
        endpoint_id,
        attempt.message_id,
        attempt.doctor_id,
        attempt.version,
        attempt.event_type,
        attempt.status,
        attempt.latency_ms,
        retry_at,
        disable_after_s,
        attempt.error or "failed",
        instance,
    )
    return None if row is None else bool(row["enabled"])


async def backlog(store: Store) -> dict[int, tuple[int, float]]:
    """Per endpoint: changes not yet past its cursors (and replays), and the oldest's age."""
    ids = [r["id"] for r in await store.fetch(sql.WEBHOOK_ENDPOINT_IDS)]
    found = {
        r["id"]: (int(r["backlog"]), float(r["oldest_s"]))
        for r in await store.fetch(sql.WEBHOOK_BACKLOG)
    }
    return {i: found.get(i, (0, 0.0)) for i in ids}
