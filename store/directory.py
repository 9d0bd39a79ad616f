"""The doctor directory: creating, correcting and retiring doctors, and bulk imports.

Each of these is a command like a booking (`runner.run`): under the doctor's lock,
one version and one change record per doctor, so a rename or a retirement is in the
audit trail and reaches every watcher as a `delta` carrying the new entry, exactly
as a booking does. (`store.doctors` is the older, lock-free path used for seeding.)

Retiring keeps history and stops offering: the doctor's weekly hours and overrides
are cleared, so their free and blocked slots close (a delta's `removed`) and the
horizon sweep opens none again, on this version or the one before it; live holds are
released (the patients are told, as for any release); booked appointments stay, and
their slots are flagged as conflicts on the doctor's dashboard for the clinic to
reschedule or cancel with a reason the patient will read. Cancelling them here would
silently break a promise made to a patient; keeping them leaves the decision, and the
patient's notice, to a person.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg

from protocol.messages import CreateDoctor, DoctorUpdated, DoctorView, RetireDoctor, UpdateDoctor
from store import schedule, sql, steps
from store.errors import Busy, Forbidden, Invalid, InvalidTransition, NotFound
from store.pool import Store
from store.runner import run, run_command
from store.tx import Actor, Outcome, Tx, resolve_now

log = logging.getLogger(__name__)

MAX_NAME = 200
MAX_SPECIALTY = 200
MAX_EXTERNAL_ID = 128
# The schema this module needs: 0005_doctor_directory.
SCHEMA_VERSION = 5


# ---- what a directory entry may hold ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One doctor as a clinic's staff system knows them: a row of an import or export.

    `retired` None means "leave as it is" (a file without the column).
    """

    external_id: str
    name: str
    specialty: str
    timezone: str
    retired: bool | None = None


def checked(entry: Entry) -> Entry:
    """The entry with its text trimmed, or `Invalid` naming the first bad field."""
    trimmed = replace(
        entry,
        external_id=entry.external_id.strip(),
        name=entry.name.strip(),
        specialty=entry.specialty.strip(),
        timezone=entry.timezone.strip(),
    )
    _text("external_id", trimmed.external_id, 1, MAX_EXTERNAL_ID)
    _text("name", trimmed.name, 1, MAX_NAME)
    _text("specialty", trimmed.specialty, 0, MAX_SPECIALTY)
    check_zone(trimmed.timezone)
    return trimmed


def check_zone(name: str) -> None:
    try:
        schedule.zone(name)
    except ValueError:
        raise Invalid(
            f"timezone: {name!r} is not an IANA time zone name (e.g. Europe/Paris)"
        ) from None


def _text(field: str, value: str, least: int, most: int) -> None:
    if "\x00" in value:
        raise Invalid(f"{field}: must not contain NUL")
    if len(value) < least:
        raise Invalid(f"{field}: must not be empty")
    if len(value) > most:
        raise Invalid(f"{field}: at most {most} characters")


def view(row: asyncpg.Record, *, private: bool = True) -> DoctorView:
    """The entry as admins see it, or (`private=False`) as any watcher may: without the
    staff system's id."""
    return DoctorView(
        id=row["id"],
        name=row["name"],
        specialty=row["specialty"],
        timezone=row["timezone"],
        external_id=row["external_id"] if private else None,
        retired_at=row["retired_at"],
        min_notice_minutes=row["min_notice_minutes"],
        horizon_days=row["horizon_days"],
    )


def _require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise Forbidden("only an admin manages the doctor directory")


# ---- the commands ------------------------------------------------------------------------------


async def create(
    store: Store, actor: Actor, msg: CreateDoctor, *, now: datetime | None = None
) -> Outcome[DoctorUpdated]:
    """A new doctor, version 1, with no hours yet (`set_schedule` opens slots)."""
    _require_admin(actor)
    entry = _of_message(msg.name, msg.specialty, msg.timezone)
    (doctor_id,) = await _new_ids(store, 1)

    async def work(tx: Tx) -> DoctorUpdated:
        row = await _insert(tx, doctor_id, entry, msg.external_id)
        return DoctorUpdated(view(row), 1)

    return await run_command(store, [doctor_id], actor, msg, now, work)


