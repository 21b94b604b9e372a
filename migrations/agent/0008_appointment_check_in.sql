-- Check-in at the branch (issue 5): what the branch recorded of the customer's attendance.
-- These columns belong to the branch: a later snapshot from the controller
-- (`appointments::apply`) only ever updates the central columns, never these.
ALTER TABLE appointments ADD COLUMN attendance TEXT;       -- NULL | arrived | called | completed | no_show
ALTER TABLE appointments ADD COLUMN visit_id TEXT;         -- the visit the check-in created
ALTER TABLE appointments ADD COLUMN arrived_at TEXT;       -- RFC 3339, UTC
ALTER TABLE appointments ADD COLUMN arrived_day TEXT;      -- the site-local business day of the check-in
ALTER TABLE appointments ADD COLUMN attendance_at TEXT;    -- RFC 3339, UTC: the last attendance change
ALTER TABLE appointments ADD COLUMN conflict TEXT;         -- NULL | cancelled_after_arrival | rescheduled_after_arrival
ALTER TABLE appointments ADD COLUMN conflict_at TEXT;

-- The booking reference is the id's last 40 bits: the last ten hex digits of its text form.
CREATE INDEX appointments_by_reference ON appointments (substr(id, 27));
CREATE INDEX appointments_by_external_ref ON appointments (external_ref) WHERE external_ref IS NOT NULL;
-- Today's list shows an appointment checked in today even if central later moved it.
CREATE INDEX appointments_by_arrival_day ON appointments (arrived_day) WHERE arrived_day IS NOT NULL;
-- The visit lifecycle finds the appointment of a visit.
CREATE INDEX appointments_by_visit ON appointments (visit_id) WHERE visit_id IS NOT NULL;
