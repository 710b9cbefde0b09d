//! `ingest-loadgen drain` and `account`: watch queues drain after a load, and account for every
//! event sent (in MongoDB, delivered by a sink, or waiting in a sink's own queues).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ingest_loadgen::amqp::{self, DepthProbe};
use ingest_loadgen::{mongo, proc, receiver};

/// `sink_events_total{sink=SINK,outcome="delivered"}` from a worker's Prometheus text.
async fn delivered_metric(client: &reqwest::Client, url: &str, sink: &str) -> Option<u64> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    let sink_label = format!("sink=\"{sink}\"");
    let total = text
        .lines()
        .filter(|l| l.starts_with("sink_events_total{"))
        .filter(|l| l.contains(&sink_label) && l.contains("outcome=\"delivered\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Some(total as u64)
}

#[derive(serde::Serialize)]
pub struct Account {
    pub sink: String,
    pub expected: usize,
    /// Distinct expected events the receiver answered 2xx for.
    pub delivered: usize,
    pub held: Vec<amqp::Held>,
    /// Distinct expected events in the sink's queues.
    pub held_events: usize,
    /// Delivered and also held (a batch spilled or retried after a delivery the worker did
    /// not see succeed: at least once, not a loss).
    pub delivered_and_held: usize,
    pub missing: usize,
    pub missing_examples: Vec<String>,
}

pub async fn account(
    url: &str,
    queues: &[String],
    ids: &std::path::Path,
    delivered: Option<&str>,
    sink: String,
) -> anyhow::Result<Account> {
    let expected: Vec<String> = std::fs::read_to_string(ids)
        .with_context(|| format!("reading {}", ids.display()))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let delivered: std::collections::HashSet<String> = match delivered {
        Some(base) => receiver::fetch_ids(&reqwest::Client::new(), base)
            .await?
            .into_iter()
            .collect(),
        None => std::collections::HashSet::new(),
    };
    let (held, held_ids) = amqp::read_held(url, queues).await?;
    let held_ids: std::collections::HashSet<String> = held_ids.into_iter().collect();
    let was_delivered = |id: &&String| delivered.contains(*id);
    let in_queues = |id: &&String| held_ids.contains(*id);
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !was_delivered(id) && !in_queues(id))
        .collect();
    Ok(Account {
        sink,
        expected: expected.len(),
        delivered: expected.iter().filter(was_delivered).count(),
        held,
        held_events: expected.iter().filter(in_queues).count(),
        delivered_and_held: expected
            .iter()
            .filter(|id| was_delivered(id) && in_queues(id))
            .count(),
        missing: missing.len(),
        missing_examples: missing.iter().take(5).map(|s| (*s).clone()).collect(),
    })
}

pub struct DrainArgs {
    pub watch: Vec<String>,
    pub ready_file: Option<PathBuf>,
    pub metrics: Option<String>,
    pub sink: String,
    pub url: String,
    pub queue: String,
    pub expect_events: u64,
    pub messages: u64,
    pub mongo: Option<String>,
    pub db: String,
    pub collection: String,
    pub receiver: Option<String>,
    pub pid: Option<u32>,
    pub timeout: Duration,
}

/// Ready messages of a watched queue while a drain's clock ran.
#[derive(serde::Serialize)]
pub struct Watched {
    pub queue: String,
    pub max_ready: u64,
    /// When the clock stopped.
    pub end_ready: Option<u64>,
}

#[derive(serde::Serialize)]
pub struct DrainResult {
    pub events: u64,
    pub messages: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub messages_per_s: f64,
    /// Worker memory at the end (rss) and its peak (hwm).
    pub memory: proc::Memory,
    /// Sampled RSS maximum during the drain, KiB.
    pub rss_max_kb: u64,
    /// The worker's CPU time (user + system) while the clock ran; `None` without `--pid`.
    pub cpu: Option<proc::CpuTime>,
    /// `events` / the worker's CPU seconds while the clock ran.
    pub events_per_cpu_s: Option<f64>,
    /// The queue was already shorter than `messages` at the first look: the clock started late.
    pub late_start: bool,
    pub complete: bool,
    pub delivered: u64,
    pub watched: Vec<Watched>,
}

