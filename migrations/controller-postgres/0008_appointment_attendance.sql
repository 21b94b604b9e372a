-- Appointment attendance as the branch reports it (issue 5: APPOINTMENT_STATUS events, applied
-- in the ingest transaction), whether an appointment was ever rescheduled, and the conflict a
-- central change met when the branch had already checked the customer in (the arrival wins).
ALTER TABLE appointments
    ADD COLUMN rescheduled   BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN attendance    TEXT,          -- NULL | arrived | called | completed | no_show
    ADD COLUMN attendance_at TIMESTAMPTZ,
    ADD COLUMN arrived_at    TIMESTAMPTZ,
    ADD COLUMN visit_id      TEXT,
    ADD COLUMN ticket        TEXT,
    ADD COLUMN conflict      TEXT,          -- NULL | cancelled_after_arrival | rescheduled_after_arrival
    ADD COLUMN conflict_at   TIMESTAMPTZ;
-- GET /api/v1/appointments?conflict=true: the few flagged ones, for admins.
CREATE INDEX appointments_conflicts ON appointments (starts_at) WHERE conflict IS NOT NULL;
