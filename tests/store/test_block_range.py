"""Blocking a range with a reason, and previewing a schedule before it is saved.

A day off blocks dozens of slots: if they went one by one, a patient could hold one
between two blocks, and every watcher would get dozens of versions. So a range is one
transaction under the doctor's lock and one change record, and its reason stays on the
doctor's side. A preview must name exactly the appointments the save would strand, or
the doctor saves blind.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import asyncpg
import pytest

from protocol.messages import (
    Block,
    BlockRange,
    Book,
    DayOverride,
    Hold,
    PreviewSchedule,
    SetSchedule,
    Unblock,
    UnblockRange,
    WeeklyBlock,
)
from protocol.vocabulary import Role, SlotStatus
from store import commands, reads, sql
from store.errors import (
    DoctorRetired,
    Forbidden,
    IdempotencyConflict,
    Invalid,
    NotFound,
    OutsideHorizon,
)
from store.pool import Store, open_store
from store.tx import Actor
from testkit.fixtures import SeededDoctor, seed_doctor


def doctor_actor(doctor: SeededDoctor) -> Actor:
    return Actor(str(doctor.id), Role.DOCTOR)


def day_range(doctor: SeededDoctor) -> tuple[datetime, datetime]:
    """The seeded doctor's first whole day (UTC zone): 20 slots, 08:00-18:00."""
    start = datetime.combine(doctor.start, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


async def change_count(db: asyncpg.Connection, doctor_id: int) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM changes WHERE doctor_id = $1", doctor_id)
    return count


async def occupy(store: Store, doctor: SeededDoctor) -> tuple[int, int]:
    """Book the day's first slot for Alice and hold its third for Bob."""
    first, third = doctor.slots[0], doctor.slots[2]
    alice = Actor("alice", Role.PATIENT, name="Alice Martin")
    booked = await commands.book(store, alice, Book(first.id), limits=None)
    bob = Actor("bob", Role.PATIENT, name="Bob Chen")
    await commands.hold(
        store, bob, Hold(third.id), ttl=timedelta(minutes=5), max_holds=5, limits=None
    )
    assert booked.reply.appointment.slot_id == first.id
    return first.id, third.id


async def test_a_day_blocked_with_a_reason_is_one_change_and_the_reason_stays_with_staff(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor = await seed_doctor(store)
    booked, held = await occupy(store, doctor)
    before = await reads.doctor_version(store, doctor.id)
    changes_before = await change_count(db, doctor.id)
    start, end = day_range(doctor)

    outcome = await commands.block_range(
        store, doctor_actor(doctor), BlockRange(doctor.id, start, end, "training day")
    )

    day = [s for s in doctor.slots if start <= s.start < end]
    assert len(day) == 20
    blocked = {s.id for s in outcome.reply.slots}
    assert blocked == {s.id for s in day} - {booked, held}  # the booked and the held stay
    assert {s.status for s in outcome.reply.slots} == {SlotStatus.BUSY_UNAVAILABLE}
    assert outcome.reply.reason == "training day"
    # One version, one change record, for all 18 slots.
    assert await reads.doctor_version(store, doctor.id) == before + 1
    assert await change_count(db, doctor.id) == changes_before + 1
    [change] = outcome.changes
    assert change.private.kinds == ["slots.blocked"]
    assert {b["slot_id"] for b in change.private.blocks} == blocked
    assert {b["reason"] for b in change.private.blocks} == {"training day"}
    # Patients' delta: the slots as busy-unavailable, and no reason anywhere in it.
    assert "training day" not in repr(change.public)
    assert change.dashboard_body()["blocks"] == change.private.blocks
    # The doctor's day carries the reasons; the public snapshot does not.
    dashboard = await reads.dashboard(store, doctor.id, doctor.start)
    assert {(b.slot_id, b.reason) for b in dashboard.blocks} == {
        (i, "training day") for i in blocked
    }
    snapshot = await reads.snapshot(store, doctor.id, doctor.start, doctor.start)
    assert "training day" not in repr(snapshot)
    # The change log replays the same private half.
    log = await reads.changes_between(store, doctor.id, before, before + 1)
    assert log[0].private.blocks == change.private.blocks

    # Unblocked: one change again, the reasons gone.
    back = await commands.unblock_range(
        store, doctor_actor(doctor), UnblockRange(doctor.id, start, end)
    )
    assert {s.id for s in back.reply.slots} == blocked
    assert {s.status for s in back.reply.slots} == {SlotStatus.FREE}
    assert await change_count(db, doctor.id) == changes_before + 2
    assert (await reads.dashboard(store, doctor.id, doctor.start)).blocks == []


async def test_a_range_with_nothing_to_block_records_nothing(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor = await seed_doctor(store, days=2)
    start, end = day_range(doctor)
    late = start + timedelta(hours=20)  # after the last slot of the day
    before = await change_count(db, doctor.id)
    outcome = await commands.block_range(
        store, doctor_actor(doctor), BlockRange(doctor.id, late, end, "evening")
    )
    assert outcome.reply.slots == []
    assert outcome.changes == []
    assert await change_count(db, doctor.id) == before


async def test_the_idempotency_key_returns_the_first_reply_and_refuses_another_range(
    store: Store, db: asyncpg.Connection
) -> None:
    doctor = await seed_doctor(store, days=2)
    start, end = day_range(doctor)
    msg = BlockRange(doctor.id, start, end, "closed", idempotency_key="off-1")
    first = await commands.block_range(store, doctor_actor(doctor), msg)
    count = await change_count(db, doctor.id)
    again = await commands.block_range(store, doctor_actor(doctor), msg)
    assert again.reply == first.reply
    assert again.changes == []
    assert await change_count(db, doctor.id) == count
    other = BlockRange(doctor.id, start, end, "another reason", idempotency_key="off-1")
    with pytest.raises(IdempotencyConflict):
        await commands.block_range(store, doctor_actor(doctor), other)


async def test_ranges_are_bounded_and_owned(store: Store) -> None:
    doctor = await seed_doctor(store, days=2)  # horizon: 4 days
    start, end = day_range(doctor)
    me = doctor_actor(doctor)
    with pytest.raises(Invalid, match="before"):
        await commands.block_range(store, me, BlockRange(doctor.id, end, start, "x"))
    with pytest.raises(OutsideHorizon, match="4 days"):
        await commands.block_range(
            store, me, BlockRange(doctor.id, start, start + timedelta(days=5), "x")
        )
    with pytest.raises(Forbidden):
        await commands.block_range(
            store, Actor("alice", Role.PATIENT), BlockRange(doctor.id, start, end)
        )
    with pytest.raises(Forbidden):
        await commands.unblock_range(
            store, Actor("999", Role.DOCTOR), UnblockRange(doctor.id, start, end)
        )
    admin = Actor("root", Role.ADMIN)
    with pytest.raises(NotFound):
        await commands.block_range(store, admin, BlockRange(2**31 - 1, start, end))
    await store.execute("UPDATE doctors SET retired_at = now() WHERE id = $1", doctor.id)
    with pytest.raises(DoctorRetired):
        await commands.block_range(store, admin, BlockRange(doctor.id, start, end))


async def test_a_single_block_drops_a_reason_given_before(store: Store) -> None:
    doctor = await seed_doctor(store, days=2)
    start, end = day_range(doctor)
    me = doctor_actor(doctor)
    await commands.block_range(store, me, BlockRange(doctor.id, start, end, "flu"))
    slot = doctor.slots[0].id
    await commands.unblock(store, me, Unblock(slot))
    await commands.block(store, me, Block(slot))
    dashboard = await reads.dashboard(store, doctor.id, doctor.start)
    assert slot not in {b.slot_id for b in dashboard.blocks}
    assert len(dashboard.blocks) == 19


def every_day(start: time, end: time) -> list[WeeklyBlock]:
    return [WeeklyBlock(d, start, end) for d in range(1, 8)]


async def test_the_preview_names_exactly_what_the_save_strands(store: Store) -> None:
    """Booked and held appointments the new hours drop, with the patients' names; the save
    then reports the same slots as conflicts."""
    doctor = await seed_doctor(store)
    booked, held = await occupy(store, doctor)  # 08:00 and 09:00 on the first day
    me = doctor_actor(doctor)
    same = PreviewSchedule(doctor.id, every_day(time(8), time(18)), horizon_days=9)
    assert (await reads.schedule_preview(store, same)).total == 0

    # Mornings from 09:00: the 08:00 booking is stranded, the 09:00 hold is not.
    later = PreviewSchedule(doctor.id, every_day(time(9), time(18)), horizon_days=9)
    preview = await reads.schedule_preview(store, later)
    assert [(a.slot_id, a.patient_name, a.status.value) for a in preview.conflicts] == [
        (booked, "Alice Martin", "booked")
    ]
    # The first day off: both are stranded, the hold too.
    off = PreviewSchedule(
        doctor.id, every_day(time(8), time(18)), [DayOverride(doctor.start)], horizon_days=9
    )
    preview = await reads.schedule_preview(store, off)
    assert preview.total == 2
    assert [(a.slot_id, a.patient_name) for a in preview.conflicts] == [
        (booked, "Alice Martin"),
        (held, "Bob Chen"),
    ]
    # Nothing was written by the previews; the save agrees with the last one.
    assert (await reads.dashboard(store, doctor.id, doctor.start)).conflicts == []
    saved = await commands.set_schedule(
        store,
        me,
        SetSchedule(
            doctor.id, every_day(time(8), time(18)), [DayOverride(doctor.start)], horizon_days=9
        ),
    )
    assert sorted(saved.reply.conflicts) == [booked, held]


async def test_a_blocked_range_is_one_transaction_of_one_write(database_url: str) -> None:
    """Every statement a range block sends, pinned: the doctor's rules read before (the
    bound), then one transaction: the lock, the runner's first read, the one UPDATE of
    every slot, the one change record."""
    names = {v: k for k, v in vars(sql).items() if k.isupper() and isinstance(v, str)}
    async with open_store(database_url, min_size=1, max_size=1) as store:
        doctor = await seed_doctor(store, days=2)
        sent: list[str] = []
        async with store.pool.acquire() as conn:
            conn.add_query_logger(lambda q: sent.append(names.get(q.query, q.query.strip())))
        start, end = day_range(doctor)
        await commands.block_range(
            store, doctor_actor(doctor), BlockRange(doctor.id, start, end, "x", "key-1")
        )
        body = [s for s in sent if not s.startswith(("SELECT pg_advisory_unlock_all", "RESET"))]
        assert body == [
            *("DOCTOR_GET", "BEGIN;", "DOCTOR_LOCK", "COMMAND_PRELUDE"),
            *("SLOTS_BLOCK_RANGE", "RECORD", "COMMIT;"),
        ]
