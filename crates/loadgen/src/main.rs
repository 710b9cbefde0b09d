//! `ingest-loadgen`: drives the collector, measures the bare broker and MongoDB ceilings, and
//! draws the plots. `scripts/bench` runs it; every subcommand prints text, or JSON with `--json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use ingest_loadgen::amqp::{self, DepthProbe, PublishTarget};
use ingest_loadgen::drive::{closed_loop, open_loop, HttpTarget, Schedule, Target};
use ingest_loadgen::payload::{Generator, Shape};
use ingest_loadgen::record::{Recorder, Report};
use ingest_loadgen::{mongo, plot, proc, receiver};

#[derive(Parser)]
#[command(
    name = "ingest-loadgen",
    version,
    about = "Load generator and bare baselines for the ingest benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Open loop: requests per second (constant arrival rate).
    #[arg(long, conflicts_with_all = ["schedule", "concurrency"])]
    rate: Option<f64>,
    /// Open loop with phases, e.g. `30s@200,60s@2000,60s@200`.
    #[arg(long, conflicts_with = "concurrency")]
    schedule: Option<Schedule>,
    /// Closed loop: this many requests in flight.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds (for --rate and --concurrency).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Open loop: requests in flight at most (past it sending waits; the wait counts as latency).
    #[arg(long, default_value_t = 20_000)]
    max_outstanding: usize,
    /// Sample this queue's depth every second into the series (several, comma-separated: the
    /// sum of their depths).
    #[arg(long, requires = "depth_amqp")]
    depth_queue: Option<String>,
    #[arg(long)]
    depth_amqp: Option<String>,
    /// Sample this process's memory every second into the series.
    #[arg(long)]
    pid: Option<u32>,
    /// Write the messageId of every accepted event here, one per line.
    #[arg(long)]
    ids_out: Option<PathBuf>,
    /// Write the full report (with the per-second series) here as JSON.
    #[arg(long)]
    report_out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    #[arg(long, default_value = "run")]
    name: String,
}

