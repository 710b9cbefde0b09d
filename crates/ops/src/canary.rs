//! `ingestctl canary`: synthetic, tagged events sent through a collector like any beacon, then
//! looked for in MongoDB. End-to-end latency is from just before the request to the first poll
//! that finds the document, so it is exact to within the poll interval.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Document};
use serde::Serialize;
use serde_json::json;

use crate::Range;

/// MongoDB is asked this often while events are missing.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// The event name of canary events (it has its own schema in the tracking plan).
pub const EVENT: &str = "Ingest Canary";

pub struct Canary {
    pub collector_url: String,
    pub write_key: String,
    /// The source that owns the write key, if known: MongoDB then finds the events by its
    /// unique (source, messageId) index instead of scanning.
    pub source: Option<String>,
    pub events: usize,
    pub timeout: Duration,
    /// Time between two events, so each one's latency is measured on its own.
    pub spacing: Duration,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub run: String,
    pub sent: usize,
    /// Requests the collector did not answer with 2xx: (status or error, count).
    pub refused: Vec<(String, usize)>,
    pub landed: usize,
    pub missing: Vec<String>,
    /// Milliseconds, of the events that landed.
    pub latency_ms: Option<Latency>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(samples: &mut [f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = (q * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Some(Self {
            min: samples[0],
            median: at(0.5),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        })
    }
}

impl Canary {
    /// Sends the events, then waits for each in `collection` until `timeout` after the last.
    pub async fn run(&self, collection: &mongodb::Collection<Document>) -> anyhow::Result<Report> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut sent_at: HashMap<String, Instant> = HashMap::new();
        let mut refused: HashMap<String, usize> = HashMap::new();
        let mut found: HashMap<String, f64> = HashMap::new();
        for seq in 0..self.events {
            let id = format!("canary-{run}-{seq}");
            let body = json!({
                "batch": [{
                    "type": "track",
                    "event": EVENT,
                    "messageId": id,
                    "anonymousId": format!("canary-{run}"),
                    "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "properties": {"run": run, "seq": seq},
                    "context": {"canary": true, "library": {"name": "ingestctl-canary"}}
                }]
            });
            let started = Instant::now();
            let answer = client
                .post(format!(
                    "{}/v1/batch",
                    self.collector_url.trim_end_matches('/')
                ))
                .basic_auth(&self.write_key, Some(""))
                .json(&body)
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    sent_at.insert(id, started);
                }
                Ok(r) => *refused.entry(r.status().as_u16().to_string()).or_default() += 1,
                Err(e) => {
                    let kind = if e.is_timeout() {
                        "timeout"
                    } else {
                        "unreachable"
                    };
                    *refused.entry(kind.to_owned()).or_default() += 1;
                }
            }
            // Until the next send (none after the last), look for what has landed every
            // POLL_EVERY, so each event is timed when it lands, not at the next send.
            let next_send = Instant::now() + self.spacing;
            while seq + 1 < self.events && found.len() < sent_at.len() {
                poll(collection, self.source.as_deref(), &sent_at, &mut found).await?;
                let left = next_send.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(POLL_EVERY)).await;
            }
            if seq + 1 < self.events {
                tokio::time::sleep_until(next_send.into()).await;
            }
        }
        let deadline = Instant::now() + self.timeout;
        while found.len() < sent_at.len() && Instant::now() < deadline {
            poll(collection, self.source.as_deref(), &sent_at, &mut found).await?;
            tokio::time::sleep(POLL_EVERY).await;
        }
        let mut missing: Vec<String> = sent_at
            .keys()
            .filter(|id| !found.contains_key(*id))
            .cloned()
            .collect();
        missing.sort();
        let mut samples: Vec<f64> = found.values().copied().collect();
        let mut refused: Vec<(String, usize)> = refused.into_iter().collect();
        refused.sort();
        Ok(Report {
            run,
            sent: self.events,
            refused,
            landed: found.len(),
            missing,
            latency_ms: Latency::of(&mut samples),
        })
    }
}

/// Records the latency of every sent event that is now in MongoDB.
async fn poll(
    collection: &mongodb::Collection<Document>,
    source: Option<&str>,
    sent_at: &HashMap<String, Instant>,
    found: &mut HashMap<String, f64>,
) -> anyhow::Result<()> {
    let waiting: Vec<&String> = sent_at
        .keys()
        .filter(|id| !found.contains_key(*id))
        .collect();
    if waiting.is_empty() {
        return Ok(());
    }
    let now = Instant::now();
    let filter = match source {
        Some(source) => doc! {"source": source, "messageId": {"$in": waiting}},
        None => doc! {"messageId": {"$in": waiting}},
    };
    let mut cursor = collection
        .find(filter)
        .projection(doc! {"messageId": 1, "_id": 0})
        .await?;
    while let Some(document) = cursor.try_next().await? {
        if let Ok(id) = document.get_str("messageId") {
            if let Some(started) = sent_at.get(id) {
                found.insert(id.to_owned(), (now - *started).as_secs_f64() * 1000.0);
            }
        }
    }
    Ok(())
}

