//! The live feed (issue #26): `ingestctl tail` with its filters, the console in a real headless
//! Chromium, and a worker that publishes nothing while nobody watches.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ingest_e2e::*;
use ingest_pipeline::{Settings, Topology};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use mongodb::bson::doc;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const LAND: Duration = Duration::from_secs(30);

fn track(id: &str, price: f64) -> Value {
    json!({"type": "track", "event": "Product Viewed", "userId": "u-live", "messageId": id,
        "properties": {"product_id": "sku-1", "price": price}})
}

async fn post(collector: &Collector, key: &str, events: Vec<Value>) {
    let response = http()
        .post_as(format!("{}/v1/batch", collector.url), key)
        .json(&json!({ "batch": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Waits until the worker has seen at least `n` viewers (it looks every 2 s).
async fn viewers_seen(worker: &Worker, n: f64) -> bool {
    eventually(LAND, || async {
        let text = metrics_of(&http(), &worker.url).await;
        text.lines()
            .filter(|l| l.starts_with("worker_live_feed_viewers "))
            .any(|l| l.split(' ').nth(1).and_then(|v| v.parse::<f64>().ok()) == Some(n))
    })
    .await
}

fn ingestctl(s: &Settings, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("ingestctl"));
    command
        .envs(settings_env(s))
        .current_dir(root())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn lines_of(child: tokio::process::Child) -> (bool, Vec<String>, String) {
    let out = tokio::time::timeout(LAND, child.wait_with_output())
        .await
        .expect("the tail ended by its --count")
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_shows_each_sources_valid_and_invalid_events_through_its_filters() {
    let s = settings("tail");
    let worker = Worker::start(&s);
    let collector = Collector::start(&s).await;
    let web = ingestctl(
        &s,
        &["tail", "--source", "shop-web", "--json", "--count", "2"],
    )
    .spawn()
    .unwrap();
    let refused = ingestctl(&s, &["tail", "--invalid-only", "--count", "2"])
        .spawn()
        .unwrap();
    assert!(
        viewers_seen(&worker, 2.0).await,
        "the worker never saw the two tails"
    );

    post(&collector, IOS_KEY, vec![track("ios-ok", 5.0)]).await;
    post(
        &collector,
        WEB_KEY,
        vec![track("web-ok", 5.0), track("web-bad", -1.0)],
    )
    .await;
    post(&collector, IOS_KEY, vec![track("ios-bad", -2.0)]).await;

    let (ok, lines, err) = lines_of(web).await;
    assert!(ok, "{err}");
    let items: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One delivery's items: its refused events first (what a viewer looks for).
    let ids: Vec<&str> = items
        .iter()
        .map(|i| i["event"]["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web-bad", "web-ok"], "{lines:?}");
    assert!(items.iter().all(|i| i["source"] == json!("shop-web")));
    assert_eq!(items[1]["valid"], json!(true));
    assert_eq!(items[1]["event"]["properties"]["price"], json!(5.0));
    assert_eq!(items[0]["valid"], json!(false));
    assert_eq!(items[0]["errors"][0]["pointer"], json!("/properties/price"));
    assert!(
        !lines.iter().any(|l| l.contains(WEB_KEY)),
        "a write key in the feed"
    );

    let (ok, lines, err) = lines_of(refused).await;
    assert!(ok, "{err}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    // Two requests, handled concurrently: in either order.
    for (source, id) in [("shop-web", "web-bad"), ("shop-ios", "ios-bad")] {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("messageId={id}")))
            .unwrap_or_else(|| panic!("{id} is not in {lines:?}"));
        assert!(line.contains(source), "{line}");
        assert!(
            line.contains("INVALID (schema): /properties/price"),
            "{line}"
        );
    }
    collector.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_viewer_the_worker_publishes_nothing_to_the_live_exchange() {
    let s = settings("liveidle");
    let url = amqp_url();
    let topology = Topology::from_settings(&s.broker);
    let (conn, ch) = channel(&url).await;
    topology.declare_live(&ch).await.unwrap();
    // A queue bound to the feed that is not a viewer: it counts what the worker publishes.
    let counted = format!("{}.live.counted", s.broker.prefix);
    ch.queue_declare(
        counted.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        counted.as_str().into(),
        topology.live_exchange().as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let worker = Worker::start(&s);
    let collector = Collector::start(&s).await;
    assert!(viewers_seen(&worker, 0.0).await);
    let ids = |p: &str, n: usize| {
        (0..n)
            .map(|i| track(&format!("{p}-{i}"), 1.0))
            .collect::<Vec<_>>()
    };
    post(&collector, IOS_KEY, ids("idle", 20)).await;
    assert_eq!(wait_for_count(&s, doc! {}, 20, LAND).await, 20);
    assert_eq!(
        depth(&url, &counted).await,
        0,
        "published with nobody watching"
    );
    let published = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("worker_live_feed_published_total "))
            .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(published(&metrics_of(&http(), &worker.url).await), 0.0);

    // A viewer arrives: the items flow; it leaves: they stop.
    let (viewer, viewer_ch) = channel(&url).await;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let _presence = viewer_ch
        .basic_consume(
            topology.live_viewers().as_str().into(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(viewers_seen(&worker, 1.0).await);
    post(&collector, IOS_KEY, ids("watched", 5)).await;
    assert!(eventually(LAND, || async { depth(&url, &counted).await == 5 }).await);
    let _ = viewer.close(200, "".into()).await;
    assert!(viewers_seen(&worker, 0.0).await);
    post(&collector, IOS_KEY, ids("left", 5)).await;
    assert_eq!(wait_for_count(&s, doc! {}, 30, LAND).await, 30);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        depth(&url, &counted).await,
        5,
        "published after the viewer left"
    );
    let _ = conn.close(200, "".into()).await;
    collector.stop().await;
    worker.stop().await;
}

/// Where the console's screenshot is kept after a run (the README shows a copy).
fn artifact() -> PathBuf {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"))
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("console.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_shows_an_event_sent_with_curl_and_a_refused_one_with_its_error_beside_the_field(
) {
    let s = settings("console");
    let worker = Worker::start(&s);
    let collector = Collector::start(&s).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let console = [
        "console",
        "--listen",
        &listen,
        "--collector",
        &collector.url,
    ];
    let _console = ingestctl(&s, &console).spawn().unwrap();
    let page = format!("http://{listen}/");
    assert!(
        status_becomes(&http(), page.clone(), 200).await,
        "the console never served its page"
    );
    let screenshot = artifact();
    let _ = std::fs::remove_file(&screenshot);
    let mut browser = tokio::process::Command::new("node")
        .arg(root().join("tests/compat/console.js"))
        .args([
            "--url",
            &page,
            "--valid",
            "curl-ok",
            "--invalid",
            "curl-bad",
        ])
        .args(["--pointer", "/properties/price", "--screenshot"])
        .arg(&screenshot)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(browser.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(LAND, out.next_line())
        .await
        .expect("the page opened")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));
    assert!(
        viewers_seen(&worker, 1.0).await,
        "the open page did not make the console a viewer"
    );

    for (id, price) in [("curl-ok", 19.9), ("curl-bad", -1.0)] {
        let body = json!({"userId": "u-curl", "event": "Product Viewed", "messageId": id,
            "properties": {"product_id": "sku-1", "price": price}});
        let status = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-u",
                &format!("{WEB_KEY}:"),
            ])
            .args([
                "-H",
                "content-type: application/json",
                "-d",
                &body.to_string(),
            ])
            .arg(format!("{}/v1/track", collector.url))
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&status.stdout), "200");
    }
    let shown = tokio::time::timeout(Duration::from_secs(70), out.next_line())
        .await
        .expect("the events appeared in the page")
        .unwrap()
        .expect("the page's report");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert!(browser.wait().await.unwrap().success());
    let valid = shown["valid"].as_str().unwrap();
    assert!(
        valid.contains("shop-web")
            && valid.contains("messageId=curl-ok")
            && valid.contains("valid"),
        "{valid}"
    );
    let invalid = shown["invalid"].as_str().unwrap();
    assert!(invalid.contains("INVALID (schema)"), "{invalid}");
    let error = shown["error"].as_str().unwrap();
    assert!(error.contains("minimum"), "{error}");
    let line = shown["line"].as_str().unwrap();
    assert!(
        line.contains("\"price\": -1"),
        "the error is not beside its field: {line}"
    );
    // The state the page was given: every pipeline queue, and the collector's spool (off here).
    let state: Value = http()
        .get(format!("{page}state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let queues: Vec<&str> = state["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    let topology = Topology::from_settings(&s.broker);
    for queue in [
        topology.raw(),
        topology.overflow(),
        topology.invalid(),
        topology.sink_dlq("mongo"),
    ] {
        assert!(
            queues.contains(&queue.as_str()),
            "{queue} not in {queues:?}"
        );
    }
    assert_eq!(
        state["spools"][0]["collector"],
        json!(collector.url),
        "{state}"
    );
    assert!(state["spools"][0].get("error").is_none(), "{state}");
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "no screenshot kept"
    );
    eprintln!("console screenshot kept in {}", screenshot.display());
    collector.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn the_console_bound_beyond_loopback_needs_its_token() {
    let s = settings("consoletoken");
    let refused = ingestctl(&s, &["console", "--listen", "0.0.0.0:0"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--token"));
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let _console = ingestctl(
        &s,
        &["console", "--listen", &listen, "--token", "t0ken-e2e"],
    )
    .spawn()
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    assert!(status_becomes(&http(), format!("{base}/?token=t0ken-e2e"), 200).await);
    for path in ["/", "/events", "/state", "/?token=wrong"] {
        let status = http()
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401, "{path}");
    }
}
