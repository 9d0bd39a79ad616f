-- `hold_expires_at` says when a pending hold lapses, and only that: once the hold is
-- confirmed, released or lapses it is null (docs/protocol.md, the appointment). Holds
-- released or lapsed before this migration kept it; clear them, then keep it so.
UPDATE appointments SET hold_expires_at = NULL
WHERE status <> 'pending' AND hold_expires_at IS NOT NULL;
ALTER TABLE appointments
    ADD CONSTRAINT appointments_expires_only_pending CHECK (status = 'pending' OR hold_expires_at IS NULL);