async def update(
    store: Store, actor: Actor, msg: UpdateDoctor, *, now: datetime | None = None
) -> Outcome[DoctorUpdated]:
    """Correct the fields given; a new zone re-lays the weekly hours in it."""
    _require_admin(actor)
    if msg.timezone is not None:
        check_zone(msg.timezone)
    for field, value, most in (
        ("name", msg.name, MAX_NAME),
        ("specialty", msg.specialty, MAX_SPECIALTY),
    ):
        if value is not None:
            _text(field, value.strip(), 1 if field == "name" else 0, most)

    async def work(tx: Tx) -> DoctorUpdated:
        row = await _locked(tx, msg.doctor_id)
        external_id = msg.external_id or row["external_id"]
        entry = Entry(
            external_id=external_id or "",
            name=(msg.name or row["name"]).strip(),
            specialty=(msg.specialty if msg.specialty is not None else row["specialty"]).strip(),
            timezone=msg.timezone or row["timezone"],
        )
        row, changed = await _set(tx, row, entry, external_id)
        return DoctorUpdated(view(row), row["version"] + (1 if changed else 0))

    return await run_command(store, [msg.doctor_id], actor, msg, now, work)


async def retire(
    store: Store, actor: Actor, msg: RetireDoctor, *, now: datetime | None = None
) -> Outcome[DoctorUpdated]:
    """Stop offering the doctor, keeping every appointment and record (module docstring)."""
    _require_admin(actor)

    async def work(tx: Tx) -> DoctorUpdated:
        row = await _locked(tx, msg.doctor_id)
        if row["retired_at"] is not None:
            raise InvalidTransition(f"doctor {msg.doctor_id} is retired already")
        row = await _retire(tx, row)
        return DoctorUpdated(view(row), row["version"] + 1)

    return await run_command(store, [msg.doctor_id], actor, msg, now, work)


# ---- imports and exports -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Imported:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    retired: int = 0

    def __str__(self) -> str:
        return (
            f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged"
            f", {self.retired} retired"
        )


async def check_schema(store: Store) -> None:
    """Refuse to run against a database `slotcast migrate` has not brought this far."""
    migrated = await store.fetchval(sql.SCHEMA_MIGRATED)
    version = await store.fetchval(sql.SCHEMA_VERSION) if migrated else 0
    if version < SCHEMA_VERSION:
        raise Invalid(
            f"the database schema is at version {version}; the doctor directory needs"
            f" {SCHEMA_VERSION}: run `slotcast migrate` first"
        )


async def import_entries(
    store: Store, entries: Sequence[Entry], *, actor: Actor, now: datetime | None = None
) -> Imported:
    """Upsert every entry by `external_id`, all or nothing, in one transaction.

    Entries must be `checked` and their ids distinct. A doctor whose entry matches the
    file is left alone (no version, no change record), so a second run of the same
    file changes nothing. `retired` True retires a doctor; False on a retired one is
    refused (reinstating is not supported: create a new entry instead).
    """
    _require_admin(actor)
    ids = [e.external_id for e in entries]
    if len(set(ids)) != len(ids):
        raise Invalid("external_id: the same id appears twice")
    known = {r["external_id"]: r["id"] for r in await store.fetch(sql.DOCTORS_BY_EXTERNAL_ID, ids)}
    fresh = [e for e in entries if e.external_id not in known]
    new_ids = dict(
        zip((e.external_id for e in fresh), await _new_ids(store, len(fresh)), strict=True)
    )
    counts = {"created": 0, "updated": 0, "unchanged": 0, "retired": 0}

    async def work(tx: Tx) -> None:
        counts.update(created=0, updated=0, unchanged=0, retired=0)
        rows = {
            r["external_id"]: r
            for r in await tx.conn.fetch(sql.DOCTORS_BY_EXTERNAL_ID_FOR_UPDATE, ids)
        }
        if {k: r["id"] for k, r in rows.items()} != known:
            raise Busy("the directory changed during the import: run it again")
        for entry in entries:
            row = rows.get(entry.external_id)
            if row is None:
                row = await _insert(tx, new_ids[entry.external_id], entry, entry.external_id)
                counts["created"] += 1
                if entry.retired:
                    await _retire(tx, row)
                    counts["retired"] += 1
                continue
            if entry.retired is False and row["retired_at"] is not None:
                raise InvalidTransition(
                    f"external_id {entry.external_id}: doctor {row['id']} is retired;"
                    " reinstating is not supported"
                )
            row, changed = await _set(tx, row, entry, entry.external_id)
            if entry.retired and row["retired_at"] is None:
                await _retire(tx, row)
                counts["retired"] += 1
            elif changed:
                counts["updated"] += 1
            else:
                counts["unchanged"] += 1

    await run(
        store,
        doctors=[*known.values(), *new_ids.values()],
        actor=actor,
        now=resolve_now(now),
        work=work,
    )
    return Imported(**counts)


