//! Exponential backoff with full jitter, for reconnects and write retries: the CPU sleeps,
//! and a fleet of workers that lost the same server does not come back in lock-step.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The ceiling for the current attempt: min · 2^attempt, capped at max.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniformly random in [min, ceiling] ("full jitter" above the floor).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let span = ceiling.saturating_sub(self.min).as_millis() as u64;
        let jitter = if span == 0 {
            0
        } else {
            fastrand::u64(0..=span)
        };
        self.min + Duration::from_millis(jitter)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_bounds_and_reset() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut b = Backoff::new(min, max);
        let ceilings: Vec<_> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d >= min && d <= c, "{d:?} outside [{min:?}, {c:?}]");
                c
            })
            .collect();
        assert_eq!(ceilings[0], min);
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(ceilings[5], max);
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.ceiling(), min);
    }
}
