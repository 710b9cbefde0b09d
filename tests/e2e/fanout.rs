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
