//! Stand-ins for the worker's statsd daemon (a UDP socket) and HTTP sink (a webhook that
//! answers 200), counting what arrives. `GET /stats` on the HTTP port reports the counts, so a
//! benchmark can tell when the worker has delivered everything.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

#[derive(Default)]
pub struct Counts {
    pub http_requests: AtomicU64,
    pub http_events: AtomicU64,
    pub http_bytes: AtomicU64,
    pub udp_datagrams: AtomicU64,
    pub udp_lines: AtomicU64,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub http_requests: u64,
    pub http_events: u64,
    pub http_bytes: u64,
    pub udp_datagrams: u64,
    pub udp_lines: u64,
}

impl Counts {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            http_requests: self.http_requests.load(Ordering::Relaxed),
            http_events: self.http_events.load(Ordering::Relaxed),
            http_bytes: self.http_bytes.load(Ordering::Relaxed),
            udp_datagrams: self.udp_datagrams.load(Ordering::Relaxed),
            udp_lines: self.udp_lines.load(Ordering::Relaxed),
        }
    }
}

/// Counts the events of a JSON array body (or NDJSON lines) without building it.
fn count_events(body: &[u8]) -> u64 {
    match serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(body) {
        Ok(events) => events.len() as u64,
        Err(_) => body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64,
    }
}

async fn hook(State(counts): State<Arc<Counts>>, body: axum::body::Bytes) -> StatusCode {
    counts.http_requests.fetch_add(1, Ordering::Relaxed);
    counts
        .http_events
        .fetch_add(count_events(&body), Ordering::Relaxed);
    counts
        .http_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    StatusCode::OK
}

async fn stats(State(counts): State<Arc<Counts>>) -> Json<Snapshot> {
    Json(counts.snapshot())
}

/// Serves the HTTP receiver on `http` (POST anywhere but `/stats`) and the UDP one on `udp`,
/// until the process ends.
pub async fn serve(http: SocketAddr, udp: SocketAddr) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let socket = tokio::net::UdpSocket::bind(udp).await?;
    let udp_counts = counts.clone();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_536];
        while let Ok(n) = socket.recv(&mut buffer).await {
            udp_counts.udp_datagrams.fetch_add(1, Ordering::Relaxed);
            let lines = buffer[..n].split(|b| *b == b'\n').filter(|l| !l.is_empty());
            udp_counts
                .udp_lines
                .fetch_add(lines.count() as u64, Ordering::Relaxed);
        }
    });
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/{*path}", post(hook))
        .with_state(counts);
    let listener = tokio::net::TcpListener::bind(http).await?;
    axum::serve(listener, app).await?;
    Ok(())
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
}
