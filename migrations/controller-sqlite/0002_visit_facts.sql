-- Central statistics: one row per visit, projected from the events after a per-agent cursor.
CREATE TABLE fact_cursors (
    agent_id  TEXT PRIMARY KEY,
    seq       BIGINT NOT NULL
);

CREATE TABLE visit_facts (
    visit_id         TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL,
    site             TEXT NOT NULL,
    ticket           TEXT NOT NULL,
    service          TEXT NOT NULL,
    queue            TEXT NOT NULL,
    business_day     TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    first_called_at  TEXT,
    ended_at         TEXT,
    outcome          TEXT,
    waiting_ms       BIGINT,
    service_ms       BIGINT NOT NULL,
    counter          TEXT,
    staff            TEXT,
    transfers        INTEGER NOT NULL,
    recalls          INTEGER NOT NULL
);
CREATE INDEX visit_facts_site_day ON visit_facts (site, business_day);
