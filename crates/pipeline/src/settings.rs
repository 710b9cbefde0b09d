//! Layered, typed configuration shared by every binary.
//!
//! Order (later wins): the compiled-in `config/default.toml` → `config/$APP_ENV.toml` (APP_ENV
//! defaults to `local`; the directory is `$INGEST_CONFIG_DIR`, default `config`; `.toml` or `.json`) → environment
//! variables `INGEST__SECTION__KEY`. Lists from the environment are comma separated. `validate`
//! names the bad setting; secrets never appear in `Debug` output. Each sink's settings are
//! typed too (`sinks`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use ingest_schema::UnknownEventPolicy;
use serde::Deserialize;

mod invalid;
mod policy;
mod sinks;
mod validate;

pub use invalid::InvalidSettings;
pub use policy::{
    BotPattern, BotPolicy, EnrichSettings, FieldAction, FieldRule, IpPolicy, PolicySettings,
    SampleRule, SourcePolicy, SourcePolicyChanges,
};
pub use sinks::{
    BodyFormat, DeliverySettings, HttpSinkSettings, MongoSinkSettings, SinksSettings,
    StatsdSinkSettings,
};

const DEFAULTS: &str = include_str!("../../../config/default.toml");

/// `collector.rate_limit_per_second`, when not 0 (off): one request per 1000 s at the least
/// (so a `Retry-After` stays a number of seconds a client can wait), a million at the most.
pub const MIN_RATE_PER_SECOND: f64 = 0.001;
pub const MAX_RATE_PER_SECOND: f64 = 1_000_000.0;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
    /// The same, for a setting whose name holds a source's.
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidNamed { setting: String, reason: String },
}

/// A string that is never printed: write keys, URLs with passwords.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub collector: CollectorSettings,
    pub worker: WorkerSettings,
    pub mongo: MongoSettings,
    pub sinks: SinksSettings,
    pub enrich: EnrichSettings,
    pub policy: PolicySettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
}

/// Metrics beyond `/metrics`: an optional statsd mirror of every metric.
#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    /// `host:port` of a statsd daemon (UDP); unset, nothing is mirrored.
    #[serde(default)]
    pub statsd_address: Option<String>,
    /// Names start with `<statsd_prefix>.<service>.`.
    pub statsd_prefix: String,
    pub statsd_interval_ms: u64,
}

