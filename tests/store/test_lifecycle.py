"""Data lifecycle: what pruning deletes and when, and a patient's erasure.

The change log is append-only except through the one door its trigger opens to the
store's own maintenance (`store.lifecycle`); these tests hold both sides of that
door: what passes (pruning old rows, pseudonymising a patient, no version lost) and
what still does not (any other DELETE or UPDATE, or an erasure that touches more
than who a row names).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import asyncpg
import pytest

from protocol.messages import Book, Cancel, Hold, Release
from protocol.vocabulary import Role
from server.service import Scheduling
from server.settings import Settings
from store import commands
from store.constants import LOCK_NS_PRUNE
from store.errors import StoreError
from store.lifecycle import PSEUDONYM_PREFIX, Retention, erase_patient, prune
from store.pool import Store
from store.tx import Actor, resolve_now
from testkit.fixtures import SeededDoctor, seed_doctor

ALICE = Actor("alice", Role.PATIENT)
BOB = Actor("bob", Role.PATIENT)
DOCTOR_ACTOR = Actor("1", Role.DOCTOR)
DAY = timedelta(days=1)


async def history(store: Store, doctor: SeededDoctor) -> datetime:
    """Alice books (with a key), holds and releases, and her doctor cancels one of hers;
    Bob books. Returns when it happened."""
    now = resolve_now(None)
    slots = doctor.slots
    booked = await commands.book(
        store, ALICE, Book(slot_id=slots[0].id, idempotency_key="k-1"), limits=None, now=now
    )
    held = await commands.hold(
        store,
        ALICE,
        Hold(slot_id=slots[1].id),
        ttl=timedelta(minutes=2),
        max_holds=3,
        limits=None,
        now=now,
    )
    await commands.release(store, ALICE, Release(appointment_id=held.reply.appointment.id), now=now)
    second = await commands.book(store, ALICE, Book(slot_id=slots[2].id), limits=None, now=now)
    await commands.cancel(
        store, ALICE, Cancel(appointment_id=second.reply.appointment.id, reason="moving"), now=now
    )
    await commands.book(
        store, BOB, Book(slot_id=slots[3].id, idempotency_key="k-1"), limits=None, now=now
    )
    assert booked.reply.appointment.patient_id == "alice"
    return now


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    return {
        "changes": await db.fetchval("SELECT count(*) FROM changes"),
        "idempotency_keys": await db.fetchval("SELECT count(*) FROM idempotency_keys"),
        "appointments": await db.fetchval("SELECT count(*) FROM appointments"),
    }


async def test_prune_deletes_each_kind_only_past_its_retention(
    store: Store, db: asyncpg.Connection, doctor: SeededDoctor
) -> None:
    now = await history(store, doctor)
    before = await counts(db)
    retention = Retention(batch=2, cooldown=timedelta(minutes=5))

    nothing = await prune(store, retention, now=now + timedelta(hours=1))
    assert nothing.total == 0
    assert await counts(db) == before

    # A day on: stored replies and the released hold's row go; the audit stays whole.
    day = await prune(store, retention, now=now + DAY + timedelta(minutes=1))
    assert day.counts == {
        "changes": 0,
        "idempotency_keys": 2,
        "ended_holds": 1,
        "webhook_attempts": 0,
    }
    after_day = await counts(db)
    assert after_day == {
        **before,
        "idempotency_keys": 0,
        "appointments": before["appointments"] - 1,
    }
    # Bookings and cancellations are history, not ended holds: they stay.
    statuses = await db.fetch("SELECT status, hold_expires_at FROM appointments ORDER BY id")
    assert [r["status"] for r in statuses] == ["booked", "cancelled", "booked"]

    # Past the audit period, the change log goes too, in batches of two.
    version = await db.fetchval("SELECT version FROM doctors WHERE id = $1", doctor.id)
    late = await prune(store, retention, now=now + timedelta(days=401))
    assert late.counts["changes"] == before["changes"]
    assert await db.fetchval("SELECT count(*) FROM changes") == 0
    # The doctor's version is untouched, and a client resuming from a pruned version is
    # sent a fresh snapshot rather than a partial replay.
    assert await db.fetchval("SELECT version FROM doctors WHERE id = $1", doctor.id) == version
    scheduling = Scheduling(store, Settings())
    assert await scheduling.missed(doctor.id, version - 2) is None
    assert await scheduling.missed(doctor.id, version) == []


async def test_prune_leaves_a_cooling_hold_and_waits_for_no_other_instance(
    store: Store, db: asyncpg.Connection, doctor: SeededDoctor
) -> None:
    now = await history(store, doctor)
    # The re-hold cool-down still needs the released hold: it outlives its retention.
    cooling = Retention(ended_holds=timedelta(0), cooldown=timedelta(days=2))
    assert (await prune(store, cooling, now=now + DAY)).counts["ended_holds"] == 0

    # Another instance prunes: this one gives the round up at once, deleting nothing.
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1::int4, 0)", LOCK_NS_PRUNE)
        busy = await prune(store, Retention(), now=now + timedelta(days=500))
    assert busy.busy
    assert busy.total == 0
    assert (await prune(store, Retention(), now=now + timedelta(days=500))).total > 0


async def test_the_change_log_still_refuses_every_other_delete_and_update(
    store: Store, db: asyncpg.Connection, doctor: SeededDoctor
) -> None:
    await history(store, doctor)
    assert await db.fetchval("SELECT count(*) FROM changes") > 0
    for statement in (
        "DELETE FROM changes",
        "UPDATE changes SET actor = 'x'",
        "TRUNCATE changes",
    ):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await db.execute(statement)
    # The erasure door rewrites who a row names, never what happened.
    async with db.transaction():
        await db.execute("SELECT set_config('slotcast.maintenance', 'erase', true)")
        await db.execute("UPDATE changes SET actor = 'x' WHERE version = 1")  # passes
        for statement in (
            "UPDATE changes SET public = '{}'",
            "UPDATE changes SET version = version + 100",
            "DELETE FROM changes",
        ):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                async with db.transaction():
                    await db.execute(statement)
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await db.execute("TRUNCATE changes")


async def test_erasure_pseudonymises_the_patient_everywhere_and_keeps_the_audit_whole(
    store: Store, db: asyncpg.Connection, doctor: SeededDoctor
) -> None:
    other = await seed_doctor(store, name="Dr. Other")
    now = await history(store, doctor)
    await commands.book(store, ALICE, Book(slot_id=other.slots[0].id), limits=None, now=now)
    # Her released hold's row is pruned first: the change log alone still names her there.
    await prune(store, Retention(), now=now + DAY + timedelta(minutes=10))
    bobs_before = await db.fetch("SELECT * FROM appointments WHERE patient_id = 'bob'")
    await commands.book(
        store, ALICE, Book(slot_id=doctor.slots[5].id, idempotency_key="k-2"), limits=None, now=now
    )
    log_before = await db.fetch(
        "SELECT doctor_id, version, kind, public, created_at FROM changes ORDER BY 1, 2"
    )

    erased = await erase_patient(store, "alice")

    assert sorted(erased.doctors) == sorted([doctor.id, other.id])
    assert erased.counts == {"appointments": 4, "changes": 7, "idempotency_keys": 1}
    # Nothing names her any more: not a row, not an actor, not a stored reply.
    for table in ("appointments", "changes", "idempotency_keys"):
        hits = await db.fetchval(
            f"SELECT count(*) FROM {table} t WHERE to_jsonb(t)::text ~ '\\malice\\M'"
        )
        assert hits == 0, table
    pseudonyms = await db.fetch(
        "SELECT DISTINCT patient_id FROM appointments WHERE patient_id <> 'bob'"
    )
    assert len(pseudonyms) == 1
    assert pseudonyms[0]["patient_id"].startswith(PSEUDONYM_PREFIX)
    pseudonym = pseudonyms[0]["patient_id"]
    assert (
        await db.fetchval("SELECT count(*) FROM changes WHERE actor = $1", f"patient:{pseudonym}")
        == 7
    )
    assert (
        await db.fetchval("SELECT cancelled_by FROM appointments WHERE cancel_reason = 'moving'")
        == f"patient:{pseudonym}"
    )
    # The audit chain: every row is still there, with its version, kind, slots and time.
    assert (
        await db.fetch(
            "SELECT doctor_id, version, kind, public, created_at FROM changes ORDER BY 1, 2"
        )
        == log_before
    )
    assert await db.fetch("SELECT * FROM appointments WHERE patient_id = 'bob'") == bobs_before

    again = await erase_patient(store, "alice")
    assert again.total == 0
    assert again.doctors == []


def test_retention_refuses_what_would_break_live_rooms_or_never_finish() -> None:
    with pytest.raises(StoreError, match="at least a day"):
        Retention(audit=timedelta(hours=23))
    with pytest.raises(StoreError, match="at least one row"):
        Retention(batch=0)


async def test_an_erasure_racing_the_patients_bookings_never_leaves_them_half_named(
    store: Store, db: asyncpg.Connection, doctor: SeededDoctor
) -> None:
    """Under the doctor's lock, each booking commits wholly before or wholly after the
    erasure: its appointment row and its change records name the same patient."""
    now = resolve_now(None)
    await commands.book(store, ALICE, Book(slot_id=doctor.slots[0].id), limits=None, now=now)

    async def booking(i: int) -> None:
        await commands.book(store, ALICE, Book(slot_id=doctor.slots[i].id), limits=None, now=now)

    await asyncio.gather(
        *(booking(i) for i in range(1, 6)), erase_patient(store, "alice"), booking(6)
    )

    rows = await db.fetch(
        """SELECT a.id, a.patient_id, e->>'patient_id' AS logged
           FROM appointments a
           JOIN changes c ON c.doctor_id = a.doctor_id
           CROSS JOIN LATERAL jsonb_array_elements(c.private->'appointments') AS e
           WHERE (e->>'id')::bigint = a.id"""
    )
    assert len(rows) == 7
    assert all(r["patient_id"] == r["logged"] for r in rows), rows
    assert any(r["patient_id"].startswith(PSEUDONYM_PREFIX) for r in rows)
