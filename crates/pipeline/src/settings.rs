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
mod sinks;

pub use invalid::InvalidSettings;
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

    /// Checks shared by both services.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let b = &self.broker;
        check(
            !b.nodes().is_empty(),
            "broker.url",
            "must not be empty (or give broker.urls)",
        )?;
        check(
            b.urls.iter().all(|u| !u.expose().is_empty()),
            "broker.urls",
            "must not hold an empty URL",
        )?;
        check(
            !b.prefix.is_empty()
                && b.prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "broker.prefix",
            "must be non-empty ASCII letters, digits, '.', '_' or '-'",
        )?;
        check(
            (1..=64).contains(&b.publish_channels),
            "broker.publish_channels",
            "must be between 1 and 64",
        )?;
        check(
            (2..=1000).contains(&b.delivery_limit),
            "broker.delivery_limit",
            "must be between 2 and 1000",
        )?;
        check(
            b.confirm_timeout_ms > 0,
            "broker.confirm_timeout_ms",
            "must be > 0",
        )?;
        check(
            b.reconnect_min_ms > 0 && b.reconnect_min_ms <= b.reconnect_max_ms,
            "broker.reconnect_min_ms",
            "must be > 0 and <= broker.reconnect_max_ms",
        )?;
        check(
            self.metrics.statsd_interval_ms >= 100,
            "metrics.statsd_interval_ms",
            "must be at least 100",
        )?;
        check(
            self.metrics.statsd_prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            }),
            "metrics.statsd_prefix",
            "must be dot-separated parts of ASCII letters, digits, '_' or '-', none empty",
        )?;
        check(
            self.metrics.statsd_address.as_ref().is_none_or(|a| {
                a.rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            }),
            "metrics.statsd_address",
            "must be host:port",
        )?;
        Ok(())
    }

    pub fn validate_collector(&self) -> Result<(), SettingsError> {
        self.validate()?;
        let c = &self.collector;
        check(
            c.max_event_bytes > 0,
            "collector.max_event_bytes",
            "must be > 0",
        )?;
        check(
            c.max_batch_bytes >= c.max_event_bytes,
            "collector.max_batch_bytes",
            "must be >= collector.max_event_bytes",
        )?;
        check(
            c.body_timeout_ms > 0,
            "collector.body_timeout_ms",
            "must be > 0",
        )?;
        check(
            c.max_batch_events > 0,
            "collector.max_batch_events",
            "must be > 0",
        )?;
        check(
            c.max_in_flight > 0,
            "collector.max_in_flight",
            "must be > 0",
        )?;
        check(
            c.max_in_flight_bytes >= c.max_batch_bytes.max(c.max_event_bytes),
            "collector.max_in_flight_bytes",
            "must be >= collector.max_batch_bytes, or a batch at the limit could never be taken",
        )?;
        check(
            c.max_unauthenticated_in_flight
                .is_none_or(|n| n > 0 && n < c.max_in_flight),
            "collector.max_unauthenticated_in_flight",
            "must be > 0 and < collector.max_in_flight, so requests with a header key keep slots of their own",
        )?;
        check(
            c.header_timeout_ms > 0 && c.idle_timeout_ms > 0,
            "collector.header_timeout_ms",
            "header_timeout_ms and idle_timeout_ms must be > 0",
        )?;
        check(
            c.max_connections_per_ip > 0,
            "collector.max_connections_per_ip",
            "must be > 0",
        )?;
        check(
            (8192..=1 << 20).contains(&c.max_header_bytes),
            "collector.max_header_bytes",
            "must be 8192 to 1048576",
        )?;
        check(
            c.max_connections > 0,
            "collector.max_connections",
            "must be > 0",
        )?;
        let rate = c.rate_limit_per_second;
        check(
            rate == 0.0 || (MIN_RATE_PER_SECOND..=MAX_RATE_PER_SECOND).contains(&rate),
            "collector.rate_limit_per_second",
            &format!(
                "must be 0 (no limit) or between {MIN_RATE_PER_SECOND} and {MAX_RATE_PER_SECOND}"
            ),
        )?;
        check(
            rate == 0.0 || (c.rate_limit_burst.is_finite() && c.rate_limit_burst >= 1.0),
            "collector.rate_limit_burst",
            "must be a finite number >= 1 while collector.rate_limit_per_second is on",
        )?;
        check(
            !c.write_keys.is_empty(),
            "collector.write_keys",
            "needs at least one source = \"key\" (or INGEST__COLLECTOR__WRITE_KEYS__<SOURCE>)",
        )?;
        if c.spool.enabled {
            let largest = c.max_batch_bytes.max(c.max_event_bytes) as u64;
            check(
                c.spool.segment_bytes >= largest,
                "collector.spool.segment_bytes",
                "must be >= collector.max_batch_bytes, so that any request fits in a segment",
            )?;
            check(
                c.spool.max_bytes >= c.spool.segment_bytes,
                "collector.spool.max_bytes",
                "must be >= collector.spool.segment_bytes",
            )?;
            check(
                c.spool.forward_in_flight > 0,
                "collector.spool.forward_in_flight",
                "must be > 0",
            )?;
            check(
                !c.spool.dir.as_os_str().is_empty(),
                "collector.spool.dir",
                "must not be empty",
            )?;
        }
        for (source, key) in &c.write_keys {
            if key.expose().len() < 8 {
                return Err(SettingsError::Invalid {
                    setting: "collector.write_keys",
                    reason: format!("the key of source `{source}` is shorter than 8 characters"),
                });
            }
        }
        Ok(())
    }

    pub fn validate_worker(&self) -> Result<(), SettingsError> {
        self.validate()?;
        let w = &self.worker;
        check(w.prefetch > 0, "worker.prefetch", "must be > 0")?;
        check(
            w.max_payload_events > 0 && w.max_payload_bytes > 0,
            "worker.max_payload_bytes",
            "must be > 0",
        )?;
        // Below RabbitMQ's largest message (128 MiB by default) with room for the envelope.
        check(
            (w.max_payload_bytes..=(64 << 20)).contains(&w.max_built_bytes),
            "worker.max_built_bytes",
            "must be at least worker.max_payload_bytes and at most 64 MiB",
        )?;
        // Whatever batch a collector with this configuration accepts builds within it
        // (`built::WORKER_BOUND_FACTOR`), so a 200 never becomes a whole-request invalid record.
        let c = &self.collector;
        let accepted = crate::built::WORKER_BOUND_FACTOR
            .saturating_mul(c.max_batch_bytes)
            .saturating_add(
                c.max_batch_events
                    .saturating_mul(crate::built::WORKER_FIELDS_BYTES),
            );
        check(
            w.max_built_bytes >= accepted,
            "worker.max_built_bytes",
            "must be at least 6 x collector.max_batch_bytes + 2048 x collector.max_batch_events, \
             what a batch the collector accepts can come to once built",
        )?;
        check(
            !self.mongo.database.is_empty(),
            "mongo.database",
            "must not be empty",
        )?;
        check(
            !self.sinks.retry_delays_ms.is_empty()
                && self.sinks.retry_delays_ms.iter().all(|d| *d > 0),
            "sinks.retry_delays_ms",
            "needs at least one delay, each > 0",
        )?;
        check(
            self.sinks.max_attempts > 0,
            "sinks.max_attempts",
            "must be > 0",
        )?;
        check(
            !self.mongo.collection.is_empty(),
            "mongo.collection",
            "must not be empty",
        )?;
        check(self.mongo.timeout_ms > 0, "mongo.timeout_ms", "must be > 0")?;
        w.invalid
            .validate()
            .map_err(|(setting, reason)| SettingsError::Invalid { setting, reason })
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

fn check(ok: bool, setting: &'static str, reason: &str) -> Result<(), SettingsError> {
    if ok {
        Ok(())
    } else {
        Err(SettingsError::Invalid {
            setting,
            reason: reason.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_pass_shared_validation() {
        let s = Settings::defaults().expect("defaults");
        assert_eq!(s.broker.prefix, "analytics");
        assert_eq!(s.collector.max_event_bytes, 32 * 1024);
        assert_eq!(s.collector.max_batch_bytes, 500 * 1024);
        s.validate().expect("valid");
    }

    #[test]
    fn collector_without_write_keys_is_rejected_naming_the_setting() {
        let s = Settings::defaults().expect("defaults");
        let err = s.validate_collector().expect_err("no keys");
        assert!(err.to_string().contains("collector.write_keys"), "{err}");
    }

    #[test]
    fn bad_prefix_is_rejected_naming_the_setting() {
        let mut s = Settings::defaults().expect("defaults");
        s.broker.prefix = "has space".into();
        let err = s.validate().expect_err("bad prefix");
        assert!(err.to_string().contains("broker.prefix"), "{err}");
    }

    #[test]
    fn bad_statsd_mirror_settings_are_rejected_naming_the_setting() {
        for prefix in ["", "ingest..x", ".ingest", "in gest"] {
            let mut s = Settings::defaults().expect("defaults");
            s.metrics.statsd_prefix = prefix.into();
            let err = s.validate().expect_err(prefix);
            assert!(err.to_string().contains("metrics.statsd_prefix"), "{err}");
        }
        for address in ["", "statsd", ":8125", "statsd:port"] {
            let mut s = Settings::defaults().expect("defaults");
            s.metrics.statsd_address = Some(address.into());
            let err = s.validate().expect_err(address);
            assert!(err.to_string().contains("metrics.statsd_address"), "{err}");
        }
        let mut s = Settings::defaults().expect("defaults");
        s.metrics.statsd_address = Some("statsd.internal:8125".into());
        s.metrics.statsd_prefix = "shop.ingest".into();
        assert!(s.validate().is_ok());
    }

    #[test]
    fn environment_overrides_files_including_maps_lists_and_numbers() {
        // nextest runs each test in its own process, so setting the environment is contained.
        let vars = [
            ("APP_ENV", "local"),
            (
                "INGEST_CONFIG_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"),
            ),
            ("INGEST__BROKER__PREFIX", "tenant7"),
            ("INGEST__BROKER__CONFIRM_TIMEOUT_MS", "1234"),
            (
                "INGEST__COLLECTOR__WRITE_KEYS__SHOP_ANDROID",
                "android-key-1",
            ),
            ("INGEST__COLLECTOR__TRUSTED_PROXIES", "10.0.0.1,10.0.0.2"),
            ("INGEST__WORKER__UNKNOWN_EVENTS", "reject"),
            ("INGEST__SINKS__MONGO__DELIVERY__LINGER_MS", "5"),
            ("INGEST__SINKS__STATSD__ADDRESS", "statsd.internal:8125"),
            ("INGEST__SINKS__STATSD__SAMPLE_RATE", "0.5"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let s = Settings::load().expect("load");
        assert_eq!(s.broker.prefix, "tenant7");
        assert_eq!(s.broker.confirm_timeout_ms, 1234);
        // from config/local.toml, plus the one from the environment
        assert_eq!(
            s.collector.write_keys["shop-ios"].expose(),
            "dev-ios-write-key"
        );
        assert_eq!(
            s.collector.write_keys["shop_android"].expose(),
            "android-key-1"
        );
        assert_eq!(s.collector.trusted_proxies.len(), 2);
        assert_eq!(s.worker.unknown_events, UnknownEventPolicy::Reject);
        // A sink's settings, typed, from the file beneath and the environment.
        assert!(s.sinks.mongo.enabled);
        assert_eq!(s.sinks.mongo.delivery.linger_ms, 5);
        assert_eq!(s.sinks.mongo.delivery.batch_max_events, 1000);
        let statsd = s
            .sinks
            .statsd
            .as_ref()
            .expect("statsd from the environment");
        assert_eq!(statsd.address, "statsd.internal:8125");
        assert_eq!(statsd.sample_rate, 0.5);
        s.validate_collector().expect("valid");
    }

    #[test]
    fn a_rate_limit_that_is_not_finite_tiny_or_huge_or_a_burst_below_one_is_refused_naming_it() {
        let with = |rate: f64, burst: f64| {
            let mut s = Settings::defaults().expect("defaults");
            s.collector
                .write_keys
                .insert("app".into(), Secret::new("app-write-key"));
            s.collector.rate_limit_per_second = rate;
            s.collector.rate_limit_burst = burst;
            s.validate_collector()
        };
        for rate in [
            f64::NAN,
            f64::INFINITY,
            -1.0,
            1e-300,
            f64::MIN_POSITIVE,
            1e12,
        ] {
            let err = with(rate, 10.0).expect_err(&rate.to_string());
            assert!(
                err.to_string().contains("collector.rate_limit_per_second"),
                "{rate}: {err}"
            );
        }
        for burst in [f64::NAN, f64::INFINITY, 0.5, 0.0, -3.0] {
            let err = with(5.0, burst).expect_err(&burst.to_string());
            assert!(
                err.to_string().contains("collector.rate_limit_burst"),
                "{burst}: {err}"
            );
        }
        // Off (0), the burst is not used.
        assert!(with(0.0, f64::NAN).is_ok());
        for (rate, burst) in [(0.5, 2.0), (1000.0, 200.0), (0.001, 1.0), (1e6, 1e6)] {
            assert!(with(rate, burst).is_ok(), "{rate} {burst}");
        }
    }

    #[test]
    fn unauthenticated_in_flight_defaults_to_a_quarter_and_must_leave_room_for_header_keys() {
        let mut s = Settings::defaults().expect("defaults");
        s.collector
            .write_keys
            .insert("app".into(), Secret::new("app-write-key"));
        s.collector.max_in_flight = 1024;
        assert_eq!(s.collector.unauthenticated_in_flight(), 256);
        s.collector.max_in_flight = 2;
        assert_eq!(s.collector.unauthenticated_in_flight(), 1);
        assert!(s.validate_collector().is_ok());
        for bad in [0, 2, 3] {
            s.collector.max_unauthenticated_in_flight = Some(bad);
            let err = s.validate_collector().expect_err("no room left");
            assert!(
                err.to_string()
                    .contains("collector.max_unauthenticated_in_flight"),
                "{err}"
            );
        }
        s.collector.max_unauthenticated_in_flight = Some(1);
        assert!(s.validate_collector().is_ok());
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let mut s = Settings::defaults().expect("defaults");
        s.collector
            .write_keys
            .insert("app".into(), Secret::new("super-secret-key"));
        let printed = format!("{s:?}");
        assert!(!printed.contains("super-secret-key"));
        assert!(!printed.contains("guest:guest"));
    }
}