/// Deletes a run's events (they are marked `context.canary`, and carry the run id).
pub async fn clean_up(
    collection: &mongodb::Collection<Document>,
    run: &str,
) -> anyhow::Result<u64> {
    let deleted = collection
        .delete_many(doc! {"event": EVENT, "context.canary": true, "properties.run": run})
        .await?;
    Ok(deleted.deleted_count)
}

/// The Nagios status of a report: CRITICAL when anything was refused or is missing, else the
/// p99 latency (ms) against the thresholds.
pub fn nagios(
    report: &Report,
    warning: Option<&Range>,
    critical: Option<&Range>,
) -> (crate::Status, String) {
    use crate::Status;
    let refused: usize = report.refused.iter().map(|(_, n)| n).sum();
    let p99 = report.latency_ms.as_ref().map(|l| l.p99);
    let mut status = Status::Ok;
    let mut why = Vec::new();
    if refused > 0 {
        status = Status::Critical;
        let detail: Vec<String> = report
            .refused
            .iter()
            .map(|(what, n)| format!("{n}x {what}"))
            .collect();
        why.push(format!(
            "{refused} refused by the collector ({})",
            detail.join(", ")
        ));
    }
    if !report.missing.is_empty() {
        status = Status::Critical;
        why.push(format!("{} missing from MongoDB", report.missing.len()));
    }
    if let (Some(p99), Status::Ok) = (p99, status) {
        if critical.is_some_and(|c| c.alerts(p99)) {
            status = Status::Critical;
        } else if warning.is_some_and(|w| w.alerts(p99)) {
            status = Status::Warning;
        }
    }
    let latency = match &report.latency_ms {
        Some(l) => format!(
            "latency ms min/median/p99/max {:.0}/{:.0}/{:.0}/{:.0}",
            l.min, l.median, l.p99, l.max
        ),
        None => "no latency measured".to_owned(),
    };
    let mut line = format!(
        "CANARY {} - {}/{} events landed in MongoDB, {latency}",
        status.label(),
        report.landed,
        report.sent
    );
    if !why.is_empty() {
        line.push_str(&format!(" ({})", why.join("; ")));
    }
    let range = |r: Option<&Range>| r.map(ToString::to_string).unwrap_or_default();
    line.push_str(&format!(
        " | landed={};;;0;{} missing={};;;0;{} refused={};;;0;{}",
        report.landed,
        report.sent,
        report.missing.len(),
        report.sent,
        refused,
        report.sent
    ));
    if let Some(p99) = p99 {
        line.push_str(&format!(
            " latency_p99={:.3}ms;{};{};0;",
            p99,
            range(warning),
            range(critical)
        ));
    }
    (status, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(landed: usize, missing: usize, refused: usize, p99: f64) -> Report {
        Report {
            run: "r".into(),
            sent: landed + missing + refused,
            refused: if refused > 0 {
                vec![("503".into(), refused)]
            } else {
                vec![]
            },
            landed,
            missing: (0..missing).map(|i| format!("m{i}")).collect(),
            latency_ms: Some(Latency {
                min: 1.0,
                median: 2.0,
                p99,
                max: p99,
            }),
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let l = Latency::of(&mut samples).expect("some");
        assert_eq!(
            l,
            Latency {
                min: 1.0,
                median: 50.0,
                p99: 99.0,
                max: 100.0
            }
        );
        assert_eq!(Latency::of(&mut []), None);
    }

    #[test]
    fn missing_or_refused_events_are_critical_and_latency_is_checked_against_ranges() {
        let w: Range = "500".parse().expect("w");
        let c: Range = "2000".parse().expect("c");
        assert_eq!(
            nagios(&report(10, 0, 0, 80.0), Some(&w), Some(&c)).0,
            crate::Status::Ok
        );
        assert_eq!(
            nagios(&report(10, 0, 0, 800.0), Some(&w), Some(&c)).0,
            crate::Status::Warning
        );
        assert_eq!(
            nagios(&report(10, 0, 0, 2500.0), Some(&w), Some(&c)).0,
            crate::Status::Critical
        );
        let (status, line) = nagios(&report(7, 3, 0, 80.0), Some(&w), Some(&c));
        assert_eq!(status, crate::Status::Critical);
        assert!(
            line.starts_with("CANARY CRITICAL - 7/10 events landed"),
            "{line}"
        );
        assert!(line.contains("3 missing from MongoDB"), "{line}");
        assert!(line.ends_with(" | landed=7;;;0;10 missing=3;;;0;10 refused=0;;;0;10 latency_p99=80.000ms;500;2000;0;"), "{line}");
        let (status, line) = nagios(&report(0, 0, 4, 0.0), None, None);
        assert_eq!(status, crate::Status::Critical);
        assert!(
            line.contains("4 refused by the collector (4x 503)"),
            "{line}"
        );
    }
}
