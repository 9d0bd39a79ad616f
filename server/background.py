"""Periodic upkeep every instance runs: holds, the slot horizon, and the relay.

Every instance runs both; the doctor's lock and the re-checks under it make that
safe, and it means a hold expires on time even when its holder is gone and its
instance has died, and after any restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from protocol.errors import SlotcastError
from server.metrics import Metrics
from server.service import Clock, Publisher
from store.database import Store

log = logging.getLogger(__name__)


async def sweep_holds(store: Store, clock: Clock) -> None:
    changes = await store.expire_holds(now=clock())
    if changes:
        log.info("expired holds of %d doctors", len(changes))


async def sweep_horizon(store: Store, clock: Clock) -> None:
    """Open the slots each doctor's schedule promises up to the (rolling) horizon."""
    for doctor_id in await store.doctor_ids():
        await store.materialize_slots(doctor_id, now=clock())


async def relay(store: Store, publisher: Publisher, metrics: Metrics, grace_s: float) -> None:
    """Publish what was committed but never confirmed published (e.g. a crash in between)."""
    older_than = datetime.now(UTC) - timedelta(seconds=grace_s)
    changes = await store.unpublished(older_than=older_than)
    if changes:
        log.info("relaying %d unpublished changes", len(changes))
        metrics.relayed.inc(len(changes))
        publisher.enqueue(changes)


async def every(interval: float, job: Callable[[], Awaitable[None]], name: str) -> None:
    """Run `job` forever, `interval` seconds apart; a failure is logged, never fatal."""
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except SlotcastError as exc:
            log.warning("%s failed: %s", name, exc)
        except Exception:
            log.exception("%s failed", name)
