"""Upgrades and data lifecycle as the server runs them: the schema check at start, and
the background pruning every instance takes part in.

Start-up (`schema_ready`, called by `server.app.database`) follows
`SLOTCAST_MIGRATE`: `auto` applies pending expand migrations, as zero-config
development and the test harness need; `off` applies nothing, as a production
deployment that runs `slotcast migrate` as its own step wants. Both refuse, in one
line, a database this code cannot run on (`store.migrate.Compatibility.problem`).
The commands an operator runs are in `server/maintenance_cli.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web

from server.background import every
from server.keys import CLOCK, SETTINGS, STORE
from server.settings import Settings
from store.errors import StoreError
from store.lifecycle import Retention, prune
from store.migrate import check, migrate

log = logging.getLogger(__name__)

MIGRATE_MODES = ("auto", "off")
# A background round goes on until nothing is left, but at most this many batches (each
# its own short transaction, the connection back in the pool between them): enough to
# keep up with a million stored replies an hour, and the next round goes on.
ROUND_BATCHES = 1000


def retention_of(settings: Settings) -> Retention:
    return Retention(
        idempotency_keys=timedelta(seconds=settings.idempotency_retention_s),
        audit=timedelta(days=settings.audit_retention_days),
        ended_holds=timedelta(seconds=settings.ended_hold_retention_s),
        cooldown=timedelta(seconds=settings.rehold_cooldown_s),
        webhook_attempts=timedelta(seconds=settings.webhook_attempt_retention_s),
        batch=settings.prune_batch,
    )


async def schema_ready(dsn: str, settings: Settings) -> None:
    """Bring the schema to what this code needs, or refuse (`StoreError`, one line)."""
    if settings.migrate not in MIGRATE_MODES:
        raise StoreError(f"SLOTCAST_MIGRATE={settings.migrate!r}: use one of auto, off")
    connect_timeout_s = settings.db_timeout_ms / 1000
    if settings.migrate == "auto":
        applied = await migrate(dsn, connect_timeout_s=connect_timeout_s, contract=False)
        if applied:
            log.info("applied migrations %s", applied)
    state = await check(dsn, connect_timeout_s=connect_timeout_s)
    problem = state.problem(pending_allowed=False)
    if problem is not None:
        raise StoreError(problem)
    log.info(
        "database schema: %04d applied, this code knows %04d",
        max(state.applied, default=0),
        state.code,
    )


async def pruning(app: web.Application) -> AsyncIterator[None]:
    """Every instance prunes now and then; the prune lock lets one at a time do it."""
    settings = app[SETTINGS]
    retention = retention_of(settings)  # refuses nonsense at start, not an hour later
    if settings.prune_interval_s <= 0:
        yield
        return
    store, clock = app[STORE], app[CLOCK]

    async def round_() -> None:
        done = await prune(store, retention, now=clock(), max_batches=ROUND_BATCHES)
        if done.total:
            log.info("pruned %s", done.counts)

    task = asyncio.create_task(every(settings.prune_interval_s, round_, "prune"), name="prune")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
