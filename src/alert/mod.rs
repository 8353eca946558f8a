//! Failure and recovery emails.
//!
//! A run's alert is decided and rendered when the run closes, and written to
//! the outbox in the same transaction as the run row ([`queue_for_run`]);
//! a sender delivers it later with retries ([`deliver_due`], [`run_sender`]).
//! So a mail is never lost between "the run failed" and "the mail went out",
//! and an SMTP outage only delays it. Dedup state (a job's failure streak)
//! lives beside the outbox, so `repeat_after` holds across processes.

mod message;
mod rules;
mod send;

use std::time::Duration;

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use thiserror::Error;

pub use message::{Facts, Rendered, escape, remedy_for};
pub use rules::{Mail, Outcome, Policy, decide};
pub use send::{Delivery, Mailer, RetryPolicy, deliver_due, deliver_pending_now, run_sender};

use crate::config::{Connection, JobPlan, Project};
use crate::outcome::ErrorClass;
use crate::state::{
    AlertKind, NewAlert, OutboxEntry, RunCounts, RunId, StateError, StateStore, alert_streak, last_success,
    put_alert_streak, queue_alert,
};
use crate::window::Window;

#[derive(Debug, Error)]
pub enum AlertError {
    #[error(
        "nightjar.toml has no [smtp] section; add host, from (and port, security, username, password) to send email"
    )]
    NoSmtp,
    #[error("[smtp]: {0}")]
    Config(String),
    #[error("no recipients; set [alerts].email in nightjar.toml (or pass --to)")]
    NoRecipients,
    #[error("`{address}` is not an email address ({message}); fix [alerts].email")]
    Address { address: String, message: String },
    #[error("building the email failed: {0}")]
    Build(String),
    #[error("SMTP server {server}: {message}; check [smtp] host, port, security and credentials")]
    Send { server: String, message: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// Replaces every known secret value in `text`; a second line of defence
/// behind error types that never carry secrets in the first place.
pub fn redact<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        // Very short values would shred ordinary words and are no real secret anyway.
        if secret.len() >= 6 {
            out = out.replace(secret, "**redacted**");
        }
    }
    out
}

/// Every secret value in the configuration.
pub fn known_secrets(project: &Project) -> Vec<String> {
    let mut out = Vec::new();
    for conn in project.connections.values() {
        match conn {
            Connection::Salesforce(sf) => {
                out.extend(sf.client_secret.iter().chain(&sf.refresh_token).map(|s| s.expose().to_string()))
            }
            Connection::Postgres { url } => out.push(url.expose().to_string()),
            _ => {}
        }
    }
    out.extend(project.smtp.iter().filter_map(|s| s.password.as_ref()).map(|p| p.expose().to_string()));
    out.extend(project.server.trigger_token.iter().map(|t| t.expose().to_string()));
    out
}

/// What Salesforce itself said, when the failure came from it.
#[derive(Debug, Clone)]
pub struct SalesforceDetail {
    pub code: Option<String>,
    pub message: String,
    pub job_id: Option<String>,
}

/// A run's error, as an alert shows it.
#[derive(Debug, Clone)]
pub struct ErrorDetail {
    pub class: ErrorClass,
    pub message: String,
    pub salesforce: Option<SalesforceDetail>,
}

/// A job's alert settings, resolved from `[alerts]`, the job's `[alerts]` and `[server]`.
#[derive(Debug, Clone)]
pub struct JobAlerts {
    pub recipients: Vec<String>,
    pub policy: Policy,
    pub public_url: Option<String>,
    pub secrets: Vec<String>,
}

impl JobAlerts {
    pub fn for_job(project: &Project, job: &JobPlan) -> JobAlerts {
        let global = &project.alerts;
        let mut recipients: Vec<String> = Vec::new();
        for address in global.email.iter().chain(&job.alert_emails) {
            let address = address.trim().to_string();
            if !address.is_empty() && !recipients.contains(&address) {
                recipients.push(address);
            }
        }
        JobAlerts {
            recipients,
            policy: Policy {
                on_failure: global.on_failure,
                on_recovery: global.on_recovery,
                repeat_after: global.repeat_after,
            },
            public_url: project.server.public_url.clone(),
            secrets: known_secrets(project),
        }
    }
}

/// How a run ended, with what it learned on the way.
#[derive(Debug, Clone)]
pub struct RunFacts<'a> {
    pub job: &'a str,
    pub run: RunId,
    pub trigger: &'a str,
    pub outcome: Outcome,
    pub window: Option<Window>,
    pub full_refresh: bool,
    pub counts: &'a RunCounts,
    pub salesforce_job_ids: &'a [String],
    pub error: Option<ErrorDetail>,
    pub finished_at: DateTime<Utc>,
}

