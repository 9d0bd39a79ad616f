"""Leaving gracefully: what an instance does between SIGTERM and exit.

The order matters to a load balancer and to clients:
1. `/readyz` starts failing (and new WebSockets are refused), so the balancer
   stops sending new clients here;
2. after `drain_grace_s`, clients are told to reconnect (a `reconnect` message with
   a jittered delay) and closed with 1012, `drain_batch` at a time, so a restart
   does not send every client to the other instances in the same instant;
3. a connection that is running a command is closed right after that command,
   so in-flight work finishes and its reply is sent;
4. the process waits for every close handshake (each bounded by CLOSE_HANDSHAKE_S): a
   socket reset before its client answered our close frame can make the client see
   1006 instead of 1012, and not know to reconnect elsewhere at once;
5. then the app shuts down: rooms, the outbox (publishing what is queued), broker, pool.
"""

from __future__ import annotations

import asyncio
import logging
import random

from aiohttp import web

from protocol.messages import Reconnect
from server.connection import CLOSE_HANDSHAKE_S, CLOSE_SERVICE_RESTART
from server.keys import CONNECTIONS, INBOUND, SETTINGS, STATE

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
DRAIN_SLACK_S = 2.0  # beyond the handshake bound: commands in flight, a busy loop


async def drain(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[STATE].draining = True
    log.info("draining: /readyz fails from now; closing clients in %.1fs", settings.drain_grace_s)
    await asyncio.sleep(settings.drain_grace_s)
    everyone = app[CONNECTIONS]
    connections = [session.conn for session in everyone]
    spread_ms = max(1000, len(connections) // max(settings.drain_batch, 1) * 1000)
    for start in range(0, len(connections), settings.drain_batch):
        for conn in connections[start : start + settings.drain_batch]:
            conn.send_now(Reconnect(retry_after_ms=random.randrange(spread_ms)))
            conn.close_soon(CLOSE_SERVICE_RESTART, "service restart")
        await asyncio.sleep(settings.drain_interval_s)
    # Wait for the commands in flight and then the close handshakes. Each handshake is
    # bounded by CLOSE_HANDSHAKE_S from its own close; a command, by the statement timeout.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_HANDSHAKE_S + DRAIN_SLACK_S
    while loop.time() < deadline and any(not c.finished for c in connections):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    unfinished = sum(not c.finished for c in connections)
    if unfinished:
        log.warning(
            "%d of %d connections did not finish closing; closing them now",
            unfinished,
            len(connections),
        )
    log.info("drained %d connections", len(connections))


async def close_connections(app: web.Application) -> None:
    """On shutdown, whoever is still connected is told we are going away.

    The sockets are ours, not aiohttp's (server.wire), so its shutdown does not wait
    for them: this does, for each close handshake, then cancels what is left.
    """
    connections = [session.conn for session in app[CONNECTIONS]]
    for conn in connections:
        conn.close_soon(CLOSE_GOING_AWAY, "server shutdown")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_HANDSHAKE_S + DRAIN_SLACK_S
    while loop.time() < deadline and any(not c.finished for c in connections):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    inbound = app[INBOUND]
    tasks = list(inbound)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
