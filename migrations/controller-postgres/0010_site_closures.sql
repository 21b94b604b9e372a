-- Closures a branch decided on its own (issue 5, conflict rules), as its agent reported them
-- (BRANCH_CLOSED / BRANCH_REOPENED events, applied in the ingest transaction): part of a
-- site-local day, [from_time, to_time) in the site's wall clock. While one is open, bookings
-- and reschedules into it are refused; appointments booked into it before central knew are
-- flagged 'slot_closed_at_branch'.
CREATE TABLE site_closures (
    id           TEXT PRIMARY KEY,
    site         TEXT NOT NULL,
    day          TEXT NOT NULL,
    from_time    TEXT NOT NULL,
    to_time      TEXT NOT NULL,
    reason       TEXT NOT NULL,
    closed_at    TIMESTAMPTZ NOT NULL,
    reopened_at  TIMESTAMPTZ
);
CREATE INDEX site_closures_by_day ON site_closures (site, day);
