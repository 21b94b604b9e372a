-- Agent core schema (SQLite). Applied by meridian_agent::store::migrate, tracked in
-- PRAGMA user_version.

-- Identity and cursors: agent_id, site, credential, last_command_seq.
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) STRICT;

-- The applied site configuration snapshot (one row).
CREATE TABLE site_config (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    revision    INTEGER NOT NULL,
    body        TEXT NOT NULL,
    applied_at  TEXT NOT NULL
) STRICT;

-- Transactional outbox. Sequences are gapless: next_seq lives in outbox_state, so pruning
-- acknowledged rows never lets a number be reused.
CREATE TABLE outbox (
    seq             INTEGER PRIMARY KEY,
    kind            TEXT NOT NULL,
    occurred_at_ms  INTEGER NOT NULL,
    payload         BLOB NOT NULL
) STRICT;

CREATE TABLE outbox_state (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    next_seq   INTEGER NOT NULL,
    acked_seq  INTEGER NOT NULL
) STRICT;
INSERT INTO outbox_state (id, next_seq, acked_seq) VALUES (1, 1, 0);

-- Commands applied from the controller's per-agent log (idempotency record).
CREATE TABLE applied_commands (
    seq         INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL,
    applied_at  TEXT NOT NULL,
    error       TEXT
) STRICT;

-- Ticket numbering per queue per business day (site-local date).
CREATE TABLE ticket_counters (
    queue         TEXT NOT NULL,
    business_day  TEXT NOT NULL,
    last_number   INTEGER NOT NULL,
    PRIMARY KEY (queue, business_day)
) STRICT;

CREATE TABLE visits (
    id            TEXT PRIMARY KEY,
    ticket        TEXT NOT NULL,
    service       TEXT NOT NULL,
    queue         TEXT NOT NULL,
    business_day  TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    TEXT NOT NULL
) STRICT;
CREATE INDEX visits_queue_status ON visits (queue, status, created_at);
