//! When to mail: one mail when a job starts failing, then at most one per
//! `repeat_after` while it keeps failing (saying how many failures it speaks
//! for), and one recovery mail on the first success after failures.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::state::{AlertKind, AlertStreak, RunId};

/// How a run ended, as far as alerting cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// `last_attempt` is false while the job's retries are not used up: such
    /// a failure is neither mailed nor counted; the final attempt is.
    Failed {
        last_attempt: bool,
    },
    Abandoned,
    TimedOut,
    SkippedBudget,
    /// Stopped on purpose (shutdown, operator): nobody needs a mail.
    Cancelled,
}

impl Outcome {
    fn failure_kind(self) -> Option<AlertKind> {
        match self {
            Outcome::Failed { last_attempt: true } => Some(AlertKind::Failed),
            Outcome::Abandoned => Some(AlertKind::Abandoned),
            Outcome::TimedOut => Some(AlertKind::TimedOut),
            Outcome::SkippedBudget => Some(AlertKind::SkippedBudget),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub on_failure: bool,
    pub on_recovery: bool,
    pub repeat_after: Duration,
}

/// A mail to write: its kind and how many failures it speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mail {
    pub kind: AlertKind,
    pub failures: u32,
}

/// The streak after `outcome`, and the mail to queue, if any.
pub fn decide(
    streak: &AlertStreak,
    outcome: Outcome,
    run: RunId,
    policy: &Policy,
    now: DateTime<Utc>,
) -> (AlertStreak, Option<Mail>) {
    if let Some(kind) = outcome.failure_kind() {
        let mut next = streak.clone();
        next.failures += 1;
        next.first_failed_run.get_or_insert(run);
        let repeat = chrono::Duration::from_std(policy.repeat_after).unwrap_or(chrono::Duration::MAX);
        let due = match streak.last_mailed_at {
            None => true,
            Some(last) => now.signed_duration_since(last) >= repeat,
        };
        if policy.on_failure && due {
            let mail = Mail { kind, failures: streak.unmailed + 1 };
            next.unmailed = 0;
            next.last_mailed_at = Some(now);
            return (next, Some(mail));
        }
        next.unmailed += 1;
        return (next, None);
    }
    match outcome {
        Outcome::Succeeded if streak.failures > 0 => {
            let mail = policy.on_recovery.then_some(Mail { kind: AlertKind::Recovery, failures: streak.failures });
            (AlertStreak::default(), mail)
        }
        _ => (streak.clone(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { on_failure: true, on_recovery: true, repeat_after: Duration::from_secs(3600) };

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::minutes(minutes)
    }

    fn play(outcomes: &[(Outcome, i64)], policy: &Policy) -> (AlertStreak, Vec<Mail>) {
        let mut streak = AlertStreak::default();
        let mut mails = Vec::new();
        for (run, (outcome, minute)) in outcomes.iter().enumerate() {
            let (next, mail) = decide(&streak, *outcome, run as RunId + 1, policy, at(*minute));
            streak = next;
            mails.extend(mail);
        }
        (streak, mails)
    }

    const FAILED: Outcome = Outcome::Failed { last_attempt: true };

    #[test]
    fn ten_failures_within_repeat_after_send_one_mail_then_one_repeat_with_the_count() {
        let mut outcomes: Vec<(Outcome, i64)> = (0..10).map(|i| (FAILED, i)).collect();
        outcomes.push((FAILED, 70));
        let (streak, mails) = play(&outcomes, &POLICY);
        assert_eq!(
            mails,
            vec![Mail { kind: AlertKind::Failed, failures: 1 }, Mail { kind: AlertKind::Failed, failures: 10 }]
        );
        assert_eq!((streak.failures, streak.unmailed, streak.first_failed_run), (11, 0, Some(1)));
    }

    #[test]
    fn first_success_after_failures_sends_one_recovery_mail() {
        let outcomes = [(FAILED, 0), (FAILED, 1), (Outcome::Succeeded, 2), (Outcome::Succeeded, 3)];
        let (streak, mails) = play(&outcomes, &POLICY);
        assert_eq!(mails.last(), Some(&Mail { kind: AlertKind::Recovery, failures: 2 }));
        assert_eq!(mails.len(), 2);
        assert_eq!(streak, AlertStreak::default());
        let (_, fresh) = play(&[(FAILED, 10)], &POLICY);
        assert_eq!(fresh.len(), 1, "a new streak mails again at once");
    }

    #[test]
    fn attempts_before_the_last_and_cancellations_are_silent_and_uncounted() {
        let outcomes = [(Outcome::Failed { last_attempt: false }, 0), (Outcome::Cancelled, 1), (Outcome::Succeeded, 2)];
        let (streak, mails) = play(&outcomes, &POLICY);
        assert!(mails.is_empty());
        assert_eq!(streak, AlertStreak::default());
    }

    #[test]
    fn every_failure_kind_mails_as_itself() {
        for (outcome, kind) in [
            (Outcome::Abandoned, AlertKind::Abandoned),
            (Outcome::TimedOut, AlertKind::TimedOut),
            (Outcome::SkippedBudget, AlertKind::SkippedBudget),
        ] {
            let (_, mails) = play(&[(outcome, 0)], &POLICY);
            assert_eq!(mails, vec![Mail { kind, failures: 1 }]);
        }
    }

    #[test]
    fn on_settings_silence_failure_or_recovery_mails() {
        let quiet = Policy { on_failure: false, ..POLICY };
        let (_, mails) = play(&[(FAILED, 0), (FAILED, 1), (Outcome::Succeeded, 2)], &quiet);
        assert_eq!(mails, vec![Mail { kind: AlertKind::Recovery, failures: 2 }]);
        let no_recovery = Policy { on_recovery: false, ..POLICY };
        let (_, mails) = play(&[(FAILED, 0), (Outcome::Succeeded, 1)], &no_recovery);
        assert_eq!(mails, vec![Mail { kind: AlertKind::Failed, failures: 1 }]);
    }
}
