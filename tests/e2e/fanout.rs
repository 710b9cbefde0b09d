//! The worker's in-process path to its sinks (issue 11): a sink slower than `spill_after_ms`
//! hands its share to its own queue and holds neither the raw queue nor the other sinks back;
//! once it answers again, its runner delivers the spilled events.

use std::time::Duration;

use ingest_e2e::*;
use mongodb::bson::doc;
use serde_json::json;

use super::fixtures::*;

const LAND: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_sink_slower_than_spill_after_ms_spills_to_its_queue_and_mongodb_does_not_wait() {
    let receiver = Receiver::start(Mode::Hang).await;
    let mut s = settings("spill");
    s.sinks.retry_delays_ms = vec![300];
    s.sinks.max_attempts = 50;
    s.sinks.http = vec![http_sink(json!({
        "name": "slow",
        "url": receiver.url,
        // The vendor would be waited for 20 s; the raw delivery waits at most 300 ms.
        "request_timeout_ms": 20_000,
        "delivery": {"spill_after_ms": 300, "inline_attempts": 1, "breaker_failures": 0, "linger_ms": 20},
    }))];
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    let ids: Vec<String> = (0..10).map(|i| format!("spill-{i}")).collect();
    for id in &ids {
        let r = post_batch(&client, &collector.url, &batch(vec![product_viewed(id)])).await;
        assert_eq!(r.status(), 200);
    }
    // MongoDB and the raw queue do not wait for the hanging vendor.
    assert_eq!(wait_for_count(&s, doc! {}, 10, LAND).await, 10);
    let url = s.broker.url.expose().to_owned();
    let raw = format!("{}.raw", s.broker.prefix);
    assert!(eventually(LAND, || async { depth(&url, &raw).await == 0 }).await);
    assert!(receiver.hits() > 0, "the vendor was called");
    assert!(receiver.received().is_empty());

    // The vendor recovers: its runner delivers every spilled event.
    receiver.set_mode(Mode::Ok);
    let delivered = eventually(Duration::from_secs(60), || async {
        let got = receiver.receipts();
        ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    assert!(
        delivered,
        "the vendor got {:?}",
        receiver.receipts().keys().collect::<Vec<_>>()
    );
    worker.stop().await;
}

/// A delivery held by one sink (here a vendor that never answers its first request, with a
/// `spill_after_ms` far away) must not hold the raw deliveries finished after it: they are
/// acked although an earlier one is not, so the consumer never stops at its prefetch.
#[tokio::test]
async fn one_delivery_held_by_a_sink_does_not_stop_the_consumer_at_its_prefetch() {
    let receiver = Receiver::start(Mode::HangFirst).await;
    let mut s = settings("held");
    s.worker.prefetch = 4;
    s.sinks.http = vec![http_sink(json!({
        "name": "held",
        "url": receiver.url,
        "request_timeout_ms": 600_000,
        // One delivery per request; the first request is held for ten minutes.
        "delivery": {"spill_after_ms": 600_000, "timeout_ms": 600_000, "batch_max_events": 1,
                     "inline_attempts": 1, "breaker_failures": 0},
    }))];
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    let ids: Vec<String> = (0..20).map(|i| format!("held-{i}")).collect();
    for id in &ids {
        let r = post_batch(&client, &collector.url, &batch(vec![product_viewed(id)])).await;
        assert_eq!(r.status(), 200);
    }
    // With the held delivery unacked, the other 19 still go through: MongoDB has all 20 and
    // the vendor answered every request but the first.
    assert_eq!(wait_for_count(&s, doc! {}, 20, LAND).await, 20);
    let vendor_got_the_rest = eventually(LAND, || async { receiver.receipts().len() == 19 }).await;
    assert!(
        vendor_got_the_rest,
        "the vendor got {} of the 19 it answers",
        receiver.receipts().len()
    );
    worker.stop().await;
}
