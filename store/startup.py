"""Waiting for PostgreSQL and Redis at start-up, and naming them without their secrets.

A process often starts before its dependencies are ready (a whole stack booting, a
database restarting): it waits, retrying with capped, jittered backoff, and says
once what it is waiting for (host and port, or a socket path; never a password).
When the limit passes, or the failure is not one that waiting can cure (a wrong
password, a missing database), it gives up with one `Unavailable` whose message is
the whole story, for `slotcast serve` to print as its last line.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from store.errors import Unavailable

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


async def wait_until_up(
    what: str,
    attempt: Callable[[], Awaitable[None]],
    *,
    transient: Callable[[BaseException], bool],
    limit_s: float,
    max_backoff_s: float = MAX_BACKOFF_S,
) -> None:
    """Run `attempt` until it succeeds; retry transient failures for up to `limit_s`.

    `what` names the dependency and where it is ("PostgreSQL at db:5432"): it is
    logged once when waiting starts, and again when it answers.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    backoff = FIRST_BACKOFF_S
    waiting = False
    while True:
        try:
            await attempt()
        except Exception as exc:
            reason = describe(exc)
            if not transient(exc):
                raise Unavailable(f"{what} refused us: {reason}") from exc
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(f"{what} did not answer within {limit_s:g} s: {reason}") from exc
            if not waiting:
                waiting = True
                log.warning("waiting up to %g s for %s (%s)", limit_s, what, reason)
            # Jittered, so instances restarted together do not knock in step.
            await asyncio.sleep(min(remaining, backoff * (0.5 + random.random())))
            backoff = min(backoff * 2, max_backoff_s)
        else:
            if waiting:
                log.info("%s answers", what)
            return


def describe(exc: BaseException) -> str:
    """One line about a failure: its message, or its type when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def where_postgres(dsn: str) -> str:
    """`PostgreSQL at host:port` (or `at socket /dir/.s.PGSQL.port`) from a DSN."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or ""])[0]
        port = int(query.get("port", [parts.port or 5432])[0])
    except ValueError:  # several hosts, or a port that is not a number: keep it simple
        netloc = dsn.rpartition("@")[2].partition("/")[0]
        return f"PostgreSQL at {netloc or 'the default host'}"
    host = unquote(host)
    if host.startswith("/"):
        return f"PostgreSQL at socket {host}/.s.PGSQL.{port}"
    return f"PostgreSQL at {host or 'localhost'}:{port}"


def where_redis(url: str) -> str:
    """`Redis at host:port` (or `at socket /path`) from a broker URL."""
    if url.startswith("redis+cluster://"):  # host:port,host:port...: the seeds
        seeds = url.removeprefix("redis+cluster://").partition("/")[0].rpartition("@")[2]
        first, *more = seeds.split(",")
        return f"Redis Cluster at {first}" + (f" (+{len(more)} seeds)" if more else "")
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"Redis at socket {parts.path}"
        return f"Redis at {parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        return "Redis"
