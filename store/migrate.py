"""Plain-SQL migrations: applied in order at start, each in its own transaction.

A session-level advisory lock serializes instances that start together; the
second one waits, then finds nothing left to do. A checksum catches an applied
migration that was edited afterwards, which would otherwise drift silently.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

from store import sql
from store.constants import LOCK_NS_MIGRATIONS
from store.errors import StoreError, translated

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def available() -> list[Migration]:
    """Migrations shipped in `store/migrations`, named `NNNN_description.sql`."""
    found = []
    for entry in resources.files("store.migrations").iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(dsn: str, *, connect_timeout_s: float = 60.0) -> list[int]:
    """Apply what is missing; return the versions applied by this call.

    Connecting is bounded; the migrations are not (a migration may rightly be long,
    and another instance may hold the lock while it applies them)."""
    with translated():
        conn = await asyncpg.connect(dsn, timeout=connect_timeout_s)
    try:
        with translated():
            return await _migrate(conn)
    finally:
        await conn.close()


async def _migrate(conn: asyncpg.Connection) -> list[int]:
    await conn.execute(sql.SESSION_LOCK, LOCK_NS_MIGRATIONS, 0)
    try:
        await conn.execute(sql.MIGRATIONS_TABLE)
        applied = {r["version"]: r for r in await conn.fetch(sql.MIGRATIONS_APPLIED)}
        done: list[int] = []
        for m in available():
            if m.version in applied:
                if applied[m.version]["checksum"] != m.checksum:
                    raise StoreError(
                        f"migration {m.version} ({m.name}) changed after it was applied"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.text)
                await conn.execute(sql.MIGRATION_RECORD, m.version, m.name, m.checksum)
            log.info("applied migration %04d %s", m.version, m.name)
            done.append(m.version)
        return done
    finally:
        await conn.execute(sql.SESSION_UNLOCK, LOCK_NS_MIGRATIONS, 0)
