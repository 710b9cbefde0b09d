//! A sink's own queue, its spill and retry path: batches that the in-process path could not
//! deliver in time, retried batches coming back from the delay queues, and (from a worker of
//! an earlier release) messages of fresh events. The runner consumes it, batches fresh
//! events (count, bytes, time), delivers within the sink's bounds (cutting a message too large
//! for them, bisecting a refused batch: `settle::split`), and settles every message. Nothing
//! is acked before the sink has its events or the broker has confirmed them into the sink's
//! retry or dead-letter queue, so a sink can fail, hang or be killed without losing events or
//! holding up any other sink.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ingest_pipeline::message::{batch_headers, read_attempts, read_batch_key};
use ingest_pipeline::settings::DeliverySettings;
use ingest_pipeline::Topology;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::settle::{body_share, json_len, Outcome, Path, Placed, SinkRunner, BODY_START};
use super::split::Part;
use super::store::{mark_replayed_events, Durable};
use crate::sinks::{events_from_json, Event};

/// Fresh events waiting to be delivered together, and which message each came in.
struct Pending {
    deliveries: Vec<(Delivery, Range<usize>)>,
    events: Vec<Arc<Event>>,
    sizes: Vec<usize>,
    /// The body the events make.
    bytes: usize,
    deadline: Option<Instant>,
}

impl Pending {
    /// Whether `fresh` can join without the batch going past the sink's bounds. An empty
    /// batch takes any message: one larger than the bounds alone is cut when delivered.
    fn fits(&self, fresh: &Fresh, bounds: &DeliverySettings) -> bool {
        self.deliveries.is_empty()
            || (self.events.len() + fresh.events.len() <= bounds.batch_max_events
                && self.bytes.saturating_add(fresh.bytes) <= bounds.batch_max_bytes)
    }

    /// Adds a fresh message's events; the first starts the linger.
    fn push(&mut self, fresh: Fresh, linger: Duration) {
        let start = self.events.len();
        self.bytes = self.bytes.saturating_add(fresh.bytes);
        self.events.extend(fresh.events);
        self.sizes.extend(fresh.sizes);
        self.deliveries
            .push((fresh.delivery, start..self.events.len()));
        self.deadline.get_or_insert_with(|| Instant::now() + linger);
    }

    fn is_full(&self, bounds: &DeliverySettings) -> bool {
        self.events.len() >= bounds.batch_max_events || self.bytes >= bounds.batch_max_bytes
    }
}

/// A fresh message's events that the sink wants.
struct Fresh {
    delivery: Delivery,
    events: Vec<Arc<Event>>,
    sizes: Vec<usize>,
    /// Their share of a body.
    bytes: usize,
}

