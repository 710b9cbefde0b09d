//! The HTTP sink against a real local server: what it sends (headers, formats), how it reads
//! each answer (retryable, throttled, permanent, refused alike), its settings' checks and its
//! secrets kept out of errors. What the body's events and keys hold: `keys`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response as AxumResponse};
use axum::Router;
use ingest_pipeline::settings::DeliverySettings;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

const SECRET: &str = "Bearer s3cr3t-t0ken-do-not-log";

type Reply = Arc<dyn Fn(&HeaderMap) -> AxumResponse + Send + Sync>;

#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
}

#[derive(Clone)]
struct ServerState {
    received: Arc<Mutex<Vec<Received>>>,
    reply: Reply,
}

/// An axum server on an ephemeral port that records every request; aborted on drop.
struct TestServer {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(reply: impl Fn(&HeaderMap) -> AxumResponse + Send + Sync + 'static) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let state = ServerState {
            received: Arc::clone(&received),
            reply: Arc::new(reply),
        };
        let app = Router::new().fallback(record).with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/ingest"),
            received,
            task,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(State(state): State<ServerState>, headers: HeaderMap, body: Bytes) -> AxumResponse {
    let reply = (state.reply)(&headers);
    state.received.lock().expect("lock").push(Received {
        headers,
        body: body.to_vec(),
    });
    reply
}

fn settings(url: &str) -> HttpSinkSettings {
    HttpSinkSettings {
        name: "test-http".to_owned(),
        url: url.to_owned(),
        headers: BTreeMap::from([
            ("Authorization".to_owned(), Secret::new(SECRET)),
            ("X-Tenant".to_owned(), Secret::new("acme")),
        ]),
        format: BodyFormat::Json,
        connect_timeout_ms: 2_000,
        request_timeout_ms: 5_000,
        delivery: DeliverySettings::default(),
    }
}

fn sink(url: &str) -> HttpSink {
    HttpSink::new(settings(url)).expect("valid settings")
}

fn event(value: Value) -> Arc<Event> {
    match value {
        Value::Object(map) => Arc::new(Event::from(map)),
        other => panic!("not an object: {other}"),
    }
}

fn batch() -> Batch {
    Batch {
        key: "batch-7f3a".to_owned(),
        events: vec![
            event(json!({"type": "track", "event": "Signed Up", "messageId": "m1"})),
            event(json!({"type": "identify", "traits": {"name": "Zoë\nLine"}, "messageId": "m2"})),
        ],
    }
}

fn header<'a>(received: &'a Received, name: &str) -> Option<&'a str> {
    received.headers.get(name).and_then(|v| v.to_str().ok())
}

/// A port that was just free; connecting to it is refused.
async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}/ingest")
}

fn events_of(batch: &Batch) -> Vec<Event> {
    batch.events.iter().map(|e| e.as_ref().clone()).collect()
}

#[test]
fn validate_names_each_bad_setting() {
    let good = settings("https://example.com/events");
    assert_eq!(validate(&good), Ok(()));

    type Mutation = fn(&mut HttpSinkSettings);
    let cases: [(&str, Mutation); 10] = [
        ("name", |s| s.name = "Warehouse".to_owned()),
        ("name", |s| s.name = String::new()),
        ("url", |s| s.url = "not a url".to_owned()),
        ("scheme", |s| s.url = "ftp://example.com/x".to_owned()),
        ("credentials", |s| {
            s.url = "https://u:p@example.com/".to_owned()
        }),
        ("header name", |s| {
            s.headers.insert("Bad Header".to_owned(), Secret::new("x"));
        }),
        ("set by the sink", |s| {
            s.headers
                .insert("Idempotency-Key".to_owned(), Secret::new("x"));
        }),
        ("more than once", |s| {
            s.headers
                .insert("authorization".to_owned(), Secret::new("x"));
        }),
        ("connect_timeout_ms", |s| s.connect_timeout_ms = 0),
        ("request_timeout_ms", |s| s.request_timeout_ms = 0),
    ];
    for (expected, mutate) in cases {
        let mut bad = good.clone();
        mutate(&mut bad);
        let error = validate(&bad).expect_err(expected);
        assert!(
            error.contains(expected),
            "{error:?} should mention {expected}"
        );
        assert!(
            HttpSink::new(bad).is_err(),
            "new must refuse what validate refuses"
        );
    }
}

#[test]
fn invalid_header_value_error_does_not_quote_the_value() {
    let mut bad = settings("https://example.com/events");
    let value = format!("{SECRET}\r\nX-Injected: 1");
    bad.headers
        .insert("Authorization".to_owned(), Secret::new(value));
    let error = validate(&bad).expect_err("CR/LF is not a valid header value");
    assert!(error.contains("Authorization"), "{error}");
    assert!(!error.contains(SECRET), "{error}");
}

