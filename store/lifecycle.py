"""How long data lives, and how a patient's identity leaves it.

Two kinds of maintenance pass the change log's append-only guard (migration 0006),
and only through `_maintenance`, which names itself in the transaction-local setting
`slotcast.maintenance` that the trigger checks:

- **prune** deletes change records older than the audit period, idempotency keys
  older than their retention (24 h by default, as payment APIs keep theirs) and the
  rows of holds that ended without a booking once the re-hold cool-down cannot need
  them (their story stays in the change log), and webhook delivery attempts older
  than theirs (a month by default). It runs in bounded batches, each one
  short transaction that first tries an advisory lock, so one instance prunes at a
  time and none ever waits for another. A client resuming from a pruned version gets
  a fresh snapshot: `Scheduling.missed` replays only a complete run of versions.
- **erase** replaces a patient's subject with a pseudonym, a random token recorded
  nowhere, in every row that names them, in one transaction under the locks of every
  doctor concerned and the patient's own: rows are rewritten, never deleted, so each
  doctor's versions stay gap-free and the audit still tells what happened, to someone
  no longer named. `ERASERS` lists every table that names a patient; a table added
  later joins erasure by adding its step there. The webhook tables (store.webhooks)
  need none: a webhook's backlog is the change log past the endpoint's cursor and its
  payload is built from the change record when sent, so rewriting `changes` erases
  the patient from every message not yet sent; attempts keep no payload. A patient's
  display name (`appointments.patient_name`, and in the change log's appointments) is
  cleared with their subject; `api_keys` names no patient.

Settings (`Retention`) and the operator's view are in docs/operations.md, "Retention
and erasure".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from store import sql
from store.constants import LOCK_NS_DOCTOR, LOCK_NS_PATIENT, LOCK_NS_PRUNE
from store.errors import StoreError, Unavailable
from store.pool import Store
from store.tx import resolve_now

log = logging.getLogger(__name__)

PSEUDONYM_PREFIX = "erased-"
MIN_AUDIT = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Retention:
    idempotency_keys: timedelta = timedelta(hours=24)
    audit: timedelta = timedelta(days=400)
    ended_holds: timedelta = timedelta(hours=24)
    webhook_attempts: timedelta = timedelta(days=30)
    # Never shorter than this for ended holds: the re-hold cool-down reads them.
    cooldown: timedelta = timedelta(0)
    batch: int = 1000

    def __post_init__(self) -> None:
        # Live rooms fill gaps and the relay republishes from the most recent records,
        # and a batch of nothing would never finish.
        if self.audit < MIN_AUDIT:
            raise StoreError("the audit period must be at least a day")
        if self.batch < 1:
            raise StoreError("a prune batch must delete at least one row")


@dataclass(slots=True)
class Pruned:
    """Rows deleted, per kind; `busy` when another instance held the prune lock."""

    counts: dict[str, int] = field(
        default_factory=lambda: {
            "changes": 0,
            "idempotency_keys": 0,
            "ended_holds": 0,
            "webhook_attempts": 0,
        }
    )
    busy: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.asynccontextmanager
async def _maintenance(conn: asyncpg.Connection, kind: str) -> AsyncIterator[asyncpg.Connection]:
    """A transaction the change log's guard lets `kind` ('prune', 'erase') through."""
    async with conn.transaction():
        await conn.execute(sql.MAINTENANCE, kind)
        yield conn


async def prune(
    store: Store,
    retention: Retention,
    *,
    now: datetime | None = None,
    max_batches: int | None = None,
) -> Pruned:
    """Delete what has outlived its retention, `retention.batch` rows per transaction.

    Stops when nothing is left, after `max_batches` (a background round's share), or
    when another instance holds the prune lock. Each batch is bounded by the store's
    time bounds like any other unit of work."""
    now = resolve_now(now)
    cutoffs = {
        "changes": (sql.PRUNE_CHANGES, now - retention.audit),
        "idempotency_keys": (sql.PRUNE_IDEMPOTENCY_KEYS, now - retention.idempotency_keys),
        "ended_holds": (
            sql.PRUNE_ENDED_HOLDS,
            now - max(retention.ended_holds, retention.cooldown),
        ),
        "webhook_attempts": (sql.PRUNE_WEBHOOK_ATTEMPTS, now - retention.webhook_attempts),
    }
    done = Pruned()
    left = set(cutoffs)
    batches = 0
    while left and (max_batches is None or batches < max_batches):
        batches += 1
        async with store.connection() as conn, _maintenance(conn, "prune"):
            if not await conn.fetchval(sql.PRUNE_TRY_LOCK, LOCK_NS_PRUNE):
                done.busy = True
                return done
            for kind in sorted(left):
                statement, cutoff = cutoffs[kind]
                deleted = _count(await conn.execute(statement, cutoff, retention.batch))
                done.counts[kind] += deleted
                if deleted < retention.batch:
                    left.discard(kind)
    return done


