-- slotcast:expand
-- The doctor directory: an id from the clinic's own staff system (the key imports
-- upsert on), retirement (a retired doctor keeps its rows and change log, and is
-- offered no more), and a time zone the database itself checks.
--
-- Expand only: two nullable columns, two indexes and a time zone trigger, so an
-- instance of the previous version keeps running beside this schema (it neither reads
-- nor writes the new columns; a retired doctor's schedule is empty, so its horizon
-- sweep opens nothing for them either).

ALTER TABLE doctors
    ADD COLUMN external_id text CHECK (external_id <> '' AND length(external_id) <= 128),
    ADD COLUMN retired_at  timestamptz;

-- One doctor per staff-system id; doctors created without one (demo, tests) have none.
CREATE UNIQUE INDEX doctors_external_id ON doctors (external_id);

-- Only names of PostgreSQL's IANA time zone database (pg_timezone_names): not an
-- abbreviation ('EST') nor a POSIX spec ('UTC+3'), which AT TIME ZONE would take and
-- zoneinfo would not. A trigger rather than a CHECK: reading pg_timezone_names costs
-- about 15 ms, and a CHECK would pay it on every row update (every command bumps the
-- doctor's version), where `UPDATE OF timezone` pays it only when the zone is written.
-- Rows written before this migration are not re-read (the application always checked
-- them with zoneinfo); operating.md shows the query that finds a hand-inserted one.
CREATE FUNCTION doctors_timezone_iana() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.timezone) THEN
        RAISE EXCEPTION 'timezone: % is not an IANA time zone name', NEW.timezone
            USING ERRCODE = 'check_violation', CONSTRAINT = 'doctors_timezone_iana',
                  TABLE = 'doctors', COLUMN = 'timezone';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER doctors_timezone_iana_insert BEFORE INSERT ON doctors
    FOR EACH ROW EXECUTE FUNCTION doctors_timezone_iana();
CREATE TRIGGER doctors_timezone_iana_update BEFORE UPDATE OF timezone ON doctors
    FOR EACH ROW WHEN (NEW.timezone IS DISTINCT FROM OLD.timezone)
    EXECUTE FUNCTION doctors_timezone_iana();

-- The public directory search reads active doctors only.
CREATE INDEX doctors_active ON doctors (lower(name)) WHERE retired_at IS NULL;
