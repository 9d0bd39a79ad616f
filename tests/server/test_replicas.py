"""Read replicas against a real streaming replica: served there, fenced, and never needed.

One primary and one hot standby (`pg_basebackup -R`, testkit.harness.StandbyPostgres)
serve the whole module; each test seeds its own doctor. The in-process app reads
from the replica (`SLOTCAST_REPLICA_URLS`), and the tests hold it to the promise of
docs/operating.md, "Read replicas": reads go to the replica while it is current; a
replica whose replay is paused never answers with less than the instance or the
client already knows (the primary does, or the replica once it has replayed); a
replica that dies costs no read anything but time, and leaves the rotation by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client import SlotcastClient
from protocol.messages import Resumed, Snapshot, Watch
from protocol.vocabulary import Role, SlotStatus
from server.app import create_app
from server.keys import REPLICAS
from server.settings import Settings
from store.commands import book_slot
from store.pool import Store, open_store
from store.replicas import Replicas
from testkit.fixtures import JWT_SECRET, SeededDoctor, seed_doctor, token, ws_url
from testkit.harness import ControlledPostgres, StandbyPostgres, free_port
from testkit.wire import eventually

AppClient = TestClient[web.Request, web.Application]
Pair = tuple[ControlledPostgres, StandbyPostgres]


@pytest.fixture
async def primary(replicated: Pair) -> AsyncIterator[Store]:
    """The primary, as another instance would write to it (unseen by the app's rooms)."""
    async with open_store(replicated[0].dsn(), min_size=1, max_size=4) as store:
        yield store


@pytest.fixture
async def doctor(primary: Store, replicated: Pair) -> SeededDoctor:
    seeded = await seed_doctor(primary)
    await caught_up(*replicated)
    return seeded


@pytest.fixture
async def app(
    replicated: Pair, doctor: SeededDoctor, aiohttp_client: Callable[..., object]
) -> AppClient:
    """The app on the primary with the replica in rotation (checked every 0.1 s; out of
    it past 1 s of lag) and current."""
    primary, standby = replicated
    settings = Settings(
        database_url=primary.dsn(),
        replica_urls=standby.dsn(),
        broker_url="memory://",
        jwt_secret=JWT_SECRET,
        instance_id="replicas",
        db_pool_min=1,
        db_pool_max=5,
        replica_check_s=0.1,
        replica_max_lag_ms=1000,
        replica_wait_ms=20,
    )
    client: AppClient = await aiohttp_client(create_app(settings))  # type: ignore[misc]
    await eventually(lambda: in_rotation(client), "the replica to join the rotation")
    await caught_up(primary, standby)  # what the app's start-up sweeps wrote, too
    return client


def replicas_of(client: AppClient) -> Replicas:
    return client.app[REPLICAS]


def in_rotation(client: AppClient) -> bool:
    return all(replicas_of(client).reading().in_rotation.values())


async def caught_up(primary: ControlledPostgres, standby: StandbyPostgres) -> None:
    """Until the replica has replayed everything the primary has written so far."""
    conn = await asyncpg.connect(primary.dsn())
    try:
        position = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    finally:
        await conn.close()
    conn = await asyncpg.connect(standby.dsn())
    try:

        async def replayed() -> bool:
            done = await conn.fetchval(
                "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn >= $1", position
            )
            return bool(done)

        for _ in range(500):
            if await replayed():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the replica did not catch up")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def replay_paused(standby: StandbyPostgres) -> AsyncIterator[None]:
    """The replica stops applying WAL (it still receives it): it falls behind."""
    conn = await asyncpg.connect(standby.dsn())
    try:
        await conn.execute("SELECT pg_wal_replay_pause()")
        yield
    finally:
        await conn.execute("SELECT pg_wal_replay_resume()")
        await conn.close()


async def metrics_text(client: AppClient) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def test_reads_are_served_by_the_replica(
    app: AppClient, doctor: SeededDoctor, replicated: Pair
) -> None:
    replicas = replicas_of(app)
    before = replicas.reading().reads
    async with SlotcastClient.connect(ws_url(app)) as watcher:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        assert [s.id for s in snapshot.slots] == [s.id for s in doctor.slots]
    async with SlotcastClient.connect(ws_url(app), token=token(Role.DOCTOR, str(doctor.id))) as doc:
        dashboard = await doc.watch_dashboard(doctor.id, doctor.start)
        assert dashboard.version == snapshot.version
    resp = await app.get(f"/api/doctors/{doctor.id}/slots", params=_range(doctor))
    assert resp.status == 200
    assert (await resp.json())["version"] == snapshot.version
    resp = await app.get("/api/doctors", params={"q": "Test"})
    assert resp.status == 200
    assert doctor.id in [d["id"] for d in (await resp.json())["doctors"]]

    after = replicas.reading().reads
    assert after["replica"] - before["replica"] == 4  # snapshot, dashboard, REST slots, search
    assert after["primary"] == before["primary"]
    # The replica itself saw them: the app's replica pool is connected to it.
    conn = await asyncpg.connect(replicated[1].dsn())
    try:
        sessions = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'slotcast-replica'"
        )
    finally:
        await conn.close()
    assert sessions >= 1
    text = await metrics_text(app)
    assert 'slotcast_replica_in_rotation{replica="127.0.0.1:' in text
    assert 'slotcast_db_reads_total{target="replica"}' in text


