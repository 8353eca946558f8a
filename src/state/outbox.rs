//! The alert outbox and per-job failure streaks.
//!
//! What to mail and when is `crate::alert`'s business; this file only keeps
//! the rows. The functions taking a `&Connection` run inside a transaction
//! someone else opened (the one that closes a run), so an alert commits
//! together with the run it is about.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::{RunId, StateDb, StateError, parse_ts, ts};

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A run failed after its last retry.
    Failed,
    /// A run was left `running` by a process that died.
    Abandoned,
    /// A run exceeded the job's `timeout`.
    TimedOut,
    /// A run was not started because the org's API budget was too low.
    SkippedBudget,
    /// The first success after failures.
    Recovery,
    Test,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
            Self::TimedOut => "timed_out",
            Self::SkippedBudget => "skipped_budget",
            Self::Recovery => "recovery",
            Self::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "failed" => Self::Failed,
            "abandoned" => Self::Abandoned,
            "timed_out" => Self::TimedOut,
            "skipped_budget" => Self::SkippedBudget,
            "recovery" => Self::Recovery,
            "test" => Self::Test,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    Pending,
    Sent,
    /// Given up after the sender's last attempt; `last_error` says why.
    Failed,
}

impl OutboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "sent" => Self::Sent,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// A rendered email to queue.
#[derive(Debug, Clone)]
pub struct NewAlert {
    pub job: String,
    pub run_id: Option<RunId>,
    pub kind: AlertKind,
    pub error_class: Option<String>,
    pub failures: u32,
    pub recipients: Vec<String>,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
}

/// One outbox row.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxEntry {
    pub id: i64,
    pub job: String,
    pub run_id: Option<RunId>,
    pub kind: AlertKind,
    pub error_class: Option<String>,
    pub failures: u32,
    pub recipients: Vec<String>,
    pub subject: String,
    #[serde(skip)]
    pub body_text: String,
    #[serde(skip)]
    pub body_html: String,
    pub status: OutboxStatus,
    pub created_at: String,
    pub next_attempt_at: String,
    pub attempts: u32,
    pub last_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub sent_at: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct OutboxFilter {
    pub job: Option<String>,
    pub status: Option<OutboxStatus>,
    pub limit: Option<u32>,
}

/// A job's failure streak; the default is "healthy".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertStreak {
    pub first_failed_run: Option<RunId>,
    pub failures: u32,
    pub unmailed: u32,
    pub last_mailed_at: Option<DateTime<Utc>>,
}

/// The last run that committed, for "last good state" lines in mails.
#[derive(Debug, Clone)]
pub struct LastSuccess {
    pub run: RunId,
    pub finished_at: Option<String>,
    pub watermark: Option<String>,
}

const OUTBOX_COLUMNS: &str = "id, job, run_id, kind, error_class, failures, recipients, subject, body_text, body_html,
     status, created_at, next_attempt_at, attempts, last_attempt_at, last_error, sent_at";

fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEntry> {
    let kind: String = r.get(3)?;
    let recipients: String = r.get(6)?;
    let status: String = r.get(10)?;
    Ok(OutboxEntry {
        id: r.get(0)?,
        job: r.get(1)?,
        run_id: r.get(2)?,
        kind: AlertKind::parse(&kind).unwrap_or(AlertKind::Failed),
        error_class: r.get(4)?,
        failures: r.get(5)?,
        recipients: serde_json::from_str(&recipients).unwrap_or_default(),
        subject: r.get(7)?,
        body_text: r.get(8)?,
        body_html: r.get(9)?,
        status: OutboxStatus::parse(&status).unwrap_or(OutboxStatus::Pending),
        created_at: r.get(11)?,
        next_attempt_at: r.get(12)?,
        attempts: r.get(13)?,
        last_attempt_at: r.get(14)?,
        last_error: r.get(15)?,
        sent_at: r.get(16)?,
    })
}

