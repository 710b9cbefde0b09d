//! The sinks' settings (`[sinks]`): typed, with their defaults and the checks that need
//! nothing but the values, shared by the worker, `ingestctl` and the tests. Unknown keys are
//! refused. What only a sink's own libraries can check (an HTTP sink's URL and header names,
//! a statsd property that cleans to nothing) the worker checks when it builds the sink, once
//! at start. Header values are [`Secret`]s and never reach `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
            names.push("statsd".to_owned());
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

    /// Whether this sink wants the event.
    pub fn wants(&self, event: &Map<String, Value>) -> bool {
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

#[cfg(test)]
mod tests {
    use config::{Config, File, FileFormat};
    use serde_json::json;

    use super::*;

    fn event(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn statsd(extra: Value) -> StatsdSinkSettings {
        let mut value = json!({"address": "127.0.0.1:8125"});
        if let (Value::Object(base), Value::Object(extra)) = (&mut value, extra) {
            base.extend(extra);
        }
        serde_json::from_value(value).expect("test settings deserialize")
    }

    #[test]
    fn the_readmes_example_reads_through_the_config_crate_as_typed_settings() {
        let toml = r#"
            [sinks]
            retry_delays_ms = [1000, 10000, 60000, 300000]
            max_attempts = 8

            [sinks.mongo]
            enabled = true
            delivery = { batch_max_events = 1000, linger_ms = 50 }

            [sinks.statsd]
            address = "statsd.internal:8125"
            prefix = "analytics"
            timers = ["duration_ms", "load_time_ms"]
            gauges = ["cart_size"]
            sample_rate = 1
            mtu = 1432

            [[sinks.http]]
            name = "crm"
            url = "https://hooks.example.com/analytics"
            headers = { Authorization = "Bearer secret-token" }
            format = "ndjson"
            connect_timeout_ms = 2000
            request_timeout_ms = 10000
            delivery = { events = ["Order Completed"], batch_max_events = 100, prefetch = 16 }
        "#;
        #[derive(Deserialize)]
        struct Only {
            sinks: SinksSettings,
        }
        let only: Only = Config::builder()
            .add_source(File::from_str(toml, FileFormat::Toml))
            .build()
            .and_then(Config::try_deserialize)
            .expect("typed sinks");
        let sinks = only.sinks;
        assert!(sinks.mongo.enabled);
        assert_eq!(sinks.mongo.delivery.batch_max_events, 1000);
        assert_eq!(sinks.mongo.delivery.linger_ms, 50);
        assert_eq!(sinks.mongo.delivery.prefetch, 128, "the rest are defaults");
        let statsd = sinks.statsd.as_ref().expect("statsd");
        assert_eq!(statsd.sample_rate, 1.0);
        assert_eq!(statsd.timers, ["duration_ms", "load_time_ms"]);
        assert_eq!(statsd.validate(), Ok(()));
        let crm = &sinks.http[0];
        assert_eq!(crm.format, BodyFormat::Ndjson);
        assert_eq!(crm.delivery.events, ["Order Completed"]);
        assert_eq!(crm.delivery.prefetch, 16);
        assert_eq!(crm.headers["Authorization"].expose(), "Bearer secret-token");
        assert_eq!(sinks.names(), ["mongo", "statsd", "crm"]);
        let printed = format!("{sinks:?} {crm:?}");
        assert!(!printed.contains("secret-token"), "{printed}");
    }

    #[test]
    fn unknown_keys_are_refused_in_every_sink_and_in_delivery() {
        let cases = [
            json!({"mongo": {"enabled": true, "enable": false}}),
            json!({"mongo": {"enabled": true, "delivery": {"linger": 5}}}),
            json!({"mongo": {"enabled": true}, "statsd": {"address": "a:1", "counters_by": []}}),
            json!({"mongo": {"enabled": true}, "http": [{"name": "n", "url": "http://h/", "max_retries": 3}]}),
        ];
        for mut sinks in cases {
            sinks["retry_delays_ms"] = json!([1000]);
            sinks["max_attempts"] = json!(3);
            let parsed = serde_json::from_value::<SinksSettings>(sinks.clone());
            assert!(parsed.is_err(), "{sinks}");
        }
    }

    #[test]
    fn http_defaults_and_checks_of_name_and_timeouts() {
        let parsed: HttpSinkSettings = serde_json::from_value(json!({
            "name": "warehouse",
            "url": "https://example.com/events",
        }))
        .expect("minimal settings");
        assert_eq!(parsed.format, BodyFormat::Json);
        assert_eq!(parsed.connect_timeout_ms, 2_000);
        assert_eq!(parsed.request_timeout_ms, 10_000);
        assert!(parsed.headers.is_empty());
        assert_eq!(parsed.validate(), Ok(()));
        type Mutation = fn(&mut HttpSinkSettings);
        let cases: [(&str, Mutation); 4] = [
            ("name", |s| s.name = "Warehouse".to_owned()),
            ("name", |s| s.name = String::new()),
            ("connect_timeout_ms", |s| s.connect_timeout_ms = 0),
            ("request_timeout_ms", |s| s.request_timeout_ms = 0),
        ];
        for (expected, mutate) in cases {
            let mut bad = parsed.clone();
            mutate(&mut bad);
            let error = bad.validate().expect_err(expected);
            assert!(
                error.contains(expected),
                "{error:?} should mention {expected}"
            );
        }
    }

    #[test]
    fn statsd_defaults_and_validation_name_the_field() {
        let s = statsd(json!({}));
        assert_eq!(s.prefix, "analytics");
        assert_eq!(s.mtu, 1432);
        assert_eq!(s.sample_rate, 1.0);
        assert!(s.timers.is_empty() && s.gauges.is_empty());
        assert_eq!(s.max_event_names, 1_000);
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(statsd(json!({"address": "[::1]:8125"})).validate(), Ok(()));
        for (extra, field) in [
            (json!({"address": "statsd"}), "address"),
            (json!({"address": ":8125"}), "address"),
            (json!({"address": "statsd:0"}), "address"),
            (json!({"address": "statsd:99999"}), "address"),
            (json!({"prefix": ""}), "prefix"),
            (json!({"prefix": "a..b"}), "prefix"),
            (json!({"prefix": "a b"}), "prefix"),
            (json!({"mtu": 10}), "mtu"),
            (json!({"mtu": 70000}), "mtu"),
            (json!({"sample_rate": 0.0}), "sample_rate"),
            (json!({"sample_rate": 1.5}), "sample_rate"),
            (json!({"sample_rate": -0.5}), "sample_rate"),
            (json!({"max_event_names": 0}), "max_event_names"),
            (json!({"max_event_names": 1_000_001}), "max_event_names"),
        ] {
            let error = statsd(extra.clone())
                .validate()
                .expect_err(&extra.to_string());
            assert!(error.starts_with(&format!("{field}:")), "{extra}: {error}");
        }
        let mut nan = statsd(json!({}));
        nan.sample_rate = f64::NAN;
        assert!(nan.validate().is_err());
    }

    #[test]
    fn delivery_filters_by_type_and_event_name() {
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
    fn delivery_validation_names_the_bad_setting() {
        let zero = DeliverySettings {
            max_in_flight: 0,
            ..DeliverySettings::default()
        };
        assert!(zero.validate().is_err_and(|e| e.contains("max_in_flight")));
        let no_spill = DeliverySettings {
            spill_after_ms: 0,
            ..DeliverySettings::default()
        };
        assert!(no_spill
            .validate()
            .is_err_and(|e| e.contains("spill_after_ms")));
        assert!(DeliverySettings::default().validate().is_ok());
    }
}
