//! A circuit breaker per sink, shared by its in-process path and its queue's runner: after
//! `threshold` consecutive failures the sink is not called for a cool-down, then one probe
//! is let through.

use std::time::Duration;

use tokio::time::Instant;

/// Opens after `threshold` consecutive failures; lets one probe through after the cool-down.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            failures: 0,
            open_until: None,
        }
    }

    /// May we call the sink now? After the cool-down one probe is allowed (half-open).
    pub fn allows(&mut self, now: Instant) -> bool {
        match self.open_until {
            Some(until) if now < until => false,
            Some(_) => {
                // half-open: one probe; a failure re-opens at once
                self.open_until = None;
                self.failures = self.threshold.saturating_sub(1);
                true
            }
            None => true,
        }
    }

    pub fn record(&mut self, ok: bool, now: Instant) {
        if ok {
            self.failures = 0;
            return;
        }
        self.failures = self.failures.saturating_add(1);
        if self.threshold > 0 && self.failures >= self.threshold {
            self.open_until = Some(now + self.cooldown);
        }
    }

    /// How long the circuit stays open from `now`, if it is open.
    pub fn open_for(&self, now: Instant) -> Option<Duration> {
        self.open_until
            .filter(|until| now < *until)
            .map(|until| until - now)
    }

    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_probes_after_cooldown() {
        let start = Instant::now();
        let mut breaker = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(breaker.allows(start));
            breaker.record(false, start);
        }
        assert!(!breaker.is_open(start));
        breaker.record(false, start);
        assert!(breaker.is_open(start));
        assert_eq!(
            breaker.open_for(start + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert!(!breaker.allows(start + Duration::from_secs(5)));
        // half-open: one probe; its failure re-opens at once
        assert!(breaker.allows(start + Duration::from_secs(11)));
        breaker.record(false, start + Duration::from_secs(11));
        assert!(breaker.is_open(start + Duration::from_secs(12)));
        // a successful probe closes it
        assert!(breaker.allows(start + Duration::from_secs(22)));
        breaker.record(true, start + Duration::from_secs(22));
        assert!(!breaker.is_open(start + Duration::from_secs(22)));
        assert!(breaker.allows(start + Duration::from_secs(22)));
    }
}
