"""The application factory and the lifetimes of everything it owns.

Each resource (database, broker, the outbox's publishing, rooms) is an async
context manager in `app.cleanup_ctx`: opened in order at startup, closed in
reverse at shutdown, so nothing outlives the app and nothing is half-open when a
request arrives. The outbox is made first, with the app: the store is built with
it as its commit hook, and it starts publishing once the broker is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from http.cookies import SimpleCookie
from pathlib import Path

from aiohttp import hdrs, web

from server import logs
from server.apikeys import ApiKeys
from server.background import every, sweep_holds, sweep_horizon
from server.connection import heartbeat, pending_total, police
from server.guard import Guard
from server.health import Health
from server.identity import Verifier
from server.keys import (
    API_KEYS,
    BROKER,
    CLOCK,
    CONNECTIONS,
    GUARD,
    HEALTH,
    INBOUND,
    LIMITER,
    METRICS,
    OUTBOX,
    REPLICAS,
    ROOMS,
    SCHEDULING,
    SETTINGS,
    STATE,
    STORE,
    VERIFIER,
    WEBHOOK_STORE,
    WEBHOOKS,
    ServerState,
)
from server.lifecycle import close_connections
from server.limits import Limiter
from server.maintenance import pruning, schema_ready
from server.metrics import Metrics, PoolReading
from server.rooms import Rooms
from server.routes import setup_routes
from server.service import Clock, Scheduling, utcnow
from server.settings import Settings
from server.webhooks import Dispatcher, delivery_mode, delivery_store, measure
from store import demo, embedded
from store.broker import open_broker
from store.changes import Change
from store.counters import open_counters
from store.outbox import Outbox, relay_lag
from store.pool import open_store, wait_for_database
from store.replicas import Replicas, parse_urls
from store.startup import where_postgres

log = logging.getLogger(__name__)

INSTANCE_COOKIE = "slotcast_instance"


def create_app(settings: Settings, *, clock: Clock = utcnow) -> web.Application:
    """The whole server; `clock` is replaceable so tests can move time (holds, notice).

    `server.auth.ConfigError` (a `ValueError`) for identity settings that must not be
    served: no secret outside demo mode, a short one, an incomplete identity provider.
    """
    from server.api import errors

    verifier = Verifier.from_settings(settings)
    delivery_mode(settings)  # a ValueError for a mode that does not exist
    metrics = Metrics()
    guard = Guard(settings, metrics)
    limiter = Limiter(settings, metrics, verifier)
    app = web.Application(
        # Rate limits before the body is read: a refused flood costs no body reads.
        # The request id first, so every line of the request (the access log's too) has it.
        middlewares=[logs.request_ids, errors, limiter.rest(guard), guard.body_deadline],
        client_max_size=settings.max_frame_bytes,
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[CONNECTIONS] = set()
    app[INBOUND] = set()
    app[METRICS] = metrics
    app[GUARD] = guard
    app[LIMITER] = limiter
    app[VERIFIER] = verifier
    app[OUTBOX] = Outbox(on_relayed=app[METRICS].relayed.inc)
    app[REPLICAS] = Replicas(
        parse_urls(settings.replica_urls),  # ValueError: refused at start, in one line
        wait_s=settings.replica_wait_ms / 1000,
        max_lag_s=settings.replica_max_lag_ms / 1000,
        check_every_s=settings.replica_check_s,
    )
    app[STATE] = ServerState()
    app.cleanup_ctx.extend(
        [
            database,
            keys,
            replicas,
            broker,
            protection,
            publishing,
            services,
            upkeep,
            pruning,
            delivering,
        ]
    )
    app.on_shutdown.append(close_connections)
    app.on_response_prepare.append(stamp_instance)
    app.on_response_prepare.append(guard.headers)
    app.on_response_prepare.append(logs.stamp_request_id)
    setup_routes(app, settings)
    return app


async def database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    handle = None
    if settings.database_url is None:
        pgdata = Path(settings.data_dir) / "pg"
        dsn, handle = await asyncio.to_thread(embedded.start, pgdata)
        log.info("database: embedded PostgreSQL, data in %s", pgdata.resolve())
    else:
        dsn = settings.database_url
        log.info("database: %s", where_postgres(dsn))
        # It may be starting too (a whole stack booting): wait for it, within a limit.
        await wait_for_database(
            dsn, limit_s=settings.startup_wait_s, connect_timeout_s=settings.db_timeout_ms / 1000
        )
    await schema_ready(dsn, settings)  # SLOTCAST_MIGRATE: apply, or refuse to start
    async with (
        open_store(
            dsn,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            lock_timeout_ms=settings.lock_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms,
            timeout_ms=settings.db_timeout_ms,
            acquire_timeout_ms=settings.db_acquire_timeout_ms,
            on_commit=_counted(
                app[METRICS], app[REPLICAS], app[OUTBOX].enqueue, _wake_webhooks(app)
            ),
        ) as store,
        delivery_store(dsn, settings) as webhook_store,
    ):
        app[STORE] = store
        app[WEBHOOK_STORE] = webhook_store
        if settings.demo:
            await demo.seed(store)
        yield
    if handle is not None:
        await asyncio.to_thread(handle.cleanup)


async def keys(app: web.Application) -> AsyncIterator[None]:
    """API keys, checked against the database (and cached); their last use written behind."""
    settings = app[SETTINGS]
    api_keys = ApiKeys(
        app[STORE],
        pepper=settings.api_key_pepper,
        cache_s=settings.api_key_cache_s,
        cache_size=settings.api_key_cache_size,
        touch_s=settings.api_key_touch_s,
        clock=app[CLOCK],
    )
    app[API_KEYS] = api_keys
    app[VERIFIER].keys = api_keys
    async with api_keys.touching():
        yield
    app[VERIFIER].keys = None


async def replicas(app: web.Application) -> AsyncIterator[None]:
    """Read replicas (none configured: every read on the primary), checked in the background."""
    settings = app[SETTINGS]
    async with app[REPLICAS].serving(
        app[STORE],
        max_size=settings.db_pool_max,
        lock_timeout_ms=settings.lock_timeout_ms,
        statement_timeout_ms=settings.statement_timeout_ms,
        timeout_ms=settings.db_timeout_ms,
        acquire_timeout_ms=settings.db_acquire_timeout_ms,
    ):
        yield


async def broker(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_broker(
        settings.broker_url,
        timeout_s=settings.broker_timeout_ms / 1000,
        wait_s=settings.startup_wait_s,
    ) as b:
        log.info("broker: %s", getattr(b, "where", b.kind))
        app[BROKER] = b
        yield


async def protection(app: web.Application) -> AsyncIterator[None]:
    """Rate-limit counters in the broker's Redis (or in process); idle anonymous sockets closed."""
    settings, limiter = app[SETTINGS], app[LIMITER]
    timeout_s = settings.limiter_timeout_ms / 1000
    async with open_counters(settings.broker_url, timeout_s=timeout_s) as counters:
        limiter.shared = counters
        log.info("rate limits: counted in %s", counters.kind)
        sweeper = asyncio.create_task(app[GUARD].close_idle(app[CONNECTIONS]), name="idle-sweep")
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            limiter.shared = limiter.local
    await limiter.close()


