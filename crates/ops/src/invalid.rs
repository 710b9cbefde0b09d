//! `ingestctl check --invalid`: a Nagios check on the invalid queue's byte cap
//! (`broker.invalid_max_length_bytes`). Past the cap the broker refuses invalid records; the
//! workers count them (never loop on them) and summarise them in the queue once it has room.
//! From each worker's `/metrics`: events refused and not yet summarised (CRITICAL while any:
//! the queue is full and invalid events are being counted instead of kept). With the
//! management API, the queue's bytes against the cap (WARNING and CRITICAL at percents).

use std::time::Duration;

use ingest_pipeline::{Settings, Topology};

use crate::{management, Status};

/// One worker's counts, as its `/metrics` shows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Refused at the cap, not yet in a summary the queue took.
    pub pending: f64,
    /// Refused at the cap since the worker started.
    pub overflowed: f64,
    /// Repeats counted in summaries instead of kept whole, since it started.
    pub folded: f64,
}

impl Reading {
    /// From a worker's `/metrics` text; `None` if it is not a worker's.
    pub fn parse(text: &str) -> Option<Self> {
        let value = |name: &str| crate::exposed_value(text, name);
        value("worker_consuming")?;
        Some(Self {
            pending: value("worker_invalid_overflow_pending").unwrap_or(0.0),
            overflowed: value("worker_invalid_overflow_total").unwrap_or(0.0),
            folded: value("worker_invalid_folded_total").unwrap_or(0.0),
        })
    }
}

/// What the check saw: each worker's reading (or why not), and the queue's bytes from the
/// management API (`None` without it).
pub struct Seen<'a> {
    pub queue: &'a str,
    pub cap: u64,
    pub workers: &'a [(String, Result<Reading, String>)],
    pub bytes: Option<Result<f64, String>>,
    pub fill_warning: f64,
    pub fill_critical: f64,
}

/// The status and the plugin's one line.
pub fn check(seen: &Seen<'_>) -> (Status, String) {
    let readings: Vec<&Reading> = seen
        .workers
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let pending: f64 = readings.iter().map(|r| r.pending).sum();
    let overflowed: f64 = readings.iter().map(|r| r.overflowed).sum();
    let folded: f64 = readings.iter().map(|r| r.folded).sum();
    let mut unknown: Vec<String> = seen
        .workers
        .iter()
        .filter_map(|(url, r)| r.as_ref().err().map(|why| format!("{url}: {why}")))
        .collect();
    let bytes = match &seen.bytes {
        Some(Ok(bytes)) => Some(*bytes),
        Some(Err(why)) => {
            unknown.push(format!("management API: {why}"));
            None
        }
        None => None,
    };
    let fill = bytes
        .filter(|_| seen.cap > 0)
        .map(|b| 100.0 * b / seen.cap as f64);
    let mut status = Status::Ok;
    let mut said = Vec::new();
    if pending > 0.0 {
        status = Status::Critical;
        said.push(format!(
            "full: {pending:.0} invalid events refused at its byte cap, counted and not yet summarised in it"
        ));
    }
    match fill {
        Some(fill) if fill >= seen.fill_critical => status = Status::Critical,
        Some(fill) if fill >= seen.fill_warning => status = status.max(Status::Warning),
        _ => {}
    }
    if let (Some(bytes), Some(fill)) = (bytes, fill) {
        said.push(format!("{bytes:.0} of {} bytes ({fill:.1}%)", seen.cap));
    }
    if seen.cap == 0 {
        said.push("no byte cap (broker.invalid_max_length_bytes = 0)".to_owned());
    }
    if readings.is_empty() && bytes.is_none() {
        unknown.push(
            "nothing to read: give --worker URL (one per worker) or set broker.management_url"
                .to_owned(),
        );
    }
    // Unreadable sources make a check that found nothing wrong UNKNOWN, never OK.
    if !unknown.is_empty() && status == Status::Ok {
        status = Status::Unknown;
    }
    said.push(format!(
        "{} worker(s) read: {overflowed:.0} refused at the cap and {folded:.0} repeats folded since they started",
        readings.len()
    ));
    said.extend(unknown);
    let perf_bytes = match (bytes, seen.cap) {
        (Some(bytes), cap) if cap > 0 => format!(
            " bytes={bytes:.0}B;;;0;{cap} fill={:.1}%;{};{};0;100",
            fill.unwrap_or(0.0),
            seen.fill_warning,
            seen.fill_critical
        ),
        (Some(bytes), _) => format!(" bytes={bytes:.0}B;;;0;"),
        (None, _) => String::new(),
    };
    let line = format!(
        "INVALID {} - {}: {} | overflow_pending={pending:.0};;0;0; overflow_total={overflowed:.0}c;;;0; folded_total={folded:.0}c;;;0;{perf_bytes}",
        status.label(),
        seen.queue,
        said.join("; "),
    );
    (status, line)
}

