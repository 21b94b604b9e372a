-- Retention (see `Store::apply_retention`). SQLite stays unpartitioned and removes old rows
-- with DELETE; these unique indexes are the conflict targets of the fact upserts, whose keys
-- include the time column PostgreSQL partitions by (visit_id stays unique on its own through
-- the primary key here).
CREATE UNIQUE INDEX visit_facts_visit_created ON visit_facts (visit_id, created_at);
CREATE UNIQUE INDEX transaction_facts_visit_n_entered ON transaction_facts (visit_id, n, entered_at);