/// Clock starts when the queue first gets shorter (the worker took something) and stops when
/// the last expected event has arrived at the sink being watched. The worker's CPU time is read
/// at the same two moments; the start is the reading taken just before the first look that saw
/// the queue shorter (so nothing the drain cost is left out, at most one poll of idle time is
/// counted in).
pub async fn drain(args: DrainArgs) -> anyhow::Result<DrainResult> {
    let mut probe = DepthProbe::new(&args.url);
    let target = match &args.mongo {
        Some(uri) => Some(mongo::collection(uri, &args.db, &args.collection).await?),
        None => None,
    };
    let client = reqwest::Client::new();
    let delivered = || async {
        if let Some(url) = &args.metrics {
            return delivered_metric(&client, url, &args.sink)
                .await
                .unwrap_or(0);
        }
        if let Some(target) = &target {
            return target.estimated_document_count().await.unwrap_or(0);
        }
        if let Some(base) = &args.receiver {
            return receiver::fetch(&client, base)
                .await
                .map_or(0, |s| s.http_events);
        }
        0
    };
    let deadline = Instant::now() + args.timeout;
    let initial = probe.depth(&args.queue).await.unwrap_or(args.messages);
    // The worker had taken messages before the first look: the clock (and the CPU reading)
    // start late, by however long that was.
    let late_start = initial < args.messages;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, b"").with_context(|| format!("writing {}", path.display()))?;
    }
    let mut started = None;
    let mut rss_max = 0;
    let mut last = 0;
    let mut cpu_before = args.pid.and_then(proc::cpu);
    let mut cpu_start = None;
    let mut watched: Vec<Watched> = args
        .watch
        .iter()
        .map(|queue| Watched {
            queue: queue.clone(),
            max_ready: 0,
            end_ready: None,
        })
        .collect();
    let mut last_watch = Instant::now();
    while Instant::now() < deadline {
        if started.is_none() {
            let depth = probe.depth(&args.queue).await.unwrap_or(initial);
            if depth < initial || depth < args.messages || delivered().await > 0 {
                started = Some(Instant::now());
                cpu_start = cpu_before;
            } else {
                cpu_before = args.pid.and_then(proc::cpu);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if let Some(memory) = args.pid.and_then(proc::memory) {
            rss_max = rss_max.max(memory.rss_kb);
        }
        last = delivered().await;
        if last >= args.expect_events {
            break;
        }
        if !watched.is_empty() && last_watch.elapsed() >= Duration::from_millis(500) {
            last_watch = Instant::now();
            for w in &mut watched {
                if let Some(depth) = probe.depth(&w.queue).await {
                    w.max_ready = w.max_ready.max(depth);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started
        .map_or(Duration::ZERO, |s| s.elapsed())
        .as_secs_f64()
        .max(1e-3);
    let cpu = match (cpu_start, args.pid.and_then(proc::cpu)) {
        (Some(start), Some(end)) => Some(end.since(start)),
        _ => None,
    };
    let memory = args.pid.and_then(proc::memory).unwrap_or_default();
    for w in &mut watched {
        w.end_ready = probe.depth(&w.queue).await;
        w.max_ready = w.max_ready.max(w.end_ready.unwrap_or(0));
    }
    // Timed by the worker's metric: check once, after the clock, that MongoDB holds them all.
    let stored = match (&args.metrics, &target) {
        (Some(_), Some(target)) => Some(target.estimated_document_count().await.unwrap_or(0)),
        _ => None,
    };
    Ok(DrainResult {
        events: args.expect_events,
        messages: args.messages,
        seconds,
        events_per_s: args.expect_events as f64 / seconds,
        messages_per_s: args.messages as f64 / seconds,
        memory,
        rss_max_kb: rss_max.max(memory.rss_kb),
        cpu,
        events_per_cpu_s: cpu
            .filter(|c| c.total_s() > 0.0)
            .map(|c| args.expect_events as f64 / c.total_s()),
        late_start,
        complete: last >= args.expect_events && stored.is_none_or(|n| n >= args.expect_events),
        delivered: last,
        watched,
    })
}
