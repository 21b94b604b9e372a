-- The nightly bulk sync of appointments (issue 5). One row per sync of one agent: requested
-- (an APPOINTMENTS_SYNC command is in the agent's log), sending (the snapshot was taken at the
-- agent's first fetch and is kept, chunked, until the sync ends, so a cut transfer resumes on
-- the same data), then completed or failed as the agent reports (APPOINTMENTS_SYNCED /
-- APPOINTMENTS_SYNC_FAILED events), or superseded by a newer sync of the same agent.
CREATE TABLE appointment_syncs (
    id                 TEXT PRIMARY KEY,
    site               TEXT NOT NULL,
    agent_id           TEXT NOT NULL,
    reason             TEXT NOT NULL,
    state              TEXT NOT NULL,
    requested_at       TIMESTAMPTZ NOT NULL,
    snapshot_at        TIMESTAMPTZ,
    from_day           TEXT,
    to_day             TEXT,
    as_of_command_seq  BIGINT,
    chunks             INTEGER,
    appointments       BIGINT,
    chunks_served      BIGINT NOT NULL DEFAULT 0,
    resumed            INTEGER NOT NULL DEFAULT 0,
    finished_at        TIMESTAMPTZ,
    error              TEXT
);
CREATE INDEX appointment_syncs_site ON appointment_syncs (site, requested_at);
CREATE INDEX appointment_syncs_agent ON appointment_syncs (agent_id, state);

-- The snapshot of a sync, in chunks (a JSON array of appointment snapshots each, with its
-- SHA-256). Deleted when the sync ends.
CREATE TABLE appointment_sync_chunks (
    sync_id  TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    payload  BYTEA NOT NULL,
    sha256   BYTEA NOT NULL,
    PRIMARY KEY (sync_id, idx)
);

-- When each site's nightly sync is next due (computed from the site's `appointment_sync.at`
-- in its time zone). The scheduler claims a due row by moving `next_due_at` forward in the
-- transaction that requests the syncs, so a run happens once however many replicas tick.
CREATE TABLE appointment_sync_schedule (
    site         TEXT PRIMARY KEY,
    next_due_at  TIMESTAMPTZ NOT NULL,
    last_run_at  TIMESTAMPTZ
);
