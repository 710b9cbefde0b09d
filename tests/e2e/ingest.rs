//! The durable ingest path: what gets in, what is refused, where each event ends.

use std::time::Duration;

use ingest_e2e::*;
use mongodb::bson::doc;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fixtures::*;

const LAND: Duration = Duration::from_secs(30);

#[tokio::test]
async fn batch_with_basic_auth_lands_in_mongo_with_enrichment() {
    let s = settings("basic");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let body = batch(vec![
        product_viewed("pv-1"),
        order_completed("oc-1", 89.9),
        screen("sc-1"),
    ]);
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .header("user-agent", "Shop/4.2.0 CFNetwork")
        .header("x-forwarded-for", "198.51.100.7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"success": true})
    );

    assert_eq!(wait_for_count(&s, doc! {}, 3, LAND).await, 3);
    let docs = find(&s, doc! {"messageId": "oc-1"}).await;
    assert_eq!(docs.len(), 1);
    let d = &docs[0];
    assert_eq!(d.get_str("source").unwrap(), "shop-ios");
    assert!(d.get_datetime("receivedAt").is_ok());
    // timestamp corrected for skew: receivedAt - (sentAt - originalTimestamp) = receivedAt - 5 s
    let received = d.get_datetime("receivedAt").unwrap().timestamp_millis();
    let corrected = d.get_datetime("timestamp").unwrap().timestamp_millis();
    assert_eq!(received - corrected, 5_000);
    assert!(d.get_datetime("originalTimestamp").is_ok());
    let context = d.get_document("context").unwrap();
    // the peer is not a trusted proxy, so X-Forwarded-For is ignored
    assert_eq!(context.get_str("ip").unwrap(), "127.0.0.1");
    assert_eq!(
        context.get_str("userAgent").unwrap(),
        "Shop/4.2.0 CFNetwork"
    );
    // batch-level context reached every event
    assert_eq!(
        context
            .get_document("library")
            .unwrap()
            .get_str("name")
            .unwrap(),
        "analytics-ios"
    );
    assert!(!d.contains_key("writeKey"));
    assert_eq!(
        depth(
            s.broker.url.expose(),
            &format!("{}.invalid", s.broker.prefix)
        )
        .await,
        0
    );
}

#[tokio::test]
async fn send_beacon_text_plain_with_write_key_in_body_lands() {
    let s = settings("beacon");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let mut event = product_viewed("beacon-1");
    event["writeKey"] = json!(WEB_KEY);
    let r = http()
        .post(format!("{}/v1/track", collector.url))
        .header("content-type", "text/plain;charset=UTF-8")
        .header("origin", "https://shop.example")
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The page's own origin, with credentials: sendBeacon always sends them (issue #20).
    assert_eq!(
        r.headers().get("access-control-allow-origin").unwrap(),
        "https://shop.example"
    );
    assert_eq!(
        r.headers().get("access-control-allow-credentials").unwrap(),
        "true"
    );
    assert_eq!(
        wait_for_count(&s, doc! {"messageId": "beacon-1"}, 1, LAND).await,
        1
    );
    let d = &find(&s, doc! {"messageId": "beacon-1"}).await[0];
    assert_eq!(d.get_str("source").unwrap(), "shop-web");
    assert_eq!(d.get_str("type").unwrap(), "track");
    assert!(
        !d.contains_key("writeKey"),
        "the write key must never be stored"
    );
}

