//! What becomes of a batch a sink was asked to take: the same for the in-process path and for
//! the sink's queue. [`attempt`](SinkRunner::attempt) calls the sink (inline retries, breaker,
//! time bound); [`decide`] turns the result into a [`Decision`] (a pure function); and
//! [`place`](SinkRunner::place) carries it out: nothing, or the batch confirmed into the sink's
//! delay queue or dead-letter queue through a [`Durable`] store (the broker, or a recorder in
//! tests).
//!
//! A batch that goes to a queue travels as one message with its `Idempotency-Key` and attempt
//! count in the headers, so a retried batch is the same batch: same events, same key. Batches
//! are cut to the sink's bounds and a refused one is bisected ([`split`]); each part has a key
//! of its own, made from its events the same way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ingest_pipeline::settings::DeliverySettings;
use ingest_pipeline::Backoff;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::breaker::Breaker;
use super::pace::Pace;
use crate::sinks::{Batch, Event, Sink, SinkError};

pub use super::split::{body_share, json_len, Path, Placed, BODY_START};

const KEY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3d0a_91e4_7c25_4b8e_b6f3_5e1d_0a7c_9f42);

/// The same events in the same order always get the same key.
pub fn batch_key(sink: &str, events: &[Arc<Event>]) -> String {
    let mut material = String::from(sink);
    for event in events {
        material.push('\n');
        material.push_str(event.get_str("messageId").unwrap_or(""));
    }
    uuid::Uuid::new_v5(&KEY_NAMESPACE, material.as_bytes()).to_string()
}

/// What to do with a batch after the sink was asked to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The sink has every event.
    Delivered,
    /// The sink took all but these events (positions in the batch), which it refused for good.
    DeadLetterSome {
        refused: Vec<usize>,
        attempts: u32,
        reason: String,
    },
    /// Retrying cannot help, or the batch failed `max_attempts` times.
    DeadLetter { attempts: u32, reason: String },
    /// Wait in a delay queue (at least `at_least`), then try again.
    Delay {
        attempts: u32,
        at_least: Duration,
        reason: String,
    },
    /// The sink did not finish within `spill_after_ms` (in-process path): the batch goes to
    /// the sink's own queue, without spending an attempt, for its runner to deliver. `sent`:
    /// the sink was given it (and may have it), so it keeps its key and is delivered again
    /// alone, as it was; a batch the sink never saw goes as fresh events, which the runner
    /// batches with others.
    Spill {
        attempts: u32,
        reason: String,
        sent: bool,
    },
    /// The worker is stopping: leave the batch where it came from.
    Release,
}

/// The decision for a batch that had failed `attempts` times before this try. `None` means
/// the sink was not called (circuit open): the batch waits without spending an attempt.
pub fn decide(result: Option<Result<(), SinkError>>, attempts: u32, max_attempts: u32) -> Decision {
    // From a header: any value, u32::MAX included, must survive `+ 1`.
    let failed = attempts.saturating_add(1);
    match result {
        Some(Ok(())) => Decision::Delivered,
        Some(Err(SinkError::ShuttingDown)) => Decision::Release,
        Some(Err(SinkError::Permanent(reason))) => Decision::DeadLetter {
            attempts: failed,
            reason,
        },
        Some(Err(SinkError::Refused(refused))) => Decision::DeadLetterSome {
            reason: distinct(refused.iter().map(|(_, r)| r.as_str())).join("; "),
            refused: refused.into_iter().map(|(i, _)| i).collect(),
            attempts: failed,
        },
        Some(Err(error)) if failed >= max_attempts => Decision::DeadLetter {
            attempts: failed,
            reason: error.to_string(),
        },
        Some(Err(error)) => Decision::Delay {
            attempts: failed,
            at_least: match &error {
                SinkError::Throttled { retry_after, .. } => *retry_after,
                _ => Duration::ZERO,
            },
            reason: error.to_string(),
        },
        None => Decision::Delay {
            attempts,
            at_least: Duration::ZERO,
            reason: "circuit open".to_owned(),
        },
    }
}

/// Each reason once, in order of first appearance (a sink that refuses a whole batch alike
/// gives one answer per event).
fn distinct<'a>(reasons: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for reason in reasons {
        if !out.contains(&reason) {
            out.push(reason);
        }
    }
    out
}

/// The delay queue for a batch's `attempts`: one tier per attempt, the last repeating, and
/// never shorter than `at_least` (a sink's `Retry-After`) if a tier is that long.
pub fn delay_for(retry_delays: &[Duration], attempts: u32, at_least: Duration) -> Option<Duration> {
    let tier = (attempts.saturating_sub(1) as usize).min(retry_delays.len().saturating_sub(1));
    retry_delays
        .get(tier..)?
        .iter()
        .copied()
        .find(|d| *d >= at_least)
        .or_else(|| retry_delays.last().copied())
}

