"""What an operator reads from a real `slotcast serve`: its JSON log lines and its metrics.

One process serves the whole story (a REST error, a booking, a refused booking and a
cancellation over a WebSocket), then stops so its log is complete: every line must
parse and name the instance, requests and connections must be named on their lines,
and nothing personal beyond the token's subject (no token, no password) may appear.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest

from client import SlotcastClient
from protocol.errors import ErrorCode, SlotcastError
from store.startup import where_postgres
from testkit.fixtures import SeededDoctor, Spawn, token

pytestmark = pytest.mark.processes

PASSWORD = "obs-s3cret-pw"
PATIENT = "patient-obs-7"


def with_password(dsn: str) -> tuple[str, str]:
    """The DSN with a password (trust authentication ignores it), and that password."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, parts.password
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user or 'postgres'}:{PASSWORD}@{host}"
    return urlunsplit(parts._replace(netloc=netloc)), PASSWORD


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_json_logs_and_metrics_of_a_real_instance(
    spawn_server: Spawn,
    database_url: str,
    redis_url: str,
    doctor: SeededDoctor,
    http: aiohttp.ClientSession,
) -> None:
    dsn, password = with_password(database_url)
    server = await asyncio.to_thread(
        spawn_server,
        "obs-1",
        database=dsn,
        broker_url=redis_url,
        env={"SLOTCAST_LOG_FORMAT": "json"},
    )

    async def metrics() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with http.get(f"{server.http_url}/metrics") as resp:
            assert resp.status == 200
            return scrape(await resp.text())

    before = await metrics()

    # A REST error, with a request id the balancer might have set.
    async with http.post(
        f"{server.http_url}/api/appointments",
        json={"slot_id": doctor.slots[0].id},
        headers={"X-Request-Id": "lb-req-42"},
    ) as resp:
        assert resp.status == 401
        assert resp.headers["X-Request-Id"] == "lb-req-42"

    # Over a WebSocket: a booking, the same slot again (refused), a cancellation.
    patient_token = token(sub=PATIENT)
    async with SlotcastClient.connect(server.ws_url, token=patient_token) as patient:
        booked = await patient.book(doctor.slots[0].id)
        with pytest.raises(SlotcastError) as refused:
            await patient.book(doctor.slots[0].id)
        assert refused.value.code is ErrorCode.SLOT_TAKEN
        await patient.cancel(booked.id, reason="cannot come")

    after = await metrics()

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("slotcast_errors_total", code="unauthenticated", transport="rest") == 1
    assert moved("slotcast_errors_total", code="slot_taken", transport="ws") == 1
    assert moved("slotcast_errors_total", code="internal", transport="rest") == 0
    assert moved("slotcast_bookings_total") == 1
    assert moved("slotcast_cancellations_total", by="patient") == 1
    assert after[("slotcast_db_pool_max", frozenset())] == 10  # SLOTCAST_DB_POOL_MAX
    assert after[("slotcast_db_pool_connections", frozenset())] >= 1
    assert after[("slotcast_db_pool_waiting", frozenset())] == 0
    assert ("slotcast_relay_lag_seconds", frozenset()) in after
    assert after[("slotcast_broker_reconnects_total", frozenset())] == 0
    assert after[("slotcast_ready", frozenset())] == 1
    assert after[("slotcast_database_up", frozenset())] == 1
    assert after[("process_resident_memory_bytes", frozenset())] > 0
    assert after[("process_open_fds", frozenset())] > 0

    assert server.stop(signal.SIGTERM) == 0
    text = server.logs()
    lines: list[dict[str, Any]] = [orjson.loads(line) for line in text.splitlines() if line]
    assert all(line["instance"] == "obs-1" for line in lines)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)

    # Start-up names where the data is, without the password; no token anywhere.
    assert password not in text
    assert patient_token not in text
    assert "Bearer" not in text
    redis = urlsplit(redis_url)
    database, broker = where_postgres(dsn), f"Redis at {redis.hostname}:{redis.port}"
    assert database.startswith("PostgreSQL at ")
    assert any(
        f"database: {database}; broker: {broker}" in line["message"]
        for line in lines
        if line["message"].startswith("listening on")
    )

    access = [line for line in lines if line["logger"] == "slotcast.access"]
    rest = [line for line in access if line["path"] == "/api/appointments"]
    assert len(rest) == 1
    assert rest[0]["request_id"] == "lb-req-42"
    assert rest[0]["status"] == 401
    assert rest[0]["method"] == "POST"
    sockets = [line for line in access if line["path"] == "/ws"]
    assert len(sockets) == 1  # one per connection, never per frame
    assert sockets[0]["status"] == 101
    assert sockets[0]["subject"] == PATIENT
    # The balancer's readiness checks are DEBUG, and DEBUG is off.
    assert not [line for line in access if line["path"] == "/readyz"]

    commands = [line for line in lines if line["logger"] == "slotcast.commands"]
    ws = [line for line in commands if line["transport"] == "ws"]
    assert [(c["command"], c["outcome"]) for c in ws] == [
        ("book", "ok"),
        ("book", "slot_taken"),
        ("cancel", "ok"),
    ]
    connection = sockets[0]["connection_id"]
    for line in ws:
        assert line["connection_id"] == connection
        assert line["subject"] == PATIENT
        assert line["role"] == "patient"
        assert line["latency_ms"] >= 0
    assert ws[0]["doctor_id"] == doctor.id
    assert [(c["command"], c["outcome"]) for c in commands if c["transport"] == "rest"] == [
        ("book", "unauthenticated")
    ]
    # Nobody's appointment details: the cancellation reason, for one, stays out.
    assert "cannot come" not in text
