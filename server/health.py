"""Readiness: one bounded probe of the database and the broker, shared by concurrent checks.

What `/readyz` means (docs/operating.md, "Health and readiness"):

- while draining, not ready: the instance is leaving;
- the database does not answer within `SLOTCAST_READY_TIMEOUT_MS`: not ready. An
  instance without its database can neither book nor show a calendar, and another
  instance may still reach it (a network split, a pool full of stuck connections);
- the broker does not answer, or its listener is reconnecting: still ready, and the
  body says `"broker": "down"`. Every instance shares the one Redis, so an outage
  hits them all alike: failing readiness would only empty the load balancer, while
  each instance still serves its own clients whole (commits, snapshots, and the
  changes it commits itself, delivered locally). Changes committed elsewhere reach
  its clients once the broker is back (each room catches up from the change log).

A probe never takes longer than the ready timeout, and concurrent `/readyz` requests
(several balancers checking every 250 ms) share the one in flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from protocol.errors import SlotcastError
from server import logs
from store import pool
from store.broker import Broker
from store.pool import Store


@dataclass(frozen=True, slots=True)
class Probe:
    """What one probe found: None where a dependency answered, else why it did not."""

    database: str | None
    broker: str | None


class Health:
    def __init__(self, store: Store, broker: Broker, *, timeout_s: float) -> None:
        self._store = store
        self._broker = broker
        self._timeout_s = timeout_s
        self._running: asyncio.Task[Probe] | None = None

    async def probe(self) -> Probe:
        task = self._running
        if task is None or task.done():
            # Shared by every checker waiting now: none of their request ids on its lines.
            task = self._running = asyncio.create_task(
                self._probe(), name="readiness-probe", context=logs.detached()
            )
        # Shielded: a checker that hangs up does not cancel the probe others wait for.
        return await asyncio.shield(task)

    async def _probe(self) -> Probe:
        database, broker = await asyncio.gather(self._database(), self._broker_state())
        return Probe(database, broker)

    async def _database(self) -> str | None:
        try:
            await pool.ping(self._store, timeout_s=self._timeout_s)
        except SlotcastError as exc:
            return exc.message
        return None

    async def _broker_state(self) -> str | None:
        if not self._broker.healthy:
            return "listener reconnecting"
        try:
            await self._broker.ping(timeout_s=self._timeout_s)
        except SlotcastError as exc:
            return exc.message
        return None

    async def close(self) -> None:
        if self._running is not None and not self._running.done():
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)
