-- Rows Salesforce said the query job produced (numberRecordsProcessed),
-- beside the rows received (`rows_extracted`); NULL for runs that never got
-- that far, and for runs recorded before nightjar compared the two.
ALTER TABLE runs ADD COLUMN rows_reported INTEGER;
