"""Pub/sub between instances: one small interface, an in-process and a Redis implementation.

The server never knows which one runs; `open_broker(url)` picks it from the URL
(`memory://`, `redis://...` or `redis+cluster://...`, the last with sharded pub/sub on
a Redis Cluster: see the Redis Cluster section below). Delivery is at-most-once and unordered across
publishers, which is why every event carries a doctor version: receivers detect
duplicates and gaps, and fill gaps from the change log.

Incoming messages go to one synchronous callback per instance, so fan-out can
enqueue to every local connection without yielding to the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from store.errors import Unavailable, broker_transient, broker_translated
from store.startup import describe, wait_until_up, where_redis

log = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes], None]
OnReconnect = Callable[[frozenset[str]], None]

DEFAULT_TIMEOUT_S = 1.0


class Broker(abc.ABC):
    """Subscribe only to channels with local listeners; publish to anyone's."""

    kind: str
    # False while the listener is cut off from the broker and trying to reconnect.
    healthy: bool = True
    # False since the last command (publish, ping) failed, until one succeeds.
    answering: bool = True
    # Times the listener lost the broker and came back (read by the server's metrics).
    reconnects: int = 0

    def __init__(self) -> None:
        self._on_message: OnMessage = lambda channel, data: None
        self._on_reconnect: OnReconnect = lambda channels: None
        self._channels: set[str] = set()

    where = "the broker"  # how log lines name it (a Redis's address, without password)

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        """Track `answering` around one command: one log line when the broker stops
        answering and one when it answers again, never one per failed call."""
        try:
            yield
        except Unavailable as exc:
            if self.answering:
                self.answering = False
                log.warning("%s is unavailable: %s", self.where, exc.message)
            raise
        if not self.answering:
            self.answering = True
            log.info("%s answers again", self.where)

    @property
    def up(self) -> bool:
        """The broker carries messages both ways, as far as this instance can tell."""
        return self.healthy and self.answering

    def listen(self, on_message: OnMessage, on_reconnect: OnReconnect | None = None) -> None:
        """Route every received message to `on_message`; `on_reconnect` hears of possible gaps."""
        self._on_message = on_message
        if on_reconnect is not None:
            self._on_reconnect = on_reconnect

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes) -> None:
        """Raise `Unavailable` when the broker cannot take it (within the time bound)."""

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish each (channel, data) in order; `Unavailable` if any could not be.

        A broker that can, sends them all in one round trip (Redis: a pipeline); on
        `Unavailable` some may have gone out, which receivers drop as duplicates when
        they are resent."""
        for channel, data in messages:
            await self.publish(channel, data)

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Never fails: while the broker is away, the subscription waits for it."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def ping(self, *, timeout_s: float | None = None) -> None:
        """Raise `Unavailable` unless the broker answers within its time bound (or
        `timeout_s`, when that is shorter)."""


class MemoryBroker(Broker):
    """One process, no network: the default for a single instance."""

    kind = "memory"

    async def publish(self, channel: str, data: bytes) -> None:
        if channel in self._channels:
            # Deliver on a later loop turn, as a network broker would.
            asyncio.get_running_loop().call_soon(self._deliver, channel, data)

    def _deliver(self, channel: str, data: bytes) -> None:
        if channel in self._channels:
            self._on_message(channel, data)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def ping(self, *, timeout_s: float | None = None) -> None:
        return None


class RedisBroker(Broker):
    """Redis pub/sub, with a reader task that survives Redis restarts.

    After a reconnect it resubscribes everything and reports the channels as
    possibly gapped, since messages published during the outage are gone. A
    subscription asked for while Redis is away is made by that same reconnect.

    Every call is bounded by `timeout_s` (a frozen or unreachable Redis is
    `Unavailable` in that time, never a hang), and redis-py's own retries are off:
    a retry that reconnected the pub/sub connection by itself would hide exactly
    the gap that `on_reconnect` must report.
    """

    kind = "redis"

    def __init__(
        self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_backoff: float = 5.0
    ) -> None:
        super().__init__()
        self._url = url
        self.where = where_redis(url)
        self._timeout_s = timeout_s
        self._max_backoff = max_backoff
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            health_check_interval=10,
            socket_keepalive=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._reader: asyncio.Task[None] | None = None
        self._have_channels = asyncio.Event()
        # Set when the pub/sub connection is known lost (or a subscription could not be
        # made): the reader then reconnects and resubscribes every channel.
        self._lost = False

    async def start(self, *, wait_s: float = 0.0) -> None:
        """Start listening once Redis answers, waiting up to `wait_s` for it."""

        async def attempt() -> None:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.ping()

        try:
            await wait_until_up(self.where, attempt, transient=broker_transient, limit_s=wait_s)
        except Unavailable:
            self.answering = False
            raise
        self._reader = asyncio.create_task(self._read_forever(), name="redis-broker-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        # Closing only drops sockets, but bound it anyway: nothing waits on Redis at exit.
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(self._timeout_s):
                await self._pubsub.aclose()
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(self._timeout_s):
                await self._redis.aclose()

    async def publish(self, channel: str, data: bytes) -> None:
        await self._command(lambda: self._redis.publish(channel, data))

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if len(messages) == 1:
            await self.publish(*messages[0])
            return

        async def pipelined() -> None:
            # No MULTI: a pipeline only saves the round trips; each PUBLISH stands alone.
            pipe = self._redis.pipeline(transaction=False)
            for channel, data in messages:
                pipe.publish(channel, data)
            await pipe.execute()

        await self._command(pipelined)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        self._have_channels.set()
        if self._lost:
            return  # the reader's reconnect subscribes it
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._pubsub.subscribe(channel)
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            # The reader resubscribes everything once Redis is back.
            log.warning("subscribe to %s deferred until Redis is back: %s", channel, describe(exc))
            self._lose(exc)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        if self._lost:
            return  # the reader's reconnect subscribes only what is left
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._pubsub.unsubscribe(channel)
        except (RedisError, OSError) as exc:
            self._lose(exc)

    async def ping(self, *, timeout_s: float | None = None) -> None:
        await self._command(self._redis.ping, timeout_s)

    async def _command(
        self, command: Callable[[], Awaitable[Any]], timeout_s: float | None = None
    ) -> None:
        """Run a command within the time bound, retrying once on a dropped connection.

        After a Redis restart the pool still holds the dead connection; the first
        attempt discards it and the retry dials afresh.
        """
        bound = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        with self._answering(), broker_translated():
            async with asyncio.timeout(bound):
                try:
                    await command()
                except RedisConnectionError:
                    await command()

    def _lose(self, exc: BaseException) -> None:
        """The pub/sub connection cannot be trusted: have the reader reconnect."""
        if not self._lost:
            self._lost = True
            self.healthy = False
            log.warning("lost %s (%s); reconnecting", self.where, describe(exc))
        self._have_channels.set()

    async def _read_forever(self) -> None:
        while True:
            if not self._channels:
                # Nothing to listen to (get_message() would return at once); wait.
                self._have_channels.clear()
                await self._have_channels.wait()
                continue
            if self._lost:
                await self._reconnect()
                continue
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError, RuntimeError) as exc:
                # RuntimeError: redis-py's "pubsub connection not set", after a
                # subscription that never reached Redis.
                self._lose(exc)
                continue
            if message is not None and message["type"] == "message":
                channel = message["channel"].decode()
                self._on_message(channel, message["data"])

    async def _reconnect(self) -> None:
        backoff = 0.1
        while not await self._resubscribe():
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _resubscribe(self) -> bool:
        """A fresh pub/sub connection with every channel; False while Redis is still away."""
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(self._timeout_s):
                await self._pubsub.aclose()
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        channels = self.channels
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.ping()
                if channels:
                    await self._pubsub.subscribe(*channels)
        except (RedisError, OSError) as exc:
            log.debug("%s still unavailable: %s", self.where, describe(exc))
            return False
        self._lost = False
        self.healthy = True
        self.reconnects += 1
        log.info("reconnected to %s; resubscribed %d channels", self.where, len(channels))
        self._on_reconnect(channels)
        return True


# ---- Redis Cluster ------------------------------------------------------------------------------
#
# The broker on a Redis Cluster: sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`, Redis >= 7).
#
# With classic pub/sub a cluster broadcasts every message to every node, so adding
# shards adds no fan-out capacity. Sharded pub/sub keeps a channel on the shard that
# owns its hash slot: a doctor's channel lives on one master (and its replicas), and
# capacity grows with the shards. Each doctor needs one channel only (changes and
# presence ride together, `store.constants.doctor_channel`), so no two channels must
# share a slot and the names carry no hash tag; the whole name spreads doctors evenly.
#
# Publishing is redis-py's `RedisCluster.spublish`, which follows MOVED redirects and
# re-reads the topology on its own. Subscribing is ours, on redis-py parts: one
# plain pub/sub connection per master that owns a subscribed channel (a `_Shard`,
# with its reader task), placed by the cluster client's slot map. We do not use
# redis-py's `ClusterPubSub`: it reconnects and re-routes by itself and swallows the
# failed polls, so nothing would tell the rooms that messages may have been lost, and
# reporting exactly that (`on_reconnect`) is the contract every broker keeps. The
# comparison is in docs/benchmarks.md, "Redis Cluster client".
#
# When a shard's connection breaks (its master died), or the server drops a
# subscription because the slot moved (a `sunsubscribe` we did not ask for), its
# channels become *homeless*: the repair task re-reads the topology and subscribes
# them at their new owner, retrying with capped backoff until a replica has taken
# over, then reports them to `on_reconnect`. The rooms read what they missed from the
# change log; what the outbox could not publish meanwhile, the relay resends.


CLUSTER_SCHEME: Final = "redis+cluster://"
# Capped lower than a single Redis's: each try is one CLUSTER SLOTS, and a fail-over
# is over in a few seconds; the subscriptions should follow soon after.
MAX_BACKOFF_S: Final = 2.0

_FAILURES = (RedisError, RedisClusterException, OSError, RuntimeError)


@dataclass(frozen=True)
class ClusterURL:
    """`redis+cluster://[user:password@]host:port[,host:port...]`: the seed nodes."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> ClusterURL:
        if not url.startswith(CLUSTER_SCHEME):
            raise ValueError(f"not a Redis Cluster URL: {url!r}")
        rest = url.removeprefix(CLUSTER_SCHEME)
        rest, _, path = rest.partition("/")
        if path not in ("", "0") or "?" in rest:
            raise ValueError("a Redis Cluster URL takes no database, path or options")
        auth, _, hosts = rest.rpartition("@")
        username = password = None
        if auth:
            user, sep, secret = auth.partition(":")
            username, password = (unquote(user) or None), (unquote(secret) if sep else None)
        nodes = []
        for host_port in hosts.split(","):
            host, sep, port = host_port.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"Redis Cluster seed {host_port!r} is not host:port")
            nodes.append((host.strip("[]"), int(port)))
        return cls(tuple(nodes), username, password)

    @property
    def auth(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password}


