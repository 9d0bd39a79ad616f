"""Rate-limit counters: in the broker's Redis when there is one, else in this process.

The `limits` library does the counting (its sliding-window-counter strategy: two
counters per key and a weighted sum, one Lua call per hit in Redis); this module
picks its storage from the broker URL, as `store.broker.open_broker` does, and
keeps Redis from ever slowing a request down:

- every call is bounded by `timeout_s` (waiting for a pooled connection
  included), and redis-py's own retries are off, so a call never takes longer;
- after a failure the Redis is left alone for `RETRY_AFTER_S`: calls fail at once
  instead of each waiting for the timeout while Redis is down;
- failures become `Unavailable`, like every other store error; the caller
  decides what an unreachable counter means (the server admits the request).

`Counters.hit` and `Counters.peek` answer in seconds to wait: 0 when the request
is (or would be) within its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

import redis.asyncio as aioredis
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from store.broker import CLUSTER_SCHEME, cluster_options
from store.constants import LIMIT_KEY_PREFIX
from store.errors import Unavailable

RETRY_AFTER_S: Final = 1.0  # after a failure, how long calls fail fast before trying again
POOL_SIZE: Final = 32  # Redis connections for counting, per instance
WARM_UP_S: Final = 1.0  # reading a Redis Cluster's slot map before the first request

T = TypeVar("T")


class Counters:
    """Sliding-window counters keyed by (limit, *identifiers)."""

    def __init__(self, storage: Storage, kind: str, *, timeout_s: float) -> None:
        self.kind = kind
        self._storage = storage
        self._strategy = SlidingWindowCounterRateLimiter(storage)
        self._timeout_s = timeout_s
        self._down_until = 0.0

    async def hit(self, limit: RateLimitItem, *key: str, cost: int = 1) -> float:
        """Count `cost` requests; 0 if they fit `limit`, else the seconds until they would."""
        if await self._call(lambda: self._strategy.hit(limit, *key, cost=cost)):
            return 0.0
        return await self._wait(limit, key)

    async def peek(self, limit: RateLimitItem, *key: str) -> float:
        """Like `hit`, without counting: 0 if one more request would fit now."""
        if await self._call(lambda: self._strategy.test(limit, *key)):
            return 0.0
        return await self._wait(limit, key)

    async def _wait(self, limit: RateLimitItem, key: tuple[str, ...]) -> float:
        stats = await self._call(lambda: self._strategy.get_window_stats(limit, *key))
        return max(stats.reset_time - time.time(), 0.001)

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        if self.kind == "memory":
            return await work()
        if time.monotonic() < self._down_until:
            raise Unavailable("rate-limit counters unreachable (retrying shortly)")
        try:
            async with asyncio.timeout(self._timeout_s):
                return await work()
        except (StorageError, RedisError, RedisClusterException, OSError) as exc:
            self._down_until = time.monotonic() + RETRY_AFTER_S
            raise Unavailable(f"rate-limit counters unreachable: {exc!r}") from exc

    async def close(self) -> None:
        if isinstance(self._storage, MemoryStorage):
            # Its expiry sweep is a task of its own; do not leave it to the loop's end.
            timer = self._storage.timer
            if timer is not None and not timer.done():
                timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timer


def memory_counters() -> Counters:
    """Counters in this process only: per-connection budgets, or a single instance."""
    return Counters(MemoryStorage(), "memory", timeout_s=0.0)


@contextlib.asynccontextmanager
async def open_counters(url: str, *, timeout_s: float) -> AsyncIterator[Counters]:
    """Counters shared through the Redis (or Redis Cluster) at `url` (a broker URL), or in
    process for memory://.

    Nothing is dialled here: an unreachable Redis is found out (and admitted) per call,
    so the server starts and serves whether or not its limiter's Redis is up.
    """
    if url.startswith(CLUSTER_SCHEME):
        # The library's sliding-window keys are `{key}` and `{key}/-1`: hash-tagged per
        # identity, so its two-key script stays on one slot.
        storage: Storage = RedisClusterStorage(
            f"async+{url}",
            implementation="redispy",
            key_prefix=LIMIT_KEY_PREFIX,
            wrap_exceptions=True,
            **cluster_options(url, timeout_s=timeout_s),
        )
        client = storage.bridge.storage  # type: ignore[attr-defined]
        # The first call would read the slot map within a request's small bound, and a
        # miss admits requests for RETRY_AFTER_S; read it now, best effort (an unreachable
        # cluster is still found out per call).
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            async with asyncio.timeout(max(timeout_s, WARM_UP_S)):
                await client.initialize()
        try:
            yield Counters(storage, "redis-cluster", timeout_s=timeout_s)
        finally:
            with contextlib.suppress(StorageError, RedisError, RedisClusterException, OSError):
                async with asyncio.timeout(timeout_s):
                    # The library builds the cluster client and offers no close of its own.
                    await client.aclose()
        return
    if not url.startswith(("redis://", "rediss://")):
        counters = memory_counters()
        try:
            yield counters
        finally:
            await counters.close()
        return
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=timeout_s,  # waiting for a free connection counts too
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # our timeout bounds each call; no hidden retries
    )
    storage = RedisStorage(
        f"async+{url}",
        implementation="redispy",
        key_prefix=LIMIT_KEY_PREFIX,
        wrap_exceptions=True,
        connection_pool=pool,  # type: ignore[arg-type]
    )
    try:
        yield Counters(storage, "redis", timeout_s=timeout_s)
    finally:
        await pool.aclose()
