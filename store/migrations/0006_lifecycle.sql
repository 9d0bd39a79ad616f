-- slotcast:expand
-- Data lifecycle (store/lifecycle.py; docs/operations.md, "Retention and erasure").
-- Only additions, so a release that predates it runs on it unchanged.

-- The change log stays append-only for everything but the store's own maintenance,
-- which names itself in a transaction-local setting: `prune` may delete rows (those
-- past the audit period), `erase` may rewrite who a row names (actor and the private
-- half) and nothing else. A guard against accidents, not against the table's owner.
CREATE OR REPLACE FUNCTION changes_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('slotcast.maintenance', true) = 'prune' THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND current_setting('slotcast.maintenance', true) = 'erase'
       AND NEW.doctor_id = OLD.doctor_id AND NEW.version = OLD.version
       AND NEW.kind = OLD.kind AND NEW.public = OLD.public
       AND NEW.created_at = OLD.created_at THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'the change log is append-only (% refused)', TG_OP;
END $$;

-- What the pruning finds by age. The change log is appended in time order, so a BRIN
-- index (a few pages for millions of rows) is enough to find its oldest rows.
CREATE INDEX changes_created_brin ON changes USING brin (created_at);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
-- Holds that ended without becoming a booking: released or lapsed.
CREATE INDEX appointments_ended_holds ON appointments (cancelled_at)
    WHERE status = 'cancelled' AND hold_expires_at IS NOT NULL;