/// Decides whether the run's end is worth a mail and queues it. Call it
/// inside the transaction that closes the run
/// ([`StateStore::finish_run_with`]). Returns the outbox id when queued.
pub fn queue_for_run(
    conn: &rusqlite::Connection,
    settings: &JobAlerts,
    facts: &RunFacts<'_>,
) -> Result<Option<i64>, StateError> {
    let streak = alert_streak(conn, facts.job)?;
    // Without recipients nothing is mailed, but the streak is still kept so
    // the counts are right once someone adds an address.
    let mut policy = settings.policy;
    if settings.recipients.is_empty() {
        policy.on_failure = false;
        policy.on_recovery = false;
    }
    let (next, mail) = decide(&streak, facts.outcome, facts.run, &policy, facts.finished_at);
    put_alert_streak(conn, facts.job, &next)?;
    let Some(mail) = mail else { return Ok(None) };
    let last = last_success(conn, facts.job)?;
    let view = Facts {
        job: facts.job,
        run: facts.run,
        trigger: facts.trigger,
        kind: mail.kind,
        failures: mail.failures,
        streak_failures: if mail.kind == AlertKind::Recovery { streak.failures } else { next.failures },
        first_failed_run: if mail.kind == AlertKind::Recovery {
            streak.first_failed_run
        } else {
            next.first_failed_run
        },
        window: facts.window,
        full_refresh: facts.full_refresh,
        counts: facts.counts,
        salesforce_job_ids: facts.salesforce_job_ids,
        error: facts.error.as_ref(),
        // A recovery's own run is the last success; the mail shows the one before.
        last_success: last.as_ref().filter(|l| l.run != facts.run),
        finished_at: facts.finished_at,
        public_url: settings.public_url.as_deref(),
        repeat_after: settings.policy.repeat_after,
        on_recovery: policy.on_recovery,
    };
    let rendered = if mail.kind == AlertKind::Recovery { message::recovery(&view) } else { message::failure(&view) };
    let clean = |s: &str| redact(s, settings.secrets.iter().map(String::as_str));
    let alert = NewAlert {
        job: facts.job.to_string(),
        run_id: Some(facts.run),
        kind: mail.kind,
        error_class: facts.error.as_ref().map(|e| e.class.as_str().to_string()),
        failures: mail.failures,
        recipients: settings.recipients.clone(),
        subject: clean(&rendered.subject),
        body_text: clean(&rendered.text),
        body_html: clean(&rendered.html),
    };
    let id = queue_alert(conn, &alert, facts.finished_at)?;
    tracing::info!(job = facts.job, run = facts.run, alert = id, kind = mail.kind.as_str(), "alert email queued");
    Ok(Some(id))
}

/// The `[smtp]` mailer, if configured.
pub fn mailer(project: &Project) -> Result<Mailer, AlertError> {
    Mailer::new(project.smtp.as_ref().ok_or(AlertError::NoSmtp)?)
}

/// Sends a test email straight away (not through the outbox), to `to` or
/// else to `[alerts].email`.
pub async fn send_test(project: &Project, to: &[String]) -> Result<Vec<String>, AlertError> {
    let mailer = mailer(project)?;
    let recipients: Vec<String> = if to.is_empty() { project.alerts.email.clone() } else { to.to_vec() };
    let mail = message::test_mail(mailer.host(), mailer.port(), mailer.security(), Utc::now());
    mailer.send(&recipients, &mail.subject, &mail.text, &mail.html).await?;
    Ok(recipients)
}

/// The outbox as a table, newest first.
pub fn outbox_table(entries: &[OutboxEntry]) -> String {
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "id",
        "created (UTC)",
        "job",
        "run",
        "kind",
        "status",
        "attempts",
        "last attempt",
        "subject",
        "last error",
    ]);
    let short = |t: &str| t.replace('T', " ").chars().take(19).collect::<String>();
    for e in entries {
        table.add_row(vec![
            e.id.to_string(),
            short(&e.created_at),
            e.job.clone(),
            e.run_id.map(|r| r.to_string()).unwrap_or_default(),
            e.kind.as_str().to_string(),
            e.status.as_str().to_string(),
            e.attempts.to_string(),
            e.last_attempt_at.as_deref().map(short).unwrap_or_default(),
            e.subject.clone(),
            e.last_error.as_deref().map(|m| m.chars().take(100).collect()).unwrap_or_default(),
        ]);
    }
    table.to_string()
}

/// `nightjar run`'s single delivery pass: one try per due alert, the rest
/// stays for the next sender. Returns `None` without `[smtp]`.
pub async fn deliver_once(project: &Project, state: &StateStore) -> Result<Option<Delivery>, AlertError> {
    if project.smtp.is_none() {
        return Ok(None);
    }
    let mailer = mailer(project)?;
    Ok(Some(deliver_due(state, &mailer, &RetryPolicy::default()).await?))
}

/// The default pause between sender passes in `serve`.
pub const SENDER_POLL: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_known_secrets_but_not_short_values() {
        let text = "login with s3cr3t-value failed for abc";
        assert_eq!(redact(text, ["s3cr3t-value", "abc"]), "login with **redacted** failed for abc");
    }
}
