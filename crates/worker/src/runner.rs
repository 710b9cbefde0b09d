//! A sink's own queue, its spill and retry path: batches that the in-process path could not
//! deliver in time, retried batches coming back from the delay queues, and (from a worker of
//! an earlier release) messages of fresh events. The runner consumes it, batches fresh
//! events (count, bytes, time), delivers, and settles every message. Nothing is acked before
//! the sink has its events or the broker has confirmed them into the sink's retry or
//! dead-letter queue, so a sink can fail, hang or be killed without losing events or holding
//! up any other sink.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ingest_pipeline::broker::Publisher;
use ingest_pipeline::message::{batch_headers, read_attempts, read_batch_key};
use ingest_pipeline::Topology;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::settle::{batch_key, decide, Durable, Outcome, SinkRunner};
use crate::sinks::{Batch, Event};

struct Pending {
    deliveries: Vec<Delivery>,
    events: Vec<Arc<Event>>,
    bytes: usize,
    deadline: Option<Instant>,
}

impl SinkRunner {
    /// Consumes the sink's queue until `stop`, or until the connection fails.
    pub async fn run(
        &self,
        topology: &Topology,
        connection: &Connection,
        publish: &Publisher,
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
            bytes: 0,
            deadline: None,
        };
        let linger = Duration::from_millis(self.delivery.linger_ms);
        let lost = loop {
            let deadline = pending.deadline;
            tokio::select! {
                () = stop.cancelled() => break false,
                () = sleep_until_opt(deadline), if deadline.is_some() => {
                    self.flush(&mut pending, topology, publish, stop).await;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        if read_batch_key(delivery.properties.headers().as_ref()).is_some() {
                            // A retried batch comes back whole and is delivered alone.
                            self.flush(&mut pending, topology, publish, stop).await;
                            self.retry(delivery, topology, publish, stop).await;
                            continue;
                        }
                        self.take(delivery, &mut pending, linger, topology, publish).await;
                        if pending.events.len() >= self.delivery.batch_max_events
                            || pending.bytes >= self.delivery.batch_max_bytes
                        {
                            self.flush(&mut pending, topology, publish, stop).await;
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
            self.flush(&mut pending, topology, publish, stop).await;
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

    /// Adds a fresh message's wanted events to the pending batch (acks it at once if none).
    async fn take(
        &self,
        delivery: Delivery,
        pending: &mut Pending,
        linger: Duration,
        topology: &Topology,
        publish: &Publisher,
    ) {
        let events: Vec<Event> = match serde_json::from_slice(&delivery.data) {
            Ok(events) => events,
            Err(error) => return self.undecodable(delivery, &error, topology, publish).await,
        };
        let before = events.len();
        let wanted: Vec<Arc<Event>> = events
            .into_iter()
            .filter(|e| self.delivery.wants(e))
            .map(Arc::new)
            .collect();
        self.count(Outcome::FilteredOut, before - wanted.len());
        if wanted.is_empty() {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        }
        pending.bytes += delivery.data.len();
        pending.events.extend(wanted);
        pending.deliveries.push(delivery);
        pending
            .deadline
            .get_or_insert_with(|| Instant::now() + linger);
    }

    async fn flush(
        &self,
        pending: &mut Pending,
        topology: &Topology,
        publish: &Publisher,
        stop: &CancellationToken,
    ) {
        pending.deadline = None;
        pending.bytes = 0;
        if pending.deliveries.is_empty() {
            return;
        }
        let deliveries = std::mem::take(&mut pending.deliveries);
        let events = std::mem::take(&mut pending.events);
        let batch = Batch {
            key: batch_key(self.sink.name(), &events),
            events,
        };
        let result = self.attempt(&batch, true, stop).await;
        let decision = decide(result, 0, self.max_attempts);
        let moved = self.place(&batch, decision, topology, publish).await;
        settle_messages(deliveries, moved, self.sink.name()).await;
    }

    async fn retry(
        &self,
        delivery: Delivery,
        topology: &Topology,
        publish: &Publisher,
        stop: &CancellationToken,
    ) {
        let headers = delivery.properties.headers().as_ref();
        let key = read_batch_key(headers).unwrap_or_default().to_owned();
        // From a header: any value, u32::MAX included, must survive `+ 1`.
        let attempts = read_attempts(headers);
        let events: Vec<Event> = match serde_json::from_slice(&delivery.data) {
            Ok(events) => events,
            Err(error) => return self.undecodable(delivery, &error, topology, publish).await,
        };
        let batch = Batch {
            key,
            events: events.into_iter().map(Arc::new).collect(),
        };
        let result = self.attempt(&batch, true, stop).await;
        let decision = decide(result, attempts, self.max_attempts);
        let moved = self.place(&batch, decision, topology, publish).await;
        settle_messages(vec![delivery], moved, self.sink.name()).await;
    }

    /// A message this pipeline did not write: kept, bytes and all, in the sink's dead-letter
    /// queue; acked only once the broker has it there.
    async fn undecodable(
        &self,
        delivery: Delivery,
        error: &serde_json::Error,
        topology: &Topology,
        publish: &Publisher,
    ) {
        let reason = format!("undecodable sink message: {error}");
        tracing::error!(sink = self.sink.name(), %reason, "dead-lettering a message");
        let queue = topology.sink_dlq(self.sink.name());
        let headers = batch_headers(self.sink.name(), "", 0, &reason);
        let moved = publish.store(&queue, &delivery.data, headers).await;
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
