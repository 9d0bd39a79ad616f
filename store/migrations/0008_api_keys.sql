-- slotcast:expand
-- API keys and patients by name (issue 13, items 3-5; docs/protocol.md). Only additions.

-- A service's key: `sk_<id>_<secret>`, of which only HMAC-SHA256(pepper, secret) is kept
-- (store/apikeys.py says why not a password hash). Revoked keys stay, so the change log's
-- `key:<id>` keeps naming a row. Names no patient: erasure has nothing to do here.
CREATE TABLE api_keys (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL,
    secret_hash   bytea NOT NULL,
    scopes        text[] NOT NULL,
    doctor_id     integer REFERENCES doctors (id),  -- null: every doctor
    expires_at    timestamptz,                      -- null: until revoked
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL,
    revoked_at    timestamptz,
    last_used_at  timestamptz
);

-- The patient's display name from their token's `name` claim (or given by whoever books
-- on their behalf): shown to the doctor and in webhook payloads; erasure clears it.
ALTER TABLE appointments ADD COLUMN patient_name text;