async def test_a_paused_replica_never_answers_older_than_the_instance_knows(
    app: AppClient, doctor: SeededDoctor, replicated: Pair
) -> None:
    """Replay paused, then a booking here: every read still reflects it; the replica
    leaves the rotation past the lag limit and comes back once replayed."""
    replicas = replicas_of(app)
    slot = doctor.slots[0]
    async with SlotcastClient.connect(ws_url(app)) as first:
        base = (await first.watch(doctor.id, doctor.start, doctor.end)).version
        async with replay_paused(replicated[1]):
            # A booking through this instance: its room is at base + 1 at once.
            async with SlotcastClient.connect(ws_url(app), token=token(sub="p-1")) as patient:
                await patient.book(slot.id)
            behind = replicas.fallbacks["behind"]
            # A watcher joining after that delta (a range the room has not cached): the
            # replica, at base, is behind the room's version when it joined.
            async with SlotcastClient.connect(ws_url(app)) as late:
                day = await late.watch(doctor.id, doctor.start, doctor.start + timedelta(days=1))
            assert day.version == base + 1
            assert {s.id: s.status for s in day.slots}[slot.id] is SlotStatus.BUSY
            # The doctor's dashboard joins after it too.
            doc_token = token(Role.DOCTOR, str(doctor.id))
            async with SlotcastClient.connect(ws_url(app), token=doc_token) as doc:
                dashboard = await doc.watch_dashboard(doctor.id, slot.start.date())
            assert dashboard.version == base + 1
            assert slot.id in [a.slot_id for a in dashboard.appointments]
            assert replicas.fallbacks["behind"] == behind + 2
            # REST, fenced by this instance's room.
            resp = await app.get(f"/api/doctors/{doctor.id}/slots", params=_range(doctor))
            body = await resp.json()
            assert body["version"] == base + 1
            assert {s["id"]: s["status"] for s in body["slots"]}[slot.id] == "busy"
            # Still paused, the replica falls past the lag limit and leaves the rotation.
            await eventually(lambda: not in_rotation(app), "the lagging replica to leave")
            assert replicas.reading().lag_s[replicas.replicas[0].name] > 1.0
            text = await metrics_text(app)
            assert 'slotcast_replica_in_rotation{replica="127.0.0.1' in text
            assert 'slotcast_replica_fallbacks_total{reason="behind"} ' in text
    # Replayed again: back in rotation, and it answers at the newest version.
    await eventually(lambda: in_rotation(app), "the replica to rejoin")
    served = replicas.reads["replica"]
    resp = await app.get(f"/api/doctors/{doctor.id}/slots", params=_range(doctor))
    assert (await resp.json())["version"] == base + 1
    assert replicas.reads["replica"] == served + 1


