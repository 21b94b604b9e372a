-- Appointment attendance as the branch reports it (issue 5: APPOINTMENT_STATUS events, applied
-- in the ingest transaction), whether an appointment was ever rescheduled, and the conflict a
-- central change met when the branch had already checked the customer in (the arrival wins).
ALTER TABLE appointments ADD COLUMN rescheduled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE appointments ADD COLUMN attendance TEXT;       -- NULL | arrived | called | completed | no_show
ALTER TABLE appointments ADD COLUMN attendance_at TEXT;
ALTER TABLE appointments ADD COLUMN arrived_at TEXT;
ALTER TABLE appointments ADD COLUMN visit_id TEXT;
ALTER TABLE appointments ADD COLUMN ticket TEXT;
ALTER TABLE appointments ADD COLUMN conflict TEXT;         -- NULL | cancelled_after_arrival | rescheduled_after_arrival
ALTER TABLE appointments ADD COLUMN conflict_at TEXT;
CREATE INDEX appointments_conflicts ON appointments (starts_at) WHERE conflict IS NOT NULL;
