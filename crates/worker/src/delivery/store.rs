//! Carrying out a decision ([`SinkRunner::place`]): a delivered batch is counted; any other
//! goes into one of the sink's queues (its own queue for a spill, a delay tier for a retry,
//! its dead-letter queue), confirmed by the broker. The worker's [`Out`](crate::out::Out) stores through the shared "until taken" loop
//! (`ingest_pipeline::publish::until_taken`): nacks ridden out through a leader election, an
//! unroutable publish answered by declaring the queues again, a late confirm waited for.

use std::sync::Arc;

use ingest_pipeline::message::{batch_headers, spilled_headers};
use ingest_pipeline::Topology;
use lapin::types::FieldTable;

use super::settle::{batch_key, delay_for, Decision, Outcome, SinkRunner};
use crate::sinks::{json_array, Batch, Event};

/// Where batches go when the sink did not take them: a queue that confirms what it holds.
#[async_trait::async_trait]
pub trait Durable: Send + Sync {
    /// Stores `body` (a JSON array of events) in `queue` with the batch's headers; `Ok` once
    /// it is confirmed.
    async fn store(&self, queue: &str, body: &[u8], headers: FieldTable) -> Result<(), String>;
}

impl SinkRunner {
    /// Carries out `decision` for `batch`: `Ok` once every event is delivered or confirmed
    /// into the sink's delay or dead-letter queue; `Err` if it is in neither (the caller
    /// leaves its source where it was).
    pub async fn place(
        &self,
        batch: &Batch,
        decision: Decision,
        topology: &Topology,
        out: &dyn Durable,
    ) -> Result<(), String> {
        let name = self.sink.name();
        match decision {
            Decision::Delivered => {
                self.count(Outcome::Delivered, batch.events.len());
                record_lag(name, batch);
                Ok(())
            }
            Decision::Release => Err("shutting down".to_owned()),
            Decision::Spill {
                attempts,
                reason,
                sent,
            } => {
                let queue = topology.sink_queue(name);
                let headers = if sent {
                    self.batch_headers(batch, attempts, &reason)
                } else {
                    // Fresh events, without a key: the runner batches them with others.
                    spilled_headers(name, &reason)
                };
                store(&queue, batch, headers, out).await?;
                metrics::counter!("sink_spilled_batches_total", "sink" => name.to_owned())
                    .increment(1);
                self.count(Outcome::Retried, batch.events.len());
                tracing::info!(sink = name, events = batch.events.len(), %reason, "batch spilled to the sink's queue");
                Ok(())
            }
            Decision::DeadLetter { attempts, reason } => {
                self.dead_letter(batch, attempts, &reason, topology, out)
                    .await
            }
            Decision::DeadLetterSome {
                refused,
                attempts,
                reason,
            } => {
                self.count(
                    Outcome::Delivered,
                    batch.events.len().saturating_sub(refused.len()),
                );
                let events: Vec<Arc<Event>> = refused
                    .iter()
                    .filter_map(|i| batch.events.get(*i).cloned())
                    .collect();
                let part = Batch {
                    key: batch_key(name, &events),
                    events,
                };
                self.dead_letter(&part, attempts, &reason, topology, out)
                    .await
            }
            Decision::Delay {
                attempts,
                at_least,
                reason,
            } => {
                let delay = delay_for(&self.retry_delays, attempts, at_least)
                    .ok_or("no retry delays configured")?;
                let queue = topology.sink_retry(name, delay);
                store(
                    &queue,
                    batch,
                    self.batch_headers(batch, attempts, &reason),
                    out,
                )
                .await?;
                self.count(Outcome::Retried, batch.events.len());
                tracing::info!(sink = name, attempts, ?delay, events = batch.events.len(), %reason, "batch waits to be retried");
                Ok(())
            }
        }
    }

    async fn dead_letter(
        &self,
        batch: &Batch,
        attempts: u32,
        reason: &str,
        topology: &Topology,
        out: &dyn Durable,
    ) -> Result<(), String> {
        let queue = topology.sink_dlq(self.sink.name());
        store(
            &queue,
            batch,
            self.batch_headers(batch, attempts, reason),
            out,
        )
        .await?;
        self.count(Outcome::DeadLettered, batch.events.len());
        tracing::warn!(sink = self.sink.name(), attempts, events = batch.events.len(), %reason, "batch dead-lettered");
        Ok(())
    }

    /// A batch message's headers: its key, attempts and last error.
    fn batch_headers(&self, batch: &Batch, attempts: u32, reason: &str) -> FieldTable {
        batch_headers(self.sink.name(), &batch.key, attempts, reason)
    }
}

/// Confirms `batch`'s events into `queue` as one message, under `headers`.
async fn store(
    queue: &str,
    batch: &Batch,
    headers: FieldTable,
    out: &dyn Durable,
) -> Result<(), String> {
    let body = json_array(&batch.events);
    out.store(queue, &body, headers).await
}

/// End-to-end lag of a delivered batch: now minus its oldest live event's `receivedAt` (a
/// replayed event's is as old as its replay's range).
fn record_lag(sink: &str, batch: &Batch) {
    let oldest = batch
        .events
        .iter()
        .filter(|e| !e.is_replayed())
        .filter_map(|e| e.get_str("receivedAt"))
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .min();
    if let Some(oldest) = oldest {
        let lag = chrono::Utc::now().signed_duration_since(oldest);
        let seconds = lag.num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!("sink_lag_seconds", "sink" => sink.to_owned()).record(seconds);
    }
}
