-- Appointments of this site, as the controller sent them (APPOINTMENT_UPSERT commands: today's
-- appointments live; the coming days by the nightly bulk sync, a later step). A row is only
-- ever replaced by a newer revision. Customer name and contact are personal data the branch
-- needs to receive the customer; they stay in this database.
CREATE TABLE appointments (
    id                TEXT PRIMARY KEY,
    service           TEXT NOT NULL,
    queue             TEXT,
    local_start       TEXT NOT NULL,   -- YYYY-MM-DDTHH:MM in the site's time zone
    local_day         TEXT NOT NULL,   -- YYYY-MM-DD
    starts_at         TEXT NOT NULL,   -- RFC 3339, UTC
    duration_minutes  INTEGER NOT NULL,
    customer_name     TEXT NOT NULL,
    customer_contact  TEXT,
    notes             TEXT,
    external_ref      TEXT,
    status            TEXT NOT NULL,
    revision          INTEGER NOT NULL,
    updated_at        TEXT NOT NULL,   -- the controller's time of the change
    received_at       TEXT NOT NULL    -- when this agent stored this revision
) STRICT;

CREATE INDEX appointments_by_day ON appointments (local_day, local_start);