#[test]
fn settings_debug_redacts_header_values() {
    let settings = settings("https://example.com/events");
    let debug = format!("{settings:?}");
    assert!(debug.contains("Authorization"), "{debug}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(!debug.contains("acme"), "{debug}");
    let sink = HttpSink::new(settings).expect("valid");
    assert!(!format!("{sink:?}").contains(SECRET));
}

#[test]
fn retry_after_parses_seconds_and_dates_and_caps_at_an_hour() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let with = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).expect("value"));
        retry_after(&headers, now)
    };
    assert_eq!(with("7"), Some(Duration::from_secs(7)));
    assert_eq!(with(" 0 "), Some(Duration::ZERO));
    assert_eq!(with("86400"), Some(MAX_RETRY_AFTER));
    assert_eq!(with("99999999999999999999999"), Some(MAX_RETRY_AFTER));
    let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
    assert_eq!(with(&in_90s), Some(Duration::from_secs(90)));
    let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
    assert_eq!(with(&past), Some(Duration::ZERO));
    assert_eq!(with("-5"), None);
    assert_eq!(with("soon"), None);
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}

#[tokio::test]
async fn posts_json_with_idempotency_key_and_configured_headers() {
    let server = TestServer::start(|_| StatusCode::OK.into_response()).await;
    let batch = batch();
    assert_eq!(sink(&server.url).deliver(&batch).await, Ok(()));

    let received = server.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(header(request, "content-type"), Some("application/json"));
    assert_eq!(header(request, "idempotency-key"), Some("batch-7f3a"));
    assert_eq!(header(request, "authorization"), Some(SECRET));
    assert_eq!(header(request, "x-tenant"), Some("acme"));
    let parsed: Vec<Event> = serde_json::from_slice(&request.body).expect("JSON array");
    assert_eq!(parsed, events_of(&batch));
}

#[tokio::test]
async fn posts_ndjson_when_configured() {
    let server = TestServer::start(|_| StatusCode::ACCEPTED.into_response()).await;
    let mut settings = settings(&server.url);
    settings.format = BodyFormat::Ndjson;
    let batch = batch();
    let sink = HttpSink::new(settings).expect("valid");
    assert_eq!(sink.deliver(&batch).await, Ok(()));

    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        header(&received[0], "content-type"),
        Some("application/x-ndjson")
    );
    let text = std::str::from_utf8(&received[0].body).expect("utf-8");
    assert!(text.ends_with('\n'));
    let parsed: Vec<Event> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("one object per line"))
        .collect();
    assert_eq!(parsed, events_of(&batch));
}

