//! Fan-out to MongoDB, statsd and HTTP, and the isolation between sinks: a failing, hanging or
//! refusing sink never holds up, slows or duplicates delivery to the others, and what it could
//! not take waits in its own retry path or dead-letter queue.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use ingest_e2e::*;
use ingest_pipeline::headers::{LAST_ERROR, SINK};
use ingest_pipeline::Settings;
use mongodb::bson::doc;
use serde_json::{json, Value};

use super::fixtures::*;

const LAND: Duration = Duration::from_secs(30);

/// Settings with an HTTP sink named `vendor` pointing at `url`, quick retries.
fn with_vendor(name: &str, url: &str, delivery: Value) -> Settings {
    let mut s = settings(name);
    s.sinks.retry_delays_ms = vec![300, 600];
    s.sinks.max_attempts = 50;
    s.sinks.http = vec![http_sink(json!({
        "name": "vendor",
        "url": url,
        "headers": {"Authorization": "Bearer test-token"},
        "request_timeout_ms": 500,
        "delivery": delivery,
    }))];
    s
}

fn quick() -> Value {
    json!({"linger_ms": 20, "inline_attempts": 1, "breaker_failures": 0})
}

/// Posts `requests` batches: each a Product Viewed and an Order Completed.
async fn post_mixed(collector: &Collector, tag: &str, requests: usize) -> Vec<String> {
    let client = http();
    let ids: Vec<String> = (0..requests)
        .flat_map(|r| [format!("{tag}-{r}-pv"), format!("{tag}-{r}-oc")])
        .collect();
    let statuses: Vec<u16> = futures_util::stream::iter(0..requests)
        .map(|r| {
            let client = client.clone();
            let url = format!("{}/v1/batch", collector.url);
            let body = batch(vec![
                product_viewed(&format!("{tag}-{r}-pv")),
                order_completed(&format!("{tag}-{r}-oc"), 89.9),
            ]);
            async move {
                client
                    .post_as(url, IOS_KEY)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    ids
}

#[tokio::test]
async fn events_land_in_mongo_statsd_and_http() {
    let receiver = Receiver::start(Mode::Ok).await;
    let statsd = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut s = with_vendor("all3", &receiver.url, quick());
    s.sinks.statsd = Some(
        serde_json::from_value(json!({
            "address": statsd.local_addr().unwrap().to_string(),
            "timers": ["total"],
            "delivery": {"linger_ms": 20},
        }))
        .unwrap(),
    );
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let ids = post_mixed(&collector, "a", 5).await;

    assert_eq!(wait_for_count(&s, doc! {}, 10, LAND).await, 10);
    assert!(eventually(LAND, || async { receiver.receipts().len() == 10 }).await);
    let receipts = receiver.receipts();
    for id in &ids {
        assert_eq!(
            receipts.get(id).map(Vec::len),
            Some(1),
            "{id} not delivered exactly once"
        );
    }
    for batch in receiver.received() {
        assert_eq!(batch.authorization.as_deref(), Some("Bearer test-token"));
        assert_eq!(batch.content_type.as_deref(), Some("application/json"));
        assert_eq!(batch.key.len(), 36, "Idempotency-Key is a UUID");
        assert!(batch
            .events
            .iter()
            .all(|e| e["source"] == json!("shop-ios")));
    }

    // statsd: read datagrams until every counter arrived, parse each line as statsd does
    let mut counters: BTreeMap<String, f64> = BTreeMap::new();
    let mut timers = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + LAND;
    while counters.values().sum::<f64>() < 10.0 {
        let n = tokio::time::timeout_at(deadline, statsd.recv(&mut buf))
            .await
            .expect("statsd datagrams")
            .unwrap();
        assert!(n <= 1432, "datagram of {n} bytes is over the MTU");
        for line in std::str::from_utf8(&buf[..n]).unwrap().split('\n') {
            let (name, rest) = line.split_once(':').expect("name:value");
            let mut fields = rest.split('|');
            let value: f64 = fields.next().unwrap().parse().expect("numeric value");
            match fields.next() {
                Some("c") => *counters.entry(name.to_owned()).or_default() += value,
                Some("ms") => timers.push((name.to_owned(), value)),
                other => panic!("unexpected metric type {other:?} in {line}"),
            }
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{name}"
            );
        }
    }
    assert_eq!(
        counters.get("analytics.shop-ios.track.product_viewed"),
        Some(&5.0),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("analytics.shop-ios.track.order_completed"),
        Some(&5.0),
        "{counters:?}"
    );
    assert!(
        timers.iter().any(
            |(n, v)| n == "analytics.shop-ios.track.order_completed.total"
                && (*v - 89.9).abs() < 1e-9
        ),
        "{timers:?}"
    );
}

#[tokio::test]
async fn random_event_names_past_the_statsd_cap_are_counted_under_other_not_as_new_series() {
    let statsd = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut s = settings("statsdcap");
    s.sinks.statsd = Some(
        serde_json::from_value(json!({
            "address": statsd.local_addr().unwrap().to_string(),
            "max_event_names": 5,
            "delivery": {"linger_ms": 20},
        }))
        .unwrap(),
    );
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let events: Vec<Value> = (0..12)
        .map(|i| {
            let mut event = product_viewed(&format!("cap-{i}"));
            event["event"] = json!(format!("Random {i}"));
            event
        })
        .collect();
    let client = http();
    assert_eq!(
        post_batch(&client, &collector.url, &batch(events))
            .await
            .status(),
        200
    );

    let mut counters: BTreeMap<String, f64> = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + LAND;
    while counters.values().sum::<f64>() < 12.0 {
        let n = tokio::time::timeout_at(deadline, statsd.recv(&mut buf))
            .await
            .expect("statsd datagrams")
            .unwrap();
        for line in std::str::from_utf8(&buf[..n]).unwrap().split('\n') {
            let (name, rest) = line.split_once(':').expect("name:value");
            if rest.ends_with("|c") {
                let value: f64 = rest.trim_end_matches("|c").parse().expect("numeric value");
                *counters.entry(name.to_owned()).or_default() += value;
            }
        }
    }
    assert_eq!(
        counters.len(),
        5 + 1,
        "the cap's names and `other`: {counters:?}"
    );
    assert_eq!(
        counters.get("analytics.shop-ios.track.other"),
        Some(&7.0),
        "{counters:?}"
    );
    // The worker counts what it folded before it sends, so the datagrams imply the count.
    let metrics = metrics_of(&client, &worker.url).await;
    assert!(
        metrics.contains("# HELP worker_statsd_names_folded_total "),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "worker_statsd_names_folded_total{sink=\"statsd\"}"
        ),
        7.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn an_http_outage_does_not_slow_mongo_and_the_backlog_drains_once_per_key() {
    let receiver = Receiver::start(Mode::Status(503)).await;
    let s = with_vendor(
        "outage503",
        &receiver.url,
        json!({"linger_ms": 20, "inline_attempts": 2, "breaker_failures": 3, "breaker_cooldown_ms": 500}),
    );
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let ids = post_mixed(&collector, "o", 40).await;

    // MongoDB takes everything while the vendor is down
    assert_eq!(wait_for_count(&s, doc! {}, 80, LAND).await, 80);
    assert!(receiver.received().is_empty());
    assert!(receiver.hits() > 0, "the sink never tried the vendor");
    assert!(
        eventually(LAND, || async { retry_depth(&s, "vendor").await > 0 }).await,
        "nothing waits in the retry path"
    );

    receiver.set_mode(Mode::Ok);
    assert!(
        eventually(Duration::from_secs(60), || async {
            receiver.receipts().len() == 80
        })
        .await,
        "the backlog did not drain"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let receipts = receiver.receipts();
    for id in &ids {
        let keys = receipts.get(id).expect("delivered");
        assert!(
            keys.iter().all(|k| k == &keys[0]),
            "{id} arrived under different keys: {keys:?}"
        );
    }
    assert_eq!(count(&s, doc! {}).await, 80);
    let dlq = format!("{}.sink.vendor.dlq", s.broker.prefix);
    assert_eq!(depth(s.broker.url.expose(), &dlq).await, 0);
}

#[tokio::test]
async fn a_hanging_http_sink_times_out_and_other_sinks_are_unaffected() {
    let receiver = Receiver::start(Mode::Hang).await;
    let s = with_vendor("hang", &receiver.url, quick());
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    post_mixed(&collector, "h", 20).await;
    assert_eq!(wait_for_count(&s, doc! {}, 40, LAND).await, 40);
    // the sink's calls timed out (500 ms) and its batches went to the retry path
    assert!(eventually(LAND, || async { retry_depth(&s, "vendor").await > 0 }).await);
    assert!(receiver.hits() > 0);
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn a_refusing_http_sink_dead_letters_with_the_error_and_nothing_else_is_affected() {
    let receiver = Receiver::start(Mode::Status(400)).await;
    let s = with_vendor("refuse400", &receiver.url, quick());
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let ids = post_mixed(&collector, "r", 10).await;
    assert_eq!(wait_for_count(&s, doc! {}, 20, LAND).await, 20);
    let dlq = format!("{}.sink.vendor.dlq", s.broker.prefix);
    let url = s.broker.url.expose().to_owned();
    assert!(eventually(LAND, || async { depth(&url, &dlq).await > 0 }).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = drain_with_headers(&url, &dlq).await;
    let mut dead_ids: Vec<String> = dead
        .iter()
        .flat_map(|(_, events)| {
            events
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["messageId"].as_str().unwrap().to_owned())
        })
        .collect();
    dead_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        dead_ids, expected,
        "every event refused by the vendor is in its DLQ, once"
    );
    for (headers, _) in &dead {
        assert!(headers[LAST_ERROR].contains("400"), "{headers:?}");
        assert_eq!(headers[SINK], "vendor");
    }
    assert_eq!(
        retry_depth(&s, "vendor").await,
        0,
        "a permanent error is not retried"
    );
    assert_eq!(
        depth(&url, &format!("{}.invalid", s.broker.prefix)).await,
        0
    );
    assert_eq!(
        depth(&url, &format!("{}.sink.mongo.dlq", s.broker.prefix)).await,
        0
    );
}

#[tokio::test]
async fn filters_route_only_the_configured_events_to_a_sink() {
    let receiver = Receiver::start(Mode::Ok).await;
    let s = with_vendor(
        "filter",
        &receiver.url,
        json!({"linger_ms": 20, "events": ["Order Completed"]}),
    );
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    post_mixed(&collector, "f", 10).await;
    assert_eq!(wait_for_count(&s, doc! {}, 20, LAND).await, 20);
    assert!(eventually(LAND, || async { receiver.receipts().len() == 10 }).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let receipts = receiver.receipts();
    assert_eq!(receipts.len(), 10);
    assert!(
        receipts.keys().all(|id| id.ends_with("-oc")),
        "{receipts:?}"
    );
}

#[tokio::test]
async fn a_worker_killed_while_events_sit_in_a_retry_path_loses_nothing() {
    let receiver = Receiver::start(Mode::Status(503)).await;
    let s = with_vendor("killretry", &receiver.url, quick());
    let collector = Collector::start(&s).await;
    let mut victim = Process::spawn("worker", &s);
    let ids = post_mixed(&collector, "k", 20).await;
    assert!(
        eventually(LAND, || async { retry_depth(&s, "vendor").await > 0 }).await,
        "nothing reached the retry path"
    );
    victim.kill9();

    receiver.set_mode(Mode::Ok);
    let _successor = Worker::start(&s);
    assert!(
        eventually(Duration::from_secs(60), || async {
            receiver.receipts().len() == 40
        })
        .await,
        "events lost from the retry path"
    );
    let receipts = receiver.receipts();
    for id in &ids {
        assert!(receipts.contains_key(id), "{id} missing");
    }
    assert_eq!(wait_for_count(&s, doc! {}, 40, LAND).await, 40);
}

#[tokio::test]
async fn a_sink_message_that_cannot_be_read_is_dead_lettered_with_its_bytes_not_dropped() {
    let s = settings("sinkgarbage");
    let _worker = Worker::start(&s);
    let url = s.broker.url.expose().to_owned();
    let queue = format!("{}.sink.mongo", s.broker.prefix);
    let dlq = format!("{}.sink.mongo.dlq", s.broker.prefix);
    // the worker declares the sink's queues when it connects
    assert!(eventually(LAND, || async { lapin_queue_exists(&url, &dlq).await }).await);
    publish_raw(&url, &queue, b"{not an array").await;
    assert!(eventually(LAND, || async { depth(&url, &dlq).await == 1 }).await);
    let dead = drain_raw_with_headers(&url, &dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, b"{not an array".to_vec());
    assert!(
        dead[0].0["x-last-error"].contains("undecodable"),
        "{:?}",
        dead[0].0
    );
    assert_eq!(depth(&url, &queue).await, 0);
}

#[tokio::test]
async fn an_event_the_driver_cannot_encode_is_invalid_and_never_holds_other_events_back() {
    let s = settings("nulkey");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let client = http();
    // A NUL byte is valid in a JSON key but cannot be written as a BSON key (a C string).
    let unencodable = json!({"type": "track", "event": "Odd Keys", "userId": "u-nul",
        "messageId": "nul-key", "properties": {"k\u{0}x": 1}});
    // Legal in MongoDB 5.0+ (and SecantusDB): nested `$…` and dotted keys are stored as sent.
    let nested = json!({"type": "track", "event": "Odd Keys", "userId": "u-nul",
        "messageId": "nested-keys", "properties": {"$x": 1, "a.b": 2}});
    for r in 0..10 {
        let mut events: Vec<Value> = (0..10)
            .map(|i| product_viewed(&format!("nul-{r}-{i}")))
            .collect();
        if r == 0 {
            // In the same delivery as good events, so in the same MongoDB batch.
            events.insert(5, unencodable.clone());
            events.insert(7, nested.clone());
        }
        let status = client
            .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
            .json(&batch(events))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    let good = doc! {"event": "Product Viewed"};
    assert_eq!(wait_for_count(&s, good, 100, LAND).await, 100);
    let stored = find(&s, doc! {"messageId": "nested-keys"}).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let properties = stored[0].get_document("properties").unwrap();
    assert!(properties.contains_key("$x") && properties.contains_key("a.b"));

    let url = s.broker.url.expose().to_owned();
    let invalid = format!("{}.invalid", s.broker.prefix);
    assert!(eventually(LAND, || async { depth(&url, &invalid).await == 1 }).await);
    let records = drain_json(&url, &invalid).await;
    assert_eq!(records[0]["reason"], json!("storage"));
    assert_eq!(records[0]["event"]["messageId"], json!("nul-key"));
    assert_eq!(count(&s, doc! {"messageId": "nul-key"}).await, 0);
    let dlq = format!("{}.sink.mongo.dlq", s.broker.prefix);
    assert_eq!(depth(&url, &dlq).await, 0);
    assert_eq!(retry_depth(&s, "mongo").await, 0);
}

/// The worker's `mongo_documents_total{outcome="…"}`, 0 until it is first counted.
async fn mongo_documents(worker: &Worker, outcome: &str) -> f64 {
    let text = metrics_of(&http(), &worker.url).await;
    metric_value(
        &text,
        &format!("mongo_documents_total{{outcome=\"{outcome}\"}}"),
    )
}

#[tokio::test]
async fn the_same_message_id_from_two_sources_is_two_events_and_each_is_stored_once() {
    let s = settings("twosources");
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    let post = |key: &'static str, event: Value| {
        let (client, url) = (client.clone(), format!("{}/v1/batch", collector.url));
        async move {
            let r = client
                .post_as(url, key)
                .json(&batch(vec![event]))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    post(IOS_KEY, order_completed("shared-id", 10.0)).await;
    post(WEB_KEY, order_completed("shared-id", 20.0)).await;
    // a client's retry of the same event
    post(IOS_KEY, order_completed("shared-id", 10.0)).await;

    let shared = doc! {"messageId": "shared-id"};
    assert_eq!(wait_for_count(&s, shared.clone(), 2, LAND).await, 2);
    // every copy has reached MongoDB: two stored, the retry found already stored
    assert!(
        eventually(LAND, || async {
            mongo_documents(&worker, "inserted").await + mongo_documents(&worker, "duplicate").await
                >= 3.0
        })
        .await
    );
    assert_eq!(mongo_documents(&worker, "duplicate").await, 1.0);
    let stored = find(&s, shared).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    for (source, total) in [("shop-ios", 10.0), ("shop-web", 20.0)] {
        let document = stored
            .iter()
            .find(|d| d.get_str("source") == Ok(source))
            .unwrap_or_else(|| panic!("no document from {source}: {stored:?}"));
        let properties = document.get_document("properties").unwrap();
        assert_eq!(properties.get_f64("total"), Ok(total));
        assert_eq!(
            document.get_document("_id").unwrap(),
            &doc! {"source": source, "messageId": "shared-id"}
        );
    }
}

#[tokio::test]
async fn an_earlier_releases_unique_message_id_index_is_dropped_so_a_second_source_is_not_a_duplicate(
) {
    let s = settings("oldindex");
    let collection = events(&s).await;
    let old = mongodb::IndexModel::builder()
        .keys(doc! {"messageId": 1})
        .options(
            mongodb::options::IndexOptions::builder()
                .unique(true)
                .name("messageId_unique".to_owned())
                .build(),
        )
        .build();
    collection.create_index(old).await.unwrap();
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    for key in [IOS_KEY, WEB_KEY] {
        let r = http()
            .post_as(format!("{}/v1/batch", collector.url), key)
            .json(&batch(vec![screen("upgraded")]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        wait_for_count(&s, doc! {"messageId": "upgraded"}, 2, LAND).await,
        2
    );
    let indexes = collection.list_index_names().await.unwrap();
    assert!(
        indexes.contains(&"source_messageId_unique".to_owned())
            && !indexes.contains(&"messageId_unique".to_owned()),
        "{indexes:?}"
    );
}

#[tokio::test]
async fn a_stalled_mongodb_makes_the_worker_unready_and_its_batch_a_retry_not_a_hang() {
    let upstream = mongo_uri()
        .trim_start_matches("mongodb://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = StallProxy::start(&upstream).await;
    let mut s = settings("mongostall");
    s.mongo.uri =
        ingest_pipeline::Secret::new(format!("mongodb://{}/?directConnection=true", proxy.addr));
    s.sinks.retry_delays_ms = vec![5000];
    s.sinks.max_attempts = 50;
    // The runner's own bound on a sink call is put out of the way: this is about MongoDB's.
    s.sinks.mongo = mongo_sink(json!({"linger_ms": 20, "inline_attempts": 1,
        "breaker_failures": 0, "timeout_ms": 3_600_000}));
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let post = |tag: &'static str| {
        let (client, url) = (http(), format!("{}/v1/batch", collector.url));
        async move {
            let events = (0..10).map(|i| screen(&format!("{tag}-{i}"))).collect();
            let r = client
                .post_as(url, IOS_KEY)
                .json(&batch(events))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    post("before").await;
    assert_eq!(wait_for_count(&s, doc! {}, 10, LAND).await, 10);
    let client = http();
    assert!(status_becomes(&client, format!("{}/readyz", worker.url), 200).await);

    proxy.stall();
    post("stalled").await;
    assert!(
        status_becomes(&client, format!("{}/readyz", worker.url), 503).await,
        "/readyz stays 200 while MongoDB does not answer"
    );
    assert!(
        eventually(Duration::from_secs(60), || async {
            retry_depth(&s, "mongo").await > 0
        })
        .await,
        "the batch hangs in the sink instead of waiting in the retry path"
    );

    proxy.resume();
    assert_eq!(
        wait_for_count(&s, doc! {}, 20, Duration::from_secs(60)).await,
        20
    );
    assert!(status_becomes(&client, format!("{}/readyz", worker.url), 200).await);
    let dlq = format!("{}.sink.mongo.dlq", s.broker.prefix);
    assert_eq!(depth(s.broker.url.expose(), &dlq).await, 0);
}
