"""The fault tier's services: a PostgreSQL it may stop, restart and freeze, and a cluster per test.

Unlike the other tiers it never uses DATABASE_URL or REDIS_URL: it must be free
to hurt the servers it talks to, so it always starts its own.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from store.migrate import migrate
from testkit.faults import Cluster, cluster
from testkit.fixtures import TEMPLATE, scratch_database
from testkit.harness import ControlledPostgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[ControlledPostgres]:
    """One server for the module, with a migrated template each test's database is cloned from."""
    server = ControlledPostgres(Path(tempfile.mkdtemp(prefix="slotcast-faults-pg-")))
    try:
        server.start()

        async def template() -> None:
            import asyncpg

            conn = await asyncpg.connect(server.dsn())
            try:
                await conn.execute(f"CREATE DATABASE {TEMPLATE}")
            finally:
                await conn.close()
            await migrate(server.dsn(TEMPLATE))

        asyncio.run(template())
        yield server
    finally:
        server.close()


@pytest.fixture
async def fault_cluster(
    request: pytest.FixtureRequest, postgres: ControlledPostgres, tmp_path: Path
) -> AsyncIterator[Cluster]:
    """PostgreSQL (this module's), a fresh Redis and three instances on a fresh database."""
    async with scratch_database(postgres.dsn(), TEMPLATE) as dsn:
        try:
            async with cluster(postgres, dsn, tmp_path) as running:
                yield running
                report = getattr(request.node, "rep_call", None)
                if report is not None and report.failed:
                    for server in running.instances:
                        print(f"\n----- {server.name} log -----\n{server.logs()[-20000:]}")
        finally:
            # Whatever the test did to it, the server must answer for the next one.
            postgres.thaw()
            if not postgres.running:
                postgres.start()
