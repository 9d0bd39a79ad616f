"""Pub/sub between instances: one small interface, an in-process and a Redis implementation.

The server never knows which one runs; `open_broker(url)` picks it from the URL
(`memory://` or `redis://...`). Delivery is at-most-once and unordered across
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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

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
        try:
            with broker_translated():
                async with asyncio.timeout(bound):
                    try:
                        await command()
                    except RedisConnectionError:
                        await command()
        except Unavailable as exc:
            if self.answering:
                self.answering = False
                log.warning("%s is unavailable: %s", self.where, exc.message)
            raise
        if not self.answering:
            self.answering = True
            log.info("%s answers again", self.where)

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


@contextlib.asynccontextmanager
async def open_broker(
    url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float = 0.0
) -> AsyncIterator[Broker]:
    """`memory://` for one process, `redis://host:port/db` (or `rediss://`) across instances.

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
    raise ValueError(f"unsupported broker URL {url!r}: use memory:// or redis://")
