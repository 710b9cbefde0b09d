//! `ingestctl replay` (issue #24): archived requests of a time range sent through the pipeline
//! again on the replay lane, to every sink but statsd or to the sinks named; MongoDB keeps
//! each event once, HTTP sinks get each event's stable key, a schema fixed since makes what
//! was refused land, and a replay killed half-way goes on with `--resume`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use ingest_e2e::*;
use ingest_pipeline::Settings;
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

use super::fixtures::*;

const LAND: Duration = Duration::from_secs(30);

/// An HTTP sink's settings as JSON: the worker's (through `http_sink`) and `ingestctl`'s
/// (through a config file) are the same.
fn webhook(name: &str, url: &str) -> Value {
    json!({"name": name, "url": url, "request_timeout_ms": 2000,
        "delivery": {"linger_ms": 20, "inline_attempts": 1, "breaker_failures": 0}})
}

/// A config directory holding `test.json` with the test's write keys and these HTTP sinks:
/// `ingestctl` checks `--source` and `--sink` against the configured ones.
fn config_with(s: &Settings, sinks: &[Value], statsd: Option<&Value>) -> PathBuf {
    let dir = work_dir().join(unique("replay-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let keys: serde_json::Map<String, Value> = s
        .collector
        .write_keys
        .iter()
        .map(|(source, key)| (source.clone(), json!(key.expose())))
        .collect();
    let mut config = json!({"collector": {"write_keys": keys}, "sinks": {"http": sinks}});
    if let Some(statsd) = statsd {
        config["sinks"]["statsd"] = statsd.clone();
    }
    std::fs::write(dir.join("test.json"), config.to_string()).unwrap();
    dir
}

fn state_file(name: &str) -> PathBuf {
    work_dir().join(format!("{}.json", unique(name)))
}

fn time(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `ingestctl replay ARGS --state STATE` with the test's settings (and `config`'s sinks):
/// exit code, stdout, stderr.
async fn replay(
    s: &Settings,
    config: Option<&Path>,
    state: &Path,
    args: &[&str],
) -> (i32, String, String) {
    let mut command = replay_command(s, config, state, args);
    let out = command.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn replay_command(
    s: &Settings,
    config: Option<&Path>,
    state: &Path,
    args: &[&str],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("ingestctl"));
    command
        .envs(settings_env(s))
        .current_dir(root())
        .arg("replay")
        .args(args)
        .arg("--state")
        .arg(state);
    if let Some(config) = config {
        command.env("INGEST_CONFIG_DIR", config);
    }
    command
}

/// Posts `requests` batches of two events each, `<tag>-<n>-a` and `<tag>-<n>-b`; their ids.
async fn post_moment(collector: &Collector, tag: &str, requests: usize) -> Vec<String> {
    let client = http();
    let mut ids = Vec::new();
    for n in 0..requests {
        let (a, b) = (format!("{tag}-{n}-a"), format!("{tag}-{n}-b"));
        let body = batch(vec![product_viewed(&a), order_completed(&b, 19.5)]);
        let r = post_batch(&client, &collector.url, &body).await;
        assert_eq!(r.status(), 200);
        ids.extend([a, b]);
    }
    ids
}

/// Each event's `_ingest.eventKey` as a receiver got it, by `messageId`.
fn event_keys(receiver: &Receiver) -> BTreeMap<String, BTreeSet<String>> {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for batch in receiver.received() {
        for event in &batch.events {
            keys.entry(event["messageId"].as_str().unwrap().to_owned())
                .or_default()
                .insert(event["_ingest"]["eventKey"].as_str().unwrap().to_owned());
        }
    }
    keys
}

/// Waits until the replay lane is empty and the worker had a moment to deliver what it took.
async fn lane_worked_off(s: &Settings) {
    let lane = format!("{}.replay", s.broker.prefix);
    assert!(eventually(LAND, || async { depth(&amqp_url(), &lane).await == 0 }).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Every document, in `_id` order.
async fn documents(s: &Settings) -> Vec<Document> {
    let mut docs = all(s).await;
    docs.sort_by_key(|d| d.get("_id").map(|id| id.to_string()));
    docs
}

/// Events sent at three moments reach MongoDB, a vendor and statsd. A new HTTP sink is added;
/// `replay --sink fresh` over the middle moment delivers exactly its events to the new sink,
/// with the event keys the vendor got, and nothing to the others. Replaying everything twice
/// (every sink but statsd) leaves MongoDB unchanged, gives the vendor each event again under
/// its same key, and sends statsd nothing.
#[tokio::test]
async fn a_new_sink_gets_exactly_the_range_and_a_replay_twice_leaves_mongodb_unchanged() {
    let vendor = Receiver::start(Mode::Ok).await;
    let fresh = Receiver::start(Mode::Ok).await;
    let statsd = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut s = settings("replay-sink");
    s.sinks.http = vec![http_sink(webhook("vendor", &vendor.url))];
    let statsd_sink = json!({
        "address": statsd.local_addr().unwrap().to_string(),
        "delivery": {"linger_ms": 20},
    });
    s.sinks.statsd = Some(serde_json::from_value(statsd_sink.clone()).unwrap());
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let mut moments = Vec::new();
    for tag in ["first", "middle", "last"] {
        let start = Utc::now();
        let ids = post_moment(&collector, tag, 3).await;
        moments.push((start, Utc::now(), ids));
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(wait_for_count(&s, doc! {}, 18, LAND).await, 18);
    assert!(eventually(LAND, || async { vendor.receipts().len() == 18 }).await);
    let mut datagram = vec![0u8; 65536];
    let live_lines = tokio::time::timeout(LAND, statsd.recv(&mut datagram)).await;
    assert!(live_lines.is_ok(), "statsd got the live events");
    worker.stop().await;

    // A new sink: the worker sends it what comes from now on, and the replay the past.
    s.sinks.http.push(http_sink(webhook("fresh", &fresh.url)));
    let config = config_with(
        &s,
        &[webhook("vendor", &vendor.url), webhook("fresh", &fresh.url)],
        Some(&statsd_sink),
    );
    let worker = Worker::start(&s);
    let delivered =
        |sink: &str| format!("sink_events_total{{sink=\"{sink}\",outcome=\"delivered\"}}");
    // The workers of one test process share one metrics recorder: counts are read as changes.
    let base = metrics_of(&http(), &worker.url).await;
    let sent_to = |metrics: &str, sink: &str| {
        metric_value(metrics, &delivered(sink)) - metric_value(&base, &delivered(sink))
    };
    while statsd.try_recv(&mut datagram).is_ok() {}
    let (start, end, middle) = &moments[1];
    let (code, out, err) = replay(
        &s,
        Some(&config),
        &state_file("replay-sink"),
        &[
            "--from",
            &time(*start),
            "--to",
            &time(*end),
            "--sink",
            "fresh",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("replayed 3 requests (6 events)"), "{out}");
    assert!(eventually(LAND, || async { fresh.receipts().len() == 6 }).await);
    lane_worked_off(&s).await;
    let got: BTreeSet<String> = fresh.receipts().keys().cloned().collect();
    assert_eq!(got, middle.iter().cloned().collect::<BTreeSet<_>>());
    assert!(fresh.receipts().values().all(|keys| keys.len() == 1));
    assert_eq!(vendor.receipts().len(), 18);
    assert!(vendor.receipts().values().all(|keys| keys.len() == 1));
    assert_eq!(count(&s, doc! {}).await, 18);
    // MongoDB would drop a copy by its _id: its worker's count says nothing was sent to it.
    let metrics = metrics_of(&http(), &worker.url).await;
    assert_eq!(sent_to(&metrics, "fresh"), 6.0, "{metrics}");
    assert_eq!(sent_to(&metrics, "mongo"), 0.0, "{metrics}");
    assert_eq!(sent_to(&metrics, "statsd"), 0.0, "{metrics}");
    let leaked = tokio::time::timeout(Duration::from_millis(500), statsd.recv(&mut datagram)).await;
    assert!(
        leaked.is_err(),
        "statsd got something from a replay to `fresh`"
    );
    let (vendor_keys, fresh_keys) = (event_keys(&vendor), event_keys(&fresh));
    for id in middle {
        assert_eq!(fresh_keys[id], vendor_keys[id], "{id}: another event key");
    }

    // Everything, twice: every sink but statsd.
    let before = documents(&s).await;
    for round in 1..=2u32 {
        let state = state_file("replay-all");
        let (code, out, err) = replay(
            &s,
            Some(&config),
            &state,
            &["--from", &time(moments[0].0), "--to", &time(Utc::now())],
        )
        .await;
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("replayed 9 requests (18 events)"), "{out}");
        assert!(err.contains("statsd is left out"), "{err}");
        let each = 1 + round as usize;
        assert!(
            eventually(LAND, || async {
                vendor
                    .received()
                    .iter()
                    .map(|b| b.events.len())
                    .sum::<usize>()
                    == 18 * each
            })
            .await,
            "{}",
            vendor.figures()
        );
        lane_worked_off(&s).await;
    }
    assert_eq!(documents(&s).await, before, "MongoDB changed");
    // MongoDB was sent every event twice more, and kept each once.
    let metrics = metrics_of(&http(), &worker.url).await;
    assert_eq!(sent_to(&metrics, "mongo"), 36.0, "{metrics}");
    assert_eq!(sent_to(&metrics, "statsd"), 0.0, "{metrics}");
    assert_eq!(
        event_keys(&vendor),
        vendor_keys,
        "an event came under another key"
    );
    // No --sink is every sink but statsd: the new sink had everything twice more.
    let receipts = fresh.receipts();
    for (_, _, ids) in &moments {
        for id in ids {
            let times = if middle.contains(id) { 3 } else { 2 };
            assert_eq!(receipts.get(id).map(Vec::len), Some(times), "{id}");
        }
    }
    let late = tokio::time::timeout(Duration::from_secs(1), statsd.recv(&mut datagram)).await;
    assert!(
        late.is_err(),
        "statsd got {:?}",
        String::from_utf8_lossy(&datagram[..late.unwrap().unwrap()])
    );
    worker.stop().await;
}

/// Events a tracking-plan bug refused land once the plan is fixed and their range replayed;
/// the one still invalid is kept in the invalid queue again, with today's error.
#[tokio::test]
async fn events_refused_by_a_schema_land_when_replayed_after_the_fix() {
    let (plan, schema_file, original) = plan_requiring_sku("replay-plan");
    let mut s = settings("replay-fix");
    s.worker.schemas_dir = plan.clone();
    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let from = Utc::now();
    let mut broken = product_viewed("fix-broken");
    broken["properties"]["price"] = json!("free"); // invalid under both plans
    let events = vec![product_viewed("fix-1"), product_viewed("fix-2"), broken];
    let r = post_batch(&http(), &collector.url, &batch(events)).await;
    assert_eq!(r.status(), 200);
    let invalid = format!("{}.invalid", s.broker.prefix);
    assert!(eventually(LAND, || async { depth(&amqp_url(), &invalid).await == 3 }).await);
    assert_eq!(count(&s, doc! {}).await, 0);
    worker.stop().await;
    let refused = drain_json(&amqp_url(), &invalid).await;
    assert_eq!(refused.len(), 3);

    std::fs::write(&schema_file, &original).unwrap();
    let worker = Worker::start(&s);
    let (code, out, err) = replay(
        &s,
        None,
        &state_file("replay-fix"),
        &["--from", &time(from)],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let landed = wait_for_count(&s, doc! {"messageId": {"$in": ["fix-1", "fix-2"]}}, 2, LAND).await;
    assert_eq!(landed, 2);
    assert!(eventually(LAND, || async { depth(&amqp_url(), &invalid).await == 1 }).await);
    let again = drain_json(&amqp_url(), &invalid).await;
    let text = again[0].to_string();
    assert!(
        text.contains("fix-broken") && text.contains("/properties/price"),
        "{text}"
    );
    assert_eq!(count(&s, doc! {}).await, 2);
    worker.stop().await;
}

/// Requests lost from the raw queue (purged by hand) come back from the archive: a replay
/// killed (SIGKILL) half-way goes on with `--resume`, and every event of the range is in
/// MongoDB exactly once. `--status` tells a stopped replay from a finished one, and shows the
/// replay lane's consumer.
#[tokio::test]
async fn a_replay_killed_half_way_goes_on_with_resume_and_every_event_lands_once() {
    let s = settings("replay-resume");
    let collector = Collector::start(&s).await;
    let from = Utc::now();
    let ids = post_moment(&collector, "lost", 40).await;
    let raw = format!("{}.raw", s.broker.prefix);
    purge_queue(&amqp_url(), &raw).await;
    let worker = Worker::start(&s);
    assert_eq!(count(&s, doc! {}).await, 0);

    // 80 events at 20 a second: four seconds, killed once a few requests are confirmed.
    let state = state_file("replay-resume");
    let mut running = replay_command(&s, None, &state, &["--from", &time(from), "--rate", "20"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sent = |state: &Path| {
        std::fs::read(state)
            .ok()
            .and_then(|text| serde_json::from_slice::<Value>(&text).ok())
            .and_then(|state| state["requests"].as_u64())
            .unwrap_or(0)
    };
    assert!(eventually(LAND, || async { sent(&state) >= 5 }).await);
    running.start_kill().unwrap();
    let _ = running.wait().await;
    let (code, out, _) = replay(&s, None, &state, &["--status", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "stopped (--resume goes on)", "{status}");
    assert!(status["requests"].as_u64().unwrap() < 40, "{status}");
    assert_eq!(status["lane_consumers"], 1, "{status}");
    // A new replay on that state file is refused: it would start over.
    let (code, _, err) = replay(&s, None, &state, &["--from", &time(from)]).await;
    assert_eq!(code, 3);
    assert!(err.contains("did not finish: --resume it"), "{err}");

    let (code, out, err) = replay(&s, None, &state, &["--resume"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("replayed 40 requests (80 events)"), "{out}");
    assert_eq!(wait_for_count(&s, doc! {}, 80, LAND).await, 80);
    lane_worked_off(&s).await;
    let stored = stored_keys(&events(&s).await).await;
    let expected: BTreeSet<String> = ids.iter().cloned().collect();
    let got: BTreeSet<String> = stored.keys().map(|(_, id)| id.clone()).collect();
    assert_eq!(got, expected);
    let (_, out, _) = replay(&s, None, &state, &["--status", "--json"]).await;
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "finished", "{status}");
    assert_eq!(status["progress"], 1.0, "{status}");
    worker.stop().await;
}

/// A range past the archive's retention says where the archive starts; an unknown source or
/// sink names the configured ones; nothing to resume says so.
#[tokio::test]
async fn a_replay_refuses_what_it_cannot_do_with_a_clear_error() {
    let s = settings("replay-errors");
    let collector = Collector::start(&s).await;
    post_moment(&collector, "err", 1).await;
    let state = state_file("replay-errors");
    let config = config_with(&s, &[], None);
    let cases: [(&[&str], &str); 4] = [
        (
            &["--from", "-1d", "--to", "-1h"],
            "before the oldest archived request",
        ),
        (
            &["--from", "-1h", "--source", "shop-tv"],
            "unknown source `shop-tv`: the configured sources are",
        ),
        (
            &["--from", "-1h", "--sink", "warehouse"],
            "unknown sink `warehouse`: the configured sinks are mongo",
        ),
        (&["--resume"], "cannot read the replay state"),
    ];
    for (args, expected) in cases {
        let (code, out, err) = replay(&s, Some(&config), &state, args).await;
        assert_eq!(code, 3, "{args:?}: {out}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert_eq!(
        depth(&amqp_url(), &format!("{}.replay", s.broker.prefix)).await,
        0
    );
}
