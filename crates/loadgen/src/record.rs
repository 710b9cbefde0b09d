//! What a run saw: latency (HdrHistogram, from each request's *intended* send time in open
//! loop), outcomes by status, per-second series, and the messageIds of every accepted event.
//! Shared by the sending tasks behind one mutex; a chaos test can read it while the load runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to this.
const MAX_LATENCY_US: u64 = 600_000_000;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx (HTTP) or a broker ack.
    Accepted,
    /// A non-2xx HTTP status.
    Status(u16),
    /// Anything else, named: `nack`, `unroutable`, `timeout`, `connect`, …
    Failed(String),
}

impl Outcome {
    pub fn label(&self) -> String {
        match self {
            Self::Accepted => "accepted".into(),
            Self::Status(code) => code.to_string(),
            Self::Failed(what) => what.clone(),
        }
    }
}

struct Second {
    offered: u64,
    accepted_requests: u64,
    accepted_events: u64,
    refused: u64,
    latency: Histogram<u64>,
    depth: Option<u64>,
    rss_kb: Option<u64>,
}

impl Second {
    fn new() -> Self {
        Self {
            offered: 0,
            accepted_requests: 0,
            accepted_events: 0,
            refused: 0,
            latency: histogram(),
            depth: None,
            rss_kb: None,
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant, valid bounds")
}

struct Inner {
    started: Instant,
    finished: Option<Instant>,
    latency: Histogram<u64>,
    sent: u64,
    accepted_requests: u64,
    accepted_events: u64,
    accepted_bytes: u64,
    outcomes: BTreeMap<String, u64>,
    seconds: Vec<Second>,
    ids: Option<Vec<u128>>,
    timeline: Option<Vec<Ended>>,
}

/// What a fault at `fault` cost the clients: the time from it to the first 2xx of a request due
/// after it, and the requests refused (or failed) that ended in between. `None` if no request due
/// after the fault got a 2xx.
pub fn recovery(timeline: &[Ended], fault: Instant) -> Option<(Duration, usize)> {
    let first = timeline
        .iter()
        .filter(|e| e.accepted && e.due >= fault)
        .map(|e| e.at)
        .min()?;
    let refused = timeline
        .iter()
        .filter(|e| !e.accepted && e.at >= fault && e.at <= first)
        .count();
    Some((first.saturating_duration_since(fault), refused))
}

/// What an outage cost the clients: of the requests that ended at or after `from` and were sent
/// before `until` (a fault, and the node back), how many there were and how many were refused
/// (or failed).
pub fn during(timeline: &[Ended], from: Instant, until: Instant) -> (usize, usize) {
    let hit = timeline.iter().filter(|e| e.at >= from && e.due < until);
    let (all, refused) = hit.fold((0, 0), |(all, refused), e| {
        (all + 1, refused + usize::from(!e.accepted))
    });
    (all, refused)
}

/// One request of a kept timeline: when it was due, when it ended, and whether it got a 2xx.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub due: Instant,
    pub at: Instant,
    pub accepted: bool,
}

/// The shared record of a run.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
}