#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Delivered,
    Retried,
    DeadLettered,
    FilteredOut,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
            Self::FilteredOut => "filtered_out",
        }
    }
}

/// Per-sink counters, logged periodically.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub filtered_out: AtomicU64,
}

impl SinkStats {
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.delivered.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed),
            self.filtered_out.load(Ordering::Relaxed),
        ]
    }
}

/// One sink with what both of its paths share: settings, retry tiers, counters, breaker.
pub struct SinkRunner {
    pub sink: Arc<dyn Sink>,
    pub delivery: DeliverySettings,
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub stats: Arc<SinkStats>,
    pub breaker: Mutex<Breaker>,
    /// How fast the sink has been taking events (sizes the in-process path's batches).
    pub pace: Pace,
}

impl SinkRunner {
    pub fn new(
        sink: Arc<dyn Sink>,
        delivery: DeliverySettings,
        retry_delays: Vec<Duration>,
        max_attempts: u32,
    ) -> Self {
        let breaker = Breaker::new(
            delivery.breaker_failures,
            Duration::from_millis(delivery.breaker_cooldown_ms),
        );
        Self {
            sink,
            delivery,
            retry_delays,
            max_attempts,
            stats: Arc::new(SinkStats::default()),
            breaker: Mutex::new(breaker),
            pace: Pace::default(),
        }
    }

    /// Counts events in the log totals and in `sink_events_total{sink,outcome}`.
    pub fn count(&self, outcome: Outcome, events: usize) {
        let counter = match outcome {
            Outcome::Delivered => &self.stats.delivered,
            Outcome::Retried => &self.stats.retried,
            Outcome::DeadLettered => &self.stats.dead_lettered,
            Outcome::FilteredOut => &self.stats.filtered_out,
        };
        counter.fetch_add(events as u64, Ordering::Relaxed);
        metrics::counter!("sink_events_total", "sink" => self.sink.name().to_owned(), "outcome" => outcome.label())
            .increment(events as u64);
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // A panic while the lock was held cannot leave a breaker half-updated: every change
        // is one assignment.
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Calls the sink, retrying in place a few times; `None` means the sink was not called
    /// (the circuit is open, or the worker stopped first). Each call is bounded by
    /// `timeout_ms`, so a stalled store is a retryable failure, not a hang.
    pub async fn attempt(
        &self,
        batch: &Batch,
        wait_for_circuit: bool,
        stop: &CancellationToken,
    ) -> Option<Result<(), SinkError>> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut last = None;
        for _ in 0..self.delivery.inline_attempts {
            let open = self.breaker().open_for(Instant::now());
            if let Some(wait) = open {
                if !wait_for_circuit {
                    return last;
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return last,
                }
            }
            if !self.breaker().allows(Instant::now()) {
                return last;
            }
            let started = Instant::now();
            let limit = Duration::from_millis(self.delivery.timeout_ms);
            let result = match tokio::time::timeout(limit, self.sink.deliver(batch)).await {
                Ok(result) => result,
                Err(_) => Err(SinkError::Retryable(format!(
                    "no answer from the sink within {limit:?}"
                ))),
            };
            let sink = self.sink.name().to_owned();
            let result_label = match &result {
                Ok(()) => "ok",
                Err(SinkError::Refused(_)) => "refused",
                Err(e) if e.is_retryable() => "retryable",
                Err(_) => "permanent",
            };
            let took = started.elapsed();
            if result.is_ok() {
                self.pace.record(batch.events.len(), took);
            }
            metrics::histogram!("sink_deliver_seconds", "sink" => sink.clone(), "result" => result_label)
                .record(took.as_secs_f64());
            metrics::histogram!("sink_batch_size", "sink" => sink)
                .record(batch.events.len() as f64);
            self.breaker().record(
                !matches!(&result, Err(e) if e.is_retryable()),
                Instant::now(),
            );
            let wait = match &result {
                Err(SinkError::Throttled { retry_after, .. })
                    if *retry_after <= Duration::from_secs(2) =>
                {
                    *retry_after
                }
                Err(SinkError::Retryable(_)) => backoff.next_delay(),
                _ => return Some(result),
            };
            last = Some(result);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => break,
            }
        }
        last
    }
}

#[cfg(test)]
#[path = "settle/tests.rs"]
mod tests;
