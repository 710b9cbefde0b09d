//! End-to-end tests of the whole pipeline against a real RabbitMQ and a real MongoDB-wire
//! server (started by scripts/test). One binary, so the workspace links once.
#![allow(clippy::unwrap_used)]

mod e2e {
    pub mod archive;
    pub mod bench_smoke;
    pub mod built_rule;
    pub mod chaos;
    pub mod cluster;
    pub mod cluster_nack;
    pub mod compat;
    pub mod dedupe;
    pub mod enrich;
    pub mod exposition;
    pub mod fanout;
    pub mod fixtures;
    pub mod harden;
    pub mod hostile;
    pub mod ingest;
    pub mod invalid_bound;
    pub mod live;
    pub mod operate;
    pub mod ops;
    pub mod ops_cluster;
    pub mod per_client;
    pub mod quota;
    pub mod replay;
    pub mod resilience;
    pub mod sink_isolation;
    pub mod sinks;
    pub mod spool;
    pub mod stall;
    pub mod wire;
}
