-- Console sign-ins, kept on the server: the session cookie holds a random id of which only the
-- SHA-256 is stored, bound to the API token the session was opened with (deleting the token
-- deletes its sessions), with the CSRF token its forms carry and an expiry.
CREATE TABLE console_sessions (
    id_hash       TEXT PRIMARY KEY,
    api_token_id  TEXT NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    csrf_token    TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX console_sessions_by_token ON console_sessions (api_token_id);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);
