//! Published SDKs, unmodified, against the collector: every event they send lands in MongoDB,
//! exactly once.
//!
//! The scripts in tests/compat make the same calls with each SDK (track with a user id only
//! and with an anonymous id only, identify, page, screen, group, alias), flush, and print the
//! messageIds the SDK gave the events. scripts/test installs the SDKs at the versions pinned
//! there (ensure_compat_clients in scripts/lib.sh), and Chromium for the browser SDKs.
//!
//! SDKs that cannot run on this machine (the mobile ones) are replayed from request fixtures
//! rebuilt from their own HTTP client and serialisation (tests/compat/fixtures): the same path,
//! headers, gzip and chunking, and body.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use ingest_e2e::*;
use ingest_pipeline::Settings;
use mongodb::bson::doc;

/// How long the events get to land; they are a handful, so only a stalled pipeline hits it.
const LAND: Duration = Duration::from_secs(60);
/// How long an SDK script gets to send and flush.
const SEND: Duration = Duration::from_secs(120);

fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

fn compat(file: &str) -> String {
    root().join("tests/compat").join(file).display().to_string()
}

/// Runs one SDK script against the collector and returns the messageIds it reports.
async fn send_with_sdk(
    program: PathBuf,
    script_args: Vec<String>,
    collector: &Collector,
    marker: &str,
) -> Vec<String> {
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&script_args)
        .args([
            "--url",
            &collector.url,
            "--write-key",
            IOS_KEY,
            "--marker",
            marker,
        ])
        .current_dir(root().join("tests/compat"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let run = format!("{} {}", program.display(), script_args.join(" "));
    let output = tokio::time::timeout(SEND, command.output())
        .await
        .unwrap_or_else(|_| panic!("{run} did not finish within {SEND:?}"))
        .unwrap_or_else(|e| {
            panic!("cannot run {run}: {e} (scripts/test installs the SDKs: ensure_compat_clients)")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{run} reported a failure ({}):\n{stderr}\nstdout: {stdout}",
        output.status
    );
    let ids: Vec<String> = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{run} did not print a JSON list of messageIds ({e}):\n{stdout}\nstderr: {stderr}")
    });
    ids
}

/// Waits until every event is in MongoDB, or until every event is accounted for in MongoDB
/// or the invalid queue (nothing more will come), or until `LAND` passes. Returns how many
/// landed.
async fn wait_until_landed(s: &Settings, ids: &[String]) -> u64 {
    let n = ids.len() as u64;
    let filter = doc! {"messageId": {"$in": ids.to_vec()}};
    let invalid = format!("{}.invalid", s.broker.prefix);
    eventually(LAND, || {
        let (filter, invalid) = (filter.clone(), invalid.clone());
        async move {
            let landed = count(s, filter).await;
            let refused = u64::from(depth(s.broker.url.expose(), &invalid).await);
            landed == n || landed + refused >= n
        }
    })
    .await;
    count(s, filter).await
}

/// One line per invalid-queue entry: the event's messageId and type, the reason and each error.
fn invalid_summary(entry: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let errors: Vec<String> = entry["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let (pointer, message, schema) = (&e["pointer"], &e["message"], &e["schema"]);
            format!("{} {} [{}]", text(pointer), text(message), text(schema))
        })
        .collect();
    let event = &entry["event"];
    format!(
        "  {} {} {}: {}",
        text(&event["messageId"]),
        text(&event["type"]),
        text(&entry["reason"]),
        errors.join("; ")
    )
}

/// Runs the SDK's calls through a collector and a worker and checks that every event the
/// SDK reported as sent is in MongoDB, with the run's marker; on failure, shows the invalid
/// queue.
async fn every_event_lands(name: &str, program: PathBuf, script_args: Vec<String>) {
    let s = settings(name);
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let marker = s.broker.prefix.clone();

    let ids = send_with_sdk(program, script_args, &collector, &marker).await;
    each_lands_once(&s, &ids, &marker).await;
}

