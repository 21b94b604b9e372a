-- Controller core schema (PostgreSQL).

CREATE TABLE config_state (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    revision  BIGINT NOT NULL
);
INSERT INTO config_state (id, revision) VALUES (1, 0);

-- Every configuration resource as a JSON document, keyed by (kind, site, code); site is ''
-- for global kinds (sites, staff users). Validated as a whole set before every commit.
CREATE TABLE config_resources (
    kind              TEXT NOT NULL,
    site              TEXT NOT NULL,
    code              TEXT NOT NULL,
    body              TEXT NOT NULL,
    updated_revision  BIGINT NOT NULL,
    PRIMARY KEY (kind, site, code)
);

CREATE TABLE config_revisions (
    revision    BIGINT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL,
    actor       TEXT NOT NULL,
    summary     TEXT NOT NULL
);

-- The latest revision that changed each site's snapshot.
CREATE TABLE site_revisions (
    site      TEXT PRIMARY KEY,
    revision  BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    TIMESTAMPTZ NOT NULL
);

CREATE TABLE enrollment_tokens (
    id             TEXT PRIMARY KEY,
    site           TEXT NOT NULL,
    token_hash     TEXT NOT NULL UNIQUE,
    created_at     TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    used_at        TIMESTAMPTZ,
    used_by_agent  TEXT
);

CREATE TABLE agents (
    id                 TEXT PRIMARY KEY,
    site               TEXT NOT NULL,
    hostname           TEXT NOT NULL,
    credential_hash    TEXT NOT NULL UNIQUE,
    enrolled_at        TIMESTAMPTZ NOT NULL,
    revoked_at         TIMESTAMPTZ,
    version            TEXT NOT NULL,
    connected          BOOLEAN NOT NULL DEFAULT FALSE,
    last_seen          TIMESTAMPTZ,
    config_revision    BIGINT NOT NULL DEFAULT 0,
    acked_seq          BIGINT NOT NULL DEFAULT 0,
    command_seq        BIGINT NOT NULL DEFAULT 0,
    command_acked_seq  BIGINT NOT NULL DEFAULT 0,
    command_error      TEXT,
    outbox_pending     BIGINT NOT NULL DEFAULT 0,
    clock_skew_ms      BIGINT NOT NULL DEFAULT 0,
    store_error        TEXT
);
CREATE INDEX agents_site ON agents (site);

-- Raw events, exactly once per (agent, seq).
CREATE TABLE events (
    agent_id     TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    site         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    payload      JSONB NOT NULL,
    PRIMARY KEY (agent_id, seq)
);

-- The per-agent command log (controller -> agent).
CREATE TABLE agent_commands (
    agent_id    TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
