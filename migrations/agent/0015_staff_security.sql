-- A staff session is bound to the credential it was opened with (a digest of the user's password
-- hash and sign-out epoch): a password change or a central "sign out everywhere" ends it. The
-- workstation's counter belongs to the session, not to a client cookie. Sessions from before
-- this have no credential and end at once.
ALTER TABLE staff_sessions ADD COLUMN credential TEXT NOT NULL DEFAULT '';
ALTER TABLE staff_sessions ADD COLUMN counter TEXT;

-- Failed sign-ins per user ('user:<name>') and per source address ('address:<ip>'): after a few
-- free failures each further one locks the subject for twice as long as the last, up to a cap.
-- `unlock_epoch` is the user's central unlock epoch when the row was written: a higher one in
-- the configuration lifts the lock.
CREATE TABLE login_throttle (
    subject          TEXT PRIMARY KEY,
    failures         INTEGER NOT NULL,
    last_failure_ms  INTEGER NOT NULL,
    locked_until_ms  INTEGER NOT NULL,
    unlock_epoch     INTEGER NOT NULL DEFAULT 0
) STRICT;
