//! The benchmark's CI form: a few seconds of the load generator at a low constant rate against
//! an in-process collector and worker. It checks the generator's record (every 2xx'd event's
//! messageId) against MongoDB, and that latency and counters are reported. No timing is
//! asserted: the machine is shared and noisy. The real figures come from `scripts/bench`.

use std::sync::Arc;
use std::time::Duration;

use ingest_e2e::*;
use ingest_loadgen::payload::id_string;
use ingest_loadgen::{open_loop, Generator, HttpTarget, Recorder, Schedule, Shape};
use mongodb::bson::doc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_short_steady_load_lands_in_mongo_exactly_once() {
    let s = settings("bench_smoke");
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let target =
        Arc::new(HttpTarget::new(&collector.url, IOS_KEY, Duration::from_secs(20)).unwrap());
    let generator = Generator::new(&Shape {
        templates: 32,
        ..Shape::default()
    });
    let recorder = Recorder::new(true);
    let schedule = Schedule::constant(20.0, Duration::from_millis(2500));
    open_loop(
        target,
        generator,
        &schedule,
        &recorder,
        1_000,
        Duration::from_secs(30),
    )
    .await;

    let report = recorder.report("smoke");
    assert!(report.sent > 0, "{}", report.text());
    assert!(report.accepted_requests > 0, "{}", report.text());
    let ended: u64 = recorder.outcomes().values().sum();
    assert_eq!(ended, report.sent, "every request ended: {}", report.text());
    assert_eq!(report.completed, report.sent);
    let l = &report.latency_ms;
    assert!(
        l.p50 > 0.0 && l.p50 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
        "{l:?}"
    );
    assert!(!report.series.is_empty());
    assert_eq!(
        report.series.iter().map(|p| p.offered).sum::<u64>(),
        report.sent
    );

    let ids: Vec<String> = recorder.accepted_ids().into_iter().map(id_string).collect();
    assert_eq!(ids.len() as u64, report.accepted_events);
    let stored = wait_for_count(&s, doc! {}, ids.len() as u64, Duration::from_secs(60)).await;
    let check = ingest_loadgen::mongo::verify(&events(&s).await, &ids)
        .await
        .unwrap();
    assert_eq!(check.missing, 0, "{check:?}");
    assert_eq!(check.duplicates, 0, "{check:?}");
    // Nothing but the accepted events (a 503'd request may still have been published, but at
    // this rate none is refused; if one were, its events would be extra, never missing).
    if report.refused.is_empty() {
        assert_eq!(stored, ids.len() as u64);
    }
    worker.stop().await;
    collector.stop().await;
}
