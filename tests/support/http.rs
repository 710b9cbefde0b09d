//! HTTP for tests: a client, posting batches, a vendor's webhook stood in by a real server,
//! reading `/metrics`, and a raw HTTP/1.1 exchange.

use std::io::Write;
use std::time::Duration;
use tokio::task::JoinHandle;

use crate::*;

/// A TCP port nobody listens on now, outside 35672-35682: RabbitMQ's CLI tools take their own
/// distribution ports there, so a node listening on one of them makes `rabbitmqctl` fail.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !(35672..=35682).contains(&port) {
            return port;
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Polls `url` until it answers `expected`, for up to 30 s.
pub async fn status_becomes(client: &reqwest::Client, url: String, expected: u16) -> bool {
    eventually(Duration::from_secs(30), || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == expected)
        }
    })
    .await
}

/// How the test HTTP receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Status(u16),
    /// Accept the request and never answer.
    Hang,
    /// Never answer the first request; answer every later one as `Ok`.
    HangFirst,
    /// Hold every request until the mode is changed, then answer it as the new mode says.
    Held,
    /// A vendor with rules: 400, with a reason naming the event, for a batch holding an event
    /// whose `properties.<marker>` is `true`; every other batch as `Ok`.
    RefuseMarked(&'static str),
}

/// A batch the receiver accepted (answered 200).
#[derive(Debug, Clone)]
pub struct Received {
    pub key: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub events: Vec<serde_json::Value>,
}

#[derive(Default)]
pub struct ReceiverState {
    pub mode: std::sync::Mutex<Option<Mode>>,
    /// Bumped on every change of mode, for the requests it holds.
    changed: std::sync::Mutex<Option<tokio::sync::watch::Sender<u64>>>,
    pub received: std::sync::Mutex<Vec<Received>>,
    pub hits: std::sync::atomic::AtomicUsize,
    /// Events in each POST that was a JSON array, in arrival order, refused ones too.
    pub posts: std::sync::Mutex<Vec<usize>>,
    /// POSTs answered 400 by [`Mode::RefuseMarked`].
    pub refused: std::sync::atomic::AtomicUsize,
    /// With keys honoured: POSTs that repeated a key already accepted (answered 200, not kept).
    pub repeats: std::sync::atomic::AtomicUsize,
    honour_keys: std::sync::atomic::AtomicBool,
}

/// A real HTTP server on 127.0.0.1 standing in for a vendor's webhook: the one every test
/// that needs a webhook uses.
pub struct Receiver {
    pub url: String,
    pub state: std::sync::Arc<ReceiverState>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Self {
        Self::serve(mode, false).await
    }

    /// A receiver that honours `Idempotency-Key` as a vendor that deduplicates does: a POST
    /// repeating a key it already accepted is answered 200 and not kept again.
    pub async fn honouring_keys(mode: Mode) -> Self {
        Self::serve(mode, true).await
    }

