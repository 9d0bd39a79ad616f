"""Slotcast on a real Redis Cluster: three masters with one replica each (Redis 7).

One cluster serves the whole module (starting it is most of the cost), so the tests
run in the order written and the fail-over comes last: it leaves a master without a
replica. What they hold: each doctor's channel is subscribed on the one master that
owns its slot, and only there (sharded pub/sub); a subscription follows its slot when
it moves; the rate-limit counters count in the cluster; and with a master killed
under load, every watcher on every instance converges and no acknowledged booking is
lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from limits import parse

from client import ClientError, SlotcastClient
from protocol.vocabulary import SlotStatus
from store import reads
from store.broker import Broker, ClusterURL, open_broker
from store.constants import doctor_channel
from store.counters import open_counters
from store.errors import Unavailable
from store.pool import Store
from testkit import harness
from testkit.fixtures import SeededDoctor, Spawn, token
from testkit.harness import UNLIMITED, RedisCluster, free_port
from testkit.tools import ensure_redis7

pytestmark = pytest.mark.processes

WAIT_S = 5.0
CONVERGE_S = 30.0
# Three bookers at this pace leave the doctor's 140 slots enough to last the fail-over.
BOOKING_PAUSE_S = 0.2
# Many bookings by few patients, and no pause before a relay: the load is the point.
LOAD = {
    **UNLIMITED,
    "SLOTCAST_MAX_ACTIVE_PER_DOCTOR": "1000",
    "SLOTCAST_MAX_ACTIVE_TOTAL": "1000",
    "SLOTCAST_RELAY_SWEEP_S": "0.5",
    "SLOTCAST_RELAY_GRACE_S": "0.5",
    "SLOTCAST_DRAIN_GRACE_S": "0",
}


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    reasons: list[str] = []
    if ensure_redis7(reasons) is None:  # no Redis 7 and no way to install it here
        pytest.skip(reasons[0])
    with harness.redis_cluster() as started:
        yield started


@contextlib.asynccontextmanager
async def listening(url: str) -> AsyncIterator[tuple[Broker, list[tuple[str, bytes]], list[Any]]]:
    """A broker on the cluster with what it received and the gaps it reported."""
    received: list[tuple[str, bytes]] = []
    gaps: list[frozenset[str]] = []
    async with open_broker(url) as broker:
        broker.listen(lambda c, d: received.append((c, d)), gaps.append)
        yield broker, received, gaps


async def eventually(predicate: Any, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_cluster_urls_name_their_seeds_or_are_refused() -> None:
    url = ClusterURL.parse("redis+cluster://app:s%3Acret@10.0.0.1:7000,10.0.0.2:7001/")
    assert url.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (url.username, url.password) == ("app", "s:cret")
    for bad in ("redis+cluster://10.0.0.1", "redis+cluster://h:1/3", "redis+cluster://h:1?x=1"):
        with pytest.raises(ValueError, match=r"Redis Cluster|host:port"):
            ClusterURL.parse(bad)


async def test_an_unreachable_cluster_is_unavailable_in_bounded_time() -> None:
    """At start the broker waits (here: not at all) and refuses; a counter call fails
    within its bound, as `unavailable`, like a single Redis's."""
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable):
        async with open_broker(url, timeout_s=0.5):
            pass
    async with open_counters(url, timeout_s=0.5) as counters:
        with pytest.raises(Unavailable):
            await counters.hit(parse("3/minute"), "reads", "alice")
    assert time.monotonic() - started < 5


async def test_each_channel_lives_on_the_master_that_owns_its_slot(
    redis_cluster: RedisCluster,
) -> None:
    """Sharded pub/sub: a subscription is made on its channel's master alone, so the
    doctors spread over the shards, and a message is delivered once, exactly."""
    channels = [doctor_channel(d) for d in range(1, 31)]
    async with (
        listening(redis_cluster.url) as (sub, received, gaps),
        open_broker(redis_cluster.url) as pub,
    ):
        for channel in channels:
            await sub.subscribe(channel)
        owners = redis_cluster.owners(channels)
        assert len(set(owners.values())) == 3  # thirty doctors land on every shard
        for port in set(owners.values()):
            listed = set(redis_cluster.command(port, "pubsub", "shardchannels").split())
            assert listed == {c for c, owner in owners.items() if owner == port}
            assert redis_cluster.command(port, "pubsub", "channels").strip() == ""  # no classic
        for i, channel in enumerate(channels):
            await pub.publish(channel, f"change {i}".encode())
        await eventually(lambda: len(received) == len(channels), "every message")
        assert sorted(received) == sorted(
            (c, f"change {i}".encode()) for i, c in enumerate(channels)
        )
        await sub.unsubscribe(channels[0])
        await pub.publish(channels[0], b"after")
        await pub.publish(channels[1], b"still")
        await eventually(lambda: len(received) == len(channels) + 1, "the message after")
        assert received[-1] == (channels[1], b"still")
        assert gaps == []
        assert sub.up
        assert pub.up


