-- Emails waiting to be sent, sent, or given up on. A row is written in the
-- same transaction that closes the run it is about, so no alert is lost
-- between "the run failed" and "the mail went out".
CREATE TABLE alert_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job             TEXT    NOT NULL,
    run_id          INTEGER REFERENCES runs (id),
    kind            TEXT    NOT NULL CHECK (kind IN ('failed','abandoned','timed_out','skipped_budget','recovery','test')),
    error_class     TEXT,
    -- Failures this mail speaks for: 1 for the first mail of a streak, more
    -- for a repeat or a recovery mail.
    failures        INTEGER NOT NULL DEFAULT 1,
    recipients      TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    body_text       TEXT    NOT NULL,
    body_html       TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','sent','failed')),
    created_at      TEXT    NOT NULL,
    next_attempt_at TEXT    NOT NULL,
    -- Set by the sender trying it, so two senders sharing the state DB never
    -- deliver one alert twice.
    leased_until    TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_attempt_at TEXT,
    last_error      TEXT,
    sent_at         TEXT
);
CREATE INDEX alert_outbox_due ON alert_outbox (status, next_attempt_at);
CREATE INDEX alert_outbox_by_job ON alert_outbox (job, id);

-- Per job: the failure streak in progress, for repeat_after and recovery mails.
CREATE TABLE alert_streaks (
    job               TEXT PRIMARY KEY,
    first_failed_run  INTEGER REFERENCES runs (id),
    failures          INTEGER NOT NULL DEFAULT 0,
    -- Failures since the last failure mail that no mail has mentioned yet.
    unmailed          INTEGER NOT NULL DEFAULT 0,
    last_mailed_at    TEXT
);
