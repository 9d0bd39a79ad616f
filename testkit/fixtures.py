"""The suite's shared fixtures: real PostgreSQL, real Redis, the store and real server processes.

A pytest plugin (`-p testkit.fixtures` in pyproject's addopts), because the
tiers are siblings and all but tests/unit need these: defined once here, a
session fixture starts its service once for the whole run, and only when a
test asks for it (nothing here is autouse, so tests/unit starts no service).
Fixtures one tier alone needs live in that tier's conftest (tests/server: the
in-process app). The helpers (`token`, `seed_doctor`, ...) are imported by tests.

Each test gets a fresh database cloned from a migrated template, so tests never
see each other's rows and never pay for migrations twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import date, time, timedelta
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from protocol.messages import SlotView
from protocol.vocabulary import Role
from server import auth
from store import commands, doctors, reads
from store.migrate import migrate
from store.pool import Store, open_store
from store.schedule import Block
from testkit.harness import (
    ControlledPostgres,
    RedisServer,
    ServerProcess,
    StandbyPostgres,
    free_port,
    own_postgres,
    postgres_server,
    redis_server,
    replicated_postgres,
    with_database,
)

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256"
# Each xdist worker builds its own template: two workers on one server must not drop
# each other's (with the suite's own servers each worker has a server of its own anyway).
TEMPLATE = "slotcast_template" + os.environ.get("PYTEST_XDIST_WORKER", "").replace("gw", "_")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, each with its own PostgreSQL and Redis, so that the
    half of the suite's time spent waiting on server processes overlaps. An external Redis
    (`REDIS_URL`) is one flushed before every test and one pub/sub namespace, which two
    workers would trample: then the suite runs in one worker."""
    del config
    if os.environ.get("REDIS_URL") or os.environ.get("DATABASE_URL"):
        return 1
    return max(1, min(2, os.cpu_count() or 1))


# ---- services --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def template_dsn(pg_admin_dsn: str) -> str:
    """A database with every migration applied, cloned by each test."""
    import asyncio

    async def build() -> None:
        conn = await asyncpg.connect(pg_admin_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        await migrate(with_database(pg_admin_dsn, TEMPLATE))

    asyncio.run(build())
    return with_database(pg_admin_dsn, TEMPLATE)


@contextlib.asynccontextmanager
async def scratch_database(admin_dsn: str, template: str | None) -> AsyncIterator[str]:
    """A database that exists for one test, dropped (even if still in use) afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    clone = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}{clone}")
    finally:
        await conn.close()
    try:
        yield with_database(admin_dsn, name)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


@pytest.fixture
async def database_url(pg_admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test only."""
    async with scratch_database(pg_admin_dsn, TEMPLATE) as dsn:
        yield dsn


@pytest.fixture
async def empty_database_url(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A database with nothing in it, not even migrations."""
    async with scratch_database(pg_admin_dsn, None) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_service() -> Iterator[tuple[str, RedisServer | None]]:
    with redis_server() as service:
        yield service


@pytest.fixture
def redis_url(redis_service: tuple[str, RedisServer | None]) -> str:
    """A real Redis, flushed before the test."""
    import redis

    url = redis_service[0]
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()
    return url


@pytest.fixture
def redis_process(redis_service: tuple[str, RedisServer | None]) -> RedisServer:
    """The suite's own redis-server, for tests that stop and restart it."""
    if redis_service[1] is None:
        pytest.skip("REDIS_URL points at an external Redis that the suite must not restart")
    return redis_service[1]


# ---- the store and helpers -------------------------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection that looks at the tables behind the store's back."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with open_store(database_url, min_size=1, max_size=20) as s:
        yield s


def ws_url(client: TestClient) -> str:
    return str(client.make_url("/ws")).replace("http://", "ws://")


def token(role: Role | str = Role.PATIENT, sub: str = "patient-1", **kw: object) -> str:
    return auth.issue(JWT_SECRET, subject=sub, role=Role(role), **kw)  # type: ignore[arg-type]


# ---- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeededDoctor:
    id: int
    start: date  # first local date with slots that are all in the future
    end: date
    slots: list[SlotView]


EVERY_DAY = [Block(d, time(8), time(18)) for d in range(1, 8)]


async def seed_doctor(
    store: Store, *, name: str = "Dr. Test", timezone: str = "UTC", days: int = 7
) -> SeededDoctor:
    """A doctor open 08:00-18:00 local every day, 30-minute slots, from tomorrow on."""
    doctor_id = await doctors.create_doctor(
        store, name=name, timezone=timezone, schedule=EVERY_DAY, horizon_days=days + 2
    )
    await commands.materialize_slots(store, doctor_id)
    start = date.today() + timedelta(days=2)  # safely in the future in every zone
    end = start + timedelta(days=days - 1)
    snapshot = await reads.snapshot(store, doctor_id, start, end)
    return SeededDoctor(doctor_id, start, end, snapshot.slots)


@pytest.fixture
async def doctor(store: Store) -> SeededDoctor:
    return await seed_doctor(store)


# ---- server processes ------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


Spawn = Callable[..., ServerProcess]


@pytest.fixture
def spawn_server(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> Iterator[Spawn]:
    """Start real `slotcast serve` processes; their logs are printed if the test fails."""
    started: list[ServerProcess] = []

    def spawn(
        name: str | None = None,
        *,
        broker_url: str = "memory://",
        database: str | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        start: bool = True,
    ) -> ServerProcess:
        name = name or f"server-{len(started) + 1}"
        full_env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
        full_env.update(
            {
                "SLOTCAST_DATABASE_URL": database or database_url,
                "SLOTCAST_BROKER_URL": broker_url,
                "SLOTCAST_JWT_SECRET": JWT_SECRET,
                "SLOTCAST_INSTANCE_ID": name,
                "SLOTCAST_DB_POOL_MIN": "1",
                "SLOTCAST_LOG_LEVEL": "INFO",
                **(env or {}),
            }
        )
        proc = ServerProcess(
            name, free_port(), full_env, tmp_path / f"{name}.log", extra_args=args or []
        )
        started.append(proc)
        if start:
            proc.start()
        return proc

    yield spawn
    for proc in started:
        proc.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in started:
            print(f"\n----- {proc.name} log -----\n{proc.logs()}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlledPostgres]:
    """A migrated PostgreSQL the module's tests own, to stop, restart and freeze: outage
    tests must never touch the shared server every other test uses."""
    with own_postgres() as server:
        asyncio.run(migrate(server.dsn()))
        yield server


@pytest.fixture(scope="module")
def replicated() -> Iterator[tuple[ControlledPostgres, StandbyPostgres]]:
    """A migrated primary and a streaming replica of it, for one module's tests (a few
    seconds to start): the read-replica tests pause the replica's replay and stop it."""
    with replicated_postgres() as (primary, standby):
        asyncio.run(migrate(primary.dsn()))
        yield primary, standby
