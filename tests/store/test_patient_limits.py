"""What one patient may claim: caps on active future appointments, and the re-hold cool-down.

Issue 10's attack: one patient token booked all 12 target slots of a doctor directly
(only holds were capped), and releasing a hold then holding the same slot again kept it
forever. The store now refuses both under the locks, in the command's own transaction
(`steps.claimable`, counted by the first read, `sql.SLOT_PRELUDE`), so no front door and
no number of instances can get around it: these tests drive the store directly, the
races over several pooled connections; tests/server/test_booking_limits.py shows both
front doors sharing the rule.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from protocol.errors import ErrorCode
from protocol.messages import AppointmentView, Book, Booked, Cancel, Release, Reschedule
from protocol.vocabulary import AppointmentStatus, Role
from store import commands
from store.constants import LOCK_NS_PATIENT
from store.errors import AppointmentLimit, Cooldown, StoreError
from store.pool import Store
from store.tx import Actor, Limits
from testkit.engine import (
    NOW,
    TTL,
    Calendar,
    appointment_row,
    book,
    db_state,
    hold,
    open_calendar,
    patient,
    slot_row,
)

COOLDOWN = timedelta(minutes=5)
# The server's defaults (server/settings.py): two with one doctor, six in all.
DEFAULTS = Limits(per_doctor=2, total=6, cooldown=COOLDOWN)
ADMIN = Actor("admin-1", Role.ADMIN)


async def calendars(store: Store, n: int) -> list[Calendar]:
    return [await open_calendar(store, name=f"Dr. {i}", days=2) for i in range(n)]


async def active_of(db: asyncpg.Connection, who: str) -> list[tuple[int, str]]:
    rows = await db.fetch(
        "SELECT doctor_id, status FROM appointments WHERE patient_id = $1"
        " AND status <> 'cancelled' ORDER BY id",
        who,
    )
    return [(r["doctor_id"], r["status"]) for r in rows]


# ---- the caps -------------------------------------------------------------------------------


async def test_one_patient_cannot_book_a_doctors_twelve_slots(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    greedy, real = patient("p-greedy"), patient("p-real")
    targets = calendar.slots[:12]

    booked: list[AppointmentView] = []
    refusals: list[StoreError] = []
    for slot in targets:
        try:
            booked.append(await book(store, greedy, slot, limits=DEFAULTS))
        except StoreError as exc:
            refusals.append(exc)

    assert [a.slot_id for a in booked] == [targets[0].id, targets[1].id]
    assert len(refusals) == 10
    assert {type(e) for e in refusals} == {AppointmentLimit}
    assert {e.code for e in refusals} == {ErrorCode.APPOINTMENT_LIMIT}
    assert "2 upcoming appointments" in refusals[0].message
    # Every refused slot is still free, and a real patient gets the first one they try.
    for slot in targets[2:]:
        assert (await slot_row(db, slot.id))["status"] == "free"
    assert (await book(store, real, targets[2], limits=DEFAULTS)).patient_id == "p-real"
    assert await active_of(db, "p-greedy") == [(calendar.id, "booked")] * 2


async def test_a_refusal_at_the_cap_writes_nothing(store: Store, db: asyncpg.Connection) -> None:
    calendar = await open_calendar(store)
    ann = patient("p-ann")
    await book(store, ann, calendar.slots[0], limits=DEFAULTS)
    await hold(store, ann, calendar.slots[1], limits=DEFAULTS)
    state = await db_state(db)

    with pytest.raises(AppointmentLimit):
        await book(store, ann, calendar.slots[2], limits=DEFAULTS)
    with pytest.raises(AppointmentLimit):
        await hold(store, ann, calendar.slots[2], limits=DEFAULTS)
    with pytest.raises(AppointmentLimit):  # a key changes nothing: refusals store no reply
        await commands.book(
            store,
            ann,
            Book(slot_id=calendar.slots[3].id, idempotency_key="k-1"),
            limits=DEFAULTS,
            now=NOW,
        )

    assert await db_state(db) == state


async def test_the_total_counts_every_doctor(store: Store, db: asyncpg.Connection) -> None:
    a, b, c = await calendars(store, 3)
    limits = Limits(per_doctor=2, total=3, cooldown=COOLDOWN)
    ann = patient("p-ann")
    first = await book(store, ann, a.slots[0], limits=limits)
    await book(store, ann, a.slots[1], limits=limits)
    await hold(store, ann, b.slots[0], limits=limits)

    # Dr. B has room (one of two) and so has Dr. C (none), but Ann has three in all.
    with pytest.raises(AppointmentLimit) as caught:
        await book(store, ann, b.slots[1], limits=limits)
    assert "3 upcoming appointments" in caught.value.message
    with pytest.raises(AppointmentLimit):
        await hold(store, ann, c.slots[0], limits=limits)
    # Another patient is not held back by Ann's.
    await book(store, patient("p-bob"), c.slots[0], limits=limits)

    # A cancellation makes room again.
    await commands.cancel(store, ann, Cancel(first.id, "plans changed"), now=NOW)
    assert (await book(store, ann, c.slots[1], limits=limits)).status is AppointmentStatus.BOOKED


async def test_holds_count_and_confirming_one_does_not_count_it_twice(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    ann = patient("p-ann")
    first = await hold(store, ann, calendar.slots[0], limits=DEFAULTS)
    second = await hold(store, ann, calendar.slots[1], limits=DEFAULTS)
    with pytest.raises(AppointmentLimit):  # two holds are two appointments with Dr. Engine
        await book(store, ann, calendar.slots[2], limits=DEFAULTS)

    for held in (first, second):
        outcome = await commands.book(store, ann, Book(hold_id=held.id), limits=DEFAULTS, now=NOW)
        assert isinstance(outcome.reply, Booked)
        assert outcome.reply.appointment.status is AppointmentStatus.BOOKED

    assert await active_of(db, "p-ann") == [(calendar.id, "booked")] * 2
    with pytest.raises(AppointmentLimit):
        await hold(store, ann, calendar.slots[2], limits=DEFAULTS)


@pytest.mark.parametrize("gone", ["cancelled", "released", "lapsed", "started"])
async def test_only_active_future_appointments_count(
    store: Store, db: asyncpg.Connection, gone: str
) -> None:
    calendar = await open_calendar(store)
    limits = Limits(per_doctor=1, total=1, cooldown=COOLDOWN)
    ann = patient("p-ann")
    first_slot = calendar.at(0, 8)  # today 08:00, two hours after NOW
    later = calendar.at(1, 9)
    if gone in ("released", "lapsed"):
        first = await hold(store, ann, first_slot, limits=limits)
    else:
        first = await book(store, ann, first_slot, limits=limits)
    with pytest.raises(AppointmentLimit):
        await book(store, ann, later, limits=limits)

    now = NOW
    if gone == "cancelled":
        await commands.cancel(store, ann, Cancel(first.id, "plans changed"), now=now)
    elif gone == "released":
        await commands.release(store, ann, Release(first.id), now=now)
    elif gone == "lapsed":
        now = NOW + TTL  # not swept: counted out because its time is up
    else:
        now = first_slot.start + timedelta(minutes=1)  # still booked, but it has begun

    taken = await book(store, ann, later, limits=limits, now=now)
    assert taken.status is AppointmentStatus.BOOKED


async def test_an_admin_is_held_to_the_patients_cap_when_moving_them(
    store: Store, db: asyncpg.Connection
) -> None:
    """The caps are the patient's, whoever moves the appointment (only a move to another
    doctor can add to a count)."""
    here, there = await calendars(store, 2)
    limits = Limits(per_doctor=1, total=6, cooldown=COOLDOWN)
    ann = patient("p-ann")
    mine = await book(store, ann, here.slots[0], limits=limits)
    await book(store, ann, there.slots[0], limits=limits)

    for who in (ann, ADMIN):
        with pytest.raises(AppointmentLimit):
            await commands.reschedule(
                store, who, Reschedule(mine.id, there.slots[1].id), limits=limits, now=NOW
            )
    assert (await appointment_row(db, mine.id))["status"] == "booked"
    assert (await slot_row(db, there.slots[1].id))["status"] == "free"


async def test_a_patient_at_the_caps_can_still_reschedule(
    store: Store, db: asyncpg.Connection
) -> None:
    here, there, third = await calendars(store, 3)
    limits = Limits(per_doctor=2, total=3, cooldown=COOLDOWN)
    ann = patient("p-ann")
    a = await book(store, ann, here.slots[0], limits=limits)
    await book(store, ann, here.slots[1], limits=limits)
    await book(store, ann, there.slots[0], limits=limits)  # at both caps with Dr. 0, and in all

    # Within one doctor: one out, one in.
    moved = await commands.reschedule(
        store, ann, Reschedule(a.id, here.slots[5].id), limits=limits, now=NOW
    )
    # To a doctor with room: the total does not change either.
    moved = await commands.reschedule(
        store,
        ann,
        Reschedule(moved.reply.appointment.id, third.slots[0].id),
        limits=limits,
        now=NOW,
    )
    assert moved.reply.appointment.doctor_id == third.id
    assert sorted(await active_of(db, "p-ann")) == sorted(
        [(here.id, "booked"), (there.id, "booked"), (third.id, "booked")]
    )
    # Still at the total: a new claim anywhere is refused.
    with pytest.raises(AppointmentLimit):
        await book(store, ann, there.slots[1], limits=limits)


# ---- the cool-down ----------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["released", "lapsed and swept", "lapsed, not yet swept"])
async def test_a_slot_given_back_is_barred_to_its_patient_for_the_cooldown(
    store: Store, db: asyncpg.Connection, ending: str
) -> None:
    calendar = await open_calendar(store)
    slot = calendar.slots[0]
    ann = patient("p-ann")
    held = await hold(store, ann, slot, limits=DEFAULTS)
    if ending == "released":
        ended = NOW + timedelta(seconds=30)
        await commands.release(store, ann, Release(held.id), now=ended)
        at = ended + timedelta(seconds=1)
    elif ending == "lapsed and swept":
        ended = NOW + TTL
        await commands.expire_holds(store, now=ended + timedelta(seconds=20))  # a late sweep
        at = ended + timedelta(seconds=21)
    else:
        ended = NOW + TTL
        at = ended  # the hold expires in the very command that tries again

    with pytest.raises(Cooldown) as caught:
        await hold(store, ann, slot, limits=DEFAULTS, now=at)
    assert caught.value.code is ErrorCode.COOLDOWN
    # The cool-down runs from when the hold ended (its expiry, not the sweep's time).
    assert caught.value.retry_after == ended + COOLDOWN - at
    with pytest.raises(Cooldown):  # nor booked directly
        await book(store, ann, slot, limits=DEFAULTS, now=at)
    with pytest.raises(Cooldown):
        await hold(store, ann, slot, limits=DEFAULTS, now=ended + COOLDOWN - timedelta(seconds=1))
    # The refusals kept the expiry (it committed on its own) and took nothing.
    assert (await appointment_row(db, held.id))["status"] == "cancelled"
    assert (await slot_row(db, slot.id))["status"] == "free"

    again = await hold(store, ann, slot, limits=DEFAULTS, now=ended + COOLDOWN)
    assert again.status is AppointmentStatus.PENDING


async def test_the_cooldown_bars_only_that_patient_and_that_slot(
    store: Store, db: asyncpg.Connection
) -> None:
    calendar = await open_calendar(store)
    ann, bob = patient("p-ann"), patient("p-bob")
    held = await hold(store, ann, calendar.slots[0], limits=DEFAULTS)
    await commands.release(store, ann, Release(held.id), now=NOW)

    assert (await hold(store, ann, calendar.slots[1], limits=DEFAULTS)).patient_id == "p-ann"
    assert (await hold(store, bob, calendar.slots[0], limits=DEFAULTS)).patient_id == "p-bob"


async def test_a_cancelled_booking_does_not_start_a_cooldown(
    store: Store, db: asyncpg.Connection
) -> None:
    """Only holds cool down: cancelling a booking (a confirmed hold included) and booking
    the same slot again is an ordinary change of mind."""
    calendar = await open_calendar(store)
    ann = patient("p-ann")
    direct = await book(store, ann, calendar.slots[0], limits=DEFAULTS)
    held = await hold(store, ann, calendar.slots[1], limits=DEFAULTS)
    await commands.book(store, ann, Book(hold_id=held.id), limits=DEFAULTS, now=NOW)
    for appointment in (direct, held):
        await commands.cancel(store, ann, Cancel(appointment.id, "oops"), now=NOW)

    assert (await book(store, ann, calendar.slots[0], limits=DEFAULTS)).patient_id == "p-ann"
    assert (await hold(store, ann, calendar.slots[1], limits=DEFAULTS)).patient_id == "p-ann"


async def test_without_limits_nothing_is_capped_or_cooled(
    store: Store, db: asyncpg.Connection
) -> None:
    """`limits=None` is for seeding and benchmarks: the store adds no rule of its own."""
    calendar = await open_calendar(store)
    ann = patient("p-ann")
    for slot in calendar.slots[:8]:
        await book(store, ann, slot)
    held = await hold(store, ann, calendar.slots[8])
    await commands.release(store, ann, Release(held.id), now=NOW)
    assert (await hold(store, ann, calendar.slots[8])).status is AppointmentStatus.PENDING


# ---- races ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [("book", "book"), ("book", "hold")])
async def test_two_claims_at_once_with_two_doctors_cannot_beat_the_total(
    store: Store, db: asyncpg.Connection, first: str, second: str
) -> None:
    """Each claim takes a different doctor's lock, so only the patient's lock keeps them from
    both counting before either inserts. Make both wait on it, then let them go."""
    a, b = await calendars(store, 2)
    limits = Limits(per_doctor=2, total=1, cooldown=COOLDOWN)
    ann = patient("p-ann")
    claim = {
        "book": lambda c: book(store, ann, c.slots[0], limits=limits),
        "hold": lambda c: hold(store, ann, c.slots[0], limits=limits),
    }
    blocker = await db.fetchval("SELECT pg_backend_pid()")
    waiting = 0
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", LOCK_NS_PATIENT, "p-ann")
        tasks = [
            asyncio.create_task(claim[first](a)),
            asyncio.create_task(claim[second](b)),
        ]
        for _ in range(300):
            waiting = await db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"
                " AND NOT granted AND pid <> $2",
                LOCK_NS_PATIENT,
                blocker,
            )
            if waiting == 2 or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert waiting == 2, f"both claims should wait for the patient's lock: {results}"
    won = [r for r in results if isinstance(r, AppointmentView)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1, results
    assert [type(e) for e in lost] == [AppointmentLimit]
    assert len(await active_of(db, "p-ann")) == 1


async def test_a_burst_of_bookings_on_many_doctors_stops_at_the_caps(
    store: Store, db: asyncpg.Connection
) -> None:
    """Ten bookings at once over the pool, two per doctor on five doctors: the caps hold."""
    cals = await calendars(store, 5)
    limits = Limits(per_doctor=1, total=3, cooldown=COOLDOWN)
    ann = patient("p-ann")

    results = await asyncio.gather(
        *(book(store, ann, c.slots[i], limits=limits) for c in cals for i in range(2)),
        return_exceptions=True,
    )

    won = [r for r in results if isinstance(r, AppointmentView)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 3, results
    assert all(isinstance(e, AppointmentLimit) for e in lost), lost
    doctors = [doctor for doctor, _ in await active_of(db, "p-ann")]
    assert len(doctors) == 3
    assert len(set(doctors)) == 3  # never two with one doctor
