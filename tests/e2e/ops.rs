//! `ingestctl` against a real broker: the Nagios check's states, exit codes and output format,
//! the queue listing, and local schema checks.

use std::process::Command;

use ingest_e2e::*;
use ingest_pipeline::Settings;

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
        assert!(fields[0].parse::<f64>().is_ok(), "value of {item}");
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
