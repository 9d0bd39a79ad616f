"""Upgrades: `slotcast migrate` as its own step, and two releases on one database.

A rolling upgrade runs the old release beside the new one while the new one's
migrations are applied: an expand step must not cost the running instance a booking
or a delta, an instance must start on a schema with expand steps newer than it knows,
and it must refuse, in one line, a schema whose contract step requires newer code.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aiohttp
import asyncpg
import pytest

from client import SlotcastClient
from protocol.vocabulary import SlotStatus
from store.migrate import Migration, available, check, code_schema, migrate
from testkit.fixtures import SeededDoctor, Spawn, token
from testkit.harness import REPO, free_port

pytestmark = pytest.mark.processes

# Test-only steps, numbered far beyond any real migration.
EXPAND = Migration(
    9001,
    "test_expand",
    "-- slotcast:expand\nALTER TABLE doctors ADD COLUMN upgrade_note text;\n"
    "CREATE INDEX doctors_upgrade_note ON doctors (upgrade_note);\n",
)
CONTRACT = Migration(
    9002,
    "test_contract",
    "-- slotcast:contract 9002\nALTER TABLE doctors DROP COLUMN upgrade_note;\n",
)


def slotcast(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it, with only the environment given."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLOTCAST_") and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO,
        env={**base, "SLOTCAST_JWT_SECRET": "s" * 40, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def error_line(text: str) -> str:
    """The one ERROR line a refused start logs (the reason), whatever follows it."""
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1, text
    return errors[0]


def test_migrate_check_and_a_start_that_may_not_migrate(empty_database_url: str) -> None:
    code = f"{code_schema():04d}"
    pending = slotcast("migrate", "--check", "--database-url", empty_database_url)
    assert pending.returncode == 1, pending
    assert pending.stdout.splitlines()[0] == f"pending migrations ({len(available())}):"
    assert "  0001 init" in pending.stdout.splitlines()
    assert "  0006 lifecycle" in pending.stdout.splitlines()

    # SLOTCAST_MIGRATE=off: the instance refuses, in one line, and names the way out.
    refused = slotcast(
        "serve",
        "--port",
        str(free_port()),
        env={"SLOTCAST_MIGRATE": "off", "SLOTCAST_DATABASE_URL": empty_database_url},
    )
    assert refused.returncode == 1, refused
    line = error_line(refused.stderr)
    assert "cannot start: the database lacks migrations 0001 init" in line, line
    assert line.endswith("run `slotcast migrate` first"), line

    applied = slotcast("migrate", "--database-url", empty_database_url)
    assert applied.returncode == 0, applied
    done = slotcast("migrate", "--check", "--database-url", empty_database_url)
    assert (done.returncode, done.stdout.strip()) == (0, f"up to date: schema {code}, code {code}")


async def book(http: aiohttp.ClientSession, url: str, slot_id: int, who: str) -> int:
    async with http.post(
        f"{url}/api/appointments",
        json={"slot_id": slot_id},
        headers={"Authorization": f"Bearer {token(sub=who)}"},
    ) as resp:
        assert resp.status == 201, await resp.text()
        return int((await resp.json())["appointment"]["id"])


async def test_a_rolling_upgrade_serves_throughout_and_old_code_refuses_a_contract(
    spawn_server: Spawn, database_url: str, redis_url: str, doctor: SeededDoctor
) -> None:
    old = spawn_server("old", broker_url=redis_url)
    slots = doctor.slots
    async with (
        aiohttp.ClientSession() as http,
        SlotcastClient.connect(old.ws_url) as watcher,
    ):
        base = (await watcher.watch(doctor.id, doctor.start, doctor.end)).version

        # The next release's expand step is applied while the old instance books.
        async def bookings() -> list[int]:
            done = []
            for i in range(6):
                done.append(await book(http, old.http_url, slots[i].id, f"p-{i}"))
                await asyncio.sleep(0.05)
            return done

        booked, applied = await asyncio.gather(
            bookings(), migrate(database_url, migrations=[*available(), EXPAND])
        )
        assert applied == [EXPAND.version]
        assert len(set(booked)) == 6
        for i in range(6):
            delta = await watcher.next_delta(timeout=5)
            assert delta.version == base + 1 + i
            assert [(s.id, s.status) for s in delta.slots] == [(slots[i].id, SlotStatus.BUSY)]

        # This code on a schema with an expand step it does not know: it starts and serves,
        # side by side with the first, as the old release does during an upgrade.
        beside = spawn_server("beside", broker_url=redis_url)
        await book(http, beside.http_url, slots[6].id, "p-6")
        assert (await watcher.next_delta(timeout=5)).version == base + 7

        # A contract step waits for the operator: an instance's start, like a plain
        # `slotcast migrate`, stops before it, and the release that ships it runs without.
        newest = [*available(), EXPAND, CONTRACT]
        assert await migrate(database_url, migrations=newest, contract=False) == []
        waiting = await check(database_url, migrations=newest)
        assert [m.label for m in waiting.pending] == [
            "9002 test_contract (contract: needs code 9002)"
        ]
        assert waiting.problem(pending_allowed=False) is None

        # Once applied, only newer code may run: `--check` and a start both refuse.
        contracted = await migrate(database_url, migrations=newest)
        assert contracted == [CONTRACT.version]
        state = await check(database_url)
        assert state.min_code == CONTRACT.version
        checked = slotcast("migrate", "--check", "--database-url", database_url)
        assert checked.returncode == 2, checked
        assert "requires code of schema 9002 or newer" in checked.stdout
        newcomer = spawn_server("too-old", start=False)
        newcomer.launch()
        assert newcomer.process is not None
        assert await asyncio.to_thread(newcomer.process.wait, 60) == 1
        line = error_line(newcomer.logs())
        assert (
            "cannot start: the database schema requires code of schema 9002 or newer; "
            f"this instance knows up to {code_schema():04d}: deploy a newer release"
        ) in line, line


async def test_a_database_migrated_by_a_release_before_kinds_is_read_and_upgraded(
    database_url: str,
) -> None:
    """Releases before 0006 kept no `min_code`: such a database counts as allowing any code,
    and the first migrate adds the column without touching the recorded rows."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE schema_migrations DROP COLUMN min_code")
        await conn.execute("DELETE FROM schema_migrations WHERE version >= 6")
        before = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY 1")
        state = await check(database_url)
        early = [m for m in available() if m.version < 6]
        assert state.min_code == 0
        assert state.pending == [m for m in available() if m.version >= 6]
        assert await migrate(database_url, migrations=early) == []
        assert (
            await conn.fetch(
                "SELECT version, checksum FROM schema_migrations WHERE version < 6 ORDER BY 1"
            )
            == before
        )
        assert await conn.fetchval("SELECT max(min_code) FROM schema_migrations") == 0
    finally:
        await conn.close()
