//! What the collector and the worker share: settings, the broker topology and connection,
//! backoff, telemetry and the shutdown signal.

pub mod backoff;
pub mod broker;
pub mod gzip;
pub mod metrics;
pub mod settings;
pub mod shutdown;
pub mod statsd;
pub mod telemetry;

pub use backoff::Backoff;
pub use broker::Topology;
pub use settings::{Secret, Settings, SettingsError};

/// AMQP header names the collector writes and the worker reads.
pub mod headers {
    pub const RECEIVED_AT: &str = "received_at";
    pub const SOURCE: &str = "source";
    pub const CLIENT_IP: &str = "client_ip";
    pub const USER_AGENT: &str = "user_agent";
    pub const ENDPOINT: &str = "endpoint";
}
