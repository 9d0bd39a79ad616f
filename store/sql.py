"""Every SQL statement the store runs, in one reviewed place.

Statements are plain strings with positional parameters; asyncpg prepares and
caches them per connection. Migrations (DDL) live in `migrations/*.sql`.
"""

from typing import Final

# ---- migrations -------------------------------------------------------------------------

MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""
# The oldest code schema that may run once a step is applied (store.migrate: contract
# steps); added here rather than in a migration, since the check reads it before any.
MIGRATIONS_MIN_CODE: Final = """
ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS min_code integer NOT NULL DEFAULT 0"""
MIGRATIONS_EXIST: Final = "SELECT to_regclass('schema_migrations') IS NOT NULL"
# Rows as json text: a database an older release migrated has no min_code column yet.
MIGRATIONS_READ: Final = """
SELECT array_agg(to_jsonb(m)::text ORDER BY m.version) FROM schema_migrations m"""
MIGRATION_RECORD: Final = """
INSERT INTO schema_migrations (version, name, checksum, min_code) VALUES ($1, $2, $3, $4)"""
SESSION_LOCK: Final = "SELECT pg_advisory_lock($1::int4, $2::int4)"
SESSION_UNLOCK: Final = "SELECT pg_advisory_unlock($1::int4, $2::int4)"

# ---- locking: always the first statement of a doctor's write transaction -----------------

DOCTOR_LOCK: Final = "SELECT pg_advisory_xact_lock($1::int4, $2::int4)"
# Patients have text ids; hashing is fine here: a collision only serializes two patients.
PATIENT_LOCK: Final = "SELECT pg_advisory_xact_lock($1::int4, hashtext($2))"
# Find the doctor and take the lock in one round trip, for commands that name a slot or an
# appointment. This statement's snapshot predates the lock, so it decides nothing on what
# it reads but the doctor_id, which never changes; everything else is read by later
# statements, whose snapshots (READ COMMITTED) see what the previous holder of the lock
# committed. No row: no such slot (appointment), and no lock taken.
# The one exception, for a command taking a slot (book, hold): a slot already booked when
# the statement began is `refused` without the lock, so a stampede's losers do not queue
# behind the winners on a hot doctor's lock only to be refused there. Booked is final for
# this request (it answers `slot_taken` as the check under the lock would: only a retired
# slot answers otherwise, and it is left to that check), unless the request's idempotency
# key ($3 subject, $4 key) was stored: a replay goes the whole way for its stored reply.
SLOT_DOCTOR_LOCK: Final = """
SELECT l.doctor_id, l.refused,
       CASE WHEN NOT l.refused THEN pg_advisory_xact_lock($1::int4, l.doctor_id) END AS locked
FROM (
    SELECT s.doctor_id, s.status = 'busy' AND s.retired_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM idempotency_keys k WHERE k.subject = $3 AND k.key = $4
    ) AS refused
    FROM slots s WHERE s.id = $2
    OFFSET 0
) AS l"""
APPOINTMENT_DOCTOR_LOCK: Final = """
SELECT a.doctor_id, pg_advisory_xact_lock($1::int4, a.doctor_id)
FROM appointments a WHERE a.id = $2"""
# A hold also takes the patient's lock, always after the doctor's (one order everywhere, so
# no deadlock): the subquery (kept apart by OFFSET 0, its volatile output never dropped)
# yields its row, doctor locked, before the outer select list takes the patient's lock.
# Refused without either lock as in SLOT_DOCTOR_LOCK ($5 subject, $6 key).
SLOT_DOCTOR_PATIENT_LOCK: Final = """
SELECT l.doctor_id, l.refused,
       CASE WHEN NOT l.refused THEN pg_advisory_xact_lock($3::int4, hashtext($4)) END
FROM (
    SELECT r.doctor_id, r.refused,
           CASE WHEN NOT r.refused THEN pg_advisory_xact_lock($1::int4, r.doctor_id) END
               AS locked
    FROM (
        SELECT s.doctor_id, s.status = 'busy' AND s.retired_at IS NULL AND NOT EXISTS (
            SELECT 1 FROM idempotency_keys k WHERE k.subject = $5 AND k.key = $6
        ) AS refused
        FROM slots s WHERE s.id = $2
        OFFSET 0
    ) AS r
    OFFSET 0
) AS l"""

# ---- the first read under the locks: one round trip for what every command needs -----------

