//! The broker's own limits, measured with lapin and nothing else: a bare publisher with
//! confirms (persistent, mandatory, to a quorum queue) and a bare consumer with acks. Also the
//! helpers the benchmark needs around the pipeline: pre-filling the raw queue with exactly what
//! a collector would publish, and reading a queue's depth.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use ingest_pipeline::broker::long_string;
use ingest_pipeline::headers;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::record::Outcome;

pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties).await
}

/// Declares a durable quorum queue, as the pipeline declares its raw queue. A queue that exists
/// already (the pipeline's own, with its length cap) is used as it is.
pub async fn declare_quorum(url: &str, queue: &str) -> anyhow::Result<()> {
    let connection = connect(url, "loadgen-declare").await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let probe = connection.create_channel().await?;
    if probe
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok()
    {
        let _ = connection.close(200, "".into()).await;
        return Ok(());
    }
    // A failed passive declare closes its channel; declare on a fresh one.
    let channel = connection.create_channel().await?;
    ingest_pipeline::broker::declare_queue(
        &channel,
        queue,
        ingest_pipeline::broker::quorum_arguments(),
    )
    .await?;
    let _ = connection.close(200, "".into()).await;
    Ok(())
}

/// Deletes a queue (the bare publisher's, after its run).
pub async fn delete_queue(url: &str, queue: &str) -> anyhow::Result<()> {
    let connection = connect(url, "loadgen-delete").await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "".into()).await;
    Ok(())
}

/// The properties a collector publishes a request with (same headers, same sizes).
pub fn collector_properties(source: &str, gzip: bool) -> BasicProperties {
    let now = chrono::Utc::now();
    let mut table = FieldTable::default();
    table.insert(
        headers::RECEIVED_AT.into(),
        long_string(&now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    table.insert(headers::SOURCE.into(), long_string(source));
    table.insert(headers::ENDPOINT.into(), long_string("batch"));
    table.insert(headers::CLIENT_IP.into(), long_string("127.0.0.1"));
    table.insert(
        headers::USER_AGENT.into(),
        long_string("Shop/4.12.0 (iPhone; iOS 17.4.1) analytics-swift/1.5.11"),
    );
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_timestamp(u64::try_from(now.timestamp()).unwrap_or(0))
        .with_app_id(source.into())
        .with_headers(table);
    if gzip {
        properties = properties.with_content_encoding("gzip".into());
    }
    properties
}

/// At least one channel in confirm mode, `count` if more.
pub async fn confirm_channels(
    connection: &Connection,
    count: usize,
) -> lapin::Result<Vec<Channel>> {
    let mut open = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        open.push(channel);
    }
    Ok(open)
}

/// Publishes to one queue with confirms over `channels` confirm channels on one connection;
/// each send waits for its confirm, so the concurrency of the caller is the in-flight window.
pub struct PublishTarget {
    _connection: Connection,
    channels: Vec<Channel>,
    next: AtomicUsize,
    queue: String,
    source: String,
    confirm_timeout: Duration,
    /// Client addresses the requests come from in turn, each with one of
    /// [`crate::stages_enrich::AGENTS`] (none: the collector-like defaults).
    clients: Vec<String>,
}

impl PublishTarget {
    /// Requests from these client addresses, in turn, each with a user agent of its own.
    pub fn from_clients(mut self, clients: Vec<String>) -> Self {
        self.clients = clients;
        self
    }

    fn properties(&self, gzip: bool, index: usize) -> BasicProperties {
        let properties = collector_properties(&self.source, gzip);
        if self.clients.is_empty() {
            return properties;
        }
        let mut table = properties.headers().clone().unwrap_or_default();
        let agents = crate::stages_enrich::AGENTS;
        let n = index % self.clients.len();
        table.insert(headers::CLIENT_IP.into(), long_string(&self.clients[n]));
        table.insert(
            headers::USER_AGENT.into(),
            long_string(agents[n % agents.len()]),
        );
        properties.with_headers(table)
    }
    pub async fn open(url: &str, queue: &str, channels: usize) -> anyhow::Result<Self> {
        let connection = connect(url, "loadgen-publish").await?;
        let channels = confirm_channels(&connection, channels).await?;
        Ok(Self {
            _connection: connection,
            channels,
            next: AtomicUsize::new(0),
            queue: queue.to_owned(),
            source: "shop-ios".into(),
            confirm_timeout: Duration::from_secs(30),
            clients: Vec::new(),
        })
    }
}

impl crate::drive::Target for PublishTarget {
    async fn send(&self, body: Bytes, gzip: bool) -> Outcome {
        let sent = self.next.fetch_add(1, Ordering::Relaxed);
        let index = sent % self.channels.len();
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish = async {
            self.channels[index]
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    options,
                    &body,
                    self.properties(gzip, sent),
                )
                .await?
                .await
        };
        match tokio::time::timeout(self.confirm_timeout, publish).await {
            Ok(Ok(Confirmation::Ack(None))) => Outcome::Accepted,
            Ok(Ok(Confirmation::Ack(Some(_)))) => Outcome::Failed("unroutable".into()),
            Ok(Ok(_)) => Outcome::Failed("nack".into()),
            Ok(Err(_)) => Outcome::Failed("amqp-error".into()),
            Err(_) => Outcome::Failed("timeout".into()),
        }
    }
}