def cluster_options(url: str, *, timeout_s: float) -> dict[str, Any]:
    """What the broker and the counters both give redis-py's `RedisCluster`."""
    return {
        "startup_nodes": [ClusterNode(h, p) for h, p in ClusterURL.parse(url).nodes],
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "socket_keepalive": True,
        # While a master fails over its slots may be briefly unlisted: the rest of the
        # map is still worth having.
        "require_full_coverage": False,
        **ClusterURL.parse(url).auth,
    }


@dataclass(eq=False)
class _Shard:
    """One master's subscriber connection and the channels subscribed on it."""

    name: str
    client: aioredis.Redis
    pubsub: PubSub
    channels: set[str] = field(default_factory=set)
    reader: asyncio.Task[None] | None = None
    dropped: bool = False


class RedisClusterBroker(Broker):
    """Sharded pub/sub on a Redis Cluster; the same contract as `RedisBroker`.

    `healthy` is False while any channel waits for a shard to come back (its
    subscription is then made by the repair task); `answering` follows publishes and
    pings, which go through the cluster client and are bounded by `timeout_s`.
    """

    kind = "redis-cluster"

    def __init__(
        self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_backoff: float = MAX_BACKOFF_S
    ) -> None:
        super().__init__()
        self._url = ClusterURL.parse(url)
        self.where = where_redis(url)
        self._timeout_s = timeout_s
        self._max_backoff = max_backoff
        self._cluster = RedisCluster(**cluster_options(url, timeout_s=timeout_s))
        self._shards: dict[str, _Shard] = {}  # node name (host:port) -> its subscriber
        self._placed: dict[str, _Shard] = {}  # channel -> the shard subscribed to it
        self._homeless: set[str] = set()  # wanted channels without a subscription
        self._lock = asyncio.Lock()  # one placement at a time: no shard opened twice
        self._wake = asyncio.Event()
        self._repairer: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self, *, wait_s: float = 0.0) -> None:
        """Start once the cluster answers (its slot map read), waiting up to `wait_s`."""

        async def attempt() -> None:
            async with asyncio.timeout(self._timeout_s):
                await self._cluster.initialize()
                await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES)

        try:
            await wait_until_up(self.where, attempt, transient=broker_transient, limit_s=wait_s)
        except Unavailable:
            self.answering = False
            raise
        self._repairer = asyncio.create_task(self._repair_forever(), name="redis-cluster-repair")

    async def close(self) -> None:
        tasks = [t for t in (self._repairer, *self._readers()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for shard in list(self._shards.values()):
            await self._close_shard(shard)
        for task in list(self._closing):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(self._timeout_s):
                await self._cluster.aclose()

    def _readers(self) -> list[asyncio.Task[None] | None]:
        return [s.reader for s in self._shards.values()]

    # ---- commands ------------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> None:
        await self._command(lambda: self._cluster.spublish(channel, data))

    async def ping(self, *, timeout_s: float | None = None) -> None:
        # Every master: a shard without one (mid fail-over) cannot carry its doctors.
        await self._command(
            lambda: self._cluster.ping(target_nodes=RedisCluster.PRIMARIES), timeout_s
        )

    async def _command(
        self, command: Callable[[], Awaitable[Any]], timeout_s: float | None = None
    ) -> None:
        """Run a command within the time bound; redis-py follows redirects inside it."""
        bound = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        with self._answering(), broker_translated():
            async with asyncio.timeout(bound):
                await command()

    # ---- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        if channel in self._placed or channel in self._homeless:
            return
        if self._homeless:
            self._make_homeless([channel])  # a shard is away: the repair places it too
            return
        try:
            async with self._lock:
                await self._place(channel)
        except _FAILURES as exc:
            log.warning(
                "subscribe to %s deferred until its shard answers: %s", channel, describe(exc)
            )
            self._make_homeless([channel])

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        self._homeless.discard(channel)
        shard = self._placed.pop(channel, None)
        if shard is None:
            return
        shard.channels.discard(channel)
        async with self._lock:
            if shard.dropped:
                return
            try:
                async with asyncio.timeout(self._timeout_s):
                    await shard.pubsub.sunsubscribe(channel)
            except _FAILURES as exc:
                self._drop(shard, exc)
                return
            if not shard.channels:
                await self._close_shard(shard)

    async def _place(self, channel: str) -> None:
        """Subscribe `channel` at the master that owns its slot (caller holds the lock)."""
        async with asyncio.timeout(self._timeout_s):
            node = self._owner(channel)
            shard = self._shards.get(node.name)
            if shard is None:
                shard = self._open_shard(node)
            shard.channels.add(channel)
            self._placed[channel] = shard
            try:
                await shard.pubsub.ssubscribe(channel)
            except BaseException as exc:
                self._drop(shard, exc)
                raise
            if shard.reader is None:
                shard.reader = asyncio.create_task(
                    self._read(shard), name=f"redis-shard-{node.name}"
                )

    def _owner(self, channel: str) -> ClusterNode:
        """The master of `channel`'s slot, as the last slot map read says."""
        slot = self._cluster.keyslot(channel)
        return self._cluster.nodes_manager.get_node_from_slot(slot)

    def _open_shard(self, node: ClusterNode) -> _Shard:
        client = aioredis.Redis(
            host=node.host,
            port=int(node.port),
            health_check_interval=10,
            socket_keepalive=True,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            # No hidden reconnects: a new connection must be reported as a possible gap.
            retry=Retry(NoBackoff(), 0),
            **self._url.auth,
        )
        # Subscribe messages kept: the server's own `sunsubscribe` says a slot moved away.
        shard = _Shard(node.name, client, client.pubsub(ignore_subscribe_messages=False))
        self._shards[node.name] = shard
        return shard

    async def _read(self, shard: _Shard) -> None:
        try:
            while True:
                message = await shard.pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind = message["type"]
                if kind == "smessage":
                    self._on_message(message["channel"].decode(), message["data"])
                elif kind == "sunsubscribe":
                    channel = message["channel"].decode()
                    if channel in self._channels and self._placed.get(channel) is shard:
                        # Not asked for: the slot migrated and the old owner let go.
                        log.info("%s moved off %s; following it", channel, shard.name)
                        shard.channels.discard(channel)
                        del self._placed[channel]
                        self._make_homeless([channel])
        except _FAILURES as exc:
            # Not `pubsub connection not set` alone: a MOVED for an SSUBSCRIBE arrives here
            # too. Either way the shard cannot be trusted; its channels are placed afresh.
            self._drop(shard, exc)

    def _drop(self, shard: _Shard, exc: BaseException) -> None:
        """A shard's connection broke: its channels wait for the repair task."""
        if shard.dropped:
            return
        shard.dropped = True
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        lost = [c for c in shard.channels if self._placed.get(c) is shard]
        for channel in lost:
            del self._placed[channel]
        shard.channels.clear()
        # A shard that never carried a message (a repair's try at a dead master) is news
        # to nobody.
        report = log.warning if shard.reader is not None else log.debug
        report("lost %s of %s (%s); following its slots", shard.name, self.where, describe(exc))
        self._make_homeless(lost)
        task = asyncio.create_task(self._close_shard(shard), name=f"redis-shard-close-{shard.name}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_shard(self, shard: _Shard) -> None:
        shard.dropped = True
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        reader = shard.reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        # Only sockets to drop, but bounded anyway: nothing waits on Redis at exit.
        with contextlib.suppress(*_FAILURES, TimeoutError):
            async with asyncio.timeout(self._timeout_s):
                await shard.pubsub.aclose()
                await shard.client.aclose()

    def _make_homeless(self, channels: list[str]) -> None:
        wanted = [c for c in channels if c in self._channels]
        if not wanted:
            return
        self._homeless.update(wanted)
        self.healthy = False
        self._wake.set()

    # ---- repair --------------------------------------------------------------------------------

    async def _repair_forever(self) -> None:
        backoff = 0.1
        while True:
            self._homeless &= self._channels
            if not self._homeless:
                self._wake.clear()
                await self._wake.wait()
                backoff = 0.1
                continue
            if await self._repair():
                backoff = 0.1
                continue
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _repair(self) -> bool:
        """One pass: re-read the slot map and subscribe each homeless channel at its owner.

        True once none is left. The channels placed are reported as possibly gapped."""
        placed: list[str] = []
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._cluster.nodes_manager.initialize()
            except _FAILURES as exc:  # TimeoutError is an OSError
                log.debug("%s slot map unavailable: %s", self.where, describe(exc))
                return False
            by_owner: dict[str, list[str]] = {}
            for channel in sorted(self._homeless & self._channels):
                try:
                    owner = self._owner(channel).name
                except _FAILURES as exc:  # a slot with no master for now
                    log.debug("%s has no shard yet: %s", channel, describe(exc))
                    continue
                by_owner.setdefault(owner, []).append(channel)
            for channels in by_owner.values():
                for channel in channels:
                    try:
                        await self._place(channel)
                    except _FAILURES as exc:  # the rest of this shard waits for the next pass
                        log.debug("%s still has no shard: %s", channel, describe(exc))
                        break
                    self._homeless.discard(channel)
                    placed.append(channel)
        if placed:
            self.reconnects += 1
            log.info("resubscribed %d channels on %s", len(placed), self.where)
            self._on_reconnect(frozenset(placed))
        self._homeless &= self._channels
        if self._homeless:
            return False
        self.healthy = True
        return True


@contextlib.asynccontextmanager
async def open_broker(
    url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float = 0.0
) -> AsyncIterator[Broker]:
    """`memory://` for one process, `redis://host:port/db` (or `rediss://`) across instances,
    `redis+cluster://host:port[,host:port...]` for a Redis Cluster (sharded pub/sub).

    A Redis broker waits up to `wait_s` for Redis to answer, then raises `Unavailable`;
    every call on it is bounded by `timeout_s`."""
    if url.startswith("memory://"):
        yield MemoryBroker()
        return
    if url.startswith(("redis://", "rediss://", "unix://")):
        broker = RedisBroker(url, timeout_s=timeout_s)
        try:
            await broker.start(wait_s=wait_s)
        except BaseException:
            await broker.close()
            raise
        try:
            yield broker
        finally:
            await broker.close()
        return
    if url.startswith(CLUSTER_SCHEME):
        cluster = RedisClusterBroker(url, timeout_s=timeout_s)
        try:
            await cluster.start(wait_s=wait_s)
        except BaseException:
            await cluster.close()
            raise
        try:
            yield cluster
        finally:
            await cluster.close()
        return
    raise ValueError(f"unsupported broker URL {url!r}: use memory://, redis:// or redis+cluster://")
