//! Runs one sink: consumes the sink's own queue, batches events (count, bytes, time), applies
//! the sink's filter, delivers, and settles every message. Nothing is acked before the sink has
//! its events or the broker has confirmed them into the sink's retry or dead-letter queue, so a
//! sink can fail, hang or be killed without losing events or holding up any other sink.
//!
//! A failed batch travels as one message with its `Idempotency-Key` and attempt count in the
//! headers, so a retried batch is the same batch: same events, same key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ingest_pipeline::broker::{header_str, long_string, Answer, Publisher};
use ingest_pipeline::{Backoff, Topology};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sinks::{Batch, Event, Sink, SinkError};

const KEY_HEADER: &str = "x-batch-key";
const ATTEMPT_HEADER: &str = "x-attempt";
const ERROR_HEADER: &str = "x-last-error";
const SINK_HEADER: &str = "x-sink";
const KEY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3d0a_91e4_7c25_4b8e_b6f3_5e1d_0a7c_9f42);

/// How a sink is fed: batching, prefetch, quick retries, circuit breaker, filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub linger_ms: u64,
    pub prefetch: u16,
    /// Attempts in place (with backoff and full jitter) before a batch takes the durable path.
    pub inline_attempts: u32,
    /// Consecutive failed attempts that open the circuit; 0 disables the breaker.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// The longest one delivery of a batch may take; past it the attempt is a retryable
    /// failure, so a sink whose store stalls never hangs its runner.
    pub timeout_ms: u64,
    /// Only these event types (empty: all).
    pub types: Vec<String>,
    /// Only track events with these names (empty: all).
    pub events: Vec<String>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            batch_max_events: 500,
            batch_max_bytes: 1 << 20,
            linger_ms: 200,
            prefetch: 128,
            inline_attempts: 3,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            timeout_ms: 30_000,
            types: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl DeliverySettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_max_events == 0 || self.batch_max_bytes == 0 || self.prefetch == 0 {
            return Err("batch_max_events, batch_max_bytes and prefetch must be > 0".into());
        }
        if self.inline_attempts == 0 {
            return Err("inline_attempts must be > 0".into());
        }
        if self.timeout_ms == 0 {
            return Err("timeout_ms must be > 0".into());
        }
        Ok(())
    }

    /// Whether this sink wants the event.
    pub fn wants(&self, event: &Event) -> bool {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        if !self.types.is_empty() && !self.types.iter().any(|t| t == kind) {
            return false;
        }
        if !self.events.is_empty() {
            let name = event.get("event").and_then(Value::as_str);
            return kind == "track" && name.is_some_and(|n| self.events.iter().any(|e| e == n));
        }
        true
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
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

/// End-to-end lag of a delivered batch: now minus its oldest event's `receivedAt`.
fn record_lag(sink: &str, batch: &Batch) {
    let oldest = batch
        .events
        .iter()
        .filter_map(|e| e.get("receivedAt")?.as_str())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .min();
    if let Some(oldest) = oldest {
        let lag = chrono::Utc::now().signed_duration_since(oldest);
        let seconds = lag.num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!("sink_lag_seconds", "sink" => sink.to_owned()).record(seconds);
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

/// The same events in the same order always get the same key.
pub fn batch_key(sink: &str, events: &[Arc<Event>]) -> String {
    let mut material = String::from(sink);
    for event in events {
        material.push('\n');
        material.push_str(event.get("messageId").and_then(Value::as_str).unwrap_or(""));
    }
    uuid::Uuid::new_v5(&KEY_NAMESPACE, material.as_bytes()).to_string()
}

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

pub struct SinkRunner {
    pub sink: Arc<dyn Sink>,
    pub delivery: DeliverySettings,
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub stats: Arc<SinkStats>,
}

struct Pending {
    deliveries: Vec<Delivery>,
    events: Vec<Arc<Event>>,
    bytes: usize,
    deadline: Option<Instant>,
}

impl SinkRunner {
    /// Counts events in the log totals and in `sink_events_total{sink,outcome}`.
    fn count(&self, outcome: Outcome, events: usize) {
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
        let mut breaker = Breaker::new(
            self.delivery.breaker_failures,
            Duration::from_millis(self.delivery.breaker_cooldown_ms),
        );
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
                    self.flush(&mut pending, topology, publish, &mut breaker, stop).await;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        if header_str(delivery.properties.headers().as_ref(), KEY_HEADER).is_some() {
                            // A retried batch comes back whole and is delivered alone.
                            self.flush(&mut pending, topology, publish, &mut breaker, stop).await;
                            self.retry(delivery, topology, publish, &mut breaker, stop).await;
                            continue;
                        }
                        self.take(delivery, &mut pending, linger, topology, publish).await;
                        if pending.events.len() >= self.delivery.batch_max_events
                            || pending.bytes >= self.delivery.batch_max_bytes
                        {
                            self.flush(&mut pending, topology, publish, &mut breaker, stop).await;
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
            self.flush(&mut pending, topology, publish, &mut breaker, stop)
                .await;
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
        breaker: &mut Breaker,
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
        let result = self.attempt(&batch, breaker, stop).await;
        self.settle(deliveries, batch, 0, result, topology, publish)
            .await;
    }

    async fn retry(
        &self,
        delivery: Delivery,
        topology: &Topology,
        publish: &Publisher,
        breaker: &mut Breaker,
        stop: &CancellationToken,
    ) {
        let headers = delivery.properties.headers().as_ref();
        let key = header_str(headers, KEY_HEADER)
            .unwrap_or_default()
            .to_owned();
        // From a header: any value, u32::MAX included, must survive `+ 1`.
        let attempts = header_u32(headers, ATTEMPT_HEADER);
        let events: Vec<Event> = match serde_json::from_slice(&delivery.data) {
            Ok(events) => events,
            Err(error) => return self.undecodable(delivery, &error, topology, publish).await,
        };
        let batch = Batch {
            key,
            events: events.into_iter().map(Arc::new).collect(),
        };
        let result = self.attempt(&batch, breaker, stop).await;
        self.settle(vec![delivery], batch, attempts, result, topology, publish)
            .await;
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
        let moved = self
            .publish_body(&queue, &delivery.data, "", 0, &reason, publish)
            .await;
        settle_messages(vec![delivery], moved, self.sink.name()).await;
    }

    /// Calls the sink, retrying in place a few times; `None` means the worker stopped before
    /// the sink could be called. While the circuit is open this sink waits (its messages stay
    /// in its queue); no other sink is affected.
    async fn attempt(
        &self,
        batch: &Batch,
        breaker: &mut Breaker,
        stop: &CancellationToken,
    ) -> Option<Result<(), SinkError>> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut last = None;
        for _ in 0..self.delivery.inline_attempts {
            while let Some(wait) = breaker.open_for(Instant::now()) {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return last,
                }
            }
            if !breaker.allows(Instant::now()) {
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
            metrics::histogram!("sink_deliver_seconds", "sink" => sink.clone(), "result" => result_label)
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("sink_batch_size", "sink" => sink)
                .record(batch.events.len() as f64);
            breaker.record(
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

    /// Acks the messages once their events are delivered or durably elsewhere.
    async fn settle(
        &self,
        deliveries: Vec<Delivery>,
        batch: Batch,
        attempts: u32,
        result: Option<Result<(), SinkError>>,
        topology: &Topology,
        publish: &Publisher,
    ) {
        let name = self.sink.name();
        let moved = match result {
            Some(Ok(())) => {
                self.count(Outcome::Delivered, batch.events.len());
                record_lag(name, &batch);
                Ok(())
            }
            Some(Err(SinkError::ShuttingDown)) => Err("shutting down".to_owned()),
            Some(Err(SinkError::Permanent(error))) => {
                self.dead_letter(
                    &batch,
                    attempts.saturating_add(1),
                    &error,
                    topology,
                    publish,
                )
                .await
            }
            Some(Err(SinkError::Refused(refused))) => {
                self.count(
                    Outcome::Delivered,
                    batch.events.len().saturating_sub(refused.len()),
                );
                let events: Vec<Arc<Event>> = refused
                    .iter()
                    .filter_map(|(i, _)| batch.events.get(*i).cloned())
                    .collect();
                let reasons: Vec<_> = refused.iter().map(|(_, r)| r.as_str()).collect();
                let part = Batch {
                    key: batch_key(name, &events),
                    events,
                };
                self.dead_letter(
                    &part,
                    attempts.saturating_add(1),
                    &reasons.join("; "),
                    topology,
                    publish,
                )
                .await
            }
            Some(Err(error)) => {
                let failed = attempts.saturating_add(1);
                if failed >= self.max_attempts {
                    self.dead_letter(&batch, failed, &error.to_string(), topology, publish)
                        .await
                } else {
                    let at_least = match &error {
                        SinkError::Throttled { retry_after, .. } => *retry_after,
                        _ => Duration::ZERO,
                    };
                    self.delay(
                        &batch,
                        failed,
                        &error.to_string(),
                        at_least,
                        topology,
                        publish,
                    )
                    .await
                }
            }
            // Circuit open: wait in the first delay queue without spending an attempt.
            None => {
                self.delay(
                    &batch,
                    attempts,
                    "circuit open",
                    Duration::ZERO,
                    topology,
                    publish,
                )
                .await
            }
        };
        settle_messages(deliveries, moved, name).await;
    }

    async fn delay(
        &self,
        batch: &Batch,
        attempts: u32,
        error: &str,
        at_least: Duration,
        topology: &Topology,
        publish: &Publisher,
    ) -> Result<(), String> {
        let tier =
            (attempts.saturating_sub(1) as usize).min(self.retry_delays.len().saturating_sub(1));
        let delay = self.retry_delays[tier..]
            .iter()
            .copied()
            .find(|d| *d >= at_least)
            .or_else(|| self.retry_delays.last().copied())
            .ok_or("no retry delays configured")?;
        let queue = topology.sink_retry(self.sink.name(), delay);
        self.publish(&queue, batch, attempts, error, publish)
            .await?;
        self.count(Outcome::Retried, batch.events.len());
        tracing::info!(sink = self.sink.name(), attempts, ?delay, events = batch.events.len(), %error, "batch waits to be retried");
        Ok(())
    }

    async fn dead_letter(
        &self,
        batch: &Batch,
        attempts: u32,
        error: &str,
        topology: &Topology,
        publish: &Publisher,
    ) -> Result<(), String> {
        let queue = topology.sink_dlq(self.sink.name());
        self.publish(&queue, batch, attempts, error, publish)
            .await?;
        self.count(Outcome::DeadLettered, batch.events.len());
        tracing::warn!(sink = self.sink.name(), attempts, events = batch.events.len(), %error, "batch dead-lettered");
        Ok(())
    }

    async fn publish(
        &self,
        queue: &str,
        batch: &Batch,
        attempts: u32,
        error: &str,
        channel: &Publisher,
    ) -> Result<(), String> {
        let body = serde_json::to_vec(&batch.events).map_err(|e| e.to_string())?;
        self.publish_body(queue, &body, &batch.key, attempts, error, channel)
            .await
    }

    async fn publish_body(
        &self,
        queue: &str,
        body: &[u8],
        key: &str,
        attempts: u32,
        error: &str,
        channel: &Publisher,
    ) -> Result<(), String> {
        let mut headers = FieldTable::default();
        headers.insert(KEY_HEADER.into(), long_string(key));
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempts));
        let error: String = error.chars().take(1000).collect();
        headers.insert(ERROR_HEADER.into(), long_string(&error));
        headers.insert(SINK_HEADER.into(), long_string(self.sink.name()));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        // A late confirm is waited for, not answered with a second copy.
        let answer = channel
            .publish_and_wait("", queue, body, properties, Duration::from_secs(10))
            .await
            .map_err(|error| error.to_string())?;
        match answer {
            Answer::Confirmed => Ok(()),
            other => Err(format!("{queue} did not take the batch: {other:?}")),
        }
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

fn header_u32(headers: Option<&FieldTable>, key: &str) -> u32 {
    match headers.and_then(|h| h.inner().get(key)) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u32::from(*n),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(v: Value) -> Event {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn filters_by_type_and_event_name() {
        let only_orders = DeliverySettings {
            events: vec!["Order Completed".into()],
            ..DeliverySettings::default()
        };
        assert!(only_orders.wants(&event(json!({"type":"track","event":"Order Completed"}))));
        assert!(!only_orders.wants(&event(json!({"type":"track","event":"Product Viewed"}))));
        assert!(!only_orders.wants(&event(json!({"type":"screen","name":"Order Completed"}))));
        let screens = DeliverySettings {
            types: vec!["screen".into()],
            ..DeliverySettings::default()
        };
        assert!(screens.wants(&event(json!({"type":"screen","name":"Cart"}))));
        assert!(!screens.wants(&event(json!({"type":"track","event":"X"}))));
        assert!(DeliverySettings::default().wants(&event(json!({"type":"identify"}))));
    }

    #[test]
    fn batch_keys_depend_on_sink_and_events_only() {
        let a: Vec<Arc<Event>> = ["m1", "m2"]
            .iter()
            .map(|m| Arc::new(event(json!({"messageId": m}))))
            .collect();
        let b: Vec<Arc<Event>> = ["m1", "m3"]
            .iter()
            .map(|m| Arc::new(event(json!({"messageId": m}))))
            .collect();
        assert_eq!(batch_key("vendor", &a), batch_key("vendor", &a.clone()));
        assert_ne!(batch_key("vendor", &a), batch_key("vendor", &b));
        assert_ne!(batch_key("vendor", &a), batch_key("other", &a));
    }

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

    /// A sink whose store stalls: it never answers.
    struct Stalled;

    #[async_trait::async_trait]
    impl Sink for Stalled {
        fn name(&self) -> &str {
            "stalled"
        }

        async fn deliver(&self, _batch: &Batch) -> Result<(), SinkError> {
            std::future::pending().await
        }
    }

    /// A stalled store must not hang its runner: the call is bounded, and the batch takes the
    /// retry path like any other retryable failure.
    #[tokio::test(start_paused = true)]
    async fn a_sink_that_never_answers_is_a_retryable_failure_not_a_hang() {
        let runner = SinkRunner {
            sink: Arc::new(Stalled),
            delivery: DeliverySettings::default(),
            retry_delays: vec![Duration::from_secs(1)],
            max_attempts: 3,
            stats: Arc::new(SinkStats::default()),
        };
        let batch = Batch {
            key: "k".into(),
            events: vec![Arc::new(event(json!({"messageId": "m"})))],
        };
        let mut breaker = Breaker::new(0, Duration::from_secs(1));
        let stop = CancellationToken::new();
        let result = tokio::time::timeout(
            Duration::from_secs(3600),
            runner.attempt(&batch, &mut breaker, &stop),
        )
        .await
        .expect("the attempt hung on a stalled sink");
        assert!(
            matches!(&result, Some(Err(e)) if e.is_retryable()),
            "{result:?}"
        );
    }

    #[test]
    fn attempt_counts_are_read_from_any_integer_header() {
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::LongUInt(3));
        h.insert("b".into(), AMQPValue::LongLongInt(4));
        h.insert("c".into(), long_string("x"));
        assert_eq!(header_u32(Some(&h), "a"), 3);
        assert_eq!(header_u32(Some(&h), "b"), 4);
        assert_eq!(header_u32(Some(&h), "c"), 0);
        assert_eq!(header_u32(None, "a"), 0);
    }
}