#[tokio::test]
async fn gzip_body_lands() {
    let s = settings("gzip");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let ids = ids("gz", 40);
    let body = batch(ids.iter().map(|id| product_viewed(id)).collect());
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(body.to_string().as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(wait_for_count(&s, doc! {}, 40, LAND).await, 40);
}

#[tokio::test]
async fn cors_preflight_is_answered_for_allowed_origins_only() {
    let mut s = settings("cors");
    s.collector.cors_allowed_origins = vec!["https://shop.example".into()];
    let collector = Collector::start(&s).await;
    let preflight = |origin: &'static str| {
        http()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/batch", collector.url),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
    };
    let ok = preflight("https://shop.example").await.unwrap();
    assert!(ok.status().is_success());
    assert_eq!(
        ok.headers().get("access-control-allow-origin").unwrap(),
        "https://shop.example"
    );
    // Credentials are allowed (sendBeacon sends them; the collector reads no cookie).
    assert_eq!(
        ok.headers()
            .get("access-control-allow-credentials")
            .unwrap(),
        "true"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn refusals_are_401_413_400_with_json_errors_and_publish_nothing() {
    let s = settings("refuse");
    let collector = Collector::start(&s).await;
    let url = format!("{}/v1/batch", collector.url);
    let good = batch(vec![product_viewed("r-1")]).to_string();

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (http().post(&url).body(good.clone()), 401, "missing_write_key"),
        (http().post_as(&url, "wrong-key").body(good.clone()), 401, "unknown_write_key"),
        (
            http().post(&url).body(json!({"writeKey": "nope", "batch": []}).to_string()),
            401,
            "unknown_write_key",
        ),
        (
            http().post_as(&url, IOS_KEY).body(format!(
                r#"{{"batch":[{{"type":"track","event":"Big","userId":"u","properties":{{"blob":"{}"}}}}]}}"#,
                "x".repeat(40_000)
            )),
            413,
            "event_too_large",
        ),
        (
            http().post_as(&url, IOS_KEY).body("x".repeat(600_000)),
            413,
            "batch_too_large",
        ),
        (
            http().post_as(&url, IOS_KEY).body(r#"{"batch":[{"type":"track""#),
            400,
            "malformed_json",
        ),
        (
            http().post_as(&url, IOS_KEY).body(vec![b'{', b'"', 0xff, b'"', b':', b'1', b'}']),
            400,
            "malformed_json",
        ),
        (
            http()
                .post_as(&url, IOS_KEY)
                .header("content-encoding", "gzip")
                .body("definitely not gzip"),
            400,
            "bad_gzip",
        ),
    ];
    for (request, status, code) in cases {
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "expected {code}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["success"], json!(false));
        assert_eq!(body["code"], json!(code));
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let raw = format!("{}.raw", s.broker.prefix);
    assert_eq!(
        depth(s.broker.url.expose(), &raw).await,
        0,
        "a refused request was published"
    );
    // and the same collector still accepts a good one
    let r = http()
        .post_as(&url, IOS_KEY)
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            depth(s.broker.url.expose(), &raw).await == 1
        })
        .await
    );
}

