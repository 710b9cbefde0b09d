//! The sinks' settings (`[sinks]`): typed, with their defaults and the checks that need
//! nothing but the values, shared by the worker, `ingestctl` and the tests. Unknown keys are
//! refused. What only a sink's own libraries can check (an HTTP sink's URL and header names,
//! a statsd property that cleans to nothing) the worker checks when it builds the sink, once
//! at start. Header values are [`Secret`]s and never reach `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Secret;
use crate::statsd::MAX_DATAGRAM;

/// Which sinks the worker feeds, and their shared retry policy.
#[derive(Clone, Deserialize)]
pub struct SinksSettings {
    /// One delay queue per entry; a batch's n-th failure waits in the n-th (the last repeats).
    pub retry_delays_ms: Vec<u64>,
    /// Failed deliveries of a batch before it goes to the sink's dead-letter queue.
    pub max_attempts: u32,
    pub mongo: MongoSinkSettings,
    #[serde(default)]
    pub statsd: Option<StatsdSinkSettings>,
    #[serde(default)]
    pub http: Vec<HttpSinkSettings>,
}

impl fmt::Debug for SinksSettings {
    /// Names only: sink settings hold secrets (HTTP headers).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let http: Vec<&str> = self.http.iter().map(|h| h.name.as_str()).collect();
        f.debug_struct("SinksSettings")
            .field("retry_delays_ms", &self.retry_delays_ms)
            .field("max_attempts", &self.max_attempts)
            .field("mongo", &self.mongo.enabled)
            .field("statsd", &self.statsd.is_some())
            .field("http", &http)
            .finish_non_exhaustive()
    }
}

impl SinksSettings {
    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect()
    }

    /// The configured sinks' names, as they name queues: `mongo` if enabled, `statsd` if
    /// configured, then each HTTP sink's own.
    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.mongo.enabled {
            names.push("mongo".to_owned());
        }
        if self.statsd.is_some() {
            names.push(crate::message::STATSD_SINK.to_owned());
        }
        names.extend(self.http.iter().map(|h| h.name.clone()));
        names
    }
}

/// `[sinks.mongo]`: the MongoDB sink writes to `mongo.uri` (the `[mongo]` section).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSinkSettings {
    pub enabled: bool,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

/// `[sinks.statsd]`: counters, timers and gauges over UDP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatsdSinkSettings {
    /// `host:port` of the statsd daemon, e.g. `127.0.0.1:8125`.
    pub address: String,
    /// First segment(s) of every metric name.
    #[serde(default = "default_statsd_prefix")]
    pub prefix: String,
    /// Largest datagram sent, in bytes.
    #[serde(default = "default_mtu")]
    pub mtu: usize,
    /// Share of events measured, in (0, 1]; statsd scales counters and timer counts back up.
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// Event properties sent as timers (`|ms`), e.g. `duration_ms`.
    #[serde(default)]
    pub timers: Vec<String>,
    /// Event properties sent as gauges (`|g`).
    #[serde(default)]
    pub gauges: Vec<String>,
    /// Distinct event names (a track event's, a screen's or a page's, with its type) that get
    /// series of their own; events with any other name are counted under `other`, so clients
    /// sending random names cannot grow the statsd daemon's series without bound.
    #[serde(default = "default_max_event_names")]
    pub max_event_names: usize,
    /// How many of the last events counted (by source and `messageId`) the sink remembers at
    /// least (up to twice as many), so that a copy of one of them (a redelivery, a duplicate)
    /// is not counted again: 2.4 MB for the default 100,000 (measured). Per worker process;
    /// 0 turns it off.
    #[serde(default = "default_dedupe_window")]
    pub dedupe_window: usize,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

fn default_statsd_prefix() -> String {
    "analytics".to_owned()
}

fn default_mtu() -> usize {
    crate::statsd::MTU
}

fn default_sample_rate() -> f64 {
    1.0
}

fn default_max_event_names() -> usize {
    1_000
}

/// The most `max_event_names` may be: the sink remembers every name it admitted (a few bytes
/// each) for as long as it runs.
const MAX_EVENT_NAMES_LIMIT: usize = 1_000_000;

fn default_dedupe_window() -> usize {
    100_000
}

/// The most `dedupe_window` may be: about 400 MB of a worker's memory.
const DEDUPE_WINDOW_LIMIT: usize = 10_000_000;

