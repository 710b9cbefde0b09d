//! Per-source (write key) rate limit: a token bucket per source, refilled continuously. A source
//! over its rate gets 429 with the time until its next token as `Retry-After`, so one noisy app
//! cannot take the collector from the others.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: HashMap<String, Mutex<Bucket>>,
}

impl RateLimiter {
    /// `per_second` = 0 disables the limit. Sources are known up front (one per write key), so
    /// the map never grows with client input.
    pub fn new<'a>(
        sources: impl IntoIterator<Item = &'a String>,
        per_second: f64,
        burst: f64,
    ) -> Self {
        let now = Instant::now();
        let burst = burst.max(1.0);
        Self {
            per_second,
            burst,
            buckets: sources
                .into_iter()
                .map(|s| {
                    (
                        s.clone(),
                        Mutex::new(Bucket {
                            tokens: burst,
                            updated: now,
                        }),
                    )
                })
                .collect(),
        }
    }

    /// Takes one token for `source`; `Err(wait)` when there is none.
    pub fn check(&self, source: &str, now: Instant) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let Some(bucket) = self.buckets.get(source) else {
            return Ok(());
        };
        let Ok(mut bucket) = bucket.lock() else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_second;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: f64) -> RateLimiter {
        let sources = ["a".to_owned(), "b".to_owned()];
        RateLimiter::new(sources.iter(), rate, burst)
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let l = limiter(2.0, 3.0);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.check("a", t).is_ok());
        }
        let wait = l.check("a", t).expect_err("burst used up");
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(l.check("a", t + Duration::from_millis(500)).is_ok());
        assert!(l.check("a", t + Duration::from_millis(500)).is_err());
    }

    /// Settings validation keeps the rate sane; the limiter must not panic on a client's
    /// request even if it were not (a wait past `Duration::MAX` is the longest wait).
    #[test]
    fn a_tiny_rate_gives_a_long_wait_not_a_panic() {
        let l = limiter(1e-300, 1.0);
        let t = Instant::now();
        assert!(l.check("a", t).is_ok());
        let wait = l.check("a", t).expect_err("burst used up");
        assert!(wait > Duration::from_secs(365 * 24 * 3600), "{wait:?}");
    }

    #[test]
    fn sources_are_limited_separately_and_zero_disables() {
        let l = limiter(1.0, 1.0);
        let t = Instant::now();
        assert!(l.check("a", t).is_ok());
        assert!(l.check("a", t).is_err());
        assert!(l.check("b", t).is_ok());
        let off = limiter(0.0, 1.0);
        for _ in 0..100 {
            assert!(off.check("a", t).is_ok());
        }
    }
}
