//! `ingestctl scale`: how many workers would drain the raw queue within a target time, from its
//! depth, the rate events arrive and the rate one worker drains. Rates come from the RabbitMQ
//! management API when it is configured; otherwise from two depth samples, which only give the
//! net rate, so the per-worker rate must then be given (e.g. from BENCHMARKS.md).

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Observed {
    pub depth: u64,
    /// Workers consuming the raw queue (each worker holds one consumer on it).
    pub consumers: u32,
    /// Messages per second arriving, when known.
    pub publish_rate: Option<f64>,
    /// Messages per second acknowledged by all workers together, when known.
    pub drain_rate: Option<f64>,
    /// Depth change per second between two samples (negative: draining), when sampled.
    pub net_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hint {
    #[serde(flatten)]
    pub observed: Observed,
    pub target_seconds: f64,
    /// Messages per second one worker drains, and where that figure came from.
    pub per_worker_rate: Option<f64>,
    pub per_worker_rate_from: &'static str,
    /// Workers needed to drain the backlog within the target while keeping up with arrivals;
    /// `None` when no per-worker rate is known.
    pub workers: Option<u32>,
    /// Seconds until the queue is empty at the current net rate; `None` if it is not draining.
    pub drain_seconds_now: Option<f64>,
    pub basis: String,
}

/// Depth change per second: sampled, or arrivals minus acks from the management API.
fn net_rate(observed: &Observed) -> Option<f64> {
    observed
        .net_rate
        .or(match (observed.publish_rate, observed.drain_rate) {
            (Some(p), Some(d)) => Some(p - d),
            _ => None,
        })
}

/// Seconds until the queue is empty if the net rate holds: 0 when it is empty, `None` when it
/// holds messages and is not shrinking (or nothing is known of its rates).
fn drain_seconds(observed: &Observed) -> Option<f64> {
    if observed.depth == 0 {
        return Some(0.0);
    }
    match net_rate(observed) {
        Some(n) if n < 0.0 => Some(observed.depth as f64 / -n),
        _ => None,
    }
}

pub fn hint(observed: Observed, target: Duration, given_per_worker: Option<f64>) -> Hint {
    let target_seconds = target.as_secs_f64().max(1.0);
    // Workers' measured rate tells their capacity only while they are busy (a backlog exists).
    let measured = match (observed.drain_rate, observed.consumers) {
        (Some(rate), n) if n > 0 && rate > 0.0 && observed.depth > 0 => Some(rate / f64::from(n)),
        _ => None,
    };
    let (per_worker_rate, per_worker_rate_from) = match (given_per_worker, measured) {
        (Some(r), _) if r > 0.0 => (Some(r), "given (--per-worker-rate)"),
        (_, Some(r)) => (Some(r), "measured (management API ack rate / consumers)"),
        _ => (None, "unknown"),
    };
    let drain_seconds_now = drain_seconds(&observed);
    let needed_rate = observed.depth as f64 / target_seconds + observed.publish_rate.unwrap_or(0.0);
    let workers = per_worker_rate.map(|r| {
        let n = (needed_rate / r).ceil();
        // At least one worker whenever anything is queued or arriving.
        let floor = if needed_rate > 0.0 { 1.0 } else { 0.0 };
        n.max(floor).min(f64::from(u32::MAX)) as u32
    });
    let basis = match (workers, observed.publish_rate) {
        (Some(w), Some(p)) => format!(
            "{} queued / {target_seconds:.0} s + {p:.0}/s arriving = {needed_rate:.0}/s needed; {w} workers at {:.0}/s each",
            observed.depth,
            per_worker_rate.unwrap_or_default()
        ),
        (Some(w), None) => format!(
            "{} queued / {target_seconds:.0} s = {needed_rate:.0}/s needed, arrivals not known (configure broker.management_url); {w} workers at {:.0}/s each",
            observed.depth,
            per_worker_rate.unwrap_or_default()
        ),
        (None, _) => "no per-worker drain rate: workers are idle or rates are unknown; pass --per-worker-rate (see BENCHMARKS.md) or configure broker.management_url".to_owned(),
    };
    Hint {
        observed,
        target_seconds,
        per_worker_rate,
        per_worker_rate_from,
        workers,
        drain_seconds_now,
        basis,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(depth: u64, consumers: u32, publish: f64, drain: f64) -> Observed {
        Observed {
            depth,
            consumers,
            publish_rate: Some(publish),
            drain_rate: Some(drain),
            net_rate: None,
        }
    }

    #[test]
    fn workers_cover_the_backlog_within_the_target_and_the_arrivals() {
        // 2 busy workers drain 2000/s together: 1000/s each. 60,000 queued in 60 s = 1000/s,
        // plus 1500/s arriving: 2500/s needs 3 workers.
        let h = hint(
            observed(60_000, 2, 1500.0, 2000.0),
            Duration::from_secs(60),
            None,
        );
        assert_eq!(h.per_worker_rate, Some(1000.0));
        assert_eq!(h.workers, Some(3));
        assert_eq!(h.drain_seconds_now, Some(120.0));
    }

    #[test]
    fn idle_workers_do_not_measure_capacity_and_a_given_rate_wins() {
        let h = hint(observed(0, 4, 100.0, 100.0), Duration::from_secs(60), None);
        assert_eq!(h.workers, None);
        assert_eq!(h.drain_seconds_now, Some(0.0));
        let h = hint(
            observed(0, 4, 100.0, 100.0),
            Duration::from_secs(60),
            Some(1000.0),
        );
        assert_eq!(h.workers, Some(1));
        let h = hint(
            observed(0, 0, 0.0, 0.0),
            Duration::from_secs(60),
            Some(1000.0),
        );
        assert_eq!(h.workers, Some(0));
    }

    #[test]
    fn a_growing_queue_has_no_drain_time() {
        let h = hint(
            observed(5000, 1, 2000.0, 1000.0),
            Duration::from_secs(100),
            None,
        );
        assert_eq!(h.drain_seconds_now, None);
        assert_eq!(h.workers, Some(3)); // 50/s + 2000/s at 1000/s each
    }
}
