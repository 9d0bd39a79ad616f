"""Webhook delivery: the change log to the clinic's systems, signed, in order, at least once.

`Dispatcher.run` is a lifetime task of its own, never on a request's path: every
`SLOTCAST_WEBHOOK_POLL_S` (or at once after a commit on this instance, `wake`) it
leases the endpoints that are due and that no live instance serves
(`store.webhooks.claim`), up to `SLOTCAST_WEBHOOK_CONCURRENCY`, and serves each in a
task of its own: a slow or dead endpoint holds only its own task, so it never delays
another endpoint, nor any booking.

Serving an endpoint is sequential: the next batch of its backlog (replays first),
each message sent and its cursor moved before the next, so each doctor's changes
arrive in version order. A failure records the attempt, schedules the retry
(capped exponential backoff with jitter, or the receiver's `Retry-After`) in the
endpoint's row, and gives the lease up: any instance retries when it is due, and
one that has failed for `SLOTCAST_WEBHOOK_DISABLE_AFTER_S` is disabled, its backlog
kept. A message is sent again only if its cursor did not move, with the same
`webhook-id`, so a receiver deduplicates by it.

Signatures follow Standard Webhooks through its reference library
(`standardwebhooks.Webhook.sign`): one per signing secret, space-separated, so
during a rotation receivers holding either secret verify. Requests never follow
redirects, and every address a name resolves to is checked when connecting
(`GuardedResolver`), so a URL cannot be turned towards the clinic's own network
unless `SLOTCAST_WEBHOOK_ALLOW_PRIVATE` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from standardwebhooks import Webhook

from protocol.errors import ErrorCode, SlotcastError
from server.settings import Settings
from store import webhooks
from store.errors import StoreError
from store.pool import Store
from store.webhooks import Attempt, Endpoint, Message

log = logging.getLogger(__name__)

PER_DOCTOR = 50  # messages of one doctor in a batch, so one busy doctor never starves others
BATCH = 200
USER_AGENT = "Slotcast-Webhooks/1"


# ---- where a webhook may go ---------------------------------------------------------------------


class RefusedAddress(OSError):
    """A webhook URL that resolves to an address it may not reach."""


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


class GuardedResolver(AbstractResolver):
    """Resolve as aiohttp does, then refuse any non-public address: checked at connect
    time, on the very addresses used, so a name re-pointed after registration (DNS
    rebinding) is refused too."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for entry in found:
            if not public_address(entry["host"]):
                raise RefusedAddress(f"{host} resolves to a non-public address")
        return found

    async def close(self) -> None:
        await self._inner.close()


def _invalid(message: str) -> SlotcastError:
    return SlotcastError(message, code=ErrorCode.INVALID)


async def check_url(url: str, *, allow_private: bool) -> str:
    """An endpoint URL an admin may register: http(s), a host, no credentials, and (unless
    allowed) every address it resolves to public. `invalid` otherwise."""
    if len(url) > 2000:
        raise _invalid("a webhook URL is at most 2000 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _invalid("not a valid URL") from None
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise _invalid("a webhook URL is http(s)://host/...")
    if parts.username or parts.password:
        raise _invalid("a webhook URL carries no credentials; the signature authenticates")
    if allow_private:
        return url
    host = parts.hostname
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port or 443, type=socket.SOCK_STREAM),
            timeout=5.0,
        )
    except (OSError, TimeoutError):
        raise _invalid(f"{host} does not resolve") from None
    if any(not public_address(str(info[4][0])) for info in infos):
        raise _invalid(
            f"{host} resolves to a loopback, link-local or private address "
            "(SLOTCAST_WEBHOOK_ALLOW_PRIVATE allows it)"
        )
    return url


def _literal_refused(url: str) -> bool:
    """An IP literal never reaches the resolver: checked here before each send."""
    host = urlsplit(url).hostname or ""
    try:
        return not public_address(host)
    except ValueError:
        return False


# ---- signing ---------------------------------------------------------------------------------


def signature(secrets: list[str], message_id: str, at: datetime, body: bytes) -> str:
    """`webhook-signature`: one `v1,` signature per secret, space-separated."""
    return " ".join(Webhook(s).sign(message_id, at, body) for s in secrets)