#[derive(Subcommand)]
enum Command {
    /// Send batches to a collector's /v1/batch.
    Http {
        /// e.g. http://127.0.0.1:8080
        #[arg(long)]
        url: String,
        #[arg(long)]
        write_key: String,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The bare publisher: same payloads and headers, straight to a quorum queue with confirms.
    Publish {
        #[arg(long)]
        amqp: String,
        #[arg(long)]
        queue: String,
        /// Confirm channels on the connection (the collector uses broker.publish_channels).
        #[arg(long, default_value_t = 4)]
        channels: usize,
        /// Keep the queue afterwards (it is deleted by default).
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The bare axum + lapin service: POST /v1/* publishes the body to a quorum queue with
    /// confirms and answers 200 after the ack; nothing else. Runs until killed.
    BareCollector {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        amqp: String,
        #[arg(long)]
        queue: String,
        /// Confirm channels on the connection.
        #[arg(long, default_value_t = 4)]
        channels: usize,
    },
    /// Fill a queue with `requests` payloads the way a collector publishes them.
    Prefill {
        #[arg(long)]
        amqp: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        requests: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        ids_out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
    },
    /// The bare consumer with acks: drain `expect` messages from a pre-filled queue.
    Consume {
        #[arg(long)]
        amqp: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        expect: u64,
        #[arg(long, default_value_t = 64)]
        prefetch: u16,
        /// Ack with `multiple` every this many messages (1: ack each).
        #[arg(long, default_value_t = 16)]
        ack_every: u64,
        /// To report events/s as well as messages/s.
        #[arg(long, default_value_t = 1.0)]
        events_per_message: f64,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Time a running worker's drain of a pre-filled raw queue, from its first take to the
    /// last event arriving in MongoDB or at the HTTP receiver.
    Drain {
        #[arg(long)]
        amqp: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        expect_events: u64,
        #[arg(long)]
        messages: u64,
        #[arg(long)]
        mongo: Option<String>,
        #[arg(long, default_value = "analytics")]
        db: String,
        #[arg(long, default_value = "events")]
        collection: String,
        /// Base URL of a running `receiver`.
        #[arg(long)]
        receiver: Option<String>,
        /// The worker's `/metrics` URL: the clock stops when its `sink_events_total` for
        /// `--sink` (outcome `delivered`) reaches the expected count, so the measurement never
        /// queries the database under test while it runs (MongoDB is counted once, at the end).
        #[arg(long)]
        metrics: Option<String>,
        #[arg(long, default_value = "mongo")]
        sink: String,
        /// The worker's pid, for its memory and its CPU time (user + system from
        /// `/proc/PID/stat`, read when the clock starts and when it stops).
        #[arg(long)]
        pid: Option<u32>,
        /// Queues whose ready messages are read twice a second while the clock runs (AMQP
        /// passive declare, the broker's current figure), comma-separated: their highest and
        /// their last depth are reported.
        #[arg(long, value_delimiter = ',')]
        watch: Vec<String>,
        /// Created once the queue's starting depth (and the worker's CPU time) has been read:
        /// start the worker's consumer only then, or the clock starts late.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Bare unordered insert_many of the worker's own documents for generated payloads.
    MongoInsert {
        #[command(flatten)]
        target: MongoTarget,
        #[arg(long)]
        requests: usize,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value = "schemas")]
        schemas: PathBuf,
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Check that every messageId in a file is in MongoDB exactly once (exit 1 if not).
    Verify {
        #[arg(long)]
        ids: PathBuf,
        #[command(flatten)]
        target: MongoTarget,
        #[arg(long)]
        json: bool,
    },
    /// A statsd (UDP) and webhook (HTTP) stand-in that counts what arrives; GET /stats.
    Receiver {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        udp: Option<SocketAddr>,
        /// A slow sink: answer each request after this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// A failing sink: answer this status instead of 200 (e.g. 503).
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Keep the messageId of every delivered event (GET /ids), for `account`.
        #[arg(long)]
        record_ids: bool,
    },
    /// Where a sink's events are: delivered (a receiver's GET /ids) or held in the sink's
    /// queues (every message read and left there). Exit 1 if an event of --ids is in neither.
    Account {
        #[arg(long)]
        amqp: String,
        /// The sink's queues, comma-separated: `<prefix>.sink.<name>`, its `.retry.*` and `.dlq`.
        /// Read with the worker stopped.
        #[arg(long, value_delimiter = ',', required = true)]
        queues: Vec<String>,
        /// The messageIds the sink should have, one per line.
        #[arg(long)]
        ids: PathBuf,
        /// Base URL of the sink's `receiver` (started with --record-ids).
        #[arg(long)]
        delivered: Option<String>,
        #[arg(long, default_value = "sink")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Hold many idle keep-alive connections to a collector and read its memory meanwhile.
    Connections {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
        #[arg(long)]
        pid: Option<u32>,
        /// Then start a request on each whose head never ends: one header line of this many
        /// bytes (0: stay idle).
        #[arg(long, default_value_t = 0)]
        header_bytes: usize,
        #[arg(long)]
        json: bool,
    },
    /// Memory of a process (VmRSS, VmHWM) as JSON.
    Memory {
        #[arg(long)]
        pid: u32,
    },
    /// Write one generated payload (uncompressed JSON) to a file, e.g. for `ingestctl schema check`.
    Sample {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
        /// Which payload of the pool.
        #[arg(long, default_value_t = 0)]
        index: usize,
    },
    /// PNG plots from JSON results.
    Plot {
        #[command(subcommand)]
        what: PlotCommand,
    },
}

#[derive(Subcommand)]
enum PlotCommand {
    /// From a report written by `http --report-out`.
    Peak {
        #[arg(long)]
        report: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// From a JSON list of {label, rate, collector_p50, collector_p99, bare_p50, bare_p99}.
    Latency {
        #[arg(long)]
        points: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// From a JSON list of {label, value, ceiling}.
    Bars {
        #[arg(long)]
        title: String,
        #[arg(long)]
        bars: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ingest-loadgen: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn print<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string(value).unwrap_or_default());
    } else {
        print!("{}", text());
    }
}

async fn drive<T: Target>(target: Arc<T>, load: &LoadArgs) -> anyhow::Result<Report> {
    let generator = Generator::new(&Shape {
        seed: load.seed,
        ..Shape::default()
    });
    let recorder = Recorder::new(load.ids_out.is_some());
    let sampler = (load.depth_queue.is_some() || load.pid.is_some()).then(|| {
        tokio::spawn(sample(
            recorder.clone(),
            load.depth_amqp.clone(),
            load.depth_queue.clone(),
            load.pid,
        ))
    });
    let length = Duration::from_secs_f64(load.duration.max(0.1));
    if let Some(concurrency) = load.concurrency {
        closed_loop(target, generator, concurrency, length, &recorder).await;
    } else {
        let schedule = match (&load.schedule, load.rate) {
            (Some(schedule), _) => schedule.clone(),
            (None, Some(rate)) => Schedule::constant(rate, length),
            (None, None) => anyhow::bail!("give --rate, --schedule or --concurrency"),
        };
        open_loop(
            target,
            generator,
            &schedule,
            &recorder,
            load.max_outstanding,
            Duration::from_secs(120),
        )
        .await;
    }
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    if let Some(path) = &load.ids_out {
        recorder
            .write_ids(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let report = recorder.report(&load.name);
    if let Some(path) = &load.report_out {
        std::fs::write(path, serde_json::to_vec(&report)?)?;
    }
    Ok(report)
}

/// Every second: the queue's depth and the process's memory, into the series.
async fn sample(recorder: Recorder, amqp: Option<String>, queue: Option<String>, pid: Option<u32>) {
    let mut probe = amqp.as_deref().map(DepthProbe::new);
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tick.tick().await;
        let depth = match (&mut probe, &queue) {
            (Some(probe), Some(queue)) => probe.depth(queue).await,
            _ => None,
        };
        let rss = pid.and_then(proc::memory).map(|m| m.rss_kb);
        recorder.sample(depth, rss);
    }
}

fn report_text(report: &Report) -> String {
    report.text()
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Http {
            url,
            write_key,
            load,
        } => {
            let target = Arc::new(HttpTarget::new(&url, &write_key, Duration::from_secs(60))?);
            let report = drive(target, &load).await?;
            print(load.json, &report, || report_text(&report));
        }
        Command::Publish {
            amqp: url,
            queue,
            channels,
            keep,
            load,
        } => {
            amqp::declare_quorum(&url, &queue).await?;
            let target = Arc::new(PublishTarget::open(&url, &queue, channels).await?);
            let report = drive(target, &load).await;
            if !keep {
                amqp::delete_queue(&url, &queue).await?;
            }
            let report = report?;
            print(load.json, &report, || report_text(&report));
        }
        Command::Prefill {
            amqp: url,
            queue,
            requests,
            concurrency,
            ids_out,
            json,
            seed,
        } => {
            amqp::declare_quorum(&url, &queue).await?;
            let recorder = Recorder::new(true);
            let generator = Generator::new(&Shape {
                seed,
                ..Shape::default()
            });
            let mut report =
                amqp::prefill(&url, &queue, generator, requests, concurrency, &recorder).await?;
            report.series.clear();
            if let Some(path) = ids_out {
                recorder.write_ids(&path)?;
            }
            print(json, &report, || report_text(&report));
        }
        Command::Consume {
            amqp: url,
            queue,
            expect,
            prefetch,
            ack_every,
            events_per_message,
            timeout,
            json,
        } => {
            let drain = amqp::consume(
                &url,
                &queue,
                prefetch,
                ack_every,
                expect,
                events_per_message,
                Duration::from_secs(timeout),
            )
            .await?;
            print(json, &drain, || {
                format!(
                    "bare consumer: {} messages in {:.2} s: {:.0} msg/s, {:.0} events/s\n",
                    drain.messages, drain.seconds, drain.messages_per_s, drain.events_per_s
                )
            });
        }
        Command::Drain {
            amqp: url,
            queue,
            expect_events,
            messages,
            mongo: mongo_uri,
            db,
            collection,
            receiver: receiver_url,
            metrics,
            sink,
            pid,
            watch,
            ready_file,
            timeout,
            json,
        } => {
            let result = drain(DrainArgs {
                watch,
                ready_file,
                metrics,
                sink,
                url,
                queue,
                expect_events,
                messages,
                mongo: mongo_uri,
                db,
                collection,
                receiver: receiver_url,
                pid,
                timeout: Duration::from_secs(timeout),
            })
            .await?;
            print(json, &result, || {
                let cpu = match (result.cpu, result.events_per_cpu_s) {
                    (Some(cpu), Some(rate)) => format!(
                        "; worker CPU {:.2} s (user {:.2}, system {:.2}): {rate:.0} events per CPU-second",
                        cpu.total_s(), cpu.user_s, cpu.system_s
                    ),
                    _ => String::new(),
                };
                format!(
                    "worker drain: {} events ({} messages) in {:.2} s: {:.0} events/s, {:.0} msg/s{cpu}; worker RSS {} KiB, peak {} KiB; complete: {}\n",
                    result.events, result.messages, result.seconds, result.events_per_s,
                    result.messages_per_s, result.memory.rss_kb, result.memory.hwm_kb, result.complete
                )
            });
            if !result.complete {
                return Ok(ExitCode::from(1));
            }
        }
        Command::MongoInsert {
            target,
            requests,
            batch,
            concurrency,
            schemas,
            seed,
            json,
        } => {
            let generator = Generator::new(&Shape {
                seed,
                ..Shape::default()
            });
            let documents = mongo::worker_documents(&schemas, generator, requests)?;
            let target = target.open().await?;
            worker::sinks::mongo::ensure_indexes(&target).await?;
            let report = mongo::insert_many(&target, documents, batch, concurrency).await?;
            print(json, &report, || {
                format!(
                    "bare insert_many: {} documents in {:.2} s ({} per batch, {} at once): {:.0} docs/s\n",
                    report.documents, report.seconds, report.batch, report.concurrency, report.documents_per_s
                )
            });
        }
        Command::Verify { ids, target, json } => {
            let ids: Vec<String> = std::fs::read_to_string(&ids)
                .with_context(|| format!("reading {}", ids.display()))?
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            let target = target.open().await?;
            let result = mongo::verify(&target, &ids).await?;
            print(json, &result, || {
                format!(
                    "{} accepted events: {} in MongoDB, {} missing, {} duplicated {:?}\n",
                    result.expected,
                    result.found,
                    result.missing,
                    result.duplicates,
                    result.missing_examples
                )
            });
            if result.missing > 0 || result.duplicates > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Command::BareCollector {
            listen,
            amqp,
            queue,
            channels,
        } => {
            ingest_loadgen::bare::serve(listen, &amqp, &queue, channels).await?;
        }
        Command::Receiver {
            http,
            udp,
            delay_ms,
            status,
            record_ids,
        } => {
            let behaviour = receiver::Behaviour {
                delay: Duration::from_millis(delay_ms),
                status: axum::http::StatusCode::from_u16(status)
                    .with_context(|| format!("--status {status}"))?,
                record_ids,
            };
            receiver::serve(http, udp, behaviour).await?;
        }
        Command::Account {
            amqp: url,
            queues,
            ids,
            delivered,
            name,
            json,
        } => {
            let result = account(&url, &queues, &ids, delivered.as_deref(), name).await?;
            print(json, &result, || {
                let held: Vec<String> = result
                    .held
                    .iter()
                    .map(|h| format!("{} {} messages / {} events", h.queue, h.messages, h.events))
                    .collect();
                format!(
                    "sink {}: {} events expected, {} delivered, {} held in its queues ({}), {} missing {:?}\n",
                    result.sink, result.expected, result.delivered, result.held_events,
                    held.join(", "), result.missing, result.missing_examples
                )
            });
            if result.missing > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Connections {
            addr,
            count,
            hold_secs,
            pid,
            header_bytes,
            json,
        } => {
            let hold = Duration::from_secs(hold_secs);
            let result = proc::hold_connections(addr, count, hold, pid, header_bytes).await;
            print(json, &result, || format!("{result:?}\n"));
        }
        Command::Memory { pid } => {
            let memory = proc::memory(pid).context("no such process")?;
            print(true, &memory, String::new);
        }
        Command::Sample { out, seed, index } => {
            let mut generator = Generator::new(&Shape {
                seed,
                gzip_share: 0.0,
                ..Shape::default()
            });
            let mut payload = generator.next_payload();
            for _ in 0..index {
                payload = generator.next_payload();
            }
            std::fs::write(&out, &payload.body)?;
            println!("{} events, {} bytes", payload.events(), payload.body.len());
        }
        Command::Plot { what } => match what {
            PlotCommand::Peak { report, out } => {
                let report: Report = serde_json::from_slice(&std::fs::read(&report)?)?;
                plot::peak(&report, &out)?;
            }
            PlotCommand::Latency { points, out } => {
                let points: Vec<plot::LatencyPoint> =
                    serde_json::from_slice(&std::fs::read(&points)?)?;
                plot::latency(&points, &out)?;
            }
            PlotCommand::Bars { title, bars, out } => {
                let bars: Vec<plot::Bar> = serde_json::from_slice(&std::fs::read(&bars)?)?;
                plot::bars(&title, &bars, &out)?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

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

/// The MongoDB collection a subcommand works on.
#[derive(clap::Args)]
struct MongoTarget {
    #[arg(long)]
    mongo: String,
    #[arg(long)]
    db: String,
    #[arg(long, default_value = "events")]
    collection: String,
}

impl MongoTarget {
    async fn open(&self) -> anyhow::Result<mongodb::Collection<mongodb::bson::Document>> {
        mongo::collection(&self.mongo, &self.db, &self.collection).await
    }
}

#[derive(serde::Serialize)]
struct Account {
    sink: String,
    expected: usize,
    /// Distinct expected events the receiver answered 2xx for.
    delivered: usize,
    held: Vec<amqp::Held>,
    /// Distinct expected events in the sink's queues.
    held_events: usize,
    /// Delivered and also held (a batch spilled or retried after a delivery the worker did
    /// not see succeed: at least once, not a loss).
    delivered_and_held: usize,
    missing: usize,
    missing_examples: Vec<String>,
}

async fn account(
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

struct DrainArgs {
    watch: Vec<String>,
    ready_file: Option<PathBuf>,
    metrics: Option<String>,
    sink: String,
    url: String,
    queue: String,
    expect_events: u64,
    messages: u64,
    mongo: Option<String>,
    db: String,
    collection: String,
    receiver: Option<String>,
    pid: Option<u32>,
    timeout: Duration,
}

/// Ready messages of a watched queue while a drain's clock ran.
#[derive(serde::Serialize)]
struct Watched {
    queue: String,
    max_ready: u64,
    /// When the clock stopped.
    end_ready: Option<u64>,
}

#[derive(serde::Serialize)]
struct DrainResult {
    events: u64,
    messages: u64,
    seconds: f64,
    events_per_s: f64,
    messages_per_s: f64,
    /// Worker memory at the end (rss) and its peak (hwm).
    memory: proc::Memory,
    /// Sampled RSS maximum during the drain, KiB.
    rss_max_kb: u64,
    /// The worker's CPU time (user + system) while the clock ran; `None` without `--pid`.
    cpu: Option<proc::CpuTime>,
    /// `events` / the worker's CPU seconds while the clock ran.
    events_per_cpu_s: Option<f64>,
    /// The queue was already shorter than `messages` at the first look: the clock started late.
    late_start: bool,
    complete: bool,
    delivered: u64,
    watched: Vec<Watched>,
}

/// Clock starts when the queue first gets shorter (the worker took something) and stops when
/// the last expected event has arrived at the sink being watched. The worker's CPU time is read
/// at the same two moments; the start is the reading taken just before the first look that saw
/// the queue shorter (so nothing the drain cost is left out, at most one poll of idle time is
/// counted in).
async fn drain(args: DrainArgs) -> anyhow::Result<DrainResult> {
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