# The doctors' versions (the next change of each is version + 1: only a command holding the
# doctor's lock bumps it, once, in RECORD), whether any of their holds has expired (only then
# does the command run HOLDS_EXPIRE), and the caller's idempotency record, if any.
# Keys belong to the role and subject together ($3 is "patient:17"): doctor "1" is not
# patient "1". A NULL key ($4) matches nothing.
COMMAND_PRELUDE: Final = """
SELECT
    (SELECT array_agg(d.id ORDER BY d.id) FROM doctors d WHERE d.id = ANY($1::int[]))
        AS doctor_ids,
    (SELECT array_agg(d.version ORDER BY d.id) FROM doctors d WHERE d.id = ANY($1::int[]))
        AS versions,
    EXISTS (
        SELECT 1 FROM appointments e
        WHERE e.doctor_id = ANY($1::int[]) AND e.status = 'pending' AND e.hold_expires_at <= $2
    ) AS expired_holds,
    k.command AS key_command, k.request AS key_request, k.response AS key_response
FROM (SELECT) AS one
LEFT JOIN idempotency_keys k ON k.subject = $3 AND k.key = $4"""
# For a booking or a hold, the same about the slot's doctor, plus what the command
# re-checks about its slot ($4), locked as SLOT_FOR_UPDATE locks it: the doctor's rules,
# whether another active appointment lies within the buffer (BUFFER_CLASH, only when the
# doctor has a buffer) and, for a hold ($9 = the hold limit), how many live holds the
# patient ($5) has (as PATIENT_QUOTA counts them). Under `store.tx.Limits` ($10 per
# doctor, $11 in total, $12 the cool-down; all NULL without limits), the patient's active
# future appointments with this doctor and in all (`active_here`, `active_total`), and
# until when the patient's own ended holds on this slot bar it (`cooled_until`), as
# PATIENT_QUOTA reads them. The doctor is the one SLOT_DOCTOR_LOCK (or
# SLOT_DOCTOR_PATIENT_LOCK) locked: a slot's doctor never changes. Valid only while
# nothing has been written: if holds expired, the command frees them first and reads the
# slot again.
#
# And, optimistically, the command's own write (APPOINTMENT_INSERT_TAKING_SLOT: patient $5,
# status $6, hold expiry $7, slot status $8), only when nothing else is to happen first
# (no stored key, no expired hold) and the slot passes every check of
# `steps.bookable_slot`, the hold limit and `steps.claimable`, computed here from the
# same row. The `taken_`
# columns return the inserted appointment. This only saves a round trip: the command still
# re-checks the returned row in Python, and any refusal there rolls back the whole
# transaction, insert included (no savepoint is open when no hold expired); a slot this
# statement skips goes the usual way. The exclusion constraint and the one-active-per-slot
# index guard this insert like any other. Notice and horizon are exact durations, as in
# Python (minutes, 24-hour days), never calendar days.
SLOT_PRELUDE: Final = """
WITH slot AS (
    SELECT s.id, s.doctor_id, s.starts_at, s.ends_at, s.status, s.conflict, s.retired_at,
           d.buffer_minutes, d.min_notice_minutes, d.horizon_days, d.version
    FROM slots s JOIN doctors d ON d.id = s.doctor_id
    WHERE s.id = $4
    FOR UPDATE OF s
), first AS (
    SELECT ARRAY[slot.doctor_id] AS doctor_ids, ARRAY[slot.version] AS versions,
        EXISTS (
            SELECT 1 FROM appointments e
            WHERE e.doctor_id = slot.doctor_id AND e.status = 'pending'
              AND e.hold_expires_at <= $1
        ) AS expired_holds,
        k.command AS key_command, k.request AS key_request, k.response AS key_response,
        slot.id, slot.doctor_id, slot.starts_at, slot.ends_at, slot.status, slot.conflict,
        slot.retired_at, slot.buffer_minutes, slot.min_notice_minutes, slot.horizon_days,
        slot.buffer_minutes > 0 AND EXISTS (
            SELECT 1 FROM appointments b
            WHERE b.doctor_id = slot.doctor_id AND b.status <> 'cancelled'
              AND tstzrange(b.starts_at, b.ends_at, '[)')
                  && tstzrange(slot.starts_at - make_interval(mins => slot.buffer_minutes),
                               slot.ends_at + make_interval(mins => slot.buffer_minutes), '[)')
        ) AS buffer_clash,
        CASE WHEN $9::bigint IS NOT NULL THEN (
            SELECT count(*) FROM appointments h
            WHERE h.patient_id = $5 AND h.status = 'pending' AND h.hold_expires_at > $1
        ) END AS active_holds,
        q.active_here, q.active_total,
        CASE WHEN $12::interval IS NOT NULL THEN (
            SELECT max(least(coalesce(c.cancelled_at, c.hold_expires_at), c.hold_expires_at))
                   + $12::interval
            FROM appointments c
            WHERE c.slot_id = slot.id AND c.patient_id = $5 AND c.hold_expires_at IS NOT NULL
              AND (c.status = 'cancelled' OR (c.status = 'pending' AND c.hold_expires_at <= $1))
        ) END AS cooled_until
    FROM slot
    LEFT JOIN idempotency_keys k ON k.subject = $2 AND k.key = $3
    LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE p.doctor_id = slot.doctor_id) AS active_here,
               count(*) AS active_total
        FROM appointments p
        WHERE p.patient_id = $5 AND p.starts_at > $1
          AND p.status IN ('pending', 'booked', 'arrived')
          AND (p.status <> 'pending' OR p.hold_expires_at > $1)
        HAVING $10::int IS NOT NULL
    ) AS q ON true
), taken AS (
    INSERT INTO appointments AS a
        (doctor_id, slot_id, patient_id, starts_at, ends_at, status, hold_expires_at,
         patient_name, visit_reason, patient_contact)
    SELECT f.doctor_id, f.id, $5, f.starts_at, f.ends_at, $6, $7, $13, $14, $15
    FROM first f
    WHERE f.key_command IS NULL AND NOT f.expired_holds
      AND f.retired_at IS NULL AND f.status = 'free'
      AND f.starts_at > $1
      AND f.starts_at >= $1 + make_interval(mins => f.min_notice_minutes)
      AND f.starts_at < $1 + make_interval(hours => 24 * f.horizon_days)
      AND NOT f.buffer_clash
      AND ($9::bigint IS NULL OR f.active_holds < $9)
      AND ($10::int IS NULL OR f.active_here < $10)
      AND ($11::int IS NULL OR f.active_total < $11)
      AND (f.cooled_until IS NULL OR f.cooled_until <= $1)
    RETURNING a.id, a.slot_id, a.doctor_id, a.patient_id, a.starts_at, a.ends_at, a.status,
              a.hold_expires_at, a.replaces_id, a.cancel_reason, a.cancelled_at, a.patient_name,
              a.visit_reason, a.patient_contact
), busy AS (
    UPDATE slots SET status = $8 WHERE id = (SELECT t.slot_id FROM taken t)
)
SELECT f.*,
    t.id AS taken_id, t.slot_id AS taken_slot_id, t.doctor_id AS taken_doctor_id,
    t.patient_id AS taken_patient_id, t.starts_at AS taken_starts_at,
    t.ends_at AS taken_ends_at, t.status AS taken_status,
    t.hold_expires_at AS taken_hold_expires_at, t.replaces_id AS taken_replaces_id,
    t.cancel_reason AS taken_cancel_reason, t.cancelled_at AS taken_cancelled_at,
    t.patient_name AS taken_patient_name, t.visit_reason AS taken_visit_reason,
    t.patient_contact AS taken_patient_contact
FROM first f
LEFT JOIN taken t ON true"""

# ---- doctors and schedules ----------------------------------------------------------------

# A doctor's directory entry (`store/directory.py` `view`) with the version.
DOCTOR_ENTRY_COLUMNS: Final = """
id, name, specialty, timezone, external_id, retired_at, version, min_notice_minutes, horizon_days"""
DOCTOR_INSERT: Final = """
INSERT INTO doctors (name, specialty, timezone, slot_minutes, horizon_days)
VALUES ($1, $2, $3, $4, $5)
RETURNING id"""
DOCTOR_GET: Final = """
SELECT id, name, specialty, timezone, slot_minutes, horizon_days, version,
       buffer_minutes, min_notice_minutes, retired_at
FROM doctors WHERE id = $1"""
# Returns the directory entry: the rules that decide the bookable window are public and
# ride on every watcher's delta (`DoctorView`).
DOCTOR_SET_RULES: Final = f"""
UPDATE doctors
SET slot_minutes = $2, buffer_minutes = $3, min_notice_minutes = $4, horizon_days = $5
WHERE id = $1
RETURNING {DOCTOR_ENTRY_COLUMNS}"""
# The doctors whose slots the horizon sweep keeps open: a retired doctor has none.
DOCTOR_IDS: Final = "SELECT id FROM doctors WHERE retired_at IS NULL ORDER BY id"
# The directory: active doctors, or ($4, admins) every doctor with the fields only
# admins see (the staff-system id, when retired).
DOCTOR_SEARCH: Final = """
SELECT id, name, specialty, timezone,
       CASE WHEN $4 THEN external_id END AS external_id,
       CASE WHEN $4 THEN retired_at END AS retired_at,
       min_notice_minutes, horizon_days
FROM doctors
WHERE ($4 OR retired_at IS NULL)
  AND ($1::text IS NULL
       OR strpos(lower(name), lower($1)) > 0
       OR strpos(lower(specialty), lower($1)) > 0)
ORDER BY name, id
LIMIT $2 OFFSET $3"""

