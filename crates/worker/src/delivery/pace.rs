//! How fast a sink takes events, so the in-process path never hands it a batch it cannot take
//! within the bound a raw delivery may wait (`spill_after_ms`).
//!
//! A batch still in the sink at that bound is spilled into the sink's queue while the sink may
//! go on to store it anyway (an insert is not taken back because its caller stopped waiting):
//! the sink is given the same events twice, and a sink that was already slow gets twice the
//! work. A store whose batch of `batch_max_events` takes about the bound (SecantusDB journals
//! 1,000 documents in about a second) did that to most of its batches. So the lane gathers at
//! most what the sink has been taking in half the bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Weight of the newest sample in the moving average.
const WEIGHT: f64 = 0.3;

/// The sink's recent rate in events per second, as a moving average over the calls it answered
/// and those it had not answered by the bound.
#[derive(Debug, Default)]
pub struct Pace {
    /// `f64` bits; 0 until a call succeeded.
    per_second: AtomicU64,
}

impl Pace {
    /// A call that delivered `events` in `took`, or had not answered after `took` (then the
    /// sink takes at most that pace).
    pub fn record(&self, events: usize, took: Duration) {
        let seconds = took.as_secs_f64();
        if events == 0 || seconds <= 0.0 {
            return;
        }
        let sample = events as f64 / seconds;
        // Lost updates between racing calls only drop a sample.
        let old = f64::from_bits(self.per_second.load(Ordering::Relaxed));
        let new = if old > 0.0 {
            old + WEIGHT * (sample - old)
        } else {
            sample
        };
        self.per_second.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Events the sink takes in half of `time`; `None` until a call has succeeded.
    fn in_half(&self, time: Duration) -> Option<f64> {
        let per_second = f64::from_bits(self.per_second.load(Ordering::Relaxed));
        (per_second > 0.0).then(|| per_second * time.as_secs_f64() / 2.0)
    }

    /// Whether the sink is expected to take `events` within half of `time` (in as many
    /// batches as they need); yes until a call has succeeded.
    pub fn takes_within(&self, events: usize, time: Duration) -> bool {
        self.in_half(time).is_none_or(|fits| events as f64 <= fits)
    }

    /// The most events a batch should hold to be taken within half of `bound`: `max` until a
    /// call has succeeded, never less than 1.
    pub fn batch_cap(&self, bound: Duration, max: usize) -> usize {
        let Some(fits) = self.in_half(bound) else {
            return max;
        };
        if fits >= max as f64 {
            max
        } else {
            // In range: 0 <= fits < max.
            (fits as usize).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_sample_the_cap_is_the_configured_batch() {
        let pace = Pace::default();
        assert_eq!(pace.batch_cap(Duration::from_secs(1), 1000), 1000);
        pace.record(0, Duration::from_millis(10));
        pace.record(10, Duration::ZERO);
        assert_eq!(pace.batch_cap(Duration::from_secs(1), 1000), 1000);
    }

    #[test]
    fn a_sink_taking_a_thousand_events_a_second_gets_half_the_bound_of_them() {
        let pace = Pace::default();
        pace.record(1000, Duration::from_secs(1));
        assert_eq!(pace.batch_cap(Duration::from_secs(1), 1000), 500);
        assert_eq!(pace.batch_cap(Duration::from_secs(4), 1000), 1000);
    }

    #[test]
    fn the_cap_follows_the_sink_as_it_slows_and_never_reaches_zero() {
        let pace = Pace::default();
        pace.record(10_000, Duration::from_secs(1));
        assert_eq!(pace.batch_cap(Duration::from_secs(1), 1000), 1000);
        for _ in 0..30 {
            pace.record(1, Duration::from_secs(10));
        }
        assert_eq!(pace.batch_cap(Duration::from_secs(1), 1000), 1);
        let mid = Pace::default();
        mid.record(1000, Duration::from_secs(1));
        mid.record(500, Duration::from_secs(1));
        // 1000 + 0.3 × (500 − 1000) = 850 a second: 425 in half a second.
        assert_eq!(mid.batch_cap(Duration::from_secs(1), 1000), 425);
    }

    #[test]
    fn whether_a_job_fits_counts_all_its_events_not_one_batch() {
        let pace = Pace::default();
        assert!(pace.takes_within(1_000_000, Duration::from_millis(1)));
        pace.record(1000, Duration::from_secs(1));
        assert!(pace.takes_within(2000, Duration::from_secs(4)));
        assert!(!pace.takes_within(2001, Duration::from_secs(4)));
        assert!(!pace.takes_within(1, Duration::ZERO));
    }
}
