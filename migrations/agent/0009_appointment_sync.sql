-- The nightly bulk sync of appointments (issue 5).
--
-- Which command or sync last wrote each appointment: the command's sequence for a live change,
-- the sync's `as_of_command_seq` for a bulk one. A sync replaces the appointments of its days
-- except those written by a command after its snapshot (they are newer than it).
ALTER TABLE appointments ADD COLUMN source_seq INTEGER NOT NULL DEFAULT 0;

-- Syncs the controller asked for (APPOINTMENTS_SYNC commands), newest wins: pending →
-- fetching → applied | failed | superseded. The manifest is recorded from the first chunk and
-- every later chunk (also of a resumed transfer) must repeat it.
CREATE TABLE appointment_sync_requests (
    sync_id            TEXT PRIMARY KEY,
    reason             TEXT NOT NULL,
    requested_at       TEXT NOT NULL,
    received_at        TEXT NOT NULL,
    state              TEXT NOT NULL,
    total_chunks       INTEGER,
    total_appointments INTEGER,
    from_day           TEXT,
    to_day             TEXT,
    as_of_command_seq  INTEGER,
    attempts           INTEGER NOT NULL DEFAULT 0,
    resumed            INTEGER NOT NULL DEFAULT 0,
    finished_at        TEXT,
    error              TEXT
) STRICT;

-- Chunks received and verified (SHA-256, decoded) but not yet applied: a cut transfer resumes
-- after the last one. Deleted when the sync is applied, fails or is superseded.
CREATE TABLE appointment_sync_chunks (
    sync_id  TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    payload  BLOB NOT NULL,
    PRIMARY KEY (sync_id, idx)
) STRICT;

-- The watermark: the sync whose set is in force.
CREATE TABLE appointment_sync_state (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    sync_id            TEXT NOT NULL,
    from_day           TEXT NOT NULL,
    to_day             TEXT NOT NULL,
    as_of_command_seq  INTEGER NOT NULL,
    appointments       INTEGER NOT NULL,
    applied_at         TEXT NOT NULL
) STRICT;