    async fn serve(mode: Mode, honour_keys: bool) -> Self {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use std::sync::atomic::Ordering::SeqCst;
        let state = std::sync::Arc::new(ReceiverState::default());
        *state.mode.lock().unwrap() = Some(mode);
        *state.changed.lock().unwrap() = Some(tokio::sync::watch::channel(0).0);
        state.honour_keys.store(honour_keys, SeqCst);
        async fn receive(
            State(state): State<std::sync::Arc<ReceiverState>>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> (StatusCode, String) {
            let earlier = state.hits.fetch_add(1, SeqCst);
            let mut changed = state.changed.lock().unwrap().as_ref().unwrap().subscribe();
            let current = || state.mode.lock().unwrap().unwrap_or(Mode::Ok);
            while current() == Mode::Held {
                let _ = changed.changed().await;
            }
            let mode = match current() {
                Mode::HangFirst if earlier == 0 => Mode::Hang,
                Mode::HangFirst => Mode::Ok,
                mode => mode,
            };
            let events = serde_json::from_slice::<Vec<serde_json::Value>>(&body);
            if let Ok(events) = &events {
                state.posts.lock().unwrap().push(events.len());
            }
            match mode {
                Mode::Hang | Mode::HangFirst | Mode::Held => {
                    std::future::pending::<()>().await;
                    (StatusCode::OK, String::new())
                }
                Mode::Status(code) => (StatusCode::from_u16(code).unwrap(), String::new()),
                Mode::Ok | Mode::RefuseMarked(_) => {
                    let Ok(events) = events else {
                        return (StatusCode::BAD_REQUEST, "not a JSON array".to_owned());
                    };
                    if let Mode::RefuseMarked(marker) = mode {
                        let marked = events
                            .iter()
                            .find(|e| e["properties"][marker] == serde_json::json!(true));
                        if let Some(bad) = marked {
                            state.refused.fetch_add(1, SeqCst);
                            let id = bad["messageId"].as_str().unwrap_or_default();
                            let why = format!("event {id} has a property we refuse");
                            return (StatusCode::BAD_REQUEST, why);
                        }
                    }
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let key = header("idempotency-key").unwrap_or_default();
                    let mut received = state.received.lock().unwrap();
                    if state.honour_keys.load(SeqCst) && received.iter().any(|r| r.key == key) {
                        state.repeats.fetch_add(1, SeqCst);
                        return (StatusCode::OK, String::new());
                    }
                    received.push(Received {
                        key,
                        authorization: header("authorization"),
                        content_type: header("content-type"),
                        events,
                    });
                    (StatusCode::OK, String::new())
                }
            }
        }
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    /// Changes how it answers; requests it holds ([`Mode::Held`]) are answered as `mode` says.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = Some(mode);
        if let Some(changed) = self.state.changed.lock().unwrap().as_ref() {
            changed.send_modify(|generation| *generation += 1);
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// messageId → the idempotency keys it arrived under (one entry per receipt).
    pub fn receipts(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for batch in self.received() {
            for event in &batch.events {
                let id = event["messageId"].as_str().unwrap_or_default().to_owned();
                out.entry(id).or_default().push(batch.key.clone());
            }
        }
        out
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Events in each POST, in arrival order.
    pub fn posts(&self) -> Vec<usize> {
        self.state.posts.lock().unwrap().clone()
    }

    /// What it saw, for a test's log line.
    pub fn figures(&self) -> String {
        use std::sync::atomic::Ordering::SeqCst;
        let posts = self.posts();
        format!(
            "{} POSTs (largest {} events), {} refused, {} repeated keys",
            posts.len(),
            posts.iter().max().unwrap_or(&0),
            self.state.refused.load(SeqCst),
            self.state.repeats.load(SeqCst)
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A POST with a write key as the SDKs send it: the key as the Basic username, no password.
/// The one way the tests post as a source.
pub trait PostAs {
    fn post_as(
        &self,
        url: impl reqwest::IntoUrl,
        key: impl std::fmt::Display,
    ) -> reqwest::RequestBuilder;
}

impl PostAs for reqwest::Client {
    fn post_as(
        &self,
        url: impl reqwest::IntoUrl,
        key: impl std::fmt::Display,
    ) -> reqwest::RequestBuilder {
        self.post(url).basic_auth(key, Some(""))
    }
}

/// `POST {collector}/v1/batch` with the iOS test key.
pub async fn post_batch(
    client: &reqwest::Client,
    collector: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client
        .post_as(format!("{collector}/v1/batch"), IOS_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// `GET {base}/metrics`, as text.
pub async fn metrics_of(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line `name{labels} value` in Prometheus text format (0 if absent).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The bytes gunzipped if they are gzip (by their magic number), else as they are.
pub fn gunzip_if_gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes), &mut out)?;
    Ok(out)
}

/// One HTTP/1.1 exchange on a new connection, as a device's client would write it: the request
/// line, `Host`, the given headers and `Connection: close`, then the body, with a
/// `Content-Length` or, when `chunked`, as `Transfer-Encoding: chunked` in chunks of at most
/// `chunk` bytes. Returns the status, the response head (lowercased) and its body, read until the
/// collector closes the connection; `None` if it did not answer within 30 s.
pub async fn http1_exchange(
    base_url: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: &[u8],
    chunked: Option<usize>,
) -> Option<(u16, String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.strip_prefix("http://").unwrap_or(base_url);
    let mut request =
        format!("POST {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut bytes = match chunked {
        Some(_) => format!("{request}Transfer-Encoding: chunked\r\n\r\n").into_bytes(),
        None => format!("{request}Content-Length: {}\r\n\r\n", body.len()).into_bytes(),
    };
    match chunked {
        Some(size) => {
            for piece in body.chunks(size.max(1)) {
                bytes.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                bytes.extend_from_slice(piece);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
        None => bytes.extend_from_slice(body),
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(&bytes).await.ok()?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.ok()?;
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let status = head.get(9..12)?.parse().ok()?;
        Some((status, head, got[end + 4..].to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .ok()
        .flatten()
}