/// Queues an email, due now. Returns its outbox id.
pub fn queue_alert(conn: &Connection, alert: &NewAlert, now: DateTime<Utc>) -> Result<i64, StateError> {
    // Recipients as JSON: a display name may itself contain a comma.
    let recipients = serde_json::to_string(&alert.recipients).unwrap_or_else(|_| "[]".into());
    conn.execute(
        "INSERT INTO alert_outbox (job, run_id, kind, error_class, failures, recipients, subject, body_text, body_html,
                                   created_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
        params![
            alert.job,
            alert.run_id,
            alert.kind.as_str(),
            alert.error_class,
            alert.failures,
            recipients,
            alert.subject,
            alert.body_text,
            alert.body_html,
            ts(now)
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn alert_streak(conn: &Connection, job: &str) -> Result<AlertStreak, StateError> {
    let row = conn
        .query_row(
            "SELECT first_failed_run, failures, unmailed, last_mailed_at FROM alert_streaks WHERE job = ?1",
            [job],
            |r| {
                Ok((
                    r.get::<_, Option<RunId>>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((first_failed_run, failures, unmailed, last)) = row else {
        return Ok(AlertStreak::default());
    };
    Ok(AlertStreak { first_failed_run, failures, unmailed, last_mailed_at: last.as_deref().map(parse_ts).transpose()? })
}

/// Stores a job's streak; a healthy (default) streak removes the row.
pub fn put_alert_streak(conn: &Connection, job: &str, streak: &AlertStreak) -> Result<(), StateError> {
    if *streak == AlertStreak::default() {
        conn.execute("DELETE FROM alert_streaks WHERE job = ?1", [job])?;
        return Ok(());
    }
    conn.execute(
        "INSERT INTO alert_streaks (job, first_failed_run, failures, unmailed, last_mailed_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (job) DO UPDATE SET first_failed_run = excluded.first_failed_run, failures = excluded.failures,
             unmailed = excluded.unmailed, last_mailed_at = excluded.last_mailed_at",
        params![job, streak.first_failed_run, streak.failures, streak.unmailed, streak.last_mailed_at.map(ts)],
    )?;
    Ok(())
}

pub fn last_success(conn: &Connection, job: &str) -> Result<Option<LastSuccess>, StateError> {
    let run = conn
        .query_row(
            // A manual watermark change is a history row, not a run.
            "SELECT id, finished_at FROM runs WHERE job = ?1 AND status = 'succeeded' AND trigger != 'watermark'
             ORDER BY id DESC LIMIT 1",
            [job],
            |r| Ok((r.get::<_, RunId>(0)?, r.get::<_, Option<String>>(1)?)),
        )
        .optional()?;
    let Some((run, finished_at)) = run else { return Ok(None) };
    let watermark =
        conn.query_row("SELECT value FROM watermarks WHERE job = ?1", [job], |r| r.get::<_, String>(0)).optional()?;
    Ok(Some(LastSuccess { run, finished_at, watermark }))
}

impl StateDb {
    /// Runs `f` in one write transaction (e.g. queueing an alert for a run
    /// closed elsewhere, such as an abandoned one).
    pub fn in_transaction<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StateError>) -> Result<T, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// The outbox, newest first.
    pub fn outbox(&self, filter: &OutboxFilter) -> Result<Vec<OutboxEntry>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM alert_outbox
             WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY id DESC LIMIT ?3"
        ))?;
        let limit = filter.limit.map_or(-1, i64::from);
        let rows = stmt.query_map(params![filter.job, filter.status.map(OutboxStatus::as_str), limit], outbox_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Takes up to `limit` pending alerts that are due (or all pending ones
    /// with `ignore_backoff`), oldest first, and leases them for `lease`:
    /// no other sender takes them until then, so one alert is never
    /// delivered by two senders at once.
    pub fn claim_due_alerts(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: u32,
        ignore_backoff: bool,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let due: Vec<OutboxEntry> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM alert_outbox
                 WHERE status = 'pending' AND (?3 OR next_attempt_at <= ?1)
                   AND (leased_until IS NULL OR leased_until <= ?1)
                 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![ts(now), limit, ignore_backoff], outbox_row)?;
            rows.collect::<Result<_, _>>()?
        };
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::minutes(5));
        for alert in &due {
            tx.execute("UPDATE alert_outbox SET leased_until = ?2 WHERE id = ?1", params![alert.id, ts(until)])?;
        }
        tx.commit()?;
        Ok(due)
    }

    pub fn mark_alert_sent(&self, id: i64, now: DateTime<Utc>) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE alert_outbox SET status = 'sent', attempts = attempts + 1, last_attempt_at = ?2, sent_at = ?2,
                 leased_until = NULL
             WHERE id = ?1",
            params![id, ts(now)],
        )?;
        Ok(())
    }

    /// Records a failed attempt: retried at `retry_at`, or given up (`failed`) when `None`.
    pub fn mark_alert_attempt_failed(
        &self,
        id: i64,
        now: DateTime<Utc>,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<(), StateError> {
        let status = if retry_at.is_some() { OutboxStatus::Pending } else { OutboxStatus::Failed };
        self.conn().execute(
            "UPDATE alert_outbox SET status = ?2, attempts = attempts + 1, last_attempt_at = ?3, last_error = ?4,
                 next_attempt_at = ?5, leased_until = NULL
             WHERE id = ?1",
            params![id, status.as_str(), ts(now), error, ts(retry_at.unwrap_or(now))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{RunCounts, RunEnd, RunStatus};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn alert(job: &str) -> NewAlert {
        NewAlert {
            job: job.into(),
            run_id: None,
            kind: AlertKind::Failed,
            error_class: Some("auth".into()),
            failures: 1,
            recipients: vec!["\"Ops, Data\" <ops@example.com>".into()],
            subject: "s".into(),
            body_text: "t".into(),
            body_html: "h".into(),
        }
    }

    #[test]
    fn an_alert_written_with_the_run_commits_with_it_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDb::open(&dir.path().join("state.db")).unwrap();
        let now = t("2026-01-01T00:00:00Z");
        let run = store.open_run("a", "manual", now).unwrap();
        let end = RunEnd {
            status: RunStatus::Failed,
            counts: RunCounts::default(),
            salesforce_job_ids: vec![],
            error_class: Some("auth".into()),
            error: Some("refused".into()),
        };
        let failed = store.finish_run_with(run, &end, None, now, |conn| {
            queue_alert(conn, &alert("a"), now)?;
            Err(StateError::BadTimestamp("forced".into()))
        });
        assert!(failed.is_err());
        assert!(store.outbox(&OutboxFilter::default()).unwrap().is_empty());
        assert_eq!(store.run(run).unwrap().unwrap().status, RunStatus::Running, "the close rolled back too");

        store.finish_run_with(run, &end, None, now, |conn| queue_alert(conn, &alert("a"), now).map(|_| ())).unwrap();
        let rows = store.outbox(&OutboxFilter::default()).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].recipients, vec!["\"Ops, Data\" <ops@example.com>".to_string()]);
        assert_eq!(store.run(run).unwrap().unwrap().status, RunStatus::Failed);
    }

    #[test]
    fn a_claimed_alert_is_not_due_again_until_its_lease_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDb::open(&dir.path().join("state.db")).unwrap();
        let now = t("2026-01-01T00:00:00Z");
        let id = store.in_transaction(|c| queue_alert(c, &alert("a"), now)).unwrap();
        let lease = Duration::from_secs(60);
        assert_eq!(store.claim_due_alerts(now, lease, 10, false).unwrap().len(), 1);
        assert!(store.claim_due_alerts(now, lease, 10, true).unwrap().is_empty(), "a second sender gets nothing");
        assert_eq!(store.claim_due_alerts(t("2026-01-01T00:01:00Z"), lease, 10, false).unwrap().len(), 1);

        store.mark_alert_attempt_failed(id, now, "connection refused", Some(t("2026-01-01T00:05:00Z"))).unwrap();
        assert!(store.claim_due_alerts(t("2026-01-01T00:04:59Z"), lease, 10, false).unwrap().is_empty());
        assert_eq!(store.claim_due_alerts(t("2026-01-01T00:04:59Z"), lease, 10, true).unwrap().len(), 1, "forced");
        store.mark_alert_sent(id, t("2026-01-01T00:05:00Z")).unwrap();
        let row = &store.outbox(&OutboxFilter::default()).unwrap()[0];
        assert_eq!((row.status, row.attempts), (OutboxStatus::Sent, 2));
        assert_eq!(row.last_error.as_deref(), Some("connection refused"));
        assert!(store.claim_due_alerts(t("2026-01-02T00:00:00Z"), lease, 10, true).unwrap().is_empty());
    }

    #[test]
    fn streaks_round_trip_and_a_healthy_one_leaves_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDb::open(&dir.path().join("state.db")).unwrap();
        let streak = AlertStreak {
            first_failed_run: None,
            failures: 3,
            unmailed: 2,
            last_mailed_at: Some(t("2026-01-01T00:00:00Z")),
        };
        store.in_transaction(|c| put_alert_streak(c, "a", &streak)).unwrap();
        assert_eq!(store.in_transaction(|c| alert_streak(c, "a")).unwrap(), streak);
        store.in_transaction(|c| put_alert_streak(c, "a", &AlertStreak::default())).unwrap();
        let rows: i64 = store.conn().query_row("SELECT count(*) FROM alert_streaks", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 0);
    }
}
