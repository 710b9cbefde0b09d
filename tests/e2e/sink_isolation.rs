//! A bad event costs only itself in an HTTP sink (issue 21, findings 1 and 2): when a vendor
//! refuses a batch for one event's content, that event alone goes to the sink's dead-letter
//! queue with the vendor's answer, whoever sent the events that travelled with it, and every
//! other event is delivered once; and no POST carries more than `batch_max_events`, whichever
//! path the events took (in process, or through the sink's own queue).

use std::time::Duration;

use ingest_e2e::*;
use ingest_pipeline::headers::{ATTEMPT, BATCH_KEY, LAST_ERROR};
use ingest_pipeline::Settings;
use lapin::types::{AMQPValue, FieldTable};
use mongodb::bson::doc;
use serde_json::{json, Value};

use super::fixtures::*;

const LAND: Duration = Duration::from_secs(60);
/// The vendor refuses (400) any batch holding an event whose properties carry this, true.
const MARKER: &str = "vendor_refuses";
const BATCH_MAX_EVENTS: usize = 500;

fn with_vendor(name: &str, url: &str, delivery: Value) -> Settings {
    let mut s = settings(name);
    s.sinks.retry_delays_ms = vec![300, 600];
    s.sinks.max_attempts = 50;
    s.sinks.http = vec![http_sink(json!({
        "name": "vendor",
        "url": url,
        "request_timeout_ms": 120_000,
        "delivery": delivery,
    }))];
    s
}

fn marked(mut event: Value) -> Value {
    event["properties"][MARKER] = json!(true);
    event
}

/// The sink's dead-letter queue: (messageId, x-last-error) of every event in it.
async fn dead_letters(s: &Settings) -> Vec<(String, String)> {
    let dlq = format!("{}.sink.vendor.dlq", s.broker.prefix);
    drain_with_headers(s.broker.url.expose(), &dlq)
        .await
        .into_iter()
        .flat_map(|(headers, events)| {
            let reason = headers.get(LAST_ERROR).cloned().unwrap_or_default();
            events
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| {
                    let id = e["messageId"].as_str().unwrap_or_default().to_owned();
                    (id, reason.clone())
                })
        })
        .collect()
}

/// Every expected id accepted under exactly one key, nothing else accepted, no POST above the
/// bound, and exactly `bad` in the dead-letter queue, each with the vendor's answer to it.
async fn assert_isolated(s: &Settings, vendor: &Receiver, good: &[String], bad: &[String]) {
    let dead = dead_letters(s).await;
    let accepted = vendor.receipts();
    let posts = vendor.posts();
    let good_dead = dead.iter().filter(|(id, _)| !bad.contains(id)).count();
    eprintln!(
        "sink_isolation {}: {} of {} good events accepted, {} good and {} bad dead-lettered; {}",
        s.broker.prefix,
        good.iter().filter(|id| accepted.contains_key(*id)).count(),
        good.len(),
        good_dead,
        dead.len() - good_dead,
        vendor.figures(),
    );
    for id in good {
        let keys = accepted.get(id).map(Vec::len).unwrap_or(0);
        assert_eq!(keys, 1, "{id} accepted under {keys} keys");
    }
    assert_eq!(
        accepted.len(),
        good.len(),
        "the vendor accepted other events"
    );
    let mut dead_ids: Vec<&str> = dead.iter().map(|(id, _)| id.as_str()).collect();
    dead_ids.sort_unstable();
    let mut expected: Vec<&str> = bad.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(
        dead_ids, expected,
        "only the refused events are dead-lettered"
    );
    for (id, reason) in &dead {
        assert!(
            reason.contains("400") && reason.contains(&format!("event {id} has a property")),
            "{id} was dead-lettered without the vendor's answer: {reason}"
        );
    }
    let largest = posts.iter().max().copied().unwrap_or(0);
    assert!(
        largest <= BATCH_MAX_EVENTS,
        "a POST of {largest} events with batch_max_events = {BATCH_MAX_EVENTS}"
    );
    assert_eq!(
        retry_depth(s, "vendor").await,
        0,
        "nothing waits for a retry"
    );
}

