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

# ---- doctors and schedules ----------------------------------------------------------------

DOCTOR_INSERT: Final = """
INSERT INTO doctors (name, specialty, timezone, slot_minutes, horizon_days)
VALUES ($1, $2, $3, $4, $5)
RETURNING id"""
DOCTOR_GET: Final = """
SELECT id, name, specialty, timezone, slot_minutes, horizon_days, version
FROM doctors WHERE id = $1"""
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

# ---- slots -----------------------------------------------------------------------------------

# Dates are the doctor's local dates: [start 00:00, end 00:00) in the doctor's zone.
SLOTS_IN_RANGE: Final = """
SELECT s.id, s.starts_at, s.ends_at, s.status
FROM slots s JOIN doctors d ON d.id = s.doctor_id
WHERE s.doctor_id = $1
  AND s.starts_at >= ($2::date::timestamp AT TIME ZONE d.timezone)
  AND s.starts_at <  ($3::date::timestamp AT TIME ZONE d.timezone)
ORDER BY s.starts_at"""
SLOT_DOCTOR: Final = "SELECT doctor_id FROM slots WHERE id = $1"
SLOT_FOR_UPDATE: Final = """
SELECT id, doctor_id, starts_at, ends_at, status FROM slots WHERE id = $1 FOR UPDATE"""
SLOT_SET_STATUS: Final = "UPDATE slots SET status = $2 WHERE id = $1"
SLOTS_INSERT_MISSING: Final = """
INSERT INTO slots (doctor_id, starts_at, ends_at)
SELECT $1, s, e FROM unnest($2::timestamptz[], $3::timestamptz[]) AS t(s, e)
ON CONFLICT (doctor_id, starts_at) DO NOTHING
RETURNING id, starts_at, ends_at, status"""

# ---- appointments ----------------------------------------------------------------------------

APPOINTMENT_INSERT: Final = """
INSERT INTO appointments (doctor_id, slot_id, patient_id, starts_at, ends_at, status)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id"""

# ---- change log --------------------------------------------------------------------------------

CHANGE_INSERT: Final = """
INSERT INTO changes (doctor_id, version, kind, actor, public) VALUES ($1, $2, $3, $4, $5)"""
CHANGES_BETWEEN: Final = """
SELECT version, public FROM changes
WHERE doctor_id = $1 AND version > $2 AND version <= $3
ORDER BY version"""

# ---- idempotency -------------------------------------------------------------------------------

IDEMPOTENCY_GET: Final = """
SELECT command, request, response FROM idempotency_keys WHERE subject = $1 AND key = $2"""
IDEMPOTENCY_PUT: Final = """
INSERT INTO idempotency_keys (subject, key, command, request, response)
VALUES ($1, $2, $3, $4, $5)"""
