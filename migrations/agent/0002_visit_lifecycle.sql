-- Visit lifecycle: where a visit waits, who called and serves it, how it ended; counters.
ALTER TABLE visits ADD COLUMN outcome TEXT;
ALTER TABLE visits ADD COLUMN location_kind TEXT;
ALTER TABLE visits ADD COLUMN location_code TEXT;
-- Order within the place it waits (lower first), and since when it waits there (ms).
ALTER TABLE visits ADD COLUMN sort_key INTEGER NOT NULL DEFAULT 0;
ALTER TABLE visits ADD COLUMN waiting_since_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE visits ADD COLUMN counter TEXT;
ALTER TABLE visits ADD COLUMN staff TEXT;
ALTER TABLE visits ADD COLUMN recalls INTEGER NOT NULL DEFAULT 0;
ALTER TABLE visits ADD COLUMN called_at_ms INTEGER;
ALTER TABLE visits ADD COLUMN serving_at_ms INTEGER;
ALTER TABLE visits ADD COLUMN ended_at_ms INTEGER;

UPDATE visits SET location_kind = 'queue', location_code = queue,
    waiting_since_ms = CAST(strftime('%s', created_at) AS INTEGER) * 1000,
    sort_key = CAST(strftime('%s', created_at) AS INTEGER) * 1000
WHERE status = 'waiting';

CREATE INDEX visits_waiting ON visits (status, location_kind, location_code, sort_key);
CREATE INDEX visits_ticket ON visits (ticket, business_day);
-- A counter has at most one current (called or serving) visit: two counters can never hold the
-- same visit, and one counter never holds two.
CREATE UNIQUE INDEX visits_current_per_counter ON visits (counter) WHERE status IN ('called', 'serving');

CREATE TABLE service_points (
    code        TEXT PRIMARY KEY,
    open        INTEGER NOT NULL,
    staff       TEXT,
    changed_at  TEXT NOT NULL
) STRICT;
