//! The load generator's open loop against a collector.

use std::time::Duration;
use tokio::task::JoinHandle;

use crate::*;

/// The load generator's open loop at `rate` requests/s against the collector at `url` (the iOS
/// key, 10 s per request), until aborted; stop it with [`stop_open_loop`].
pub fn start_open_loop(
    url: &str,
    rate: f64,
    recorder: &ingest_loadgen::Recorder,
) -> JoinHandle<()> {
    use ingest_loadgen::{open_loop, Generator, HttpTarget, Schedule, Shape};
    let target =
        std::sync::Arc::new(HttpTarget::new(url, IOS_KEY, Duration::from_secs(10)).unwrap());
    let generator = Generator::new(&Shape {
        templates: 32,
        seed: fastrand::u64(..),
        ..Shape::default()
    });
    let schedule = Schedule::constant(rate, Duration::from_secs(3600));
    let recorder = recorder.clone();
    tokio::spawn(async move {
        open_loop(
            target,
            generator,
            &schedule,
            &recorder,
            2_000,
            Duration::from_secs(30),
        )
        .await;
    })
}

/// Stops [`start_open_loop`]'s load and lets the requests already sent end (within their 10 s
/// timeout) before the recorder is closed.
pub async fn stop_open_loop(load: JoinHandle<()>, recorder: &ingest_loadgen::Recorder) {
    load.abort();
    let _ = load.await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    recorder.finish();
}
