-- One row per job being run right now: `serve`, `nightjar run` and any other
-- process sharing this state file take it before a run and delete it after,
-- so a job never runs twice at once. A row whose process is gone (same
-- host, pid not alive) is stale and may be taken over.
CREATE TABLE job_locks (
    job         TEXT    PRIMARY KEY,
    run_id      INTEGER REFERENCES runs (id),
    pid         INTEGER NOT NULL,
    host        TEXT    NOT NULL,
    acquired_at TEXT    NOT NULL
);

-- The host of the process that ran a run: crash recovery only judges runs
-- of its own host, where it can tell whether their pid is still alive.
ALTER TABLE runs ADD COLUMN host TEXT;

-- A retry's first attempt, so the attempts of one scheduled time read as a
-- series (`attempt` counts them).
ALTER TABLE runs ADD COLUMN retry_of INTEGER REFERENCES runs (id);

-- Salesforce API requests a run made (retries included): they count
-- against the org's daily allowance.
ALTER TABLE runs ADD COLUMN api_calls INTEGER NOT NULL DEFAULT 0;