# ---- the doctor directory (store/directory.py) ----------------------------------------------

# An id for a doctor about to be created, taken before the transaction so that the
# transaction can lock it first, as every command locks its doctors first.
DOCTOR_NEW_IDS: Final = """
SELECT nextval(pg_get_serial_sequence('doctors', 'id'))::int AS id
FROM generate_series(1, $1)"""
DOCTOR_CREATE: Final = f"""
INSERT INTO doctors (id, name, specialty, timezone, external_id) VALUES ($1, $2, $3, $4, $5)
RETURNING {DOCTOR_ENTRY_COLUMNS}"""
DOCTOR_ENTRY_FOR_UPDATE: Final = f"""
SELECT {DOCTOR_ENTRY_COLUMNS} FROM doctors WHERE id = $1 FOR UPDATE"""
DOCTOR_ENTRY_SET: Final = f"""
UPDATE doctors SET name = $2, specialty = $3, timezone = $4, external_id = $5
WHERE id = $1
RETURNING {DOCTOR_ENTRY_COLUMNS}"""
DOCTOR_RETIRE: Final = f"""
UPDATE doctors SET retired_at = $2 WHERE id = $1
RETURNING {DOCTOR_ENTRY_COLUMNS}"""
DOCTORS_BY_EXTERNAL_ID: Final = f"""
SELECT {DOCTOR_ENTRY_COLUMNS} FROM doctors WHERE external_id = ANY($1::text[])"""
DOCTORS_BY_EXTERNAL_ID_FOR_UPDATE: Final = f"""
SELECT {DOCTOR_ENTRY_COLUMNS} FROM doctors WHERE external_id = ANY($1::text[])
ORDER BY id FOR UPDATE"""
DOCTORS_EXPORT: Final = f"""
SELECT {DOCTOR_ENTRY_COLUMNS} FROM doctors
WHERE $1 OR retired_at IS NULL
ORDER BY external_id NULLS LAST, id"""
# A retiring doctor's live holds (expired ones the runner has freed already).
HOLDS_OF_DOCTOR: Final = """
SELECT id FROM appointments WHERE doctor_id = $1 AND status = 'pending' ORDER BY id"""
SCHEMA_MIGRATED: Final = "SELECT to_regclass('schema_migrations') IS NOT NULL"
SCHEMA_VERSION: Final = "SELECT coalesce(max(version), 0) FROM schema_migrations"
DOCTOR_COUNT: Final = "SELECT count(*) FROM doctors"
DOCTOR_VERSION: Final = "SELECT version FROM doctors WHERE id = $1"
DOCTOR_VERSION_RETIRED: Final = "SELECT version, retired_at FROM doctors WHERE id = $1"

SCHEDULE_INSERT: Final = """
INSERT INTO schedules (doctor_id, weekday, starts, ends) VALUES ($1, $2, $3, $4)"""
SCHEDULE_FOR_DOCTOR: Final = """
SELECT weekday, starts, ends FROM schedules WHERE doctor_id = $1 ORDER BY weekday, starts"""
SCHEDULE_CLEAR: Final = "DELETE FROM schedules WHERE doctor_id = $1"
OVERRIDES_FOR_DOCTOR: Final = """
SELECT day, starts, ends FROM schedule_overrides WHERE doctor_id = $1 ORDER BY day, starts"""
OVERRIDES_CLEAR: Final = "DELETE FROM schedule_overrides WHERE doctor_id = $1"
OVERRIDE_INSERT: Final = """
INSERT INTO schedule_overrides (doctor_id, day, starts, ends) VALUES ($1, $2, $3, $4)"""

# ---- slots -----------------------------------------------------------------------------------

# Dates are the doctor's local dates: [start 00:00, end 00:00) in the doctor's zone.
SLOTS_IN_RANGE: Final = """
SELECT s.id, s.starts_at, s.ends_at, s.status, s.conflict, a.hold_expires_at,
       CASE WHEN s.status = 'busy-unavailable' THEN s.block_reason END AS block_reason
FROM slots s
JOIN doctors d ON d.id = s.doctor_id
LEFT JOIN appointments a ON a.slot_id = s.id AND a.status = 'pending'
WHERE s.doctor_id = $1
  AND s.retired_at IS NULL
  AND s.starts_at >= ($2::date::timestamp AT TIME ZONE d.timezone)
  AND s.starts_at <  ($3::date::timestamp AT TIME ZONE d.timezone)
ORDER BY s.starts_at
LIMIT $4"""
# `next_available`: the first free slot in [$2, $3) clear of the doctor's buffer ($4)
# around other appointments, as `steps.bookable_slot` would accept it. The partial
# unique index on (doctor_id, starts_at) walks the slots in order; $3 (the horizon)
# bounds the walk.
NEXT_AVAILABLE: Final = """
SELECT s.id, s.starts_at, s.ends_at, s.status
FROM slots s
WHERE s.doctor_id = $1
  AND s.retired_at IS NULL
  AND s.status = 'free'
  AND s.starts_at >= $2
  AND s.starts_at < $3
  AND NOT EXISTS (
    SELECT 1 FROM appointments a
    WHERE a.doctor_id = s.doctor_id AND a.status <> 'cancelled'
      AND tstzrange(a.starts_at, a.ends_at, '[)')
          && tstzrange(s.starts_at - $4::interval, s.ends_at + $4::interval, '[)')
  )
ORDER BY s.starts_at
LIMIT 1"""
SLOT_DOCTOR: Final = "SELECT doctor_id FROM slots WHERE id = $1"
SLOT_FOR_UPDATE: Final = """
SELECT s.id, s.doctor_id, s.starts_at, s.ends_at, s.status, s.conflict, s.retired_at,
       d.buffer_minutes, d.min_notice_minutes, d.horizon_days
FROM slots s JOIN doctors d ON d.id = s.doctor_id
WHERE s.id = $1
FOR UPDATE OF s"""
SLOT_SET_STATUS: Final = "UPDATE slots SET status = $2 WHERE id = $1"
SLOT_RETIRE: Final = "UPDATE slots SET retired_at = $2 WHERE id = $1"
SLOT_SET_CONFLICT: Final = "UPDATE slots SET conflict = $2 WHERE id = $1"
SLOTS_OPEN_FROM: Final = """
SELECT id, starts_at, ends_at, status, conflict FROM slots
WHERE doctor_id = $1 AND retired_at IS NULL AND starts_at >= $2
ORDER BY starts_at"""
SLOTS_INSERT_MISSING: Final = """
INSERT INTO slots (doctor_id, starts_at, ends_at)
SELECT $1, s, e FROM unnest($2::timestamptz[], $3::timestamptz[]) AS t(s, e)
ON CONFLICT (doctor_id, starts_at) WHERE retired_at IS NULL DO NOTHING
RETURNING id, starts_at, ends_at, status"""
# Another active appointment within the doctor's buffer of [start, end).
BUFFER_CLASH: Final = """
SELECT EXISTS (
    SELECT 1 FROM appointments
    WHERE doctor_id = $1 AND status <> 'cancelled' AND id IS DISTINCT FROM $4
      AND tstzrange(starts_at, ends_at, '[)') && tstzrange($2, $3, '[)')
)"""

