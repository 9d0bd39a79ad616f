"""One fault at a time, under load, against three real instances, PostgreSQL and Redis.

Each test injects one fault while watchers watch and bookers book through a
balancer, and `Report.assert_recovered` holds the cluster to the same promises
(testkit/faults.py says them in full): no acknowledged booking lost, no slot
double-booked, every watcher equal to the database within `RECOVERY_S` (10 s) of
the fault's end, no `internal` seen by a client, no traceback in a log, every
instance ready again by itself, and `/readyz` answering within `READYZ_BOUND_S`
(2 s) throughout. What each fault looks like to clients, and how long recovery
takes, is in docs/operations.md.
"""

from __future__ import annotations

import asyncio

import pytest

from testkit.faults import Cluster

pytestmark = [pytest.mark.faults, pytest.mark.processes, pytest.mark.timeout(120)]

# The campaign took Redis away for 10 s. 5 s asks the same of the server: the
# broker listener's reconnect backoff (capped at 5 s) is within one doubling of its cap
# by then, so recovery after it is no different in kind, and the tier stays short.
REDIS_OUTAGE_S = 5.0
POSTGRES_OUTAGE_S = 5.0
POSTGRES_FREEZE_S = 5.0


async def test_kill_9_of_an_instance(fault_cluster: Cluster) -> None:
    """Its clients lose their socket mid-stream, move to the others and resume there."""
    victim = fault_cluster.instances[0]

    async def fault() -> None:
        fault_cluster.kill(victim)
        await fault_cluster.relaunched(victim)

    (await fault_cluster.survive("kill -9 of an instance", fault)).assert_recovered()


async def test_sigterm_drain(fault_cluster: Cluster) -> None:
    """The instance leaves the balancer, tells its clients to reconnect, and exits 0."""
    victim = fault_cluster.instances[0]

    async def fault() -> None:
        await fault_cluster.terminate(victim)
        await fault_cluster.relaunched(victim)

    (await fault_cluster.survive("SIGTERM drain", fault)).assert_recovered()


async def test_rolling_restart(fault_cluster: Cluster) -> None:
    """Every instance in turn drains, exits and comes back before the next one goes."""

    async def fault() -> None:
        for server in fault_cluster.instances:
            await fault_cluster.terminate(server)
            await fault_cluster.relaunched(server)
            await fault_cluster.ready(server)

    (await fault_cluster.survive("rolling restart", fault)).assert_recovered()


async def test_redis_restart(fault_cluster: Cluster) -> None:
    async def fault() -> None:
        await asyncio.to_thread(fault_cluster.redis.stop)
        await asyncio.to_thread(fault_cluster.redis.start)

    (await fault_cluster.survive("Redis restart", fault)).assert_recovered()


async def test_redis_outage(fault_cluster: Cluster) -> None:
    """Live updates between instances stop; bookings go on; the change log fills the gap."""

    async def fault() -> None:
        await asyncio.to_thread(fault_cluster.redis.stop)
        await asyncio.sleep(REDIS_OUTAGE_S)
        await asyncio.to_thread(fault_cluster.redis.start)

    (await fault_cluster.survive(f"Redis down {REDIS_OUTAGE_S:.0f} s", fault)).assert_recovered()


async def test_postgres_restart(fault_cluster: Cluster) -> None:
    """A fast restart: every pooled connection is cut, then the server starts up again."""

    async def fault() -> None:
        await asyncio.to_thread(fault_cluster.postgres.restart)

    (await fault_cluster.survive("PostgreSQL restart", fault)).assert_recovered()


async def test_postgres_outage(fault_cluster: Cluster) -> None:
    """Connections are cut and new ones refused until it comes back."""

    async def fault() -> None:
        await asyncio.to_thread(fault_cluster.postgres.stop)
        await asyncio.sleep(POSTGRES_OUTAGE_S)
        await asyncio.to_thread(fault_cluster.postgres.start)

    name = f"PostgreSQL down {POSTGRES_OUTAGE_S:.0f} s"
    (await fault_cluster.survive(name, fault)).assert_recovered()


async def test_postgres_freeze(fault_cluster: Cluster) -> None:
    """SIGSTOP: connections stay open and nothing answers, the worst a dependency can do."""

    async def fault() -> None:
        fault_cluster.postgres.freeze()
        await asyncio.sleep(POSTGRES_FREEZE_S)
        fault_cluster.postgres.thaw()

    name = f"PostgreSQL frozen {POSTGRES_FREEZE_S:.0f} s"
    (await fault_cluster.survive(name, fault)).assert_recovered()


async def test_postgres_down_while_an_instance_is_killed(fault_cluster: Cluster) -> None:
    """Two faults: the killed instance's clients resume elsewhere while the database is away,
    and the supervisor restarts the instance while the database is still down."""
    victim = fault_cluster.instances[0]

    async def fault() -> None:
        await asyncio.to_thread(fault_cluster.postgres.stop)
        await asyncio.sleep(1.0)
        fault_cluster.kill(victim)
        await asyncio.sleep(POSTGRES_OUTAGE_S - 1.0)
        await asyncio.to_thread(fault_cluster.postgres.start)

    name = "PostgreSQL down 5 s, an instance killed meanwhile"
    (await fault_cluster.survive(name, fault)).assert_recovered()
