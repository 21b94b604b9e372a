-- Time partitioning: the raw events (by occurred_at), visit facts (by created_at) and
-- transaction facts (by entered_at) become RANGE-partitioned tables with one partition per UTC
-- calendar month, named <table>_pYYYY_MM, plus a DEFAULT partition <table>_default for rows of
-- months without a partition (agent clocks far off, a controller that was down for months).
-- Retention then drops whole months (`Store::apply_retention`), and the controller creates the
-- partitions of the current month and the next two ahead of time, at start-up and hourly
-- (`Store::prepare_partitions`).
--
-- Primary keys must contain the partition key. Events stay exactly-once per (agent, seq):
-- ingest inserts only sequences above the agent's acknowledgement under its row lock, and a
-- resent event carries the same occurred_at, so the key still refuses a true duplicate.
-- Other tables keep their layout.

-- Creates the partition of `parent` (partitioned by `col`) for the UTC month of `month` unless
-- it exists; returns its name when it created it, NULL otherwise. Partitions are created ahead
-- of time because PostgreSQL refuses a new partition while the DEFAULT partition holds rows of
-- its range; should that happen anyway, the rows are moved out of the DEFAULT partition (under
-- an exclusive lock on it) into the new partition, which is then attached.
-- Callers serialize on an advisory lock (see postgres.rs).
CREATE FUNCTION meridian_month_partition(parent TEXT, col TEXT, month DATE) RETURNS TEXT
LANGUAGE plpgsql AS $fn$
DECLARE
    first   DATE := CAST(date_trunc('month', month) AS DATE);
    name    TEXT := format('%s_p%s', parent, to_char(first, 'YYYY_MM'));
    dflt    TEXT := parent || '_default';
    lo      TIMESTAMPTZ := CAST(first AS TIMESTAMP) AT TIME ZONE 'UTC';
    hi      TIMESTAMPTZ := CAST(first + INTERVAL '1 month' AS TIMESTAMP) AT TIME ZONE 'UTC';
    strays  BOOLEAN;
BEGIN
    IF to_regclass(quote_ident(name)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= $1 AND %I < $2)', dflt, col, col)
        INTO strays USING lo, hi;
    IF NOT strays THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                       name, parent, lo, hi);
    ELSE
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', dflt);
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       name, parent);
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                       'INSERT INTO %I SELECT * FROM moved', dflt, col, col, name)
            USING lo, hi;
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       parent, name, lo, hi);
    END IF;
    RETURN name;
END
$fn$;

-- The old tables move aside; their rows move into the new ones below.
ALTER TABLE events RENAME TO events_pre0004;
ALTER INDEX events_pkey RENAME TO events_pre0004_pkey;
ALTER TABLE visit_facts RENAME TO visit_facts_pre0004;
ALTER INDEX visit_facts_pkey RENAME TO visit_facts_pre0004_pkey;
DROP INDEX visit_facts_site_day;
ALTER TABLE transaction_facts RENAME TO transaction_facts_pre0004;
ALTER INDEX transaction_facts_pkey RENAME TO transaction_facts_pre0004_pkey;
DROP INDEX transaction_facts_site_day;
DROP INDEX transaction_facts_open;

-- Raw events, exactly once per (agent, seq).
CREATE TABLE events (
    agent_id     TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    site         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    payload      JSONB NOT NULL,
    PRIMARY KEY (agent_id, seq, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE TABLE visit_facts (
    visit_id         TEXT NOT NULL,
    agent_id         TEXT NOT NULL,
    site             TEXT NOT NULL,
    ticket           TEXT NOT NULL,
    service          TEXT NOT NULL,
    queue            TEXT NOT NULL,
    business_day     TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    created_local    TEXT NOT NULL DEFAULT '',
    first_called_at  TIMESTAMPTZ,
    ended_at         TIMESTAMPTZ,
    outcome          TEXT,
    waiting_ms       BIGINT,
    service_ms       BIGINT NOT NULL,
    counter          TEXT,
    staff            TEXT,
    transfers        INTEGER NOT NULL,
    recalls          INTEGER NOT NULL,
    PRIMARY KEY (visit_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE visit_facts_default PARTITION OF visit_facts DEFAULT;
CREATE INDEX visit_facts_site_day ON visit_facts (site, business_day);

CREATE TABLE transaction_facts (
    visit_id       TEXT NOT NULL,
    n              INTEGER NOT NULL,
    agent_id       TEXT NOT NULL,
    site           TEXT NOT NULL,
    service        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    place          TEXT NOT NULL,
    business_day   TEXT NOT NULL,
    entered_at     TIMESTAMPTZ NOT NULL,
    entered_local  TEXT NOT NULL,
    called_at      TIMESTAMPTZ,
    ended_at       TIMESTAMPTZ,
    outcome        TEXT,
    waiting_ms     BIGINT,
    service_ms     BIGINT NOT NULL,
    counter        TEXT,
    staff          TEXT,
    PRIMARY KEY (visit_id, n, entered_at)
) PARTITION BY RANGE (entered_at);
CREATE TABLE transaction_facts_default PARTITION OF transaction_facts DEFAULT;
CREATE INDEX transaction_facts_site_day ON transaction_facts (site, business_day);
-- The live branch panel reads the open transactions.
CREATE INDEX transaction_facts_open ON transaction_facts (site) WHERE outcome IS NULL;

-- A partition for every month the old rows cover and for the current month and the next two,
-- so every moved row lands in its month and the DEFAULT partitions start empty.
DO $$
DECLARE
    t  RECORD;
    m  DATE;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('events', 'occurred_at'),
                                   ('visit_facts', 'created_at'),
                                   ('transaction_facts', 'entered_at')) AS v(parent, col)
    LOOP
        FOR m IN EXECUTE format(
            'SELECT DISTINCT CAST(date_trunc(''month'', %I AT TIME ZONE ''UTC'') AS DATE) FROM %I '
            'UNION SELECT CAST(date_trunc(''month'', now() AT TIME ZONE ''UTC'') + make_interval(months => k) AS DATE) '
            'FROM generate_series(0, 2) AS k ORDER BY 1',
            t.col, t.parent || '_pre0004')
        LOOP
            PERFORM meridian_month_partition(t.parent, t.col, m);
        END LOOP;
    END LOOP;
END
$$;

INSERT INTO events (agent_id, seq, site, kind, occurred_at, received_at, payload)
SELECT agent_id, seq, site, kind, occurred_at, received_at, payload FROM events_pre0004;

INSERT INTO visit_facts (visit_id, agent_id, site, ticket, service, queue, business_day,
                         created_at, created_local, first_called_at, ended_at, outcome,
                         waiting_ms, service_ms, counter, staff, transfers, recalls)
SELECT visit_id, agent_id, site, ticket, service, queue, business_day, created_at,
       created_local, first_called_at, ended_at, outcome, waiting_ms, service_ms, counter,
       staff, transfers, recalls
FROM visit_facts_pre0004;

INSERT INTO transaction_facts (visit_id, n, agent_id, site, service, queue, place, business_day,
                               entered_at, entered_local, called_at, ended_at, outcome,
                               waiting_ms, service_ms, counter, staff)
SELECT visit_id, n, agent_id, site, service, queue, place, business_day, entered_at,
       entered_local, called_at, ended_at, outcome, waiting_ms, service_ms, counter, staff
FROM transaction_facts_pre0004;

DROP TABLE events_pre0004;
DROP TABLE visit_facts_pre0004;
DROP TABLE transaction_facts_pre0004;
