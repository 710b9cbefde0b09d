use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Every pipeline queue with its depth and consumer count.
    Queues {
        #[arg(long)]
        json: bool,
    },
    /// A Nagios / monitoring-plugins check on one queue's depth (exit 0/1/2/3).
    Check {
        /// Full queue name, or its role under the configured prefix (`raw`, `invalid`, `sink.mongo.dlq`).
        #[arg(long)]
        queue: String,
        #[arg(long, short = 'w')]
        warning: Option<Range>,
        #[arg(long, short = 'c')]
        critical: Option<Range>,
        /// CRITICAL when the queue holds messages and nothing consumes it.
        #[arg(long)]
        consumers: bool,
    },
    /// Check payloads against the tracking plan locally.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
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
        Command::Check {
            queue,
            warning,
            critical,
            consumers,
        } => {
            check(
                &settings,
                &queue,
                warning.as_ref(),
                critical.as_ref(),
                consumers,
            )
            .await
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

fn sink_names(settings: &Settings) -> Vec<String> {
    let mut names = Vec::new();
    if settings
        .sinks
        .mongo
        .get("enabled")
        .and_then(|e| e.as_bool())
        == Some(true)
    {
        names.push("mongo".to_owned());
    }
    if settings.sinks.statsd.is_some() {
        names.push("statsd".to_owned());
    }
    names.extend(
        settings
            .sinks
            .http
            .iter()
            .filter_map(|h| h.get("name").and_then(|n| n.as_str()).map(str::to_owned)),
    );
    names
}

async fn queues(settings: &Settings, json: bool) -> ExitCode {
    let topology = Topology::new(settings.broker.prefix.clone());
    let names = pipeline_queues(
        &topology,
        &sink_names(settings),
        &settings.sinks.retry_delays(),
    );
    match queue_states(&settings.broker, &names).await {
        Ok(states) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&states).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(states) => {
            let width = states
                .iter()
                .map(|s| s.name.len())
                .max()
                .unwrap_or(5)
                .max(5);
            println!("{:<width$}  {:>10}  {:>9}", "queue", "depth", "consumers");
            for s in states {
                println!("{:<width$}  {:>10}  {:>9}", s.name, s.depth, s.consumers);
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("ingestctl: cannot read the queues: {error:#}");
            ExitCode::from(3)
        }
    }
}

async fn check(
    settings: &Settings,
    queue: &str,
    warning: Option<&Range>,
    critical: Option<&Range>,
    consumers: bool,
) -> ExitCode {
    let prefix = format!("{}.", settings.broker.prefix);
    let name = if queue.starts_with(&prefix) {
        queue.to_owned()
    } else {
        format!("{prefix}{queue}")
    };
    let (status, line) = match queue_states(&settings.broker, std::slice::from_ref(&name)).await {
        Ok(states) => match states.first() {
            Some(state) => check_queue(state, warning, critical, consumers),
            None => (
                Status::Unknown,
                format!("QUEUE UNKNOWN - {name} does not exist"),
            ),
        },
        Err(error) => (
            Status::Unknown,
            format!("QUEUE UNKNOWN - {name}: broker unreachable: {error:#}"),
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
