"""`python -m testkit.topology`: the documented way to try the scaled-out topology.

README and docs/operating.md promise one command that starts N instances behind the
shipped HAProxy configuration, a Redis Cluster and a PostgreSQL primary with a
streaming replica. This keeps that promise working: the same `topology()` the command
runs, at its smallest (two instances), must carry a booking made through HAProxy to
watchers on both instances (so across the cluster's sharded pub/sub), with the
replica in rotation, and leave nothing running when it is done.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import pytest

from client import SlotcastClient
from protocol.vocabulary import SlotStatus
from store.pool import open_store
from testkit.fixtures import JWT_SECRET, seed_doctor, token
from testkit.tools import ensure_haproxy, ensure_redis7
from testkit.topology import Topology, topology

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    reasons: list[str] = []
    if ensure_haproxy(reasons) is None or ensure_redis7(reasons) is None:
        pytest.skip(reasons[0])
    with topology(2, env={"SLOTCAST_JWT_SECRET": JWT_SECRET}, demo=False) as started:
        yield started
    # Torn down: every process it started has exited.
    assert started.haproxy is not None
    assert started.haproxy.poll() is not None
    assert all(s.process is None for s in started.instances)
    assert started.cluster.alive() == []
    assert not started.primary.running
    assert not started.standby.running


def replica_reads(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("slotcast_db_reads_total{") and 'target="replica"' in line
    )


async def test_a_booking_through_haproxy_reaches_watchers_on_every_instance(
    topo: Topology,
) -> None:
    async with open_store(topo.primary.dsn(), min_size=1, max_size=2) as store:
        doctor = await seed_doctor(store)
    slot = doctor.slots[0]
    async with (
        SlotcastClient.connect(topo.instances[0].ws_url) as first,
        SlotcastClient.connect(topo.instances[1].ws_url) as second,
        SlotcastClient.connect(topo.ws_url, token=token(sub="topology-patient")) as patient,
    ):
        for watcher in (first, second):
            await watcher.watch(doctor.id, doctor.start, doctor.end)
        booked = await patient.book(slot.id)
        assert booked.slot_id == slot.id
        for watcher in (first, second):
            delta = await watcher.next_delta(timeout=10)
            assert delta.doctor_id == doctor.id
            assert [(s.id, s.status) for s in delta.slots] == [(slot.id, SlotStatus.BUSY)]

    # The replica is in the instances' rotation: reads of a doctor go to it.
    async def replica_used() -> bool:
        async with SlotcastClient.connect(topo.ws_url) as late:
            await late.search_doctors()
        totals = [await asyncio.to_thread(replica_reads, s.http_url) for s in topo.instances]
        return sum(totals) > 0

    for _ in range(50):
        if await replica_used():
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("no read went to the replica")
