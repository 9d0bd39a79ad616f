"""`slotcast migrate`, `prune`, `erase-patient` and `doctors`: the operator's database commands.

`server/cli.py` hands these subcommands to `add_parsers` and `run`, as it hands
`watch` and `book` to the client. Each opens only what it needs (a connection, or a
small pool), prints what it did on stdout, and exits non-zero with one line on
stderr when it cannot. docs/configuration.md lists them; docs/operating.md
("Upgrades") and docs/operations.md ("Retention and erasure") say when to run them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from protocol.errors import SlotcastError
from server import directory as files
from server.maintenance import retention_of
from server.settings import Settings
from store import directory, embedded
from store.lifecycle import erase_patient, prune
from store.migrate import check, migrate
from store.pool import Store, open_store, wait_for_database

log = logging.getLogger("slotcast")

COMMANDS = ("migrate", "prune", "erase-patient", "doctors")
# An import writes a whole file in one transaction, each row checked by PostgreSQL's
# time zone trigger (about 15 ms): the bounds are a batch job's, not a request's.
BATCH_TIMEOUT_MS = 300_000
# `migrate --check`: up to date; migrations pending; this code must not run on it.
CHECK_OK, CHECK_PENDING, CHECK_REFUSED = 0, 1, 2


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("migrate", help="apply database migrations and exit")
    m.add_argument("--database-url")
    m.add_argument(
        "--check",
        action="store_true",
        help="apply nothing; list pending migrations (exit 1 if any, 2 if the database "
        "requires newer code)",
    )
    m.add_argument(
        "--contract",
        action="store_true",
        help="also apply contract steps: only once no older instance runs",
    )
    p = sub.add_parser("prune", help="delete what has outlived its retention, print counts")
    p.add_argument("--database-url")
    e = sub.add_parser(
        "erase-patient", help="pseudonymise a patient in every table that names them"
    )
    e.add_argument("subject", help="the patient's subject (the `sub` of their tokens)")
    e.add_argument("--database-url")
    e.add_argument("--timeout-s", type=float, default=60.0)
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


def run(args: argparse.Namespace, settings: Settings) -> Coroutine[Any, Any, int]:
    """The subcommand's coroutine, for the caller's event loop."""
    if args.command == "migrate":
        return _migrate(settings, check_only=args.check, contract=args.contract)
    if args.command == "prune":
        return _prune(settings)
    if args.command == "doctors":
        return _doctors(settings, args)
    return _erase(settings, args.subject, args.timeout_s)


async def _dsn(settings: Settings) -> str:
    if settings.database_url is None:
        dsn, _ = await asyncio.to_thread(embedded.start, settings.data_dir / "pg")
        return dsn
    await wait_for_database(
        settings.database_url,
        limit_s=settings.startup_wait_s,
        connect_timeout_s=settings.db_timeout_ms / 1000,
    )
    return settings.database_url


async def _migrate(settings: Settings, *, check_only: bool, contract: bool) -> int:
    connect_timeout_s = settings.db_timeout_ms / 1000
    try:
        dsn = await _dsn(settings)
        if check_only:
            state = await check(dsn, connect_timeout_s=connect_timeout_s)
        else:
            applied = await migrate(dsn, connect_timeout_s=connect_timeout_s, contract=contract)
    except SlotcastError as exc:
        log.error("cannot migrate: %s", exc.message)
        return 1 if not check_only else CHECK_REFUSED
    if not check_only:
        log.info("applied %s", applied or "nothing: up to date")
        return 0
    problem = state.problem(pending_allowed=True)
    if problem is not None:
        print(f"refused: {problem}")
        return CHECK_REFUSED
    if state.pending:
        print(f"pending migrations ({len(state.pending)}):")
        for m in state.pending:
            print(f"  {m.label}")
        return CHECK_PENDING
    print(f"up to date: schema {max(state.applied, default=0):04d}, code {state.code:04d}")
    return CHECK_OK


async def _prune(settings: Settings) -> int:
    try:
        async with _store(settings) as store:
            done = await prune(store, retention_of(settings))
    except SlotcastError as exc:
        log.error("cannot prune: %s", exc.message)
        return 1
    if done.busy:
        print("another instance is pruning; deleted so far:")
    for kind, count in done.counts.items():
        print(f"{kind}: {count} deleted")
    return 0


async def _erase(settings: Settings, subject: str, timeout_s: float) -> int:
    try:
        async with _store(settings) as store:
            erased = await erase_patient(store, subject, timeout_s=timeout_s)
    except SlotcastError as exc:
        log.error("cannot erase: %s", exc.message)
        return 1
    if not erased.total:
        print("nothing names this patient (already erased, or never seen)")
        return 0
    print(f"pseudonymised the patient in the rows of doctors {erased.doctors}:")
    for table, count in erased.counts.items():
        verb = "deleted" if table == "idempotency_keys" else "rewritten"
        print(f"{table}: {count} {verb}")
    return 0


async def _doctors(settings: Settings, args: argparse.Namespace) -> int:
    """`slotcast doctors import|export`: one summary line (stdout) or one error (stderr)."""
    try:
        entries = files.read_entries(args.file) if args.doctors_command == "import" else []
        async with open_store(
            await _dsn(settings),
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


@contextlib.asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[Store]:
    """A small pool, opened once the database answers, with the server's bounds."""
    async with open_store(
        await _dsn(settings),
        min_size=1,
        max_size=2,
        lock_timeout_ms=settings.lock_timeout_ms,
        statement_timeout_ms=settings.statement_timeout_ms,
        timeout_ms=settings.db_timeout_ms,
        acquire_timeout_ms=settings.db_acquire_timeout_ms,
    ) as store:
        yield store
