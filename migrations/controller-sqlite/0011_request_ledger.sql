-- Distributed requests (issue 6): the controller's ledger of every cross-site operation, who
-- holds each request's master, and which sites hold read-only copies.

-- One row per operation and target site (a broadcast has one row per site under one op_id).
-- status: queued (waiting behind a retry in its pool's lane to that site), pending (sent or
-- staged to the target), retry (the target refused for now; resent at next_attempt_at),
-- applied, failed (result: failure | timeout | cancelled), superseded (a newer update of the
-- same request to the same site replaced it).
CREATE TABLE request_ops (
    op_id              TEXT NOT NULL,
    target_site        TEXT NOT NULL,
    kind               TEXT NOT NULL,
    mode               TEXT,
    origin             TEXT NOT NULL,           -- site | controller
    request_id         TEXT NOT NULL,
    human_id           TEXT NOT NULL,
    source_site        TEXT NOT NULL,
    pool               TEXT NOT NULL,
    mapping            TEXT,
    rule               TEXT,
    update_policy      TEXT NOT NULL,
    keep_copy          BOOLEAN NOT NULL,
    status             TEXT NOT NULL,
    result             TEXT,
    reason             TEXT,
    attempt            INTEGER NOT NULL,
    agent_id           TEXT,                    -- the agent the current attempt went to
    command_seq        INTEGER,                    -- its REQUEST_APPLY in that agent's log
    payload            TEXT NOT NULL,           -- the REQUEST_APPLY (request state) to (re)send
    target_request_id  TEXT,
    requested_at       TEXT NOT NULL,            -- the source's clock
    created_at         TEXT NOT NULL,            -- when the ledger recorded it
    updated_at         TEXT NOT NULL,
    next_attempt_at    TEXT,
    completed_at       TEXT,
    PRIMARY KEY (op_id, target_site)
);
CREATE INDEX request_ops_open ON request_ops (status, created_at)
    WHERE status IN ('queued', 'pending', 'retry');
-- A lane (pool x target site) is held up only by what waits in it: kept small and partial so
-- the checks every settled operation makes stay O(1) however long the ledger grows.
CREATE INDEX request_ops_lane ON request_ops (pool, target_site, created_at)
    WHERE status IN ('queued', 'retry');
CREATE INDEX request_ops_by_request ON request_ops (request_id, created_at);

-- Who holds each request's master: master_site, or nobody while in_flight_op moves it (the
-- request is then in flight under that ledger entry), or nobody once deleted.
CREATE TABLE request_owners (
    request_id    TEXT PRIMARY KEY,
    human_id      TEXT NOT NULL,
    request_type  TEXT NOT NULL,
    master_site   TEXT,
    in_flight_op  TEXT,
    revision      INTEGER NOT NULL,
    state         TEXT NOT NULL,                -- the master's RequestState as last reported
    deleted_at    TEXT,
    updated_at    TEXT NOT NULL
);
CREATE INDEX request_owners_by_master ON request_owners (master_site);

-- Read-only copies and when they are updated (immediately, hourly, daily, on_return, never).
CREATE TABLE request_copies (
    request_id     TEXT NOT NULL,
    site           TEXT NOT NULL,
    update_policy  TEXT NOT NULL,
    mapping        TEXT,
    sent_revision  INTEGER NOT NULL,
    dirty          BOOLEAN NOT NULL,
    last_sent_at   TEXT,
    PRIMARY KEY (request_id, site)
);

-- Commands for agents decided in an ingest transaction, moved into the agents' command logs
-- right after its commit (one agent per transaction), so an ingest never locks another
-- agent's row and two ingests cannot deadlock.
CREATE TABLE staged_commands (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    payload      TEXT NOT NULL,
    op_id        TEXT,
    target_site  TEXT,
    created_at   TEXT NOT NULL
);
CREATE INDEX staged_commands_by_agent ON staged_commands (agent_id, id);
