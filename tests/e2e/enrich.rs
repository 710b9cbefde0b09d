//! Enrichment and privacy at ingest (issue #25): user agents parsed, bots flagged, addresses
//! located then cut, and a source's field rules applied before MongoDB, the invalid queue and
//! a sink's dead-letter queue keep anything; another source's events keep what they sent.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use ingest_e2e::*;
use ingest_pipeline::settings::{FieldAction, FieldRule, IpPolicy, SourcePolicyChanges};
use ingest_pipeline::{Secret, Settings, Topology};
use mongodb::bson::doc;
use serde_json::{json, Value};

const LAND: Duration = Duration::from_secs(30);
const SECRET: &str = "e2e-hash-secret-0123456789";
const EMAIL: &str = "ann@example.com";

const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const HEADLESS: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 Safari/537.36";
const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
const ANDROID_APP: &str = "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/UQ1A.240105.004)";

/// What a `hash` rule makes of `value`, computed here from the rule's definition: HMAC-SHA256
/// of the value's JSON with the secret, its first 16 bytes in hex.
fn expected_hash(value: &Value) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(value.to_string().as_bytes());
    format!("hmac:{}", hex::encode(&mac.finalize().into_bytes()[..16]))
}

fn enriched_settings(name: &str, vendor: &str) -> Settings {
    let mut s = settings(name);
    s.enrich.geo_database = Some(root().join("tests/fixtures/geo-test.mmdb"));
    s.enrich.hash_secret = Secret::new(SECRET);
    s.policy.sources.insert(
        "shop-web".into(),
        SourcePolicyChanges {
            ip: Some(IpPolicy::Truncate),
            fields: vec![FieldRule {
                path: "traits.email".into(),
                action: FieldAction::Hash,
            }],
            ..SourcePolicyChanges::default()
        },
    );
    // A vendor that refuses every batch: each event ends in its dead-letter queue.
    s.sinks.http = vec![http_sink(json!({
        "name": "vendor", "url": vendor, "request_timeout_ms": 2000,
        "delivery": {"linger_ms": 20, "inline_attempts": 1, "breaker_failures": 0}
    }))];
    s.sinks.max_attempts = 1;
    s.validate().unwrap();
    s.validate_worker().unwrap();
    s
}