async def publishing(app: web.Application) -> AsyncIterator[None]:
    """Committed changes to the broker; on exit, what is still queued first (bounded)."""
    async with app[OUTBOX].publishing(app[STORE], app[BROKER]):
        yield


async def services(app: web.Application) -> AsyncIterator[None]:
    store, broker_, metrics, settings = app[STORE], app[BROKER], app[METRICS], app[SETTINGS]
    rooms = Rooms(
        store,
        broker_,
        settings.instance_id,
        on_fanout=metrics.fanout,
        on_snapshot=metrics.snapshot_read,
        cache_slots=settings.snapshot_cache_slots,
        on_close=app[REPLICAS].note,
        timings=store.timings,
    )
    app[ROOMS] = rooms
    app[SCHEDULING] = Scheduling(
        store, settings, app[CLOCK], replicas=app[REPLICAS], known=rooms.version_of
    )
    app[HEALTH] = Health(store, broker_, timeout_s=settings.ready_timeout_ms / 1000)
    # What this instance commits reaches its own members at once, broker or not.
    app[OUTBOX].deliver_to(rooms.deliver)
    metrics.track(
        connections=lambda: len(app[CONNECTIONS]),
        rooms=rooms.stats,
        broker_connected=lambda: broker_.healthy,
    )
    metrics.outbox_bytes.set_function(lambda: float(outbox_stats(app)[0]))
    metrics.backed_up.set_function(lambda: float(outbox_stats(app)[1]))
    metrics.track_broker(lambda: broker_.up)
    metrics.readings.pool = lambda: PoolReading(*store.pool_stats())
    metrics.readings.broker_reconnects = lambda: broker_.reconnects
    metrics.track_replicas(app[REPLICAS].reading)
    metrics.stages.timings = store.timings
    yield
    app[OUTBOX].deliver_to(None)
    await app[HEALTH].close()
    await rooms.close()


