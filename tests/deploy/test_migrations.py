"""Migrations: every instance runs them at start, so they must be safe to race and to repeat.

Several instances of a deployment start together against one database; if two
of them applied the same DDL the second would fail (or worse, half-apply), and
if an edited migration were silently accepted, environments would drift apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from store.constants import LOCK_NS_MIGRATIONS
from store.errors import StoreError
from store.migrate import migrate
from testkit.harness import REPO

MIGRATIONS_DIR = REPO / "store" / "migrations"


def shipped() -> dict[int, tuple[str, str]]:
    """version -> (name, sha256), read from disk independently of store.migrate.available()."""
    found: dict[int, tuple[str, str]] = {}
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        number, _, rest = path.name.partition("_")
        found[int(number)] = (
            rest.removesuffix(".sql"),
            hashlib.sha256(path.read_text().encode()).hexdigest(),
        )
    return found


@pytest.fixture
async def admin(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(empty_database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def recorded(conn: asyncpg.Connection) -> list[tuple[int, str, str]]:
    rows = await conn.fetch(
        "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    )
    return [(r["version"], r["name"], r["checksum"]) for r in rows]


async def dump(conn: asyncpg.Connection) -> tuple[list[tuple[object, ...]], list[str]]:
    """Every column of schema_migrations (applied_at included) and every public table."""
    rows = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    tables = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
    )
    return [tuple(r.values()) for r in rows], [t["tablename"] for t in tables]


async def waiting_for_migration_lock(conn: asyncpg.Connection, count: int) -> None:
    """Return once `count` sessions are blocked on the migration lock.

    PostgreSQL offers no notification for "a backend started waiting", so this
    polls pg_locks; it is what makes the race below a real race and not two runs
    that merely happened to be launched together.
    """
    query = """
        SELECT count(*) FROM pg_locks
        WHERE locktype = 'advisory' AND NOT granted AND classid = $1 AND objid = 0
          AND objsubid = 2 AND database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())"""
    async with asyncio.timeout(20):
        while True:
            if await conn.fetchval(query, LOCK_NS_MIGRATIONS) >= count:
                return
            await asyncio.sleep(0.02)


def expected_rows() -> list[tuple[int, str, str]]:
    return [(v, name, digest) for v, (name, digest) in sorted(shipped().items())]


async def test_empty_database_gets_every_migration_once(
    empty_database_url: str, admin: asyncpg.Connection
) -> None:
    assert 1 in shipped()  # the folder is really found: nothing below passes vacuously
    applied = await migrate(empty_database_url)

    assert applied == sorted(shipped())
    assert await recorded(admin) == expected_rows()
    _, tables = await dump(admin)
    for table in ("appointments", "changes", "doctors", "idempotency_keys", "schedules", "slots"):
        assert table in tables

    before = await dump(admin)
    assert await migrate(empty_database_url) == []
    assert await dump(admin) == before


async def test_two_processes_migrating_at_once_apply_each_migration_once(
    empty_database_url: str, admin: asyncpg.Connection
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLOTCAST_") and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    env["SLOTCAST_LOG_LEVEL"] = "INFO"
    command = [sys.executable, "-m", "server.cli", "migrate", "--database-url", empty_database_url]
    # Hold the lock until both are queued on it, so they really start migrating at once.
    await admin.execute("SELECT pg_advisory_lock($1::int4, 0)", LOCK_NS_MIGRATIONS)
    procs = [
        await asyncio.create_subprocess_exec(
            *command,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        await waiting_for_migration_lock(admin, 2)
    finally:
        await admin.execute("SELECT pg_advisory_unlock($1::int4, 0)", LOCK_NS_MIGRATIONS)
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 30)

    logs = [(out + err).decode(errors="replace") for out, err in outputs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert await recorded(admin) == expected_rows()
    # Exactly one of them did the work; the other waited on the lock and found nothing to do.
    versions = str(sorted(shipped()))
    assert sorted(f"applied {versions}" in log for log in logs) == [False, True], logs
    assert sum("applied nothing: up to date" in log for log in logs) == 1, logs


async def test_concurrent_migrate_calls_in_one_process_apply_each_migration_once(
    empty_database_url: str, admin: asyncpg.Connection
) -> None:
    await admin.execute("SELECT pg_advisory_lock($1::int4, 0)", LOCK_NS_MIGRATIONS)
    calls = asyncio.gather(*(migrate(empty_database_url) for _ in range(5)))
    try:
        await waiting_for_migration_lock(admin, 5)
    finally:
        await admin.execute("SELECT pg_advisory_unlock($1::int4, 0)", LOCK_NS_MIGRATIONS)
    results = await asyncio.wait_for(calls, 20)

    assert sorted(results, key=len) == [[], [], [], [], sorted(shipped())]
    assert await recorded(admin) == expected_rows()


async def test_an_applied_migration_that_changed_is_refused(
    empty_database_url: str, admin: asyncpg.Connection
) -> None:
    await migrate(empty_database_url)
    await admin.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")

    with pytest.raises(StoreError, match="changed after it was applied"):
        await migrate(empty_database_url)

    # Refused, not repaired: the record is left for a human to look at.
    rows = await recorded(admin)
    assert rows[0][2] == "edited"
    # The refusal released the migration lock, so a fixed record migrates cleanly again.
    await admin.execute(
        "UPDATE schema_migrations SET checksum = $1 WHERE version = 1", shipped()[1][1]
    )
    assert await asyncio.wait_for(migrate(empty_database_url), 10) == []


async def test_upgrading_clears_the_expiry_of_holds_already_released_or_lapsed(
    empty_database_url: str, admin: asyncpg.Connection
) -> None:
    """Before migration 4 a released or lapsed hold kept its `hold_expires_at`; the
    protocol says null. An upgraded database says null too, and keeps saying it."""
    await migrate(empty_database_url)
    # Back to the database as migration 3 left it, with the rows it could hold.
    await admin.execute(
        "ALTER TABLE appointments DROP CONSTRAINT appointments_expires_only_pending;"
        "DELETE FROM schema_migrations WHERE version = 4"
    )
    doctor = await admin.fetchval(
        "INSERT INTO doctors (name, timezone) VALUES ('Dr. Old', 'UTC') RETURNING id"
    )
    expires = datetime(2030, 1, 7, 6, 2, tzinfo=UTC)
    rows = [("pending", None), ("cancelled", "released"), ("cancelled", "hold expired")]
    for hour, (status, reason) in enumerate(rows):
        slot = await admin.fetchval(
            "INSERT INTO slots (doctor_id, starts_at, ends_at) VALUES"
            " ($1, '2030-01-08'::timestamptz + make_interval(hours => $2),"
            "  '2030-01-08'::timestamptz + make_interval(hours => $2, mins => 30)) RETURNING id",
            doctor,
            hour,
        )
        await admin.execute(
            "INSERT INTO appointments (doctor_id, slot_id, patient_id, starts_at, ends_at,"
            " status, hold_expires_at, cancel_reason, cancelled_at)"
            " SELECT doctor_id, id, 'p', starts_at, ends_at, $2, $3::timestamptz, $4,"
            " CASE WHEN $2 = 'cancelled' THEN $3::timestamptz END FROM slots WHERE id = $1",
            slot,
            status,
            expires,
            reason,
        )

    assert await migrate(empty_database_url) == [4]

    found = await admin.fetch(
        "SELECT status, cancel_reason, hold_expires_at IS NOT NULL AS expires"
        " FROM appointments ORDER BY id"
    )
    assert [tuple(r) for r in found] == [
        ("pending", None, True),
        ("cancelled", "released", False),
        ("cancelled", "hold expired", False),
    ]
    with pytest.raises(asyncpg.CheckViolationError):
        await admin.execute(
            "UPDATE appointments SET hold_expires_at = now() WHERE status <> 'pending'"
        )
