//! What the collector and the worker share: settings, the broker topology and connection, the
//! message contract (header names, endpoints, request metadata), backoff, telemetry and the
//! shutdown signal.

pub mod backoff;
pub mod broker;
pub mod built;
pub mod gzip;
pub mod message;
pub mod metrics;
pub mod publish;
pub mod settings;
pub mod shutdown;
pub mod statsd;
pub mod telemetry;

pub use backoff::Backoff;
pub use broker::Topology;
pub use message::headers;
pub use settings::{Secret, Settings, SettingsError};
