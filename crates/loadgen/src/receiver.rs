//! Stand-ins for the worker's statsd daemon (a UDP socket) and HTTP sink (a webhook), counting
//! what arrives. `GET /stats` on the HTTP port reports the counts, so a benchmark can tell when
//! the worker has delivered everything.
//!
//! The webhook answers 200 at once by default. A [`Behaviour`] makes it a slow sink (answer
//! after a delay) or a failing one (answer another status, e.g. 503); only the events of
//! requests answered 2xx count as delivered. With `record_ids` it also keeps the `messageId`
//! of every delivered event (`GET /ids`), so a benchmark can check that nothing was lost. With
//! `record_lag` it keeps each delivered event's end-to-end lag, its arrival here minus its
//! `receivedAt` (the collector's receipt): `GET /lag` gives the percentiles of those since
//! the last `DELETE /lag`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

/// How the webhook answers.
#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    /// Waits this long before answering each request.
    pub delay: Duration,
    /// Answers this status (200 unless told otherwise).
    pub status: StatusCode,
    /// Keeps the `messageId` of every delivered event.
    pub record_ids: bool,
    /// Keeps every delivered event's lag since its `receivedAt`.
    pub record_lag: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            status: StatusCode::OK,
            record_ids: false,
            record_lag: false,
        }
    }
}

#[derive(Default)]
pub struct Counts {
    pub http_requests: AtomicU64,
    pub http_events: AtomicU64,
    pub http_bytes: AtomicU64,
    pub http_refused_requests: AtomicU64,
    pub http_refused_events: AtomicU64,
    pub udp_datagrams: AtomicU64,
    pub udp_lines: AtomicU64,
    /// Events delivered whose `messageId` had been delivered before (with `record_ids`).
    pub http_repeated_events: AtomicU64,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Requests answered 2xx, and their events and bytes.
    pub http_requests: u64,
    pub http_events: u64,
    pub http_bytes: u64,
    /// Requests answered with another status, and their events.
    #[serde(default)]
    pub http_refused_requests: u64,
    #[serde(default)]
    pub http_refused_events: u64,
    #[serde(default)]
    pub http_repeated_events: u64,
    pub udp_datagrams: u64,
    pub udp_lines: u64,
}

impl Counts {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            http_requests: self.http_requests.load(Ordering::Relaxed),
            http_events: self.http_events.load(Ordering::Relaxed),
            http_bytes: self.http_bytes.load(Ordering::Relaxed),
            http_refused_requests: self.http_refused_requests.load(Ordering::Relaxed),
            http_refused_events: self.http_refused_events.load(Ordering::Relaxed),
            http_repeated_events: self.http_repeated_events.load(Ordering::Relaxed),
            udp_datagrams: self.udp_datagrams.load(Ordering::Relaxed),
            udp_lines: self.udp_lines.load(Ordering::Relaxed),
        }
    }
}

/// Counts the events of a JSON array body (or NDJSON lines) without building it.
pub fn count_events(body: &[u8]) -> u64 {
    match serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(body) {
        Ok(events) => events.len() as u64,
        Err(_) => body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64,
    }
}

#[derive(serde::Deserialize)]
struct ReceivedAt {
    #[serde(rename = "receivedAt")]
    received_at: Option<String>,
}

/// Each event's lag in milliseconds at `now`: `now` minus its `receivedAt` (events without a
/// readable one are skipped).
pub fn lags_ms(body: &[u8], now: chrono::DateTime<chrono::Utc>) -> Vec<f64> {
    let events: Vec<ReceivedAt> = serde_json::from_slice(body).unwrap_or_default();
    events
        .into_iter()
        .filter_map(|e| chrono::DateTime::parse_from_rfc3339(&e.received_at?).ok())
        .map(|at| {
            (now - at.with_timezone(&chrono::Utc))
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1000.0
        })
        .collect()
}

