//! Sinks: where valid events go. One file per sink; each says whether a failure is worth
//! retrying. The runner (`crate::settle`) batches, retries, dead-letters and breaks circuits
//! the same way for every sink, so a sink only has to deliver one batch and classify failure.

pub mod http;
pub mod mongo;
pub mod statsd;
#[cfg(test)]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use bson::RawDocumentBuf;
use serde_json::{Map, Value};

/// An enriched event that passed validation: its fields, and, when the worker made them, the
/// BSON bytes of its MongoDB document (made once, when the event's storability was checked,
/// and sent as they are). Reads as its fields; serialises as its fields only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    fields: Map<String, Value>,
    document: Option<RawDocumentBuf>,
}

impl Event {
    pub fn with_document(fields: Map<String, Value>, document: RawDocumentBuf) -> Self {
        Self {
            fields,
            document: Some(document),
        }
    }

    /// The MongoDB document made for this event, if one was.
    pub fn document(&self) -> Option<&RawDocumentBuf> {
        self.document.as_ref()
    }

    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    pub fn into_fields(self) -> Map<String, Value> {
        self.fields
    }
}

impl From<Map<String, Value>> for Event {
    fn from(fields: Map<String, Value>) -> Self {
        Self {
            fields,
            document: None,
        }
    }
}

impl std::ops::Deref for Event {
    type Target = Map<String, Value>;

    fn deref(&self) -> &Self::Target {
        &self.fields
    }
}

impl serde::Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.fields.serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::deserialize(deserializer).map(Self::from)
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

    /// Sends anything the sink buffers itself; called on shutdown.
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}
