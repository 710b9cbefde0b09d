//! Sinks: where valid events go. One file per sink; each says whether a failure is worth
//! retrying. The runner (`crate::settle`) batches, retries, dead-letters and breaks circuits
//! the same way for every sink, so a sink only has to deliver one batch and classify failure.
//!
//! An event is the same event however often it arrives when its `source` and `messageId` are
//! the same ([`EventId`]): MongoDB's `_id`, the key HTTP sinks send with each event
//! ([`EventId::key`]) and the statsd sink's window of recent events all derive from it.

pub mod http;
pub mod mongo;
pub mod statsd;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bson::RawDocumentBuf;
use ingest_schema::Doc;
use serde_json::{Map, Value};

/// An enriched event that passed validation: its fields as parsed from its delivery
/// (`ingest_schema::Doc`: spans of the delivery's text plus what the worker added), and, when
/// the worker made them, the BSON bytes of its MongoDB document (made once, when the event's
/// storability was checked, and sent as they are). Serialises as its fields only. Its JSON
/// text is written once, when first asked for ([`Event::json`]), and kept.
///
/// [`Event::fields`] builds it as a `serde_json::Map`, for tests and tools; the worker's own
/// paths read the `Doc`.
#[derive(Debug, Clone, Default)]
pub struct Event {
    doc: Doc,
    document: Option<RawDocumentBuf>,
    json: OnceLock<Vec<u8>>,
    /// Taken from the replay lane: its `receivedAt` is old, so it is left out of the lags.
    replayed: bool,
}

/// The capacity an event's JSON text starts with: the benchmark's SDK events come to 0.6–1.5 KB.
const JSON_START: usize = 1024;

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.doc == other.doc && self.document == other.document
    }
}

impl Event {
    pub fn with_document(doc: Doc, document: RawDocumentBuf) -> Self {
        Self {
            doc,
            document: Some(document),
            json: OnceLock::new(),
            replayed: false,
        }
    }

    /// The event's fields as compact JSON text, the bytes its `Serialize` writes
    /// (`Node::write_json`: spans of the delivery copied as they are): written the first time
    /// it is asked for, then kept. The lanes size batches with it; HTTP bodies and the sinks'
    /// queues copy it instead of writing the event again.
    pub fn json(&self) -> &[u8] {
        self.json.get_or_init(|| {
            // Room for a typical SDK event at once, rather than growing from 128 bytes.
            let mut json = Vec::with_capacity(JSON_START);
            self.doc.node().write_json(&mut json);
            json
        })
    }

    /// The MongoDB document made for this event, if one was.
    pub fn document(&self) -> Option<&RawDocumentBuf> {
        self.document.as_ref()
    }

    pub fn doc(&self) -> &Doc {
        &self.doc
    }

    /// The string field `key` of the event.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.doc.get_str(key)
    }

    /// Copies the event's strings out of its delivery's text, so it no longer holds that text.
    pub fn detach(&mut self) {
        self.doc = self.doc.detached();
    }

    /// Marks the event as taken from the replay lane.
    pub fn mark_replayed(&mut self) {
        self.replayed = true;
    }

    /// Whether the event was taken from the replay lane (its age is not live traffic's lag).
    pub fn is_replayed(&self) -> bool {
        self.replayed
    }

    /// The event as a `serde_json::Map`, built anew (tests and tools).
    pub fn fields(&self) -> Map<String, Value> {
        self.doc.to_map()
    }
}

impl From<Doc> for Event {
    fn from(doc: Doc) -> Self {
        Self {
            doc,
            document: None,
            json: OnceLock::new(),
            replayed: false,
        }
    }
}

impl From<Map<String, Value>> for Event {
    fn from(fields: Map<String, Value>) -> Self {
        Self::from(Doc::from_value(&Value::Object(fields)))
    }
}

/// Events as a JSON array, each copied from its [`Event::json`] (the bytes
/// `serde_json::to_vec(events)` writes).
pub fn json_array(events: &[Arc<Event>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + events.iter().map(|e| e.json().len() + 1).sum::<usize>());
    body.push(b'[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event.json());
    }
    body.push(b']');
    body
}

impl serde::Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.doc.serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Event {
    /// An event read back from a sink's queue: parsed once into its own `Doc`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        let text: Box<str> = raw.into();
        let doc = Doc::parse(Arc::from(text)).map_err(serde::de::Error::custom)?;
        if !doc.is_object() {
            return Err(serde::de::Error::custom("an event is a JSON object"));
        }
        Ok(Self::from(doc))
    }
}