def headers_for(ep: Endpoint, message: Message, at: datetime) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message.id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature(ep.signing_secrets(at), message.id, at, message.body),
    }


# ---- retries -------------------------------------------------------------------------------------


def backoff_s(failures: int, *, base_s: float, cap_s: float, retry_after_s: float | None) -> float:
    """Capped exponential backoff with jitter (half fixed, half random, so retries spread
    out yet never come sooner than half the step); a receiver's `Retry-After` wins when
    longer, up to the same cap."""
    step = min(cap_s, base_s * 2 ** min(failures, 30))
    delay: float = step / 2 + random.uniform(0, step / 2)  # jitter, not a secret
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


def retry_after(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(slots=True)
class Skipped:
    """Messages done with (sent, or not wanted) whose cursor move is not yet written."""

    cursors: dict[int, int] = field(default_factory=dict)
    replays: list[Message] = field(default_factory=list)

    def add(self, message: Message, replayed: bool) -> None:
        if replayed:
            self.replays.append(message)
        else:
            self.cursors[message.doctor_id] = message.version

    def __bool__(self) -> bool:
        return bool(self.cursors or self.replays)


# ---- the dispatcher ------------------------------------------------------------------------------


class Dispatcher:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        on_attempt: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.instance = settings.instance_id
        self._on_attempt = on_attempt or (lambda endpoint_id, ok: None)
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._away = False  # the last claim failed: said once, not every poll
        if settings.webhook_timeout_s * 3 > settings.webhook_lease_s:
            # Renewed every third of the lease, between sends: a send longer than the
            # rest of it lets another instance take the endpoint while one is in flight.
            log.warning(
                "SLOTCAST_WEBHOOK_LEASE_S (%g) should exceed 3 x SLOTCAST_WEBHOOK_TIMEOUT_S (%g)",
                settings.webhook_lease_s,
                settings.webhook_timeout_s,
            )

    def wake(self, _: Any = None) -> None:
        """A commit here: look for work now rather than at the next poll (only queues)."""
        self._wake.set()

    async def run(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(
            resolver=None if s.webhook_allow_private else GuardedResolver(),
            limit=max(1, s.webhook_concurrency),
        )
        timeout = aiohttp.ClientTimeout(total=s.webhook_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            self._http = http
            try:
                while True:
                    await self._claim()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(s.webhook_poll_s):
                            await self._wake.wait()
                    self._wake.clear()
            finally:
                # Each task gives its lease back on the way out (`_serve`'s finally), so
                # another instance need not wait for it to run out.
                tasks = list(self._serving.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim(self) -> None:
        free = self.settings.webhook_concurrency - len(self._serving)
        if free <= 0:
            return
        try:
            claimed = await webhooks.claim(
                self.store,
                self.instance,
                lease_s=self.settings.webhook_lease_s,
                limit=free,
                serving=list(self._serving),
            )
        except StoreError as exc:
            if not self._away:
                self._away = True
                log.warning("webhooks: paused, could not claim endpoints: %s", exc.message)
            return
        if self._away:
            self._away = False
            log.info("webhooks: resumed")
        for ep in claimed:
            task = asyncio.create_task(self._serve(ep), name=f"webhook-{ep.id}")
            self._serving[ep.id] = task
            task.add_done_callback(self._forget(ep.id))

    def _forget(self, endpoint_id: int) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._serving.pop(endpoint_id, None)

        return done

    async def _serve(self, ep: Endpoint) -> None:
        """Send the endpoint's backlog until it is empty, a send fails or the lease is lost."""
        s = self.settings
        release = True
        renewed_at = time.monotonic()
        try:
            while True:
                batch = await webhooks.next_batch(
                    self.store, ep, per_doctor=PER_DOCTOR, limit=BATCH
                )
                queue = [(m, True) for m in batch.replays] + [(m, False) for m in batch.backlog]
                if not queue:
                    return
                # Changes the endpoint does not want move its cursor too, written with
                # the next delivery (or at the end of the batch), not one by one.
                skipped = Skipped()
                for message, replayed in queue:
                    # Renewed well before it runs out; reading the row again also picks
                    # up an admin's changes (disabled, filters, a rotated secret).
                    if time.monotonic() - renewed_at > s.webhook_lease_s / 3:
                        fresh = await webhooks.renew(
                            self.store, ep.id, self.instance, lease_s=s.webhook_lease_s
                        )
                        if fresh is None:  # disabled, deleted, or taken over
                            release = False
                            return
                        ep, renewed_at = fresh, time.monotonic()
                    if not ep.wants(message.events) or (
                        ep.doctor_ids and message.doctor_id not in ep.doctor_ids
                    ):
                        skipped.add(message, replayed)
                        continue
                    attempt, wait = await self._send(ep, message)
                    self._on_attempt(ep.id, attempt.ok)
                    if not attempt.ok:
                        release = False  # `failed` gives the lease up with the retry time
                        if skipped and not await self._moved(ep, skipped, None):
                            return
                        await self._failed(ep, attempt, wait)
                        return
                    skipped.add(message, replayed)
                    if not await self._moved(ep, skipped, attempt):
                        release = False  # the lease was lost: another instance goes on
                        return
                    skipped = Skipped()
                if skipped and not await self._moved(ep, skipped, None):
                    release = False
                    return
        except StoreError as exc:
            log.warning("webhooks: endpoint %s paused: %s", ep.id, exc.message)
        except Exception:
            log.exception("webhooks: endpoint %s failed unexpectedly", ep.id)
        finally:
            if release:
                with contextlib.suppress(StoreError):
                    await webhooks.release(self.store, ep.id, self.instance)

    async def _moved(self, ep: Endpoint, done: Skipped, attempt: Attempt | None) -> bool:
        return await webhooks.delivered(
            self.store,
            ep.id,
            self.instance,
            cursors=done.cursors,
            replayed=done.replays,
            attempt=attempt,
        )

    async def _send(self, ep: Endpoint, message: Message) -> tuple[Attempt, float | None]:
        """One POST; the attempt, and the receiver's Retry-After in seconds if it gave one."""
        assert self._http is not None
        now = datetime.now(UTC)
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        wait: float | None = None
        try:
            if not self.settings.webhook_allow_private and _literal_refused(ep.url):
                raise RefusedAddress("the URL names a non-public address")
            async with self._http.post(
                ep.url,
                data=message.body,
                headers=headers_for(ep, message, now),
                allow_redirects=False,
            ) as response:
                status = response.status
                await response.content.readany()  # a little of the body, never all of it
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
                    wait = retry_after(response.headers.get("Retry-After"), now)
        except TimeoutError:
            error = f"no answer within {self.settings.webhook_timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        latency_ms = (time.perf_counter() - started) * 1000
        attempt = Attempt(
            message.id,
            message.doctor_id,
            message.version,
            message.event_type,
            status,
            error is None,
            latency_ms,
            error,
        )
        return attempt, wait

    async def _failed(self, ep: Endpoint, attempt: Attempt, wait: float | None) -> None:
        s = self.settings
        delay = backoff_s(
            ep.failures,
            base_s=s.webhook_retry_base_s,
            cap_s=s.webhook_retry_max_s,
            retry_after_s=wait,
        )
        retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        enabled = await webhooks.failed(
            self.store,
            ep.id,
            self.instance,
            attempt,
            retry_at=retry_at,
            disable_after_s=s.webhook_disable_after_s,
        )
        if enabled is None:
            log.info("webhooks: endpoint %s: lease lost while %s failed", ep.id, attempt.message_id)
        elif enabled:
            log.info(
                "webhooks: endpoint %s: %s failed (%s); retry in %.1f s",
                ep.id,
                attempt.message_id,
                attempt.error,
                delay,
            )
        else:
            log.warning(
                "webhooks: endpoint %s disabled after failing for %g s; its backlog is kept",
                ep.id,
                s.webhook_disable_after_s,
            )


async def measure(store: Store, set_gauges: Callable[[dict[int, tuple[int, float]]], None]) -> None:
    """Backlog and oldest age per endpoint, for the gauges (every instance reads the same)."""
    set_gauges(await webhooks.backlog(store))
