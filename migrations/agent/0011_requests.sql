-- Distributed service requests (issue 6), as this site holds them. `fields` is the JSON object
-- of the request's values, checked against its type (configuration). The distribution columns
-- say where the master copy is and how the request moved; a request created here is its own
-- master until a transfer moves the ownership.
CREATE TABLE requests (
    id               TEXT PRIMARY KEY,            -- UUIDv7, globally unique
    human_id         TEXT NOT NULL UNIQUE,        -- SFO-000123: the creating site and its sequence
    request_type     TEXT NOT NULL,
    fields           TEXT NOT NULL,               -- JSON object
    is_master        INTEGER NOT NULL,
    current_site     TEXT NOT NULL,               -- where the master copy is, as far as this site knows
    from_site        TEXT,
    to_site          TEXT,
    from_request_id  TEXT,
    to_request_id    TEXT,
    mapping          TEXT,
    transfer_status  TEXT,
    update_status    TEXT,
    history          TEXT NOT NULL,               -- JSON array of moves
    revision         INTEGER NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
) STRICT;
CREATE INDEX requests_by_type ON requests (request_type, updated_at);
CREATE INDEX requests_by_update ON requests (updated_at);

-- The site's human id sequence: never reused.
CREATE TABLE request_counter (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    last  INTEGER NOT NULL
) STRICT;
INSERT INTO request_counter (id, last) VALUES (1, 0);