#[tokio::test]
async fn service_unavailable_with_retry_after_seconds_is_throttled() {
    let server = TestServer::start(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(RETRY_AFTER, "7")],
            "busy",
        )
            .into_response()
    })
    .await;
    match sink(&server.url).deliver(&batch()).await {
        Err(SinkError::Throttled {
            reason,
            retry_after,
        }) => {
            assert_eq!(retry_after, Duration::from_secs(7));
            assert!(reason.contains("503"), "{reason}");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
}

#[tokio::test]
async fn too_many_requests_with_retry_after_date_is_throttled() {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    let server = TestServer::start(move |_| {
        (StatusCode::TOO_MANY_REQUESTS, [(RETRY_AFTER, date.clone())]).into_response()
    })
    .await;
    match sink(&server.url).deliver(&batch()).await {
        Err(SinkError::Throttled {
            reason,
            retry_after,
        }) => {
            assert!(
                (Duration::from_secs(27)..=Duration::from_secs(30)).contains(&retry_after),
                "{retry_after:?}"
            );
            assert!(reason.contains("429"), "{reason}");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
}

#[tokio::test]
async fn server_error_without_retry_after_is_retryable() {
    let server = TestServer::start(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()).await;
    match sink(&server.url).deliver(&batch()).await {
        Err(SinkError::Retryable(reason)) => assert!(reason.contains("500"), "{reason}"),
        other => panic!("expected Retryable, got {other:?}"),
    }
}

#[tokio::test]
async fn request_timeout_status_is_retryable() {
    let server = TestServer::start(|_| StatusCode::REQUEST_TIMEOUT.into_response()).await;
    let result = sink(&server.url).deliver(&batch()).await;
    assert!(
        matches!(result, Err(SinkError::Retryable(ref r)) if r.contains("408")),
        "{result:?}"
    );
}

#[tokio::test]
async fn bad_request_is_permanent_with_status_and_short_body() {
    let long_reason = format!("field `event` is required {}", "x".repeat(1_000));
    let server =
        TestServer::start(move |_| (StatusCode::BAD_REQUEST, long_reason.clone()).into_response())
            .await;
    match sink(&server.url).deliver(&batch()).await {
        Err(SinkError::Permanent(reason)) => {
            assert!(reason.contains("400"), "{reason}");
            assert!(reason.contains("field `event` is required"), "{reason}");
            assert!(reason.chars().count() < 260, "body not truncated: {reason}");
        }
        other => panic!("expected Permanent, got {other:?}"),
    }
}

/// A refusal of the request itself: every event of the batch refused, for the same reason
/// (the runner dead-letters them without bisecting, since every part would get that answer).
fn refused_alike(result: &Result<(), SinkError>, events: usize) -> Option<String> {
    let Err(SinkError::Refused(refused)) = result else {
        return None;
    };
    let (_, first) = refused.first()?;
    let alike = refused.len() == events
        && refused
            .iter()
            .enumerate()
            .all(|(i, (at, reason))| *at == i && reason == first);
    alike.then(|| first.clone())
}

#[tokio::test]
async fn not_found_refuses_every_event_for_good() {
    let server = TestServer::start(|_| StatusCode::NOT_FOUND.into_response()).await;
    let result = sink(&server.url).deliver(&batch()).await;
    assert_eq!(
        refused_alike(&result, 2).as_deref(),
        Some("HTTP 404 Not Found"),
        "{result:?}"
    );
    let one = Batch {
        key: "one".to_owned(),
        events: batch().events[..1].to_vec(),
    };
    let result = sink(&server.url).deliver(&one).await;
    assert!(
        matches!(result, Err(SinkError::Permanent(ref r)) if r == "HTTP 404 Not Found"),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_refusal_that_may_be_about_one_event_is_permanent_for_the_runner_to_bisect() {
    for status in [
        StatusCode::BAD_REQUEST,
        StatusCode::FORBIDDEN,
        StatusCode::PAYLOAD_TOO_LARGE,
        StatusCode::UNPROCESSABLE_ENTITY,
    ] {
        let server = TestServer::start(move |_| status.into_response()).await;
        let result = sink(&server.url).deliver(&batch()).await;
        assert!(
            matches!(result, Err(SinkError::Permanent(ref r)) if r.contains(status.as_str())),
            "{status}: {result:?}"
        );
    }
}

#[tokio::test]
async fn redirect_is_refused_for_good_and_not_followed() {
    let server = TestServer::start(|_| {
        (StatusCode::TEMPORARY_REDIRECT, [("location", "/elsewhere")]).into_response()
    })
    .await;
    let result = sink(&server.url).deliver(&batch()).await;
    assert!(
        refused_alike(&result, 2).is_some_and(|r| r.contains("307")),
        "{result:?}"
    );
    assert_eq!(
        server.received().len(),
        1,
        "the redirect must not be followed"
    );
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let url = closed_port_url().await;
    match sink(&url).deliver(&batch()).await {
        Err(SinkError::Retryable(reason)) => {
            assert!(reason.starts_with("connection failed"), "{reason}");
            assert!(!reason.contains(SECRET), "{reason}");
        }
        other => panic!("expected Retryable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_that_never_answers_is_retryable_after_the_request_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut settings = settings(&format!("http://{addr}/ingest"));
    settings.request_timeout_ms = 300;
    let sink = HttpSink::new(settings).expect("valid");

    let started = Instant::now();
    let result = sink.deliver(&batch()).await;
    let elapsed = started.elapsed();
    silent.abort();

    assert!(
        matches!(result, Err(SinkError::Retryable(ref r)) if r.starts_with("request timed out")),
        "{result:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(250),
        "returned before the timeout: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[tokio::test]
async fn an_error_body_echoing_the_secret_header_is_redacted() {
    let server = TestServer::start(|headers| {
        let echoed = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing")
            .to_owned();
        (
            StatusCode::UNAUTHORIZED,
            format!("invalid credentials: {echoed}"),
        )
            .into_response()
    })
    .await;
    let result = sink(&server.url).deliver(&batch()).await;
    let Some(message) = refused_alike(&result, 2) else {
        panic!("expected every event refused, got {result:?}");
    };
    assert!(message.contains("401"), "{message}");
    assert!(
        message.contains("invalid credentials: <redacted>"),
        "{message}"
    );
    assert!(!format!("{result:?}").contains(SECRET));
}

#[path = "key_tests.rs"]
mod keys;
