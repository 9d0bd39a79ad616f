"""The application factory and the lifetimes of everything it owns.

Each resource (database, broker, rooms) is an async context manager in
`app.cleanup_ctx`: opened in order at startup, closed in reverse at shutdown,
so nothing outlives the app and nothing is half-open when a request arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import WSCloseCode, web

from server.keys import BROKER, CONNECTIONS, ROOMS, SCHEDULING, SETTINGS, STORE
from server.rooms import Rooms
from server.routes import setup_routes
from server.service import Scheduling
from server.settings import Settings
from store import demo, embedded
from store.broker import open_broker
from store.database import open_store
from store.migrate import migrate

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    from server.api import errors

    app = web.Application(middlewares=[errors], client_max_size=settings.max_frame_bytes)
    app[SETTINGS] = settings
    app[CONNECTIONS] = set()
    app.cleanup_ctx.extend([database, broker, services])
    app.on_shutdown.append(close_connections)
    setup_routes(app, settings.static_dir)
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
        log.info("database: external PostgreSQL")
    applied = await migrate(dsn)
    if applied:
        log.info("applied migrations %s", applied)
    async with open_store(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        lock_timeout_ms=settings.lock_timeout_ms,
        statement_timeout_ms=settings.statement_timeout_ms,
    ) as store:
        app[STORE] = store
        if settings.demo:
            await demo.seed(store)
        yield
    if handle is not None:
        await asyncio.to_thread(handle.cleanup)


async def broker(app: web.Application) -> AsyncIterator[None]:
    url = app[SETTINGS].broker_url
    async with open_broker(url) as b:
        log.info("broker: %s", b.kind)
        app[BROKER] = b
        yield


async def services(app: web.Application) -> AsyncIterator[None]:
    rooms = Rooms(app[STORE], app[BROKER])
    app[ROOMS] = rooms
    app[SCHEDULING] = Scheduling(app[STORE], app[BROKER], app[SETTINGS])
    yield
    await rooms.close()


async def close_connections(app: web.Application) -> None:
    """Tell every client we are going away, so it reconnects elsewhere."""
    connections = app[CONNECTIONS]
    await asyncio.gather(
        *(
            c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
            for c in tuple(connections)
        ),
        return_exceptions=True,
    )
