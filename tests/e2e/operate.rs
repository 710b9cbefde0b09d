//! What ops rely on under load and in outages: load shedding (broker memory alarm, raw-queue
//! cap, runtime scheduling delay), readiness of the worker, and the Prometheus metrics.

use std::time::Duration;

use ingest_e2e::*;
use ingest_pipeline::Secret;
use mongodb::bson::doc;
use serde_json::Value;

use super::fixtures::{batch, ids, product_viewed};

/// A batch of `n` events of about 300 bytes each.
fn events(prefix: &str, n: usize) -> Value {
    batch(ids(prefix, n).iter().map(|id| product_viewed(id)).collect())
}

#[tokio::test]
async fn a_broker_memory_alarm_turns_into_503s_with_bounded_collector_memory_and_200_after() {
    let node = RabbitNode::start();
    let mut s = settings("alarm");
    s.broker.url = Secret::new(node.url());
    s.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let collector = Process::spawn("collector", &s);
    let url = format!("http://{}", s.collector.listen);
    let client = http();
    assert!(status_becomes(&client, format!("{url}/readyz"), 200).await);
    assert_eq!(
        post_batch(&client, &url, &events("before", 1))
            .await
            .status(),
        200
    );

    // A watermark far below what the node uses raises the memory alarm at once. The broker
    // tells a connection it is blocked when it next publishes, and holds that publish: its
    // client gets 503 when the confirm times out; every later request is refused at once.
    node.ctl(&["set_vm_memory_high_watermark", "0.00001"]);
    let first = post_batch(&client, &url, &events("caught", 1)).await;
    assert_eq!(first.status(), 503);
    assert!(first.headers().contains_key("retry-after"));
    assert!(
        status_becomes(&client, format!("{url}/readyz"), 503).await,
        "/readyz stayed 200 under a memory alarm"
    );
    let (rss_before, _) = collector.memory_kib();
    let body = events("blocked", 60); // about 18 KB
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let r = post_batch(&client, &url, &body).await;
        if r.status() == 503 {
            assert!(r.headers().contains_key("retry-after"));
        }
        *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
    }
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![503],
        "{statuses:?}"
    );
    let (rss_after, _) = collector.memory_kib();
    eprintln!("collector RSS {rss_before} KiB before, {rss_after} KiB after refusing 300 bodies");
    // 300 refused bodies are 5.4 MB; none of them may stay in memory.
    assert!(
        rss_after < rss_before + 16 * 1024,
        "collector RSS grew from {rss_before} KiB to {rss_after} KiB while refusing"
    );
    assert_eq!(
        depth(&node.url(), &format!("{}.raw", s.broker.prefix)).await,
        1
    );

    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    assert!(status_becomes(&client, format!("{url}/readyz"), 200).await);
    assert_eq!(
        post_batch(&client, &url, &events("after", 1))
            .await
            .status(),
        200
    );
    // The held publish is enqueued once the broker reads again. Its client got a 503 and
    // retries; the worker stores the retry's events once (same messageIds).
    assert_eq!(
        depth(&node.url(), &format!("{}.raw", s.broker.prefix)).await,
        3
    );
}

#[tokio::test]
async fn a_healthy_worker_logs_no_errors_across_its_periodic_broker_reads() {
    // Every 10 s the worker reads its sinks' retry queues from the broker on a short-lived
    // connection; closing it must not log an error each time.
    let mut s = settings("quietlog");
    s.worker.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::env::temp_dir().join(format!("{}.worker.log", s.broker.prefix));
    let mut worker = Process::spawn_logging_to("worker", &s, &log, "warn,worker=debug");
    let client = http();
    let readyz = format!("http://{}/readyz", s.worker.listen);
    assert!(status_becomes(&client, readyz, 200).await);
    let read_twice = eventually(Duration::from_secs(60), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.matches("read the sinks' retry queues").count() >= 2
    })
    .await;
    assert!(read_twice, "{}", std::fs::read_to_string(&log).unwrap());
    assert!(worker.is_running());
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_raw_queue_declared_without_the_cap_by_an_earlier_release_is_used_as_it_is() {
    // An existing broker whose raw queue predates `raw_max_length_bytes`: the broker refuses a
    // declare with other arguments (406), which must not keep the services from starting.
    let s = settings("upgrade");
    assert!(s.broker.raw_max_length_bytes > 0);
    let raw = format!("{}.raw", s.broker.prefix);
    let (conn, ch) = channel(&amqp_url()).await;
    ingest_pipeline::broker::declare_queue(&ch, &raw, ingest_pipeline::broker::quorum_arguments())
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;

    let collector = Collector::start(&s).await;
    let worker = Worker::start(&s);
    let client = http();
    let body = events("upgrade", 3);
    assert_eq!(
        post_batch(&client, &collector.url, &body).await.status(),
        200
    );
    assert_eq!(
        wait_for_count(&s, doc! {}, 3, Duration::from_secs(30)).await,
        3
    );
    // Ops can see that the cap is not in force.
    let metrics = metrics_of(&client, &collector.url).await;
    let series = format!("broker_raw_queue_without_cap_total{{queue=\"{raw}\"}}");
    assert!(metric_value(&metrics, &series) >= 1.0, "{metrics}");
    worker.stop().await;
}