/// Every one of `ids` is in MongoDB exactly once, carrying the run's marker; on failure, shows
/// the invalid queue.
async fn each_lands_once(s: &Settings, ids: &[String], marker: &str) {
    let s = s.clone();
    let ids = ids.to_vec();
    assert!(!ids.is_empty(), "the SDK reported no events sent");
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "the SDK reused a messageId: {ids:?}"
    );

    let landed = wait_until_landed(&s, &ids).await;
    if landed != ids.len() as u64 {
        let stored: BTreeSet<String> = find(&s, doc! {"messageId": {"$in": ids.clone()}})
            .await
            .iter()
            .filter_map(|d| d.get_str("messageId").ok().map(str::to_owned))
            .collect();
        let missing: Vec<&String> = ids.iter().filter(|id| !stored.contains(*id)).collect();
        let invalid = drain_json(
            s.broker.url.expose(),
            &format!("{}.invalid", s.broker.prefix),
        )
        .await;
        let summary: Vec<String> = invalid.iter().map(invalid_summary).collect();
        let entries: Vec<String> = invalid.iter().map(|entry| entry.to_string()).collect();
        panic!(
            "{landed} of the {} events the SDK sent are in MongoDB (waited until each was stored \
             or refused, at most {LAND:?}); missing: {missing:?}\n\
             the invalid queue holds {} entries:\n{}\n\nin full:\n{}",
            ids.len(),
            invalid.len(),
            summary.join("\n"),
            entries.join("\n")
        );
    }

    // The marker went in properties, traits (context.traits with RudderStack's identify) or,
    // for alias, context: the SDK's own events, with what the caller gave them.
    let carries_marker = doc! {"$or": [
        {"properties.compat_run": &marker},
        {"traits.compat_run": &marker},
        {"context.traits.compat_run": &marker},
        {"context.compat_run": &marker},
    ]};
    assert_eq!(count(&s, carries_marker).await, ids.len() as u64);
    // Exactly once: no messageId stored twice.
    assert_eq!(
        count(&s, doc! {"messageId": {"$in": ids.clone()}}).await,
        ids.len() as u64
    );
    // For the compatibility matrix (`--no-capture`).
    println!(
        "compat {marker}: {landed} of {} events sent are in MongoDB, each once",
        ids.len()
    );
}

#[tokio::test]
async fn events_from_segment_analytics_python_all_land_in_mongodb() {
    every_event_lands(
        "compat_segment_py",
        python(),
        vec![compat("send.py"), "--sdk".into(), "segment".into()],
    )
    .await;
}

#[tokio::test]
async fn events_from_rudder_sdk_python_all_land_in_mongodb() {
    every_event_lands(
        "compat_rudder_py",
        python(),
        vec![compat("send.py"), "--sdk".into(), "rudder".into()],
    )
    .await;
}

#[tokio::test]
async fn events_from_segment_analytics_node_all_land_in_mongodb() {
    every_event_lands(
        "compat_segment_node",
        PathBuf::from("node"),
        vec![compat("send.js")],
    )
    .await;
}

#[tokio::test]
async fn events_from_rudder_sdk_node_gzipped_all_land_in_mongodb() {
    every_event_lands(
        "compat_rudder_node",
        PathBuf::from("node"),
        vec![compat("send-rudder-node.js")],
    )
    .await;
}

/// An SDK in headless Chromium (tests/compat/browser.js), on a page of another origin than the
/// collector's, so that CORS is exercised as on a real site.
async fn browser_events_land(mode: &str) {
    every_event_lands(
        &format!("compat_{}", mode.replace('-', "_")),
        PathBuf::from("node"),
        vec![compat("browser.js"), "--sdk".into(), mode.into()],
    )
    .await;
}

#[tokio::test]
async fn events_from_analytics_js_delivering_each_event_all_land_in_mongodb() {
    browser_events_land("segment-default").await;
}

#[tokio::test]
async fn events_from_analytics_js_batching_all_land_in_mongodb() {
    browser_events_land("segment-batching").await;
}

#[tokio::test]
async fn events_analytics_js_batching_flushes_as_the_page_unloads_all_land_in_mongodb() {
    browser_events_land("segment-unload").await;
}

#[tokio::test]
async fn events_from_rudderstack_js_over_xhr_all_land_in_mongodb() {
    browser_events_land("rudder-xhr").await;
}

#[tokio::test]
async fn events_from_rudderstack_js_over_send_beacon_all_land_in_mongodb() {
    browser_events_land("rudder-beacon").await;
}

/// Issue #14: an SDK that never retries (`max_retries=0` here, as `sendBeacon` never does) loses
/// nothing while the broker is down, when the collector's spool is on: every call is answered
/// 200 from the spool, and every event lands once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_and_the_spool_on_an_sdk_that_never_retries_loses_no_event() {
    let mut node = tokio::task::block_in_place(RabbitNode::start);
    let mut s = settings("compat_spool");
    s.broker.url = ingest_pipeline::Secret::new(node.url());
    spool_on(&mut s);
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    tokio::task::block_in_place(|| node.stop());
    let marker = s.broker.prefix.clone();
    // The script fails if the SDK reports any error (its on_error).
    let ids = send_with_sdk(
        python(),
        vec![compat("send.py"), "--sdk".into(), "segment".into()],
        &collector,
        &marker,
    )
    .await;
    assert!(!ids.is_empty(), "the SDK reported no events sent");
    let text = metrics_of(&http(), &collector.url).await;
    let spooled = metric_value(
        &text,
        "collector_requests_spooled_total{reason=\"broker_unavailable\"}",
    );
    assert!(spooled >= 1.0, "nothing was spooled:\n{text}");
    tokio::task::block_in_place(|| node.resume());
    let landed = wait_until_landed(&s, &ids).await;
    assert_eq!(landed, ids.len() as u64, "of {ids:?}");
    let _ = std::fs::remove_dir_all(&s.collector.spool.dir);
}

