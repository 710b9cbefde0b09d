use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ingestctl::canary::{self, Canary};
use ingestctl::dlq::{self as dead, DeadQueue};
use ingestctl::{cluster, management, scale};

use clap::{Parser, Subcommand};
use ingest_pipeline::{Settings, Topology};
use ingest_schema::{Registry, UnknownEventPolicy};
use ingestctl::{check_queue, pipeline_queues, queue_states, Range, Status};

/// Operate the analytics ingest pipeline. Reads the same configuration as the services
/// (config/$APP_ENV.toml, INGEST__… environment variables).
#[derive(Parser)]
#[command(name = "ingestctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every pipeline queue with its depth and consumer count (and, with the management API,
    /// rates and each quorum queue's leader and members).
    Queues {
        #[arg(long)]
        json: bool,
    },
    /// A Nagios / monitoring-plugins check on one queue's depth, or with --drain-time on the
    /// seconds until it is empty; with the management API also on a quorum queue's members
    /// online. With --cluster, on the cluster's nodes instead; with --spool, on a collector's
    /// spool; with --invalid, on the invalid queue's byte cap (exit 0/1/2/3).
    Check {
        /// Full queue name, or its role under the configured prefix (`raw`, `invalid`, `sink.mongo.dlq`).
        #[arg(long, required_unless_present_any = ["cluster", "spool", "invalid"])]
        queue: Option<String>,
        /// Check the invalid queue's byte cap: CRITICAL while a worker (--worker, one per
        /// worker) counts invalid events the queue refused and has not summarised in it yet;
        /// with the management API, --fill-warning/--fill-critical on its bytes in percent of
        /// broker.invalid_max_length_bytes.
        #[arg(long, conflicts_with_all = ["queue", "cluster", "spool", "consumers", "drain_time"])]
        invalid: bool,
        /// With --invalid: a worker's base URL (its /metrics).
        #[arg(long = "worker", value_name = "WORKER_URL", requires = "invalid")]
        workers: Vec<String>,
        /// Check the spool of the collector at this base URL (from its /metrics): -w/-c are on
        /// the oldest spooled request's age in seconds (default 60 and 600), --fill-warning and
        /// --fill-critical on the percent of collector.spool.max_bytes in use.
        #[arg(
            long,
            value_name = "COLLECTOR_URL",
            conflicts_with_all = ["queue", "cluster", "consumers", "drain_time"]
        )]
        spool: Option<String>,
        #[arg(long, default_value_t = 50.0)]
        fill_warning: f64,
        #[arg(long, default_value_t = 90.0)]
        fill_critical: f64,
        /// Check the cluster through the management API: nodes not running, network
        /// partitions, memory and disk alarms are CRITICAL.
        #[arg(
            long,
            conflicts_with_all = ["queue", "warning", "critical", "consumers", "drain_time"]
        )]
        cluster: bool,
        #[arg(long, short = 'w')]
        warning: Option<Range>,
        #[arg(long, short = 'c')]
        critical: Option<Range>,
        /// CRITICAL when the queue holds messages and nothing consumes it.
        #[arg(long)]
        consumers: bool,
        /// Thresholds are on the seconds the backlog takes to be worked off: depth / ack rate
        /// with the management API, otherwise depth / shrink rate between two depth samples
        /// --sample seconds apart. A queue with messages and nothing working them off alerts.
        #[arg(long, conflicts_with = "consumers")]
        drain_time: bool,
        /// Without the management API: seconds between the two depth samples of --drain-time.
        #[arg(long, default_value_t = 5)]
        sample: u64,
        /// Without the management API: a queue with consumers that does not shrink is stalled
        /// only above this depth (a busy queue in a steady state does not shrink either).
        #[arg(long, default_value_t = 0)]
        min_depth: u64,
    },
    /// Send tagged synthetic events through a collector and time their arrival in MongoDB.
    Canary {
        /// The collector's base URL (default: from collector.listen).
        #[arg(long)]
        url: Option<String>,
        /// A write key; or use --source to take a configured source's key.
        #[arg(long, env = "INGEST_CANARY_WRITE_KEY", hide_env_values = true)]
        write_key: Option<String>,
        #[arg(long)]
        source: Option<String>,
        #[arg(long, short = 'n', default_value_t = 10)]
        events: usize,
        /// Seconds to wait for the last event.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Milliseconds between two events.
        #[arg(long, default_value_t = 100)]
        spacing_ms: u64,
        /// Print one Nagios status line and exit 0/1/2/3.
        #[arg(long)]
        nagios: bool,
        /// With --nagios: thresholds on the p99 latency in milliseconds.
        #[arg(long, short = 'w')]
        warning: Option<Range>,
        #[arg(long, short = 'c')]
        critical: Option<Range>,
        /// Delete this run's events from MongoDB afterwards.
        #[arg(long)]
        clean_up: bool,
        #[arg(long)]
        json: bool,
    },
    /// How many workers would drain the raw queue within a target time.
    Scale {
        /// Seconds the backlog should be drained in.
        #[arg(long, default_value_t = 300)]
        target: u64,
        /// Messages per second one worker drains (e.g. from BENCHMARKS.md); measured from the
        /// management API when not given.
        #[arg(long)]
        per_worker_rate: Option<f64>,
        /// Without the management API: seconds between the two depth samples.
        #[arg(long, default_value_t = 5)]
        sample: u64,
        #[arg(long)]
        json: bool,
    },
    /// The invalid queue and the sinks' dead-letter queues.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Check payloads against the tracking plan locally.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Each dead-letter queue with its depth.
    List,
    /// Print messages of a queue (they stay in it).
    Show {
        /// Full name, or the role under the prefix (`invalid`, `sink.mongo.dlq`).
        queue: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long, default_value_t = 65536)]
        max_body: usize,
    },
    /// Re-validate against the current schemas and send back what now passes.
    Replay {
        queue: String,
        /// Messages looked at in this run (they are held in memory until it ends).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Report what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Validate a file holding one event or a `{"batch": [...]}` payload; prints every error.
    Check {
        file: PathBuf,
        /// Treat track events with no schema as errors (the worker's `reject` policy).
        #[arg(long)]
        reject_unknown: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("ingestctl: {error}");
            return ExitCode::from(3);
        }
    };
    match cli.command {
        Command::Queues { json } => queues(&settings, json).await,
        Command::Check { cluster: true, .. } => check_cluster(&settings).await,
        Command::Check {
            invalid: true,
            workers,
            fill_warning,
            fill_critical,
            ..
        } => {
            let (status, line) =
                ingestctl::invalid::check_invalid(&settings, &workers, fill_warning, fill_critical)
                    .await;
            println!("{line}");
            ExitCode::from(status as u8)
        }
        Command::Check {
            spool: Some(url),
            warning,
            critical,
            fill_warning,
            fill_critical,
            ..
        } => {
            let thresholds = ingestctl::spool::Thresholds {
                age_warning: warning.as_ref(),
                age_critical: critical.as_ref(),
                fill_warning,
                fill_critical,
            };
            let (status, line) = ingestctl::spool::check_collector(&url, &thresholds).await;
            println!("{line}");
            ExitCode::from(status as u8)
        }
        Command::Check {
            queue,
            cluster: false,
            warning,
            critical,
            consumers,
            drain_time,
            sample,
            min_depth,
            ..
        } => {
            let measure = if drain_time {
                Measure::DrainTime {
                    sample: Duration::from_secs(sample),
                    min_depth,
                }
            } else {
                Measure::Depth { consumers }
            };
            let Some(queue) = queue else {
                println!("QUEUE UNKNOWN - give --queue or --cluster");
                return ExitCode::from(Status::Unknown as u8);
            };
            let name = full_name(&settings, &queue);
            check(
                &settings,
                &name,
                warning.as_ref(),
                critical.as_ref(),
                measure,
            )
            .await
        }
        Command::Canary {
            url,
            write_key,
            source,
            events,
            timeout,
            spacing_ms,
            nagios,
            warning,
            critical,
            clean_up,
            json,
        } => {
            let options = CanaryOptions {
                url,
                write_key,
                source,
                events,
                timeout: Duration::from_secs(timeout),
                spacing: Duration::from_millis(spacing_ms),
                nagios,
                warning,
                critical,
                clean_up,
                json,
            };
            canary(&settings, options).await
        }
        Command::Scale {
            target,
            per_worker_rate,
            sample,
            json,
        } => {
            scale(
                &settings,
                Duration::from_secs(target),
                per_worker_rate,
                Duration::from_secs(sample),
                json,
            )
            .await
        }
        Command::Dlq { command } => match dlq(&settings, command).await {
            Ok(code) => code,
            Err(error) => {
                eprintln!("ingestctl: {error:#}");
                ExitCode::from(3)
            }
        },
        Command::Schema {
            command:
                SchemaCommand::Check {
                    file,
                    reject_unknown,
                },
        } => schema_check(&settings, &file, reject_unknown),
    }
}