/// Percentiles of the lags recorded.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Lag {
    pub events: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Lag {
    pub fn of(mut lags: Vec<f64>) -> Self {
        lags.sort_by(f64::total_cmp);
        let at = |q: f64| match lags.len() {
            0 => 0.0,
            n => lags[((n as f64 * q).ceil() as usize).clamp(1, n) - 1],
        };
        Self {
            events: lags.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

#[derive(serde::Deserialize)]
struct IdOnly {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
}

/// The `messageId`s of a JSON array body (or NDJSON lines); events without one are skipped.
pub fn message_ids(body: &[u8]) -> Vec<String> {
    let events: Vec<IdOnly> = match serde_json::from_slice(body) {
        Ok(events) => events,
        Err(_) => body
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect(),
    };
    events.into_iter().filter_map(|e| e.message_id).collect()
}

struct Receiver {
    counts: Counts,
    behaviour: Behaviour,
    ids: Mutex<HashSet<String>>,
    lags: Mutex<Vec<f64>>,
}

async fn hook(State(receiver): State<Arc<Receiver>>, body: axum::body::Bytes) -> StatusCode {
    let behaviour = receiver.behaviour;
    if !behaviour.delay.is_zero() {
        // A client that gives up meanwhile drops this future: nothing is counted.
        tokio::time::sleep(behaviour.delay).await;
    }
    let counts = &receiver.counts;
    let events = count_events(&body);
    if !behaviour.status.is_success() {
        counts.http_refused_requests.fetch_add(1, Ordering::Relaxed);
        counts
            .http_refused_events
            .fetch_add(events, Ordering::Relaxed);
        return behaviour.status;
    }
    if behaviour.record_ids {
        let ids = message_ids(&body);
        let mut seen = receiver
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let repeated = ids
            .into_iter()
            .filter(|id| !seen.insert(id.clone()))
            .count();
        counts
            .http_repeated_events
            .fetch_add(repeated as u64, Ordering::Relaxed);
    }
    if behaviour.record_lag {
        let lags = lags_ms(&body, chrono::Utc::now());
        receiver
            .lags
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(lags);
    }
    counts.http_requests.fetch_add(1, Ordering::Relaxed);
    counts.http_events.fetch_add(events, Ordering::Relaxed);
    counts
        .http_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    behaviour.status
}

async fn stats(State(receiver): State<Arc<Receiver>>) -> Json<Snapshot> {
    Json(receiver.counts.snapshot())
}

async fn lag(State(receiver): State<Arc<Receiver>>) -> Json<Lag> {
    let lags = receiver
        .lags
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Json(Lag::of(lags))
}

async fn forget_lag(State(receiver): State<Arc<Receiver>>) -> StatusCode {
    receiver
        .lags
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    StatusCode::NO_CONTENT
}

async fn ids(State(receiver): State<Arc<Receiver>>) -> Json<Vec<String>> {
    let seen = receiver
        .ids
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Json(seen.iter().cloned().collect())
}

/// Serves the HTTP receiver on `http` (POST anywhere but `/stats` and `/ids`) and, if given,
/// the UDP one on `udp`, until the process ends.
pub async fn serve(
    http: SocketAddr,
    udp: Option<SocketAddr>,
    behaviour: Behaviour,
) -> anyhow::Result<()> {
    let receiver = Arc::new(Receiver {
        counts: Counts::default(),
        behaviour,
        ids: Mutex::new(HashSet::new()),
        lags: Mutex::new(Vec::new()),
    });
    if let Some(udp) = udp {
        let socket = tokio::net::UdpSocket::bind(udp).await?;
        let udp_receiver = receiver.clone();
        tokio::spawn(async move {
            let counts = &udp_receiver.counts;
            let mut buffer = vec![0u8; 65_536];
            while let Ok(n) = socket.recv(&mut buffer).await {
                counts.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                let lines = buffer[..n].split(|b| *b == b'\n').filter(|l| !l.is_empty());
                counts
                    .udp_lines
                    .fetch_add(lines.count() as u64, Ordering::Relaxed);
            }
        });
    }
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/ids", get(ids))
        .route("/lag", get(lag).delete(forget_lag))
        .route("/{*path}", post(hook))
        .with_state(receiver);
    let listener = tokio::net::TcpListener::bind(http).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Reads the `messageId`s a running receiver (started with `record_ids`) has had delivered.
pub async fn fetch_ids(client: &reqwest::Client, base: &str) -> anyhow::Result<Vec<String>> {
    Ok(client
        .get(format!("{}/ids", base.trim_end_matches('/')))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Reads a running receiver's counts.
pub async fn fetch(client: &reqwest::Client, base: &str) -> anyhow::Result<Snapshot> {
    Ok(client
        .get(format!("{}/stats", base.trim_end_matches('/')))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_are_counted_in_arrays_and_lines() {
        assert_eq!(super::count_events(br#"[{"a":1},{"b":[1,2]}]"#), 2);
        assert_eq!(super::count_events(b"{\"a\":1}\n{\"b\":2}\n"), 2);
    }

    #[test]
    fn lags_are_read_from_received_at_and_summed_up_as_percentiles() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-06T10:00:01.000Z")
            .expect("a time")
            .with_timezone(&chrono::Utc);
        let body = br#"[{"receivedAt":"2026-12-06T10:00:00.750Z"},{"x":1},{"receivedAt":"2026-12-06T10:00:00.000Z"}]"#;
        assert_eq!(super::lags_ms(body, now), [250.0, 1000.0]);
        let lag = super::Lag::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (lag.events, lag.p50_ms, lag.p99_ms, lag.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(super::Lag::of(vec![]).events, 0);
    }

    #[test]
    fn message_ids_are_read_from_arrays_and_lines() {
        let array = br#"[{"messageId":"a","x":{"messageId":"nested"}},{"y":1},{"messageId":"b"}]"#;
        assert_eq!(super::message_ids(array), ["a", "b"]);
        assert_eq!(
            super::message_ids(b"{\"messageId\":\"c\"}\n{\"messageId\":\"d\"}\n"),
            ["c", "d"]
        );
    }
}
