//! Duplicates reach the sinks that cannot drop them themselves (a client's retry, a request the
//! spool published twice, a redelivery): HTTP sinks get the same per-event key for every copy
//! of an event, whatever batch it travels in, and statsd counts it once.

use std::collections::BTreeMap;
use std::time::Duration;

use ingest_e2e::*;
use mongodb::bson::doc;
use serde_json::{json, Value};

use super::fixtures::*;

const LAND: Duration = Duration::from_secs(30);

/// Adds the counters of one datagram, as the daemon sums them.
fn add_counters(datagram: &[u8], counters: &mut BTreeMap<String, f64>) {
    for line in std::str::from_utf8(datagram).unwrap().split('\n') {
        let (name, rest) = line.split_once(':').expect("name:value");
        if let Some(value) = rest.strip_suffix("|c") {
            *counters.entry(name.to_owned()).or_default() += value.parse::<f64>().unwrap();
        }
    }
}

/// Reads datagrams from `statsd` until the counters add up to `total`.
async fn counters_until(
    statsd: &tokio::net::UdpSocket,
    counters: &mut BTreeMap<String, f64>,
    total: f64,
) {
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + LAND;
    while counters.values().sum::<f64>() < total {
        let n = tokio::time::timeout_at(deadline, statsd.recv(&mut buf))
            .await
            .expect("statsd datagrams")
            .unwrap();
        add_counters(&buf[..n], counters);
    }
}

#[tokio::test]
async fn an_event_that_arrives_twice_in_other_batches_has_one_key_in_http_sinks_and_one_count_in_statsd(
) {
    let receiver = Receiver::start(Mode::Ok).await;
    let statsd = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut s = settings("dedupe");
    s.sinks.http = vec![http_sink(json!({
        "name": "vendor",
        "url": receiver.url,
        "delivery": {"linger_ms": 20, "breaker_failures": 0},
    }))];
    s.sinks.statsd = Some(
        serde_json::from_value(json!({
            "address": statsd.local_addr().unwrap().to_string(),
            "delivery": {"linger_ms": 20},
        }))
        .unwrap(),
    );
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    let mut counters = BTreeMap::new();

    // The order, first beside a product view; then again beside a screen view, as a request
    // that was published twice would bring it, in another batch.
    let first = batch(vec![
        order_completed("twice", 42.0),
        product_viewed("once-1"),
    ]);
    let second = batch(vec![screen("once-2"), order_completed("twice", 42.0)]);
    assert_eq!(
        post_batch(&client, &collector.url, &first).await.status(),
        200
    );
    counters_until(&statsd, &mut counters, 2.0).await;
    assert_eq!(
        post_batch(&client, &collector.url, &second).await.status(),
        200
    );
    counters_until(&statsd, &mut counters, 3.0).await;
    // The client retries the first request whole (same messageIds).
    assert_eq!(
        post_batch(&client, &collector.url, &first).await.status(),
        200
    );
    assert!(
        eventually(LAND, || async {
            receiver.receipts().values().flatten().count() == 6
        })
        .await,
        "{:?}",
        receiver.receipts()
    );
    assert_eq!(
        wait_for_count(&s, doc! {}, 3, LAND).await,
        3,
        "MongoDB: once each"
    );

    // HTTP: each copy came in a batch of its own, under its own Idempotency-Key, and with
    // the same event key.
    let mut keys: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for received in receiver.received() {
        for event in &received.events {
            let id = event["messageId"].as_str().unwrap_or_default().to_owned();
            let key = event["_ingest"]["eventKey"].as_str().unwrap_or_default();
            keys.entry(id)
                .or_default()
                .push((received.key.clone(), key.to_owned()));
        }
    }
    let twice = &keys["twice"];
    assert_eq!(twice.len(), 3, "{keys:?}");
    let batch_keys: std::collections::BTreeSet<&String> = twice.iter().map(|(b, _)| b).collect();
    assert!(batch_keys.len() >= 2, "two batches at least: {twice:?}");
    let expected =
        uuid::Uuid::new_v5(&worker::sinks::EVENT_KEY_NAMESPACE, b"shop-ios\ntwice").to_string();
    assert!(twice.iter().all(|(_, key)| *key == expected), "{twice:?}");
    assert_ne!(keys["once-1"][0].1, expected);

    // statsd: the order once, whichever copy came first; the copies skipped are counted.
    let metrics = metrics_of(&client, &worker.url).await;
    let skipped = "worker_statsd_duplicates_skipped_total{sink=\"statsd\"}";
    assert!(
        eventually(LAND, || async {
            metric_value(&metrics_of(&client, &worker.url).await, skipped) == 3.0
        })
        .await,
        "{metrics}"
    );
    // Nothing else was sent: what reached the socket by now is in its buffer.
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = statsd.try_recv(&mut buf) {
        add_counters(&buf[..n], &mut counters);
    }
    let counted: Value = json!(counters);
    assert_eq!(
        counters.get("analytics.shop-ios.track.order_completed"),
        Some(&1.0),
        "{counted}"
    );
    assert_eq!(counters.values().sum::<f64>(), 3.0, "{counted}");
    assert!(
        metrics.contains("# HELP worker_statsd_duplicates_skipped_total "),
        "{metrics}"
    );
}