async fn queues(settings: &Settings, json: bool) -> ExitCode {
    let topology = Topology::new(settings.broker.prefix.clone());
    let names = pipeline_queues(
        &topology,
        &settings.sinks.names(),
        &settings.sinks.retry_delays(),
    );
    let states = match queue_states(&settings.broker, &names).await {
        Ok(mut states) => {
            if let Some(base) = &settings.broker.management_url {
                for state in &mut states {
                    let queue =
                        management::queue(base.expose(), vhost_url(settings), &state.name).await;
                    match queue {
                        Ok(queue) => {
                            state.rates = ingestctl::parse_rates(&queue);
                            state.members = cluster::parse_members(&queue);
                        }
                        Err(error) => {
                            eprintln!(
                                "ingestctl: no rates or members for {}: {error:#}",
                                state.name
                            )
                        }
                    }
                }
            }
            Ok(states)
        }
        Err(error) => Err(error),
    };
    match states {
        Ok(states) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&states).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(states) => {
            print!("{}", ingestctl::table::render(&states));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("ingestctl: cannot read the queues: {error:#}");
            ExitCode::from(3)
        }
    }
}

struct CanaryOptions {
    url: Option<String>,
    write_key: Option<String>,
    source: Option<String>,
    events: usize,
    timeout: Duration,
    spacing: Duration,
    nagios: bool,
    warning: Option<Range>,
    critical: Option<Range>,
    clean_up: bool,
    json: bool,
}

