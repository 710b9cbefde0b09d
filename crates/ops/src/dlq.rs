//! `ingestctl dlq`: look into and replay the invalid queue and the sinks' dead-letter queues.
//!
//! Replay re-validates every event against the schemas as they are now. In the invalid queue,
//! an event that now passes is published back to the raw queue as a one-event batch with its
//! original source and receive time, so the worker takes it like any beacon (same messageId,
//! so a replay never duplicates). A dead-lettered sink batch whose events all pass goes back to
//! its sink's queue with a fresh attempt count. Everything else stays where it was: messages
//! are held unacknowledged while the run lasts and returned to their queue at the end, so
//! `--limit` bounds the memory a replay takes.

use std::collections::BTreeMap;
use std::time::Duration;

use ingest_pipeline::broker::{long_string, until_taken, Policy, Publisher};
use ingest_pipeline::message::{
    headers, is_death_record, mark_replayed, read_batch_key, Endpoint, Replayed, RequestMeta,
};
use ingest_pipeline::Topology;
use ingest_schema::Registry;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::{json, Value};

/// Which kind of queue a name is, under the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadQueue {
    Invalid,
    /// Raw payloads that reached the delivery limit.
    Raw,
    /// A sink's DLQ, with the sink's name.
    Sink(String),
}

impl DeadQueue {
    pub fn parse(topology: &Topology, queue: &str) -> Option<Self> {
        if queue == topology.invalid() {
            return Some(Self::Invalid);
        }
        if queue == topology.raw_dlq() {
            return Some(Self::Raw);
        }
        let sink = queue
            .strip_prefix(&format!("{}.sink.", topology.prefix()))?
            .strip_suffix(".dlq")?;
        (!sink.is_empty()).then(|| Self::Sink(sink.to_owned()))
    }
}

/// Takes up to `limit` messages without acknowledging them.
pub async fn take(
    channel: &Channel,
    queue: &str,
    limit: usize,
) -> lapin::Result<Vec<BasicGetMessage>> {
    let mut messages = Vec::new();
    while messages.len() < limit {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(message) => messages.push(message),
            None => break,
        }
    }
    Ok(messages)
}

/// What `show` prints for one message: its string headers and its body as JSON (or a note).
pub fn describe(message: &BasicGetMessage, max_body: usize) -> Value {
    let mut header_map = BTreeMap::new();
    if let Some(table) = message.delivery.properties.headers() {
        for (key, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            header_map.insert(key.as_str().to_owned(), text);
        }
    }
    let data = &message.delivery.data;
    let body = if data.len() > max_body {
        json!(format!(
            "({} bytes, not shown; raise --max-body)",
            data.len()
        ))
    } else {
        serde_json::from_slice(data)
            .unwrap_or_else(|_| json!(format!("({} bytes, not JSON)", data.len())))
    };
    json!({"headers": header_map, "body": body})
}

#[derive(Debug, Default)]
pub struct Replay {
    pub replayed: usize,
    /// Why messages were kept, with counts.
    pub kept: BTreeMap<String, usize>,
}