#[tokio::test]
async fn a_raw_queue_that_differs_in_more_than_the_cap_is_refused_and_the_collector_stays_unready()
{
    // A classic queue is not replicated: keeping it would quietly weaken durability.
    let mut s = settings("classic");
    s.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let raw = format!("{}.raw", s.broker.prefix);
    let (conn, ch) = channel(&amqp_url()).await;
    ingest_pipeline::broker::declare_queue(&ch, &raw, lapin::types::FieldTable::default())
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;

    let log = std::env::temp_dir().join(format!("{}.collector.log", s.broker.prefix));
    let _collector = Process::spawn_logging_to("collector", &s, &log, "warn");
    let url = format!("http://{}", s.collector.listen);
    let refused = eventually(Duration::from_secs(60), || async {
        std::fs::read_to_string(&log).is_ok_and(|t| {
            t.contains("cannot connect to the broker") && t.contains("PRECONDITION_FAILED")
        })
    })
    .await;
    assert!(
        refused,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let client = http();
    assert!(status_becomes(&client, format!("{url}/readyz"), 503).await);
    assert_eq!(
        post_batch(&client, &url, &events("classic", 1))
            .await
            .status(),
        503
    );
    assert_eq!(depth(&amqp_url(), &raw).await, 0);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_full_raw_queue_nacks_publishes_so_clients_get_503_and_every_200_is_kept() {
    let mut s = settings("rawcap");
    s.broker.raw_max_length_bytes = 64 * 1024;
    let collector = Collector::start(&s).await;
    let client = http();
    let (mut accepted, mut refused) = (0, 0);
    while refused == 0 && accepted < 100 {
        // 30 events, about 9 KB, with messageIds of their own
        let body = events(&format!("cap-{accepted}"), 30);
        let r = post_batch(&client, &collector.url, &body).await;
        match r.status().as_u16() {
            200 => accepted += 1,
            503 => {
                assert!(r.headers().contains_key("retry-after"));
                let error: Value = r.json().await.unwrap();
                assert_eq!(error["code"], "unavailable", "{error}");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(refused, 1, "the cap never refused a publish");
    assert!(accepted >= 1, "nothing was accepted before the cap");
    let raw = format!("{}.raw", s.broker.prefix);
    assert_eq!(depth(&amqp_url(), &raw).await, accepted);

    // Once a worker drains the queue, publishes are taken again.
    let worker = Worker::start(&s);
    let want = u64::from(accepted) * 30;
    let landed = wait_for_count(&s, doc! {}, want, Duration::from_secs(60)).await;
    assert_eq!(landed, want, "accepted events did not all land");
    let body = events("cap-after", 30);
    assert_eq!(
        post_batch(&client, &collector.url, &body).await.status(),
        200
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_runtime_sheds_load_with_503_and_recovers_when_it_catches_up() {
    let mut s = settings("lagging");
    s.collector.max_scheduling_delay_ms = 50;
    let collector = Collector::start(&s).await;
    let url = collector.url.clone();

    // Tasks that hold the collector's runtime threads (blocking, as CPU-bound work would).
    let hogging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    for _ in 0..4 {
        let hogging = hogging.clone();
        tokio::spawn(async move {
            while hogging.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(150));
                tokio::task::yield_now().await;
            }
        });
    }
    // The client runs on its own thread and runtime, so it is not slowed by the hogs.
    let client_url = url.clone();
    let shed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = http();
            for i in 0..100 {
                let r = post_batch(&client, &client_url, &events(&format!("lag-{i}"), 1)).await;
                if r.status() == 503 {
                    assert!(r.headers().contains_key("retry-after"));
                    let error: Value = r.json().await.unwrap();
                    return Some(error);
                }
            }
            None
        })
    })
    .join()
    .unwrap();
    hogging.store(false, std::sync::atomic::Ordering::Relaxed);
    let error = shed.expect("no request was shed while the runtime ran late");
    assert_eq!(error["code"], "overloaded");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("scheduling delay"),
        "{error}"
    );

    let client = http();
    assert!(
        eventually(Duration::from_secs(30), || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                post_batch(&client, &url, &events("caught-up", 1))
                    .await
                    .status()
                    == 200
            }
        })
        .await
    );
    let metrics = metrics_of(&client, &url).await;
    assert!(
        metric_value(
            &metrics,
            "collector_load_shed_total{reason=\"scheduling_delay\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

/// Every sample line must be `name{labels} value` with a known metric type declared before it.
fn assert_prometheus_text(text: &str) {
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            typed.insert(parts.next().unwrap().to_owned());
            assert!(matches!(
                parts.next(),
                Some("counter" | "gauge" | "histogram" | "summary")
            ));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = series.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| typed.contains(*b))
            .unwrap_or(name);
        assert!(typed.contains(base), "no # TYPE before {line}");
    }
}