/// The events of a batch as the sinks' queues hold it (a JSON array of objects), parsed once:
/// every event reads its strings from the message's text, as events from a raw delivery do.
pub fn events_from_json(json: &[u8]) -> Result<Vec<Event>, serde_json::Error> {
    use serde::de::Error as _;
    let text = std::str::from_utf8(json).map_err(serde_json::Error::custom)?;
    let items = Doc::parse(Arc::from(text))?
        .into_items()
        .ok_or_else(|| serde_json::Error::custom("a batch is a JSON array of events"))?;
    items
        .into_iter()
        .map(|event| {
            if event.is_object() {
                Ok(Event::from(event))
            } else {
                Err(serde_json::Error::custom("an event is a JSON object"))
            }
        })
        .collect()
}

/// Names the event in [`EventId::key`]: a fixed UUID, so the key of an event is the same in
/// every worker and every release.
pub const EVENT_KEY_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1c_2a5e_93d4_4b07_8e62_c1f0_7a3b_d915);

/// What makes two copies of an event the same event: its source (the app that owns the write
/// key, set by the worker) and its `messageId` (the SDK's, or derived from the request's
/// content). Every event the worker hands to a sink has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId<'a> {
    pub source: &'a str,
    pub message_id: &'a str,
}

impl<'a> EventId<'a> {
    /// `None` for an event without a string `source` and `messageId`.
    pub fn of(event: &'a Event) -> Option<Self> {
        Some(Self {
            source: event.get_str("source")?,
            message_id: event.get_str("messageId")?,
        })
    }

    /// The event's idempotency key: the UUIDv5 of `<source>\n<messageId>` in
    /// [`EVENT_KEY_NAMESPACE`]. Anyone can compute it again from the two fields; a source's
    /// name holds no newline, so no two events share it short of a SHA-1 collision.
    pub fn key(&self) -> uuid::Uuid {
        let mut name = Vec::with_capacity(self.source.len() + 1 + self.message_id.len());
        name.extend_from_slice(self.source.as_bytes());
        name.push(b'\n');
        name.extend_from_slice(self.message_id.as_bytes());
        uuid::Uuid::new_v5(&EVENT_KEY_NAMESPACE, &name)
    }
}

/// What a sink is asked to take at once. `key` is the same every time this exact batch is
/// retried (HTTP sinks send it as `Idempotency-Key`).
#[derive(Debug, Clone)]
pub struct Batch {
    pub key: String,
    pub events: Vec<Arc<Event>>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SinkError {
    /// Try again later: the sink is unreachable, overloaded or timed out.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Try again, not before `retry_after` (the sink said so, e.g. 429/503 with Retry-After).
    #[error("throttled for {retry_after:?}: {reason}")]
    Throttled {
        reason: String,
        retry_after: Duration,
    },
    /// Retrying cannot help: the sink refused these events.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The sink took the batch except these events (index in the batch, reason), for good.
    #[error("{} events refused", .0.len())]
    Refused(Vec<(usize, String)>),
    /// The worker is shutting down; the events stay unacked for the next worker.
    #[error("shutting down")]
    ShuttingDown,
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_) | Self::Throttled { .. })
    }
}

/// A destination for valid events.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Names the sink in queue names, logs and metrics: `[a-z0-9_-]+`.
    fn name(&self) -> &str;

    /// Delivers one batch, all or nothing as far as the caller knows.
    async fn deliver(&self, batch: &Batch) -> Result<(), SinkError>;

    /// Bytes the sink adds to each event's JSON in what it sends, at most (an HTTP sink's
    /// event key): counted against `batch_max_bytes` when batches are cut.
    fn event_overhead(&self) -> usize {
        0
    }

    /// Sends anything the sink buffers itself; called on shutdown.
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_sink_queue_message_is_read_once_into_events_sharing_its_text() {
        let body = br#"[{"a":1,"s":"x\"y"},{"b":[true,null]}]"#;
        let events = events_from_json(body).expect("events");
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.doc().text().len() == body.len()));
        assert_eq!(events[0].fields()["s"], json!("x\"y"));
        assert_eq!(
            json_array(&events.into_iter().map(Arc::new).collect::<Vec<_>>()),
            serde_json::to_vec(&serde_json::from_slice::<Value>(body).expect("json"))
                .expect("writes")
        );
        for bad in [&b"{}"[..], b"[1]", b"[{}", b"\xff"] {
            assert!(events_from_json(bad).is_err(), "{bad:?}");
        }
    }
}