# ---- appointments ----------------------------------------------------------------------------

APPOINTMENT_COLUMNS: Final = """
a.id, a.slot_id, a.doctor_id, a.patient_id, a.starts_at, a.ends_at, a.status,
a.hold_expires_at, a.replaces_id, a.cancel_reason, a.cancelled_at, a.cancelled_by,
a.patient_name, a.visit_reason, a.patient_contact"""
# Insert the appointment and set its slot's status ($9) in one round trip. Both run to
# completion or, if the insert violates the exclusion constraint or the one-per-slot index,
# neither does.
APPOINTMENT_INSERT_TAKING_SLOT: Final = f"""
WITH taken AS (UPDATE slots SET status = $9 WHERE id = $2)
INSERT INTO appointments AS a
    (doctor_id, slot_id, patient_id, starts_at, ends_at, status, hold_expires_at, replaces_id,
     patient_name, visit_reason, patient_contact)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $11, $12)
RETURNING {APPOINTMENT_COLUMNS}"""
APPOINTMENT_DOCTOR: Final = "SELECT doctor_id FROM appointments WHERE id = $1"
# One appointment with its doctor's name and zone: what its calendar file (.ics) says.
APPOINTMENT_WITH_DOCTOR: Final = f"""
SELECT {APPOINTMENT_COLUMNS}, d.name AS doctor_name, d.timezone AS doctor_timezone
FROM appointments a JOIN doctors d ON d.id = a.doctor_id WHERE a.id = $1"""
APPOINTMENT_FOR_UPDATE: Final = f"""
SELECT {APPOINTMENT_COLUMNS} FROM appointments a WHERE a.id = $1 FOR UPDATE"""
# The first read under the lock (see COMMAND_PRELUDE) of a command that names an
# appointment ($4; confirming a hold): the same about the appointment's doctor, which
# APPOINTMENT_DOCTOR_LOCK locked (an appointment's doctor never changes), plus the
# appointment as APPOINTMENT_FOR_UPDATE reads and locks it. Valid only while nothing has
# been written: if holds expired (maybe this one), the command frees them first and reads
# the appointment again.
APPOINTMENT_PRELUDE: Final = f"""
WITH a AS (
    SELECT {APPOINTMENT_COLUMNS} FROM appointments a WHERE a.id = $4 FOR UPDATE
)
SELECT ARRAY[d.id] AS doctor_ids, ARRAY[d.version] AS versions,
    EXISTS (
        SELECT 1 FROM appointments e
        WHERE e.doctor_id = d.id AND e.status = 'pending' AND e.hold_expires_at <= $1
    ) AS expired_holds,
    k.command AS key_command, k.request AS key_request, k.response AS key_response,
    a.*
FROM a
JOIN doctors d ON d.id = a.doctor_id
LEFT JOIN idempotency_keys k ON k.subject = $2 AND k.key = $3"""
APPOINTMENT_UPDATED_AT: Final = "SELECT updated_at FROM appointments WHERE id = $1"
APPOINTMENT_SET_STATUS: Final = f"""
UPDATE appointments AS a SET status = $2, hold_expires_at = NULL, updated_at = $3
WHERE a.id = $1
RETURNING {APPOINTMENT_COLUMNS}"""
# Confirm a hold: APPOINTMENT_SET_STATUS ($2 = 'booked') and SLOT_SET_STATUS ($4 = 'busy') of
# its slot in one round trip, returning the appointment and the slot's times. (The hold row
# was locked and checked by APPOINTMENT_FOR_UPDATE; its slot_id never changes.)
HOLD_CONFIRM: Final = f"""
WITH slot AS (
    UPDATE slots AS s SET status = $4
    FROM appointments AS h WHERE h.id = $1 AND s.id = h.slot_id
    RETURNING s.id, s.starts_at, s.ends_at
), a AS (
    UPDATE appointments AS a SET status = $2, hold_expires_at = NULL, updated_at = $3,
        visit_reason = coalesce($5, a.visit_reason),
        patient_contact = coalesce($6, a.patient_contact)
    WHERE a.id = $1
    RETURNING {APPOINTMENT_COLUMNS}
)
SELECT a.*, slot.starts_at AS slot_starts_at, slot.ends_at AS slot_ends_at
FROM a JOIN slot ON slot.id = a.slot_id"""
APPOINTMENT_CANCEL: Final = f"""
UPDATE appointments AS a
SET status = 'cancelled', cancel_reason = $2, cancelled_at = $3, cancelled_by = $4,
    updated_at = $3
WHERE a.id = $1
RETURNING {APPOINTMENT_COLUMNS}"""
HOLDS_EXPIRE: Final = f"""
UPDATE appointments AS a
SET status = 'cancelled', cancel_reason = 'hold expired', cancelled_at = $2,
    cancelled_by = 'system', updated_at = $2
WHERE a.doctor_id = $1 AND a.status = 'pending' AND a.hold_expires_at <= $2
RETURNING {APPOINTMENT_COLUMNS}"""
DOCTORS_WITH_EXPIRED_HOLDS: Final = """
SELECT DISTINCT doctor_id FROM appointments WHERE status = 'pending' AND hold_expires_at <= $1"""
# What a patient ($1) may still claim at $2, for a hold or a booking whose slot ($4, of
# doctor $3) was not read by SLOT_PRELUDE (holds expired first): the live holds, the
# active future appointments (booked, arrived early, or held and unexpired, starting after
# $2) with that doctor and in all, and until when the patient's own ended holds on the
# slot (released: cancelled_at; lapsed: hold_expires_at, whenever the sweep noticed)
# bar it, $5 (the cool-down) after the latest ended. The same expressions as SLOT_PRELUDE;
# `appointments_patient_active` and `appointments_slot` serve them.
PATIENT_QUOTA: Final = """
SELECT
    count(*) FILTER (WHERE p.status = 'pending' AND p.hold_expires_at > $2) AS active_holds,
    count(*) FILTER (WHERE p.doctor_id = $3 AND p.starts_at > $2) AS active_here,
    count(*) FILTER (WHERE p.starts_at > $2) AS active_total,
    (
        SELECT max(least(coalesce(c.cancelled_at, c.hold_expires_at), c.hold_expires_at))
               + $5::interval
        FROM appointments c
        WHERE c.slot_id = $4 AND c.patient_id = $1 AND c.hold_expires_at IS NOT NULL
          AND (c.status = 'cancelled' OR (c.status = 'pending' AND c.hold_expires_at <= $2))
    ) AS cooled_until
FROM appointments p
WHERE p.patient_id = $1
  AND p.status IN ('pending', 'booked', 'arrived')
  AND (p.status <> 'pending' OR p.hold_expires_at > $2)"""
