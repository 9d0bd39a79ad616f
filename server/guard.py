"""The front door's own defences: who the client is, how many sockets it may hold, what it
may read, and how slowly it may talk.

- **The client's address** is the peer's, unless the peer is a trusted proxy
  (`SLOTCAST_TRUSTED_PROXIES`, the balancer): then it is the right-most address in
  `X-Forwarded-For` that is not itself a trusted proxy. HAProxy appends the address
  it saw (`option forwardfor`), so whatever a client writes into the header itself
  stays to the left and is never believed.
- **Connection caps**: open WebSockets (and upgrades under way) per client address
  and per instance; past either, the upgrade is refused with 503 and `Retry-After`
  before any WebSocket exists.
- **Origin**: a browser says which page opened a WebSocket. `/ws` accepts its own
  pages (same host and port as the request) and `SLOTCAST_HOST_ORIGINS`; other
  pages are refused with 403, so a site a patient happens to visit cannot use their
  browser to talk to Slotcast. Clients that send no `Origin` (apps, servers) pass.
- **Idle anonymous connections** (no identity, no room) are closed with 4009 after
  `SLOTCAST_IDLE_ANONYMOUS_S`: a socket that neither signs in nor watches anything
  only holds a file descriptor.
- **Slow HTTP**: `SLOTCAST_HEADER_TIMEOUT_S` is aiohttp's keep-alive timeout, which
  also closes a connection whose first request head is not complete in time
  (`server.cli.serve`); `body_deadline` gives a request `SLOTCAST_BODY_TIMEOUT_S`
  to deliver its body, then answers 408 and closes.
- **Every response** says `X-Content-Type-Options: nosniff` and carries a
  Content-Security-Policy that allows nothing (the pages set their own, wider one).
- **TLS** usually ends at the balancer, so a request arrives as plain http: it counts
  as https when it came over TLS itself or when a trusted proxy says
  `X-Forwarded-Proto: https` (the client's own header is never believed). Then the
  instance cookie is `Secure`, so a browser never sends it in the clear, and with
  `SLOTCAST_HSTS_MAX_AGE` the response carries Strict-Transport-Security (never on
  plain http, where a browser ignores it and a misconfigured proxy would leak it).
- **`/metrics`** answers only `SLOTCAST_METRICS_ALLOW` addresses (loopback by
  default) or a bearer of `SLOTCAST_METRICS_TOKEN`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import Counter

from server.metrics import Metrics
from server.session import Session
from server.settings import Settings

log = logging.getLogger(__name__)

CLOSE_IDLE: Final = 4009
# How long a client refused for a connection cap is told to wait before trying again.
CAPPED_RETRY_AFTER_S: Final = 5
# The policy of every response that sets none of its own: JSON, files and errors need
# no script, style, frame or form, and no page may frame them.
CSP_NONE: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")

_CLOSE: Final = {"Connection": "close"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A WebSocket handler, given the address whose place it holds (`Guard.upgrade`).
Upgrader = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def host_origins(setting: str) -> list[str]:
    """SLOTCAST_HOST_ORIGINS: the host application's origins, space-separated."""
    origins = setting.split()
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise ValueError(
                f"SLOTCAST_HOST_ORIGINS: {origin!r} is not an origin like https://host"
            )
    return origins


def networks(setting: str, name: str) -> tuple[Network, ...]:
    """Addresses and networks, space- or comma-separated ("10.0.0.0/8 ::1")."""
    found = []
    for item in setting.replace(",", " ").split():
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"SLOTCAST_{name.upper()}: {item!r} is not an address or network"
            ) from None
    return tuple(found)


@functools.lru_cache(maxsize=4096)
def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parsed once per address seen lately: every request asks, most from a few peers."""
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _within(address: str, nets: tuple[Network, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in nets)


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The client's address, believing `X-Forwarded-For` only from a trusted proxy."""
    peer = request.remote or ""
    if not trusted or not _within(peer, trusted):
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
    for hop in reversed(hops):
        if _ip(hop) is None:
            break  # garbage: believe nothing to its left
        if not _within(hop, trusted):
            return hop
        peer = hop  # a proxy in front of our proxy: keep walking left
    return peer


class MetricsAccess:
    """Who may read /metrics, apart from the rest of the guard: a `slotcast webhooks`
    worker serves its own /metrics (server.webhook_worker) under the same allow list
    and token as a serving instance, and nothing else a serving instance guards."""

    def __init__(self, settings: Settings, refused: Counter) -> None:
        self.trusted = networks(settings.trusted_proxies, "trusted_proxies")
        self.allow = networks(settings.metrics_allow, "metrics_allow")
        self.token = settings.metrics_token
        self._refused = refused

    async def check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if _within(client_address(request, self.trusted), self.allow) or self._bearer(request):
            return await handler(request)
        self._refused.inc()
        raise web.HTTPForbidden(text="metrics are for the allowed addresses or a token")

    def _bearer(self, request: web.Request) -> bool:
        if not self.token:
            return False
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.token.encode()
        )


