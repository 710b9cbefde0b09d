//! The HTTP sink: POSTs each batch as one request (a JSON array or NDJSON) to a configured URL,
//! with `Idempotency-Key: <batch key>` so the receiver can drop a retried batch it already took,
//! and in each event `"_ingest": {"eventKey": "<uuid>"}` ([`EventId::key`]), the same for every
//! copy of the event whatever batch it travels in, so the receiver can drop a duplicate event
//! (a request spooled and published twice, a redelivery) that arrives with other neighbours.
//! It only delivers and classifies the answer; batching, retries, circuit breaking and the
//! bisection of a refused batch belong to the runner. A refusal that could be about one event
//! is `Permanent` (the runner bisects the batch); one of the request itself (a wrong URL or
//! credentials) refuses every event as it is, since any part would get the same answer.
//! Configured header values are secrets: they never reach `Debug`, logs or errors, and are
//! scrubbed from response bodies quoted in errors.

use std::collections::HashSet;
use std::error::Error as _;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ingest_pipeline::settings::{BodyFormat, HttpSinkSettings};
use ingest_pipeline::Secret;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::redirect::Policy;
use reqwest::{Client, Response, StatusCode, Url};

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::{Batch, Event, EventId, Sink, SinkError};

const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The field the sink adds to each event, holding what the pipeline says about it. An event's
/// own field of that name is left out of what HTTP sinks receive.
pub const META_FIELD: &str = "_ingest";
/// The event's idempotency key, inside [`META_FIELD`].
pub const EVENT_KEY_FIELD: &str = "eventKey";
/// What the field adds to an event's JSON, at most: `,"_ingest":{"eventKey":"<36>"}`.
pub const EVENT_KEY_BYTES: usize = META_FIELD.len() + EVENT_KEY_FIELD.len() + 36 + 11;
/// Headers the sink sets itself; configuring them would send duplicates or break framing.
const RESERVED_HEADERS: [&str; 5] = [
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "idempotency-key",
];
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
const EXCERPT_CHARS: usize = 200;
/// Enough bytes for `EXCERPT_CHARS` of any UTF-8 with room to spare; the longest secret is added
/// on top so a secret cut off at the end of what was read lies beyond the excerpt.
const EXCERPT_READ_BYTES: usize = 4096;
/// A 2xx body is drained up to this much so the connection can go back to the pool.
const DRAIN_BYTES: usize = 64 * 1024;

/// Every check of an HTTP sink's settings: the URL and the headers here (they need reqwest),
/// the name and the timeouts in the settings themselves. Names the first bad setting; never
/// quotes a header value.
pub fn validate(settings: &HttpSinkSettings) -> Result<(), String> {
    parse_url(settings)?;
    header_map(settings)?;
    settings.validate()
}

fn parse_url(settings: &HttpSinkSettings) -> Result<Url, String> {
    let name = &settings.name;
    let url = Url::parse(&settings.url)
        .map_err(|e| format!("http sink `{name}`: url is invalid: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "http sink `{name}`: url scheme must be http or https, not `{}`",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "http sink `{name}`: url must not carry credentials (they would be logged); \
             put them in `headers`"
        ));
    }
    Ok(url)
}

fn header_map(settings: &HttpSinkSettings) -> Result<HeaderMap, String> {
    let sink = &settings.name;
    let mut map = HeaderMap::new();
    let mut seen = HashSet::new();
    for (name, value) in &settings.headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("http sink `{sink}`: `{name}` is not a valid header name"))?;
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err(format!(
                "http sink `{sink}`: header `{name}` is set by the sink and cannot be configured"
            ));
        }
        if !seen.insert(header.clone()) {
            return Err(format!(
                "http sink `{sink}`: header `{name}` is configured more than once"
            ));
        }
        let mut header_value = HeaderValue::from_str(value.expose()).map_err(|_| {
            format!("http sink `{sink}`: the value of header `{name}` is not a valid header value")
        })?;
        header_value.set_sensitive(true);
        map.insert(header, header_value);
    }
    Ok(map)
}

/// An event as the sink sends it: its fields, then, when it has a source and a `messageId`
/// (every event the worker hands on has), `"_ingest": {"eventKey": …}` in place of any
/// `_ingest` of its own.
struct Outgoing<'a>(&'a Event);