async fn canary(settings: &Settings, o: CanaryOptions) -> ExitCode {
    let unknown = |why: String| {
        if o.nagios {
            println!("CANARY UNKNOWN - {why}");
        } else {
            eprintln!("ingestctl: {why}");
        }
        ExitCode::from(Status::Unknown as u8)
    };
    let write_key = match (&o.write_key, &o.source) {
        (Some(key), _) => key.clone(),
        (None, Some(source)) => match settings.collector.write_keys.get(source) {
            Some(key) => key.expose().to_owned(),
            None => return unknown(format!("no write key is configured for source `{source}`")),
        },
        (None, None) => {
            return unknown("give --write-key (or INGEST_CANARY_WRITE_KEY) or --source".into())
        }
    };
    let source = o.source.clone().or_else(|| {
        let keys = &settings.collector.write_keys;
        keys.iter()
            .find(|(_, key)| key.expose() == write_key)
            .map(|(source, _)| source.clone())
    });
    let url = o
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", settings.collector.listen));
    let collection = match mongo_collection(settings).await {
        Ok(c) => c,
        Err(error) => return unknown(format!("MongoDB: {error:#}")),
    };
    let run = Canary {
        collector_url: url,
        write_key,
        source,
        events: o.events.max(1),
        timeout: o.timeout,
        spacing: o.spacing,
    };
    let report = match run.run(&collection).await {
        Ok(report) => report,
        Err(error) => return unknown(format!("MongoDB could not be searched: {error:#}")),
    };
    if o.clean_up {
        if let Err(error) = canary::clean_up(&collection, &report.run).await {
            eprintln!("ingestctl: canary events not deleted: {error:#}");
        }
    }
    let (status, line) = canary::nagios(&report, o.warning.as_ref(), o.critical.as_ref());
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else if o.nagios {
        println!("{line}");
    } else {
        println!(
            "canary run {}: {}/{} landed",
            report.run, report.landed, report.sent
        );
        if let Some(l) = &report.latency_ms {
            println!(
                "end-to-end latency ms: min {:.1}  median {:.1}  p99 {:.1}  max {:.1} (polled every {} ms)",
                l.min,
                l.median,
                l.p99,
                l.max,
                canary::POLL_EVERY.as_millis()
            );
        }
        for (what, n) in &report.refused {
            println!("refused by the collector: {n} x {what}");
        }
        for id in &report.missing {
            println!("missing: {id}");
        }
    }
    if o.nagios {
        ExitCode::from(status as u8)
    } else if status == Status::Critical {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

async fn mongo_collection(
    settings: &Settings,
) -> anyhow::Result<mongodb::Collection<mongodb::bson::Document>> {
    let mut options = mongodb::options::ClientOptions::parse(settings.mongo.uri.expose()).await?;
    options.server_selection_timeout = Some(Duration::from_secs(5));
    options.app_name = Some("ingestctl".into());
    let client = mongodb::Client::with_options(options)?;
    Ok(client
        .database(&settings.mongo.database)
        .collection(&settings.mongo.collection))
}

async fn scale(
    settings: &Settings,
    target: Duration,
    per_worker_rate: Option<f64>,
    sample: Duration,
    json: bool,
) -> ExitCode {
    let raw = Topology::new(settings.broker.prefix.clone()).raw();
    let observed = match observe(settings, &raw, sample).await {
        Ok(observed) => observed,
        Err(error) => {
            eprintln!("ingestctl: cannot read {raw}: {error:#}");
            return ExitCode::from(3);
        }
    };
    let hint = scale::hint(observed, target, per_worker_rate);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&hint).unwrap_or_default()
        );
    } else {
        match hint.workers {
            Some(w) => println!("workers needed: {w}"),
            None => println!("workers needed: unknown"),
        }
        println!("{}", hint.basis);
        match hint.drain_seconds_now {
            Some(s) => println!("at the current rate the queue is empty in {s:.0} s"),
            None => println!("at the current rate the queue is not draining"),
        }
    }
    ExitCode::SUCCESS
}

