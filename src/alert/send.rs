//! Delivery: lettre over SMTP, and the outbox sender that retries with
//! backoff until the mail is accepted (Invariant 9: no alert lost).

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{AlertError, redact};
use crate::backoff::Backoff;
use crate::config::{Secret, SmtpSecurity, SmtpSettings};
use crate::state::StateStore;

/// An SMTP client for the `[smtp]` settings.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    host: String,
    port: u16,
    security: SmtpSecurity,
    /// Bounds one whole conversation: lettre's own timeout covers the
    /// socket's reads and writes but not every wait (a server that accepts
    /// and never greets), so the send is also cut off from outside.
    timeout: Duration,
    /// Kept to scrub it from any error text before it is stored or printed.
    password: Option<Secret>,
}

impl Mailer {
    pub fn new(smtp: &SmtpSettings) -> Result<Mailer, AlertError> {
        let host = smtp.host.clone();
        let port = smtp.port;
        let builder = match smtp.security {
            SmtpSecurity::None => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)),
            SmtpSecurity::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host),
            SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&host),
        };
        let mut builder = builder
            .map_err(|e| AlertError::Config(format!("cannot set up TLS for `{host}`: {e}")))?
            .port(port)
            .timeout(Some(smtp.timeout));
        if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.expose().to_string()));
        }
        let from = smtp.from.as_str();
        let from: Mailbox = from
            .parse()
            .map_err(|e| AlertError::Config(format!("`from = \"{from}\"` is not an email address ({e})")))?;
        Ok(Mailer {
            transport: builder.build(),
            from,
            host,
            port,
            security: smtp.security,
            timeout: smtp.timeout,
            password: smtp.password.clone(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn security(&self) -> &'static str {
        match self.security {
            SmtpSecurity::None => "none",
            SmtpSecurity::Starttls => "starttls",
            SmtpSecurity::Tls => "tls",
        }
    }

    /// Sends one multipart (plain text + HTML) email; `Ok` once the server accepted it.
    pub async fn send(&self, recipients: &[String], subject: &str, text: &str, html: &str) -> Result<(), AlertError> {
        if recipients.is_empty() {
            return Err(AlertError::NoRecipients);
        }
        let mut builder = Message::builder().from(self.from.clone()).subject(subject);
        for to in recipients {
            let mailbox = to
                .parse::<Mailbox>()
                .map_err(|e| AlertError::Address { address: to.clone(), message: e.to_string() })?;
            builder = builder.to(mailbox);
        }
        let message = builder
            .multipart(MultiPart::alternative_plain_html(text.to_string(), html.to_string()))
            .map_err(|e| AlertError::Build(e.to_string()))?;
        let server = format!("{}:{}", self.host, self.port);
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Ok(sent) => sent.map(drop).map_err(|e| AlertError::Send {
                server,
                message: redact(&e.to_string(), self.password.iter().map(Secret::expose)),
            }),
            Err(_) => Err(AlertError::Send {
                server,
                message: format!(
                    "no complete answer within {} (connect, greeting, TLS and replies); the server may be overloaded or not speak SMTP on this port",
                    humantime::format_duration(self.timeout)
                ),
            }),
        }
    }
}

/// How the outbox sender retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Pause after each failed attempt: doubling, with jitter.
    pub backoff: Backoff,
    /// After this many attempts the alert is marked `failed` and left for a person.
    pub max_attempts: u32,
    /// How long a claimed alert is hidden from other senders while one tries it.
    pub lease: Duration,
    /// Alerts taken per pass.
    pub batch: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // 48 attempts, at most 30 minutes apart: a day of SMTP outage loses nothing.
        RetryPolicy {
            backoff: Backoff::new(Duration::from_secs(30), Duration::from_secs(30 * 60)),
            max_attempts: 48,
            // Longer than one send may take (the [smtp] timeout is at most 10m).
            lease: Duration::from_secs(15 * 60),
            batch: 50,
        }
    }
}

