use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ingestctl::canary::{self, Canary};
use ingestctl::{cluster, management, scale};

use clap::Parser;
use ingest_pipeline::{Settings, Topology};
use ingestctl::{check_queue, pipeline_queues, queue_states, Range, Status};

mod cli;
mod dlq_command;
mod replay_command;
mod schema_command;

use cli::{Cli, Command, SchemaCommand};
use dlq_command::dlq;
use replay_command::replay;
use schema_command::schema_check;

/// `ingestctl tail`: the live feed, filtered, until Ctrl-C or `--count` items.
async fn tail(settings: &Settings, args: cli::TailArgs) -> anyhow::Result<()> {
    let filter = args.filter.filter();
    let mut viewer = ingestctl::live::Viewer::attach(settings).await?;
    eprintln!(
        "ingestctl: watching {}.live: events as the workers see them, after the privacy rules; lossy (each worker sends at most 200 a second); Ctrl-C stops",
        settings.broker.prefix
    );
    let mut shown = 0u64;
    let ended = loop {
        if args.count.is_some_and(|count| shown >= count) {
            break None;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            item = viewer.next() => match item {
                None => break Some("the feed ended: the connection to the broker was lost"),
                Some(item) if filter.matches(&item) => {
                    shown += 1;
                    match args.json {
                        true => println!("{item}"),
                        false => println!("{}", ingestctl::live::line(&item)),
                    }
                }
                Some(_) => {}
            },
        }
    };
    viewer.close().await;
    match ended {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
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
        Command::Replay(args) => replay(&settings, args).await,
        Command::Tail(args) => match tail(&settings, args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ingestctl: {error:#}");
                ExitCode::from(1)
            }
        },
        Command::Console(args) => {
            match ingestctl::console::serve(&settings, args.listen, args.token, args.collectors)
                .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("ingestctl: {error:#}");
                    ExitCode::from(1)
                }
            }
        }
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
