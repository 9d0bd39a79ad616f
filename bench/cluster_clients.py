"""Which client carries sharded pub/sub for Slotcast on a Redis Cluster: a short comparison.

On a fresh three-master test cluster per client (testkit.harness.RedisCluster), each
candidate subscribes to CHANNELS doctor channels spread over the shards, publishes
MESSAGES messages (CONCURRENCY in flight) and receives them; then the master of one
channel is killed, and we time how long until a message published every 20 ms on
that channel arrives again, and note whether the client *said* it may have lost
messages (what `Broker.listen`'s `on_reconnect` needs).

Candidates: Slotcast's `RedisClusterBroker` (redis-py's cluster client to publish,
one plain redis-py pub/sub connection per master to subscribe), redis-py's own
asyncio `ClusterPubSub`, and coredis's `ShardedPubSub` when coredis is importable
(it is not a dependency; see docs/benchmarks.md for how it was measured).

    .venv/bin/python -m bench.cluster_clients
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import statistics
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster

from store.broker import open_broker
from store.constants import doctor_channel
from testkit.harness import RedisCluster as TestCluster
from testkit.harness import redis_cluster

CHANNELS = 60
MESSAGES = 20_000
CONCURRENCY = 32
PROBE_EVERY_S = 0.02
RECOVERY_LIMIT_S = 30.0
RUN_LIMIT_S = 120.0
RESULTS: queue.Queue[Result] = queue.Queue()


@dataclass
class Result:
    name: str
    publish_per_s: float
    receive_per_s: float
    p50_ms: float
    p99_ms: float
    resumed_after_s: float | None
    gap_reported: bool


Publish = Callable[[str, bytes], Awaitable[Any]]


class Sink:
    """Counts messages and their latency (the send time is in the payload)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.probes: list[float] = []
        self.gaps = 0

    def __call__(self, channel: str, data: bytes) -> None:
        (sent,) = struct.unpack("d", data[:8])
        if data[8:] == b"probe":
            self.probes.append(time.perf_counter())
        else:
            self.latencies.append(time.perf_counter() - sent)


def payload(tag: bytes = b"") -> bytes:
    return struct.pack("d", time.perf_counter()) + tag


async def measure(
    name: str, cluster: TestCluster, subscribed: Any, publish: Publish, sink: Sink
) -> Result:
    channels = [doctor_channel(d) for d in range(1, CHANNELS + 1)]
    async with subscribed(channels, sink) as gap_reported:
        await asyncio.sleep(0.5)  # subscriptions confirmed
        queue = iter(range(MESSAGES))
        started = time.perf_counter()

        async def worker() -> None:
            for i in queue:
                await publish(channels[i % CHANNELS], payload())

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        published = time.perf_counter() - started
        deadline = time.monotonic() + 10
        while len(sink.latencies) < MESSAGES and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        received = time.perf_counter() - started
        lat = sorted(sink.latencies)

        victim = cluster.owner(channels[0])
        cluster.kill(victim)
        killed = time.perf_counter()
        before = len(sink.probes)
        while len(sink.probes) == before and time.perf_counter() - killed < RECOVERY_LIMIT_S:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publish(channels[0], payload(b"probe")), 1.0)
            await asyncio.sleep(PROBE_EVERY_S)
        resumed = sink.probes[-1] - killed if len(sink.probes) > before else None
        result = Result(
            name,
            MESSAGES / published,
            len(lat) / received,
            statistics.median(lat) * 1000,
            lat[int(len(lat) * 0.99)] * 1000,
            resumed,
            gap_reported(),
        )
        RESULTS.put(result)  # now: a client may hang on its way out after a fail-over
        return result


def seeds(cluster: TestCluster) -> list[tuple[str, int]]:
    return [("127.0.0.1", p) for p in cluster.ports]