/// Messages ready in a queue, by passive declare on an open channel.
pub async fn depth(channel: &Channel, queue: &str) -> Option<u64> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()
        .map(|q| u64::from(q.message_count()))
}

/// One connection for reading depths; reopened when it breaks.
pub struct DepthProbe {
    url: String,
    channel: Option<(Connection, Channel)>,
}

impl DepthProbe {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            channel: None,
        }
    }

    /// Messages ready in `queues` (one name, or several separated by commas: their sum).
    pub async fn depth(&mut self, queues: &str) -> Option<u64> {
        let mut total = 0;
        for queue in queues.split(',').map(str::trim).filter(|q| !q.is_empty()) {
            total += self.one(queue).await?;
        }
        Some(total)
    }

    async fn one(&mut self, queue: &str) -> Option<u64> {
        if self.channel.is_none() {
            let connection = connect(&self.url, "loadgen-depth").await.ok()?;
            let channel = connection.create_channel().await.ok()?;
            self.channel = Some((connection, channel));
        }
        let (_, channel) = self.channel.as_ref()?;
        let found = depth(channel, queue).await;
        if found.is_none() {
            // A failed passive declare closes the channel.
            self.channel = None;
        }
        found
    }
}

/// What a drain measurement saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Drain {
    pub messages: u64,
    pub events: u64,
    pub seconds: f64,
    pub messages_per_s: f64,
    pub events_per_s: f64,
}

/// The bare consumer: takes `expect` messages off `queue` with acks (`multiple` every
/// `ack_every`) at `prefetch`, and times it from the first delivery to the last ack.
pub async fn consume(
    url: &str,
    queue: &str,
    prefetch: u16,
    ack_every: u64,
    expect: u64,
    events_per_message: f64,
    within: Duration,
) -> anyhow::Result<Drain> {
    let connection = connect(url, "loadgen-consume").await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "loadgen-bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let deadline = Instant::now() + within;
    let mut first = None;
    let mut taken = 0u64;
    let mut bytes = 0usize;
    while taken < expect {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(delivery)) = tokio::time::timeout(left, consumer.next()).await else {
            anyhow::bail!("the queue ran dry or timed out after {taken} of {expect} messages");
        };
        let delivery = delivery?;
        first.get_or_insert_with(Instant::now);
        taken += 1;
        bytes += delivery.data.len();
        if taken.is_multiple_of(ack_every.max(1)) || taken == expect {
            delivery
                .ack(BasicAckOptions {
                    multiple: ack_every > 1,
                })
                .await?;
        }
    }
    let seconds = first
        .map_or(Duration::ZERO, |f| f.elapsed())
        .as_secs_f64()
        .max(1e-3);
    tracing::debug!(bytes, "consumed");
    let _ = connection.close(200, "".into()).await;
    let events = (taken as f64 * events_per_message).round() as u64;
    Ok(Drain {
        messages: taken,
        events,
        seconds,
        messages_per_s: taken as f64 / seconds,
        events_per_s: events as f64 / seconds,
    })
}