class Guard:
    """Caps, origins, idle sockets and metrics access for one instance."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.trusted = networks(settings.trusted_proxies, "trusted_proxies")
        self.metrics_access = MetricsAccess(settings, metrics.metrics_refused)
        self.origins = frozenset(o.lower() for o in host_origins(settings.host_origins))
        self.per_address = settings.max_connections_per_address
        self.per_instance = settings.max_connections
        self.idle_s = settings.idle_anonymous_s
        self.body_timeout_s = settings.body_timeout_s
        self.hsts = f"max-age={settings.hsts_max_age}" if settings.hsts_max_age > 0 else None
        self.open: dict[str, int] = {}  # WebSockets (and upgrades under way) per address
        self.total = 0
        self._metrics = metrics

    def address(self, request: web.Request) -> str:
        return client_address(request, self.trusted)

    def https(self, request: web.Request) -> bool:
        """Whether the client reached us over TLS, here or at a trusted proxy."""
        if request.secure:
            return True
        if not self.trusted or not _within(request.remote or "", self.trusted):
            return False
        # The right-most value is the one our own proxy set (HAProxy replaces the header).
        values = [
            v.strip() for h in request.headers.getall("X-Forwarded-Proto", ()) for v in h.split(",")
        ]
        return bool(values) and values[-1].lower() == "https"

    # ---- /ws: refused before the upgrade ----------------------------------------------------

    async def upgrade(self, request: web.Request, handler: Upgrader) -> web.StreamResponse:
        """Run the WebSocket `handler` if the origin and the caps allow, holding a place.

        The place is the handler's to give back (`release`): a socket outlives its
        handler (server.wire), so only the session knows when it is over.
        """
        if not self.origin_allowed(request):
            self._metrics.connections_refused.labels("origin").inc()
            raise web.HTTPForbidden(text="this page's origin may not open a WebSocket here")
        address = self.address(request)
        self.admit(address)
        return await handler(request, address)

    def origin_allowed(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser: apps and servers send none
        origin = origin.strip().lower()
        if origin in self.origins:
            return True
        parts = urlsplit(origin)
        # Our own pages: the same host and port as the request. The scheme is not
        # compared, since TLS usually ends at the balancer and the request arrives as http.
        return parts.scheme in {"http", "https"} and parts.netloc == request.host.lower()

    def admit(self, address: str) -> None:
        """Hold a place for a connection from `address`, or refuse it (503) over a cap."""
        reason = None
        if self.per_instance and self.total >= self.per_instance:
            reason = "per_instance"
        elif self.per_address and self.open.get(address, 0) >= self.per_address:
            reason = "per_address"
        if reason is not None:
            self._metrics.connections_refused.labels(reason).inc()
            raise web.HTTPServiceUnavailable(
                text="too many connections: try again later",
                headers={"Retry-After": str(CAPPED_RETRY_AFTER_S)},
            )
        self.open[address] = self.open.get(address, 0) + 1
        self.total += 1

    def release(self, address: str) -> None:
        """The connection `admit` held a place for is over."""
        self.total -= 1
        left = self.open[address] - 1
        if left:
            self.open[address] = left
        else:
            del self.open[address]

    # ---- idle anonymous connections ---------------------------------------------------------

    async def close_idle(self, sessions: set[Session]) -> None:
        """Close anonymous connections that have watched nothing for `idle_s`. Runs forever."""
        if self.idle_s <= 0:
            return
        since: dict[Session, float] = {}
        while True:
            await asyncio.sleep(min(self.idle_s / 4, 1.0))
            now = time.monotonic()
            idle: dict[Session, float] = {}
            for session in sessions:
                if session.identity is None and not (
                    session.watches or session.dashboards or session.appointments
                ):
                    started = idle[session] = since.get(session, now)
                    if now - started >= self.idle_s:
                        self._metrics.connections_closed.labels("idle").inc()
                        session.conn.close_soon(CLOSE_IDLE, "idle")
                        idle[session] = math.inf  # closing: not counted again
            since = idle  # a session that signed in, watched or left starts over

    # ---- every response ---------------------------------------------------------------------

    async def headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare`: nosniff and a closed CSP, unless the response set its own;
        HSTS on https when configured."""
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", CSP_NONE)
        if self.hsts is not None and self.https(request):
            response.headers.setdefault("Strict-Transport-Security", self.hsts)

    @web.middleware
    async def body_deadline(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A request has `body_timeout_s` to deliver its body (REST bodies are small)."""
        if request.body_exists and self.body_timeout_s > 0:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    await request.read()  # kept by aiohttp: the handler's read() gets it
            except TimeoutError:
                self._metrics.requests_timed_out.inc()
                log.info("closing %s: request body not sent in time", self.address(request))
                response = web.Response(
                    status=408, text="request body not sent in time", headers=_CLOSE
                )
                await response.prepare(request)
                await response.write_eof()
                if request.transport is not None:
                    request.transport.close()  # after the 408 is flushed; no lingering read
                return response
        return await handler(request)

    # ---- /metrics ---------------------------------------------------------------------------

    async def metrics(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await self.metrics_access.check(request, handler)
