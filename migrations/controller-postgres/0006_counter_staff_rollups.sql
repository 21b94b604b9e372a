-- Monthly rollups by site, service and counter, and by site, service and staff member: what
-- statistics per counter or per staff member over whole months read, at a fraction of the rows
-- of rollup_month (which splits every counter by staff and queue). Filled by refresh_rollups
-- from the fine monthly rows; marking one day of every rollup month recomputes its month.
CREATE TABLE rollup_counter_month (
    site           TEXT NOT NULL,
    month          TEXT NOT NULL,
    service        TEXT NOT NULL,
    counter        TEXT NOT NULL,
    visits         BIGINT NOT NULL,
    served         BIGINT NOT NULL,
    no_shows       BIGINT NOT NULL,
    waited         BIGINT NOT NULL,
    wait_sum_ms    BIGINT NOT NULL,
    wait_max_ms    BIGINT NOT NULL,
    waits          TEXT NOT NULL,
    served_waits   TEXT NOT NULL,
    service_sum_ms BIGINT NOT NULL,
    PRIMARY KEY (site, month, service, counter)
);

CREATE TABLE rollup_staff_month (
    site           TEXT NOT NULL,
    month          TEXT NOT NULL,
    service        TEXT NOT NULL,
    staff          TEXT NOT NULL,
    visits         BIGINT NOT NULL,
    served         BIGINT NOT NULL,
    no_shows       BIGINT NOT NULL,
    waited         BIGINT NOT NULL,
    wait_sum_ms    BIGINT NOT NULL,
    wait_max_ms    BIGINT NOT NULL,
    waits          TEXT NOT NULL,
    served_waits   TEXT NOT NULL,
    service_sum_ms BIGINT NOT NULL,
    PRIMARY KEY (site, month, service, staff)
);

INSERT INTO rollup_dirty (site, day)
SELECT site, MIN(day) FROM rollup_day WHERE true GROUP BY site, substr(day, 1, 7)
ON CONFLICT DO NOTHING;
