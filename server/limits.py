"""Rate limits: budgets per connection, per identity and per client address.

Every request spends from budgets (`Scope`), each a sliding window counted by the
`limits` library (`store.counters`):

- `connection` (one WebSocket): every frame it sends, readable or not;
- `identity_reads` (token subject and role): reads with a token (watches, lists,
  searches, pings; REST GETs);
- `identity_writes` (the same): commands that change something (REST POST, PUT, DELETE);
- `address` (the client's address): everything sent without a token;
- `auth_failures` (the client's address): tokens refused as invalid (`token_invalid`).

Signed-in requests spend their identity's budgets, not their address's: many
patients behind one clinic NAT address each have their own. The address budget
is for anonymous traffic, and `auth_failures` for guessing: once an address has
spent it, no token from it is even checked until the window moves on.

Identity, address and sign-in budgets live in the broker's Redis when there is
one, so they hold across instances; a connection's budget lives with it, in this
process. A refusal is remembered locally until its `retry_after`, so a flood
costs no further counter calls. When the counters cannot be reached, requests
are admitted (fail open): a log line when it starts and when it ends, and
`slotcast_rate_limiter_unavailable_total` for each request admitted unchecked.

A WebSocket refused `SLOTCAST_RATE_CLOSE_AFTER` times in a row is closed with
4029: a client that reads `retry_after_ms` never gets there.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from enum import StrEnum
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from limits import RateLimitItem, parse

from protocol.errors import ErrorCode, RateLimited, SlotcastError
from protocol.messages import Auth, Message, Watch
from server import logs
from server.auth import AuthError, Identity
from server.commands import REGISTRY
from server.connection import Connection
from server.guard import Guard, Handler
from server.identity import Verifier
from server.metrics import Metrics
from server.settings import Settings
from store.counters import Counters, memory_counters
from store.errors import Unavailable

log = logging.getLogger(__name__)

CLOSE_RATE_LIMITED: Final = 4029
API_KEY: Final = "X-Api-Key"  # the header a service's API key arrives in (REST and WS)
# Refusals remembered locally (until their retry_after) before expired ones are swept.
BLOCKED_SWEEP_AT: Final = 10_000


class Scope(StrEnum):
    CONNECTION = "connection"
    IDENTITY_READS = "identity_reads"
    IDENTITY_WRITES = "identity_writes"
    ADDRESS = "address"
    AUTH_FAILURES = "auth_failures"


def budget(setting: str, name: str) -> RateLimitItem | None:
    """A rate setting ("1000/15 minutes"), or None for "off"."""
    if setting.strip().lower() in {"off", "none", ""}:
        return None
    try:
        return parse(setting)
    except ValueError:
        raise ValueError(
            f"SLOTCAST_{name.upper()}={setting!r} is not a rate like '1000/15 minutes' or 'off'"
        ) from None


def identity_key(identity: Identity) -> str:
    if identity.key is not None:
        return f"key:{identity.key.id}"
    return f"{identity.role.value}:{identity.subject}"


def is_write(kind: type[Message]) -> bool:
    """A command that changes something: its REST route is not a GET."""
    command = REGISTRY.get(kind)
    return command is not None and command.route.method != "GET"


def cost(message: Message | None) -> int:
    """What a frame costs against its budgets, in requests.

    A watch reads and sends a snapshot of every slot in its range: a week costs one
    request, two months nine. A client that asks for the largest snapshots over and over
    spends its budget as fast as the server spends its time on them; a patient watching
    a week, as the pages do, pays what any command pays.
    """
    if isinstance(message, Watch):
        return max(1, math.ceil((message.end - message.start).days / 7))
    return 1


class Limiter:
    """One instance's rate limits: budgets, counters, and what a refusal says."""

    def __init__(self, settings: Settings, metrics: Metrics, verifier: Verifier) -> None:
        self.budgets: dict[Scope, RateLimitItem | None] = {
            scope: budget(getattr(settings, f"rate_{scope.value}"), f"rate_{scope.value}")
            for scope in Scope
        }
        self.close_after = settings.rate_close_after
        self.verifier = verifier
        self.local = memory_counters()  # a connection's budget: it lives on one instance
        self.shared: Counters = self.local  # the broker's Redis, once `limiting` opens it
        self._metrics = metrics
        self._blocked: dict[tuple[Scope, str], float] = {}
        self._failing = False
        self._ids = itertools.count(1)

    async def check(self, scope: Scope, key: str, cost: int = 1) -> None:
        """Spend `cost` requests of `key`'s `scope` budget; `RateLimited` if it is spent."""
        limit = self.budgets[scope]
        if limit is None:
            return
        blocked = self._blocked.get((scope, key))
        if blocked is not None:
            now = time.monotonic()
            if now < blocked:
                self._refuse(scope, blocked - now)
            del self._blocked[(scope, key)]
        counters = self.local if scope is Scope.CONNECTION else self.shared
        try:
            wait = await counters.hit(limit, scope.value, key, cost=cost)
        except Unavailable as exc:
            self._unavailable(exc)
            return
        if counters is self.shared:  # a connection's in-process budget says nothing of Redis
            self._available()
        if wait > 0:
            self._block(scope, key, wait)
            self._refuse(scope, wait)

    async def sign_in_allowed(self, address: str) -> None:
        """`RateLimited` while `address` has spent its sign-in failures: tokens go unchecked."""
        limit = self.budgets[Scope.AUTH_FAILURES]
        if limit is None:
            return
        blocked = self._blocked.get((Scope.AUTH_FAILURES, address))
        now = time.monotonic()
        if blocked is not None and now < blocked:
            self._refuse(Scope.AUTH_FAILURES, blocked - now)
        try:
            wait = await self.shared.peek(limit, Scope.AUTH_FAILURES.value, address)
        except Unavailable as exc:
            self._unavailable(exc)
            return
        self._available()
        if wait > 0:
            self._block(Scope.AUTH_FAILURES, address, wait)
            self._refuse(Scope.AUTH_FAILURES, wait)

    async def sign_in_failed(self, address: str) -> None:
        """Count a refused token; `RateLimited` when that was one too many."""
        await self.check(Scope.AUTH_FAILURES, address)

    async def authenticate(
        self, address: str, header: str | None, api_key: str | None = None
    ) -> Identity | None:
        """The identity of an `Authorization` header or an `X-Api-Key`, checked as a
        sign-in attempt: a refused key counts toward the address's sign-in failures."""
        if not header and not api_key:
            return None
        await self.sign_in_allowed(address)
        try:
            identity = await self.verifier.caller(header, api_key)
            assert identity is not None  # a credential is an identity or an AuthError
        except AuthError as exc:
            if exc.code is ErrorCode.TOKEN_INVALID:
                await self.sign_in_failed(address)
            raise
        logs.identify(identity)  # every later line of this request or connection names it
        return identity

    def throttle(self, conn: Connection, address: str) -> Throttle:
        return Throttle(self, conn, address, str(next(self._ids)))

    # ---- REST -------------------------------------------------------------------------------

    def rest(self, guard: Guard) -> Middleware:
        """The middleware that spends REST requests' budgets (`/api/...`)."""

        @web.middleware
        async def rate_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
            path = request.path
            # The pages ask /api/demo on every load; its answer is a constant.
            if not path.startswith("/api/") or path == "/api/demo":
                return await handler(request)
            address = guard.address(request)
            try:
                identity = await self.authenticate(
                    address, request.headers.get("Authorization"), request.headers.get(API_KEY)
                )
            except RateLimited:
                raise
            except AuthError:
                identity = None  # counted; the handler answers for the token if it needs one
            if identity is None:
                await self.check(Scope.ADDRESS, address)
            else:
                reads = request.method in {"GET", "HEAD"}
                scope = Scope.IDENTITY_READS if reads else Scope.IDENTITY_WRITES
                await self.check(scope, identity_key(identity))
            return await handler(request)

        return rate_limits

    def flooded(self, conn: Connection) -> None:
        """Close a connection that kept sending after being told to wait."""
        self._metrics.connections_closed.labels("rate_limited").inc()
        conn.close_soon(CLOSE_RATE_LIMITED, "rate limited")

    async def close(self) -> None:
        await self.local.close()

    # ---- refusals and outages ---------------------------------------------------------------

    def _refuse(self, scope: Scope, wait_s: float) -> None:
        self._metrics.rate_limited.labels(scope.value).inc()
        raise RateLimited(
            f"too many requests ({scope.value}): retry later",
            retry_after_ms=max(1, math.ceil(wait_s * 1000)),
        )

    def _block(self, scope: Scope, key: str, wait_s: float) -> None:
        now = time.monotonic()
        if len(self._blocked) >= BLOCKED_SWEEP_AT:
            self._blocked = {k: t for k, t in self._blocked.items() if t > now}
            if len(self._blocked) >= BLOCKED_SWEEP_AT:
                self._blocked.clear()  # only a cache of answers the counters would give
        self._blocked[(scope, key)] = now + wait_s

    def _unavailable(self, exc: Unavailable) -> None:
        self._metrics.limiter_unavailable.inc()
        if not self._failing:
            self._failing = True
            log.warning("rate limits not enforced, counters unreachable: %s", exc.message)

    def _available(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("rate limits enforced again: counters reachable")


class Throttle:
    """One WebSocket's view of the limits: its own budget, its address, its refusals."""

    __slots__ = ("address", "conn", "key", "limiter", "streak")

    def __init__(self, limiter: Limiter, conn: Connection, address: str, key: str) -> None:
        self.limiter = limiter
        self.conn = conn
        self.address = address
        self.key = key
        self.streak = 0  # refusals for rate since the last admitted frame

    async def admit(self, message: Message | None, identity: Identity | None) -> None:
        """Spend a frame's budgets (`message` None: it did not decode); `RateLimited` if
        spent. A frame costs what it makes the server do (`cost`)."""
        limiter = self.limiter
        kind = type(message) if message is not None else None
        price = cost(message)
        await limiter.check(Scope.CONNECTION, self.key, price)
        if kind is Auth:
            await limiter.sign_in_allowed(self.address)
        elif kind is None:
            pass  # unreadable: nothing was done, and the connection's budget paid for it
        elif identity is not None:
            scope = Scope.IDENTITY_WRITES if is_write(kind) else Scope.IDENTITY_READS
            await limiter.check(scope, identity_key(identity), price)
        else:
            await limiter.check(Scope.ADDRESS, self.address, price)
        self.streak = 0

    async def authenticate(self, header: str | None, api_key: str | None = None) -> Identity | None:
        """The handshake's `Authorization` header or `X-Api-Key`, as a sign-in attempt."""
        return await self.limiter.authenticate(self.address, header, api_key)

    async def refusal(self, error: SlotcastError) -> SlotcastError:
        """What to answer for a refused frame: counts failed sign-ins, closes a flood."""
        if error.code is ErrorCode.TOKEN_INVALID:
            try:
                await self.limiter.sign_in_failed(self.address)
            except RateLimited as limited:
                error = limited
        if error.code is ErrorCode.RATE_LIMITED:
            self.streak += 1
            if self.streak >= self.limiter.close_after and not self.conn.closing:
                self.limiter.flooded(self.conn)
        return error
