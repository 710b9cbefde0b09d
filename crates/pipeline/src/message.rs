//! The message contract: every AMQP header a service writes or reads, the tracking API's
//! endpoints, and a request's metadata to and from the properties of its raw message. The
//! collector, the worker and `ingestctl` all go through here, so the names and values are
//! written in one place. They are the wire format: a worker of the previous release reads
//! what this one writes (and the other way round) during a rolling upgrade, so a change here
//! is a migration.
//!
//! Three kinds of message carry headers:
//! - a raw message (`<prefix>.raw`): the request body as the client sent it, with what only
//!   the collector knew (receive time, source, endpoint, client address, user agent) as
//!   headers and the request id as `message_id`;
//! - a batch in a sink's queues (`<prefix>.sink.<name>…`): a JSON array of events with its
//!   `Idempotency-Key`, the failed attempts so far, the last error and the sink;
//! - an invalid record (`<prefix>.invalid`): with its reason, source and request id.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

pub use ingest_schema::EVENT_TYPES;

use crate::broker::{header_str, long_string};

/// Header names.
pub mod headers {
    /// Raw message: when the collector received the request (RFC 3339, milliseconds, UTC).
    pub const RECEIVED_AT: &str = "received_at";
    /// Raw message and invalid record: the app that owns the write key (never the key).
    pub const SOURCE: &str = "source";
    /// Raw message: the client's address.
    pub const CLIENT_IP: &str = "client_ip";
    /// Raw message: the client's `User-Agent`, if it sent one.
    pub const USER_AGENT: &str = "user_agent";
    /// Raw message: the endpoint posted to ([`Endpoint`](super::Endpoint)).
    pub const ENDPOINT: &str = "endpoint";
    /// Sink batch: its `Idempotency-Key`, the same for every retry of the same events.
    pub const BATCH_KEY: &str = "x-batch-key";
    /// Sink batch: deliveries that failed so far.
    pub const ATTEMPT: &str = "x-attempt";
    /// Sink batch: why the last delivery failed (at most [`LAST_ERROR_CHARS`](super::LAST_ERROR_CHARS)).
    pub const LAST_ERROR: &str = "x-last-error";
    /// Sink batch: the sink's name.
    pub const SINK: &str = "x-sink";
    /// Raw message: the events of the batch the collector refused as too large while accepting
    /// the others (`index:code:bytes`, comma-separated; see [`RefusedEvent`](super::RefusedEvent)).
    /// A non-object element is not named: the worker finds it by itself.
    pub const REFUSED_EVENTS: &str = "x-refused-events";
    /// Invalid record: `decode`, `schema`, `storage`, `too_large` or `internal`.
    pub const REASON: &str = "reason";
    /// Invalid record: the request it came from.
    pub const REQUEST_ID: &str = "request_id";
    /// A message `ingestctl dlq replay` sent back: the queue it came from (`invalid`, `dlq`,
    /// `raw.dlq`); or an archived request `ingestctl replay` sent to the replay lane
    /// (`archive`).
    pub const REPLAYED: &str = "x-replayed";
    /// Replayed request: when `ingestctl replay` sent it (RFC 3339, milliseconds, UTC); the
    /// replay lane's lag is counted from it.
    pub const REPLAYED_AT: &str = "x-replayed-at";
    /// Replayed request: the sinks it goes to, comma-separated. Without it, every sink but
    /// statsd (a replay would count its events twice there).
    pub const REPLAY_SINKS: &str = "x-replay-sinks";
    /// Sink batch: which of its events came from the replay lane (their indexes,
    /// comma-separated), so their age stays out of the sink's lag when the batch comes back.
    pub const REPLAYED_EVENTS: &str = "x-replayed-events";
    /// The broker's own dead-letter records start with these (`x-death`,
    /// `x-first-death-reason`, …).
    pub const DEATH_PREFIXES: [&str; 3] = ["x-death", "x-first-death", "x-last-death"];
}

/// Bytes of a user agent that travel (cut at a character's boundary); the rest is cut. In
/// bytes, not characters: the worker's allowance for its own fields in an event
/// (`built::WORKER_FIELDS_BYTES`) counts it.
pub const USER_AGENT_BYTES: usize = 512;

/// `agent` in at most [`USER_AGENT_BYTES`] bytes.
pub fn cut_user_agent(agent: &str) -> String {
    let mut end = agent.len().min(USER_AGENT_BYTES);
    while !agent.is_char_boundary(end) {
        end -= 1;
    }
    agent[..end].to_owned()
}
/// Characters of a batch's last error that travel; the rest is cut.
pub const LAST_ERROR_CHARS: usize = 1000;