fn scrape(url: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("{url}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET {url}/metrics failed");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn both_services_export_prometheus_metrics_for_requests_publishes_and_sinks() {
    let mut s = settings("metrics");
    s.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    s.worker.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _collector = Process::spawn("collector", &s);
    let _worker = Process::spawn("worker", &s);
    let collector = format!("http://{}", s.collector.listen);
    let worker = format!("http://{}", s.worker.listen);
    let client = http();
    assert!(status_becomes(&client, format!("{collector}/readyz"), 200).await);
    assert!(status_becomes(&client, format!("{worker}/readyz"), 200).await);

    assert_eq!(
        post_batch(&client, &collector, &events("m", 5))
            .await
            .status(),
        200
    );
    let bad = client
        .post_as(format!("{collector}/v1/batch"), "not-a-key")
        .json(&events("m-bad", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(
        wait_for_count(&s, doc! {}, 5, Duration::from_secs(30)).await,
        5
    );

    let c = scrape(&collector);
    assert_prometheus_text(&c);
    assert_eq!(
        metric_value(
            &c,
            "http_requests_total{route=\"/v1/batch\",status=\"200\"}"
        ),
        1.0,
        "{c}"
    );
    assert_eq!(
        metric_value(
            &c,
            "http_requests_total{route=\"/v1/batch\",status=\"401\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&c, "collector_events_accepted_total"), 5.0);
    assert_eq!(
        metric_value(
            &c,
            "collector_publish_confirm_seconds_count{outcome=\"ack\"}"
        ),
        1.0
    );
    assert!(
        c.contains("http_request_duration_seconds_bucket{route=\"/v1/batch\",status=\"200\",le=\"")
    );
    assert!(
        metric_value(
            &c,
            "runtime_scheduling_delay_seconds_count{service=\"collector\"}"
        ) >= 1.0
    );

    // The worker's counters arrive as its sink finishes; wait for the delivered count.
    let worker_url = worker.clone();
    assert!(
        eventually(Duration::from_secs(30), || {
            let w = scrape(&worker_url);
            async move {
                metric_value(
                    &w,
                    "sink_events_total{sink=\"mongo\",outcome=\"delivered\"}",
                ) == 5.0
            }
        })
        .await
    );
    let w = scrape(&worker);
    assert_prometheus_text(&w);
    assert_eq!(
        metric_value(&w, "worker_events_total{result=\"valid\"}"),
        5.0
    );
    assert_eq!(
        metric_value(&w, "worker_events_total{result=\"invalid\"}"),
        0.0
    );
    assert_eq!(
        metric_value(&w, "worker_deliveries_total{outcome=\"acked\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&w, "sink_lag_seconds_count{sink=\"mongo\"}"),
        1.0
    );
    assert!(
        metric_value(&w, "sink_batch_size_sum{sink=\"mongo\"}") == 5.0,
        "{w}"
    );
    assert_eq!(metric_value(&w, "worker_queue_lag_seconds_count"), 1.0);
    assert_eq!(metric_value(&w, "worker_consuming"), 1.0);
}

#[tokio::test]
async fn worker_readyz_follows_the_broker_and_mongodb() {
    let mut node = RabbitNode::start();
    let mongo = Secantus::start();
    let mut s = settings("wready");
    s.broker.url = Secret::new(node.url());
    s.mongo.uri = Secret::new(mongo.uri());
    let worker = Worker::start(&s);
    let client = http();
    let readyz = format!("{}/readyz", worker.url);
    assert!(status_becomes(&client, readyz.clone(), 200).await);
    assert_eq!(
        client
            .get(format!("{}/healthz", worker.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    node.stop();
    assert!(
        status_becomes(&client, readyz.clone(), 503).await,
        "ready without a broker"
    );
    node.resume();
    assert!(
        status_becomes(&client, readyz.clone(), 200).await,
        "not ready after the broker returned"
    );

    drop(mongo);
    assert!(
        status_becomes(&client, readyz.clone(), 503).await,
        "ready without MongoDB"
    );
    let answer = client
        .get(&readyz)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(answer.contains("MongoDB"), "{answer}");
    worker.stop().await;
}

#[tokio::test]
async fn with_a_statsd_address_both_services_mirror_their_metrics_to_statsd() {
    let statsd = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = statsd.local_addr().unwrap().to_string();
    // Read from the start, so no datagram waits in the socket's buffer while services start.
    let (datagrams, mut received) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = statsd.recv(&mut buf).await {
            if datagrams.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut s = settings("mirror");
    s.metrics.statsd_address = Some(address);
    s.metrics.statsd_interval_ms = 200;
    s.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    s.worker.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _collector = Process::spawn("collector", &s);
    let _worker = Process::spawn("worker", &s);
    let url = format!("http://{}", s.collector.listen);
    let client = http();
    assert!(status_becomes(&client, format!("{url}/readyz"), 200).await);
    assert_eq!(
        post_batch(&client, &url, &events("mirror", 4))
            .await
            .status(),
        200
    );

    // Read datagrams until the request's counter, its timer and the worker's events arrived;
    // every line must parse as statsd does, in a datagram within the MTU.
    let requests = "ingest.collector.http_requests_total.route__v1_batch.status_200";
    let duration = "ingest.collector.http_request_duration_seconds.route__v1_batch.status_200";
    let valid = "ingest.worker.worker_events_total.result_valid";
    let mut counters: std::collections::BTreeMap<String, f64> = Default::default();
    let mut timers = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // (a redelivery could count the worker's events twice, never fewer)
    while !(counters.get(requests) == Some(&1.0)
        && timers.contains(duration)
        && counters.get(valid).is_some_and(|n| *n >= 4.0))
    {
        let Ok(Some(datagram)) = tokio::time::timeout_at(deadline, received.recv()).await else {
            panic!("not all arrived: counters {counters:?}, timers {timers:?}");
        };
        let n = datagram.len();
        assert!(n <= 1432, "datagram of {n} bytes is over the MTU");
        for line in std::str::from_utf8(&datagram).unwrap().split('\n') {
            let (name, rest) = line.split_once(':').expect("name:value");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{line}"
            );
            let mut fields = rest.split('|');
            let value: f64 = fields.next().unwrap().parse().expect("numeric value");
            match fields.next() {
                Some("c") => *counters.entry(name.to_owned()).or_default() += value,
                Some("ms") => {
                    timers.insert(name.to_owned());
                }
                Some("g") => {}
                other => panic!("unexpected metric type {other:?} in {line}"),
            }
            if let Some(rate) = fields.next() {
                let rate: f64 = rate.strip_prefix('@').expect("@rate").parse().unwrap();
                assert!(rate > 0.0 && rate <= 1.0, "{line}");
            }
            assert_eq!(fields.next(), None, "{line}");
        }
    }
    reader.abort();
}
