//! The invalid queue is bounded (issue #21, finding 5): one 34 KB request of 2,000
//! `{"type":"track"}` used to become 2,000 enriched invalid records (about 2.2 MB) on a queue
//! with no byte cap. Repeats are now compacted (per source and error signature within a window:
//! the first few kept whole, the rest counted in one summary record), and the queue has a byte
//! cap whose overflow is counted, shown to Nagios and summarised, never looped on.

use std::time::Duration;

use ingest_e2e::*;
use ingest_pipeline::Settings;
use mongodb::bson::doc;
use serde_json::{json, Value};

use super::fixtures::product_viewed;

const LAND: Duration = Duration::from_secs(60);
/// Events per request: the collector's `max_batch_events`.
const EVENTS: usize = 2_000;

/// 2,000 copies of the smallest invalid track event (no `event`, no user): about 34 KB.
fn repeats() -> Value {
    json!({ "batch": vec![json!({"type": "track"}); EVENTS] })
}

/// Every message of a queue: its bytes and its body as JSON.
async fn drain(queue: &str) -> Vec<(usize, Value)> {
    drain_raw_with_headers(&amqp_url(), queue)
        .await
        .into_iter()
        .map(|(_, body)| (body.len(), serde_json::from_slice(&body).unwrap()))
        .collect()
}

async fn worker_metric(worker: &Worker, series: &str) -> f64 {
    metric_value(&metrics_of(&http(), &worker.url).await, series)
}

#[tokio::test]
async fn requests_of_two_thousand_copies_of_one_invalid_event_are_kept_k_times_whole_and_counted_in_a_summary(
) {
    const REQUESTS: usize = 5;
    let s = settings("fold");
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    for _ in 0..REQUESTS {
        let answer = post_batch(&client, &collector.url, &repeats()).await;
        assert_eq!(answer.status(), 200);
    }
    let invalid_events = "worker_events_total{result=\"invalid\"}";
    let total = (REQUESTS * EVENTS) as f64;
    assert!(
        eventually(LAND, || async {
            worker_metric(&worker, invalid_events).await >= total
        })
        .await,
        "the worker did not take every request"
    );
    // A graceful stop publishes the summaries of the windows still open.
    worker.stop().await;
    let records = drain(&format!("{}.invalid", s.broker.prefix)).await;
    let bytes: usize = records.iter().map(|(n, _)| n).sum();
    let whole: Vec<&Value> = records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r["reason"] == "schema")
        .collect();
    let summaries: Vec<&Value> = records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r["reason"] == "folded")
        .collect();
    eprintln!(
        "{REQUESTS} requests of {EVENTS} invalid events: {} records, {bytes} bytes on the invalid queue ({} whole, {} summaries)",
        records.len(),
        whole.len(),
        summaries.len()
    );
    assert_eq!(
        whole.len() + summaries.len(),
        records.len(),
        "only whole records and summaries"
    );
    // Every event is accounted for: kept whole, or counted in a summary.
    let folded: u64 = summaries.iter().filter_map(|s| s["count"].as_u64()).sum();
    assert_eq!(whole.len() as u64 + folded, total as u64);
    // At most K whole per window of the signature, and a summary for each window that folded.
    let keep = s.worker.invalid.keep_whole;
    assert!(!summaries.is_empty());
    assert!(
        whole.len() <= keep * summaries.len(),
        "{} whole records for {} windows",
        whole.len(),
        summaries.len()
    );
    for summary in &summaries {
        assert_eq!(summary["source"], "shop-ios");
        assert_eq!(summary["foldedReason"], "schema");
        assert_eq!(summary["kept"].as_u64(), Some(keep as u64));
        assert!(summary["signature"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(summary["errors"].as_array().is_some_and(|e| !e.is_empty()));
        let examples = summary["exampleMessageIds"].as_array().unwrap();
        assert!((1..=5).contains(&examples.len()), "{summary}");
        assert!(summary["firstSeen"].as_str() <= summary["lastSeen"].as_str());
    }
    // The bound: per window, K whole records and one summary, whatever the number of requests
    // (the test's requests may straddle a window's end: then two windows).
    let largest = |records: &[&Value]| {
        records
            .iter()
            .map(|r| r.to_string().len())
            .max()
            .unwrap_or(0)
    };
    let per_window = keep * largest(&whole) + largest(&summaries);
    assert!(
        bytes <= summaries.len() * per_window,
        "{bytes} bytes for {} windows of at most {per_window}",
        summaries.len()
    );
    // What it was: 2,000 whole records (about 2.2 MB) per request.
    assert!(bytes < 64 * 1024, "{bytes} bytes");
    collector.stop().await;
}

#[tokio::test]
async fn an_invalid_queue_declared_without_the_cap_by_an_earlier_release_is_used_as_it_is() {
    let s = settings("invalidupgrade");
    assert!(s.broker.invalid_max_length_bytes > 0);
    let invalid = format!("{}.invalid", s.broker.prefix);
    let (conn, ch) = channel(&amqp_url()).await;
    ingest_pipeline::broker::declare_queue(
        &ch,
        &invalid,
        ingest_pipeline::broker::quorum_arguments(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "".into()).await;

    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    let bad = json!({"batch": [{"type": "track", "messageId": "upgrade-1"}]});
    assert_eq!(
        post_batch(&client, &collector.url, &bad).await.status(),
        200
    );
    assert!(
        eventually(LAND, || async { depth(&amqp_url(), &invalid).await == 1 }).await,
        "the invalid record did not land in the kept queue"
    );
    // Ops can see that the cap is not in force.
    let series = format!("broker_queue_kept_with_old_arguments_total{{queue=\"{invalid}\"}}");
    assert!(worker_metric(&worker, &series).await >= 1.0);
    worker.stop().await;
    collector.stop().await;
}

/// `ingestctl` with the test's settings and its byte cap (which `settings_env` does not pass).
async fn ingestctl_with_cap(s: &Settings, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(binary("ingestctl"))
        .envs(settings_env(s))
        .env(
            "INGEST__BROKER__INVALID_MAX_LENGTH_BYTES",
            s.broker.invalid_max_length_bytes.to_string(),
        )
        .current_dir(root())
        .args(args)
        .output()
        .await
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), line)
}