/// A queue's depth, consumers and rates: from the management API when it is configured
/// (none while it has no statistics for the queue), otherwise the net rate of two depth
/// samples about `sample` apart.
async fn observe(
    settings: &Settings,
    queue: &str,
    sample: Duration,
) -> anyhow::Result<scale::Observed> {
    let read = || async {
        let state = queue_states(&settings.broker, &[queue.to_owned()])
            .await?
            .pop()
            .with_context(|| format!("{queue} does not exist"))?;
        anyhow::Ok((state, Instant::now()))
    };
    let (first, first_at) = read().await?;
    if let Some(base) = &settings.broker.management_url {
        let rates = ingestctl::management_rates(base.expose(), vhost_url(settings), queue).await?;
        return Ok(scale::Observed {
            depth: u64::from(first.depth),
            consumers: first.consumers,
            publish_rate: rates.map(|r| r.publish),
            drain_rate: rates.map(|r| r.ack),
            net_rate: None,
        });
    }
    tokio::time::sleep(sample).await;
    let (second, second_at) = read().await?;
    // Over the time between the two answers, not the sleep: connecting takes time too.
    let elapsed = second_at.duration_since(first_at).as_secs_f64().max(0.001);
    let net = (f64::from(second.depth) - f64::from(first.depth)) / elapsed;
    Ok(scale::Observed {
        depth: u64::from(second.depth),
        consumers: second.consumers,
        publish_rate: None,
        drain_rate: None,
        net_rate: Some(net),
    })
}

/// The AMQP URL whose vhost the management API is asked about: the first node's.
fn vhost_url(settings: &Settings) -> &str {
    settings
        .broker
        .nodes()
        .first()
        .map_or(settings.broker.url.expose(), |url| url.expose())
}

fn full_name(settings: &Settings, queue: &str) -> String {
    let prefix = format!("{}.", settings.broker.prefix);
    if queue.starts_with(&prefix) {
        queue.to_owned()
    } else {
        format!("{prefix}{queue}")
    }
}

