"""Plain-SQL migrations, and the rule that lets two releases share one database.

Migrations are applied in order, each in its own transaction. A session-level
advisory lock serializes instances that start together; the second one waits, then
finds nothing left to do. A checksum catches an applied migration that was edited
afterwards, which would otherwise drift silently.

A rolling upgrade runs release N and N+1 side by side on one database, so every
migration says which code can run after it, in a marker line of its own text:

- ``-- slotcast:expand``: it only adds (a table, a nullable column, an index, a
  trigger that refuses nothing it refused before); every older release still runs.
  A file without a marker (0001-0004 predate them) counts as an expand step.
- ``-- slotcast:contract NNNN``: it removes or narrows something a release older
  than schema NNNN still uses; from then on only code that knows NNNN may run.

The database records each applied step's minimum (`schema_migrations.min_code`).
An instance refuses to start when that minimum is above the newest migration it
ships (`Compatibility.problem`); it runs on a schema with newer *expand* steps than
it knows. `migrate` applies expand steps and stops before the first contract step
unless told to go on (`contract=True`), which the operator does once no older
instance runs. docs/operating.md ("Upgrades") has the procedure.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import asyncpg
import orjson

from store import sql
from store.constants import LOCK_NS_MIGRATIONS
from store.errors import StoreError, translated

log = logging.getLogger(__name__)

_MARKER = re.compile(r"^-- slotcast:(expand|contract (\d{4}))\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def min_code(self) -> int:
        """The oldest code schema that still runs once this is applied (0: any)."""
        found = _MARKER.findall(self.text)
        if len(found) > 1:
            raise StoreError(f"migration {self.version} has {len(found)} slotcast markers")
        return int(found[0][1]) if found and found[0][1] else 0

    @property
    def contract(self) -> bool:
        return self.min_code > 0

    @property
    def label(self) -> str:
        return f"{self.version:04d} {self.name}" + (
            f" (contract: needs code {self.min_code:04d})" if self.contract else ""
        )


def available() -> list[Migration]:
    """Migrations shipped in `store/migrations`, named `NNNN_description.sql`."""
    found = []
    for entry in resources.files("store.migrations").iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def code_schema(migrations: Sequence[Migration] | None = None) -> int:
    """The schema this code knows: its newest migration."""
    return max(m.version for m in (available() if migrations is None else migrations))


@dataclass(frozen=True, slots=True)
class Compatibility:
    """What a database holds, compared with what this code ships."""

    code: int  # the newest migration this code knows
    applied: dict[int, str]  # version -> checksum
    min_code: int  # the oldest code the applied contract steps allow
    pending: list[Migration]  # shipped, not applied, in order
    changed: list[Migration]  # shipped and applied, but with another checksum

    @property
    def needed(self) -> list[Migration]:
        """Pending steps this code cannot run without: every expand step up to its
        newest (a pending contract step only removes what this code no longer uses)."""
        last_expand = max((m.version for m in self.pending if not m.contract), default=0)
        return [m for m in self.pending if m.version <= last_expand]

    def problem(self, *, pending_allowed: bool) -> str | None:
        """Why this code must not run on the database, in one line; None if it may."""
        if self.changed:
            m = self.changed[0]
            return f"migration {m.version} ({m.name}) changed after it was applied"
        if self.min_code > self.code:
            return (
                f"the database schema requires code of schema {self.min_code:04d} or newer; "
                f"this instance knows up to {self.code:04d}: deploy a newer release"
            )
        if self.needed and not pending_allowed:
            names = ", ".join(m.label for m in self.needed)
            return f"the database lacks migrations {names}: run `slotcast migrate` first"
        return None


async def inspect(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> Compatibility:
    """Read what is applied without writing (the table may not even exist yet)."""
    rows = []
    if await conn.fetchval(sql.MIGRATIONS_EXIST):
        # As jsonb: a database migrated by an older release has no min_code column.
        rows = [orjson.loads(r) for r in await conn.fetchval(sql.MIGRATIONS_READ) or []]
    applied = {int(r["version"]): str(r["checksum"]) for r in rows}
    return Compatibility(
        code=code_schema(migrations),
        applied=applied,
        min_code=max((int(r.get("min_code") or 0) for r in rows), default=0),
        pending=[m for m in migrations if m.version not in applied],
        changed=[m for m in migrations if applied.get(m.version, m.checksum) != m.checksum],
    )


async def check(
    dsn: str, *, connect_timeout_s: float = 60.0, migrations: Sequence[Migration] | None = None
) -> Compatibility:
    """What `slotcast migrate --check` and a start without migrating look at."""
    with translated():
        conn = await asyncpg.connect(dsn, timeout=connect_timeout_s)
    try:
        with translated():
            return await inspect(conn, available() if migrations is None else migrations)
    finally:
        await conn.close()


async def migrate(
    dsn: str,
    *,
    connect_timeout_s: float = 60.0,
    contract: bool = True,
    migrations: Sequence[Migration] | None = None,
) -> list[int]:
    """Apply what is missing, in order; return the versions applied by this call.

    With `contract` False, stop before the first contract step (what an instance may
    do at start while older instances still run). Refuses a database that requires
    newer code, or whose applied migrations were edited. Connecting is bounded; the
    migrations are not (a migration may rightly be long, and another instance may
    hold the lock while it applies them)."""
    with translated():
        conn = await asyncpg.connect(dsn, timeout=connect_timeout_s)
    try:
        with translated():
            return await _migrate(
                conn, available() if migrations is None else migrations, contract=contract
            )
    finally:
        await conn.close()


async def _migrate(
    conn: asyncpg.Connection, migrations: Sequence[Migration], *, contract: bool
) -> list[int]:
    await conn.execute(sql.SESSION_LOCK, LOCK_NS_MIGRATIONS, 0)
    try:
        await conn.execute(sql.MIGRATIONS_TABLE)
        await conn.execute(sql.MIGRATIONS_MIN_CODE)
        state = await inspect(conn, migrations)
        problem = state.problem(pending_allowed=True)
        if problem is not None:
            raise StoreError(problem)
        done: list[int] = []
        for m in state.pending:
            if m.contract and not contract:
                log.info(
                    "contract migration %s left pending: apply it with "
                    "`slotcast migrate --contract` once no instance older than %04d runs",
                    m.label,
                    m.min_code,
                )
                break
            async with conn.transaction():
                await conn.execute(m.text)
                await conn.execute(sql.MIGRATION_RECORD, m.version, m.name, m.checksum, m.min_code)
            log.info("applied migration %04d %s", m.version, m.name)
            done.append(m.version)
        return done
    finally:
        await conn.execute(sql.SESSION_UNLOCK, LOCK_NS_MIGRATIONS, 0)
