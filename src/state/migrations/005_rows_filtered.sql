-- Rows a mapping's `filter` dropped: wanted out, so not rejects, but counted
-- so `extracted = filtered + rejected + loaded` adds up in history.
ALTER TABLE runs ADD COLUMN rows_filtered INTEGER NOT NULL DEFAULT 0;