/// Decides one message: `Ok((exchange, routing key, body, properties))` to republish, or
/// `Err(why)` to keep it.
pub fn plan(
    kind: &DeadQueue,
    topology: &Topology,
    registry: &Registry,
    message: &BasicGetMessage,
) -> Result<(String, Vec<u8>, BasicProperties), String> {
    let body = || -> Result<Value, String> {
        serde_json::from_slice(&message.delivery.data).map_err(|_| "not JSON".to_owned())
    };
    match kind {
        DeadQueue::Raw => Ok(raw_back(topology, message)),
        DeadQueue::Invalid => {
            let body = body()?;
            if let Some(kind @ ("folded" | "overflow")) = body["reason"].as_str() {
                return Err(format!(
                    "a summary ({kind}): it counts events it does not hold; nothing to replay"
                ));
            }
            let event = match body.get("event") {
                Some(Value::Object(event)) => event.clone(),
                _ => return Err("undecodable payload: nothing to re-validate".to_owned()),
            };
            if let Err(invalid) = registry.validate(event.clone()) {
                let first = invalid
                    .errors
                    .first()
                    .map(|i| format!("{}: {}", i.pointer, i.message))
                    .unwrap_or_default();
                return Err(format!("still invalid ({first})"));
            }
            let text = |key: &str| body.get(key).and_then(Value::as_str).unwrap_or_default();
            // The record's own receive time; a record without one is taken as received now.
            let received_at = chrono::DateTime::parse_from_rfc3339(text("receivedAt"))
                .map_or_else(|_| chrono::Utc::now(), |t| t.with_timezone(&chrono::Utc));
            let meta = RequestMeta {
                request_id: text("requestId").to_owned(),
                received_at,
                source: text("source").to_owned(),
                endpoint: Endpoint::Batch,
                client_ip: None,
                user_agent: None,
            };
            let mut table = meta.headers();
            mark_replayed(&mut table, "invalid");
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(meta.request_id.into())
                .with_headers(table);
            let payload = serde_json::to_vec(&json!({"batch": [Value::Object(event)]}))
                .map_err(|e| e.to_string())?;
            Ok((topology.raw(), payload, properties))
        }
        DeadQueue::Sink(sink) => {
            let Value::Array(events) = &body()? else {
                return Err("not a batch of events".to_owned());
            };
            for event in events {
                let Value::Object(event) = event else {
                    return Err("an element is not an event".to_owned());
                };
                if registry.validate(event.clone()).is_err() {
                    return Err("an event no longer validates".to_owned());
                }
            }
            let mut table = FieldTable::default();
            let old = message.delivery.properties.headers().as_ref();
            if let Some(key) = read_batch_key(old) {
                table.insert(headers::BATCH_KEY.into(), long_string(key));
            }
            mark_replayed(&mut table, "dlq");
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(table);
            Ok((
                topology.sink_queue(sink),
                message.delivery.data.clone(),
                properties,
            ))
        }
    }
}

/// A raw payload goes back as the collector published it (gzip included), without the
/// broker's death records; the raw queue counts its deliveries afresh. One that came from the
/// replay lane goes back there with its replay marks (its sinks, statsd left out).
fn raw_back(topology: &Topology, message: &BasicGetMessage) -> (String, Vec<u8>, BasicProperties) {
    let replayed = Replayed::read(message.delivery.properties.headers().as_ref()).is_some();
    let mut table = FieldTable::default();
    if let Some(old) = message.delivery.properties.headers() {
        for (key, value) in old.inner() {
            if !is_death_record(key.as_str()) {
                table.insert(key.clone(), value.clone());
            }
        }
    }
    let queue = match replayed {
        true => topology.replay(),
        false => {
            mark_replayed(&mut table, "raw.dlq");
            topology.raw()
        }
    };
    let properties = message.delivery.properties.clone().with_headers(table);
    (queue, message.delivery.data.clone(), properties)
}

/// Replays what now passes; with `dry_run`, only reports. Kept messages return to the queue
/// when the caller closes the channel.
pub async fn replay(
    kind: &DeadQueue,
    topology: &Topology,
    registry: &Registry,
    messages: Vec<BasicGetMessage>,
    publisher: &Publisher,
    dry_run: bool,
) -> anyhow::Result<Replay> {
    let mut outcome = Replay::default();
    for message in messages {
        match plan(kind, topology, registry, &message) {
            Err(why) => *outcome.kept.entry(why).or_default() += 1,
            Ok(_) if dry_run => outcome.replayed += 1,
            Ok((queue, body, properties)) => {
                let patient = Policy::patient(Duration::from_secs(10));
                match until_taken(publisher, "", &queue, &body, properties, &patient).await {
                    Ok(()) => {
                        message.delivery.ack(BasicAckOptions::default()).await?;
                        outcome.replayed += 1;
                    }
                    Err(error) => {
                        anyhow::bail!("the broker did not take the replayed message into {queue} ({error}); stopped (nothing was lost)")
                    }
                }
            }
        }
    }
    Ok(outcome)
}