async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(settings.broker.prefix.clone());
    match command {
        DlqCommand::List => {
            let mut names = vec![topology.invalid(), topology.raw_dlq()];
            names.extend(settings.sinks.names().iter().map(|s| topology.sink_dlq(s)));
            for state in queue_states(&settings.broker, &names).await? {
                println!("{:<50} {:>10}", state.name, state.depth);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show {
            queue,
            limit,
            max_body,
        } => {
            let queue = full_name(settings, &queue);
            let connection =
                ingest_pipeline::broker::connect(&settings.broker, "ingestctl-dlq").await?;
            let channel = connection.create_channel().await?;
            let messages = dead::take(&channel, &queue, limit).await?;
            for message in &messages {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&dead::describe(message, max_body))?
                );
            }
            eprintln!("{} message(s) shown; they stay in {queue}", messages.len());
            // Closing returns every unacknowledged message to the queue.
            let _ = connection.close(200, "".into()).await;
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay {
            queue,
            limit,
            dry_run,
        } => {
            let queue = full_name(settings, &queue);
            let kind = DeadQueue::parse(&topology, &queue).with_context(|| {
                format!("{queue} is neither the invalid queue, the raw DLQ nor a sink's DLQ")
            })?;
            let registry =
                Registry::load(&settings.worker.schemas_dir, settings.worker.unknown_events)
                    .with_context(|| {
                        format!("loading {}", settings.worker.schemas_dir.display())
                    })?;
            let connection = std::sync::Arc::new(
                ingest_pipeline::broker::connect(&settings.broker, "ingestctl-replay").await?,
            );
            let channel = connection.create_channel().await?;
            let publisher = ingest_pipeline::broker::Publisher::open(connection.clone()).await?;
            let messages = dead::take(&channel, &queue, limit).await?;
            let seen = messages.len();
            let outcome =
                dead::replay(&kind, &topology, &registry, messages, &publisher, dry_run).await;
            let _ = connection.close(200, "".into()).await;
            let outcome = outcome?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!("{queue}: looked at {seen}, {verb} {}", outcome.replayed);
            for (why, n) in &outcome.kept {
                println!("  kept {n}: {why}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `check` measures.
enum Measure {
    Depth { consumers: bool },
    DrainTime { sample: Duration, min_depth: u64 },
}

async fn check(
    settings: &Settings,
    name: &str,
    warning: Option<&Range>,
    critical: Option<&Range>,
    measure: Measure,
) -> ExitCode {
    let (status, line) = match measure {
        Measure::Depth { consumers } => {
            match queue_states(&settings.broker, &[name.to_owned()]).await {
                Ok(states) => match states.first() {
                    Some(state) => check_queue(state, warning, critical, consumers),
                    None => {
                        println!("QUEUE UNKNOWN - {name} does not exist");
                        return ExitCode::from(Status::Unknown as u8);
                    }
                },
                Err(error) => (
                    Status::Unknown,
                    format!("QUEUE UNKNOWN - {name}: broker unreachable: {error:#}"),
                ),
            }
        }
        Measure::DrainTime { sample, min_depth } => match observe(settings, name, sample).await {
            Ok(observed) => ingestctl::check_drain(name, &observed, min_depth, warning, critical),
            Err(error) => (
                Status::Unknown,
                format!("QUEUE UNKNOWN - {name}: {error:#}"),
            ),
        },
    };
    // With the management API: a quorum queue's members online, whatever the measure.
    let (status, line) = match &settings.broker.management_url {
        Some(base) => {
            management::add_members(base.expose(), vhost_url(settings), name, status, &line).await
        }
        None => (status, line),
    };
    println!("{line}");
    ExitCode::from(status as u8)
}

/// `check --cluster`, through the management API.
async fn check_cluster(settings: &Settings) -> ExitCode {
    let (status, line) = match &settings.broker.management_url {
        Some(base) => management::check_cluster(base.expose()).await,
        None => (
            Status::Unknown,
            "CLUSTER UNKNOWN - --cluster needs the RabbitMQ management API: set broker.management_url"
                .to_owned(),
        ),
    };
    println!("{line}");
    ExitCode::from(status as u8)
}

fn schema_check(settings: &Settings, file: &PathBuf, reject_unknown: bool) -> ExitCode {
    let policy = if reject_unknown {
        UnknownEventPolicy::Reject
    } else {
        settings.worker.unknown_events
    };
    let registry = match Registry::load(&settings.worker.schemas_dir, policy) {
        Ok(registry) => registry,
        Err(error) => {
            eprintln!("ingestctl: {error}");
            return ExitCode::from(3);
        }
    };
    let payload: serde_json::Value = match std::fs::read(file)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(payload) => payload,
        Err(error) => {
            eprintln!("ingestctl: {}: {error}", file.display());
            return ExitCode::from(3);
        }
    };
    let events = match payload.get("batch").and_then(|b| b.as_array()) {
        Some(batch) => batch.clone(),
        None => vec![payload],
    };
    let mut invalid = 0;
    for (index, event) in events.into_iter().enumerate() {
        let Some(mut event) = event.as_object().cloned() else {
            println!("event {index}: not a JSON object");
            invalid += 1;
            continue;
        };
        // The worker adds a messageId when an SDK sends none.
        event
            .entry("messageId")
            .or_insert_with(|| serde_json::Value::String(format!("schema-check-{index}")));
        match registry.validate(event) {
            Ok(_) => println!("event {index}: valid"),
            Err(rejected) => {
                invalid += 1;
                println!("event {index}: {} error(s)", rejected.errors.len());
                for issue in rejected.errors {
                    println!(
                        "  {} [{}] {}",
                        display_pointer(&issue.pointer),
                        issue.schema,
                        issue.message
                    );
                }
            }
        }
    }
    if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn display_pointer(pointer: &str) -> &str {
    if pointer.is_empty() {
        "(root)"
    } else {
        pointer
    }
}