impl Recorder {
    /// `keep_ids`: remember the messageId of every accepted event.
    pub fn new(keep_ids: bool) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                started: Instant::now(),
                finished: None,
                latency: histogram(),
                sent: 0,
                accepted_requests: 0,
                accepted_events: 0,
                accepted_bytes: 0,
                outcomes: BTreeMap::new(),
                seconds: Vec::new(),
                ids: keep_ids.then(Vec::new),
                timeline: None,
            })),
        }
    }

    /// Also keeps every request's [`Ended`] (to tell when failures began and stopped).
    pub fn keep_timeline(self) -> Self {
        self.lock().timeline = Some(Vec::new());
        self
    }

    /// Every request that ended so far, in the order they ended (empty unless kept).
    pub fn timeline(&self) -> Vec<Ended> {
        self.lock().timeline.clone().unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking sender cannot leave the counters half-written in a way that matters.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restarts the clock (call right before the load starts).
    pub fn start(&self) {
        self.lock().started = Instant::now();
    }

    pub fn started(&self) -> Instant {
        self.lock().started
    }

    pub fn finish(&self) {
        self.lock().finished = Some(Instant::now());
    }

    /// A request that was due at `at` (counted in that second's offered load).
    pub fn offered(&self, at: Instant) {
        let mut inner = self.lock();
        inner.sent += 1;
        let second = inner.second_of(at);
        inner.second(second).offered += 1;
    }

    /// A request that was due at `intended` ended now with `outcome`.
    pub fn completed(&self, intended: Instant, outcome: &Outcome, ids: &[u128], bytes: usize) {
        let now = Instant::now();
        let micros = now
            .saturating_duration_since(intended)
            .as_micros()
            .clamp(1, u128::from(MAX_LATENCY_US));
        let micros = u64::try_from(micros).unwrap_or(MAX_LATENCY_US);
        let mut inner = self.lock();
        let second = inner.second_of(now);
        let _ = inner.latency.record(micros);
        *inner.outcomes.entry(outcome.label()).or_insert(0) += 1;
        let events = ids.len() as u64;
        if *outcome == Outcome::Accepted {
            inner.accepted_requests += 1;
            inner.accepted_events += events;
            inner.accepted_bytes += bytes as u64;
            if let Some(kept) = inner.ids.as_mut() {
                kept.extend_from_slice(ids);
            }
        }
        if let Some(timeline) = inner.timeline.as_mut() {
            timeline.push(Ended {
                due: intended,
                at: now,
                accepted: *outcome == Outcome::Accepted,
            });
        }
        let s = inner.second(second);
        let _ = s.latency.record(micros);
        if *outcome == Outcome::Accepted {
            s.accepted_requests += 1;
            s.accepted_events += events;
        } else {
            s.refused += 1;
        }
    }

    /// A gauge sampled now (queue depth, RSS) for the time series.
    pub fn sample(&self, depth: Option<u64>, rss_kb: Option<u64>) {
        let mut inner = self.lock();
        let second = inner.second_of(Instant::now());
        let s = inner.second(second);
        if depth.is_some() {
            s.depth = depth;
        }
        if rss_kb.is_some() {
            s.rss_kb = rss_kb;
        }
    }

    /// Every accepted event's messageId so far (empty unless kept).
    pub fn accepted_ids(&self) -> Vec<u128> {
        self.lock().ids.clone().unwrap_or_default()
    }

    pub fn accepted_events(&self) -> u64 {
        self.lock().accepted_events
    }

    /// Requests that ended, by outcome label.
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        self.lock().outcomes.clone()
    }

    /// Writes the accepted messageIds, one per line.
    pub fn write_ids(&self, path: &std::path::Path) -> std::io::Result<usize> {
        use std::io::Write as _;
        let ids = self.accepted_ids();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for id in &ids {
            writeln!(out, "{}", crate::payload::id_string(*id))?;
        }
        out.flush()?;
        Ok(ids.len())
    }

    pub fn report(&self, name: &str) -> Report {
        let inner = self.lock();
        let elapsed = inner
            .finished
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(inner.started)
            .max(Duration::from_millis(1))
            .as_secs_f64();
        let ms = |q: f64| inner.latency.value_at_quantile(q) as f64 / 1000.0;
        let refused = inner
            .outcomes
            .iter()
            .filter(|(k, _)| k.as_str() != "accepted")
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let series = inner
            .seconds
            .iter()
            .enumerate()
            .map(|(t, s)| Point {
                t: t as u64,
                offered: s.offered,
                accepted_requests: s.accepted_requests,
                accepted_events: s.accepted_events,
                refused: s.refused,
                p99_ms: (!s.latency.is_empty())
                    .then(|| s.latency.value_at_quantile(0.99) as f64 / 1000.0),
                depth: s.depth,
                rss_kb: s.rss_kb,
            })
            .collect();
        Report {
            name: name.to_owned(),
            seconds: elapsed,
            sent: inner.sent,
            completed: inner.latency.len(),
            accepted_requests: inner.accepted_requests,
            accepted_events: inner.accepted_events,
            accepted_bytes: inner.accepted_bytes,
            requests_per_s: inner.accepted_requests as f64 / elapsed,
            events_per_s: inner.accepted_events as f64 / elapsed,
            latency_ms: Latency {
                p50: ms(0.50),
                p90: ms(0.90),
                p99: ms(0.99),
                p999: ms(0.999),
                max: inner.latency.max() as f64 / 1000.0,
                mean: inner.latency.mean() / 1000.0,
            },
            refused,
            series,
        }
    }
}

impl Inner {
    fn second_of(&self, at: Instant) -> usize {
        usize::try_from(at.saturating_duration_since(self.started).as_secs()).unwrap_or(0)
    }

