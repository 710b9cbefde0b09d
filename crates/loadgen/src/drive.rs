//! Driving a target: open loop at a scheduled arrival rate, or closed loop at a concurrency.
//!
//! Open loop is coordinated-omission safe: every request has an intended send time from the
//! schedule, and its latency is measured from that time, so a server that stalls the sender
//! is charged for the requests that queued up behind the stall. In-flight requests are bounded
//! (`max_outstanding`); past the bound the sender waits, and the wait counts as latency.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, USER_AGENT};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::payload::{Generator, Payload};
use crate::record::{Outcome, Recorder};

/// Something a payload is sent to: the collector over HTTP, or the broker directly.
pub trait Target: Send + Sync + 'static {
    fn send(&self, body: Bytes, gzip: bool) -> impl Future<Output = Outcome> + Send;
}

/// Rate phases: `30s@200,60s@2000,60s@200` (requests per second for each length of time).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule(pub Vec<(Duration, f64)>);

impl Schedule {
    pub fn constant(rate: f64, length: Duration) -> Self {
        Self(vec![(length, rate)])
    }

    pub fn total(&self) -> Duration {
        self.0.iter().map(|(d, _)| *d).sum()
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut phases = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (length, rate) = part
                .split_once('@')
                .ok_or_else(|| format!("`{part}`: expected LENGTHs@RATE, e.g. 30s@500"))?;
            let secs: f64 = length
                .trim_end_matches('s')
                .parse()
                .map_err(|_| format!("`{part}`: bad length"))?;
            let rate: f64 = rate.parse().map_err(|_| format!("`{part}`: bad rate"))?;
            if !(secs > 0.0 && rate > 0.0 && secs.is_finite() && rate.is_finite()) {
                return Err(format!("`{part}`: length and rate must be positive"));
            }
            phases.push((Duration::from_secs_f64(secs), rate));
        }
        if phases.is_empty() {
            return Err("empty schedule".into());
        }
        Ok(Self(phases))
    }
}

/// Payloads made on a thread of their own, so making them never delays a send.
fn payload_feed(
    mut generator: Generator,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> mpsc::Receiver<Payload> {
    let (tx, rx) = mpsc::channel(2048);
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if tx.blocking_send(generator.next_payload()).is_err() {
                return;
            }
        }
    });
    rx
}

/// Sends at the schedule's rates; returns when every sent request has ended (or `drain_timeout`).
pub async fn open_loop<T: Target>(
    target: Arc<T>,
    generator: Generator,
    schedule: &Schedule,
    recorder: &Recorder,
    max_outstanding: usize,
    drain_timeout: Duration,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut feed = payload_feed(generator, stop.clone());
    let outstanding = Arc::new(Semaphore::new(max_outstanding));
    recorder.start();
    let start = Instant::from_std(recorder.started());
    let mut phase_start = start;
    for (length, rate) in &schedule.0 {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let end = phase_start + *length;
        let mut due = phase_start;
        while due < end {
            tokio::time::sleep_until(due).await;
            let Ok(permit) = outstanding.clone().acquire_owned().await else {
                break;
            };
            let Some(payload) = feed.recv().await else {
                break;
            };
            recorder.offered(due.into_std());
            let (target, recorder) = (target.clone(), recorder.clone());
            let intended = due.into_std();
            tokio::spawn(async move {
                let outcome = target.send(payload.body.clone(), payload.gzip).await;
                recorder.completed(intended, &outcome, &payload.ids, payload.json_len);
                drop(permit);
            });
            due += interval;
        }
        phase_start = end;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(feed);
    wait_outstanding(&outstanding, max_outstanding, drain_timeout).await;
    recorder.finish();
}

/// `concurrency` senders, each sending its next request as soon as the last one ended.
pub async fn closed_loop<T: Target>(
    target: Arc<T>,
    generator: Generator,
    concurrency: usize,
    length: Duration,
    recorder: &Recorder,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feed = Arc::new(tokio::sync::Mutex::new(payload_feed(
        generator,
        stop.clone(),
    )));
    recorder.start();
    let deadline = Instant::from_std(recorder.started()) + length;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, recorder, feed) = (target.clone(), recorder.clone(), feed.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let Some(payload) = feed.lock().await.recv().await else {
                    return;
                };
                let intended = std::time::Instant::now();
                recorder.offered(intended);
                let outcome = target.send(payload.body.clone(), payload.gzip).await;
                recorder.completed(intended, &outcome, &payload.ids, payload.json_len);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    recorder.finish();
}

async fn wait_outstanding(outstanding: &Semaphore, all: usize, within: Duration) {
    let all = u32::try_from(all).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(within, outstanding.acquire_many(all)).await;
}

/// The collector's `/v1/batch`, with the write key as Basic username.
pub struct HttpTarget {
    client: reqwest::Client,
    url: String,
    authorization: HeaderValue,
}

impl HttpTarget {
    /// `base`: e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str, write_key: &str, timeout: Duration) -> anyhow::Result<Self> {
        use base64::Engine as _;
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .tcp_nodelay(true)
                .pool_idle_timeout(Duration::from_secs(30))
                .build()?,
            url: format!("{}/v1/batch", base.trim_end_matches('/')),
            authorization: HeaderValue::from_str(&format!("Basic {credentials}"))?,
        })
    }
}

impl Target for HttpTarget {
    async fn send(&self, body: Bytes, gzip: bool) -> Outcome {
        let mut request = self
            .client
            .post(&self.url)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                "Shop/4.12.0 (iPhone; iOS 17.4.1) analytics-swift/1.5.11",
            );
        if gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        match request.body(body).send().await {
            Ok(response) => {
                let status = response.status();
                // Read the answer to the end so the connection goes back to the pool.
                let _ = response.bytes().await;
                if status.is_success() {
                    Outcome::Accepted
                } else {
                    Outcome::Status(status.as_u16())
                }
            }
            Err(error) if error.is_timeout() => Outcome::Failed("timeout".into()),
            Err(error) if error.is_connect() => Outcome::Failed("connect".into()),
            Err(_) => Outcome::Failed("http-error".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse() {
        let s: Schedule = "30s@200, 60@2000,1.5s@20".parse().expect("schedule");
        assert_eq!(s.0.len(), 3);
        assert_eq!(s.0[1], (Duration::from_secs(60), 2000.0));
        assert_eq!(s.total(), Duration::from_millis(91_500));
        assert!("".parse::<Schedule>().is_err());
        assert!("10s@0".parse::<Schedule>().is_err());
        assert!("10s".parse::<Schedule>().is_err());
    }
}