impl SinkRunner {
    /// Consumes the sink's queue until `stop`, or until the connection fails.
    pub async fn run(
        &self,
        topology: &Topology,
        connection: &Connection,
        out: &dyn Durable,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let name = self.sink.name().to_owned();
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.delivery.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("worker-{name}-{}", uuid::Uuid::new_v4());
        let mut consumer = channel
            .basic_consume(
                topology.sink_queue(&name).into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut pending = Pending {
            deliveries: Vec::new(),
            events: Vec::new(),
            sizes: Vec::new(),
            bytes: BODY_START,
            deadline: None,
        };
        let linger = Duration::from_millis(self.delivery.linger_ms);
        let lost = loop {
            let deadline = pending.deadline;
            tokio::select! {
                () = stop.cancelled() => break false,
                () = sleep_until_opt(deadline), if deadline.is_some() => {
                    self.flush(&mut pending, topology, out, stop).await;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        if read_batch_key(delivery.properties.headers().as_ref()).is_some() {
                            // A retried batch comes back whole and is delivered alone.
                            self.flush(&mut pending, topology, out, stop).await;
                            self.retry(delivery, topology, out, stop).await;
                            continue;
                        }
                        let Some(fresh) = self.read_fresh(delivery, topology, out).await else {
                            continue;
                        };
                        if !pending.fits(&fresh, &self.delivery) {
                            self.flush(&mut pending, topology, out, stop).await;
                        }
                        pending.push(fresh, linger);
                        if pending.is_full(&self.delivery) {
                            self.flush(&mut pending, topology, out, stop).await;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(sink = %name, %error, "sink consumer failed");
                        break true;
                    }
                    None => break true,
                },
            }
        };
        if !lost {
            let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
            self.flush(&mut pending, topology, out, stop).await;
            if let Err(error) = self.sink.flush().await {
                tracing::warn!(sink = %name, %error, "sink flush failed");
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            channel.close(200, "stopping".into()),
        )
        .await;
        if lost {
            anyhow::bail!("connection lost");
        }
        Ok(())
    }

    /// A fresh message's wanted events; `None` once it is settled here (acked if the sink
    /// wants none of them, dead-lettered if it cannot be read).
    async fn read_fresh(
        &self,
        delivery: Delivery,
        topology: &Topology,
        out: &dyn Durable,
    ) -> Option<Fresh> {
        let mut events: Vec<Event> = match events_from_json(&delivery.data) {
            Ok(events) => events,
            Err(error) => {
                self.undecodable(delivery, &error, topology, out).await;
                return None;
            }
        };
        mark_replayed_events(&mut events, delivery.properties.headers().as_ref());
        let before = events.len();
        let events: Vec<Arc<Event>> = events
            .into_iter()
            .filter(|e| self.delivery.wants(e.get_str("type"), e.get_str("event")))
            .map(Arc::new)
            .collect();
        self.count(Outcome::FilteredOut, before - events.len());
        if events.is_empty() {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return None;
        }
        let sizes: Vec<usize> = events.iter().map(|e| json_len(e)).collect();
        Some(Fresh {
            delivery,
            bytes: body_share(&sizes),
            events,
            sizes,
        })
    }

    async fn flush(
        &self,
        pending: &mut Pending,
        topology: &Topology,
        out: &dyn Durable,
        stop: &CancellationToken,
    ) {
        pending.deadline = None;
        pending.bytes = BODY_START;
        if pending.deliveries.is_empty() {
            return;
        }
        let deliveries = std::mem::take(&mut pending.deliveries);
        let events = std::mem::take(&mut pending.events);
        let sizes = std::mem::take(&mut pending.sizes);
        let (parts, _) = self
            .deliver_all(&events, &sizes, None, 0, Path::Queue, stop)
            .await;
        let placed = self.place_parts(parts, topology, out).await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (delivery, range) in deliveries {
            match placed.of(&range) {
                Ok(()) => done.push(delivery),
                Err(error) => failed.push((delivery, error)),
            }
        }
        settle_messages(done, Ok(()), self.sink.name()).await;
        if let Some((_, error)) = failed.first() {
            let error = error.clone();
            let failed = failed.into_iter().map(|(delivery, _)| delivery).collect();
            settle_messages(failed, Err(error), self.sink.name()).await;
        }
    }

    async fn retry(
        &self,
        delivery: Delivery,
        topology: &Topology,
        out: &dyn Durable,
        stop: &CancellationToken,
    ) {
        let headers = delivery.properties.headers().as_ref();
        let key = read_batch_key(headers).unwrap_or_default().to_owned();
        // From a header: any value, u32::MAX included, must survive `+ 1`.
        let attempts = read_attempts(headers);
        let mut events: Vec<Event> = match events_from_json(&delivery.data) {
            Ok(events) => events,
            Err(error) => return self.undecodable(delivery, &error, topology, out).await,
        };
        mark_replayed_events(&mut events, headers);
        let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
        let sizes: Vec<usize> = events.iter().map(|e| json_len(e)).collect();
        // A batch within the bounds is the same batch under the same key; a larger one (spilled
        // whole by an earlier release) is cut, each part under a key of its own.
        let (parts, _) = self
            .deliver_all(&events, &sizes, Some(&key), attempts, Path::Queue, stop)
            .await;
        let placed = self.place_parts(parts, topology, out).await;
        settle_messages(
            vec![delivery],
            placed.of(&(0..events.len())),
            self.sink.name(),
        )
        .await;
    }

    /// Carries out each part's decision.
    async fn place_parts(
        &self,
        parts: Vec<Part>,
        topology: &Topology,
        out: &dyn Durable,
    ) -> Placed {
        let mut placed = Placed::default();
        for part in parts {
            let result = self.place(&part.batch, part.decision, topology, out).await;
            placed.push(part.range, result);
        }
        placed
    }

    /// A message this pipeline did not write: kept, bytes and all, in the sink's dead-letter
    /// queue; acked only once the broker has it there.
    async fn undecodable(
        &self,
        delivery: Delivery,
        error: &serde_json::Error,
        topology: &Topology,
        out: &dyn Durable,
    ) {
        let reason = format!("undecodable sink message: {error}");
        tracing::error!(sink = self.sink.name(), %reason, "dead-lettering a message");
        let queue = topology.sink_dlq(self.sink.name());
        let headers = batch_headers(self.sink.name(), "", 0, &reason);
        let moved = out.store(&queue, &delivery.data, headers).await;
        settle_messages(vec![delivery], moved, self.sink.name()).await;
    }
}

/// Acks the messages once their events are somewhere durable; otherwise returns them to the
/// queue (after a pause, so a broker refusing publishes is not hammered).
async fn settle_messages(deliveries: Vec<Delivery>, moved: Result<(), String>, sink: &str) {
    match moved {
        Ok(()) => {
            for delivery in deliveries {
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        }
        Err(error) => {
            tracing::warn!(sink, %error, "batch not settled; its messages go back to the queue");
            tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..1000))).await;
            for delivery in deliveries {
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
