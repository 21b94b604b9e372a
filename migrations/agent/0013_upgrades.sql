-- Remote upgrades of the agent itself (issue 7). Additive only: an older agent (after a
-- rollback) opens a database a newer one migrated.
--
-- One row per rollout that sent this agent an AGENT_UPGRADE, written in the command's
-- transaction. `state`: pending -> downloading -> staged -> switching -> healthy | rolled_back,
-- or failed (refused or impossible, with `reason`), cancelled (AGENT_UPGRADE_CANCEL) or
-- superseded (a newer AGENT_UPGRADE). At most one row is open (pending, downloading, staged):
-- the newest command wins. `manifest` is the signed release manifest as received (JSON);
-- `switch_before` ends the window in which the agent may switch (UTC, RFC 3339).
-- `reported` is the last phase queued as AGENT_UPGRADE_STATUS, so each phase goes out once.
CREATE TABLE upgrades (
    rollout_id        TEXT PRIMARY KEY,
    command_seq       INTEGER NOT NULL,
    version           TEXT NOT NULL,
    platform          TEXT NOT NULL,
    sha256            TEXT NOT NULL,
    manifest          TEXT NOT NULL,
    allow_downgrade   INTEGER NOT NULL,
    switch_before     TEXT NOT NULL,
    health_timeout_s  INTEGER NOT NULL,
    state             TEXT NOT NULL,
    reason            TEXT,
    reported          TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    resumed           INTEGER NOT NULL DEFAULT 0,
    received_at       TEXT NOT NULL,
    updated_at        TEXT NOT NULL
) STRICT;

CREATE INDEX upgrades_open ON upgrades (received_at)
    WHERE state IN ('pending', 'downloading', 'staged');
