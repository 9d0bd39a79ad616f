-- Booking engine: availability rules, holds, cancellations, reschedules, conflicts,
-- and the private half of the change log (the doctor's view, also the audit trail).

ALTER TABLE doctors
    ADD COLUMN buffer_minutes     integer NOT NULL DEFAULT 0
        CHECK (buffer_minutes BETWEEN 0 AND 240),
    ADD COLUMN min_notice_minutes integer NOT NULL DEFAULT 0
        CHECK (min_notice_minutes BETWEEN 0 AND 43200);

-- A date with overrides uses them instead of its weekly blocks; a row without times
-- means the doctor is off that day.
CREATE TABLE schedule_overrides (
    id         bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doctor_id  integer NOT NULL REFERENCES doctors ON DELETE CASCADE,
    day        date    NOT NULL,
    starts     time,
    ends       time,
    CHECK ((starts IS NULL) = (ends IS NULL)),
    CHECK (starts < ends)
);
CREATE INDEX schedule_overrides_doctor ON schedule_overrides (doctor_id, day);

-- A schedule change retires free slots it no longer offers (they stay for the
-- appointments that reference them) and flags booked ones as conflicts.
ALTER TABLE slots
    ADD COLUMN conflict   boolean NOT NULL DEFAULT false,
    ADD COLUMN retired_at timestamptz;
ALTER TABLE slots DROP CONSTRAINT slots_doctor_id_starts_at_key;
CREATE UNIQUE INDEX slots_open_start ON slots (doctor_id, starts_at) WHERE retired_at IS NULL;

ALTER TABLE appointments
    ADD COLUMN hold_expires_at timestamptz,
    ADD COLUMN replaces_id     bigint REFERENCES appointments,
    ADD COLUMN cancel_reason   text,
    ADD COLUMN cancelled_at    timestamptz,
    ADD COLUMN cancelled_by    text,
    ADD CONSTRAINT appointments_pending_expires CHECK (status <> 'pending' OR hold_expires_at IS NOT NULL),
    ADD CONSTRAINT appointments_cancelled_at CHECK (status <> 'cancelled' OR cancelled_at IS NOT NULL);
-- One active appointment per slot (the exclusion constraint already implies it by time).
CREATE UNIQUE INDEX appointments_slot_active ON appointments (slot_id) WHERE status <> 'cancelled';
CREATE INDEX appointments_holds ON appointments (hold_expires_at) WHERE status = 'pending';
CREATE INDEX appointments_doctor_time ON appointments (doctor_id, starts_at);

-- The doctor's side of each change: appointments with patient identity, who did it
-- and why. Together with kind, actor and created_at it is the audit trail.
ALTER TABLE changes ADD COLUMN private jsonb NOT NULL DEFAULT '{}';

CREATE TRIGGER changes_no_truncate BEFORE TRUNCATE ON changes
    FOR EACH STATEMENT EXECUTE FUNCTION changes_append_only();
