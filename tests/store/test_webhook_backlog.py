"""The webhook backlog read (`store.webhooks.next_batch`): what a batch holds when an
endpoint is far behind. Its cost must follow the batch, not the backlog (a slow
endpoint thousands of changes behind reads a batch after each few sends), while each
doctor's changes stay in version order, the doctor waiting longest comes first, and a
doctor with a message in flight is left out. And the claim: with more endpoints than
an instance serves at once, each gets its turn."""

from __future__ import annotations

from store import commands, webhooks
from store.pool import Store
from testkit.fixtures import seed_doctor

LEASE = "test-instance"


async def test_a_far_behind_endpoint_reads_a_bounded_batch_shared_among_its_doctors_in_order(
    store: Store,
) -> None:
    first = await seed_doctor(store, name="Dr. First", days=2)
    second = await seed_doctor(store, name="Dr. Second", days=2)
    third = await seed_doctor(store, name="Dr. Third", days=2)
    ep = await webhooks.create_endpoint(
        store,
        url="http://hooks.test/",
        description="",
        event_types=[],
        doctor_ids=[],
        max_endpoints=10,
    )
    await store.execute(
        "UPDATE webhook_endpoints SET leased_by = $1, lease_until = now() + interval '1 hour'",
        LEASE,
    )
    # The first doctor's backlog is the oldest; twelve changes each.
    for seeded in (first, second, third):
        for slot in seeded.slots[:12]:
            await commands.book_slot(store, slot_id=slot.id, patient_id="alice")

    async def batch(*, per_doctor: int, limit: int, busy: list[int]) -> list[tuple[int, int]]:
        read = await webhooks.next_batch(
            store, ep.id, LEASE, busy=busy, per_doctor=per_doctor, limit=limit
        )
        assert read is not None
        return [(m.doctor_id, m.version) for m in read[1].backlog]

    def versions(got: list[tuple[int, int]], doctor: int) -> list[int]:
        return [v for d, v in got if d == doctor]

    # Room for all: each doctor's per-doctor share, oldest waiting doctor first.
    got = await batch(per_doctor=5, limit=100, busy=[])
    assert [d for d, _ in got] == [first.id] * 5 + [second.id] * 5 + [third.id] * 5
    start = {d: versions(got, d)[0] for d in (first.id, second.id, third.id)}
    for doctor, v in start.items():
        assert versions(got, doctor) == list(range(v, v + 5))
    # A batch smaller than the backlog is shared among the waiting doctors, never more
    # than asked for: 7 among 3 doctors, 2 each (the cost follows the batch).
    got = await batch(per_doctor=50, limit=7, busy=[])
    assert got == [(d, start[d] + i) for d in (first.id, second.id, third.id) for i in (0, 1)]
    # More doctors waiting than the batch: the longest-waiting ones, one change each.
    assert await batch(per_doctor=50, limit=2, busy=[]) == [
        (first.id, start[first.id]),
        (second.id, start[second.id]),
    ]
    # A doctor with a message in flight is left out.
    got = await batch(per_doctor=1, limit=100, busy=[first.id])
    assert got == [(second.id, start[second.id]), (third.id, start[third.id])]
    # Each doctor resumes right after its cursor; a doctor caught up is not read.
    assert await webhooks.delivered(
        store,
        ep.id,
        LEASE,
        cursors={first.id: start[first.id] + 2, second.id: start[second.id] + 11},
        replayed=[],
        attempts=[],
    )
    got = await batch(per_doctor=1, limit=100, busy=[])
    assert got == [(first.id, start[first.id] + 3), (third.id, start[third.id])]


async def test_claims_take_the_least_recently_served_endpoints_first(store: Store) -> None:
    created = [
        await webhooks.create_endpoint(
            store,
            url=f"http://hooks.test/{n}",
            description="",
            event_types=[],
            doctor_ids=[],
            max_endpoints=10,
        )
        for n in range(3)
    ]
    one, two, three = (ep.id for ep in created)

    async def claim(instance: str, limit: int = 2) -> list[int]:
        got = await webhooks.claim(store, instance, lease_s=30, limit=limit, serving=[])
        return sorted(ep.id for ep in got)

    assert await claim("a") == [one, two]
    assert await claim("b") == [three]  # the others are leased
    for endpoint_id in (one, two):
        await webhooks.release(store, endpoint_id, "a")
    await webhooks.release(store, three, "b")
    # Released in that order: one and two have waited longest, three comes next, and
    # one, given back again, comes after three (not first, as the lowest id).
    assert await claim("c") == [one, two]
    await webhooks.release(store, one, "c")
    assert await claim("d", limit=1) == [three]
    assert await claim("e", limit=1) == [one]
