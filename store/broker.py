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
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from store.errors import Unavailable

log = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes], None]
OnReconnect = Callable[[frozenset[str]], None]


class Broker(abc.ABC):
    """Subscribe only to channels with local listeners; publish to anyone's."""

    kind: str
    # False while the listener is cut off from the broker and trying to reconnect.
    healthy: bool = True

    def __init__(self) -> None:
        self._on_message: OnMessage = lambda channel, data: None
        self._on_reconnect: OnReconnect = lambda channels: None
        self._channels: set[str] = set()

    def listen(self, on_message: OnMessage, on_reconnect: OnReconnect | None = None) -> None:
        """Route every received message to `on_message`; `on_reconnect` hears of possible gaps."""
        self._on_message = on_message
        if on_reconnect is not None:
            self._on_reconnect = on_reconnect

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise `Unavailable` when the broker cannot be reached."""


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

    async def ping(self) -> None:
        return None


class RedisBroker(Broker):
    """Redis pub/sub, with a reader task that survives Redis restarts.

    After a reconnect it resubscribes everything and reports the channels as
    possibly gapped, since messages published during the outage are gone.
    """

    kind = "redis"

    def __init__(self, url: str, *, max_backoff: float = 5.0) -> None:
        super().__init__()
        self._url = url
        self._max_backoff = max_backoff
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, health_check_interval=10, socket_keepalive=True
        )
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._reader: asyncio.Task[None] | None = None
        self._have_channels = asyncio.Event()

    async def start(self) -> None:
        await self.ping()
        self._reader = asyncio.create_task(self._read_forever(), name="redis-broker-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()
        await self._redis.aclose()

    async def publish(self, channel: str, data: bytes) -> None:
        await self._command(self._redis.publish, channel, data)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        try:
            await self._pubsub.subscribe(channel)
        except (RedisError, OSError) as exc:
            # The reader will resubscribe once Redis is back.
            log.warning("subscribe to %s deferred: %s", channel, exc)
        self._have_channels.set()

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.unsubscribe(channel)

    async def ping(self) -> None:
        await self._command(self._redis.ping)

    async def _command(self, command: Any, *args: Any) -> None:
        """Run a command, retrying once on a dropped connection.

        After a Redis restart the pool still holds the dead connection; the first
        attempt discards it and the retry dials afresh. (A client-wide `retry=`
        would also make the pub/sub connection reconnect silently, hiding the gap
        that `on_reconnect` must report.)
        """
        for attempt in (1, 2):
            try:
                await command(*args)
                return
            except RedisConnectionError as exc:
                if attempt == 2:
                    raise Unavailable(f"broker unreachable: {exc}") from exc
            except (RedisError, OSError) as exc:
                raise Unavailable(f"broker unreachable: {exc}") from exc

    async def _read_forever(self) -> None:
        backoff = 0.1
        while True:
            if not self._pubsub.subscribed:
                # get_message() returns at once with no subscription; wait for one.
                self._have_channels.clear()
                await self._have_channels.wait()
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except (RedisError, OSError) as exc:
                self.healthy = False
                log.warning("lost Redis (%s); reconnecting", exc)
                while True:
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, self._max_backoff)
                    if await self._resubscribe():
                        break
                continue
            if message is not None and message["type"] == "message":
                channel = message["channel"].decode()
                self._on_message(channel, message["data"])

    async def _resubscribe(self) -> bool:
        """A fresh pub/sub connection with every channel; False while Redis is still away."""
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        channels = self.channels
        try:
            await self._redis.ping()
            if channels:
                await self._pubsub.subscribe(*channels)
        except (RedisError, OSError) as exc:
            log.warning("Redis still unreachable: %s", exc)
            return False
        self.healthy = True
        log.info("reconnected to Redis; resubscribed %d channels", len(channels))
        self._on_reconnect(channels)
        return True


@contextlib.asynccontextmanager
async def open_broker(url: str) -> AsyncIterator[Broker]:
    """`memory://` for one process, `redis://host:port/db` (or `rediss://`) across instances."""
    if url.startswith("memory://"):
        yield MemoryBroker()
        return
    if url.startswith(("redis://", "rediss://", "unix://")):
        broker = RedisBroker(url)
        try:
            await broker.start()
        except Unavailable:
            await broker.close()
            raise
        try:
            yield broker
        finally:
            await broker.close()
        return
    raise ValueError(f"unsupported broker URL {url!r}: use memory:// or redis://")