fn event(id: &str, agent: &str) -> Value {
    json!({"type": "identify", "userId": "ann", "messageId": id,
        "traits": {"email": EMAIL, "plan": "plus"},
        "context": {"userAgent": agent, "ip": "203.0.113.9"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_agents_bots_and_places_land_and_a_sources_rules_reach_every_store() {
    let vendor = Receiver::start(Mode::Status(400)).await;
    let s = enriched_settings("enrich", &vendor.url);
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let worker = Worker::start(&s);
    let collector = Collector::start(&s).await;
    let client = http();

    let web = json!({"batch": [
        event("bot", GOOGLEBOT),
        event("headless", HEADLESS),
        event("iphone", IPHONE),
        event("android", ANDROID_APP),
        // Invalid (a track without its name): kept in the invalid queue, rules applied.
        {"type": "track", "userId": "ann", "messageId": "invalid",
         "traits": {"email": EMAIL}, "context": {"ip": "203.0.113.9"}},
    ]});
    let ios = json!({"batch": [event("ios-own", IPHONE)]});
    for (key, body) in [(WEB_KEY, &web), (IOS_KEY, &ios)] {
        let response = client
            .post_as(format!("{}/v1/batch", collector.url), key)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(wait_for_count(&s, doc! {}, 5, LAND).await, 5);
    let stored = |id: &'static str| {
        let s = s.clone();
        async move {
            let found = find(&s, doc! {"messageId": id}).await;
            serde_json::to_value(&found[0]).unwrap()
        }
    };
    let hashed = expected_hash(&json!(EMAIL));

    let bot = stored("bot").await;
    assert_eq!(
        bot["context"]["bot"],
        json!({"name": "Googlebot", "category": "crawler"})
    );
    assert_eq!(
        bot["context"]["userAgentParsed"]["deviceType"],
        json!("bot")
    );
    let headless = stored("headless").await;
    assert_eq!(
        headless["context"]["bot"],
        json!({"name": "HeadlessChrome", "category": "automation"})
    );
    let iphone = stored("iphone").await;
    assert_eq!(
        iphone["context"]["userAgentParsed"],
        json!({"browser": "Safari", "browserVersion": "17.1", "os": "iPhone", "osVersion": "17.1", "deviceType": "mobile"})
    );
    assert!(iphone["context"].get("bot").is_none());
    let android = stored("android").await;
    assert_eq!(
        android["context"]["userAgentParsed"],
        json!({"os": "Android", "osVersion": "14", "deviceType": "mobile"})
    );
    for event in [&bot, &headless, &iphone, &android] {
        assert_eq!(
            event["context"]["geo"],
            json!({"country": "DE", "countryName": "Germany", "city": "Berlin"})
        );
        assert_eq!(event["context"]["ip"], json!("203.0.113.0"));
        assert_eq!(event["traits"]["email"], json!(hashed));
        assert_eq!(event["traits"]["plan"], json!("plus"));
    }
    // Another source, no rules: its event keeps what it sent, and is located all the same.
    let own = stored("ios-own").await;
    assert_eq!(own["traits"]["email"], json!(EMAIL));
    assert_eq!(own["context"]["ip"], json!("203.0.113.9"));
    assert_eq!(own["context"]["geo"]["city"], json!("Berlin"));

    // The invalid queue: the record's event went through the same rules.
    let invalid = topology.invalid();
    assert!(eventually(LAND, || async { depth(&url, &invalid).await >= 1 }).await);
    let records = drain_json(&url, &invalid).await;
    let record = records
        .iter()
        .find(|r| r["event"]["messageId"] == json!("invalid"))
        .expect("the invalid event's record");
    assert_eq!(record["event"]["traits"]["email"], json!(hashed));
    assert_eq!(record["event"]["context"]["ip"], json!("203.0.113.0"));
    assert!(!record.to_string().contains(EMAIL));

    // The vendor refused every event: each is in its dead-letter queue, as the rules left it.
    let dlq = topology.sink_dlq("vendor");
    let mut dead: Vec<Value> = Vec::new();
    let deadline = std::time::Instant::now() + LAND;
    while dead.len() < 5 && std::time::Instant::now() < deadline {
        if depth(&url, &dlq).await > 0 {
            for (_, body) in drain_raw_with_headers(&url, &dlq).await {
                let text = gunzip_if_gzip(&body).unwrap();
                let events: Value = serde_json::from_slice(&text).unwrap();
                dead.extend(events.as_array().cloned().unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_dead = dead.len() == 5;
    assert!(all_dead, "{} events in {dlq}: {dead:?}", dead.len());
    let web_dead: Vec<&Value> = dead
        .iter()
        .filter(|e| e["source"] == json!("shop-web"))
        .collect();
    assert_eq!(web_dead.len(), 4, "{dead:?}");
    for event in web_dead {
        assert_eq!(event["traits"]["email"], json!(hashed));
        assert_eq!(event["context"]["ip"], json!("203.0.113.0"));
    }

    let metrics = metrics_of(&client, &worker.url).await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"worker_bot_events_total{source="shop-web",category="crawler",action="flagged"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"worker_privacy_rules_applied_total{source="shop-web",action="hash"}"#
        ),
        5.0
    );
    assert_eq!(
        metric_value(&metrics, r#"worker_geo_lookups_total{result="found"}"#),
        6.0
    );
    collector.stop().await;
    worker.stop().await;
}

/// A request from the archive, as `ingestctl replay` sends it to the replay lane, goes through
/// its source's rules like a new one.
#[tokio::test]
async fn a_replayed_request_goes_through_its_sources_rules() {
    let vendor = Receiver::start(Mode::Ok).await;
    let s = enriched_settings("enrichreplay", &vendor.url);
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let properties = ingest_loadgen::amqp::collector_properties("shop-web", false);
    let body = json!({"batch": [event("replayed", IPHONE)]});
    let sinks = ["mongo".to_owned()];
    publish_replayed(
        &url,
        &topology,
        body.to_string().as_bytes(),
        properties,
        &sinks,
    )
    .await;
    let worker = Worker::start(&s);
    assert_eq!(
        wait_for_count(&s, doc! {"messageId": "replayed"}, 1, LAND).await,
        1
    );
    let stored = serde_json::to_value(&find(&s, doc! {"messageId": "replayed"}).await[0]).unwrap();
    assert_eq!(
        stored["traits"]["email"],
        json!(expected_hash(&json!(EMAIL)))
    );
    assert_eq!(stored["context"]["ip"], json!("203.0.113.0"));
    assert_eq!(stored["context"]["userAgentParsed"]["os"], json!("iPhone"));
    worker.stop().await;
}
