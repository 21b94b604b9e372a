-- Call-next reads the longest-waiting visit of each place without scanning the queue.
CREATE INDEX visits_waiting_since ON visits (status, location_kind, location_code, waiting_since_ms);
