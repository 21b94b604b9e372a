-- Telling a restored store apart on either end of a session (see docs/protocol.md, "Restored
-- stores").

-- A random nonce per logged command (0 for commands logged before nonces existed): an agent
-- names the nonce of the last command it applied, so a command log restored from a dump is
-- told apart from the one the agent followed.
ALTER TABLE agent_commands ADD COLUMN nonce BIGINT NOT NULL DEFAULT 0;

-- Each agent's outbox lineage as last reported: the segments (store incarnations) that wrote
-- its events, by first sequence.
CREATE TABLE agent_lineage (
    agent_id    TEXT NOT NULL,
    first_seq   BIGINT NOT NULL,
    segment_id  BIGINT NOT NULL,
    -- Set on a segment a renumbering continued in (see meridian_shared::lineage::Origin).
    origin_keep_through  BIGINT,
    origin_base          BIGINT,
    origin_moved_head    BIGINT,
    PRIMARY KEY (agent_id, first_seq)
);

-- What the start of a session found and repaired: an agent restored from a backup, a
-- controller database restored from a dump, a gap of events the controller will never have.
-- Shown on the agent's row until an admin acknowledges it.
CREATE TABLE agent_incidents (
    id               TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL,
    site             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    summary          TEXT NOT NULL,
    gap_first        BIGINT,
    gap_last         BIGINT,
    occurred_at      TEXT NOT NULL,
    acknowledged_at  TEXT,
    acknowledged_by  TEXT
);
CREATE INDEX agent_incidents_agent ON agent_incidents (agent_id, occurred_at);
CREATE INDEX agent_incidents_open ON agent_incidents (occurred_at) WHERE acknowledged_at IS NULL;
