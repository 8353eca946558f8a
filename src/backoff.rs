//! The one retry policy: exponential backoff with jitter, used by the
//! Salesforce client (transient failures), the alert sender (SMTP outages)
//! and the scheduler (a job's `retries`).

use std::time::Duration;

/// Delays that double from `first` up to `max`, each scaled by a jitter in
/// [0.8, 1.2) so that clients that failed together do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max }
    }

    /// The delay before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, fastrand::f64())
    }

    /// [`Self::delay`] with the jitter drawn by the caller (in [0, 1)), for
    /// tests that need exact numbers.
    pub fn delay_with(&self, retry: u32, jitter: f64) -> Duration {
        let doublings = retry.saturating_sub(1).min(30) as i32;
        let base = self.first.mul_f64(2f64.powi(doublings)).min(self.max);
        base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_first_within_the_jitter_and_stop_at_max() {
        let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(b.delay_with(1, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay_with(2, 0.5), Duration::from_secs(120));
        assert_eq!(b.delay_with(3, 0.0), Duration::from_secs(192));
        assert_eq!(b.delay_with(1, 1.0), Duration::from_secs(72));
        assert_eq!(b.delay_with(40, 0.5), Duration::from_secs(3600), "capped, no overflow");
        for retry in 1..10 {
            let d = b.delay(retry);
            assert!(d >= b.delay_with(retry, 0.0) && d <= b.delay_with(retry, 1.0));
        }
    }
}