/// The tracking API's endpoints: `batch`, or one event of the named type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Batch,
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl Endpoint {
    const ALL: [Self; 7] = [
        Self::Batch,
        Self::Track,
        Self::Identify,
        Self::Page,
        Self::Screen,
        Self::Group,
        Self::Alias,
    ];

    /// The endpoint of a path segment after `/v1/`, with `import`, analytics.js' short forms,
    /// and `b`: where Segment's mobile SDKs and analytics.js' batching post a batch.
    pub fn parse(path: &str) -> Option<Self> {
        Some(match path {
            "batch" | "import" | "b" => Self::Batch,
            "track" | "t" => Self::Track,
            "identify" | "i" => Self::Identify,
            "page" | "p" => Self::Page,
            "screen" | "s" => Self::Screen,
            "group" | "g" => Self::Group,
            "alias" | "a" => Self::Alias,
            _ => return None,
        })
    }

    /// Its name in the `endpoint` header, and an event's `type` for a single-event endpoint.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Track => "track",
            Self::Identify => "identify",
            Self::Page => "page",
            Self::Screen => "screen",
            Self::Group => "group",
            Self::Alias => "alias",
        }
    }

    /// The endpoint an `endpoint` header names ([`as_str`](Self::as_str), nothing else).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }
}

/// The UUIDv5 namespace of the ids the worker derives for a request from its content: its id
/// when the message has none, and the seed of its events' missing `messageId`s. Changing it
/// changes those ids, so a redelivery across the change would be stored twice.
pub const REQUEST_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x0b5e_77d2_51a4_4c39_8e0f_9a61_c2d4_e5f1);

/// What the collector knew about a request, carried in its raw message's properties.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestMeta {
    /// The collector's request id (`message_id`).
    pub request_id: String,
    pub received_at: DateTime<Utc>,
    pub source: String,
    pub endpoint: Endpoint,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
}

impl RequestMeta {
    /// Reads a raw message's properties. What is missing gets a stand-in that a redelivery
    /// gets too: no receive time is the AMQP timestamp (then now), no request id a UUIDv5 of
    /// the body, no source `unknown`, and no endpoint, or one this release does not know, is
    /// `batch`.
    pub fn from_properties(properties: &BasicProperties, body: &[u8]) -> Self {
        let h = properties.headers().as_ref();
        let received_at = header_str(h, headers::RECEIVED_AT)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                properties
                    .timestamp()
                    .and_then(|secs| i64::try_from(secs).ok())
                    .and_then(|secs| DateTime::from_timestamp(secs, 0))
            })
            .unwrap_or_else(Utc::now);
        // Without the collector's id, the body itself names the request, so redeliveries agree.
        let request_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_else(|| uuid::Uuid::new_v5(&REQUEST_ID_NAMESPACE, body).to_string());
        Self {
            request_id,
            received_at,
            source: header_str(h, headers::SOURCE)
                .unwrap_or("unknown")
                .to_owned(),
            endpoint: header_str(h, headers::ENDPOINT)
                .and_then(Endpoint::from_name)
                .unwrap_or(Endpoint::Batch),
            client_ip: header_str(h, headers::CLIENT_IP).map(str::to_owned),
            user_agent: header_str(h, headers::USER_AGENT).map(cut_user_agent),
        }
    }

    /// The headers that carry it: the client's address and user agent only when known, the
    /// user agent cut to [`USER_AGENT_BYTES`].
    pub fn headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(
            headers::RECEIVED_AT.into(),
            long_string(
                &self
                    .received_at
                    .to_rfc3339_opts(SecondsFormat::Millis, true),
            ),
        );
        table.insert(headers::SOURCE.into(), long_string(&self.source));
        table.insert(
            headers::ENDPOINT.into(),
            long_string(self.endpoint.as_str()),
        );
        if let Some(ip) = &self.client_ip {
            table.insert(headers::CLIENT_IP.into(), long_string(ip));
        }
        if let Some(agent) = &self.user_agent {
            table.insert(
                headers::USER_AGENT.into(),
                long_string(&cut_user_agent(agent)),
            );
        }
        table
    }

    /// The properties the collector publishes a request's body with: persistent, its content
    /// type and encoding as received, the request id, the receive time (also in whole seconds
    /// as the AMQP timestamp), and the source as the app id (at most 255 bytes).
    pub fn properties(&self, content_type: &str, gzip: bool) -> BasicProperties {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(content_type.into())
            .with_message_id(self.request_id.as_str().into())
            .with_timestamp(u64::try_from(self.received_at.timestamp()).unwrap_or(0))
            .with_app_id(truncate(&self.source, 255).into())
            .with_headers(self.headers());
        if gzip {
            properties = properties.with_content_encoding("gzip".into());
        }
        properties
    }
}

/// Whether a raw message's body is gzip (its content encoding).
pub fn is_gzip(properties: &BasicProperties) -> bool {
    properties
        .content_encoding()
        .as_ref()
        .is_some_and(|e| e.as_str().eq_ignore_ascii_case("gzip"))
}

/// The headers a batch travels under in a sink's queues; the error is cut to
/// [`LAST_ERROR_CHARS`].
pub fn batch_headers(sink: &str, key: &str, attempts: u32, last_error: &str) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(headers::BATCH_KEY.into(), long_string(key));
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempts));
    let last_error: String = last_error.chars().take(LAST_ERROR_CHARS).collect();
    table.insert(headers::LAST_ERROR.into(), long_string(&last_error));
    table.insert(headers::SINK.into(), long_string(sink));
    table
}

