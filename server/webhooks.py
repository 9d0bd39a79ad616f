"""Webhook delivery: the change log to the clinic's systems, signed, in order, at least once.

`Dispatcher.run` is a lifetime task of its own, never on a request's path: every
`SLOTCAST_WEBHOOK_POLL_S` (or at once after a commit on this instance, `wake`) it
leases the endpoints that are due and that no live instance serves
(`store.webhooks.claim`), up to `SLOTCAST_WEBHOOK_CONCURRENCY`, and serves each in a
task of its own: a slow or dead endpoint holds only its own task, so it never delays
another endpoint, nor any booking. It runs in every serving instance
(`SLOTCAST_WEBHOOKS=inline`) or only in `slotcast webhooks` workers
(server/webhook_worker.py), where no commit wakes it and it keeps idle endpoints.

Serving an endpoint runs one lane per doctor, up to `SLOTCAST_WEBHOOK_INFLIGHT` at
once: a doctor's next message is sent only after its previous one was answered 2xx,
so each doctor's changes arrive in version order, while a receiver slow to answer for
one doctor holds back no other. The endpoint's task alone touches the database (on
delivery's own pool, never the bookings'): it writes the cursors of whatever the
lanes finished in one statement, after the sends succeeded (a crash resends, never
skips), and reads the next messages of every doctor not in flight in one query
(replays first). A failure stops new sends, records the attempt, schedules the retry
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
import functools
import ipaddress
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
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
from store.pool import Store, open_store
from store.webhooks import Attempt, Endpoint, Message

log = logging.getLogger(__name__)

PER_DOCTOR = 50  # messages of one doctor in a batch, so one busy doctor never starves others
BATCH = 200
# An endpoint's task writes and reads at most this often: what finishes (and commits)
# meanwhile shares one cursor write and one read, rather than one each per message.
GATHER_S = 0.025
# ... and this often when its last read found fewer messages than it may have in flight:
# a read costs PostgreSQL a fixed part (every doctor against the endpoint's cursors) that
# a few messages would not repay, so at low rates a change may wait up to this long more.
GATHER_SPARSE_S = 0.1
# What the lanes finished is written before each read (so the read starts past it), when
# a send failed, and otherwise at least this often: not on every gathering, since
# sends finish far more often than lanes free up for a read, and each write costs a
# statement (the endpoint row, the cursors, the attempts) whatever it carries. A crash
# resends what was answered since the last write.
WRITE_EVERY_S = 0.25
USER_AGENT = "Slotcast-Webhooks/1"
# After a claim that found nothing, commits wake the dispatcher no sooner than this.
EMPTY_CLAIM_GAP_S = 0.25


@contextlib.asynccontextmanager
async def delivery_store(dsn: str, settings: Settings) -> AsyncIterator[Store]:
    """Webhook delivery's own connections, with the same bounds as the bookings': however
    far behind the endpoints are, delivery never waits for (nor takes) a booking's
    connection. Its commits skip the WAL flush: a cursor write lost in a crash resends,
    never skips."""
    async with open_store(
        dsn,
        min_size=1,
        max_size=max(1, settings.webhook_db_pool),
        lock_timeout_ms=settings.lock_timeout_ms,
        statement_timeout_ms=settings.statement_timeout_ms,
        timeout_ms=settings.db_timeout_ms,
        acquire_timeout_ms=settings.db_acquire_timeout_ms,
        application_name="slotcast-webhooks",
        durable_commits=False,
    ) as store:
        yield store


# SLOTCAST_WEBHOOKS: deliver in every serving instance, or only in `slotcast webhooks`
# processes (server/webhook_worker.py).
MODES = ("inline", "worker")


def delivery_mode(settings: Settings) -> str:
    """SLOTCAST_WEBHOOKS, checked: a ValueError naming the setting otherwise."""
    if settings.webhooks not in MODES:
        raise ValueError(f"SLOTCAST_WEBHOOKS={settings.webhooks!r}: use one of {', '.join(MODES)}")
    return settings.webhooks


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


@functools.lru_cache(maxsize=256)
def _signer(secret: str) -> Webhook:
    """One `Webhook` per secret, kept: making one decodes the secret's base64 every time,
    and a worker signs hundreds of messages a second with the same two or three."""
    return Webhook(secret)


def signature(secrets: list[str], message_id: str, at: datetime, body: bytes) -> str:
    """`webhook-signature`: one `v1,` signature per secret, space-separated."""
    return " ".join(_signer(s).sign(message_id, at, body) for s in secrets)


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
class Done:
    """Messages done with (sent, or not wanted) and attempts made whose cursor moves and
    records are not yet written: written together, for many doctors at once."""

    cursors: dict[int, int] = field(default_factory=dict)
    replays: list[Message] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)

    def add(self, message: Message, replayed: bool) -> None:
        if replayed:
            self.replays.append(message)
        else:
            self.cursors[message.doctor_id] = max(
                message.version, self.cursors.get(message.doctor_id, 0)
            )

    def __bool__(self) -> bool:
        return bool(self.cursors or self.replays or self.attempts)


@dataclass(slots=True)
class Round:
    """An endpoint being served: the endpoint as last read (renewals pick up an admin's
    changes), what is done but not yet written, and the first failure, which stops new
    sends (a failing endpoint backs off as a whole)."""

    ep: Endpoint
    done: Done = field(default_factory=Done)
    failure: tuple[Attempt, float | None] | None = None
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    woken: bool = False  # a commit since the last read of the backlog

    def wake(self) -> None:
        self.woken = True
        self.progress.set()

    def fail(self, attempt: Attempt, wait: float | None) -> None:
        """The first failure is the endpoint's (recorded by `failed`, with the retry);
        any later one, of a send already in flight, is only recorded."""
        if self.failure is None:
            self.failure = (attempt, wait)
        else:
            self.done.attempts.append(attempt)


def lanes(batch: webhooks.Batch) -> dict[int, list[tuple[Message, bool]]]:
    """The batch as one lane per doctor, each in version order, the doctors in the order
    the batch gives them (oldest waiting first): a lane is sent one message at a time,
    several lanes at once."""
    by_doctor: dict[int, list[tuple[Message, bool]]] = {}
    for message in batch.replays:
        by_doctor.setdefault(message.doctor_id, []).append((message, True))
    for message in batch.backlog:
        by_doctor.setdefault(message.doctor_id, []).append((message, False))
    return by_doctor


# ---- the dispatcher ------------------------------------------------------------------------------


class Dispatcher:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        on_attempt: Callable[[int, bool], None] | None = None,
        linger: bool = False,
    ) -> None:
        """`linger`: keep an endpoint whose backlog is empty, reading it every
        `SLOTCAST_WEBHOOK_POLL_S`, rather than give it back. A serving instance gives it
        back, so that whichever instance commits next (and is woken by it) claims it at
        once; a worker, which no commit wakes, keeps it and saves a claim and a release
        per endpoint per poll."""
        self.store = store
        self._linger = linger
        self.settings = settings
        self.instance = settings.instance_id
        self._on_attempt = on_attempt or (lambda endpoint_id, ok: None)
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._rounds: dict[int, Round] = {}  # the endpoints being served, to wake them
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
        for run in self._rounds.values():
            run.wake()

    async def run(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(
            resolver=None if s.webhook_allow_private else GuardedResolver(),
            limit=max(1, s.webhook_concurrency) * max(1, s.webhook_inflight),
        )
        timeout = aiohttp.ClientTimeout(total=s.webhook_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            self._http = http
            loop = asyncio.get_running_loop()
            try:
                while True:
                    claimed_at = loop.time()
                    found = await self._claim()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(s.webhook_poll_s):
                            await self._wake.wait()
                    if not found:
                        # Nothing was there to claim (no endpoint, or other instances serve
                        # them all): at hundreds of commits a second, a claim per wake would
                        # be a query per booking for nothing. A new endpoint's first event
                        # waits at most this much longer.
                        await asyncio.sleep(max(0.0, claimed_at + EMPTY_CLAIM_GAP_S - loop.time()))
                    self._wake.clear()
            finally:
                # Each task gives its lease back on the way out (`_serve`'s finally), so
                # another instance need not wait for it to run out.
                tasks = list(self._serving.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim(self) -> bool:
        """Claim endpoints with work up to the concurrency; False when there was room but
        nothing to claim (or the claim failed)."""
        free = self.settings.webhook_concurrency - len(self._serving)
        if free <= 0:
            return True
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
            return False
        if self._away:
            self._away = False
            log.info("webhooks: resumed")
        for ep in claimed:
            task = asyncio.create_task(self._serve(ep), name=f"webhook-{ep.id}")
            self._serving[ep.id] = task
            task.add_done_callback(self._forget(ep.id))
        return bool(claimed)

    def _forget(self, endpoint_id: int) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._serving.pop(endpoint_id, None)

        return done

    async def _serve(self, ep: Endpoint) -> None:
        """Send the endpoint's backlog until it is empty, a send fails or the lease is lost.

        One lane per doctor: up to `SLOTCAST_WEBHOOK_INFLIGHT` lanes send at once, each
        one message at a time, so a doctor's next message goes only after its previous
        one was answered 2xx (in order per doctor) while a slow answer for one doctor
        holds up no other. This task alone touches the database, in a loop: write in
        one statement whatever the lanes finished meanwhile (cursors move only after the
        sends they cover succeeded: a crash resends, never skips), then read the next
        messages, for every doctor with none in flight, in one query. The write comes
        before each read, with a failure, and otherwise every `WRITE_EVERY_S`: sends
        end far more often than a read is due."""
        s = self.settings
        inflight = max(1, s.webhook_inflight)
        gate = asyncio.Semaphore(inflight)
        run = Round(ep)
        self._rounds[ep.id] = run
        running: dict[int, asyncio.Task[None]] = {}  # doctor: its lane
        release = True
        renewed_at = time.monotonic()
        read_at = -math.inf
        read_due = True
        looped_at = written_at = time.monotonic()
        gather = GATHER_S
        try:
            await webhooks.forget_orphaned_replays(self.store, ep.id)
            while True:
                # Lanes that ended, then what is done, in that order and without an
                # await between: an ended lane's last cursor is in this write, so the
                # read below starts its doctor past it.
                for doctor in [d for d, t in running.items() if t.done()]:
                    if (exc := running.pop(doctor).exception()) is not None:
                        raise exc
                    read_due = True
                reading = (
                    run.failure is None
                    and len(running) < inflight
                    and (read_due or run.woken or time.monotonic() - read_at >= s.webhook_poll_s)
                )
                if run.done and (
                    reading
                    or run.failure is not None
                    or time.monotonic() - written_at >= WRITE_EVERY_S
                    or len(run.done.attempts) >= BATCH
                ):
                    done, run.done = run.done, Done()
                    written_at = time.monotonic()
                    if not await self._moved(ep, done):
                        return  # lease lost (releasing is then a no-op) or endpoint disabled
                if run.failure is not None:
                    if not running:  # every send in flight has ended and is written
                        release = False  # `failed` gives the lease up with the retry time
                        await self._failed(ep, *run.failure)
                        return
                elif reading:
                    read_due, run.woken, read_at = False, False, time.monotonic()
                    read = await webhooks.next_batch(
                        self.store,
                        ep.id,
                        self.instance,
                        busy=list(running),
                        per_doctor=PER_DOCTOR,
                        limit=BATCH,
                    )
                    if read is None:  # disabled, deleted, or taken over (release: a no-op)
                        return
                    # An admin's change (filters, a rotated secret) holds from here on.
                    ep, batch = read
                    run.ep = ep
                    found = len(batch.replays) + len(batch.backlog)
                    gather = GATHER_S if found >= inflight else GATHER_SPARSE_S
                    for doctor, lane in lanes(batch).items():
                        running[doctor] = asyncio.create_task(
                            self._lane(run, lane, gate), name=f"webhook-{ep.id}-d{doctor}"
                        )
                    if not running and not (
                        # A full worker gives idle endpoints back, for the others' turn.
                        self._linger and len(self._serving) < s.webhook_concurrency
                    ):
                        return  # nothing waiting, nothing in flight
                # Woken by a lane or a commit; at the latest to renew the lease, or to
                # look for new changes of the doctors not in flight.
                until = renewed_at + s.webhook_lease_s / 3
                if run.failure is None and len(running) < inflight:
                    until = min(until, read_at + s.webhook_poll_s)
                if run.done:
                    until = min(until, written_at + WRITE_EVERY_S)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, until - time.monotonic())):
                        await run.progress.wait()
                await asyncio.sleep(max(0.0, looped_at + gather - time.monotonic()))
                looped_at = time.monotonic()
                run.progress.clear()
                if time.monotonic() - renewed_at > s.webhook_lease_s / 3:
                    # Reading the row again also picks up an admin's changes (disabled,
                    # filters, a rotated secret) for the next sends.
                    fresh = await webhooks.renew(
                        self.store, ep.id, self.instance, lease_s=s.webhook_lease_s
                    )
                    if fresh is None:  # disabled, deleted, or taken over
                        release = False
                        return
                    ep = run.ep = fresh
                    renewed_at = time.monotonic()
        except StoreError as exc:
            log.warning("webhooks: endpoint %s paused: %s", ep.id, exc.message)
        except Exception:
            log.exception("webhooks: endpoint %s failed unexpectedly", ep.id)
        finally:
            self._rounds.pop(ep.id, None)
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            if release:
                with contextlib.suppress(StoreError):
                    if run.done:  # what was answered since the last write is not resent
                        await self._moved(ep, run.done)
                    await webhooks.release(self.store, ep.id, self.instance)

    async def _lane(
        self, run: Round, lane: list[tuple[Message, bool]], gate: asyncio.Semaphore
    ) -> None:
        """One doctor's messages of a batch, in order, each after the previous went through."""
        try:
            async with gate:
                await self._send_lane(run, lane)
        finally:
            run.progress.set()  # the coordinator writes what is done, or sees the lane end

    async def _send_lane(self, run: Round, lane: list[tuple[Message, bool]]) -> None:
        for message, replayed in lane:
            if run.failure is not None:
                return  # the endpoint backs off; this doctor resumes from its cursor
            ep = run.ep
            if not ep.wants(message.events) or (
                ep.doctor_ids and message.doctor_id not in ep.doctor_ids
            ):
                run.done.add(message, replayed)  # moves the cursor without a request
                continue
            attempt, wait = await self._send(ep, message)
            self._on_attempt(ep.id, attempt.ok)
            if not attempt.ok:
                run.fail(attempt, wait)
                return
            run.done.attempts.append(attempt)
            run.done.add(message, replayed)
            run.progress.set()

    async def _moved(self, ep: Endpoint, done: Done) -> bool:
        return await webhooks.delivered(
            self.store,
            ep.id,
            self.instance,
            cursors=done.cursors,
            replayed=done.replays,
            attempts=done.attempts,
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
