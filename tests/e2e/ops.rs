//! `ingestctl` against a real broker: the Nagios check's states, exit codes and output format,
//! the queue listing, and local schema checks.

use std::process::Command;

use std::time::Duration;

use ingest_e2e::*;
use ingest_pipeline::Settings;
use mongodb::bson::doc;
use serde_json::json;

use super::fixtures::{batch, ids, product_viewed};

fn ingestctl(s: &Settings, args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("ingestctl"))
        .envs(settings_env(s))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Checks one line of plugin output: `TEXT | label=value;warn;crit;min;max ...`.
fn assert_plugin_output(line: &str) {
    let (text, perf) = line
        .trim_end()
        .split_once(" | ")
        .expect("perfdata after ' | '");
    assert!(!text.contains('|'));
    for item in perf.split(' ') {
        let (label, rest) = item.split_once('=').expect("label=value");
        assert!(!label.is_empty() && !label.contains(' '));
        let fields: Vec<&str> = rest.split(';').collect();
        assert!(fields.len() <= 5, "{item}");
        // a number, then an optional unit of measure from the guidelines' list; or `U`
        // (the value cannot be determined)
        let value = ["us", "ms", "s", "%", "KB", "MB", "TB", "B", "c"]
            .iter()
            .find_map(|uom| fields[0].strip_suffix(uom))
            .unwrap_or(fields[0]);
        assert!(
            value == "U" || value.parse::<f64>().is_ok(),
            "value of {item}"
        );
        for f in &fields[1..] {
            assert!(
                f.is_empty() || f.chars().all(|c| c.is_ascii_digit() || ":~@.-".contains(c)),
                "{item}"
            );
        }
    }
}

#[tokio::test]
async fn check_reports_ok_warning_critical_by_depth_with_nagios_exit_codes() {
    let s = settings("check");
    let collector = Collector::start(&s).await; // declares the queues
    let raw = format!("{}.raw", s.broker.prefix);
    let url = s.broker.url.expose().to_owned();
    let mut published = 0;
    for (target, code, label) in [(3, 0, "OK"), (7, 1, "WARNING"), (12, 2, "CRITICAL")] {
        while published < target {
            publish_raw(&url, &raw, b"{}").await;
            published += 1;
        }
        assert!(
            eventually(std::time::Duration::from_secs(10), || async {
                depth(&url, &raw).await == target
            })
            .await
        );
        let (status, out) = ingestctl(&s, &["check", "--queue", "raw", "-w", "5", "-c", "10"]);
        assert_eq!(status, code, "{out}");
        assert!(out.starts_with(&format!("QUEUE {label} - {raw} depth={target} consumers=0 | depth={target};5;10;0; consumers=0;;;0;")), "{out}");
        assert_plugin_output(&out);
    }
    // range syntax reaches the check: alert only inside 10:20
    let (status, _) = ingestctl(&s, &["check", "--queue", &raw, "-c", "@10:20"]);
    assert_eq!(status, 2);
    let (status, out) = ingestctl(&s, &["check", "--queue", "raw", "--consumers"]);
    assert_eq!(status, 2, "{out}");
    assert!(out.contains("no consumers"));
    drop(collector);
}

#[tokio::test]
async fn check_is_unknown_not_ok_when_the_broker_is_unreachable() {
    let mut s = settings("unknown");
    s.broker.url =
        ingest_pipeline::Secret::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()));
    let (status, out) = ingestctl(&s, &["check", "--queue", "raw", "-w", "5", "-c", "10"]);
    assert_eq!(status, 3, "{out}");
    assert!(out.starts_with("QUEUE UNKNOWN - "), "{out}");
    let (status, _) = ingestctl(&s, &["check", "--queue", "raw", "-w", "not-a-range"]);
    assert_ne!(status, 0, "a bad range must not pass as OK");
}