/// What one pass over the outbox did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    pub sent: u32,
    /// Failed this time, to be retried later.
    pub retrying: u32,
    /// Failed for the last time (status `failed`).
    pub given_up: u32,
    pub last_error: Option<String>,
}

/// One pass: tries every due alert once.
pub async fn deliver_due(state: &StateStore, mailer: &Mailer, policy: &RetryPolicy) -> Result<Delivery, AlertError> {
    deliver(state, mailer, policy, false).await
}

/// One pass over every pending alert, backing off or not (`nightjar alerts
/// send`: a person fixed the SMTP settings and wants the mail out now).
pub async fn deliver_pending_now(
    state: &StateStore,
    mailer: &Mailer,
    policy: &RetryPolicy,
) -> Result<Delivery, AlertError> {
    deliver(state, mailer, policy, true).await
}

async fn deliver(
    state: &StateStore,
    mailer: &Mailer,
    policy: &RetryPolicy,
    ignore_backoff: bool,
) -> Result<Delivery, AlertError> {
    let clock = Utc::now;
    let mut report = Delivery::default();
    for alert in state.claim_due_alerts(clock(), policy.lease, policy.batch, ignore_backoff).await? {
        match mailer.send(&alert.recipients, &alert.subject, &alert.body_text, &alert.body_html).await {
            Ok(()) => {
                state.mark_alert_sent(alert.id, clock()).await?;
                tracing::info!(alert = alert.id, job = %alert.job, kind = alert.kind.as_str(), "alert email sent");
                report.sent += 1;
            }
            Err(e) => {
                let attempts = alert.attempts + 1;
                let message = e.to_string();
                let now = clock();
                let retry_at = (attempts < policy.max_attempts)
                    .then(|| now + chrono::Duration::from_std(policy.backoff.delay(attempts)).unwrap_or_default());
                state.mark_alert_attempt_failed(alert.id, now, &message, retry_at).await?;
                match retry_at {
                    Some(at) => {
                        tracing::warn!(alert = alert.id, job = %alert.job, attempts, retry_at = %at, error = %message, "alert email not sent; will retry");
                        report.retrying += 1;
                    }
                    None => {
                        tracing::error!(alert = alert.id, job = %alert.job, attempts, error = %message, "alert email given up; see `nightjar alerts`");
                        report.given_up += 1;
                    }
                }
                report.last_error = Some(message);
            }
        }
    }
    Ok(report)
}

/// The sender loop `serve` runs: a pass every `poll` until `stop` resolves.
/// A state DB error is logged and the loop goes on; the next pass retries.
/// `stop` ends a pass in the middle too: an alert claimed but not sent stays
/// pending and is due again when its lease ends, so nothing is lost.
pub async fn run_sender(
    state: &StateStore,
    mailer: &Mailer,
    policy: &RetryPolicy,
    poll: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            pass = deliver_due(state, mailer, policy) => {
                if let Err(e) = pass {
                    tracing::error!(error = %e, "alert sender pass failed");
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smtp(security: SmtpSecurity, port: u16) -> SmtpSettings {
        SmtpSettings {
            host: "smtp.example.com".into(),
            port,
            security,
            username: Some("etl".into()),
            password: Some(Secret::new("pw")),
            from: "nightjar <etl@example.com>".into(),
            timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn every_security_mode_builds_a_mailer() {
        for security in [SmtpSecurity::None, SmtpSecurity::Starttls, SmtpSecurity::Tls] {
            let mailer = Mailer::new(&smtp(security, 2465)).unwrap_or_else(|e| panic!("{security:?}: {e}"));
            assert_eq!(mailer.port(), 2465);
        }
    }

    #[test]
    fn a_bad_from_address_is_a_config_error() {
        let mut config = smtp(SmtpSecurity::None, 25);
        config.from = "not an address".into();
        assert!(matches!(Mailer::new(&config), Err(AlertError::Config(m)) if m.contains("not an address")));
    }
}