#[tokio::test]
async fn invalid_event_goes_to_the_invalid_queue_while_its_siblings_land() {
    let s = settings("invalid");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let mut bad = order_completed("bad-1", -5.0);
    bad["properties"]["products"][0]
        .as_object_mut()
        .unwrap()
        .remove("product_id");
    let body = batch(vec![product_viewed("ok-1"), bad, screen("ok-2")]);
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The worker does not trust the queue: a payload the collector would have refused
    // (published straight to the raw queue) ends in the invalid queue too, with its bytes.
    publish_raw(
        s.broker.url.expose(),
        &format!("{}.raw", s.broker.prefix),
        b"{\"batch\": [\"not an event\"]}",
    )
    .await;
    publish_raw(
        s.broker.url.expose(),
        &format!("{}.raw", s.broker.prefix),
        b"\x1f\x8bnot json",
    )
    .await;
    assert_eq!(wait_for_count(&s, doc! {}, 2, LAND).await, 2);
    let invalid_queue = format!("{}.invalid", s.broker.prefix);
    assert!(
        eventually(LAND, || async {
            depth(s.broker.url.expose(), &invalid_queue).await == 3
        })
        .await
    );
    let records = drain_json(s.broker.url.expose(), &invalid_queue).await;
    let schema_record = records
        .iter()
        .find(|r| r["event"]["messageId"] == json!("bad-1"))
        .expect("the invalid order is in the invalid queue");
    assert_eq!(schema_record["reason"], json!("schema"));
    assert_eq!(schema_record["source"], json!("shop-ios"));
    let pointers: Vec<&str> = schema_record["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert!(pointers.contains(&"/properties/total"), "{pointers:?}");
    assert!(pointers.contains(&"/properties/products/0"), "{pointers:?}");
    assert!(records
        .iter()
        .any(|r| r["event"] == json!("not an event") && r["reason"] == json!("schema")));
    let undecodable = records
        .iter()
        .find(|r| r["reason"] == json!("decode"))
        .expect("decode record");
    assert!(undecodable["rawBase64"]
        .as_str()
        .is_some_and(|b| !b.is_empty()));
    assert!(undecodable["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    assert_eq!(count(&s, doc! {"messageId": "bad-1"}).await, 0);
}

#[tokio::test]
async fn the_same_message_id_posted_twice_is_stored_once() {
    let s = settings("dedupe");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    for _ in 0..2 {
        let r = http()
            .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
            .json(&batch(vec![
                product_viewed("twice-1"),
                product_viewed("once-2"),
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let raw = format!("{}.raw", s.broker.prefix);
    // both deliveries consumed and acked, then exactly one document per messageId
    assert!(
        eventually(LAND, || async {
            depth(s.broker.url.expose(), &raw).await == 0
        })
        .await
    );
    assert_eq!(wait_for_count(&s, doc! {}, 2, LAND).await, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&s, doc! {"messageId": "twice-1"}).await, 1);
    assert_eq!(count(&s, doc! {}).await, 2);
}

#[tokio::test]
async fn a_client_that_vanishes_mid_body_causes_nothing_to_be_published() {
    let s = settings("vanish");
    let collector = Collector::start(&s).await;
    let addr = collector.url.trim_start_matches("http://").to_owned();
    let body = batch(vec![product_viewed("v-1")]).to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let auth = "dGVzdC1pb3Mtd3JpdGUta2V5Og=="; // base64("test-ios-write-key:")
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .unwrap();
    drop(stream);

    // the same bytes sent whole are published: the check below can see a publish
    let mut whole = tokio::net::TcpStream::connect(&addr).await.unwrap();
    whole.write_all(head.as_bytes()).await.unwrap();
    whole.write_all(body.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 12];
    whole.read_exact(&mut response).await.unwrap();
    assert_eq!(&response, b"HTTP/1.1 200");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        depth(s.broker.url.expose(), &format!("{}.raw", s.broker.prefix)).await,
        1
    );
}

#[tokio::test]
async fn an_event_with_a_reserved_key_is_kept_as_invalid_not_lost_or_mistaken_for_a_duplicate() {
    let s = settings("reserved");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    // Two events sharing a client `_id`: were `_id` stored as sent, the second would look like a
    // duplicate of the first and vanish.
    let mut first = product_viewed("res-1");
    first["_id"] = json!("same");
    let mut second = product_viewed("res-2");
    second["_id"] = json!("same");
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .json(&batch(vec![first, second, product_viewed("res-ok")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(wait_for_count(&s, doc! {}, 1, LAND).await, 1);
    let invalid_queue = format!("{}.invalid", s.broker.prefix);
    assert!(
        eventually(LAND, || async {
            depth(s.broker.url.expose(), &invalid_queue).await == 2
        })
        .await
    );
    let records = drain_json(s.broker.url.expose(), &invalid_queue).await;
    for id in ["res-1", "res-2"] {
        let record = records
            .iter()
            .find(|r| r["event"]["messageId"] == json!(id))
            .expect("kept");
        assert_eq!(record["reason"], json!("storage"));
        assert!(record["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("reserved"));
    }
    assert_eq!(count(&s, doc! {"messageId": "res-ok"}).await, 1);
}

#[tokio::test]
async fn past_the_in_flight_bound_the_collector_answers_503_with_retry_after_at_once() {
    let mut s = settings("inflight");
    s.collector.max_in_flight = 1;
    let collector = Collector::start(&s).await;
    let addr = collector.url.trim_start_matches("http://").to_owned();
    // A slow client holds the only slot: headers sent, body still coming.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic dGVzdC1pb3Mtd3JpdGUta2V5Og==\r\nContent-Length: 500\r\n\r\n{{"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .json(&batch(vec![product_viewed("busy-1")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "2");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], json!("overloaded"));

    drop(slow);
    assert!(
        eventually(Duration::from_secs(5), || async {
            http()
                .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
                .json(&batch(vec![product_viewed("busy-2")]))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await,
        "the slot was not released when the slow client went away"
    );
}

#[tokio::test]
async fn a_source_over_its_rate_gets_429_with_retry_after_and_other_sources_do_not() {
    let mut s = settings("ratelimit");
    s.collector.rate_limit_per_second = 0.5;
    s.collector.rate_limit_burst = 2.0;
    let collector = Collector::start(&s).await;
    let post = |key: &'static str, id: &'static str| {
        http()
            .post_as(format!("{}/v1/batch", collector.url), key)
            .json(&batch(vec![product_viewed(id)]))
            .send()
    };
    assert_eq!(post(IOS_KEY, "rl-1").await.unwrap().status(), 200);
    assert_eq!(post(IOS_KEY, "rl-2").await.unwrap().status(), 200);
    let limited = post(IOS_KEY, "rl-3").await.unwrap();
    assert_eq!(limited.status(), 429);
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&wait), "Retry-After {wait}");
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["code"], json!("rate_limited"));
    // another app is not affected
    assert_eq!(post(WEB_KEY, "rl-web").await.unwrap().status(), 200);
    // nothing refused was published
    assert!(
        eventually(Duration::from_secs(5), || async {
            depth(s.broker.url.expose(), &format!("{}.raw", s.broker.prefix)).await == 3
        })
        .await
    );
}

/// Segment-style SDKs drop a batch answered 413 or 400: one event over the limit, or one that
/// is not an object, must not cost its neighbours. They are stored; the refused ones are kept
/// in the invalid queue, and the 200 says which and why. `collector.partial_batches = false`
/// refuses the whole batch as before, and a batch of nothing but refused events is refused.
#[tokio::test]
async fn a_batch_with_a_too_large_and_a_non_object_event_stores_the_rest_and_names_them() {
    let s = settings("partial");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let mut big = product_viewed("pe-big");
    big["properties"]["blob"] = json!("x".repeat(40_000));
    let mut bad_type = product_viewed("pe-bad-type");
    bad_type["type"] = json!("Track");
    let mut bad_id = product_viewed("pe-bad-id");
    bad_id["messageId"] = json!(42);
    let body = json!({"batch": [product_viewed("pe-1"), big, 7, screen("pe-2"), bad_type, bad_id]});
    let url = format!("{}/v1/batch", collector.url);
    let post = |body: serde_json::Value| http().post_as(url.clone(), IOS_KEY).json(&body).send();
    let r = post(body).await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["success"], true);
    let refused: Vec<(u64, &str)> = answer["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        refused,
        vec![
            (1, "event_too_large"),
            (2, "not_an_object"),
            (4, "bad_type"),
            (5, "bad_message_id")
        ]
    );
    assert!(answer["refused"][0]["message"]
        .as_str()
        .unwrap()
        .contains("32768"));

    let filter = doc! {"messageId": {"$in": ["pe-1", "pe-2", "pe-big", "pe-bad-type"]}};
    assert_eq!(wait_for_count(&s, filter.clone(), 2, LAND).await, 2);
    let invalid = format!("{}.invalid", s.broker.prefix);
    let amqp = s.broker.url.expose().to_owned();
    assert!(eventually(LAND, || async { depth(&amqp, &invalid).await >= 4 }).await);
    let mut records = drain_json(&amqp, &invalid).await;
    records.sort_by_key(|r| r["reason"].as_str().unwrap_or_default().to_owned());
    assert_eq!(records.len(), 4, "{records:?}");
    // The worker finds the events refused for their shape or type by itself.
    let schema: Vec<&serde_json::Value> = records[..3].iter().map(|r| &r["event"]).collect();
    assert!(
        records[..3].iter().all(|r| r["reason"] == "schema"),
        "{records:?}"
    );
    assert!(schema.contains(&&json!(7)), "{schema:?}");
    assert!(schema.iter().any(|e| e["type"] == "Track"), "{schema:?}");
    assert!(schema.iter().any(|e| e["messageId"] == 42), "{schema:?}");
    assert_eq!(records[3]["reason"], "too_large");
    let kept = records[3]["event"].as_str().expect("the cut JSON");
    assert!(kept.len() < 2_000 && kept.contains("pe-big"), "{kept}");
    assert!(records[3]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("bytes as sent"));
    // Only the two good events are stored.
    assert_eq!(count(&s, filter).await, 2);

    // Nothing but refused events: refused whole, as before.
    let mut big = product_viewed("pe-big-2");
    big["properties"]["blob"] = json!("x".repeat(40_000));
    let r = post(json!({"batch": [big.clone(), 8]})).await.unwrap();
    assert_eq!(r.status(), 413);
    let mut whole = settings("partial-off");
    whole.collector.partial_batches = false;
    let strict = Collector::start(&whole).await;
    let r = http()
        .post_as(format!("{}/v1/batch", strict.url), IOS_KEY)
        .json(&json!({"batch": [product_viewed("pe-3"), big]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let raw = format!("{}.raw", whole.broker.prefix);
    assert_eq!(depth(whole.broker.url.expose(), &raw).await, 0);
}
