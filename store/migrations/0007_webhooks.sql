-- slotcast:expand
-- Webhooks (store/webhooks.py; docs/webhooks.md). Only additions.

-- An endpoint the clinic registered. The secrets must sign every delivery (HMAC needs
-- the key itself), so they are stored as given, not hashed: shown once at creation and
-- rotation, never listed. During a rotation's overlap the previous secret signs too.
-- The lease says which instance delivers to it (`leased_by` until `lease_until`): one at
-- a time, and another takes it over once a dead holder's lease has run out.
CREATE TABLE webhook_endpoints (
    id               bigserial PRIMARY KEY,
    url              text NOT NULL,
    description      text NOT NULL DEFAULT '',
    event_types      text[] NOT NULL DEFAULT '{}',   -- empty: every event
    doctor_ids       integer[] NOT NULL DEFAULT '{}', -- empty: every doctor
    secret           text NOT NULL,
    previous_secret  text,
    previous_until   timestamptz,
    enabled          boolean NOT NULL DEFAULT true,
    disabled_reason  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- Retries: since when the head of its backlog fails, how many tries, when next.
    failing_since    timestamptz,
    failures         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    leased_by        text,
    lease_until      timestamptz
);

-- The durable cursor: per endpoint and doctor, the last version delivered (or skipped as
-- not wanted). The backlog is the change log past it; a doctor without a row starts at 0
-- (it was created after the endpoint, which starts at every doctor's version then).
CREATE TABLE webhook_cursors (
    endpoint_id  bigint  NOT NULL REFERENCES webhook_endpoints ON DELETE CASCADE,
    doctor_id    integer NOT NULL REFERENCES doctors ON DELETE CASCADE,
    version      bigint  NOT NULL,
    PRIMARY KEY (endpoint_id, doctor_id)
);

-- Changes an admin asked to send again (a replay of a time range), ahead of the cursor.
CREATE TABLE webhook_replays (
    endpoint_id  bigint  NOT NULL REFERENCES webhook_endpoints ON DELETE CASCADE,
    doctor_id    integer NOT NULL,
    version      bigint  NOT NULL,
    PRIMARY KEY (endpoint_id, doctor_id, version)
);

-- Every delivery attempt: which message, how it went. No payload and no response body,
-- so no patient is named here (the payload is built from the change log when sent).
CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    endpoint_id  bigint  NOT NULL REFERENCES webhook_endpoints ON DELETE CASCADE,
    message_id   text    NOT NULL,
    doctor_id    integer NOT NULL,
    version      bigint  NOT NULL,
    event_type   text    NOT NULL,
    status       integer,          -- the HTTP status; NULL when none came back
    ok           boolean NOT NULL,
    latency_ms   double precision NOT NULL,
    error        text,
    instance     text    NOT NULL, -- which instance sent it
    attempted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, attempted_at);
CREATE INDEX webhook_attempts_at ON webhook_attempts USING brin (attempted_at);