/// Fills `queue` with `requests` payloads the way a collector publishes them (so the worker
/// sees real traffic); returns (messages, events) and writes every messageId to `ids`.
pub async fn prefill(
    url: &str,
    queue: &str,
    mut generator: crate::payload::Generator,
    requests: u64,
    concurrency: usize,
    ids: &crate::record::Recorder,
    clients: Vec<String>,
) -> anyhow::Result<crate::record::Report> {
    let target = Arc::new(
        PublishTarget::open(url, queue, 4)
            .await?
            .from_clients(clients),
    );
    // Closed loop until `requests` were accepted.
    ids.start();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = requests / concurrency.max(1) as u64 + 1;
    for _ in 0..concurrency.max(1) {
        let (target, ids, done) = (target.clone(), ids.clone(), done.clone());
        let mut generator = generator.fork();
        tasks.spawn(async move {
            for _ in 0..per_task {
                if done.fetch_add(1, Ordering::Relaxed) as u64 >= requests {
                    return;
                }
                let payload = generator.next_payload();
                let started = std::time::Instant::now();
                ids.offered(started);
                let outcome =
                    crate::drive::Target::send(&*target, payload.body.clone(), payload.gzip).await;
                ids.completed(started, &outcome, &payload.ids, payload.json_len);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    ids.finish();
    Ok(ids.report("prefill"))
}

/// What one of a sink's queues held: messages, and the events in them (each message of a
/// sink's queue is a JSON array of events).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Held {
    pub queue: String,
    pub messages: u64,
    pub events: u64,
}

/// The order a sink's queues are read in: its retry queues first, its dead-letter queue last.
/// While they are read, a batch can only move from a retry queue (its TTL over) to the sink's
/// queue, so it is read in one place or the other, never missed.
pub fn reading_order(queues: &[String]) -> Vec<String> {
    let rank = |q: &str| {
        if q.contains(".retry.") {
            0
        } else if q.ends_with(".dlq") {
            2
        } else {
            1
        }
    };
    let mut ordered = queues.to_vec();
    ordered.sort_by_key(|q| rank(q));
    ordered
}

/// Reads every message of `queues` (in [`reading_order`]) with `basic.get`, without acking,
/// and returns what each held and the `messageId`s of every event. The messages stay where
/// they were: the channel closes with them unacked and the broker requeues them (each counts
/// one delivery towards its queue's delivery limit). Meant for a stopped worker's queues.
pub async fn read_held(url: &str, queues: &[String]) -> anyhow::Result<(Vec<Held>, Vec<String>)> {
    let connection = connect(url, "loadgen-account").await?;
    let channel = connection.create_channel().await?;
    let mut held = Vec::new();
    let mut ids = Vec::new();
    for queue in reading_order(queues) {
        let mut found = Held {
            queue: queue.clone(),
            messages: 0,
            events: 0,
        };
        while let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            let data = &message.delivery.data;
            found.messages += 1;
            found.events += crate::receiver::count_events(data);
            ids.extend(crate::receiver::message_ids(data));
        }
        held.push(found);
    }
    let _ = channel.close(200, "read".into()).await;
    let _ = connection.close(200, "".into()).await;
    Ok((held, ids))
}

#[cfg(test)]
mod tests {
    #[test]
    fn retry_queues_are_read_before_the_sink_queue_and_the_dlq_last() {
        let queues: Vec<String> = [
            "b7.sink.slow.dlq",
            "b7.sink.slow",
            "b7.sink.slow.retry.1000ms",
            "b7.sink.slow.retry.60000ms",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            super::reading_order(&queues),
            [
                "b7.sink.slow.retry.1000ms",
                "b7.sink.slow.retry.60000ms",
                "b7.sink.slow",
                "b7.sink.slow.dlq"
            ]
        );
    }
}