# A patient's ($1) active future appointments with one doctor ($2) at $3: what a move to
# that doctor adds to (a reschedule).
ACTIVE_WITH_DOCTOR: Final = """
SELECT count(*) FROM appointments
WHERE patient_id = $1 AND doctor_id = $2 AND starts_at > $3
  AND status IN ('pending', 'booked', 'arrived')
  AND (status <> 'pending' OR hold_expires_at > $3)"""
APPOINTMENTS_OF_DOCTOR_ON: Final = f"""
SELECT {APPOINTMENT_COLUMNS} FROM appointments a JOIN doctors d ON d.id = a.doctor_id
WHERE a.doctor_id = $1
  AND a.starts_at >= ($2::date::timestamp AT TIME ZONE d.timezone)
  AND a.starts_at <  (($2::date + 1)::timestamp AT TIME ZONE d.timezone)
ORDER BY a.starts_at, a.id"""
APPOINTMENTS_OF_PATIENT_UPCOMING: Final = f"""
SELECT {APPOINTMENT_COLUMNS} FROM appointments a
WHERE a.patient_id = $1 AND a.ends_at > $2
  AND (a.status IN ('booked', 'arrived') OR (a.status = 'pending' AND a.hold_expires_at > $2))
ORDER BY a.starts_at, a.id
LIMIT 200"""

# ---- change log --------------------------------------------------------------------------------

# The end of every command, one round trip: bump each touched doctor's version once, append
# its change record, and store the reply under the idempotency key if there is one ($7 NULL:
# no key; ON CONFLICT DO NOTHING waits for a concurrent insert of the key). Each change was
# built for version + 1 of the version read under the lock ($2 holds those next versions);
# a record is appended only where the bump produced exactly that version, so the caller,
# which checks `recorded`, rolls back rather than ever leave a gap or a mislabelled change.
# `remembered` is 0 when a concurrent command on another doctor stored the key first.
RECORD: Final = """
WITH bumped AS (
    -- = ANY, not a join with unnest: the generic plan of a join scans every doctor.
    UPDATE doctors AS d SET version = d.version + 1
    WHERE d.id = ANY($1::int[])
    RETURNING d.id, d.version
), recorded AS (
    INSERT INTO changes (doctor_id, version, kind, actor, public, private)
    SELECT c.doctor_id, c.version, c.kind, $6, c.public, c.private
    FROM unnest($1::int[], $2::bigint[], $3::text[], $4::jsonb[], $5::jsonb[])
        AS c(doctor_id, version, kind, public, private)
    JOIN bumped b ON b.id = c.doctor_id AND b.version = c.version
    RETURNING 1
), remembered AS (
    INSERT INTO idempotency_keys (subject, key, command, request, response)
    SELECT $6, $7::text, $8::text, $9::jsonb, $10::jsonb WHERE $7::text IS NOT NULL
    ON CONFLICT (subject, key) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM recorded) AS recorded,
       (SELECT count(*) FROM remembered) AS remembered"""
RELAY_CURSOR_CREATE: Final = "INSERT INTO relay_cursor (doctor_id) VALUES ($1)"
# Committed but not yet published: the relay's work list, oldest first.
CHANGES_UNPUBLISHED: Final = """
SELECT c.doctor_id, c.version, c.public, c.private, c.created_at
FROM relay_cursor r
JOIN changes c ON c.doctor_id = r.doctor_id AND c.version > r.published_version
WHERE c.created_at < $1
ORDER BY c.doctor_id, c.version
LIMIT $2"""
# Committed without waiting for the WAL flush (`synchronous_commit` off for this one
# transaction): the cursor only says what need not be resent, so a crash that loses the
# last advances costs duplicates the rooms drop by version, never a lost change. With
# fsync on, waiting would cost a flush per published batch (one per booking at light
# load) for nothing.
RELAY_ADVANCE: Final = """
WITH no_flush AS (SELECT set_config('synchronous_commit', 'off', true))
UPDATE relay_cursor AS r SET published_version = t.v
FROM unnest($1::int[], $2::bigint[]) AS t(d, v), no_flush
WHERE r.doctor_id = t.d AND r.published_version < t.v"""
# The relay's lag: the age of the oldest change no publish has confirmed, 0 when none.
# Versions are consecutive, so each doctor's oldest is the one after its cursor (by key).
RELAY_LAG: Final = """
SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(c.created_at)), 0)::float8
FROM relay_cursor r
JOIN changes c ON c.doctor_id = r.doctor_id AND c.version = r.published_version + 1"""
CHANGES_ALL: Final = """
SELECT version, kind, actor, public, private, created_at FROM changes
WHERE doctor_id = $1 ORDER BY version"""
CHANGES_BETWEEN: Final = """
SELECT version, public, private, created_at FROM changes
WHERE doctor_id = $1 AND version > $2 AND version <= $3
ORDER BY version"""

# ---- idempotency -------------------------------------------------------------------------------

# The prelude reads keys inside the command; this is for the retry after a key race.
IDEMPOTENCY_GET: Final = """
SELECT command, request, response FROM idempotency_keys WHERE subject = $1 AND key = $2"""

# ---- data lifecycle: pruning and erasure (store/lifecycle.py) -----------------------------------

