"""Periodic upkeep every instance runs: holds, the slot horizon, and the relay's sweep.

Every instance runs all three; the doctor's lock and the re-checks under it make that
safe, and it means a hold expires on time even when its holder is gone and its
instance has died, and after any restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from protocol.errors import SlotcastError
from server.service import Clock
from store import commands, doctors
from store.pool import Store

log = logging.getLogger(__name__)


async def sweep_holds(store: Store, clock: Clock) -> None:
    changes = await commands.expire_holds(store, now=clock())
    if changes:
        log.info("expired holds of %d doctors", len(changes))


async def sweep_horizon(store: Store, clock: Clock) -> None:
    """Open the slots each doctor's schedule promises up to the (rolling) horizon."""
    for doctor_id in await doctors.doctor_ids(store):
        await commands.materialize_slots(store, doctor_id, now=clock())


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