/// Issue 21's run: source A sends 30 requests of 10 events and one of 2,000 while source B
/// sends one event the vendor refuses. The vendor holds its first POST until every event is in
/// MongoDB, so the rest wait in the sink's lane together, as they do behind a slow vendor.
#[tokio::test]
async fn one_sources_refused_event_dead_letters_only_itself_and_no_post_exceeds_batch_max_events() {
    let vendor = Receiver::honouring_keys(Mode::Held).await;
    let s = with_vendor(
        "isolate",
        &vendor.url,
        json!({"linger_ms": 20, "inline_attempts": 1, "breaker_failures": 0, "max_in_flight": 1,
               "batch_max_events": BATCH_MAX_EVENTS,
               "spill_after_ms": 120_000, "timeout_ms": 120_000}),
    );
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    let post = |key: &'static str, events: Vec<Value>| {
        let (client, url) = (client.clone(), format!("{}/v1/batch", collector.url));
        async move {
            let r = client
                .post_as(url, key)
                .json(&batch(events))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    let mut good = Vec::new();
    for r in 0..30 {
        let ids = ids(&format!("a-{r}"), 10);
        post(IOS_KEY, ids.iter().map(|id| product_viewed(id)).collect()).await;
        good.extend(ids);
    }
    let bad = vec!["b-refused".to_owned()];
    post(WEB_KEY, vec![marked(screen(&bad[0]))]).await;
    let big = ids("a-big", 2_000);
    post(IOS_KEY, big.iter().map(|id| screen(id)).collect()).await;
    good.extend(big);

    assert_eq!(wait_for_count(&s, doc! {}, 2_301, LAND).await, 2_301);
    vendor.set_mode(Mode::RefuseMarked(MARKER));
    let dlq = format!("{}.sink.vendor.dlq", s.broker.prefix);
    let url = s.broker.url.expose().to_owned();
    eventually(LAND, || async {
        vendor.receipts().len() >= good.len() && depth(&url, &dlq).await >= 1
    })
    .await;
    // Anything still under way lands before the queues are read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_isolated(&s, &vendor, &good, &bad).await;
    worker.stop().await;
}

/// The sink's own queue is the other path to the vendor: a batch coming back from a delay
/// queue (as a worker of an earlier release spilled it, whole) and a message of fresh events,
/// each of 1,200 events with one the vendor refuses.
#[tokio::test]
async fn a_large_batch_in_the_sinks_queue_is_split_and_only_its_refused_event_dead_lettered() {
    let vendor = Receiver::honouring_keys(Mode::RefuseMarked(MARKER)).await;
    let s = with_vendor(
        "isolateq",
        &vendor.url,
        json!({"linger_ms": 20, "inline_attempts": 1, "breaker_failures": 0,
               "batch_max_events": BATCH_MAX_EVENTS}),
    );
    let worker = Worker::start(&s);
    let url = s.broker.url.expose().to_owned();
    let queue = format!("{}.sink.vendor", s.broker.prefix);
    assert!(eventually(LAND, || async { lapin_queue_exists(&url, &queue).await }).await);

    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (tag, key) in [("retried", Some("spilled-whole")), ("fresh", None)] {
        let ids = ids(tag, 1_200);
        let events: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let event = json!({"type": "track", "event": "Custom", "userId": "u",
                                   "messageId": id, "properties": {"n": i}});
                if i == 700 {
                    marked(event)
                } else {
                    event
                }
            })
            .collect();
        bad.push(ids[700].clone());
        good.extend(
            ids.into_iter()
                .enumerate()
                .filter(|(i, _)| *i != 700)
                .map(|(_, id)| id),
        );
        let mut headers = FieldTable::default();
        if let Some(key) = key {
            headers.insert(BATCH_KEY.into(), ingest_pipeline::broker::long_string(key));
            headers.insert(ATTEMPT.into(), AMQPValue::LongUInt(1));
        }
        let properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let body = serde_json::to_vec(&events).unwrap();
        publish_once(&url, &queue, &body, properties, LAND)
            .await
            .unwrap();
    }

    let dlq = format!("{}.sink.vendor.dlq", s.broker.prefix);
    eventually(LAND, || async {
        vendor.receipts().len() >= good.len() && depth(&url, &dlq).await >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_isolated(&s, &vendor, &good, &bad).await;
    assert_eq!(depth(&url, &queue).await, 0);
    worker.stop().await;
}