# One instance prunes at a time: each batch's transaction first tries this lock (and gives
# the round up if another instance holds it), so a batch never waits on another's.
PRUNE_TRY_LOCK: Final = "SELECT pg_try_advisory_xact_lock($1::int4, 0)"
# The one door through the change log's append-only trigger (migration 0006): names the
# maintenance this transaction does ('prune' or 'erase'), until it ends.
MAINTENANCE: Final = "SELECT set_config('slotcast.maintenance', $1, true)"
# An erasure scans the change log: its own bound ($1, ms) for this transaction only.
LOCAL_STATEMENT_TIMEOUT: Final = "SELECT set_config('statement_timeout', $1, true)"
# Each deletes at most $2 rows older than $1, oldest first; rows locked by someone else
# are skipped, never waited for.
PRUNE_IDEMPOTENCY_KEYS: Final = """
DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM idempotency_keys WHERE created_at < $1
    ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED))"""
PRUNE_CHANGES: Final = """
DELETE FROM changes WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM changes WHERE created_at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED))"""
PRUNE_WEBHOOK_ATTEMPTS: Final = """
DELETE FROM webhook_attempts WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM webhook_attempts WHERE attempted_at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED))"""
# Holds that ended without a booking (released or lapsed) and that nothing points at. The
# change log keeps their story; the row was only needed for the re-hold cool-down.
PRUNE_ENDED_HOLDS: Final = """
DELETE FROM appointments WHERE ctid = ANY(ARRAY(
    SELECT a.ctid FROM appointments a
    WHERE a.status = 'cancelled' AND a.hold_expires_at IS NOT NULL AND a.cancelled_at < $1
      AND NOT EXISTS (SELECT 1 FROM appointments r WHERE r.replaces_id = a.id)
    ORDER BY a.cancelled_at LIMIT $2 FOR UPDATE OF a SKIP LOCKED))"""

# Erasure: the doctors whose rows name the patient ($1; as an actor, $2): in appointments
# (by index) or in the change log (a scan: erasure is rare, and a pruned hold leaves its
# story only there).
ERASE_DOCTORS: Final = """
SELECT coalesce(array_agg(DISTINCT d.doctor_id ORDER BY d.doctor_id), '{}') FROM (
    SELECT doctor_id FROM appointments WHERE patient_id = $1
    UNION
    SELECT doctor_id FROM changes
    WHERE actor = $2 OR private->'appointments' @> jsonb_build_array(
        jsonb_build_object('patient_id', $1::text))
) AS d"""
ERASE_APPOINTMENTS: Final = """
UPDATE appointments
SET patient_id = $2, patient_name = NULL, visit_reason = NULL, patient_contact = NULL,
    cancelled_by = CASE WHEN cancelled_by = $3 THEN $4 ELSE cancelled_by END
WHERE patient_id = $1"""
# Change records of doctors $1 that name the patient ($2) as actor ($3) or in an
# appointment: rewritten in Python (store.lifecycle), written back by ERASE_CHANGES_WRITE.
ERASE_CHANGES_FIND: Final = """
SELECT doctor_id, version, actor, private FROM changes
WHERE doctor_id = ANY($1::int[])
  AND (actor = $3 OR private->'appointments' @> jsonb_build_array(
        jsonb_build_object('patient_id', $2::text)))"""
ERASE_CHANGES_WRITE: Final = """
UPDATE changes AS c SET actor = t.actor, private = t.private
FROM unnest($1::int[], $2::bigint[], $3::text[], $4::jsonb[])
    AS t(doctor_id, version, actor, private)
WHERE c.doctor_id = t.doctor_id AND c.version = t.version"""
# The patient's stored replies name them, and are only there for retries.
ERASE_IDEMPOTENCY_KEYS: Final = "DELETE FROM idempotency_keys WHERE subject = $1"


# ---- read replicas (store/replicas.py) ----------------------------------------------------------

# The primary's WAL position, in bytes: what a replica must have replayed to be current.
PRIMARY_WAL_POSITION: Final = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
# A replica's replayed WAL position (NULL on a server that is not a standby).
REPLICA_REPLAY_POSITION: Final = """
SELECT pg_is_in_recovery() AS standby, pg_last_wal_replay_lsn() - '0/0'::pg_lsn AS replayed"""

# ---- webhooks (store/webhooks.py; migration 0007) ------------------------------------------------

WEBHOOK_COLUMNS: Final = """
e.id, e.url, e.description, e.event_types, e.doctor_ids, e.secret, e.previous_secret,
e.previous_until, e.enabled, e.disabled_reason, e.created_at, e.updated_at, e.failing_since,
e.failures, e.next_attempt_at"""
WEBHOOK_COUNT: Final = "SELECT count(*) FROM webhook_endpoints"
# A new endpoint starts at every doctor's current version: it hears what happens from now.
WEBHOOK_CREATE: Final = f"""
WITH e AS (
    INSERT INTO webhook_endpoints (url, description, event_types, doctor_ids, secret)
    VALUES ($1, $2, $3, $4, $5)
    RETURNING *
), cursors AS (
    INSERT INTO webhook_cursors (endpoint_id, doctor_id, version)
    SELECT e.id, d.id, d.version FROM e, doctors d
)
SELECT {WEBHOOK_COLUMNS} FROM e"""
WEBHOOK_LIST: Final = f"SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints e ORDER BY e.id"
WEBHOOK_GET: Final = f"SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints e WHERE e.id = $1"
# Enabling again clears the failure state, so the backlog is tried at once.
WEBHOOK_UPDATE: Final = f"""
UPDATE webhook_endpoints AS e SET
    url = coalesce($2, e.url),
    description = coalesce($3, e.description),
    event_types = coalesce($4, e.event_types),
    doctor_ids = coalesce($5, e.doctor_ids),
    enabled = coalesce($6, e.enabled),
    disabled_reason = CASE WHEN $6 IS NULL THEN e.disabled_reason
                           WHEN $6 THEN NULL ELSE 'disabled by an admin' END,
    failing_since = CASE WHEN $6 THEN NULL ELSE e.failing_since END,
    failures = CASE WHEN $6 THEN 0 ELSE e.failures END,
    next_attempt_at = CASE WHEN $6 THEN NULL ELSE e.next_attempt_at END,
    updated_at = now()
WHERE e.id = $1
RETURNING {WEBHOOK_COLUMNS}"""
WEBHOOK_DELETE: Final = "DELETE FROM webhook_endpoints WHERE id = $1"
# The new secret signs at once; the previous one signs beside it until $3.
WEBHOOK_ROTATE: Final = f"""
UPDATE webhook_endpoints AS e SET
    previous_secret = e.secret, previous_until = $3, secret = $2, updated_at = now()
WHERE e.id = $1
RETURNING {WEBHOOK_COLUMNS}"""
# Lease up to $3 enabled endpoints that are due (not backing off) and that no live
# instance holds ($1 = this instance, $2 = lease seconds), never waiting on a row another
# instance is leasing at the same moment. $4: the ones this instance already serves.
# Least recently served first (a release leaves `lease_until` at the moment it gave the
# endpoint back): with more endpoints than SLOTCAST_WEBHOOK_CONCURRENCY, each gets its
# turn rather than the lowest ids every time.
WEBHOOK_CLAIM: Final = f"""
UPDATE webhook_endpoints AS e SET leased_by = $1, lease_until = now() + make_interval(secs => $2)
WHERE e.id IN (
    SELECT c.id FROM webhook_endpoints c
    WHERE c.enabled AND c.id <> ALL($4::bigint[])
      AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= now())
      AND (c.lease_until IS NULL OR c.lease_until < now() OR c.leased_by = $1)
    ORDER BY c.lease_until NULLS FIRST, c.id LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING {WEBHOOK_COLUMNS}"""
