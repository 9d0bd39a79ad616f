"""The oldest supported PostgreSQL, 15 (Debian bookworm's), exercised rather than named.

docs/deploy.md creates two roles: the owner, which `slotcast migrate` runs as, and
`slotcast_app`, which the instances run as with only the privileges listed there.
This runs that very SQL on Debian's PostgreSQL 15 binaries, migrates as the owner,
and serves a booking from a real `slotcast serve` connected as the runtime role (and
prunes as it): the listed GRANTs are enough, and the role can change no schema.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import asyncpg
import pytest

from store.pool import open_store
from testkit.deploydoc import blocks
from testkit.fixtures import Spawn, seed_doctor, token
from testkit.harness import REPO, ControlledPostgres, own_postgres
from testkit.tools import ensure_postgres15

pytestmark = pytest.mark.processes

# The passwords docs/deploy.md writes (the throwaway cluster trusts loopback anyway).
OWNER = "slotcast:owner-password-change-me"
APP = "slotcast_app:app-password-change-me"


@pytest.fixture(scope="module")
def postgres15() -> Iterator[ControlledPostgres]:
    reasons: list[str] = []
    bin_dir = ensure_postgres15(reasons)
    if bin_dir is None:
        pytest.skip(reasons[0])
    with own_postgres(bin_dir) as server:
        yield server


def run_roles_sql(server: ControlledPostgres) -> None:
    """docs/deploy.md's role SQL, as the superuser, through PostgreSQL 15's own psql."""
    roles = blocks()["roles"]
    assert roles.lang == "sql"
    done = subprocess.run(
        [str(server.bin / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-f", "-", server.dsn()],
        input=roles.text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(120)
async def test_postgresql_15_migrates_as_the_owner_and_serves_as_the_runtime_role(
    postgres15: ControlledPostgres, spawn_server: Spawn
) -> None:
    run_roles_sql(postgres15)
    owner = f"postgresql://{OWNER}@127.0.0.1:{postgres15.port}/slotcast"
    app = f"postgresql://{APP}@127.0.0.1:{postgres15.port}/slotcast"

    migrate = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server.cli", "migrate", "--database-url", owner],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr

    conn = await asyncpg.connect(app)
    try:
        assert (await conn.fetchval("SHOW server_version_num"))[:2] == "15"
        # Only what docs/deploy.md lists: no DDL, no TRUNCATE, on any table.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE intruder (id int)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER TABLE doctors ADD COLUMN intruder int")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE idempotency_keys")
    finally:
        await conn.close()

    async with open_store(owner, min_size=1, max_size=2) as store:
        doctor = await seed_doctor(store, name="Dr. Fifteen", timezone="Europe/Berlin")

    # The instances never migrate (their role could not): SLOTCAST_MIGRATE=off.
    server = spawn_server("pg15", database=app, env={"SLOTCAST_MIGRATE": "off"})
    slot = doctor.slots[0]
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{server.http_url}/api/appointments",
            json={"slot_id": slot.id},
            headers={"Authorization": f"Bearer {token(sub='pg15-patient')}"},
        ) as resp:
            body = await resp.text()
            assert resp.status == 201, body
        async with http.get(
            f"{server.http_url}/api/doctors/{doctor.id}/slots",
            params={"start": doctor.start.isoformat(), "end": doctor.end.isoformat()},
        ) as resp:
            snapshot = await resp.json()
    statuses = {s["id"]: s["status"] for s in snapshot["slots"]}
    assert statuses[slot.id] == "busy"
    # The instances prune in the background as this role: its GRANTs are enough for that too
    # (the change log's maintenance door is a setting, not a privilege).
    prune = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server.cli", "prune", "--database-url", app],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert prune.returncode == 0, prune.stdout + prune.stderr
    assert "permission denied" not in server.logs()