async def test_a_resuming_client_never_gets_older_than_its_since(
    app: AppClient, doctor: SeededDoctor, primary: Store, replicated: Pair
) -> None:
    """The client applied a version this instance has not heard of (another instance
    committed it; this one's broker is its own) and the replica has not replayed: only
    the client's `since` says how new the answer must be."""
    async with SlotcastClient.connect(ws_url(app)) as first:
        base = (await first.watch(doctor.id, doctor.start, doctor.end)).version
        await caught_up(*replicated)
        async with replay_paused(replicated[1]):
            await book_slot(primary, slot_id=doctor.slots[0].id, patient_id="p-2")
            async with SlotcastClient.connect(ws_url(app)) as resuming:
                watch = Watch(doctor.id, doctor.start, doctor.end, since=base + 1)
                reply = await resuming.request_any(watch, (Resumed, Snapshot))
            # Not the replica's (or the room's cached) base: the primary's base + 1.
            assert reply == Resumed(doctor.id, since=base + 1, version=base + 1)
            # Having answered with base + 1, this instance never answers with less, though
            # its room and the replica are still at base.
            resp = await app.get(f"/api/doctors/{doctor.id}/slots", params=_range(doctor))
            assert (await resp.json())["version"] == base + 1


async def test_a_dead_replica_costs_no_read_and_leaves_the_rotation(
    app: AppClient, doctor: SeededDoctor, replicated: Pair
) -> None:
    standby = replicated[1]
    replicas = replicas_of(app)
    standby.stop()
    try:
        primary_reads = replicas.reads["primary"]
        async with SlotcastClient.connect(ws_url(app)) as watcher:
            snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
        assert [s.id for s in snapshot.slots] == [s.id for s in doctor.slots]
        resp = await app.get(f"/api/doctors/{doctor.id}/slots", params=_range(doctor))
        assert resp.status == 200
        resp = await app.get("/api/doctors", params={"q": "Test"})
        assert resp.status == 200
        assert replicas.reads["primary"] == primary_reads + 3
        await eventually(lambda: not in_rotation(app), "the dead replica to leave")
        assert 'slotcast_replica_in_rotation{replica="127.0.0.1' in await metrics_text(app)
    finally:
        standby.start()
    await eventually(lambda: in_rotation(app), "the restarted replica to rejoin", timeout=10)


def _range(doctor: SeededDoctor) -> dict[str, str]:
    return {"start": doctor.start.isoformat(), "end": doctor.end.isoformat()}


async def test_a_replica_down_at_start_stops_nothing(
    replicated: Pair, doctor: SeededDoctor, aiohttp_client: Callable[..., object]
) -> None:
    """Its pool connects lazily: the instance starts and serves from the primary, and the
    replica is out of rotation, saying why."""
    settings = Settings(
        database_url=replicated[0].dsn(),
        replica_urls=f"postgresql://postgres:secret@127.0.0.1:{free_port()}/postgres",
        broker_url="memory://",
        jwt_secret=JWT_SECRET,
        db_pool_min=1,
        replica_check_s=0.1,
    )
    client: AppClient = await aiohttp_client(create_app(settings))  # type: ignore[misc]
    replicas = replicas_of(client)
    await eventually(lambda: replicas.replicas[0].reason != "not checked yet", "a check")
    assert replicas.replicas[0].reason.startswith("unreachable")
    assert "secret" not in replicas.replicas[0].name
    async with SlotcastClient.connect(ws_url(client)) as watcher:
        snapshot = await watcher.watch(doctor.id, doctor.start, doctor.end)
    assert len(snapshot.slots) == len(doctor.slots)
    assert replicas.reading().in_rotation == {replicas.replicas[0].name: False}
    assert replicas.fallbacks["none"] >= 1
