"""PostgreSQL frozen, restarted or away, and the broker away: what the store does about it.

The store bounds every use of the database on its own side, since a frozen server
cannot enforce its `statement_timeout`: a call against a SIGSTOPped PostgreSQL is
`unavailable` within the bound, its connection is terminated rather than reused, and
the pool closes in bounded time. A restart is `unavailable`, never `internal`. These
tests own their PostgreSQL (`testkit.harness.own_postgres`), so they can stop and freeze it.

The outbox's half: with the broker away, each commit still reaches the local
delivery callback at once, the publisher says once that it paused, and the relay
resends everything, in order and once, when the broker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest

from store import commands, outbox, reads
from store.broker import MemoryBroker
from store.changes import Change, unpack
from store.constants import doctor_channel
from store.errors import StoreError, Unavailable
from store.outbox import Outbox
from store.pool import Store, open_store, ping
from testkit.fixtures import SeededDoctor, seed_doctor
from testkit.harness import ControlledPostgres
from testkit.wire import eventually

TIMEOUT_MS = 1500  # the store's bound on one unit of work, in these tests
ACQUIRE_MS = 500
SLACK_S = 0.5  # scheduling on a shared, loaded machine


@pytest.fixture
async def own_store(cluster: ControlledPostgres) -> AsyncIterator[Store]:
    async with open_store(
        cluster.dsn(), min_size=1, max_size=3, timeout_ms=TIMEOUT_MS, acquire_timeout_ms=ACQUIRE_MS
    ) as s:
        yield s


@contextlib.contextmanager
def answers_within(seconds: float) -> Iterator[None]:
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    assert took < seconds, f"took {took:.2f} s, bound {seconds:.2f} s"


async def test_a_frozen_database_is_unavailable_within_the_bound(
    cluster: ControlledPostgres, own_store: Store
) -> None:
    doctor = await seed_doctor(own_store)
    slot = doctor.slots[0]
    bound = TIMEOUT_MS / 1000 + SLACK_S
    with cluster.frozen_for():
        with answers_within(bound), pytest.raises(Unavailable):
            await commands.book_slot(
                own_store, slot_id=slot.id, patient_id="p", idempotency_key="k"
            )
        with answers_within(bound + ACQUIRE_MS / 1000), pytest.raises(Unavailable):
            await reads.snapshot(own_store, doctor.id, doctor.start, doctor.end)
        with answers_within(0.5 + SLACK_S), pytest.raises(Unavailable):
            await ping(own_store, timeout_s=0.5)
    # Thawed: the same request, with the same key, books once.
    booking = await commands.book_slot(
        own_store, slot_id=slot.id, patient_id="p", idempotency_key="k"
    )
    again = await commands.book_slot(
        own_store, slot_id=slot.id, patient_id="p", idempotency_key="k"
    )
    assert again.appointment.id == booking.appointment.id


async def test_a_connection_that_timed_out_is_terminated_not_reused(
    cluster: ControlledPostgres,
) -> None:
    """Its state is unknown (a query may still be running, a reply half read): the next
    request must get a fresh connection, not "another operation is in progress"."""
    async with open_store(
        cluster.dsn(), min_size=1, max_size=1, timeout_ms=TIMEOUT_MS, acquire_timeout_ms=ACQUIRE_MS
    ) as store:
        async with store.connection() as conn:
            before = conn.get_server_pid()
        with cluster.frozen_for(), pytest.raises(Unavailable, match="did not answer in time"):
            await store.fetchval("SELECT 1")
        async with store.connection() as conn:
            after = conn.get_server_pid()
            assert after != before
            # The old backend notices its client is gone once it runs again.
            await eventually_async(
                lambda: conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", before
                ),
                0,
            )


async def eventually_async(read: object, want: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await read()) != want:  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still {got!r}, want {want!r}"
        await asyncio.sleep(0.05)


async def test_closing_the_pool_is_bounded_when_the_database_is_frozen(
    cluster: ControlledPostgres,
) -> None:
    store_cm = open_store(cluster.dsn(), min_size=2, max_size=2, timeout_ms=TIMEOUT_MS)
    store = await store_cm.__aenter__()
    await ping(store)
    with cluster.frozen_for():
        busy = asyncio.create_task(store.fetchval("SELECT 1"))  # in use when closing starts
        await asyncio.sleep(0.1)
        with answers_within(TIMEOUT_MS / 1000 + 1.0 + SLACK_S):
            await store_cm.__aexit__(None, None, None)
        with pytest.raises(Unavailable):
            await busy


async def test_a_restart_is_unavailable_never_internal(
    cluster: ControlledPostgres, own_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's connections die with the server (admin shutdown, closed sockets), new
    ones are refused or told "the database system is starting up": all of it is
    `unavailable`, none of it an "unexpected database error"."""
    doctor = await seed_doctor(own_store)
    outcomes: list[str] = []
    stop = asyncio.Event()

    async def traffic(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            slot = doctor.slots[(i * 50 + n) % len(doctor.slots)]
            try:
                await commands.book_slot(own_store, slot_id=slot.id, patient_id=f"p{i}")
                await reads.snapshot(own_store, doctor.id, doctor.start, doctor.end)
                outcomes.append("ok")
            except Unavailable:
                outcomes.append("unavailable")
                await asyncio.sleep(0.02)
            except StoreError as exc:
                outcomes.append(exc.code.value)  # slot_taken and the like: answered
            except Exception as exc:  # anything else escaped the translation
                outcomes.append(f"escaped {type(exc).__name__}: {exc}")

    with caplog.at_level(logging.WARNING):
        workers = [asyncio.create_task(traffic(i)) for i in range(3)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(cluster.restart)
        # Back by itself: the pool replaces the dead connections as they are needed.
        # (Answered: booked, or the slot was taken by then; the slots do run out.)
        await eventually(
            lambda: len(outcomes) > 6 and "unavailable" not in outcomes[-6:],
            "traffic to be answered again",
            15,
        )
        stop.set()
        await asyncio.gather(*workers)
    assert "unavailable" in outcomes  # the restart was seen, not slept through
    assert not [o for o in outcomes if o not in {"ok", "unavailable", "slot_taken"}]
    assert "unexpected database error" not in caplog.text


# ---- the outbox while the broker is away --------------------------------------------------


class FlakyBroker(MemoryBroker):
    """A memory broker that can be taken down: publishing then fails, as Redis's would."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.attempts = 0
        self.published: list[Change] = []

    async def publish(self, channel: str, data: bytes) -> None:
        self.attempts += 1
        if self.down:
            raise Unavailable("the broker is unavailable: injected")
        note = unpack(data)
        if isinstance(note, Change):
            self.published.append(note)
        await super().publish(channel, data)


async def test_with_the_broker_away_commits_are_delivered_locally_and_relayed_later(
    store: Store, doctor: SeededDoctor, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FlakyBroker()
    await broker.subscribe(doctor_channel(doctor.id))
    box = Outbox()
    local: list[int] = []
    box.deliver_to(lambda change: local.append(change.version))
    committing = Store(store.pool, store.session_state, on_commit=box.enqueue)
    # The seeding was never published (no outbox then): out of the relay's way.
    await outbox.mark_published(store, {doctor.id: await reads.doctor_version(store, doctor.id)})
    assert await outbox.relay_lag(store) == 0  # nothing unpublished
    broker.down = True
    with caplog.at_level(logging.INFO, logger="store.outbox"):
        async with box.publishing(committing, broker):
            versions = []
            for slot in doctor.slots[:3]:
                booking = await commands.book_slot(committing, slot_id=slot.id, patient_id="p")
                assert booking.change is not None
                versions.append(booking.change.version)
                # At once, on the committing task: no broker between the commit and here.
                assert local[-1] == booking.change.version
            await eventually(lambda: broker.attempts >= 1, "a publish attempt")
            # Relaying while the publisher is stuck does not queue a change twice.
            await box.relay(committing, grace_s=0)
            await box.relay(committing, grace_s=0)
            assert box._queue.qsize() <= len(versions)
            await asyncio.sleep(0.2)
            assert broker.published == []
            assert await outbox.relay_lag(store) >= 0.2  # the oldest waits since its commit
            broker.down = False
            await box.relay(committing, grace_s=0)
            await eventually(lambda: [c.version for c in broker.published] == versions, "the relay")
            # The relay cursor passed them all: nothing is sent again and again.
            await eventually_async(
                lambda: outbox.unpublished(committing, older_than=datetime.now(UTC)), []
            )
            assert await outbox.relay_lag(store) == 0
    assert local == versions  # each once
    paused = [r for r in caplog.records if "publishing paused" in r.getMessage()]
    assert len(paused) == 1  # said once, not once per change
    assert any("publishing resumed" in r.getMessage() for r in caplog.records)


async def test_pool_stats_count_connections_lent_and_callers_waiting(own_store: Store) -> None:
    """The server's pool gauges read these: a saturated pool must show its queue."""
    size, _idle, max_size, waiting = own_store.pool_stats()
    assert (max_size, waiting) == (3, 0)
    assert 1 <= size <= 3
    async with contextlib.AsyncExitStack() as lent:
        for _ in range(3):
            await lent.enter_async_context(own_store.connection())
        assert own_store.pool_stats()[:2] == (3, 0)  # all open, none idle
        queued = asyncio.create_task(own_store.fetchval("SELECT 1"))
        await eventually(lambda: own_store.pool_stats()[3] == 1, "a caller waiting")
    assert await queued == 1
    assert own_store.pool_stats()[3] == 0


async def test_a_failing_local_delivery_does_not_undo_the_commit(
    store: Store, doctor: SeededDoctor, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox()

    def broken(change: Change) -> None:
        raise RuntimeError("a bug in a room")

    box.deliver_to(broken)
    committing = Store(store.pool, store.session_state, on_commit=box.enqueue)
    with caplog.at_level(logging.ERROR, logger="store.outbox"):
        booking = await commands.book_slot(committing, slot_id=doctor.slots[0].id, patient_id="p")
    assert booking.appointment.slot_id == doctor.slots[0].id
    assert "local delivery of doctor" in caplog.text
    assert box._queue.qsize() == 1  # still on its way to the broker
