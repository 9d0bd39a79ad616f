"""`slotcast webhooks`: webhook delivery in a process of its own.

Delivering costs CPU (a payload, an HMAC and an HTTP exchange per message per
endpoint) that, inline, shares the serving instance's event loop and GIL with the
bookings: at a few hundred bookings a second that alone multiplied the booking p99
(docs/benchmarks.md, "Webhooks"). With `SLOTCAST_WEBHOOKS=worker` the serving
instances deliver nothing and these processes do, with the same `Dispatcher`, the same
settings and their own small pool (`SLOTCAST_WEBHOOK_DB_POOL`). The election is the
same too: an endpoint's lease in PostgreSQL, so exactly one process delivers to it,
whether workers, inline instances or a mix during a change of mode, and another takes
it over from the cursor once a dead holder's lease has run out.

No commit happens here, so nothing wakes delivery early: a worker looks for work every
`SLOTCAST_WEBHOOK_POLL_S`, and an endpoint it serves reads its backlog again as soon as
a send ends, or at that pace when idle; it keeps an idle endpoint's lease (`linger`)
rather than release and claim it again every poll. That poll is what a change waits at most
before its first send; set it to 0.1 to 0.25 s for workers (docs/webhooks.md).

It never migrates (the serving instances do) and refuses a schema this code does not
match, as a serving instance does. SIGTERM or SIGINT cancels the sends in flight and
gives the leases back, so another process takes the endpoints at once rather than when
the leases run out; a cancelled send is sent again (same `webhook-id`).

Its attempts and failures per endpoint are counted here, not by any serving instance,
so it serves them itself: `GET /metrics` on `SLOTCAST_WEBHOOKS_METRICS_PORT`, a
scrape target of its own (docs/webhooks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from protocol.errors import SlotcastError
from server.guard import MetricsAccess
from server.metrics import WorkerMetrics
from server.settings import Settings
from server.webhooks import Dispatcher, delivery_mode, delivery_store
from store.errors import StoreError
from store.migrate import check
from store.pool import wait_for_database
from store.startup import where_postgres

log = logging.getLogger(__name__)


async def work(settings: Settings) -> int:
    """Deliver until SIGTERM or SIGINT: 0 then; 1 if the database never answered or its
    schema does not match this code; 2 for settings that cannot work."""
    try:
        delivery_mode(settings)
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 2
    if settings.database_url is None:
        log.error(
            "cannot start: set SLOTCAST_DATABASE_URL (a serving instance's embedded "
            "PostgreSQL is its own: a worker cannot share it)"
        )
        return 2
    if settings.webhooks != "worker":
        # Both deliver, one endpoint each at a time: correct, but not what was meant.
        log.warning(
            "SLOTCAST_WEBHOOKS=%s: serving instances deliver too; set it to `worker` "
            "for them so that only workers do",
            settings.webhooks,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = WorkerMetrics()
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(serve_metrics(settings, metrics))
            except OSError as exc:  # the port is taken, or the address is not ours
                log.error("cannot start: metrics on %s: %s", _where(settings), exc)
                return 1
            except ValueError as exc:  # SLOTCAST_METRICS_ALLOW or TRUSTED_PROXIES
                log.error("cannot start: %s", exc)
                return 2
            started = asyncio.create_task(_deliver(settings, stop, metrics), name="webhook-worker")
            return await started
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def serve_metrics(settings: Settings, metrics: WorkerMetrics) -> AsyncIterator[None]:
    """`GET /metrics` on the worker's own port while it runs (none with port 0): a tiny
    app of its own, since a worker serves nothing else."""
    if settings.webhooks_metrics_port == 0:
        yield
        return
    access = MetricsAccess(settings, metrics.metrics_refused)

    async def render(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def guarded(request: web.Request) -> web.StreamResponse:
        return await access.check(request, render)

    app = web.Application()
    app.router.add_get("/metrics", guarded)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.webhooks_metrics_port)
        await site.start()
        log.info("metrics on http://%s/metrics", _where(settings))
        yield
    finally:
        await runner.cleanup()


def _where(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.webhooks_metrics_port}"


async def _deliver(settings: Settings, stop: asyncio.Event, metrics: WorkerMetrics) -> int:
    dsn = settings.database_url
    assert dsn is not None
    connect_timeout_s = settings.db_timeout_ms / 1000
    try:
        ready = asyncio.create_task(
            _schema_checked(dsn, settings.startup_wait_s, connect_timeout_s)
        )
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, SlotcastError):
                await ready
            log.info("stopped while starting")
            return 0
        ready.result()
        async with delivery_store(dsn, settings) as store:
            dispatcher = Dispatcher(
                store, settings, linger=True, on_attempt=metrics.deliveries.attempted
            )
            running = asyncio.create_task(dispatcher.run(), name="webhooks")
            log.info(
                "delivering webhooks (instance %s; database: %s; polling every %g s)",
                settings.instance_id,
                where_postgres(dsn),
                settings.webhook_poll_s,
            )
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if running.done():  # never on its own: a bug, said with its traceback
                log.error("webhook delivery ended", exc_info=running.exception())
                return 1
            log.info("shutting down")
            running.cancel()  # each endpoint's task gives its lease back on the way out
            await asyncio.gather(running, return_exceptions=True)
    except SlotcastError as exc:  # never answered, refused us, or a schema of other code
        log.error("cannot start: %s", exc.message)
        return 1
    log.info("stopped")
    return 0


async def _schema_checked(dsn: str, wait_s: float, connect_timeout_s: float) -> None:
    """Wait for PostgreSQL, then refuse a schema this code does not match (never migrate:
    the serving instances do, under SLOTCAST_MIGRATE)."""
    await wait_for_database(dsn, limit_s=wait_s, connect_timeout_s=connect_timeout_s)
    state = await check(dsn, connect_timeout_s=connect_timeout_s)
    problem = state.problem(pending_allowed=False)
    if problem is not None:
        raise StoreError(problem)