def _count(status: str) -> int:
    """Rows from a command tag such as `DELETE 17` or `UPDATE 3`."""
    return int(status.rsplit(" ", 1)[-1])


# ---- erasure ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """A patient's subject and the pseudonym replacing it, both bare and as an actor."""

    subject: str
    pseudonym: str

    @property
    def actor(self) -> str:
        return f"patient:{self.subject}"

    @property
    def pseudonym_actor(self) -> str:
        return f"patient:{self.pseudonym}"


Eraser = Callable[[asyncpg.Connection, Subject, list[int]], Awaitable[int]]


async def _erase_appointments(conn: asyncpg.Connection, who: Subject, doctors: list[int]) -> int:
    return _count(
        await conn.execute(
            sql.ERASE_APPOINTMENTS, who.subject, who.pseudonym, who.actor, who.pseudonym_actor
        )
    )


async def _erase_changes(conn: asyncpg.Connection, who: Subject, doctors: list[int]) -> int:
    rows = await conn.fetch(sql.ERASE_CHANGES_FIND, doctors, who.subject, who.actor)
    if not rows:
        return 0
    rewritten = [_rewrite_private(r["private"], who) for r in rows]
    await conn.execute(
        sql.ERASE_CHANGES_WRITE,
        [r["doctor_id"] for r in rows],
        [r["version"] for r in rows],
        [who.pseudonym_actor if r["actor"] == who.actor else r["actor"] for r in rows],
        rewritten,
    )
    return len(rows)


def _rewrite_private(private: dict[str, Any], who: Subject) -> dict[str, Any]:
    """The private half with the patient's name replaced where `ChangeDetail` keeps it."""
    out = dict(private)
    if out.get("actor") == who.actor:
        out["actor"] = who.pseudonym_actor
    if out.get("on_behalf_of") == who.subject:
        out["on_behalf_of"] = who.pseudonym
    if "appointments" in out:
        out["appointments"] = [
            {
                **a,
                "patient_id": who.pseudonym,
                "patient_name": None,
                "visit_reason": None,
                "patient_contact": None,
            }
            if a.get("patient_id") == who.subject
            else a
            for a in out["appointments"]
        ]
    return out


async def _erase_idempotency_keys(
    conn: asyncpg.Connection, who: Subject, doctors: list[int]
) -> int:
    return _count(await conn.execute(sql.ERASE_IDEMPOTENCY_KEYS, who.actor))


# Every table that names a patient, in the order erasure visits them. A new table that
# names patients adds its step here, and erasure covers it. (The webhook tables name
# none: their backlog is this change log, see store.webhooks.)
ERASERS: dict[str, Eraser] = {
    "appointments": _erase_appointments,
    "changes": _erase_changes,
    "idempotency_keys": _erase_idempotency_keys,
}


@dataclass(frozen=True, slots=True)
class Erased:
    """Rows rewritten (or, for stored replies, deleted) per table, and the doctors."""

    counts: dict[str, int]
    doctors: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def erase_patient(store: Store, subject: str, *, timeout_s: float = 60.0) -> Erased:
    """Pseudonymise `subject` everywhere; idempotent (a second run finds nothing).

    One transaction, bounded by `timeout_s` as a whole (finding the doctors scans the
    change log), under the locks of every doctor whose rows name the patient, taken in
    id order before the patient's own, as every command takes them. A doctor whose rows
    began to name the patient between the look-up and the locks makes it start over."""
    if not subject:
        raise StoreError("a patient's subject is required")
    who = Subject(subject, PSEUDONYM_PREFIX + secrets.token_hex(12))
    for _ in range(3):
        try:
            async with asyncio.timeout(timeout_s):
                return await _erase(store, who, timeout_s)
        except _Moved:
            continue
        except TimeoutError:
            raise Unavailable(f"erasure did not finish within {timeout_s:g} s") from None
    raise StoreError("the patient's records kept moving to new doctors; try again")


async def _erase(store: Store, who: Subject, timeout_s: float) -> Erased:
    async with store.connection(bounded=False) as conn, _maintenance(conn, "erase"):
        await conn.execute(sql.LOCAL_STATEMENT_TIMEOUT, str(int(timeout_s * 1000)))
        doctors: list[int] = await conn.fetchval(sql.ERASE_DOCTORS, who.subject, who.actor)
        for doctor_id in doctors:
            await conn.execute(sql.DOCTOR_LOCK, LOCK_NS_DOCTOR, doctor_id)
        await conn.execute(sql.PATIENT_LOCK, LOCK_NS_PATIENT, who.subject)
        # Under the locks nothing new can name the patient; was anything new before them?
        if set(await conn.fetchval(sql.ERASE_DOCTORS, who.subject, who.actor)) - set(doctors):
            raise _Moved
        counts = {name: await step(conn, who, doctors) for name, step in ERASERS.items()}
    log.info("erased a patient from the rows of doctors %s: %s", doctors, counts)
    return Erased(counts, doctors)


class _Moved(Exception):
    """A doctor began to name the patient between the look-up and the locks."""
