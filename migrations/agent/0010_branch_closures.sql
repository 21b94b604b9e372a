-- Closures the branch decides on its own (issue 5, conflict rules): part of a site-local day
-- closed by staff. Sent to the controller as BRANCH_CLOSED / BRANCH_REOPENED events; an
-- appointment booked centrally into an open closure is flagged `slot_closed_at_branch`.
CREATE TABLE branch_closures (
    id           TEXT PRIMARY KEY,
    day          TEXT NOT NULL,   -- YYYY-MM-DD, site-local
    from_time    TEXT NOT NULL,   -- HH:MM, site wall clock, inclusive
    to_time      TEXT NOT NULL,   -- HH:MM, exclusive
    reason       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    reopened_at  TEXT
) STRICT;
CREATE INDEX branch_closures_by_day ON branch_closures (day) WHERE reopened_at IS NULL;
