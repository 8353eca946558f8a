-- Run history: one row per run attempt.
CREATE TABLE runs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job              TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('running','succeeded','failed','cancelled','abandoned')),
    trigger          TEXT    NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 1,
    pid              INTEGER,
    started_at       TEXT    NOT NULL,
    finished_at      TEXT,
    window_start     TEXT,
    window_end       TEXT,
    watermark_before TEXT,
    watermark_after  TEXT,
    pages            INTEGER NOT NULL DEFAULT 0,
    rows_extracted   INTEGER NOT NULL DEFAULT 0,
    rows_rejected    INTEGER NOT NULL DEFAULT 0,
    rows_inserted    INTEGER NOT NULL DEFAULT 0,
    rows_updated     INTEGER NOT NULL DEFAULT 0,
    rows_unchanged   INTEGER NOT NULL DEFAULT 0,
    rows_deleted     INTEGER NOT NULL DEFAULT 0,
    sf_job_ids       TEXT    NOT NULL DEFAULT '',
    error_class      TEXT,
    error            TEXT
);
CREATE INDEX runs_by_job ON runs (job, id);

-- Time spent per pipeline step of a run.
CREATE TABLE run_steps (
    run_id      INTEGER NOT NULL REFERENCES runs (id),
    step        TEXT    NOT NULL,
    started_at  TEXT    NOT NULL,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, step)
);

-- The upper bound of the last window committed to the target, per job.
CREATE TABLE watermarks (
    job        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    run_id     INTEGER REFERENCES runs (id),
    updated_at TEXT NOT NULL
);

-- Rows the mapping rejected, kept for inspection (capped per run).
CREATE TABLE rejects (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs (id),
    record_id   TEXT,
    column_name TEXT NOT NULL,
    value       TEXT,
    reason      TEXT NOT NULL
);
CREATE INDEX rejects_by_run ON rejects (run_id);
