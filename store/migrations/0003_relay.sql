-- The relay: how far each doctor's change log has been published to the broker.
-- Kept apart from `doctors` so advancing it never waits on a booking's row lock.
CREATE TABLE relay_cursor (
    doctor_id          integer PRIMARY KEY REFERENCES doctors ON DELETE CASCADE,
    published_version  bigint  NOT NULL DEFAULT 0
);
-- Whatever exists at upgrade time counts as published.
INSERT INTO relay_cursor (doctor_id, published_version) SELECT id, version FROM doctors;
