//! A broker whose confirms stall for a few seconds (a slow disk under a quorum queue, a GC
//! pause) while clients keep sending at a rate well below the collector's capacity (issue 12).
//! The collector holds those requests until their confirms come, bounded by the bytes they
//! carry (`collector.max_in_flight_bytes`), not by their count: no 503 while the budget holds,
//! and past it the same 503 with Retry-After as before.

use std::sync::Arc;
use std::time::Duration;

use ingest_e2e::*;
use ingest_loadgen::{open_loop, Generator, HttpTarget, Recorder, Schedule, Shape};

/// The broker is frozen this long, mid-load.
const STALL: Duration = Duration::from_secs(3);

/// Sends at `rate` for `secs` while the node freezes for [`STALL`] after the first second.
async fn load_through_a_stall(
    node: &RabbitNode,
    url: &str,
    rate: f64,
    secs: f64,
) -> ingest_loadgen::Report {
    let target = Arc::new(HttpTarget::new(url, IOS_KEY, Duration::from_secs(20)).unwrap());
    let generator = Generator::new(&Shape::default());
    let recorder = Recorder::new(false);
    let schedule = Schedule::constant(rate, Duration::from_secs_f64(secs));
    let load = open_loop(
        target,
        generator,
        &schedule,
        &recorder,
        10_000,
        Duration::from_secs(30),
    );
    let stall = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.freeze();
        tokio::time::sleep(STALL).await;
        node.thaw();
    };
    tokio::join!(load, stall);
    recorder.report("stall")
}

/// 500 requests/s (a fraction of what the collector serves here) through a 3 s stall: about
/// 1,500 requests wait for their confirms at once, past the old cap of 1,024 requests, but
/// their bodies come to a few MB, far inside the default budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_stall_of_seconds_below_capacity_is_ridden_through_without_a_503() {
    let node = RabbitNode::start();
    let mut s = settings("stall");
    // What is under test is the byte budget, not the timeout: the timeout is set well past the
    // stall. After the thaw the broker, the collector and the load generator (debug builds, 2
    // shared cores) catch up on about 1,500 held requests while the load goes on; that took up
    // to 2 s here (the slowest request 4.97 s for the 3 s stall), so with the production
    // default of 5 s CI once timed out the first requests held.
    s.broker.confirm_timeout_ms = 10_000;
    s.broker.url = ingest_pipeline::settings::Secret::new(node.url());
    let collector = CollectorProcess::spawn(&s).await;
    let report = load_through_a_stall(&node, &collector.url, 500.0, 6.0).await;
    assert!(report.sent >= 2_500, "the load was sent: {}", report.text());
    let metrics = metrics_of(&http(), &collector.url).await;
    assert!(
        report.refused.is_empty(),
        "refused during the stall: {:?}\n{}\n{}",
        report.refused,
        report.text(),
        metrics
            .lines()
            .filter(|l| l.starts_with("collector_load_shed_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(report.accepted_requests, report.sent, "{}", report.text());
}

/// With a small budget the same stall fills it: the requests past it are refused at once with
/// 503 and Retry-After (counted as shed for `max_in_flight_bytes`), and every request answered
/// 200 was confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_bytes_a_stall_sheds_with_503() {
    let node = RabbitNode::start();
    let mut s = settings("budget");
    s.broker.url = ingest_pipeline::settings::Secret::new(node.url());
    s.collector.max_in_flight_bytes = 1_000_000;
    let collector = CollectorProcess::spawn(&s).await;
    let report = load_through_a_stall(&node, &collector.url, 200.0, 5.0).await;
    let refused_503 = report.refused.get("503").copied().unwrap_or(0);
    assert!(refused_503 > 0, "nothing shed: {}", report.text());
    let metrics = metrics_of(&http(), &collector.url).await;
    let shed = metric_value(
        &metrics,
        "collector_load_shed_total{reason=\"max_in_flight_bytes\"}",
    );
    assert!(shed > 0.0, "{metrics}");
    // Each 2xx was confirmed: the raw queue holds at least that many messages.
    let raw = format!("{}.raw", s.broker.prefix);
    let held = depth(&node.url(), &raw).await;
    assert!(
        u64::from(held) >= report.accepted_requests,
        "{held} in the raw queue, {} answered 2xx",
        report.accepted_requests
    );
}
