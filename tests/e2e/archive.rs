//! The archive (issue #24): every raw request the collector publishes is also kept in the
//! stream `<prefix>.archive`, by the same publish and under the same confirm.

use std::collections::BTreeMap;
use std::time::Duration;

use ingest_e2e::*;

use super::fixtures::*;

const QUIET: Duration = Duration::from_secs(3);

/// A `sendBeacon` body: the web key in the body, sent as text/plain.
async fn post_beacon(client: &reqwest::Client, collector: &str, id: &str) -> reqwest::Response {
    let beacon = serde_json::json!({"writeKey": WEB_KEY, "batch": [product_viewed(id)]});
    client
        .post(format!("{collector}/v1/batch"))
        .header("content-type", "text/plain")
        .body(beacon.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn every_request_the_collector_takes_is_in_the_raw_queue_and_the_archive() {
    let s = settings("archive");
    let collector = Collector::start(&s).await;
    let client = http();
    let url = s.broker.url.expose();
    let raw = format!("{}.raw", s.broker.prefix);
    let archive = format!("{}.archive", s.broker.prefix);

    let batch_body = batch(vec![product_viewed("ar-1"), screen("ar-2")]);
    let r = post_batch(&client, &collector.url, &batch_body).await;
    assert_eq!(r.status(), 200);
    let r = post_beacon(&client, &collector.url, "ar-3").await;
    assert_eq!(r.status(), 200);
    let zipped = gzip(product_viewed("ar-4").to_string().as_bytes());
    let r = client
        .post_as(format!("{}/v1/track", collector.url), IOS_KEY)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(zipped.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let archived = read_stream(url, &archive, 10, QUIET).await;
    let queued = drain_raw_with_headers(url, &raw).await;
    assert_eq!(archived.len(), 3, "archived: {archived:?}");
    // The same messages, bodies as sent (gzip kept), headers and all, in the order taken.
    assert_eq!(archived, queued);
    assert_eq!(archived[2].1, zipped);
    let sources: Vec<&str> = archived.iter().map(|(h, _)| h["source"].as_str()).collect();
    assert_eq!(sources, ["shop-ios", "shop-web", "shop-ios"]);
    for (headers, _) in &archived {
        assert!(headers.contains_key("received_at"), "{headers:?}");
        // The write key is never published, so never archived.
        assert!(headers
            .values()
            .all(|v| !v.contains(IOS_KEY) && !v.contains(WEB_KEY)));
    }
    // Reading the archive takes nothing from it.
    assert_eq!(read_stream(url, &archive, 10, QUIET).await.len(), 3);
}

#[tokio::test]
async fn with_the_archive_off_no_stream_is_declared_and_requests_still_reach_the_raw_queue() {
    let mut s = settings("archive-off");
    s.broker.archive.enabled = false;
    let collector = Collector::start(&s).await;
    let url = s.broker.url.expose();
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .json(&batch(vec![product_viewed("off-1")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let queued: Vec<(BTreeMap<String, String>, Vec<u8>)> =
        drain_raw_with_headers(url, &format!("{}.raw", s.broker.prefix)).await;
    assert_eq!(queued.len(), 1);
    assert!(!lapin_queue_exists(url, &format!("{}.archive", s.broker.prefix)).await);
}

/// A raw queue deleted by hand: a request posted before the collector declares it again is
/// routed to the archive alone (the broker confirms it, so the answer is 200, not a return).
/// It is not lost: every 200'd request is in the archive, to be replayed; the raw queue comes
/// back by the collector's periodic check and takes the requests after.
#[tokio::test]
async fn with_the_raw_queue_deleted_every_200d_request_is_still_in_the_archive() {
    let s = settings("archive-rawgone");
    let collector = Collector::start(&s).await;
    let client = http();
    let url = s.broker.url.expose();
    let raw = format!("{}.raw", s.broker.prefix);
    let post = |id: String| {
        client
            .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
            .json(&batch(vec![product_viewed(&id)]))
            .send()
    };
    assert_eq!(post("gone-before".into()).await.unwrap().status(), 200);
    assert!(delete_queue(url, &raw).await);
    let during = post("gone-during".into()).await.unwrap().status().as_u16();
    assert!(during == 200 || during == 503, "{during}");
    let mut taken = vec![("gone-during".to_owned(), during)];
    // The collector declares the queue and its binding again; until both are back a 200'd
    // request is in the archive alone. Post until one reaches the raw queue.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while depth(url, &raw).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no request reached the raw queue again: {taken:?}"
        );
        let id = format!("gone-after-{}", taken.len());
        let status = post(id.clone()).await.map_or(0, |r| r.status().as_u16());
        taken.push((id, status));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let has = |messages: &[(BTreeMap<String, String>, Vec<u8>)], id: &str| {
        messages
            .iter()
            .any(|(_, body)| String::from_utf8_lossy(body).contains(&format!("\"{id}\"")))
    };
    let archived = read_stream(url, &format!("{}.archive", s.broker.prefix), 100, QUIET).await;
    assert!(has(&archived, "gone-before"), "{archived:?}");
    for (id, status) in &taken {
        if *status == 200 {
            assert!(has(&archived, id), "{id} was 200'd but is not archived");
        }
    }
    let queued = drain_raw_with_headers(url, &raw).await;
    assert!(!queued.is_empty());
}

/// `ingestctl replay --dry-run`: the archived requests of a range, per source and hour; a range
/// that starts before the oldest archived request says where the archive starts, and one that
/// ends before it is refused with that request's time.
#[tokio::test]
async fn replay_dry_run_counts_the_archived_requests_of_a_range_per_source() {
    let s = settings("archive-dry");
    let collector = Collector::start(&s).await;
    let client = http();
    for id in ["dry-1", "dry-2"] {
        let r = post_batch(&client, &collector.url, &batch(vec![product_viewed(id)])).await;
        assert_eq!(r.status(), 200);
    }
    let r = post_beacon(&client, &collector.url, "dry-3").await;
    assert_eq!(r.status(), 200);

    let dry_run = |args: &'static [&'static str]| {
        let s = &s;
        async move {
            let mut all = vec!["replay", "--dry-run", "--json"];
            all.extend_from_slice(args);
            let (code, out) = ingestctl_async(s, &all).await;
            assert_eq!(code, 0, "{out}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        }
    };
    let all = dry_run(&["--from", "-5m"]).await;
    assert_eq!(all["requests"], 3, "{all}");
    assert!(all["archive_starts"].is_string(), "{all}");
    let per_source: BTreeMap<String, u64> = all["would_replay"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["source"].as_str().unwrap().to_owned(),
                row["requests"].as_u64().unwrap(),
            )
        })
        .fold(BTreeMap::new(), |mut sums, (source, n)| {
            *sums.entry(source).or_default() += n;
            sums
        });
    assert_eq!(
        per_source,
        BTreeMap::from([("shop-ios".to_owned(), 2), ("shop-web".to_owned(), 1)])
    );
    let web = dry_run(&["--from", "-5m", "--source", "shop-web"]).await;
    assert_eq!(web["requests"], 1, "{web}");
    let later = dry_run(&["--from", "now"]).await;
    assert_eq!(later["requests"], 0, "{later}");

    let past = std::process::Command::new(binary("ingestctl"))
        .envs(settings_env(&s))
        .current_dir(root())
        .args(["replay", "--dry-run", "--from", "-1d", "--to", "-1h"])
        .output()
        .unwrap();
    assert_eq!(past.status.code(), Some(3));
    let error = String::from_utf8_lossy(&past.stderr);
    assert!(
        error.contains("before the oldest archived request"),
        "{error}"
    );
}