async def slotcast(cluster: TestCluster) -> Result:
    sink = Sink()
    async with open_broker(cluster.url) as publisher:

        @contextlib.asynccontextmanager
        async def subscribed(channels: list[str], sink: Sink) -> AsyncIterator[Any]:
            async with open_broker(cluster.url) as broker:
                broker.listen(sink, lambda gapped: setattr(sink, "gaps", sink.gaps + 1))
                for channel in channels:
                    await broker.subscribe(channel)
                yield lambda: sink.gaps > 0

        return await measure(
            "Slotcast RedisClusterBroker", cluster, subscribed, publisher.publish, sink
        )


async def redis_py(cluster: TestCluster) -> Result:
    sink = Sink()
    nodes = [ClusterNode(h, p) for h, p in seeds(cluster)]
    publisher = RedisCluster(startup_nodes=nodes, socket_timeout=1.0)

    @contextlib.asynccontextmanager
    async def subscribed(channels: list[str], sink: Sink) -> AsyncIterator[Any]:
        client = RedisCluster(startup_nodes=nodes, socket_timeout=1.0)
        await client.initialize()
        pubsub = client.pubsub()
        for channel in channels:
            await pubsub.ssubscribe(channel)

        async def read() -> None:
            while True:
                message = await pubsub.get_sharded_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
                if message is not None and message["type"] == "smessage":
                    sink(message["channel"].decode(), message["data"])

        reader = asyncio.create_task(read())
        try:
            yield lambda: False  # ClusterPubSub has no way to say it may have lost messages
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    try:
        return await measure(
            "redis-py ClusterPubSub", cluster, subscribed, publisher.spublish, sink
        )
    finally:
        with contextlib.suppress(Exception):
            await publisher.aclose()


async def coredis_sharded(cluster: TestCluster) -> Result | None:
    try:
        import coredis
    except ImportError:
        return None
    sink = Sink()
    nodes = [{"host": h, "port": p} for h, p in seeds(cluster)]
    async with coredis.RedisCluster(startup_nodes=nodes) as publisher:

        @contextlib.asynccontextmanager
        async def subscribed(channels: list[str], sink: Sink) -> AsyncIterator[Any]:
            async with (
                coredis.RedisCluster(startup_nodes=nodes) as client,
                client.sharded_pubsub(channels=channels, ignore_subscribe_messages=True) as ps,
            ):

                async def read() -> None:
                    async for message in ps:
                        if message["type"] == "message":  # coredis's name for smessage
                            channel = message["channel"]
                            if isinstance(channel, bytes):
                                channel = channel.decode()
                            sink(channel, message["data"])

                reader = asyncio.create_task(read())
                try:
                    yield lambda: False  # reconnects and resubscribes without telling
                finally:
                    reader.cancel()
                    with contextlib.suppress(BaseException):
                        await reader

        return await measure("coredis ShardedPubSub", cluster, subscribed, publisher.spublish, sink)


def main() -> None:
    results = []
    for candidate in (slotcast, redis_py, coredis_sharded):
        with redis_cluster() as cluster:
            # A thread of its own: a client that never finishes its fail-over (or its
            # clean-up after one) must not stop the comparison.
            run = threading.Thread(target=asyncio.run, args=(candidate(cluster),), daemon=True)
            run.start()
            run.join(RUN_LIMIT_S)
            with contextlib.suppress(queue.Empty):
                results.append(RESULTS.get(timeout=1))
    print(
        f"{CHANNELS} channels, {MESSAGES} messages, {CONCURRENCY} in flight; "
        "then the master of one channel killed"
    )
    print(
        "| client | publish/s | receive/s | p50 ms | p99 ms | delivers again after "
        "| says it may have lost messages |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        resumed = f"{r.resumed_after_s:.1f} s" if r.resumed_after_s is not None else "not in 30 s"
        print(
            f"| {r.name} | {r.publish_per_s:,.0f} | {r.receive_per_s:,.0f} | {r.p50_ms:.1f} | "
            f"{r.p99_ms:.1f} | {resumed} | {'yes' if r.gap_reported else 'no'} |"
        )
    os._exit(0)  # a hung client's thread is not waited for


if __name__ == "__main__":
    main()
