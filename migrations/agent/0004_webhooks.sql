-- Outbound webhooks: the last event sequence delivered to each configured webhook.
CREATE TABLE webhook_cursors (
    code        TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    updated_at  TEXT NOT NULL
) STRICT;
