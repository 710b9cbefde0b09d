//! Both services' `/metrics`, read by the Prometheus project's own linter: every metric has a
//! HELP and a TYPE line and follows the naming rules (issue 12). `scripts/test` installs
//! promtool (Debian package `prometheus`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use ingest_e2e::*;
use mongodb::bson::doc;
use serde_json::json;

use super::fixtures::*;

/// `promtool check metrics` over `text`: its verdict and what it printed.
pub fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on PATH (Debian package prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test]
async fn promtool_finds_nothing_to_flag_in_the_collectors_or_the_workers_metrics() {
    let receiver = Receiver::start(Mode::Ok).await;
    let mut s = settings("promtool");
    s.sinks.http = vec![http_sink(json!({"name": "hook", "url": receiver.url}))];
    s.worker.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let collector = CollectorProcess::spawn(&s).await;
    let _worker = Process::spawn("worker", &s);
    let client = http();
    // One accepted batch and one refused request, so the labelled series exist.
    let r = post_batch(
        &client,
        &collector.url,
        &batch(vec![product_viewed("prom-1")]),
    )
    .await;
    assert_eq!(r.status(), 200);
    let refused = client
        .post_as(format!("{}/v1/batch", collector.url), "not-a-key")
        .json(&json!({"batch": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        wait_for_count(&s, doc! {}, 1, Duration::from_secs(30)).await,
        1
    );
    let worker_url = format!("http://{}", s.worker.listen);
    for (service, url, expected) in [
        (
            "collector",
            &collector.url,
            "collector_publish_confirm_seconds",
        ),
        ("worker", &worker_url, "sink_events_total"),
    ] {
        let text = metrics_of(&client, url).await;
        assert!(
            text.contains(&format!("# HELP {expected} ")),
            "{service}: no HELP for {expected} in\n{text}"
        );
        let (clean, said) = promtool(&text);
        assert!(
            clean && said.trim().is_empty(),
            "{service}: promtool says\n{said}"
        );
    }
}
