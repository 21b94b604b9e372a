-- Remote upgrade rollouts (issue 7): a release (version, platform) rolled out to target sites in
-- waves, each site inside its maintenance window. The driver (controller::rollouts) moves a
-- rollout forward; agents' AGENT_UPGRADE_STATUS events update its sites in the ingest
-- transaction.

-- state: running | paused | halted | aborted | completed (the last three are final).
-- maintenance_window: JSON {"start": "HH:MM", "end": "HH:MM"} in each site's time, or NULL for
-- outside the site's business hours (the API calls it `window`, a reserved word in SQL).
CREATE TABLE rollouts (
    id                  TEXT PRIMARY KEY,          -- UUIDv7
    version             TEXT NOT NULL,
    platform            TEXT NOT NULL,
    targets             TEXT NOT NULL,             -- JSON: {"sites": [...]} | {"tag": T} | {"all": true}
    waves               TEXT NOT NULL,             -- JSON: [{"sites": N} | {"percent": P} | {"rest": true}]
    wave_count          INTEGER NOT NULL,           -- non-empty waves as planned (sites' wave is 1..wave_count)
    wave_pause_s        INTEGER NOT NULL,
    max_failures        INTEGER NOT NULL,
    maintenance_window  TEXT,
    allow_downgrade     BOOLEAN NOT NULL,
    health_timeout_s    INTEGER,                    -- NULL: the controller's rollout_health_timeout_s
    state               TEXT NOT NULL,
    current_wave        INTEGER NOT NULL,
    next_wave_at        TEXT,               -- the current wave is done: the next starts then
    created_by          TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    halted_reason       TEXT                       -- why it halted, or who aborted it
);
CREATE INDEX rollouts_by_created ON rollouts (created_at);
CREATE INDEX rollouts_unfinished ON rollouts (state) WHERE state IN ('running', 'paused');

-- One row per target site. state: pending | downloading | staged | switching | healthy |
-- rolled_back | failed | skipped. command_seq is the site's latest AGENT_UPGRADE in agent_id's
-- command log (NULL: never commanded), switch_before its window's end; cancel_seq the
-- AGENT_UPGRADE_CANCEL sent when the rollout stopped before the site switched.
-- active: the rollout is not finished and the site is not skipped at planning; a site is active
-- in at most one rollout (the unique index below is the guarantee, checked atomically at create).
CREATE TABLE rollout_sites (
    rollout_id     TEXT NOT NULL REFERENCES rollouts (id),
    site           TEXT NOT NULL,
    position       INTEGER NOT NULL,
    wave           INTEGER,
    agent_id       TEXT,
    state          TEXT NOT NULL,
    reason         TEXT,
    from_version   TEXT,
    to_version     TEXT NOT NULL,
    command_seq    INTEGER,
    commanded_at   TEXT,
    switch_before  TEXT,
    cancel_seq     INTEGER,
    active         BOOLEAN NOT NULL,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (rollout_id, site)
);
-- The sites in an unfinished rollout: at most one such rollout per site.
CREATE UNIQUE INDEX rollout_sites_active_site ON rollout_sites (site) WHERE active;
CREATE INDEX rollout_sites_by_site ON rollout_sites (site, rollout_id);