async def test_a_subscription_follows_its_slot_to_another_master(
    redis_cluster: RedisCluster,
) -> None:
    """A migrated slot: the old owner drops the subscription (`sunsubscribe`), the broker
    subscribes at the new owner and reports the channel as possibly gapped."""
    channel = doctor_channel(424242)
    async with (
        listening(redis_cluster.url) as (sub, received, gaps),
        open_broker(redis_cluster.url) as pub,
    ):
        await sub.subscribe(channel)
        source = redis_cluster.owner(channel)
        target = next(n for n in redis_cluster.nodes() if n.master and n.port != source)
        source_id = next(n.node_id for n in redis_cluster.nodes() if n.port == source)
        slot = redis_cluster.command(source, "cluster", "keyslot", channel).strip()
        assert redis_cluster.command(source, "cluster", "countkeysinslot", slot).strip() == "0"
        redis_cluster.command(target.port, "cluster", "setslot", slot, "importing", source_id)
        redis_cluster.command(source, "cluster", "setslot", slot, "migrating", target.node_id)
        for node in redis_cluster.nodes():
            if node.master:
                redis_cluster.command(node.port, "cluster", "setslot", slot, "node", target.node_id)
        await eventually(lambda: gaps == [frozenset({channel})], "the subscription to move")
        assert redis_cluster.owner(channel) == target.port
        assert channel in redis_cluster.command(target.port, "pubsub", "shardchannels").split()

        async def delivered() -> None:
            while not received:
                await pub.publish(channel, b"moved")  # the publisher follows MOVED
                await asyncio.sleep(0.05)

        await asyncio.wait_for(delivered(), WAIT_S)
        assert received[0] == (channel, b"moved")
        assert sub.healthy


async def test_rate_limits_count_in_the_cluster(redis_cluster: RedisCluster) -> None:
    """Two instances spend one budget; each identity's two window keys share a slot."""
    limit = parse("3/minute")
    async with (
        open_counters(redis_cluster.url, timeout_s=1.0) as a,
        open_counters(redis_cluster.url, timeout_s=1.0) as b,
    ):
        assert a.kind == "redis-cluster"
        assert [await c.hit(limit, "reads", "alice") for c in (a, b, a)] == [0.0, 0.0, 0.0]
        assert 0 < await b.hit(limit, "reads", "alice") <= 60
        assert await a.peek(limit, "reads", "bob") == 0.0
        for patient in range(20):  # identities spread over the shards, each its own budget
            assert await (a, b)[patient % 2].hit(limit, "reads", f"p{patient}") == 0.0


async def test_a_master_killed_under_load_loses_no_acknowledged_booking(
    redis_cluster: RedisCluster, spawn_server: Spawn, store: Store, doctor: SeededDoctor
) -> None:
    """Three instances, two watchers on each, a booker on each. The master that owns the
    doctor's channel is killed mid-load: its replica takes over, every instance
    resubscribes there and catches up from the change log (the relay resends what no
    publish confirmed), and every watcher ends at the doctor's last version with every
    acknowledged booking in its calendar."""
    servers = list(
        await asyncio.gather(
            *(
                asyncio.to_thread(spawn_server, n, broker_url=redis_cluster.url, env=LOAD)
                for n in ("a", "b", "c")
            )
        )
    )
    slots = iter(doctor.slots)
    booked: set[int] = set()
    refused: list[str] = []
    stop = asyncio.Event()

    async def book(client: SlotcastClient) -> None:
        while not stop.is_set() and (slot := next(slots, None)) is not None:
            try:
                booked.add((await client.book(slot.id)).slot_id)
            except ClientError as exc:  # the broker never refuses a booking
                refused.append(exc.code)
            await asyncio.sleep(BOOKING_PAUSE_S)

    async with contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(SlotcastClient.connect(s.ws_url))
            for s in itertools.chain(servers, servers)
        ]
        for watcher in watchers:
            await watcher.watch(doctor.id, doctor.start, doctor.end)
        bookers = [
            await stack.enter_async_context(
                SlotcastClient.connect(s.ws_url, token=token(sub=f"patient-{s.name}"))
            )
            for s in servers
        ]
        load = [asyncio.create_task(book(b)) for b in bookers]
        await eventually(lambda: len(booked) >= 10, "bookings before the fault")
        victim = redis_cluster.owner(doctor_channel(doctor.id))
        await asyncio.to_thread(redis_cluster.kill, victim)
        heir = await asyncio.to_thread(
            redis_cluster.wait_failover, victim, doctor_channel(doctor.id)
        )
        before = len(booked)
        await eventually(lambda: len(booked) >= before + 10, "bookings after the fail-over")
        stop.set()
        await asyncio.gather(*load)

        assert refused == []
        latest = await reads.doctor_version(store, doctor.id)
        for watcher in watchers:
            calendar = watcher.calendars[doctor.id]
            await eventually(lambda c=calendar: c.version == latest, "convergence", CONVERGE_S)
            busy = {i for i, s in calendar.slots.items() if s.status == SlotStatus.BUSY}
            assert booked <= busy
            assert busy == booked  # nothing else was booked
            assert calendar.resyncs == 0  # every version arrived, in order

        def subscribers() -> int:  # on the promoted replica
            reply = redis_cluster.command(heir, "pubsub", "shardnumsub", channel).split()
            return int(reply[1])

        channel = doctor_channel(doctor.id)  # each instance follows it to the new master
        await eventually(lambda: subscribers() == len(servers), "resubscriptions", CONVERGE_S)
        for server in servers:
            assert "resubscribed" in server.logs(), server.name
