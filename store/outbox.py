"""The way out of the store: committed changes reach the broker in commit order, at least once.

The `Outbox` is the store's commit hook: `enqueue` only queues, on the committing
task, so a booking's reply never waits for the broker. Its publishing task sends
each change to its doctor's channel and a note to every patient it touched, then
advances the relay cursor, never past a version whose publish failed. The relay
sweep (`Outbox.relay`) re-queues whatever stayed behind the cursor for longer than
a grace period: a failed publish, or a crash between commit and publish.

The outbox exists before the store (the store is built with its hook) and starts
publishing once the broker exists (`publishing`); changes committed in between
wait in the queue. Nothing here knows the server: metrics arrive as callbacks.

A broker outage must not silence the instance that commits: each change is also
handed at once to a local delivery callback (`deliver_to`; the server's rooms),
whatever the broker does. The broker's own copy, when it comes, is a duplicate the
rooms drop. While the broker is away the publisher stops trying after the first
failure of each batch and says so once; the relay resends from the change log
when it is back, and other instances catch up from that log as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from store import sql
from store.broker import Broker
from store.changes import Change, PatientNote
from store.constants import doctor_channel, patient_channel
from store.errors import StoreError
from store.pool import Store
from store.timing import StageTimes

log = logging.getLogger(__name__)

BATCH = 256  # changes published between two advances of the relay cursor


def _ignore(count: int) -> None:
    return None


def _keep(change: Change) -> None:
    return None


class Outbox:
    def __init__(self, *, on_relayed: Callable[[int], None] | None = None) -> None:
        self._on_relayed = on_relayed or _ignore
        # Each change with when it was queued (`time.perf_counter()`), for `outbox_wait`.
        self._queue: asyncio.Queue[tuple[Change, float]] = asyncio.Queue()
        self._done: dict[int, int] = {}  # doctor -> highest version published this batch
        self._failed: dict[int, set[int]] = {}  # doctor -> versions whose publish failed
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._deliver: Callable[[Change], None] = _keep
        # (doctor, version) queued and not yet tried: the relay does not queue them twice.
        self._queued: set[tuple[int, int]] = set()
        self._paused = False  # the last publish failed: the broker is away

    def deliver_to(self, deliver: Callable[[Change], None] | None) -> None:
        """Hand every change committed here to `deliver` too, at once, on the committing
        task (so it must only queue). None stops it."""
        self._deliver = deliver or _keep

    def enqueue(self, changes: list[Change]) -> None:
        """The store's commit hook: local delivery now, the broker soon. After `publishing`
        ended, changes are left to the relay of whichever instance runs next: the cursor
        never passed them.

        Queued for the publisher first: its wake-up then runs before the local fan-out's
        first slice, so the PUBLISH is on the wire while this instance writes to its own
        members, and other instances' watchers do not wait for them."""
        self._put(changes)
        for change in changes:
            try:
                self._deliver(change)
            except Exception:  # the commit stands whatever a local member's state
                log.exception(
                    "local delivery of doctor %s v%s failed", change.doctor_id, change.version
                )

    def _put(self, changes: list[Change]) -> None:
        if self._closed:
            return
        now = time.perf_counter()
        for change in changes:
            key = (change.doctor_id, change.version)
            if key not in self._queued:
                self._queued.add(key)
                self._queue.put_nowait((change, now))

    @contextlib.asynccontextmanager
    async def publishing(
        self, store: Store, broker: Broker, *, drain_timeout: float = 2.0
    ) -> AsyncIterator[None]:
        """Publish while inside; on the way out, publish what is queued (bounded), then stop."""
        if self._task is not None or self._closed:
            raise RuntimeError("an outbox publishes once")
        self._task = asyncio.create_task(self._run(store, broker), name="publisher")
        try:
            yield
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._closed = True

    async def relay(self, store: Store, *, grace_s: float) -> None:
        """Queue what was committed `grace_s` ago or more and never confirmed published."""
        older_than = datetime.now(UTC) - timedelta(seconds=grace_s)
        changes = await unpublished(store, older_than=older_than)
        if changes:
            log.info("relaying %d unpublished changes", len(changes))
            self._on_relayed(len(changes))
            self._put(changes)

    async def _run(self, store: Store, broker: Broker) -> None:
        timings = store.timings
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < BATCH:
                batch.append(self._queue.get_nowait())
            taken = time.perf_counter()
            for _, queued in batch:
                timings.observe("outbox_wait", taken - queued)
            try:
                changes = [change for change, _ in batch]
                published = await self._publish(broker, changes, timings)
                for change in changes:
                    failed = self._failed.setdefault(change.doctor_id, set())
                    if published:
                        failed.discard(change.version)
                        self._done[change.doctor_id] = max(
                            self._done.get(change.doctor_id, 0), change.version
                        )
                    else:
                        failed.add(change.version)
                # The cursor never passes a version whose publish failed: the relay
                # resends from there (a patient room has no log to fill gaps from).
                cursor = {
                    doctor: min(done, min(self._failed.get(doctor) or {done + 1}) - 1)
                    for doctor, done in self._done.items()
                }
                self._done.clear()
                await mark_published(store, cursor)
            except StoreError as exc:
                log.warning("could not advance the relay cursor: %s", exc)
            finally:
                for change, _ in batch:
                    self._queued.discard((change.doctor_id, change.version))
                    self._queue.task_done()

    async def _publish(self, broker: Broker, changes: list[Change], timings: StageTimes) -> bool:
        """Publish a batch, each change then its patient notes, in one round trip where the
        broker can (a pipeline): at load, k changes cost one wait for Redis, not 2k. On a
        failure the whole batch waits for the relay (some of it may have gone out: the
        receivers drop what they already have), so a frozen broker costs one time bound
        per batch, not one per change."""
        sent_at = time.time()
        messages = []
        for change in changes:
            messages.append((doctor_channel(change.doctor_id), change.pack(sent_at=sent_at)))
            for note in PatientNote.of_change(change):
                messages.append((patient_channel(note.patient_id), note.pack()))
        try:
            started = time.perf_counter()
            await broker.publish_many(messages)
            timings.observe("publish", time.perf_counter() - started)
        except StoreError as exc:
            if not self._paused:
                self._paused = True
                log.warning(
                    "publishing paused at doctor %s v%s (%s): local watchers still get every "
                    "change; the relay resends to the others once the broker is back",
                    changes[0].doctor_id,
                    changes[0].version,
                    exc.message,
                )
            return False
        if self._paused:
            self._paused = False
            log.info("publishing resumed")
        return True


# ---- the relay cursor --------------------------------------------------------------------------


async def unpublished(store: Store, *, older_than: datetime, limit: int = 500) -> list[Change]:
    """Changes committed before `older_than` that no publish has confirmed yet."""
    rows = await store.fetch(sql.CHANGES_UNPUBLISHED, older_than, limit)
    return [Change.of_record(r["doctor_id"], r) for r in rows]


async def relay_lag(store: Store) -> float:
    """Seconds since the oldest change that no publish has confirmed was committed (0: none).

    Measured on the database's clock, so instances whose clocks drift agree.
    """
    lag: float = await store.fetchval(sql.RELAY_LAG)
    return max(0.0, lag)


async def mark_published(store: Store, highest: dict[int, int]) -> None:
    """Advance doctors' relay cursors (never backwards) to the versions given."""
    if highest:
        await store.execute(sql.RELAY_ADVANCE, list(highest), list(highest.values()))