impl MetricsSettings {
    pub fn statsd_interval(&self) -> Duration {
        Duration::from_millis(self.statsd_interval_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct BrokerSettings {
    /// One node's AMQP URL: the one-node form, used when `urls` is empty.
    pub url: Secret,
    /// Every node of a cluster: a service connects to any live one (starting at a random one,
    /// so a fleet spreads over the nodes) and, on losing it, to another.
    #[serde(default)]
    pub urls: Vec<Secret>,
    pub prefix: String,
    pub publish_channels: usize,
    pub confirm_timeout_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Cap on the raw queue's size (`x-max-length-bytes`, overflow `reject-publish`); 0 = none.
    /// Fixed when the queue is first declared: change it on a live queue with a policy.
    pub raw_max_length_bytes: u64,
    /// The same for the invalid queue; the worker counts and summarises what it refuses.
    pub invalid_max_length_bytes: u64,
    /// Deliveries a message of a consumed queue (raw, each sink's) may get; past it the broker
    /// dead-letters it (`<prefix>.raw.dlq`, `<prefix>.sink.<name>.dlq`), so nothing loops.
    pub delivery_limit: u32,
    /// The RabbitMQ management API (`http://user:pass@host:15672`), for message rates in
    /// `ingestctl queues` and `scale`; optional.
    #[serde(default)]
    pub management_url: Option<Secret>,
    /// Every raw request, kept in a RabbitMQ stream (`<prefix>.archive`) to be replayed.
    pub archive: ArchiveSettings,
}

/// The archive: a stream that the exchange the collector publishes to routes every raw request
/// to, beside the raw queue; one publish and one confirm cover both.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ArchiveSettings {
    pub enabled: bool,
    /// Retention by age, RabbitMQ's `x-max-age`: a whole number and a unit (`Y`, `M`, `D`,
    /// `h`, `m` or `s`), e.g. `7D`.
    pub max_age: String,
    /// Retention by size (`x-max-length-bytes`): the oldest segments go first.
    pub max_bytes: u64,
}

impl ArchiveSettings {
    /// Whether `max_age` is in RabbitMQ's form.
    pub fn max_age_is_valid(&self) -> bool {
        let digits = self
            .max_age
            .trim_end_matches(['Y', 'M', 'D', 'h', 'm', 's']);
        self.max_age.len() == digits.len() + 1
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.parse::<u64>().is_ok_and(|n| n > 0)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CollectorSettings {
    pub listen: SocketAddr,
    pub max_event_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_events: usize,
    /// A batch event too large or not an object is refused alone: the others are accepted and
    /// the answer (200) lists the refused ones. `false`: the whole batch is refused (400/413),
    /// as Segment's API does.
    pub partial_batches: bool,
    /// Requests being read or published at once, whatever their size.
    pub max_in_flight: usize,
    /// Body bytes those requests may hold at once (each reserves its Content-Length, or, chunked,
    /// its bytes as they arrive): what binds while confirms stall. Past it, 503.
    pub max_in_flight_bytes: usize,
    /// Of `max_in_flight`, how many may be requests without a key in the Authorization header or
    /// the query (their key is only known once the body is read); unset: a quarter of
    /// `max_in_flight`, at least 1.
    #[serde(default)]
    pub max_unauthenticated_in_flight: Option<usize>,
    pub body_timeout_ms: u64,
    /// A connection must send its request head within this time (slow-header clients).
    pub header_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this time.
    pub idle_timeout_ms: u64,
    /// Open connections at once; past it new ones are closed at accept.
    pub max_connections: usize,
    /// Open connections of one client address (requests in flight by its forwarded address,
    /// behind `trusted_proxies`); past it a connection is closed at accept (a request: 429).
    pub max_connections_per_ip: usize,
    /// Bytes per second of inflating and scanning that one client address may spend on
    /// requests that prove no key (missing or unknown, or an unusable body); past
    /// `unauthenticated_burst_bytes` owed, its requests without a header or query key get 429
    /// before their body is read. 0 = no bound.
    pub unauthenticated_bytes_per_second: u64,
    pub unauthenticated_burst_bytes: u64,
    /// Bytes a request head (request line and headers) may take; past it, 431. Each
    /// connection's read buffer is kept to this, so open connections hold at most
    /// `max_connections` times it.
    pub max_header_bytes: usize,
    /// Shed load (503) while the runtime's measured scheduling delay is above this; 0 = never.
    pub max_scheduling_delay_ms: u64,
    pub retry_after_secs: u64,
    /// Requests per second per source (write key); 0 = no limit, else between
    /// [`MIN_RATE_PER_SECOND`] and [`MAX_RATE_PER_SECOND`].
    pub rate_limit_per_second: f64,
    /// Requests a source may send at once past its rate; >= 1 (used only with a rate).
    pub rate_limit_burst: f64,
    pub shutdown_timeout_ms: u64,
    pub trusted_proxies: Vec<IpAddr>,
    pub cors_allowed_origins: Vec<String>,
    /// source name → write key
    pub write_keys: BTreeMap<String, Secret>,
    /// Where requests wait while the broker cannot confirm them; off unless enabled.
    pub spool: SpoolSettings,
}

/// The collector's local spool: while the broker cannot confirm a request (no connection, an
/// alarm, a confirm timeout), the request is fsync'd to an append-only log in `dir` and answered
/// 200; a forwarder publishes it with confirms once the broker takes publishes again.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct SpoolSettings {
    pub enabled: bool,
    /// One collector's own directory, on a persistent volume: what is in it is data answered
    /// 200 and not yet on the broker. Locked while a collector runs on it.
    pub dir: PathBuf,
    /// Bytes the spool may hold on disk; past it a request the broker cannot confirm gets 503.
    pub max_bytes: u64,
    /// A segment file is closed past this size; a segment is deleted once all of it is forwarded.
    pub segment_bytes: u64,
    /// Spooled requests the forwarder has awaiting a confirm at once.
    pub forward_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: SocketAddr,
    pub schemas_dir: PathBuf,
    pub unknown_events: UnknownEventPolicy,
    pub prefetch: u16,
    /// Unacked deliveries of the replay lane (`<prefix>.replay`) a worker holds beside
    /// `prefetch`: the replay's share of the worker while both lanes have work; 0 = this worker
    /// does not take replays.
    pub replay_prefetch: u16,
    /// Unacked deliveries of the overflow lane (`<prefix>.overflow`, requests past a quota)
    /// beside `prefetch`; 0 = this worker leaves the lane to others.
    pub overflow_prefetch: u16,
    pub max_payload_bytes: usize,
    pub max_payload_events: usize,
    /// Bytes a delivery's events may come to once built (batch fields merged into each); a
    /// payload past it goes whole to the invalid queue (`too_large`).
    pub max_built_bytes: usize,
    pub shutdown_timeout_ms: u64,
    /// Compaction of repeated invalid records (`settings/invalid.rs`).
    pub invalid: InvalidSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MongoSettings {
    pub uri: Secret,
    pub database: String,
    pub collection: String,
    /// The bound on every MongoDB operation of the worker (an insert, its readiness ping, the
    /// index set-up): past it, a store that stopped answering is a retryable failure.
    pub timeout_ms: u64,
}

impl MongoSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Settings {
    /// The compiled-in defaults alone: what tests start from before setting their own values.
    pub fn defaults() -> Result<Self, SettingsError> {
        let settings: Settings = Config::builder()
            .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        Ok(settings)
    }

    /// Every layer, as the binaries load it.
    pub fn load() -> Result<Self, SettingsError> {
        let app_env = std::env::var("APP_ENV").unwrap_or_else(|_| "local".to_owned());
        let dir = std::env::var("INGEST_CONFIG_DIR").unwrap_or_else(|_| "config".to_owned());
        // `<dir>/<APP_ENV>` with any supported extension (.toml, .json).
        let env_file = PathBuf::from(dir).join(&app_env);
        let settings: Settings = Config::builder()
            .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
            .add_source(File::with_name(&env_file.to_string_lossy()).required(false))
            .add_source(
                Environment::with_prefix("INGEST")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("broker.urls")
                    .with_list_parse_key("collector.trusted_proxies")
                    .with_list_parse_key("collector.cors_allowed_origins"),
            )
            .build()?
            .try_deserialize()?;
        Ok(settings)
    }
}

impl CollectorSettings {
    /// `max_unauthenticated_in_flight`, or its default: a quarter of `max_in_flight`, at
    /// least 1.
    pub fn unauthenticated_in_flight(&self) -> usize {
        self.max_unauthenticated_in_flight
            .unwrap_or((self.max_in_flight / 4).max(1))
    }

    /// Of `max_in_flight_bytes`, what requests without an Authorization header may hold: a
    /// quarter, and at least one batch at the limit.
    pub fn unauthenticated_in_flight_bytes(&self) -> usize {
        (self.max_in_flight_bytes / 4)
            .max(self.max_batch_bytes.max(self.max_event_bytes))
            .min(self.max_in_flight_bytes)
    }
}

impl BrokerSettings {
    /// The nodes to connect to: `urls`, or `url` alone when `urls` is empty.
    pub fn nodes(&self) -> Vec<&Secret> {
        if self.urls.is_empty() {
            Some(&self.url)
                .filter(|url| !url.expose().is_empty())
                .into_iter()
                .collect()
        } else {
            self.urls.iter().collect()
        }
    }

    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }
}

#[cfg(test)]
#[path = "settings/tests.rs"]
mod tests;
