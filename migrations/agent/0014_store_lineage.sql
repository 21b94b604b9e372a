-- Telling a store restored from a backup apart from the one that went on.
--
-- Every opening of the store starts a new segment of the outbox (a random id and the first
-- sequence numbered in it); the segments covering unacknowledged events are reported in Hello.
-- The first segment covers every event not yet acknowledged.
CREATE TABLE outbox_lineage (
    first_seq   INTEGER PRIMARY KEY,
    segment_id  INTEGER NOT NULL,
    -- Set on a segment a renumbering continued in (see meridian_shared::lineage::Origin).
    origin_keep_through  INTEGER,
    origin_base          INTEGER,
    origin_moved_head    INTEGER
) STRICT;
INSERT INTO outbox_lineage (first_seq, segment_id)
    SELECT acked_seq + 1, (abs(random()) % 4000000000000000000) + 1 FROM outbox_state;

-- The ranges of sequences renumberings skipped (the controller held them then).
CREATE TABLE outbox_holes (
    first_seq  INTEGER PRIMARY KEY,
    last_seq   INTEGER NOT NULL
) STRICT;

-- The nonce of each applied command (0: applied before nonces existed).
ALTER TABLE applied_commands ADD COLUMN nonce INTEGER NOT NULL DEFAULT 0;

-- Commands applied from a controller log that was later found older than what was applied
-- (its database restored from a dump): set aside by nonce, so the same command streamed again
-- under another sequence is recorded without being applied twice.
CREATE TABLE set_aside_commands (
    nonce        INTEGER PRIMARY KEY,
    seq          INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    set_aside_at TEXT NOT NULL
) STRICT;

-- What the agent learned about restores at the start of a session, for the branch status page.
CREATE TABLE store_notices (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    at          TEXT NOT NULL
) STRICT;