/// Reads every worker and, with the management API, the queue, and checks them.
pub async fn check_invalid(
    settings: &Settings,
    workers: &[String],
    fill_warning: f64,
    fill_critical: f64,
) -> (Status, String) {
    let queue = Topology::new(settings.broker.prefix.clone()).invalid();
    let mut readings = Vec::with_capacity(workers.len());
    for url in workers {
        let base = url.trim_end_matches('/').to_owned();
        let reading = read_worker(&base).await;
        readings.push((base, reading));
    }
    let bytes = match &settings.broker.management_url {
        Some(base) => {
            let amqp = settings
                .broker
                .nodes()
                .first()
                .map_or(settings.broker.url.expose(), |url| url.expose());
            Some(match management::queue(base.expose(), amqp, &queue).await {
                Ok(answer) => answer
                    .get("message_bytes")
                    .and_then(serde_json::Value::as_f64)
                    .ok_or_else(|| "no message_bytes for the queue yet".to_owned()),
                Err(error) => Err(format!("{error:#}")),
            })
        }
        None => None,
    };
    check(&Seen {
        queue: &queue,
        cap: settings.broker.invalid_max_length_bytes,
        workers: &readings,
        bytes,
        fill_warning,
        fill_critical,
    })
}

async fn read_worker(base: &str) -> Result<Reading, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let text = async {
        client
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }
    .await
    .map_err(|e| format!("cannot read /metrics: {}", e.without_url()))?;
    Reading::parse(&text).ok_or_else(|| "not a worker's /metrics".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
# TYPE worker_consuming gauge
worker_consuming 1
worker_invalid_overflow_pending 1990
worker_invalid_overflow_total 5000
worker_invalid_folded_total 3980
";

    fn seen<'a>(
        workers: &'a [(String, Result<Reading, String>)],
        bytes: Option<Result<f64, String>>,
    ) -> Seen<'a> {
        Seen {
            queue: "analytics.invalid",
            cap: 1000,
            workers,
            bytes,
            fill_warning: 50.0,
            fill_critical: 90.0,
        }
    }

    fn worker(reading: Option<Reading>) -> Vec<(String, Result<Reading, String>)> {
        vec![(
            "http://w1:8081".to_owned(),
            reading.ok_or_else(|| "cannot read /metrics".to_owned()),
        )]
    }

    #[test]
    fn a_worker_counting_refused_events_makes_it_critical_with_perfdata() {
        let reading = Reading::parse(FULL).expect("a worker");
        assert_eq!(
            (reading.pending, reading.overflowed, reading.folded),
            (1990.0, 5000.0, 3980.0)
        );
        assert_eq!(Reading::parse("collector_in_flight_requests 3\n"), None);
        let workers = worker(Some(reading));
        let (status, line) = check(&seen(&workers, None));
        assert_eq!(status, Status::Critical, "{line}");
        assert!(
            line.starts_with(
                "INVALID CRITICAL - analytics.invalid: full: 1990 invalid events refused"
            ),
            "{line}"
        );
        assert!(
            line.contains(
                "| overflow_pending=1990;;0;0; overflow_total=5000c;;;0; folded_total=3980c;;;0;"
            ),
            "{line}"
        );
    }

    #[test]
    fn the_fill_from_the_management_api_warns_and_pages_and_nothing_pending_is_ok() {
        let idle = Reading {
            pending: 0.0,
            overflowed: 0.0,
            folded: 12.0,
        };
        let workers = worker(Some(idle));
        let (status, line) = check(&seen(&workers, None));
        assert_eq!(status, Status::Ok, "{line}");
        assert_eq!(check(&seen(&workers, Some(Ok(499.0)))).0, Status::Ok);
        let (status, line) = check(&seen(&workers, Some(Ok(500.0))));
        assert_eq!(status, Status::Warning, "{line}");
        assert!(
            line.contains("500 of 1000 bytes (50.0%)") && line.contains("fill=50.0%;50;90;0;100"),
            "{line}"
        );
        assert_eq!(check(&seen(&workers, Some(Ok(950.0)))).0, Status::Critical);
        // The management API alone is enough to tell.
        assert_eq!(check(&seen(&[], Some(Ok(10.0)))).0, Status::Ok);
    }

    #[test]
    fn what_cannot_be_read_is_unknown_never_ok_but_a_known_critical_stays() {
        let (status, line) = check(&seen(&[], None));
        assert_eq!(status, Status::Unknown, "{line}");
        assert!(line.contains("give --worker URL"), "{line}");
        let unreadable = worker(None);
        let (status, line) = check(&seen(&unreadable, None));
        assert_eq!(status, Status::Unknown, "{line}");
        assert!(
            line.contains("http://w1:8081: cannot read /metrics"),
            "{line}"
        );
        let (status, _) = check(&seen(&unreadable, Some(Ok(990.0))));
        assert_eq!(status, Status::Critical);
        let idle = worker(Some(Reading {
            pending: 0.0,
            overflowed: 0.0,
            folded: 0.0,
        }));
        let (status, line) = check(&seen(&idle, Some(Err("401".into()))));
        assert_eq!(status, Status::Unknown, "{line}");
    }
}