#[tokio::test]
async fn queues_lists_every_pipeline_queue_with_depth_and_consumers() {
    let s = settings("queues");
    let _worker = Worker::start(&s); // declares raw, invalid and the mongo sink's queues
    let raw_name = format!("{}.raw", s.broker.prefix);
    let read = || {
        let (status, out) = ingestctl(&s, &["queues", "--json"]);
        assert_eq!(status, 0, "{out}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    };
    // the worker declares every queue, then starts consuming raw
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let queues = loop {
        let queues = read();
        let consumed = queues
            .iter()
            .any(|q| q["name"] == raw_name && q["consumers"] == 1);
        if consumed || std::time::Instant::now() > deadline {
            break queues;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let names: Vec<&str> = queues.iter().map(|q| q["name"].as_str().unwrap()).collect();
    for role in [
        "raw",
        "invalid",
        "sink.mongo",
        "sink.mongo.retry.1000ms",
        "sink.mongo.dlq",
    ] {
        assert!(
            names.contains(&format!("{}.{role}", s.broker.prefix).as_str()),
            "{role} missing: {names:?}"
        );
    }
    let raw = queues.iter().find(|q| q["name"] == raw_name).unwrap();
    assert_eq!(raw["consumers"], 1, "the worker's consumer is not reported");
    assert_eq!(raw["depth"], 0);
}

#[tokio::test]
async fn schema_check_prints_every_error_with_its_pointer() {
    let s = settings("schemacheck");
    let dir = std::env::temp_dir().join(unique("schema"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("payload.json");
    let payload = serde_json::json!({"batch": [
        super::fixtures::product_viewed("ok"),
        {"type": "track", "event": "Order Completed", "userId": "u", "properties": {"order_id": "o", "total": -1, "currency": "EUR", "products": []}}
    ]});
    std::fs::write(&file, payload.to_string()).unwrap();
    let (status, out) = ingestctl(&s, &["schema", "check", file.to_str().unwrap()]);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("event 0: valid"), "{out}");
    assert!(out.contains("/properties/total"), "{out}");
    std::fs::write(&file, super::fixtures::product_viewed("ok").to_string()).unwrap();
    assert_eq!(
        ingestctl(&s, &["schema", "check", file.to_str().unwrap()]).0,
        0
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `ingestctl canary` against a collector with a write key, plus `args`.
async fn canary(s: &Settings, url: &str, write_key: &str, args: &[&str]) -> (i32, String) {
    let mut all = vec!["canary", "--url", url, "--write-key", write_key];
    all.extend_from_slice(args);
    ingestctl_async(s, &all).await
}

#[tokio::test]
async fn canary_finds_all_its_events_through_the_pipeline_and_reports_latency() {
    let s = settings("canary");
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let (status, out) = canary(
        &s,
        &collector.url,
        IOS_KEY,
        &["-n", "5", "--nagios", "-w", "10000", "-c", "20000"],
    )
    .await;
    assert_eq!(status, 0, "{out}");
    assert!(
        out.starts_with("CANARY OK - 5/5 events landed in MongoDB, latency ms min/median/p99/max "),
        "{out}"
    );
    assert_plugin_output(&out);
    let canaries = doc! {"event": "Ingest Canary", "context.canary": true};
    assert_eq!(count(&s, canaries.clone()).await, 5);

    // With --clean-up the run's events are deleted after they were found.
    let (status, out) = canary(
        &s,
        &collector.url,
        IOS_KEY,
        &["-n", "2", "--spacing-ms", "4000", "--json", "--clean-up"],
    )
    .await;
    assert_eq!(status, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["landed"], 2, "{report}");
    assert_eq!(report["missing"].as_array().unwrap().len(), 0);
    let latency = &report["latency_ms"];
    assert!(latency["min"].as_f64().unwrap() <= latency["max"].as_f64().unwrap());
    // The canary looks every 20 ms while it waits between sends too: the first event is not
    // timed at the next send, 4 s later (it lands in well under a second here).
    assert!(
        latency["max"].as_f64().unwrap() < 4000.0,
        "latency counted to the next send: {report}"
    );
    let run = report["run"].as_str().unwrap();
    assert_eq!(count(&s, doc! {"properties.run": run}).await, 0);
    assert_eq!(count(&s, canaries).await, 5);
    worker.stop().await;
}

#[tokio::test]
async fn canary_with_the_worker_stopped_reports_every_event_missing_and_is_critical() {
    let s = settings("canary-down");
    let collector = Collector::start(&s).await;
    let (status, out) = canary(
        &s,
        &collector.url,
        IOS_KEY,
        &["-n", "3", "--timeout", "2", "--nagios"],
    )
    .await;
    assert_eq!(status, 2, "{out}");
    assert!(
        out.starts_with("CANARY CRITICAL - 0/3 events landed"),
        "{out}"
    );
    assert!(out.contains("3 missing from MongoDB"), "{out}");
    assert_plugin_output(&out);

    // A wrong key is refused by the collector: also critical, and said so.
    let (status, out) = canary(
        &s,
        &collector.url,
        "wrong-key-123",
        &["-n", "2", "--timeout", "1", "--nagios"],
    )
    .await;
    assert_eq!(status, 2, "{out}");
    assert!(out.contains("2 refused by the collector (2x 401)"), "{out}");
}

#[tokio::test]
async fn dlq_replay_after_a_schema_fix_moves_invalid_events_into_mongodb() {
    let (plan, schema_file, original) = plan_requiring_sku("plan");

    let mut s = settings("replay");
    s.worker.schemas_dir = plan.clone();
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let mut events: Vec<serde_json::Value> =
        ids("rp", 3).iter().map(|id| product_viewed(id)).collect();
    let mut broken = product_viewed("rp-broken");
    broken["properties"]["price"] = json!("free"); // invalid under both plans
    events.push(broken);
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .json(&batch(events))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let invalid = format!("{}.invalid", s.broker.prefix);
    assert!(
        eventually(Duration::from_secs(30), || async {
            depth(&amqp_url(), &invalid).await == 4
        })
        .await
    );
    worker.stop().await;

    // Ops look first: `show` prints the records and leaves them in place.
    let (status, out) = ingestctl_async(&s, &["dlq", "show", "invalid", "--limit", "2"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("/properties/sku") || out.contains("sku"),
        "{out}"
    );
    assert_eq!(depth(&amqp_url(), &invalid).await, 4);

    // The fix ships: the plan no longer requires sku, and the worker runs with it.
    std::fs::write(&schema_file, &original).unwrap();
    let (status, out) = ingestctl_async(&s, &["dlq", "replay", "invalid", "--dry-run"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("looked at 4, would replay 3"), "{out}");
    assert!(
        out.contains("kept 1: still invalid (/properties/price"),
        "{out}"
    );
    assert_eq!(depth(&amqp_url(), &invalid).await, 4);
    assert_eq!(count(&s, doc! {}).await, 0);

    let worker = Worker::start(&s);
    let (status, out) = ingestctl_async(&s, &["dlq", "replay", "invalid"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("looked at 4, replayed 3"), "{out}");
    let landed = wait_for_count(
        &s,
        doc! {"messageId": {"$in": ["rp-0", "rp-1", "rp-2"]}},
        3,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(landed, 3);
    assert!(
        eventually(Duration::from_secs(30), || async {
            depth(&amqp_url(), &invalid).await == 1
        })
        .await
    );
    // Replaying again changes nothing: what is left is still invalid, what landed stays once.
    let (_, out) = ingestctl_async(&s, &["dlq", "replay", "invalid"]).await;
    assert!(out.contains("looked at 1, replayed 0"), "{out}");
    assert_eq!(count(&s, doc! {}).await, 3);
    worker.stop().await;
}

#[tokio::test]
async fn scale_sizes_workers_from_depth_target_and_per_worker_rate() {
    let s = settings("scale");
    let collector = Collector::start(&s).await; // declares the raw queue
    let raw = format!("{}.raw", s.broker.prefix);
    for i in 0..50 {
        publish_raw(&amqp_url(), &raw, format!("{{\"n\":{i}}}").as_bytes()).await;
    }
    let (status, out) = ingestctl_async(
        &s,
        &[
            "scale",
            "--json",
            "--target",
            "1",
            "--per-worker-rate",
            "10",
            "--sample",
            "1",
        ],
    )
    .await;
    assert_eq!(status, 0, "{out}");
    let hint: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(hint["depth"], 50, "{hint}");
    assert_eq!(hint["consumers"], 0);
    assert_eq!(hint["workers"], 5, "{hint}");
    assert_eq!(hint["net_rate"], 0.0);
    assert!(hint["drain_seconds_now"].is_null(), "{hint}");

    // Without a rate and without the management API, it says it cannot tell.
    let (status, out) = ingestctl_async(&s, &["scale", "--json", "--sample", "1"]).await;
    assert_eq!(status, 0, "{out}");
    let hint: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(hint["workers"].is_null(), "{hint}");
    drop(collector);
}

/// Publishes `{"n":i}` messages to `queue` every `every`, confirmed, until aborted.
async fn steady_publisher(url: String, queue: String, every: Duration) {
    let (_conn, ch) = channel(&url).await;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    for n in 0u64.. {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                format!("{{\"n\":{n}}}").as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
        tokio::time::sleep(every).await;
    }
}

/// Consumes `queue` one message at a time, acking each after `per_message`, until aborted.
async fn slow_consumer(url: String, queue: String, per_message: Duration) {
    use futures_util::StreamExt;
    let (_conn, ch) = channel(&url).await;
    ch.basic_qos(1, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "slow".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    while let Some(Ok(delivery)) = deliveries.next().await {
        tokio::time::sleep(per_message).await;
        delivery
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .unwrap();
    }
}

/// Runs `ingestctl args` until `done(status, stdout)` holds, for up to a minute; the last
/// output comes back either way.
async fn ingestctl_until(
    s: &Settings,
    args: &[&str],
    done: impl Fn(i32, &str) -> bool,
) -> (bool, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, out) = ingestctl_async(s, args).await;
        if done(status, &out) {
            return (true, out);
        }
        if std::time::Instant::now() >= deadline {
            return (false, out);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

const DRAIN_CHECK: [&str; 10] = [
    "check",
    "--queue",
    "raw",
    "--drain-time",
    "-w",
    "3600",
    "-c",
    "7200",
    "--sample",
    "1",
];

#[tokio::test]
async fn drain_time_check_is_critical_for_a_stalled_queue_and_ok_while_it_drains() {
    let s = settings("drain");
    let collector = Collector::start(&s).await; // declares the raw queue
    let raw = format!("{}.raw", s.broker.prefix);
    let url = s.broker.url.expose().to_owned();

    let (status, out) = ingestctl_async(&s, &DRAIN_CHECK).await;
    assert_eq!(status, 0, "an empty queue is drained: {out}");
    assert!(out.contains("drain_seconds=0s;3600;7200;0;"), "{out}");
    assert_plugin_output(&out);

    let publisher = tokio::spawn(steady_publisher(
        url.clone(),
        raw.clone(),
        Duration::from_millis(1),
    ));
    assert!(
        eventually(Duration::from_secs(30), || async {
            depth(&url, &raw).await >= 300
        })
        .await
    );
    publisher.abort();
    // Nothing consumes it: it never empties.
    let (status, out) = ingestctl_async(&s, &DRAIN_CHECK).await;
    assert_eq!(status, 2, "{out}");
    assert!(out.contains("not draining (no consumers)"), "{out}");
    assert!(out.contains("drain_seconds=U;3600;7200;0;"), "{out}");
    assert_plugin_output(&out);

    // A consumer takes about 20 a second: the check sees it shrink and when it will be empty.
    let consumer = tokio::spawn(slow_consumer(
        url.clone(),
        raw.clone(),
        Duration::from_millis(50),
    ));
    let (draining, last) = ingestctl_until(&s, &DRAIN_CHECK, |status, out| {
        status == 0 && out.contains("(net -") && !out.contains(" depth=0 ")
    })
    .await;
    assert!(draining, "{last}");
    assert!(
        last.starts_with(&format!("QUEUE OK - {raw} empty in ")),
        "{last}"
    );
    assert_plugin_output(&last);
    consumer.abort();
    drop(collector);
}

#[tokio::test]
async fn with_the_management_api_queues_show_rates_and_scale_and_drain_time_use_them() {
    let node = RabbitNode::start_with_management();
    let mut s = settings("mgmt");
    s.broker.url = ingest_pipeline::Secret::new(node.url());
    s.broker.management_url = node.management_url().map(ingest_pipeline::Secret::new);
    let collector = Collector::start(&s).await; // declares the queues on this node
    let raw = format!("{}.raw", s.broker.prefix);
    // About 100 a second arrive and about 20 a second are taken: the queue grows.
    let publisher = tokio::spawn(steady_publisher(
        node.url(),
        raw.clone(),
        Duration::from_millis(10),
    ));
    let consumer = tokio::spawn(slow_consumer(
        node.url(),
        raw.clone(),
        Duration::from_millis(50),
    ));

    let (sampled, listed) = ingestctl_until(&s, &["queues", "--json"], |_, out| {
        let listed: serde_json::Value = serde_json::from_str(out).unwrap_or_default();
        let rates = listed
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["name"] == raw.as_str()))
            .map(|q| q["rates"].clone())
            .unwrap_or_default();
        ["publish", "deliver", "ack"]
            .iter()
            .all(|r| rates[r].as_f64().unwrap_or(0.0) > 0.0)
    })
    .await;
    assert!(
        sampled,
        "no publish, deliver and ack rates for {raw}: {listed}"
    );
    let (_, table) = ingestctl_async(&s, &["queues"]).await;
    assert!(
        table.contains("deliver/s")
            && !table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(raw.as_str()) && l.ends_with("-")),
        "{table}"
    );

    // scale takes a worker's rate from the ack rate per consumer, and counts the arrivals. The
    // management API's rates are samples: on a loaded machine one can read 0 between two that
    // do not, so this reads until one has rates (as the listing above does).
    let (measured, out) =
        ingestctl_until(&s, &["scale", "--json", "--target", "60"], |status, out| {
            let hint: serde_json::Value = serde_json::from_str(out).unwrap_or_default();
            status == 0
                && hint["per_worker_rate_from"]
                    .as_str()
                    .is_some_and(|from| from.starts_with("measured"))
                && hint["publish_rate"].as_f64().is_some_and(|rate| rate > 0.0)
        })
        .await;
    assert!(measured, "{out}");
    let hint: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        hint["per_worker_rate_from"]
            .as_str()
            .unwrap()
            .starts_with("measured"),
        "{hint}"
    );
    assert!(hint["publish_rate"].as_f64().unwrap() > 0.0, "{hint}");
    assert!(hint["workers"].as_u64().unwrap() >= 1, "{hint}");

    // Arrivals outrun the consumer, but it is worked off: the wait is depth / ack rate.
    let (waiting, last) = ingestctl_until(&s, &DRAIN_CHECK, |status, out| {
        status == 0 && out.contains(" worked off in ") && !out.contains(" depth=0 ")
    })
    .await;
    assert!(waiting, "{last}");
    assert_plugin_output(&last);

    // Nothing consumes it any more: it is not draining.
    publisher.abort();
    consumer.abort();
    let (stalled, last) = ingestctl_until(&s, &DRAIN_CHECK, |status, out| {
        status == 2 && out.contains("not draining (")
    })
    .await;
    assert!(stalled, "{last}");
    assert_plugin_output(&last);
    drop(collector);
}
