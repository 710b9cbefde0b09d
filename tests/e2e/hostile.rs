//! Hostile clients and hostile bytes (guarantee 6): slow, silent and vanishing connections,
//! too many of them, and payloads built to hurt a parser. Each gets a clear answer, costs
//! bounded memory, publishes nothing, and never stops the collector serving everyone else.
//! Covered elsewhere, not repeated here: truncated JSON, invalid UTF-8, bad gzip and oversized
//! bodies (`ingest::refusals_are_401_413_400_with_json_errors_and_publish_nothing`), a client
//! that vanishes mid-body (`ingest::a_client_that_vanishes_mid_body_causes_nothing_to_be_published`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ingest_e2e::*;
use mongodb::bson::doc;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::fixtures::*;

/// How long a test waits for something that should happen in well under a second.
const PATIENCE: Duration = Duration::from_secs(30);
/// base64("test-ios-write-key:")
const IOS_BASIC: &str = "dGVzdC1pb3Mtd3JpdGUta2V5Og==";
/// Resident memory the collector may reach under any hostile case: generous, not a timing.
const MAX_RSS_MB: u64 = 512;

fn host(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

fn raw_queue(s: &ingest_pipeline::Settings) -> String {
    format!("{}.raw", s.broker.prefix)
}

/// The soft open-files limit raised to the hard one; returns the new soft limit.
fn raise_fd_limit() -> u64 {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    if soft < hard {
        rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).unwrap();
    }
    hard.max(soft)
}

/// Reads until the peer closes (or `PATIENCE` passes); returns what came and whether it closed.
async fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (got, outcome.is_ok())
}

/// Reads one HTTP/1.1 response (head and a Content-Length body) from a keep-alive stream.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, Value)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    let status = head.get(9..12)?.parse().ok()?;
                    let body = serde_json::from_slice(&got[end + 4..end + 4 + length])
                        .unwrap_or(Value::Null);
                    return Some((status, body));
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read).await.ok().flatten()
}

async fn healthz_on(stream: &mut TcpStream) -> Option<u16> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    read_response(stream).await.map(|(status, _)| status)
}