    fn second(&mut self, index: usize) -> &mut Second {
        while self.seconds.len() <= index {
            self.seconds.push(Second::new());
        }
        &mut self.seconds[index]
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// One second of a run. `offered` counts requests due in that second; the others, requests
/// that ended in it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Point {
    pub t: u64,
    pub offered: u64,
    pub accepted_requests: u64,
    pub accepted_events: u64,
    pub refused: u64,
    pub p99_ms: Option<f64>,
    pub depth: Option<u64>,
    pub rss_kb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub name: String,
    pub seconds: f64,
    pub sent: u64,
    pub completed: u64,
    pub accepted_requests: u64,
    pub accepted_events: u64,
    pub accepted_bytes: u64,
    pub requests_per_s: f64,
    pub events_per_s: f64,
    pub latency_ms: Latency,
    /// Every request that was not accepted, by status or failure.
    pub refused: BTreeMap<String, u64>,
    pub series: Vec<Point>,
}

impl Report {
    /// The human summary.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{}: {:.1} s, {} sent, {} accepted ({:.0} req/s, {:.0} events/s, {:.1} MB)\n  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.name,
            self.seconds,
            self.sent,
            self.accepted_requests,
            self.requests_per_s,
            self.events_per_s,
            self.accepted_bytes as f64 / 1e6,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.p999,
            self.latency_ms.max,
        );
        if self.refused.is_empty() {
            out.push_str("  not accepted: none\n");
        } else {
            let list: Vec<String> = self
                .refused
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            out.push_str(&format!("  not accepted: {}\n", list.join(", ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `t0` plus `ms` milliseconds.
    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// A timeline of requests (due, ended, accepted), in milliseconds after `t0`.
    fn timeline(t0: Instant, requests: &[(u64, u64, bool)]) -> Vec<Ended> {
        let ended = |&(due, end, accepted): &(u64, u64, bool)| Ended {
            due: at(t0, due),
            at: at(t0, end),
            accepted,
        };
        requests.iter().map(ended).collect()
    }

    #[test]
    fn recovery_counts_from_the_fault_to_the_first_2xx_of_a_request_due_after_it() {
        let t0 = Instant::now();
        let at = |ms: u64| at(t0, ms);
        let timeline = timeline(
            t0,
            &[
                (0, 5, true),
                // due before the fault, answered 2xx after it: not a sign of recovery
                (90, 120, true),
                (110, 150, false),
                (130, 400, false),
                (300, 700, true),
                (600, 650, true),
                (800, 900, false),
            ],
        );
        let (took, refused) = recovery(&timeline, at(100)).expect("recovered");
        assert_eq!(took, Duration::from_millis(550));
        assert_eq!(refused, 2);
        assert!(recovery(&timeline, at(700)).is_none());
        let recorder = Recorder::new(false).keep_timeline();
        recorder.completed(at(0), &Outcome::Status(503), &[1], 1);
        assert_eq!(recorder.timeline().len(), 1);
        assert!(Recorder::new(false).timeline().is_empty());
    }

    #[test]
    fn during_counts_the_requests_that_ended_after_a_fault_and_were_sent_before_the_node_was_back()
    {
        let t0 = Instant::now();
        let at = |ms: u64| at(t0, ms);
        let timeline = timeline(
            t0,
            &[
                // ended before the fault
                (0, 90, false),
                // in flight at the fault
                (95, 150, false),
                (200, 210, true),
                (300, 900, false),
                (500, 510, false),
                // sent once the node was back
                (1000, 1010, false),
            ],
        );
        assert_eq!(during(&timeline, at(100), at(1000)), (4, 3));
        assert_eq!(during(&timeline, at(1000), at(2000)), (1, 1));
        assert_eq!(during(&timeline, at(2000), at(3000)), (0, 0));
    }

    #[test]
    fn latency_counts_from_the_intended_time_and_ids_are_kept() {
        let recorder = Recorder::new(true);
        recorder.start();
        let intended = Instant::now()
            .checked_sub(Duration::from_millis(50))
            .unwrap_or_else(Instant::now);
        recorder.offered(intended);
        recorder.completed(intended, &Outcome::Accepted, &[1, 2, 3], 100);
        recorder.offered(Instant::now());
        recorder.completed(Instant::now(), &Outcome::Status(503), &[4], 10);
        recorder.finish();
        let report = recorder.report("t");
        assert_eq!(report.accepted_events, 3);
        assert_eq!(report.refused.get("503"), Some(&1));
        assert!(report.latency_ms.max >= 50.0, "{report:?}");
        assert_eq!(recorder.accepted_ids(), vec![1, 2, 3]);
    }
}