# Keep the lease and read the endpoint afresh (secrets, filters, enabled); no row: lost.
WEBHOOK_RENEW: Final = f"""
UPDATE webhook_endpoints AS e SET lease_until = now() + make_interval(secs => $3)
WHERE e.id = $1 AND e.leased_by = $2 AND e.enabled
RETURNING {WEBHOOK_COLUMNS}"""
# The endpoint afresh (secrets, filters, enabled) while this instance ($2) holds it; no
# row: disabled, deleted or taken over. Read with each batch, so an admin's change
# reaches the next messages read, not only the next renewal; with it, whether any
# replay is queued (rarely: the replays are read only then, a statement saved per batch).
WEBHOOK_HELD: Final = f"""
SELECT {WEBHOOK_COLUMNS},
       EXISTS (SELECT 1 FROM webhook_replays r WHERE r.endpoint_id = e.id) AS replays_queued
FROM webhook_endpoints e
WHERE e.id = $1 AND e.leased_by = $2 AND e.enabled"""
WEBHOOK_RELEASE: Final = """
UPDATE webhook_endpoints SET leased_by = NULL, lease_until = least(lease_until, now())
WHERE id = $1 AND leased_by = $2"""
# The next changes past endpoint $1's cursors, at most $3 per doctor and about $4 in all,
# for the doctors it follows ($2; empty: all) but those with a message in flight ($5):
# one query for many doctors. Each doctor's in version order; the doctors whose oldest
# waiting change is oldest first, so a busy doctor never starves the others. Its cost is
# bounded by the doctors and by $4, never by the backlog: the waiting doctors are found
# from `doctors` and the cursors, their oldest waiting change by one probe of the change
# log's primary key each, and only the chosen doctors' changes are read, $4 shared out
# among them (a slow endpoint, thousands behind, reads $4 rows, not its whole backlog).
# Plain reads of committed rows: no lock that a booking could wait for.
WEBHOOK_BACKLOG_NEXT: Final = """
WITH waiting AS (
    SELECT d.id, coalesce(w.version, 0) AS after
    FROM doctors d
    LEFT JOIN webhook_cursors w ON w.endpoint_id = $1 AND w.doctor_id = d.id
    WHERE d.version > coalesce(w.version, 0)
      AND (cardinality($2::int[]) = 0 OR d.id = ANY($2::int[]))
      AND d.id <> ALL($5::int[])
), heads AS (
    SELECT waiting.id, waiting.after, h.created_at
    FROM waiting CROSS JOIN LATERAL (
        SELECT c.created_at FROM changes c
        WHERE c.doctor_id = waiting.id AND c.version > waiting.after
        ORDER BY c.version LIMIT 1
    ) h
    ORDER BY h.created_at, waiting.id
    LIMIT $4
), chosen AS (
    SELECT heads.*, least($3::int, greatest(1, $4::int / count(*) OVER ())) AS take FROM heads
)
SELECT c.doctor_id, c.version, c.public, c.private, c.created_at
FROM chosen CROSS JOIN LATERAL (
    SELECT * FROM changes c
    WHERE c.doctor_id = chosen.id AND c.version > chosen.after
    ORDER BY c.version LIMIT chosen.take
) c
ORDER BY chosen.created_at, c.doctor_id, c.version
LIMIT $4"""
# Changes an admin asked to send again, oldest version first per doctor, but for the
# doctors with a message in flight ($3).
WEBHOOK_REPLAYS_NEXT: Final = """
SELECT c.doctor_id, c.version, c.public, c.private, c.created_at
FROM webhook_replays r
JOIN changes c ON c.doctor_id = r.doctor_id AND c.version = r.version
WHERE r.endpoint_id = $1 AND r.doctor_id <> ALL($3::int[])
ORDER BY r.doctor_id, r.version
LIMIT $2"""
# A replayed change whose record was pruned meanwhile has nothing left to send.
WEBHOOK_REPLAYS_ORPHANED: Final = """
DELETE FROM webhook_replays r WHERE r.endpoint_id = $1 AND NOT EXISTS (
    SELECT 1 FROM changes c WHERE c.doctor_id = r.doctor_id AND c.version = r.version)"""
