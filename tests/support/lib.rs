//! Test harness for the end-to-end tests in `tests/`: per-test queue prefix and database,
//! collector and worker run in-process (port 0) or as processes, broker nodes owned by a test.
//! Everything a test starts is stopped when its handle is dropped.
//!
//! The servers come from `scripts/test` through TEST_AMQP_URL and TEST_MONGO_URI. Set
//! TEST_LOG=debug to see the services' logs.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

mod broker;
mod http;
mod load;
mod mongo;
mod services;
mod setup;

pub use broker::*;
pub use http::*;
pub use load::*;
pub use mongo::*;
pub use services::*;
pub use setup::*;

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
