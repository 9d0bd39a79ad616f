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
MIGRATIONS_APPLIED: Final = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
MIGRATION_RECORD: Final = (
    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
)
SESSION_LOCK: Final = "SELECT pg_advisory_lock($1::int4, $2::int4)"
SESSION_UNLOCK: Final = "SELECT pg_advisory_unlock($1::int4, $2::int4)"

# ---- locking: always the first statement of a doctor's write transaction -----------------

DOCTOR_LOCK: Final = "SELECT pg_advisory_xact_lock($1::int4, $2::int4)"
# Patients have text ids; hashing is fine here: a collision only serializes two patients.
PATIENT_LOCK: Final = "SELECT pg_advisory_xact_lock($1::int4, hashtext($2))"

# ---- doctors and schedules ----------------------------------------------------------------

DOCTOR_INSERT: Final = """
INSERT INTO doctors (name, specialty, timezone, slot_minutes, horizon_days)
VALUES ($1, $2, $3, $4, $5)
RETURNING id"""
DOCTOR_GET: Final = """
SELECT id, name, specialty, timezone, slot_minutes, horizon_days, version,
       buffer_minutes, min_notice_minutes
FROM doctors WHERE id = $1"""
DOCTOR_SET_RULES: Final = """
UPDATE doctors
SET slot_minutes = $2, buffer_minutes = $3, min_notice_minutes = $4, horizon_days = $5
WHERE id = $1"""
DOCTOR_IDS: Final = "SELECT id FROM doctors ORDER BY id"
DOCTOR_SEARCH: Final = """
SELECT id, name, specialty, timezone FROM doctors
WHERE $1::text IS NULL
   OR strpos(lower(name), lower($1)) > 0
   OR strpos(lower(specialty), lower($1)) > 0
ORDER BY name, id
LIMIT $2 OFFSET $3"""
DOCTOR_COUNT: Final = "SELECT count(*) FROM doctors"
DOCTOR_VERSION: Final = "SELECT version FROM doctors WHERE id = $1"
DOCTOR_BUMP_VERSION: Final = (
    "UPDATE doctors SET version = version + 1 WHERE id = $1 RETURNING version"
)

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
SELECT s.id, s.starts_at, s.ends_at, s.status, s.conflict, a.hold_expires_at
FROM slots s
JOIN doctors d ON d.id = s.doctor_id
LEFT JOIN appointments a ON a.slot_id = s.id AND a.status = 'pending'
WHERE s.doctor_id = $1
  AND s.retired_at IS NULL
  AND s.starts_at >= ($2::date::timestamp AT TIME ZONE d.timezone)
  AND s.starts_at <  ($3::date::timestamp AT TIME ZONE d.timezone)
ORDER BY s.starts_at"""
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
a.hold_expires_at, a.replaces_id, a.cancel_reason, a.cancelled_at, a.cancelled_by"""
APPOINTMENT_INSERT: Final = f"""
INSERT INTO appointments AS a
    (doctor_id, slot_id, patient_id, starts_at, ends_at, status, hold_expires_at, replaces_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING {APPOINTMENT_COLUMNS}"""
APPOINTMENT_DOCTOR: Final = "SELECT doctor_id FROM appointments WHERE id = $1"
APPOINTMENT_FOR_UPDATE: Final = f"""
SELECT {APPOINTMENT_COLUMNS} FROM appointments a WHERE a.id = $1 FOR UPDATE"""
APPOINTMENT_SET_STATUS: Final = f"""
UPDATE appointments AS a SET status = $2, hold_expires_at = NULL, updated_at = $3
WHERE a.id = $1
RETURNING {APPOINTMENT_COLUMNS}"""
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
ACTIVE_HOLDS_OF_PATIENT: Final = """
SELECT count(*) FROM appointments
WHERE patient_id = $1 AND status = 'pending' AND hold_expires_at > $2"""
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

CHANGE_INSERT: Final = """
INSERT INTO changes (doctor_id, version, kind, actor, public, private)
VALUES ($1, $2, $3, $4, $5, $6)"""
RELAY_CURSOR_CREATE: Final = "INSERT INTO relay_cursor (doctor_id) VALUES ($1)"
# Committed but not yet published: the relay's work list, oldest first.
CHANGES_UNPUBLISHED: Final = """
SELECT c.doctor_id, c.version, c.public, c.private, c.created_at
FROM relay_cursor r
JOIN changes c ON c.doctor_id = r.doctor_id AND c.version > r.published_version
WHERE c.created_at < $1
ORDER BY c.doctor_id, c.version
LIMIT $2"""
RELAY_ADVANCE: Final = """
UPDATE relay_cursor AS r SET published_version = t.v
FROM unnest($1::int[], $2::bigint[]) AS t(d, v)
WHERE r.doctor_id = t.d AND r.published_version < t.v"""
CHANGES_ALL: Final = """
SELECT version, kind, actor, public, private, created_at FROM changes
WHERE doctor_id = $1 ORDER BY version"""
CHANGES_BETWEEN: Final = """
SELECT version, public, private, created_at FROM changes
WHERE doctor_id = $1 AND version > $2 AND version <= $3
ORDER BY version"""

# ---- idempotency -------------------------------------------------------------------------------

IDEMPOTENCY_GET: Final = """
SELECT command, request, response FROM idempotency_keys WHERE subject = $1 AND key = $2"""
IDEMPOTENCY_PUT: Final = """
INSERT INTO idempotency_keys (subject, key, command, request, response)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (subject, key) DO NOTHING
RETURNING true"""
