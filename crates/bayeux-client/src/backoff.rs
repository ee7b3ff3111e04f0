//! Exponential backoff with jitter, capped. Pure: the caller sleeps.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How retries are spaced: `initial`, doubling per consecutive failure up to `max`, each delay
/// drawn at random from its upper half (`[d/2, d]`) so that many clients do not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first delay.
    pub initial: Duration,
    /// The cap.
    pub max: Duration,
    /// Randomize each delay within `[d/2, d]`.
    pub jitter: bool,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            jitter: true,
        }
    }
}

/// The running backoff: how many failures in a row, and the random source for jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    pub(crate) fn new(policy: BackoffPolicy, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Backoff {
            policy,
            attempt: 0,
            rng,
        }
    }

    /// The delay before the next try, counting one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let exp = self.attempt.min(20);
        self.attempt = self.attempt.saturating_add(1);
        let base = self
            .policy
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.policy.max);
        if !self.policy.jitter || base.is_zero() {
            return base;
        }
        let half = base / 2;
        let extra = self.rng.random_range(0..=(base - half).as_millis() as u64);
        half + Duration::from_millis(extra)
    }

    /// Failures counted since the last reset.
    #[cfg(test)]
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let policy = BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            jitter: true,
        };
        let mut b = Backoff::new(policy, Some(7));
        let expected = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for e in expected {
            let d = b.next_delay().as_millis() as u64;
            assert!(d >= e / 2 && d <= e, "{d} not in [{}, {e}]", e / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let mut exact = Backoff::new(
            BackoffPolicy {
                jitter: false,
                ..policy
            },
            None,
        );
        assert_eq!(exact.next_delay(), Duration::from_millis(100));
        assert_eq!(exact.next_delay(), Duration::from_millis(200));
        assert_eq!(exact.attempts(), 2);
    }
}
