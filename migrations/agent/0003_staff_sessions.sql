-- Staff sessions for terminals: verified locally against the synced password hashes, so staff
-- log in and stay logged in with the controller unreachable. Only token hashes are stored.
CREATE TABLE staff_sessions (
    token_hash     TEXT PRIMARY KEY,
    username       TEXT NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL
) STRICT;
