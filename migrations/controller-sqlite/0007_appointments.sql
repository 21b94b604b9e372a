-- Appointments booked centrally (issue 5). One row per appointment; a reschedule moves the row
-- (new start, revision bumped), a cancellation keeps it with status 'cancelled'. Every change
-- bumps `revision` (optimistic concurrency for clients). Bookings are serialised by SQLite's
-- write transactions (`BEGIN IMMEDIATE`: one writer at a time), so the capacity check and the
-- insert cannot race. Times are stored as text like every other SQLite timestamp here.
CREATE TABLE appointments (
    id                TEXT PRIMARY KEY,
    site              TEXT NOT NULL,
    service           TEXT NOT NULL,
    -- The start as an instant, and as the site's wall-clock time `YYYY-MM-DDTHH:MM` (what the
    -- customer was told) with its local day `YYYY-MM-DD`.
    starts_at         TEXTNOT NULL,
    local_start       TEXT NOT NULL,
    local_day         TEXT NOT NULL,
    duration_minutes  INTEGER NOT NULL,
    customer_name     TEXT NOT NULL,
    customer_contact  TEXT,
    notes             TEXT,
    external_ref      TEXT,
    status            TEXT NOT NULL,
    cancel_reason     TEXT,
    revision          INTEGER NOT NULL,
    created_at        TEXTNOT NULL,
    updated_at        TEXTNOT NULL
);
CREATE INDEX appointments_site_day ON appointments (site, local_day);
-- An external reference (a CRM's booking id) names one appointment per site; NULLs never clash.
CREATE UNIQUE INDEX appointments_site_external_ref ON appointments (site, external_ref);
