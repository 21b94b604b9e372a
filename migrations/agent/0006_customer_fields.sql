-- Customer fields of a visit (personal data, all optional). They stay in this database: the
-- VISIT_CREATED event queued for the controller carries them only when the site's
-- configuration sets share_customer_data.
ALTER TABLE visits ADD COLUMN customer_name TEXT;
ALTER TABLE visits ADD COLUMN customer_phone TEXT;
ALTER TABLE visits ADD COLUMN customer_email TEXT;
ALTER TABLE visits ADD COLUMN customer_note TEXT;
