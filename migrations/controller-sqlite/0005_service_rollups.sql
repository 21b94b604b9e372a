-- Rollups by site, period, service and queue only (no counter/staff split): what site-, service-
-- and queue-level statistics read, at a fraction of the rows of rollup_day/rollup_month. Weekly
-- rows (ISO weeks, keyed by their Monday) answer weekly intervals. Histograms are now stored as
-- runs of consecutive buckets, so every rollup is recomputed from the facts.
CREATE TABLE rollup_service_day (
    site           TEXT NOT NULL,
    day            TEXT NOT NULL,
    service        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    visits         BIGINT NOT NULL,
    served         BIGINT NOT NULL,
    no_shows       BIGINT NOT NULL,
    waited         BIGINT NOT NULL,
    wait_sum_ms    BIGINT NOT NULL,
    wait_max_ms    BIGINT NOT NULL,
    waits          TEXT NOT NULL,
    served_waits   TEXT NOT NULL,
    service_sum_ms BIGINT NOT NULL,
    PRIMARY KEY (site, day, service, queue)
);
CREATE INDEX rollup_service_day_day ON rollup_service_day (day);

CREATE TABLE rollup_service_week (
    site           TEXT NOT NULL,
    week           TEXT NOT NULL,
    service        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    visits         BIGINT NOT NULL,
    served         BIGINT NOT NULL,
    no_shows       BIGINT NOT NULL,
    waited         BIGINT NOT NULL,
    wait_sum_ms    BIGINT NOT NULL,
    wait_max_ms    BIGINT NOT NULL,
    waits          TEXT NOT NULL,
    served_waits   TEXT NOT NULL,
    service_sum_ms BIGINT NOT NULL,
    PRIMARY KEY (site, week, service, queue)
);

CREATE TABLE rollup_service_month (
    site           TEXT NOT NULL,
    month          TEXT NOT NULL,
    service        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    visits         BIGINT NOT NULL,
    served         BIGINT NOT NULL,
    no_shows       BIGINT NOT NULL,
    waited         BIGINT NOT NULL,
    wait_sum_ms    BIGINT NOT NULL,
    wait_max_ms    BIGINT NOT NULL,
    waits          TEXT NOT NULL,
    served_waits   TEXT NOT NULL,
    service_sum_ms BIGINT NOT NULL,
    PRIMARY KEY (site, month, service, queue)
);

DELETE FROM rollup_day;
DELETE FROM rollup_month;
INSERT INTO rollup_dirty (site, day)
SELECT DISTINCT site, business_day FROM visit_facts WHERE true ON CONFLICT DO NOTHING;