async fn post_good(url: &str, id: &str) -> u16 {
    http()
        .post_as(format!("{url}/v1/batch"), IOS_KEY)
        .json(&batch(vec![product_viewed(id)]))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Good requests posted in a loop until stopped: counts the 200s and anything else.
struct Bystander {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    other: Arc<std::sync::Mutex<Vec<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bystander {
    fn start(url: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let other = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (url, s, o, f) = (
            url.to_owned(),
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&other),
        );
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                match post_good(&url, &format!("bystander-{i}")).await {
                    200 => {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    status => f.lock().unwrap().push(status),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self {
            stop,
            ok,
            other,
            task,
        }
    }

    /// Stops; returns the number of 200s and every other status (0: no answer).
    async fn finish(self) -> (usize, Vec<u16>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (
            self.ok.load(Ordering::SeqCst),
            std::mem::take(&mut *self.other.lock().unwrap()),
        )
    }
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_after_the_header_timeout_while_others_get_200() {
    let mut s = settings("slowloris");
    s.collector.header_timeout_ms = 300;
    let collector = Collector::start(&s).await;
    let addr = host(&collector.url);

    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /v1/batch HTTP/1.1\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = slow.into_split();
    let dribble = tokio::spawn(async move {
        // One header byte every 50 ms, for as long as the server lets it (or PATIENCE).
        for byte in b"X-Slow: 1\r\n".iter().cycle().take(600) {
            if writer.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    // Meanwhile a normal client is served.
    assert_eq!(post_good(&collector.url, "meanwhile-1").await, 200);

    let mut answer = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut answer)).await;
    assert!(
        closed.is_ok(),
        "the slowloris connection was still open after {PATIENCE:?}"
    );
    assert!(!answer.starts_with(b"HTTP/1.1 2"), "a slow head was served");
    dribble.abort();
    let (_, silent_closed) = read_until_closed(&mut silent).await;
    assert!(
        silent_closed,
        "a connection that never sent a byte was kept"
    );
    assert_eq!(post_good(&collector.url, "meanwhile-2").await, 200);
}

/// Issue #20: not a 408, which Segment's mobile SDKs and analytics.js answer by deleting the
/// batch; a body too slow on a bad network may arrive in time when sent again.
#[tokio::test]
async fn a_slow_body_gets_503_to_send_again_and_nothing_is_published_while_others_get_200() {
    let mut s = settings("slowbody");
    // Short, but long enough that a bystander's small body never meets it on a loaded machine.
    s.collector.body_timeout_ms = 2000;
    let collector = Collector::start(&s).await;
    let addr = host(&collector.url);
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        format!(
            "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {IOS_BASIC}\r\nContent-Length: 1000\r\n\r\n{{\"batch\":["
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let bystander = Bystander::start(&collector.url);
    let response = read_response(&mut slow).await;
    let (ok, other) = bystander.finish().await;
    let (status, body) = response.expect("an answer to the slow body");
    assert_eq!(status, 503);
    assert_eq!(body["code"], json!("body_timeout"));
    assert!(
        ok > 0 && other.is_empty(),
        "bystander: {ok} ok, others {other:?}"
    );
    assert!(
        eventually(PATIENCE, || async {
            depth(s.broker.url.expose(), &raw_queue(&s)).await == ok as u32
        })
        .await,
        "only the bystander's requests are on the raw queue"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let mut s = settings("idle");
    s.collector.idle_timeout_ms = 300;
    s.collector.header_timeout_ms = 120_000;
    let collector = Collector::start(&s).await;
    let mut conn = TcpStream::connect(host(&collector.url)).await.unwrap();
    assert_eq!(healthz_on(&mut conn).await, Some(200));
    // The header timeout is two minutes: a close within PATIENCE is the idle timeout's.
    let (rest, closed) = read_until_closed(&mut conn).await;
    assert!(closed, "the idle connection was kept");
    assert!(rest.is_empty());
}

#[tokio::test]
async fn past_max_connections_a_new_connection_is_closed_at_once_and_the_open_ones_still_work() {
    let mut s = settings("conncap");
    s.collector.max_connections = 50;
    s.collector.header_timeout_ms = 120_000;
    s.collector.idle_timeout_ms = 120_000;
    let collector = Collector::start(&s).await;
    let addr = host(&collector.url);
    // The readiness probe's connection may hold a slot a moment longer: retry until 50 of our
    // own are open and each has been served.
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut open = Vec::new();
    while open.len() < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "could not open 50 served connections"
        );
        let mut c = TcpStream::connect(&addr).await.unwrap();
        if healthz_on(&mut c).await == Some(200) {
            open.push(c);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (answer, closed) = read_until_closed(&mut extra).await;
    assert!(closed, "the 51st connection was kept open");
    assert!(answer.is_empty(), "the 51st connection was served");

    for c in &mut open {
        assert_eq!(
            healthz_on(c).await,
            Some(200),
            "an admitted connection broke"
        );
    }
    drop(open);
    assert!(
        eventually(PATIENCE, || async {
            post_good(&collector.url, "after-cap").await == 200
        })
        .await,
        "slots were not given back when connections closed"
    );
}

#[tokio::test]
async fn ten_thousand_abandoned_connections_keep_memory_bounded_and_others_served() {
    let fd_limit = raise_fd_limit();
    let mut s = settings("tenk");
    s.collector.header_timeout_ms = 120_000;
    let collector = CollectorProcess::spawn(&s).await;
    let addr = host(&collector.url);
    let wanted = 10_000usize.min(
        usize::try_from(fd_limit)
            .unwrap_or(10_000)
            .saturating_sub(500),
    );
    let idle_rss = collector.rss_mb();

    let mut abandoned = Vec::with_capacity(wanted);
    for i in 0..wanted {
        let Ok(mut c) = TcpStream::connect(&addr).await else {
            break;
        };
        // Half send nothing; half start a request head and stop.
        if i % 2 == 0 {
            let _ = c.write_all(b"POST /v1/batch HTTP/1.1\r\nHost: ").await;
        }
        abandoned.push(c);
    }
    assert!(
        abandoned.len() >= wanted * 9 / 10,
        "opened only {} of {wanted} connections",
        abandoned.len()
    );
    assert!(
        eventually(PATIENCE, || async {
            collector.open_fds() >= abandoned.len()
        })
        .await,
        "the collector did not accept the connections (fds {})",
        collector.open_fds()
    );
    assert_eq!(post_good(&collector.url, "tenk-1").await, 200);
    let loaded_rss = collector.rss_mb();
    assert!(
        loaded_rss < MAX_RSS_MB,
        "collector RSS {loaded_rss} MB with {} open connections (idle {idle_rss} MB)",
        abandoned.len()
    );
    eprintln!(
        "collector RSS: idle {idle_rss} MB, {loaded_rss} MB with {} abandoned connections",
        abandoned.len()
    );

    drop(abandoned);
    assert!(
        eventually(PATIENCE, || async { collector.open_fds() < 200 }).await,
        "abandoned connections were not released (fds {})",
        collector.open_fds()
    );
    assert_eq!(post_good(&collector.url, "tenk-2").await, 200);
}

/// A `{"batch":[…]}` body whose one event carries `value` as a property, as raw JSON text.
fn event_with(value: &str) -> String {
    format!(
        r#"{{"batch":[{{"type":"track","event":"Custom","userId":"u","properties":{{"v":{value}}}}}]}}"#
    )
}

fn deep(levels: usize) -> String {
    event_with(&format!("{}{}", "[".repeat(levels), "]".repeat(levels)))
}

/// `inflated_mb` gzip members of 1 MB of spaces each: about 1 KB of gzip per inflated MB.
fn gzip_bomb(inflated_mb: usize) -> Vec<u8> {
    let member = gzip(&vec![b' '; 1 << 20]);
    member.repeat(inflated_mb)
}

/// Sends raw bytes on a new connection, half-closes if asked, and reads one response.
async fn raw_exchange(addr: &str, bytes: &[u8], half_close: bool) -> Option<(u16, Value)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(bytes).await.ok()?;
    if half_close {
        stream.shutdown().await.ok()?;
    }
    read_response(&mut stream).await
}

#[tokio::test]
async fn hostile_bodies_get_clear_4xx_json_errors_bounded_memory_and_publish_nothing() {
    let mut s = settings("hostile-in");
    // Room for a 1 MB gzip bomb to be read, so that the bomb reaches the capped gunzip.
    s.collector.max_batch_bytes = 2 << 20;
    let collector = CollectorProcess::spawn(&s).await;
    let url = format!("{}/v1/batch", collector.url);
    let track = format!("{}/v1/track", collector.url);
    let bomb = gzip_bomb(1024);
    assert!(
        (500 << 10..2 << 20).contains(&bomb.len()),
        "bomb of {} bytes",
        bomb.len()
    );
    let post = |url: &str| http().post_as(url, IOS_KEY);
    let huge_string = format!("\"{}\"", "x".repeat(1_500_000));
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "100,000-level nesting",
            post(&url).body(deep(100_000)),
            400,
            "bad_request",
        ),
        (
            "1e400",
            post(&url).body(event_with("1e400")),
            400,
            "malformed_json",
        ),
        (
            "-1e400",
            post(&track).body(r#"{"event":"Custom","userId":"u","n":-1e400}"#),
            400,
            "malformed_json",
        ),
        (
            "a 1000-digit integer",
            post(&url).body(event_with(&"9".repeat(1000))),
            400,
            "malformed_json",
        ),
        (
            "a lone surrogate escape",
            post(&url).body(event_with(r#""\ud800""#)),
            400,
            "malformed_json",
        ),
        (
            "a 1.5 MB string in a batch event",
            post(&url).body(event_with(&huge_string)),
            413,
            "event_too_large",
        ),
        (
            "a 1.5 MB string to /v1/track",
            post(&track).body(format!(r#"{{"event":{huge_string}}}"#)),
            413,
            "batch_too_large",
        ),
        (
            "two `batch` keys",
            post(&url).body(r#"{"batch":[],"batch":[{"type":"track"}]}"#),
            400,
            "malformed_json",
        ),
        (
            "two `writeKey`s",
            http().post(&url).body(format!(
                r#"{{"writeKey":"{IOS_KEY}","writeKey":"other","batch":[]}}"#
            )),
            400,
            "malformed_json",
        ),
        (
            "a 1 MB gzip bomb inflating to 1 GB",
            post(&url).header("content-encoding", "gzip").body(bomb),
            413,
            "batch_too_large",
        ),
        // Any Content-Type is read as JSON (SDKs declare all sorts); what is not JSON is a 400.
        (
            "application/xml, not JSON",
            post(&url)
                .header("content-type", "application/xml")
                .body("<batch/>"),
            400,
            "bad_request",
        ),
        (
            "multipart/form-data, not JSON",
            post(&url)
                .header("content-type", "multipart/form-data; boundary=x")
                .body("--x--"),
            400,
            "bad_request",
        ),
        (
            "no content type, not JSON",
            post(&url).body("batch=1&x=2"),
            400,
            "bad_request",
        ),
        (
            "content encoding br",
            post(&url).header("content-encoding", "br").body("x"),
            415,
            "unsupported_encoding",
        ),
    ];
    let bystander = Bystander::start(&collector.url);
    let mut failures = Vec::new();
    for (name, request, status, code) in cases {
        match request.send().await {
            Ok(r) => {
                let got = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if got != status || body["code"] != json!(code) || body["success"] != json!(false) {
                    failures.push(format!("{name}: {got} {body}, expected {status} {code}"));
                }
            }
            Err(error) => failures.push(format!("{name}: no answer: {error}")),
        }
    }

    // Content-Length that lies, on raw TCP. Longer body: only the declared bytes are the body.
    let addr = host(&collector.url);
    let body = batch(vec![product_viewed("cl-1")]).to_string();
    let head = |length: usize| {
        format!(
            "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {IOS_BASIC}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    let longer = format!("{}{body}", head(body.len() / 2));
    match raw_exchange(&addr, longer.as_bytes(), false).await {
        Some((400, b)) if b["code"] == json!("malformed_json") => {}
        other => failures.push(format!("body longer than Content-Length: {other:?}")),
    }
    // Shorter body, then the client stops sending.
    let shorter = format!("{}{body}", head(body.len() * 2));
    match raw_exchange(&addr, shorter.as_bytes(), true).await {
        Some((400, b)) if b["code"] == json!("body_read") => {}
        other => failures.push(format!("body shorter than Content-Length: {other:?}")),
    }
    let (ok, other) = bystander.finish().await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        ok > 0 && other.is_empty(),
        "bystander: {ok} ok, others {other:?}"
    );

    let rss = collector.rss_mb();
    assert!(rss < MAX_RSS_MB, "collector RSS {rss} MB");
    let mut collector = collector;
    assert!(collector.is_running(), "the collector process died");
    assert!(
        eventually(PATIENCE, || async {
            depth(s.broker.url.expose(), &raw_queue(&s)).await == ok as u32
        })
        .await,
        "a hostile body was published: raw depth {} for {ok} good requests",
        depth(s.broker.url.expose(), &raw_queue(&s)).await
    );
}

#[tokio::test]
async fn duplicate_keys_keep_the_last_value_but_duplicate_write_key_or_batch_is_refused() {
    let s = settings("dupkeys");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    // serde_json (collector and worker alike) keeps the last of duplicate keys. The keys the
    // collector itself reads (`writeKey`, `batch`) must not mean one thing to it and another
    // to the worker, so a duplicate of those is refused (see the hostile_bodies test).
    let body = r#"{"batch":[{"type":"track","event":"Custom","messageId":"dup-1","userId":"first","userId":"last"}]}"#;
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        wait_for_count(&s, doc! {"messageId": "dup-1"}, 1, PATIENCE).await,
        1
    );
    let d = &find(&s, doc! {"messageId": "dup-1"}).await[0];
    assert_eq!(d.get_str("userId").unwrap(), "last");
}

#[tokio::test]
async fn hostile_payloads_on_the_raw_queue_land_in_the_invalid_queue_with_a_reason() {
    let s = settings("hostile-raw");
    let _worker = Worker::start(&s);
    let url = s.broker.url.expose();
    let raw = raw_queue(&s);
    let invalid = format!("{}.invalid", s.broker.prefix);
    let oversized = event_with(&format!("\"{}\"", "x".repeat(1_500_000)));
    let payloads: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "truncated JSON",
            br#"{"batch":[{"type":"track""#.to_vec(),
            None,
        ),
        (
            "invalid UTF-8",
            b"{\"batch\":[{\"type\":\"\xff\"}]}".to_vec(),
            None,
        ),
        ("100,000-level nesting", deep(100_000).into_bytes(), None),
        ("1e400", event_with("1e400").into_bytes(), None),
        (
            "a 1000-digit integer",
            event_with(&"9".repeat(1000)).into_bytes(),
            None,
        ),
        (
            "a lone surrogate",
            event_with(r#""\ud800""#).into_bytes(),
            None,
        ),
        ("over max_payload_bytes", oversized.into_bytes(), None),
        ("a gzip bomb", gzip_bomb(1024), Some("gzip")),
        ("not gzip", b"plain".to_vec(), Some("gzip")),
        ("a JSON array", b"[1,2]".to_vec(), None),
        ("empty", Vec::new(), None),
    ];
    let n = payloads.len();
    assert!(
        eventually(PATIENCE, || lapin_queue_exists(url, &raw)).await,
        "the worker did not declare its queues"
    );
    for (_, body, encoding) in &payloads {
        publish_raw_encoded(url, &raw, body, *encoding).await;
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            depth(url, &invalid).await as usize >= n
        })
        .await,
        "only {} of {n} hostile payloads reached the invalid queue",
        depth(url, &invalid).await
    );
    let records = drain_json(url, &invalid).await;
    assert_eq!(records.len(), n);
    for record in &records {
        assert_eq!(record["reason"], json!("decode"), "{}", record["errors"]);
        assert!(record["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // and the worker is still there: a good payload after them lands
    publish_raw(
        url,
        &raw,
        batch(vec![product_viewed("after-hostile")])
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(
        wait_for_count(&s, doc! {"messageId": "after-hostile"}, 1, PATIENCE).await,
        1
    );
}

/// Issue #10: a body inside every limit whose batch-level `context` the worker would copy into
/// each of 2,000 events (330 KB × 2,000 = 660 MB) is refused before it is published.
#[tokio::test]
async fn a_small_batch_whose_shared_context_would_expand_to_660_mb_is_refused_with_413_and_not_published(
) {
    let s = settings("amplify");
    let collector = Collector::start(&s).await;
    let url = format!("{}/v1/batch", collector.url);
    let events: Vec<Value> = (0..2000)
        .map(|i| json!({"type": "track", "event": "Custom", "userId": format!("u-{i:06}"), "properties": {"pad": "xxxxxxxx"}}))
        .collect();
    let body = json!({"batch": events, "context": {"blob": "x".repeat(330_000)}}).to_string();
    assert!(
        (495_000..s.collector.max_batch_bytes).contains(&body.len()),
        "attack body of {} bytes",
        body.len()
    );
    let r = http()
        .post_as(&url, IOS_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["success"], json!(false));
    assert_eq!(answer["code"], json!("batch_expands_too_large"), "{answer}");

    // A good request after it is published, and it alone: the refused one never was.
    assert_eq!(post_good(&collector.url, "after-amplify").await, 200);
    assert!(
        eventually(PATIENCE, || async {
            depth(s.broker.url.expose(), &raw_queue(&s)).await == 1
        })
        .await,
        "raw depth {}",
        depth(s.broker.url.expose(), &raw_queue(&s)).await
    );
}

/// Requests the collector has taken in on `/v1/batch`: in a slot now, or answered.
async fn batch_requests_seen(url: &str) -> u64 {
    let text = metrics_of(&http(), url).await;
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (sum("collector_in_flight_requests ") + sum("http_requests_total{route=\"/v1/batch\"")) as u64
}

/// Issue #10: a slot was taken before the write key was known, so `max_in_flight` anonymous
/// slow bodies (a key can only come from the body) locked every client out for
/// `body_timeout_ms`. A request with a known key in its Authorization header must still be
/// served; body-keyed requests have a smaller bound of their own.
#[tokio::test]
async fn slow_anonymous_bodies_filling_max_in_flight_never_lock_out_a_request_with_a_known_header_key(
) {
    let mut s = settings("anonslots");
    s.collector.max_in_flight = 4;
    s.collector.body_timeout_ms = 120_000;
    let collector = Collector::start(&s).await;
    let addr = host(&collector.url);
    let mut slow = Vec::new();
    for _ in 0..s.collector.max_in_flight {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(
            format!(
                "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n{{\"writeKey\":\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        slow.push(c);
    }
    let n = slow.len() as u64;
    assert!(
        eventually(PATIENCE, || async {
            batch_requests_seen(&collector.url).await >= n
        })
        .await,
        "the collector did not take in the slow requests"
    );

    assert_eq!(post_good(&collector.url, "known-key-1").await, 200);
    // An unknown header key is refused at once, slow body or not.
    let mut unknown = TcpStream::connect(&addr).await.unwrap();
    unknown
        .write_all(
            format!(
                "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic dW5rbm93bi1rZXk6\r\nContent-Length: 1000\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (status, body) = read_response(&mut unknown).await.expect("an answer");
    assert_eq!(
        (status, body["code"].clone()),
        (401, json!("unknown_write_key"))
    );

    // A key in the query (RudderStack's beacon) is checked from the head too: the request is
    // served while the slow bodies hold the body-keyed slots, and an unknown one is refused.
    let beacon = |key: &str| {
        http()
            .post(format!("{}/beacon/v1/batch?writeKey={key}", collector.url))
            .header("content-type", "text/plain;charset=UTF-8")
            .body(json!({"batch": [product_viewed("query-key-1")]}).to_string())
            .send()
    };
    assert_eq!(beacon(IOS_KEY).await.unwrap().status(), 200);
    let refused = beacon("unknown-key").await.unwrap();
    assert_eq!(refused.status(), 401);

    // Once the slow bodies are gone, a beacon with its key in the body is served again.
    drop(slow);
    assert!(
        eventually(PATIENCE, || async {
            http()
                .post(format!("{}/v1/batch", collector.url))
                .header("content-type", "text/plain")
                .body(
                    json!({"writeKey": IOS_KEY, "batch": [product_viewed("beacon-after")]})
                        .to_string(),
                )
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await,
        "body-keyed slots were not given back"
    );
}
