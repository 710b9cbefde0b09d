//! Quotas that overflow instead of dropping (issue #25): a user past their source's per-user
//! quota goes to the overflow lane while another user of the same source stays on the raw
//! queue; nothing is lost once a worker drains the lane; past the ceiling, 429.

use std::time::{Duration, Instant};

use ingest_e2e::*;
use ingest_pipeline::settings::SourcePolicyChanges;
use ingest_pipeline::Topology;
use mongodb::bson::doc;
use serde_json::{json, Value};

const LAND: Duration = Duration::from_secs(60);

fn track(user: &str, id: &str) -> Value {
    json!({"type": "track", "event": "Product Viewed", "userId": user, "messageId": id,
        "properties": {"product_id": "p-1", "price": 5}})
}

/// One user sends 50 times the per-user quota (10 events/s) for 4 s while another user of the
/// same source sends 4 events/s. The worker consuming here leaves the overflow lane alone
/// (`overflow_prefetch = 0`), so what overflowed stays visible there: every one of the calm
/// user's events lands while the flood's overflow waits; then a worker that drains the lane
/// lands the rest, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sending_fifty_times_the_quota_overflows_while_another_user_lands() {
    let mut s = settings("quota");
    s.policy.sources.insert(
        "shop-ios".into(),
        SourcePolicyChanges {
            user_events_per_second: Some(10.0),
            burst_seconds: Some(1.0),
            ..SourcePolicyChanges::default()
        },
    );
    s.validate().unwrap();
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let mut live_only = s.clone();
    live_only.worker.overflow_prefetch = 0;
    let worker = Worker::start(&live_only);
    let collector = Collector::start(&s).await;
    let client = http();

    const SECONDS: u64 = 4;
    // 50 x 10 events/s: 20 requests a second of 25 events.
    let flood = {
        let (client, base) = (client.clone(), collector.url.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for r in 0..20 * SECONDS {
                let batch: Vec<Value> = (0..25)
                    .map(|i| {
                        let id = format!("flood-{r}-{i}");
                        ids.push(id.clone());
                        track("flood", &id)
                    })
                    .collect();
                let response = post_batch(&client, &base, &json!({"batch": batch})).await;
                assert_eq!(response.status(), 200);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ids
        })
    };
    let mut calm = Vec::new();
    let mut sent_at = Vec::new();
    for i in 0..4 * SECONDS {
        let id = format!("calm-{i}");
        let response = post_batch(
            &client,
            &collector.url,
            &json!({"batch": [track("calm", &id)]}),
        )
        .await;
        assert_eq!(response.status(), 200);
        calm.push(id);
        sent_at.push(Instant::now());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let flood = flood.await.unwrap();

    // Every calm event lands while no worker drains the overflow lane: none of them overflowed.
    let calm_n = calm.len() as u64;
    assert_eq!(
        wait_for_count(&s, doc! {"userId": "calm"}, calm_n, LAND).await,
        calm_n
    );
    let landed = Instant::now();
    let metrics = metrics_of(&client, &collector.url).await;
    let overflowed = metric_value(
        &metrics,
        r#"collector_overflowed_events_total{source="shop-ios",reason="user"}"#,
    ) as u64;
    let flood_n = flood.len() as u64;
    assert!(
        overflowed >= flood_n * 8 / 10,
        "{overflowed} of {flood_n} flood events overflowed"
    );
    let live_flood = flood_n - overflowed;
    assert_eq!(
        wait_for_count(&s, doc! {"userId": "flood"}, live_flood, LAND).await,
        live_flood,
        "the flood's events within the quota land from the raw queue"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&s, doc! {"userId": "flood"}).await, live_flood);
    eprintln!(
        "calm user: {calm_n} events all landed {:?} after the last was sent; flood: {live_flood} live, {overflowed} overflowed",
        landed - sent_at[sent_at.len() - 1]
    );

    // The lane is there for operators: `queues` lists it, `check` pages on it.
    let overflow = topology.overflow();
    let requests = depth(&url, &overflow).await;
    assert_eq!(u64::from(requests) * 25, overflowed);
    let (status, out) = ingestctl_async(&s, &["queues", "--json"]).await;
    assert_eq!(status, 0, "{out}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    let lane = listed
        .iter()
        .find(|q| q["name"] == overflow.as_str())
        .unwrap_or_else(|| panic!("{overflow} is not listed: {out}"));
    assert_eq!(lane["depth"], json!(requests));
    let (status, out) = ingestctl_async(
        &s,
        &["check", "--queue", "overflow", "-w", "0", "-c", "1000000"],
    )
    .await;
    assert_eq!(status, 1, "WARNING while the lane holds requests: {out}");
    assert!(out.starts_with("QUEUE WARNING"), "{out}");

    // A worker that drains the lane: everything lands, once.
    let drainer = Worker::start(&s);
    assert_eq!(
        wait_for_count(&s, doc! {"userId": "flood"}, flood_n, LAND).await,
        flood_n
    );
    assert!(eventually(LAND, || async { depth(&url, &overflow).await == 0 }).await);
    let (status, out) = ingestctl_async(
        &s,
        &["check", "--queue", "overflow", "-w", "0", "-c", "1000000"],
    )
    .await;
    assert_eq!(status, 0, "{out}");
    let drained = metrics_of(&client, &drainer.url).await;
    assert_eq!(
        metric_value(&drained, "worker_overflow_events_total") as u64,
        overflowed
    );
    assert_eq!(count(&s, doc! {}).await, flood_n + calm_n);
    collector.stop().await;
    drainer.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn past_its_ceiling_a_source_gets_429_with_retry_after_and_another_source_does_not() {
    let mut s = settings("ceiling");
    s.policy.sources.insert(
        "shop-web".into(),
        SourcePolicyChanges {
            max_events_per_second: Some(5.0),
            burst_seconds: Some(1.0),
            ..SourcePolicyChanges::default()
        },
    );
    s.validate().unwrap();
    let collector = Collector::start(&s).await;
    let client = http();
    let post = |key: &'static str, prefix: &'static str| {
        let (client, base) = (client.clone(), collector.url.clone());
        async move {
            let batch: Vec<Value> = (0..5)
                .map(|i| track("u", &format!("{prefix}-{i}")))
                .collect();
            client
                .post_as(format!("{base}/v1/batch"), key)
                .json(&json!({ "batch": batch }))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(post(WEB_KEY, "first").await.status(), 200);
    let refused = post(WEB_KEY, "second").await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], json!("over_event_ceiling"), "{body}");
    assert_eq!(post(IOS_KEY, "other").await.status(), 200);
    collector.stop().await;
}
