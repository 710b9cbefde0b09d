//! Carrying out a decision ([`SinkRunner::place`]): a delivered batch is counted; any other
//! goes into one of the sink's queues (its own queue for a spill, a delay tier for a retry,
//! its dead-letter queue), confirmed by the broker. The worker's [`Out`](crate::out::Out) stores through the shared "until taken" loop
//! (`ingest_pipeline::publish::until_taken`): nacks ridden out through a leader election, an
//! unroutable publish answered by declaring the queues again, a late confirm waited for.

use std::sync::Arc;

use ingest_pipeline::broker::{header_str, long_string};
use ingest_pipeline::message::{batch_headers, headers, spilled_headers};
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

/// Confirms `batch`'s events into `queue` as one message, under `headers` (and which events
/// were replayed).
async fn store(
    queue: &str,
    batch: &Batch,
    mut headers: FieldTable,
    out: &dyn Durable,
) -> Result<(), String> {
    let replayed: Vec<String> = batch
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_replayed())
        .map(|(i, _)| i.to_string())
        .collect();
    if !replayed.is_empty() {
        headers.insert(
            headers::REPLAYED_EVENTS.into(),
            long_string(&replayed.join(",")),
        );
    }
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

/// Marks the events a batch message says were replayed ([`headers::REPLAYED_EVENTS`]).
pub(crate) fn mark_replayed_events(events: &mut [Event], table: Option<&FieldTable>) {
    let Some(list) = header_str(table, headers::REPLAYED_EVENTS) else {
        return;
    };
    for index in list.split(',').filter_map(|i| i.parse::<usize>().ok()) {
        if let Some(event) = events.get_mut(index) {
            event.mark_replayed();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::sinks::events_from_json;

    /// Keeps the headers of what it stores.
    #[derive(Default)]
    struct Capture(Mutex<Option<FieldTable>>);

    #[async_trait::async_trait]
    impl Durable for Capture {
        async fn store(&self, _: &str, _: &[u8], headers: FieldTable) -> Result<(), String> {
            *self.0.lock().map_err(|e| e.to_string())? = Some(headers);
            Ok(())
        }
    }

    #[tokio::test]
    async fn replayed_events_stay_marked_through_a_sink_queue() {
        let mut events: Vec<Event> = (0..3)
            .map(|i| {
                let fields = serde_json::json!({"type": "track", "messageId": format!("m{i}")});
                Event::from(fields.as_object().cloned().unwrap_or_default())
            })
            .collect();
        events[1].mark_replayed();
        let batch = Batch {
            key: "k".to_owned(),
            events: events.into_iter().map(Arc::new).collect(),
        };
        let capture = Capture::default();
        store("q", &batch, FieldTable::default(), &capture)
            .await
            .expect("stored");
        let headers = capture.0.lock().expect("headers").clone();
        let mut back = events_from_json(&json_array(&batch.events)).expect("read back");
        mark_replayed_events(&mut back, headers.as_ref());
        let replayed: Vec<bool> = back.iter().map(Event::is_replayed).collect();
        assert_eq!(replayed, [false, true, false]);
    }
}