async def export_entries(store: Store, *, include_retired: bool = False) -> list[Entry]:
    """The directory as an import reads it. Doctors without an `external_id` cannot be
    matched by an import, so they are left out (and logged: give them one)."""
    entries = []
    for row in await store.fetch(sql.DOCTORS_EXPORT, include_retired):
        if row["external_id"] is None:
            log.warning(
                "doctor %s (%s) has no external_id and is left out of the export",
                row["id"],
                row["name"],
            )
            continue
        entries.append(
            Entry(
                external_id=row["external_id"],
                name=row["name"],
                specialty=row["specialty"],
                timezone=row["timezone"],
                retired=(row["retired_at"] is not None) if include_retired else None,
            )
        )
    return entries


# ---- steps under the lock ----------------------------------------------------------------------


def _of_message(name: str, specialty: str, timezone: str) -> Entry:
    _text("name", name.strip(), 1, MAX_NAME)
    _text("specialty", specialty.strip(), 0, MAX_SPECIALTY)
    check_zone(timezone)
    return Entry(external_id="", name=name.strip(), specialty=specialty.strip(), timezone=timezone)


async def _new_ids(store: Store, count: int) -> list[int]:
    if count == 0:
        return []
    return [r["id"] for r in await store.fetch(sql.DOCTOR_NEW_IDS, count)]


async def _locked(tx: Tx, doctor_id: int) -> asyncpg.Record:
    row: asyncpg.Record | None = await tx.conn.fetchrow(sql.DOCTOR_ENTRY_FOR_UPDATE, doctor_id)
    if row is None:
        raise NotFound(f"no doctor {doctor_id}")
    return row


async def _insert(tx: Tx, doctor_id: int, entry: Entry, external_id: str | None) -> asyncpg.Record:
    row: asyncpg.Record = await tx.conn.fetchrow(
        sql.DOCTOR_CREATE, doctor_id, entry.name, entry.specialty, entry.timezone, external_id
    )
    # Without its cursor row the relay would never see this doctor's changes.
    await tx.conn.execute(sql.RELAY_CURSOR_CREATE, doctor_id)
    tx.created.add(doctor_id)
    tx.doctor(view(row, private=False), "doctor.created")
    return row


async def _set(
    tx: Tx, row: asyncpg.Record, entry: Entry, external_id: str | None
) -> tuple[asyncpg.Record, bool]:
    """Write the entry if it differs; a new zone re-lays the hours (not for the retired).

    `external_id` comes apart from the entry: a doctor created through the API may have
    none (NULL), which an `Entry` cannot say."""
    same = (row["name"], row["specialty"], row["timezone"], row["external_id"]) == (
        entry.name,
        entry.specialty,
        entry.timezone,
        external_id,
    )
    if same:
        return row, False
    updated: asyncpg.Record = await tx.conn.fetchrow(
        sql.DOCTOR_ENTRY_SET, row["id"], entry.name, entry.specialty, entry.timezone, external_id
    )
    if updated["timezone"] != row["timezone"] and updated["retired_at"] is None:
        await steps.rematerialize(tx, row["id"])
    tx.doctor(view(updated, private=False), "doctor.updated")
    return updated, True


async def _retire(tx: Tx, row: asyncpg.Record) -> asyncpg.Record:
    doctor_id = row["id"]
    for hold in await tx.conn.fetch(sql.HOLDS_OF_DOCTOR, doctor_id):
        await steps.cancel_appointment(tx, doctor_id, hold["id"], "doctor retired", "hold.released")
    await tx.conn.execute(sql.SCHEDULE_CLEAR, doctor_id)
    await tx.conn.execute(sql.OVERRIDES_CLEAR, doctor_id)
    await steps.rematerialize(tx, doctor_id)  # free slots close, booked ones are conflicts
    retired: asyncpg.Record = await tx.conn.fetchrow(sql.DOCTOR_RETIRE, doctor_id, tx.now)
    tx.doctor(view(retired, private=False), "doctor.retired")
    return retired