/// At the cap the broker nacks invalid records. The worker used to retry and then requeue the
/// raw delivery, which looped until the delivery limit took its valid events to the raw DLQ
/// (with a 40 KB cap set by policy: 19 redeliveries in two minutes, 12,510 nacks, none of the
/// 3 valid events stored). Now what is refused is counted, visible, and summarised once there
/// is room, and each raw delivery is acked once.
#[tokio::test]
async fn at_a_tiny_byte_cap_the_overflow_is_counted_visible_and_summarised_and_the_raw_queue_drains(
) {
    const CAP: u64 = 40_000;
    const REQUESTS: usize = 3;
    let mut s = settings("invalidcap");
    s.broker.invalid_max_length_bytes = CAP;
    // Every record whole: the cap alone bounds the queue here.
    s.worker.invalid.window_ms = 0;
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    for i in 0..REQUESTS {
        let mut events = vec![json!({"type": "track"}); EVENTS - 1];
        events.push(product_viewed(&format!("good-{i}")));
        let answer = post_batch(&client, &collector.url, &json!({ "batch": events })).await;
        assert_eq!(answer.status(), 200);
    }
    // Each delivery is settled once: its valid event lands beside the refused invalid ones.
    assert_eq!(
        wait_for_count(&s, doc! {}, REQUESTS as u64, LAND).await,
        REQUESTS as u64
    );
    let acked = "worker_deliveries_total{outcome=\"acked\"}";
    assert!(
        eventually(LAND, || async {
            worker_metric(&worker, acked).await >= REQUESTS as f64
        })
        .await
    );
    let requeued = "worker_deliveries_total{outcome=\"requeued\"}";
    assert_eq!(
        worker_metric(&worker, requeued).await,
        0.0,
        "no redelivery loop"
    );
    let raw = format!("{}.raw", s.broker.prefix);
    assert_eq!(depth(&amqp_url(), &raw).await, 0);
    assert_eq!(depth(&amqp_url(), &format!("{raw}.dlq")).await, 0);
    let overflowed = worker_metric(&worker, "worker_invalid_overflow_total").await;
    assert!(overflowed > 0.0);
    // Waiting for room (a nack of a quorum queue still electing its leader could have been
    // counted and summarised early: then not all of it).
    let pending = worker_metric(&worker, "worker_invalid_overflow_pending").await;
    assert!(
        pending > 0.0 && pending <= overflowed,
        "{pending} of {overflowed}"
    );

    // Nagios: CRITICAL while refused events wait for room in the queue.
    let check = ["check", "--invalid", "--worker", worker.url.as_str()];
    let (code, line) = ingestctl_with_cap(&s, &check).await;
    assert_eq!(code, 2, "{line}");
    assert!(line.starts_with("INVALID CRITICAL - "), "{line}");
    assert!(line.contains("| overflow_pending="), "{line}");

    // What the broker kept: about the cap (a quorum queue's cap is checked as publishes land,
    // so those in flight when it is reached still go in).
    let invalid = format!("{}.invalid", s.broker.prefix);
    let mut records = drain(&invalid).await;
    let bytes: usize = records.iter().map(|(n, _)| n).sum();
    eprintln!(
        "cap {CAP}: {bytes} bytes in {} records kept, {overflowed} refused and counted",
        records.len()
    );
    // The cap, and what the worker's channel had sent before the broker told it the queue was
    // full: those publishes still go in (seen: up to 4 rounds of 64 records, one per delivery
    // and one more, over this 40 KB cap; noise beside the 1 GiB default).
    let largest = records.iter().map(|(n, _)| *n).max().unwrap_or(0);
    assert!(
        bytes <= CAP as usize + 2 * REQUESTS * 64 * largest,
        "{bytes} bytes"
    );

    // Ops made room: the worker's summary of what it refused lands, and the check is OK again.
    let overflow_counted = |records: &[(usize, Value)]| -> f64 {
        records
            .iter()
            .filter(|(_, r)| r["reason"] == "overflow")
            .filter_map(|(_, r)| r["count"].as_f64())
            .sum()
    };
    let until = std::time::Instant::now() + LAND;
    while overflow_counted(&records) < overflowed && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        records.extend(drain(&invalid).await);
    }
    assert_eq!(
        overflow_counted(&records),
        overflowed,
        "the overflow summary"
    );
    // Every invalid event is kept whole or counted in an overflow summary, once.
    let whole = records
        .iter()
        .filter(|(_, r)| r["reason"] == "schema")
        .count();
    assert!(records
        .iter()
        .all(|(_, r)| r["reason"] == "schema" || r["reason"] == "overflow"));
    assert_eq!(whole as f64 + overflowed, (REQUESTS * (EVENTS - 1)) as f64);
    let summary = &records
        .iter()
        .find(|(_, r)| r["reason"] == "overflow")
        .unwrap()
        .1;
    assert_eq!(summary["source"], "shop-ios");
    assert!(summary["exampleMessageIds"]
        .as_array()
        .is_some_and(|ids| !ids.is_empty()));
    assert!(
        eventually(LAND, || async {
            worker_metric(&worker, "worker_invalid_overflow_pending").await == 0.0
        })
        .await
    );
    let (code, line) = ingestctl_with_cap(&s, &check).await;
    assert_eq!(code, 0, "{line}");
    worker.stop().await;
    collector.stop().await;
}