async def upkeep(app: web.Application) -> AsyncIterator[None]:
    """Hold expiry, slot horizon and the relay: started with the app, cancelled on exit."""
    store, clock, settings = app[STORE], app[CLOCK], app[SETTINGS]
    outbox = app[OUTBOX]
    await sweep_horizon(store, clock)
    await sweep_holds(store, clock)
    grace = settings.relay_grace_s
    tasks = [
        asyncio.create_task(
            every(settings.relay_sweep_s, lambda: outbox.relay(store, grace_s=grace), "relay"),
            name="relay",
        ),
        asyncio.create_task(
            every(settings.hold_sweep_s, lambda: sweep_holds(store, clock), "hold sweep"),
            name="hold-sweep",
        ),
        asyncio.create_task(
            every(settings.horizon_sweep_s, lambda: sweep_horizon(store, clock), "horizon sweep"),
            name="horizon-sweep",
        ),
        asyncio.create_task(
            every(settings.outbox_sweep_s, lambda: sweep_outboxes(app), "outbox sweep"),
            name="outbox-sweep",
        ),
        asyncio.create_task(
            every(heartbeat_sweep_s(settings), lambda: sweep_heartbeats(app), "heartbeat"),
            name="heartbeat",
        ),
        asyncio.create_task(
            every(RELAY_LAG_EVERY_S, lambda: measure_relay_lag(app), "relay lag"),
            name="relay-lag",
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# How often the relay's lag is measured: a gauge scraped every 15 s or so needs no more.
RELAY_LAG_EVERY_S = 5.0


async def measure_relay_lag(app: web.Application) -> None:
    app[METRICS].relay_lag.set(await relay_lag(app[STORE]))


def _counted(
    metrics: Metrics,
    replicas: Replicas,
    enqueue: Callable[[list[Change]], None],
    wake: Callable[[], None] | None = None,
) -> Callable[[list[Change]], None]:
    """The commit hook, counting bookings and cancellations on the way to the outbox,
    telling the replicas' fence what this instance committed (read your own writes), and
    nudging webhook delivery (which reads the change log, never these changes)."""

    def on_commit(changes: list[Change]) -> None:
        metrics.committed(changes)
        replicas.committed(changes)
        enqueue(changes)
        if wake is not None:
            wake()

    return on_commit


def _wake_webhooks(app: web.Application) -> Callable[[], None]:
    def wake() -> None:
        dispatcher = app.get(WEBHOOKS)
        if dispatcher is not None:
            dispatcher.wake()

    return wake


# How often the webhook gauges (backlog, oldest undelivered) are read from the database.
WEBHOOK_GAUGES_EVERY_S = 5.0


async def delivering(app: web.Application) -> AsyncIterator[None]:
    """Webhook delivery from the change log, in tasks of its own (server/webhooks.py), on
    its own pool (WEBHOOK_STORE): never on a booking's path, nor on its connections.
    With SLOTCAST_WEBHOOKS=worker, `slotcast webhooks` processes deliver instead
    (server/webhook_worker.py) and this instance only reads the backlog gauges."""
    store, metrics, settings = app[WEBHOOK_STORE], app[METRICS], app[SETTINGS]
    gauges = asyncio.create_task(
        every(
            WEBHOOK_GAUGES_EVERY_S,
            lambda: measure(store, metrics.webhook_backlog_is),
            "webhook gauges",
        ),
        name="webhook-gauges",
    )
    tasks = [gauges]
    if delivery_mode(settings) == "inline":
        tasks.append(asyncio.create_task(_dispatcher(app).run(), name="webhooks"))
    else:
        log.info("webhooks: delivered by `slotcast webhooks` workers, not this instance")
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _dispatcher(app: web.Application) -> Dispatcher:
    """This instance's deliverer, counting its attempts and woken by its commits."""
    dispatcher = Dispatcher(
        app[WEBHOOK_STORE],
        app[SETTINGS],
        on_attempt=app[METRICS].webhook_deliveries.attempted,
    )
    app[WEBHOOKS] = dispatcher
    return dispatcher


def outbox_stats(app: web.Application) -> tuple[int, int]:
    """Bytes pending over every WebSocket, and how many are backed up (for the gauges)."""
    return pending_total(session.conn for session in app[CONNECTIONS])


async def sweep_outboxes(app: web.Application) -> None:
    """Stalled clients, and the biggest when the server's budget is spent, are closed."""
    settings = app[SETTINGS]
    police(
        [session.conn for session in app[CONNECTIONS]],
        budget=settings.server_outbox_bytes,
        stall_s=settings.slow_consumer_s,
        now=asyncio.get_running_loop().time(),
    )


def heartbeat_sweep_s(settings: Settings) -> float:
    """How often the heartbeat sweeps: a ping or a drop is at most this late."""
    return min(1.0, settings.heartbeat_s / 4)


async def sweep_heartbeats(app: web.Application) -> None:
    """Silent clients are pinged, and those that do not answer dropped (the heartbeat)."""
    heartbeat(
        [session.conn for session in app[CONNECTIONS]],
        interval=app[SETTINGS].heartbeat_s,
        now=time.monotonic(),
    )


async def stamp_instance(request: web.Request, response: web.StreamResponse) -> None:
    """Say which instance answered, in a header and in a cookie a balancer can stick to
    (`Secure` when the client came over https, server.guard)."""
    instance = request.app[SETTINGS].instance_id
    response.headers["X-Slotcast-Instance"] = instance
    if request.cookies.get(INSTANCE_COOKIE) != instance:
        # Headers are still open here, but the response's cookie jar was already read.
        cookie = SimpleCookie()
        cookie[INSTANCE_COOKIE] = instance
        morsel = cookie[INSTANCE_COOKIE]
        morsel["path"] = "/"
        morsel["httponly"] = True
        morsel["samesite"] = "Lax"
        if request.app[GUARD].https(request):
            morsel["secure"] = True
        response.headers.add(hdrs.SET_COOKIE, morsel.OutputString())
