//! The worker under deliveries that fail, loop or find the broker changed under it (issue 10):
//! every consumed queue ends a poison loop in a dead-letter queue ops can see, a publish the
//! broker holds back is never sent twice, a deleted queue is declared again, and a hostile
//! attempt count ends in the dead-letter queue instead of a panic.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use ingest_e2e::*;
use ingest_pipeline::headers::{ATTEMPT, BATCH_KEY};
use ingest_pipeline::Topology;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(30);
/// The most deliveries a message may get before it is dead-lettered; the setting's default
/// is below it.
const MOST_DELIVERIES: u32 = 25;

/// Plays a worker that fails every delivery of `queue` (nack, requeue) until the queue is
/// empty; returns how many deliveries it saw.
async fn fail_every_delivery(url: &str, queue: &str) -> u32 {
    let (conn, ch) = channel(url).await;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "poisoned".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                deliveries += 1;
                assert!(
                    deliveries <= 10 * MOST_DELIVERIES,
                    "{queue}: the delivery loops ({deliveries} deliveries)"
                );
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .unwrap();
            }
            Ok(other) => panic!("consumer ended: {other:?}"),
            Err(_) => break,
        }
    }
    let _ = conn.close(200, "".into()).await;
    deliveries
}

/// The dead-lettered messages of `queue`, each with RabbitMQ's `x-first-death-reason`.
async fn death_reasons(url: &str, queue: &str) -> Vec<String> {
    drain_with_headers(url, queue)
        .await
        .into_iter()
        .map(|(headers, _)| {
            headers
                .get("x-first-death-reason")
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn a_raw_delivery_that_keeps_failing_ends_in_the_raw_dlq_after_the_delivery_limit() {
    let s = settings("rawpoison");
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let (conn, _ch) = channel(&url).await;
    topology.declare(&conn).await.unwrap();
    let _ = conn.close(200, "".into()).await;
    publish_raw(&url, &topology.raw(), br#"{"batch":[]}"#).await;

    let deliveries = fail_every_delivery(&url, &topology.raw()).await;
    assert!(
        (1..=MOST_DELIVERIES).contains(&deliveries),
        "{deliveries} deliveries"
    );
    let dlq = format!("{}.raw.dlq", s.broker.prefix);
    assert!(
        eventually(PATIENCE, || async { depth(&url, &dlq).await == 1 }).await,
        "the poison message is not in {dlq}"
    );
    assert_eq!(death_reasons(&url, &dlq).await, vec!["delivery_limit"]);
    assert_eq!(depth(&url, &topology.raw()).await, 0);
}

#[tokio::test]
async fn a_sink_message_that_keeps_failing_ends_in_the_sinks_dlq_after_the_delivery_limit() {
    let s = settings("sinkpoison");
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let (conn, _ch) = channel(&url).await;
    topology
        .declare_sinks(&conn, &["vendor".to_owned()], &s.sinks.retry_delays())
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;
    let queue = topology.sink_queue("vendor");
    publish_raw(&url, &queue, b"[]").await;

    let deliveries = fail_every_delivery(&url, &queue).await;
    assert!(
        (1..=MOST_DELIVERIES).contains(&deliveries),
        "{deliveries} deliveries"
    );
    let dlq = topology.sink_dlq("vendor");
    assert!(
        eventually(PATIENCE, || async { depth(&url, &dlq).await == 1 }).await,
        "the poison message is not in {dlq}"
    );
    assert_eq!(death_reasons(&url, &dlq).await, vec!["delivery_limit"]);
}

#[tokio::test]
async fn a_deleted_invalid_queue_is_declared_again_and_invalid_events_still_land_there() {
    let s = settings("invaliddel");
    let url = amqp_url();
    let worker = Worker::start(&s);
    let client = http();
    assert!(status_becomes(&client, format!("{}/readyz", worker.url), 200).await);
    let invalid = format!("{}.invalid", s.broker.prefix);
    let raw = format!("{}.raw", s.broker.prefix);
    assert!(delete_queue(&url, &invalid).await);

    // A track event without its name fails the envelope.
    publish_raw(
        &url,
        &raw,
        json!({"batch":[{"type":"track","userId":"u","messageId":"no-name"}]})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert!(
        eventually(PATIENCE, || async { depth(&url, &invalid).await == 1 }).await,
        "the invalid event never reached a re-declared {invalid}"
    );
    let records = drain_json(&url, &invalid).await;
    assert_eq!(records[0]["event"]["messageId"], json!("no-name"));
    assert!(eventually(PATIENCE, || async { depth(&url, &raw).await == 0 }).await);
    worker.stop().await;
}

/// During a memory alarm the broker takes the worker's publishes but confirms none. A worker
/// that gave up on a confirm and published again left every earlier copy queued, and after the
/// alarm each copy arrived: the invalid queue held each record several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_memory_alarm_the_worker_holds_its_deliveries_and_each_record_arrives_once() {
    let node = RabbitNode::start();
    let mut s = settings("alarmhold");
    s.broker.url = ingest_pipeline::settings::Secret::new(node.url());
    s.broker.confirm_timeout_ms = 500;
    // Each copy is counted below: none of the 20 like records is folded into a summary.
    s.worker.invalid.window_ms = 0;
    let url = node.url();
    let topology = Topology::from_settings(&s.broker);
    let (conn, _ch) = channel(&url).await;
    topology.declare(&conn).await.unwrap();
    let _ = conn.close(200, "".into()).await;
    const PAYLOADS: usize = 20;
    for i in 0..PAYLOADS {
        let body = json!({"batch":[
            {"type":"track","event":"Custom","userId":"u","messageId":format!("ok-{i}")},
            {"type":"track","userId":"u","messageId":format!("bad-{i}")}
        ]});
        publish_raw(&url, &topology.raw(), body.to_string().as_bytes()).await;
    }
    node.ctl(&["set_vm_memory_high_watermark", "0.00001"]);
    let worker = Worker::start(&s);
    // Long enough for several confirm timeouts and retry rounds.
    tokio::time::sleep(Duration::from_secs(8)).await;
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);

    assert_eq!(
        wait_for_count(&s, mongodb::bson::doc! {}, PAYLOADS as u64, PATIENCE).await,
        PAYLOADS as u64,
        "the valid events did not land after the alarm"
    );
    assert!(
        eventually(PATIENCE, || async {
            depth(&url, &topology.raw()).await == 0
        })
        .await
    );
    // Let any late copy arrive before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let records = drain_json(&url, &topology.invalid()).await;
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for record in &records {
        let id = record["event"]["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *copies.entry(id).or_default() += 1;
    }
    assert_eq!(copies.len(), PAYLOADS, "{copies:?}");
    assert!(copies.values().all(|n| *n == 1), "copies: {copies:?}");
    worker.stop().await;
}

/// `x-attempt` comes from a message header; at its maximum, one more failure must not
/// overflow (a panic in the sink's task restarted the session and redelivered it for ever).
#[tokio::test]
async fn a_sink_message_with_the_largest_attempt_count_is_dead_lettered_not_a_panic() {
    let receiver = Receiver::start(Mode::Status(503)).await;
    let mut s = settings("attemptmax");
    s.sinks.retry_delays_ms = vec![300];
    s.sinks.max_attempts = 5;
    s.sinks.http = vec![http_sink(json!({
        "name": "vendor",
        "url": receiver.url,
        "request_timeout_ms": 500,
        "delivery": {"linger_ms": 20, "inline_attempts": 1, "breaker_failures": 0},
    }))];
    let url = amqp_url();
    let worker = Worker::start(&s);
    let client = http();
    assert!(status_becomes(&client, format!("{}/readyz", worker.url), 200).await);
    let topology = Topology::from_settings(&s.broker);
    let (conn, ch) = channel(&url).await;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert(BATCH_KEY.into(), ingest_pipeline::broker::long_string("k"));
    headers.insert(ATTEMPT.into(), AMQPValue::LongUInt(u32::MAX));
    let event = json!([{"type":"track","event":"Custom","userId":"u","messageId":"max-1"}]);
    let confirm = ch
        .basic_publish(
            "".into(),
            topology.sink_queue("vendor").as_str().into(),
            BasicPublishOptions::default(),
            event.to_string().as_bytes(),
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let _ = conn.close(200, "".into()).await;
    let dlq = topology.sink_dlq("vendor");
    assert!(
        eventually(PATIENCE, || async { depth(&url, &dlq).await == 1 }).await,
        "the batch never reached {dlq}"
    );
    worker.stop().await;
}

/// A panicking delivery task used to keep its prefetch slot until the channel closed: after
/// `prefetch` panics a worker consumed nothing more while it still answered ready.
#[tokio::test]
async fn a_delivery_whose_handling_panics_returns_to_the_queue_and_frees_its_prefetch_slot() {
    let s = settings("panicslot");
    let url = amqp_url();
    let queue = format!("{}.raw", s.broker.prefix);
    let (conn, _ch) = channel(&url).await;
    Topology::from_settings(&s.broker)
        .declare(&conn)
        .await
        .unwrap();
    publish_raw(&url, &queue, b"{}").await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "panicky".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = consumer.next().await.unwrap().unwrap();
    assert!(!first.redelivered);
    let tag = first.delivery_tag;
    let settled = tokio::spawn(worker::consume::settled_on_panic(async move {
        let _held = first;
        panic!("a bug met while handling a delivery");
    }))
    .await
    .unwrap();
    assert_eq!(settled, worker::acks::Settled::Requeue);
    let mut acks = worker::acks::Acks::new(ch.clone(), 1);
    acks.settle_all([(tag, settled)]).await.unwrap();
    // With prefetch 1, the message comes again only if the panicked task gave its slot back.
    let again = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the delivery never came back: its prefetch slot is still held")
        .unwrap()
        .unwrap();
    assert!(again.redelivered);
    assert_eq!(again.data, b"{}");
    let _ = conn.close(200, "".into()).await;
}

/// Ops find a poison payload with `ingestctl dlq list`, and once the worker is fixed, `dlq
/// replay raw.dlq` sends it back to the raw queue as it was published; it then lands.
#[tokio::test]
async fn a_payload_in_the_raw_dlq_is_listed_and_replayed_into_mongodb() {
    let s = settings("rawreplay");
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let (conn, _ch) = channel(&url).await;
    topology.declare(&conn).await.unwrap();
    let _ = conn.close(200, "".into()).await;
    let body =
        json!({"batch":[{"type":"track","event":"Custom","userId":"u","messageId":"poisoned-1"}]});
    publish_raw(&url, &topology.raw(), body.to_string().as_bytes()).await;
    // Workers that crash on it, until the delivery limit.
    fail_every_delivery(&url, &topology.raw()).await;
    assert!(
        eventually(PATIENCE, || async {
            depth(&url, &topology.raw_dlq()).await == 1
        })
        .await
    );

    let (status, out) = ingestctl_async(&s, &["dlq", "list"]).await;
    assert_eq!(status, 0, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&topology.raw_dlq()))
        .unwrap_or_default();
    assert!(line.trim_end().ends_with(" 1"), "{out}");

    let worker = Worker::start(&s);
    let (status, out) = ingestctl_async(&s, &["dlq", "replay", "raw.dlq"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("looked at 1, replayed 1"), "{out}");
    assert_eq!(
        wait_for_count(
            &s,
            mongodb::bson::doc! {"messageId": "poisoned-1"},
            1,
            PATIENCE
        )
        .await,
        1
    );
    assert_eq!(depth(&url, &topology.raw_dlq()).await, 0);
    worker.stop().await;
}

/// A poison request from the replay lane dead-letters to the raw DLQ like any other; `dlq replay
/// raw.dlq` sends it back to the replay lane with its replay marks (its sinks), not to the raw
/// queue as live traffic (where it would reach statsd and count in the live lag).
#[tokio::test]
async fn a_poison_replayed_request_goes_back_to_the_replay_lane_with_its_marks() {
    let s = settings("replaypoison");
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let body = json!({"batch":[{"type":"track","event":"Custom","userId":"u","messageId":"poisoned-replay"}]});
    let properties = lapin::BasicProperties::default();
    let sinks = ["mongo".to_owned()];
    publish_replayed(
        &url,
        &topology,
        body.to_string().as_bytes(),
        properties,
        &sinks,
    )
    .await;
    fail_every_delivery(&url, &topology.replay()).await;
    assert!(
        eventually(PATIENCE, || async {
            depth(&url, &topology.raw_dlq()).await == 1
        })
        .await
    );

    let (status, out) = ingestctl_async(&s, &["dlq", "replay", "raw.dlq"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("looked at 1, replayed 1"), "{out}");
    assert_eq!(depth(&url, &topology.raw()).await, 0);
    let back = drain_with_headers(&url, &topology.replay()).await;
    assert_eq!(back.len(), 1);
    let (headers, payload) = &back[0];
    assert_eq!(payload, &body);
    assert_eq!(
        headers.get("x-replayed").map(String::as_str),
        Some("archive")
    );
    assert_eq!(
        headers.get("x-replay-sinks").map(String::as_str),
        Some("mongo")
    );
    assert!(
        !headers.keys().any(|k| k.starts_with("x-death")),
        "{headers:?}"
    );
}
