-- Distributed requests (issue 6): operations between sites.
-- `pending_op`: the operation this site started that moves the ownership away (an ownership
-- transfer or a return); while it is set the copy is read-only here and the request is in
-- flight under the controller's ledger entry of that operation. `transfer_error`: why the last
-- operation this site started failed.
ALTER TABLE requests ADD COLUMN pending_op TEXT;
ALTER TABLE requests ADD COLUMN transfer_error TEXT;
CREATE INDEX requests_by_pending_op ON requests (pending_op) WHERE pending_op IS NOT NULL;

-- Ownership transfers and returns coming in, staged until the controller commits them
-- (REQUEST_COMMIT: the request becomes this site's master) or aborts them (REQUEST_ABORT).
-- `state` is the request as it will be stored here: already mapped to this site's type.
CREATE TABLE request_staged (
    op_id        TEXT PRIMARY KEY,
    request_id   TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,
    source_site  TEXT NOT NULL,
    mapping      TEXT,
    state        TEXT NOT NULL,
    staged_at    TEXT NOT NULL
) STRICT;

-- When each time-triggered distribution rule (a cron schedule or the close of business, in the
-- site's time zone) runs next; a run missed while the agent was down happens at the next sweep.
CREATE TABLE request_rule_schedule (
    rule    TEXT PRIMARY KEY,
    due_at  TEXT
) STRICT;