/// Replays one request fixture (tests/compat/fixtures/NAME.json) the way its SDK sends it, and
/// checks that every event in it lands in MongoDB exactly once. Placeholders in the fixture are
/// filled per run (tests/compat/fixtures/README.md); `$MESSAGE_ID_n` become fresh UUIDs.
async fn fixture_lands(name: &str) {
    let path = root().join(format!("tests/compat/fixtures/{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let s = settings(&format!("fixture_{}", name.replace('-', "_")));
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let marker = s.broker.prefix.clone();

    let now = mongodb::bson::DateTime::now()
        .try_to_rfc3339_string()
        .expect("now as RFC 3339");
    let anonymous_id = format!("anon-{marker}");
    let base64 = |text: String| base64::engine::general_purpose::STANDARD.encode(text);
    // The longer names first: `$ANONYMOUS_ID` begins two of them.
    let mut text = text
        .replace(
            "$ANONYMOUS_ID_COLON_BASE64",
            &base64(format!("{anonymous_id}:")),
        )
        .replace("$ANONYMOUS_ID_BASE64", &base64(anonymous_id.clone()))
        .replace("$ANONYMOUS_ID", &anonymous_id)
        .replace("$WRITE_KEY", IOS_KEY)
        .replace("$MARKER", &marker)
        .replace("$USER_ID", &format!("user-{marker}"))
        .replace("$NOW", &now);
    let mut ids = Vec::new();
    for n in 1.. {
        let placeholder = format!("\"$MESSAGE_ID_{n}\"");
        if !text.contains(&placeholder) {
            break;
        }
        let id = uuid::Uuid::new_v4().to_string();
        text = text.replace(&placeholder, &format!("\"{id}\""));
        ids.push(id);
    }
    assert!(
        !text.contains("$MESSAGE_ID_"),
        "{name}: messageIds not numbered from 1"
    );
    let fixture: serde_json::Value = serde_json::from_str(&text).expect("the fixture is JSON");
    let request = &fixture["request"];
    let basic = format!("Basic {}", base64(format!("{IOS_KEY}:")));
    let headers: Vec<(String, String)> = request["headers"]
        .as_object()
        .expect("request.headers")
        .iter()
        .map(|(k, v)| {
            let value = v.as_str().expect("a header value is a string");
            (k.clone(), value.replace("$BASIC_AUTH", &basic))
        })
        .collect();
    let mut body = serde_json::to_vec(&fixture["body"]).expect("the body");
    if request["gzip"] == serde_json::json!(true) {
        body = gzip(&body);
    }
    let chunked = (request["chunked"] == serde_json::json!(true)).then_some(8192);
    let target = request["path"].as_str().expect("request.path");
    let (status, head, answer) = http1_exchange(&collector.url, target, &headers, &body, chunked)
        .await
        .unwrap_or_else(|| panic!("{name}: no answer from the collector"));
    assert_eq!(
        status,
        200,
        "{name} ({} {}): {head}\n{}",
        fixture["sdk"],
        fixture["version"],
        String::from_utf8_lossy(&answer)
    );
    each_lands_once(&s, &ids, &marker).await;
}

#[tokio::test]
async fn a_batch_as_analytics_kotlin_uploads_it_lands_in_mongodb() {
    fixture_lands("analytics-kotlin").await;
}

#[tokio::test]
async fn a_batch_as_analytics_swift_uploads_it_lands_in_mongodb() {
    fixture_lands("analytics-swift").await;
}

#[tokio::test]
async fn a_batch_as_analytics_react_native_uploads_it_lands_in_mongodb() {
    fixture_lands("analytics-react-native").await;
}

#[tokio::test]
async fn a_batch_as_analytics_flutter_uploads_it_lands_in_mongodb() {
    fixture_lands("analytics_flutter").await;
}

#[tokio::test]
async fn a_batch_as_rudder_sdk_kotlin_uploads_it_chunked_lands_in_mongodb() {
    fixture_lands("rudder-sdk-kotlin").await;
}

#[tokio::test]
async fn a_batch_as_rudder_sdk_swift_uploads_it_lands_in_mongodb() {
    fixture_lands("rudder-sdk-swift").await;
}

#[tokio::test]
async fn a_batch_as_rudder_sdk_android_uploads_it_gzipped_lands_in_mongodb() {
    fixture_lands("rudder-sdk-android").await;
}

#[tokio::test]
async fn a_batch_as_rudder_sdk_ios_uploads_it_gzipped_lands_in_mongodb() {
    fixture_lands("rudder-sdk-ios").await;
}
