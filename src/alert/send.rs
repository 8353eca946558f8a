//! Delivery: lettre over SMTP, and the outbox sender that retries with
//! backoff until the mail is accepted (Invariant 9: no alert lost).

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{AlertError, redact};
use crate::config::{Secret, SmtpConfig, SmtpSecurity};
use crate::state::StateStore;

/// How long one SMTP conversation may take before it counts as failed.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// An SMTP client for the `[smtp]` settings.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    host: String,
    port: u16,
    security: SmtpSecurity,
    /// Kept to scrub it from any error text before it is stored or printed.
    password: Option<Secret>,
}

impl Mailer {
    pub fn new(smtp: &SmtpConfig) -> Result<Mailer, AlertError> {
        let host = smtp.host.as_str().trim().to_string();
        let port = smtp.port.unwrap_or_else(|| smtp.security.default_port());
        let builder = match smtp.security {
            SmtpSecurity::None => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)),
            SmtpSecurity::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host),
            SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&host),
        };
        let mut builder = builder
            .map_err(|e| AlertError::Config(format!("cannot set up TLS for `{host}`: {e}")))?
            .port(port)
            .timeout(Some(SMTP_TIMEOUT));
        if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
            builder = builder
                .credentials(Credentials::new(user.get_ref().as_str().to_string(), password.expose().to_string()));
        }
        let from = smtp.from.get_ref().as_str();
        let from: Mailbox = from
            .parse()
            .map_err(|e| AlertError::Config(format!("`from = \"{from}\"` is not an email address ({e})")))?;
        Ok(Mailer {
            transport: builder.build(),
            from,
            host,
            port,
            security: smtp.security,
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
        self.transport.send(message).await.map_err(|e| AlertError::Send {
            server: format!("{}:{}", self.host, self.port),
            message: redact(&e.to_string(), self.password.iter().map(Secret::expose)),
        })?;
        Ok(())
    }
}

/// How the outbox sender retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Pause after the first failed attempt; it doubles per attempt, with jitter.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
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
            first_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30 * 60),
            max_attempts: 48,
            lease: SMTP_TIMEOUT * 4,
            batch: 50,
        }
    }
}

impl RetryPolicy {
    /// The pause after `attempts` failed attempts (1 = the first), jittered by up to ±20%.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(20);
        let base = self.first_backoff.saturating_mul(1 << doublings).min(self.max_backoff);
        base.mul_f64(0.8 + 0.4 * fastrand::f64())
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
    for alert in state.claim_due_alerts(clock(), policy.lease, policy.batch, ignore_backoff)? {
        match mailer.send(&alert.recipients, &alert.subject, &alert.body_text, &alert.body_html).await {
            Ok(()) => {
                state.mark_alert_sent(alert.id, clock())?;
                tracing::info!(alert = alert.id, job = %alert.job, kind = alert.kind.as_str(), "alert email sent");
                report.sent += 1;
            }
            Err(e) => {
                let attempts = alert.attempts + 1;
                let message = e.to_string();
                let now = clock();
                let retry_at = (attempts < policy.max_attempts)
                    .then(|| now + chrono::Duration::from_std(policy.backoff(attempts)).unwrap_or_default());
                state.mark_alert_attempt_failed(alert.id, now, &message, retry_at)?;
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
pub async fn run_sender(
    state: &StateStore,
    mailer: &Mailer,
    policy: &RetryPolicy,
    poll: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        if let Err(e) = deliver_due(state, mailer, policy).await {
            tracing::error!(error = %e, "alert sender pass failed");
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
    use crate::config::EnvString;

    fn smtp(security: SmtpSecurity, port: Option<u16>) -> SmtpConfig {
        SmtpConfig {
            host: EnvString("smtp.example.com".into()),
            port,
            security,
            username: Some(toml::Spanned::new(0..0, EnvString("etl".into()))),
            password: Some(Secret::new("pw")),
            from: toml::Spanned::new(0..0, EnvString("nightjar <etl@example.com>".into())),
        }
    }

    #[test]
    fn every_security_mode_builds_a_mailer_with_its_default_port() {
        for (security, port) in [(SmtpSecurity::None, 25), (SmtpSecurity::Starttls, 587), (SmtpSecurity::Tls, 465)] {
            let mailer = Mailer::new(&smtp(security, None)).unwrap_or_else(|e| panic!("{security:?}: {e}"));
            assert_eq!(mailer.port(), port);
        }
        assert_eq!(Mailer::new(&smtp(SmtpSecurity::Tls, Some(2465))).unwrap().port(), 2465);
    }

    #[test]
    fn a_bad_from_address_is_a_config_error() {
        let mut config = smtp(SmtpSecurity::None, None);
        config.from = toml::Spanned::new(0..0, EnvString("not an address".into()));
        assert!(matches!(Mailer::new(&config), Err(AlertError::Config(m)) if m.contains("not an address")));
    }

    #[test]
    fn backoff_doubles_within_jitter_and_stops_at_the_cap() {
        let p = RetryPolicy {
            first_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            ..Default::default()
        };
        let within = |d: Duration, secs: f64| d.as_secs_f64() >= secs * 0.8 && d.as_secs_f64() <= secs * 1.2;
        assert!(within(p.backoff(1), 10.0));
        assert!(within(p.backoff(2), 20.0));
        assert!(within(p.backoff(3), 40.0));
        assert!(within(p.backoff(4), 60.0));
        assert!(within(p.backoff(400), 60.0));
    }
}