# Delivered (or not wanted), in a batch: move the cursors ($2 doctors, $3 versions) and
# drop replay rows ($4 doctors, $5 versions), only while this instance ($6) still holds
# the lease; record the attempts made since the last batch ($7..$14, one array per
# column), and clear the failure state if any of them went through. False: the lease
# was lost (nothing written) or an admin disabled the endpoint (written, as it was
# sent): either way the caller stops sending.
WEBHOOK_DELIVERED: Final = """
WITH held AS (
    UPDATE webhook_endpoints AS e SET
        failing_since = CASE WHEN true = ANY($12::bool[]) THEN NULL ELSE e.failing_since END,
        failures = CASE WHEN true = ANY($12::bool[]) THEN 0 ELSE e.failures END,
        next_attempt_at = CASE WHEN true = ANY($12::bool[]) THEN NULL ELSE e.next_attempt_at END
    WHERE e.id = $1 AND e.leased_by = $6
    RETURNING e.id, e.enabled
), moved AS (
    INSERT INTO webhook_cursors (endpoint_id, doctor_id, version)
    SELECT held.id, t.d, t.v FROM held, unnest($2::int[], $3::bigint[]) AS t(d, v)
    ON CONFLICT (endpoint_id, doctor_id)
    DO UPDATE SET version = greatest(webhook_cursors.version, excluded.version)
), replayed AS (
    DELETE FROM webhook_replays r USING held, unnest($4::int[], $5::bigint[]) AS t(d, v)
    WHERE r.endpoint_id = held.id AND r.doctor_id = t.d AND r.version = t.v
), attempts AS (
    INSERT INTO webhook_attempts
        (endpoint_id, message_id, doctor_id, version, event_type, status, ok, latency_ms,
         error, instance)
    SELECT held.id, a.m, a.d, a.v, a.t, a.s, a.ok, a.ms, a.err, $6
    FROM held, unnest($7::text[], $8::int[], $9::bigint[], $10::text[], $11::int[],
                      $12::bool[], $13::float8[], $14::text[]) AS a(m, d, v, t, s, ok, ms, err)
)
SELECT EXISTS (SELECT 1 FROM held WHERE held.enabled) AS go_on"""
# A failed attempt: recorded, and, while this instance ($11) still holds the lease, the
# retry scheduled at $8 and the lease given up. Failing since longer than $9 seconds
# disables the endpoint; its cursor, and so its backlog, stays. An endpoint an admin
# disabled while the attempt was in flight stays disabled. No row: the lease was lost,
# and whoever holds it now decides.
WEBHOOK_FAILED: Final = """
WITH attempt AS (
    INSERT INTO webhook_attempts
        (endpoint_id, message_id, doctor_id, version, event_type, status, ok, latency_ms, error,
         instance)
    VALUES ($1, $2, $3, $4, $5, $6::int, false, $7::float8, $10::text, $11)
)
UPDATE webhook_endpoints AS e SET
    failures = e.failures + 1,
    failing_since = coalesce(e.failing_since, now()),
    next_attempt_at = $8,
    leased_by = NULL, lease_until = NULL,
    enabled = e.enabled AND coalesce(e.failing_since, now()) > now() - make_interval(secs => $9),
    disabled_reason = CASE
        WHEN NOT e.enabled THEN e.disabled_reason
        WHEN coalesce(e.failing_since, now()) > now() - make_interval(secs => $9) THEN NULL
        ELSE 'failing since ' || coalesce(e.failing_since, now())::text || ': ' || $10::text END
WHERE e.id = $1 AND e.leased_by = $11
RETURNING e.enabled, e.failures"""
WEBHOOK_ATTEMPTS: Final = """
SELECT id, message_id, doctor_id, version, event_type, status, ok, latency_ms, error,
       instance, attempted_at
FROM webhook_attempts
WHERE endpoint_id = $1 AND id < $2
ORDER BY id DESC
LIMIT $3"""
# Queue every change of the endpoint's doctors committed in [$2, $3) to be sent again, at
# most $4 of them.
WEBHOOK_REPLAY: Final = """
WITH e AS (SELECT id, doctor_ids FROM webhook_endpoints WHERE id = $1), queued AS (
    INSERT INTO webhook_replays (endpoint_id, doctor_id, version)
    SELECT e.id, c.doctor_id, c.version FROM e JOIN changes c
        ON cardinality(e.doctor_ids) = 0 OR c.doctor_id = ANY(e.doctor_ids)
    WHERE c.created_at >= $2 AND c.created_at < $3
    ORDER BY c.created_at LIMIT $4
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM queued"""
# Per endpoint: changes past its cursors (unwanted kinds included, which it skips) and
# replays queued, and the age of the oldest of them (seconds, database clock).
WEBHOOK_BACKLOG: Final = """
SELECT e.id,
       coalesce(sum(d.version - coalesce(w.version, 0)), 0)::bigint
         + (SELECT count(*) FROM webhook_replays r WHERE r.endpoint_id = e.id) AS backlog,
       coalesce(EXTRACT(EPOCH FROM now() - min(c.created_at)), 0)::float8 AS oldest_s
FROM webhook_endpoints e
LEFT JOIN doctors d
    ON cardinality(e.doctor_ids) = 0 OR d.id = ANY(e.doctor_ids)
LEFT JOIN webhook_cursors w ON w.endpoint_id = e.id AND w.doctor_id = d.id
LEFT JOIN changes c ON c.doctor_id = d.id AND c.version = coalesce(w.version, 0) + 1
WHERE d.id IS NULL OR d.version > coalesce(w.version, 0)
GROUP BY e.id
"""
WEBHOOK_ENDPOINT_IDS: Final = "SELECT id FROM webhook_endpoints ORDER BY id"

# ---- API keys (store.apikeys) -------------------------------------------------------------

API_KEY_COLUMNS: Final = """
id, name, scopes, doctor_id, expires_at, created_at, created_by, revoked_at, last_used_at"""
API_KEY_INSERT: Final = f"""
INSERT INTO api_keys (name, secret_hash, scopes, doctor_id, expires_at, created_by, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING {API_KEY_COLUMNS}"""
API_KEY_LIST: Final = f"SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY id"
API_KEY_GET: Final = f"SELECT {API_KEY_COLUMNS}, secret_hash FROM api_keys WHERE id = $1"
API_KEY_REVOKE: Final = f"""
UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1
RETURNING {API_KEY_COLUMNS}"""
# Last use, batched ($1 ids, $2 instants); never moved back by a late, older batch.
API_KEY_TOUCH: Final = """
UPDATE api_keys AS k SET last_used_at = t.at
FROM unnest($1::bigint[], $2::timestamptz[]) AS t(id, at)
WHERE k.id = t.id AND (k.last_used_at IS NULL OR k.last_used_at < t.at)"""

# ---- the schedule editor: ranges blocked with a reason, previews (store.commands, reads) ----

# A single slot blocked or offered again ($2 its status): a reason given for a range before
# never outlives the block it explained.
SLOT_SET_BLOCKED: Final = "UPDATE slots SET status = $2, block_reason = NULL WHERE id = $1"
# Every free, offered slot of doctor $1 starting in [$2, $3) and after $5 turns
# `busy-unavailable` with reason $4, in one statement under the doctor's lock.
SLOTS_BLOCK_RANGE: Final = """
UPDATE slots SET status = 'busy-unavailable', block_reason = $4
WHERE doctor_id = $1 AND retired_at IS NULL AND status = 'free'
  AND starts_at >= $2 AND starts_at < $3 AND starts_at > $5
RETURNING id, starts_at, ends_at, status, block_reason"""
# Every blocked, offered slot of doctor $1 starting in [$2, $3) and after $4 is free again.
SLOTS_UNBLOCK_RANGE: Final = """
UPDATE slots SET status = 'free', block_reason = NULL
WHERE doctor_id = $1 AND retired_at IS NULL AND status = 'busy-unavailable'
  AND starts_at >= $2 AND starts_at < $3 AND starts_at > $4
RETURNING id, starts_at, ends_at, status"""
# The doctor's appointments that hold a slot from $2 on (booked, arrived, or a hold alive
# at $3): what `steps.rematerialize` would keep as conflicts if the schedule dropped them.
APPOINTMENTS_HOLDING_FROM: Final = f"""
SELECT {APPOINTMENT_COLUMNS} FROM appointments a
WHERE a.doctor_id = $1 AND a.starts_at >= $2
  AND (a.status IN ('booked', 'arrived') OR (a.status = 'pending' AND a.hold_expires_at > $3))
ORDER BY a.starts_at, a.id"""