impl Serialize for Outgoing<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(key) = EventId::of(self.0).map(|id| id.key()) else {
            return self.0.doc().serialize(serializer);
        };
        let event = self.0.doc().node();
        let own = usize::from(event.get(META_FIELD).is_some());
        let mut map = serializer.serialize_map(Some(event.len() - own + 1))?;
        let members = event.members().into_iter().flatten();
        for (name, value) in members.filter(|(name, _)| *name != META_FIELD) {
            map.serialize_entry(name, &value)?;
        }
        let mut buffer = uuid::Uuid::encode_buffer();
        let key: &str = key.hyphenated().encode_lower(&mut buffer);
        map.serialize_entry(META_FIELD, &Meta(key))?;
        map.end()
    }
}

/// `{"eventKey": …}`, written without building a JSON value.
struct Meta<'a>(&'a str);

impl Serialize for Meta<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(EVENT_KEY_FIELD, self.0)?;
        map.end()
    }
}

/// Writes one event as [`Outgoing`] does: its JSON text as kept ([`Event::json`]) with the
/// key added before the closing brace when it has no [`META_FIELD`] of its own, written anew
/// otherwise.
fn write_outgoing(body: &mut Vec<u8>, event: &Event) -> Result<(), serde_json::Error> {
    let kept = Some(event.json()).filter(|json| json.len() > 2 && json.ends_with(b"}"));
    match (EventId::of(event), kept) {
        (Some(id), Some(json)) if event.doc().get(META_FIELD).is_none() => {
            body.extend_from_slice(&json[..json.len() - 1]);
            body.push(b',');
            serde_json::to_writer(&mut *body, META_FIELD)?;
            body.push(b':');
            let mut buffer = uuid::Uuid::encode_buffer();
            let key: &str = id.key().hyphenated().encode_lower(&mut buffer);
            serde_json::to_writer(&mut *body, &Meta(key))?;
            body.push(b'}');
            Ok(())
        }
        (None, Some(json)) => {
            body.extend_from_slice(json);
            Ok(())
        }
        _ => serde_json::to_writer(body, &Outgoing(event)),
    }
}

/// Serializes a batch body, each event with its key. Serializing a JSON object into memory
/// cannot fail in practice; the `Result` is serde_json's signature, kept rather than hidden
/// behind a panic.
pub fn encode(events: &[Arc<Event>], format: BodyFormat) -> Result<Vec<u8>, serde_json::Error> {
    let mut body = Vec::with_capacity(events.len() * 256);
    match format {
        BodyFormat::Json => {
            body.push(b'[');
            for (i, event) in events.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                write_outgoing(&mut body, event)?;
            }
            body.push(b']');
        }
        BodyFormat::Ndjson => {
            for event in events {
                write_outgoing(&mut body, event)?;
                body.push(b'\n');
            }
        }
    }
    Ok(body)
}

pub struct HttpSink {
    name: String,
    url: Url,
    format: BodyFormat,
    client: Client,
    /// Header values to scrub from response bodies quoted in errors.
    secrets: Vec<Secret>,
}

impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// Validates the settings and builds one pooled client for all deliveries.
    pub fn new(settings: HttpSinkSettings) -> Result<Self, String> {
        validate(&settings)?;
        let url = parse_url(&settings)?;
        let headers = header_map(&settings)?;
        let client = Client::builder()
            .user_agent(concat!("ingest-worker/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.request_timeout_ms))
            .redirect(Policy::none())
            .build()
            .map_err(|e| {
                format!(
                    "http sink `{}`: building the client failed: {}",
                    settings.name,
                    error_chain(&e)
                )
            })?;
        Ok(Self {
            name: settings.name,
            url,
            format: settings.format,
            client,
            secrets: settings.headers.into_values().collect(),
        })
    }

    async fn quote_body(&self, response: Response) -> String {
        let longest_secret = self
            .secrets
            .iter()
            .map(|s| s.expose().len())
            .max()
            .unwrap_or(0);
        let Some(bytes) = read_prefix(response, EXCERPT_READ_BYTES + longest_secret).await else {
            return "(response body unreadable)".to_owned();
        };
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        for secret in &self.secrets {
            if !secret.expose().is_empty() {
                text = text.replace(secret.expose(), "<redacted>");
            }
        }
        let mut excerpt: String = text
            .chars()
            .take(EXCERPT_CHARS)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.chars().nth(EXCERPT_CHARS).is_some() {
            excerpt.push('…');
        }
        excerpt.trim().to_owned()
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn event_overhead(&self) -> usize {
        EVENT_KEY_BYTES
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), SinkError> {
        let body = encode(&batch.events, self.format)
            .map_err(|e| SinkError::Permanent(format!("encoding the batch failed: {e}")))?;
        let key = HeaderValue::from_str(&batch.key).map_err(|_| {
            SinkError::Permanent("batch key is not a valid Idempotency-Key value".to_owned())
        })?;
        let response = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, self.format.content_type())
            .header(IDEMPOTENCY_KEY, key)
            .body(body)
            .send()
            .await
            .map_err(|e| classify_request_error(&e))?;

        let status = response.status();
        match classify_status(status, response.headers(), SystemTime::now()) {
            Ok(()) => {
                let _ = read_prefix(response, DRAIN_BYTES).await;
                Ok(())
            }
            Err(SinkError::Permanent(reason)) => {
                let body = self.quote_body(response).await;
                let reason = if body.is_empty() {
                    reason
                } else {
                    format!("{reason}: {body}")
                };
                if refuses_any_body(status) && batch.events.len() > 1 {
                    // Every part of the batch would get the same answer: each event is
                    // refused as it is, and the runner does not bisect.
                    let refused = (0..batch.events.len()).map(|i| (i, reason.clone()));
                    return Err(SinkError::Refused(refused.collect()));
                }
                Err(SinkError::Permanent(reason))
            }
            Err(error) => Err(error),
        }
    }
}

/// A refusal of the request itself (its URL, method, credentials, content type), not of the
/// events in it: any batch would get the same answer. Other refusals (400, 403, 413, 422, …)
/// may be about one event, and the runner bisects the batch to find it.
fn refuses_any_body(status: StatusCode) -> bool {
    status.is_redirection()
        || matches!(
            status,
            StatusCode::UNAUTHORIZED
                | StatusCode::NOT_FOUND
                | StatusCode::METHOD_NOT_ALLOWED
                | StatusCode::PROXY_AUTHENTICATION_REQUIRED
                | StatusCode::GONE
                | StatusCode::LENGTH_REQUIRED
                | StatusCode::URI_TOO_LONG
                | StatusCode::UNSUPPORTED_MEDIA_TYPE
        )
}

/// 2xx is success; 408, 429 and 5xx are worth retrying (throttled when the server says when);
/// anything else means these events will never be taken.
fn classify_status(
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<(), SinkError> {
    if status.is_success() {
        return Ok(());
    }
    let reason = format!("HTTP {status}");
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if !retryable {
        return Err(SinkError::Permanent(reason));
    }
    match retry_after(headers, now) {
        Some(retry_after) => Err(SinkError::Throttled {
            reason,
            retry_after,
        }),
        None => Err(SinkError::Retryable(reason)),
    }
}

/// `Retry-After` as delta-seconds or an HTTP-date, capped at an hour; a date already past is
/// zero. `None` when absent or unparseable.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value
            .parse::<u64>()
            .map_or(MAX_RETRY_AFTER, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The request never got a response: connect failures, resets and timeouts can all pass.
fn classify_request_error(error: &reqwest::Error) -> SinkError {
    let what = if error.is_timeout() {
        "request timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_builder() {
        return SinkError::Permanent(format!(
            "building the request failed: {}",
            error_chain(error)
        ));
    } else {
        "request failed"
    };
    SinkError::Retryable(format!("{what}: {}", error_chain(error)))
}

/// The error and its sources, without the URL reqwest would otherwise repeat.
fn error_chain(error: &reqwest::Error) -> String {
    let mut chain = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push(cause.to_string());
        source = cause.source();
    }
    if chain.is_empty() {
        return error.to_string();
    }
    chain.join(": ")
}

/// Reads up to about `limit` bytes of the body; `None` if reading failed before the end.
async fn read_prefix(mut response: Response, limit: usize) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(_) => return None,
        }
    }
    Some(bytes)
}

#[cfg(test)]
#[path = "http/tests.rs"]
mod tests;

#[cfg(test)]
#[path = "http/isolation_tests.rs"]
mod isolation_tests;