/// Headers of events spilled into a sink's queue before the sink was given them: the sink and
/// why, and no batch key, so the sink's runner takes them as fresh events and batches them
/// with others (a batch the sink may have seen keeps its key: [`batch_headers`]).
pub fn spilled_headers(sink: &str, reason: &str) -> FieldTable {
    let mut table = FieldTable::default();
    let reason: String = reason.chars().take(LAST_ERROR_CHARS).collect();
    table.insert(headers::LAST_ERROR.into(), long_string(&reason));
    table.insert(headers::SINK.into(), long_string(sink));
    table
}

/// A batch's key, if the message is a batch the worker wrote (spilled, retried or
/// dead-lettered); a previous release's messages of fresh events have none.
pub fn read_batch_key(table: Option<&FieldTable>) -> Option<&str> {
    header_str(table, headers::BATCH_KEY)
}

/// A batch's failed attempts so far, from any integer type the header may hold; 0 if absent or
/// not a count.
pub fn read_attempts(table: Option<&FieldTable>) -> u32 {
    match table.and_then(|t| t.inner().get(headers::ATTEMPT)) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u32::from(*n),
        _ => 0,
    }
}

/// An event of a batch that the collector refused while it accepted the others: the worker
/// keeps it in the invalid queue instead of storing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEvent {
    /// Its place in the batch.
    pub index: usize,
    /// The collector's error code (`event_too_large`, `not_an_object`).
    pub code: String,
    /// Its size as sent.
    pub bytes: usize,
}

impl RefusedEvent {
    /// The code of an event refused for its size: the only kind the header names (the worker
    /// finds a non-object by itself).
    pub const TOO_LARGE: &'static str = "event_too_large";

    /// The [`headers::REFUSED_EVENTS`] value for `refused`.
    pub fn header(refused: &[RefusedEvent]) -> String {
        refused
            .iter()
            .map(|r| format!("{}:{}:{}", r.index, r.code, r.bytes))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Reads [`headers::REFUSED_EVENTS`] back; an entry that does not parse is skipped.
    pub fn read(table: Option<&FieldTable>) -> Vec<RefusedEvent> {
        let Some(value) = header_str(table, headers::REFUSED_EVENTS) else {
            return Vec::new();
        };
        value
            .split(',')
            .filter_map(|entry| {
                let mut parts = entry.splitn(3, ':');
                let index = parts.next()?.parse().ok()?;
                let code = parts.next()?.to_owned();
                let bytes = parts.next()?.parse().ok()?;
                Some(RefusedEvent { index, code, bytes })
            })
            .collect()
    }
}

/// The headers of an invalid record.
pub fn invalid_headers(reason: &str, source: &str, request_id: &str) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(headers::REASON.into(), long_string(reason));
    table.insert(headers::SOURCE.into(), long_string(source));
    table.insert(headers::REQUEST_ID.into(), long_string(request_id));
    table
}

/// Marks a message `ingestctl dlq replay` sends back with the queue it came from.
pub fn mark_replayed(table: &mut FieldTable, from: &str) {
    table.insert(headers::REPLAYED.into(), long_string(from));
}

/// What [`headers::REPLAYED`] says of an archived request sent to the replay lane.
pub const FROM_ARCHIVE: &str = "archive";

/// The sink of a replay only when named: its counters would count the events twice.
pub const STATSD_SINK: &str = "statsd";

/// Marks an archived request's headers for the replay lane: replayed from the archive at
/// `at`, to `sinks` (`None`: every sink but statsd).
pub fn mark_from_archive(table: &mut FieldTable, at: DateTime<Utc>, sinks: Option<&[String]>) {
    mark_replayed(table, FROM_ARCHIVE);
    table.insert(
        headers::REPLAYED_AT.into(),
        long_string(&at.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    if let Some(sinks) = sinks {
        table.insert(headers::REPLAY_SINKS.into(), long_string(&sinks.join(",")));
    }
}

/// What the replay lane knows of a request `ingestctl replay` sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// When it was sent, if readable.
    pub at: Option<DateTime<Utc>>,
    /// The sinks it goes to; `None`: every sink but statsd.
    pub sinks: Option<Vec<String>>,
}

impl Replayed {
    /// `None` for a message not replayed from the archive.
    pub fn read(table: Option<&FieldTable>) -> Option<Self> {
        if header_str(table, headers::REPLAYED) != Some(FROM_ARCHIVE) {
            return None;
        }
        let at = header_str(table, headers::REPLAYED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        let sinks = header_str(table, headers::REPLAY_SINKS).map(|list| {
            list.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        });
        Some(Self { at, sinks })
    }

    /// Whether the request's events go to the sink named `sink`.
    pub fn goes_to(&self, sink: &str) -> bool {
        match &self.sinks {
            Some(sinks) => sinks.iter().any(|s| s == sink),
            None => sink != STATSD_SINK,
        }
    }
}

/// Whether a header is one of the broker's dead-letter records.
pub fn is_death_record(name: &str) -> bool {
    headers::DEATH_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
#[path = "message/tests.rs"]
mod tests;