impl StatsdSinkSettings {
    /// Names the first bad field.
    pub fn validate(&self) -> Result<(), String> {
        let port = self
            .address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|port| *port != 0);
        if port.is_none() {
            return Err(format!(
                "address: expected host:port, got {:?}",
                self.address
            ));
        }
        let prefix_ok = self.prefix.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        if !prefix_ok {
            return Err(format!(
                "prefix: expected dot-separated segments of [A-Za-z0-9_-], got {:?}",
                self.prefix
            ));
        }
        if !(64..=MAX_DATAGRAM).contains(&self.mtu) {
            return Err(format!(
                "mtu: must be between 64 and {MAX_DATAGRAM}, got {}",
                self.mtu
            ));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(format!(
                "sample_rate: must be in (0, 1], got {}",
                self.sample_rate
            ));
        }
        if !(1..=MAX_EVENT_NAMES_LIMIT).contains(&self.max_event_names) {
            return Err(format!(
                "max_event_names: must be between 1 and {MAX_EVENT_NAMES_LIMIT}, got {}",
                self.max_event_names
            ));
        }
        if self.dedupe_window > DEDUPE_WINDOW_LIMIT {
            return Err(format!(
                "dedupe_window: must be at most {DEDUPE_WINDOW_LIMIT}, got {}",
                self.dedupe_window
            ));
        }
        Ok(())
    }
}

/// How an HTTP sink's batches are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// One JSON array holding every event of the batch.
    #[default]
    Json,
    /// One event per line, each line ending in `\n`.
    Ndjson,
}

impl BodyFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Ndjson => "application/x-ndjson",
        }
    }
}

/// `[[sinks.http]]`: one receiver of batches. `Debug` shows header names, never their values.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkSettings {
    pub name: String,
    pub url: String,
    /// Sent with every request, e.g. `Authorization`.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    #[serde(default)]
    pub format: BodyFormat,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Covers the whole exchange: connect, send, response headers and body.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}

fn default_request_timeout_ms() -> u64 {
    10_000
}

impl HttpSinkSettings {
    /// The name and the timeouts; the worker checks the URL and the headers when it builds
    /// the sink. Never quotes a header value.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "http sink name `{}` must match [a-z0-9_-]+",
                self.name
            ));
        }
        // The sinks are told apart by name (queues, metrics, a replay's --sink): the built-in
        // ones keep theirs.
        if ["mongo", crate::message::STATSD_SINK].contains(&self.name.as_str()) {
            return Err(format!(
                "http sink name `{}` is the name of a built-in sink: choose another",
                self.name
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(format!(
                "http sink `{}`: connect_timeout_ms must be > 0",
                self.name
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(format!(
                "http sink `{}`: request_timeout_ms must be > 0",
                self.name
            ));
        }
        Ok(())
    }
}

/// `sinks.<sink>.delivery`, every key optional: how a sink is fed (batching, concurrency,
/// prefetch, quick retries, circuit breaker, the bound on how long a delivery may hold a raw
/// message) and which events it wants.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Batches delivered at once (the in-process path; more than one keeps a store busy while
    /// the next batch is built).
    pub max_in_flight: usize,
    /// A batch the sink has not taken within this time goes to the sink's own queue instead
    /// (its spill path), so a slow sink never holds raw acks, memory or other sinks back
    /// longer than this.
    pub spill_after_ms: u64,
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
            max_in_flight: 2,
            spill_after_ms: 1_000,
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
        if self.max_in_flight == 0 || self.max_in_flight > 64 {
            return Err("max_in_flight must be between 1 and 64".into());
        }
        if self.spill_after_ms == 0 {
            return Err("spill_after_ms must be > 0".into());
        }
        Ok(())
    }

    /// Whether this sink wants an event of this `type` and (string) `event` name.
    pub fn wants(&self, kind: Option<&str>, name: Option<&str>) -> bool {
        let kind = kind.unwrap_or("");
        if !self.types.is_empty() && !self.types.iter().any(|t| t == kind) {
            return false;
        }
        if !self.events.is_empty() {
            return kind == "track" && name.is_some_and(|n| self.events.iter().any(|e| e == n));
        }
        true
    }
}

#[cfg(test)]
#[path = "sinks/tests.rs"]
mod tests;
