-- Statistics, second step: site-local creation time on visit facts, one row per visit
-- transaction (stint in one waiting place), service point and staff sessions, daily and monthly
-- rollups with waiting-time histograms, and quarantined events. Facts are rebuilt from the raw
-- events: the projector starts again from every agent's first event.
DELETE FROM visit_facts;
DELETE FROM fact_cursors;
ALTER TABLE visit_facts ADD COLUMN created_local TEXT NOT NULL DEFAULT '';

CREATE TABLE transaction_facts (
    visit_id       TEXT NOT NULL,
    n              INTEGER NOT NULL,
    agent_id       TEXT NOT NULL,
    site           TEXT NOT NULL,
    service        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    place          TEXT NOT NULL,
    business_day   TEXT NOT NULL,
    entered_at     TEXT NOT NULL,
    entered_local  TEXT NOT NULL,
    called_at      TEXT,
    ended_at       TEXT,
    outcome        TEXT,
    waiting_ms     BIGINT,
    service_ms     BIGINT NOT NULL,
    counter        TEXT,
    staff          TEXT,
    PRIMARY KEY (visit_id, n)
);
CREATE INDEX transaction_facts_site_day ON transaction_facts (site, business_day);
-- The live branch panel reads the open transactions.
CREATE INDEX transaction_facts_open ON transaction_facts (site) WHERE outcome IS NULL;

CREATE TABLE session_facts (
    agent_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    opened_at   TEXT NOT NULL,
    opened_local TEXT NOT NULL,
    site        TEXT NOT NULL,
    other       TEXT,
    closed_at   TEXT,
    serving_ms  BIGINT NOT NULL,
    served      INTEGER NOT NULL,
    PRIMARY KEY (agent_id, kind, subject, opened_at)
);
CREATE INDEX session_facts_open ON session_facts (agent_id) WHERE closed_at IS NULL;
CREATE INDEX session_facts_site ON session_facts (site, opened_local);

-- Rollups: tallies of visit facts per site-local business day (and calendar month), kept by
-- service, queue, counter and staff ('' for none). Recomputed from the facts of every site-day
-- a projection touched (rollup_dirty), so they always equal a recomputation.
CREATE TABLE rollup_day (
    site           TEXT NOT NULL,
    day            TEXT NOT NULL,
    service        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    counter        TEXT NOT NULL,
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
    PRIMARY KEY (site, day, service, queue, counter, staff)
);
CREATE INDEX rollup_day_day ON rollup_day (day);

CREATE TABLE rollup_month (
    site           TEXT NOT NULL,
    month          TEXT NOT NULL,
    service        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    counter        TEXT NOT NULL,
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
    PRIMARY KEY (site, month, service, queue, counter, staff)
);

CREATE TABLE rollup_dirty (
    site  TEXT NOT NULL,
    day   TEXT NOT NULL,
    PRIMARY KEY (site, day)
);

-- Events statistics set aside (undecodable, impossible), with the reason, for admins.
CREATE TABLE quarantined_events (
    agent_id     TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    site         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    -- 'ingest' (refused by the gateway, not in events) or 'projection' (kept in events).
    stage        TEXT NOT NULL,
    reason       TEXT NOT NULL,
    payload      TEXT NOT NULL,
    occurred_at  TEXT,
    received_at  TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
