//! `ingestctl`'s command line: every command and option, with the help text `--help` prints.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ingestctl::Range;

/// Operate the analytics ingest pipeline. Reads the same configuration as the services
/// (config/$APP_ENV.toml, INGEST__… environment variables).
#[derive(Parser)]
#[command(name = "ingestctl", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Send the archived requests of a time range (the stream `<prefix>.archive`) through the
    /// pipeline again, on the replay lane (`<prefix>.replay`): after a schema fix, to backfill a
    /// new sink, after a vendor's outage. MongoDB keeps each event once; HTTP sinks get each
    /// event's stable key; statsd only when named with --sink (its counters would count twice).
    Replay(ReplayArgs),
    /// Events as the workers see them, live (after the privacy rules): one line each (time,
    /// source, type, name, ids, valid or the first error), or with --json each whole item. The
    /// feed is lossy: each worker sends at most 200 items a second, and says how many it skipped.
    Tail(TailArgs),
    /// A web page of the live feed and the pipeline's queues, served from this process
    /// (127.0.0.1 by default; bound elsewhere it needs --token).
    Console(ConsoleArgs),
    /// Check payloads against the tracking plan locally.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
}

/// `ingestctl replay`'s options.
#[derive(Args)]
pub struct ReplayArgs {
    /// Start of the range: RFC 3339 (2026-12-06T10:00:00Z) or relative (-2h, -30m, -1d).
    #[arg(long, allow_hyphen_values = true, required_unless_present_any = ["resume", "status"])]
    pub from: Option<String>,
    /// End of the range (default: now).
    #[arg(long, default_value = "now", allow_hyphen_values = true)]
    pub to: String,
    /// Only this source (repeatable); default every source.
    #[arg(long = "source", value_name = "NAME")]
    pub sources: Vec<String>,
    /// Only to this sink (repeatable); default every sink but statsd.
    #[arg(long = "sink", value_name = "NAME")]
    pub sinks: Vec<String>,
    /// Count what would be replayed, per source and hour; send nothing.
    #[arg(long, conflicts_with_all = ["resume", "status", "sinks", "rate"])]
    pub dry_run: bool,
    /// Events per second at most (default: as fast as the broker confirms; the workers
    /// take the replay lane at their replay share whatever this is).
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// How long past --to the read goes on for requests received in the range but archived
    /// later (spooled while the broker was away): at least the longest broker outage the
    /// collectors spooled through in the range.
    #[arg(long, default_value = "10m", conflicts_with = "resume")]
    pub grace: String,
    /// Go on with the replay of the state file from where it stopped.
    #[arg(long, conflicts_with_all = ["from", "sources", "sinks", "status"])]
    pub resume: bool,
    /// Where the replay of the state file stands, and the replay lane's depth.
    #[arg(long, conflicts_with_all = ["from", "sources", "sinks", "rate"])]
    pub status: bool,
    /// The replay's state file: written as it goes, read by --resume and --status.
    #[arg(long, default_value = "ingestctl-replay.json")]
    pub state: PathBuf,
    /// Without a terminal: seconds between two progress lines.
    #[arg(long, default_value_t = 10)]
    pub progress_every: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum DlqCommand {
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
pub enum SchemaCommand {
    /// Validate a file holding one event or a `{"batch": [...]}` payload; prints every error.
    Check {
        file: PathBuf,
        /// Treat track events with no schema as errors (the worker's `reject` policy).
        #[arg(long)]
        reject_unknown: bool,
    },
}

/// Which of the live feed's items to show.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FeedFilter {
    /// Only these sources (repeatable).
    #[arg(long)]
    pub source: Vec<String>,
    /// Only these event types: track, page, screen, identify, group, alias (repeatable).
    #[arg(long = "type")]
    pub kind: Vec<String>,
    /// Only these event names: a track's `event`, a page's or screen's `name` (repeatable).
    #[arg(long)]
    pub event: Vec<String>,
    /// Only this user: a `userId` or an `anonymousId`.
    #[arg(long)]
    pub user: Option<String>,
    /// Only events that were refused, with their errors.
    #[arg(long)]
    pub invalid_only: bool,
}

impl FeedFilter {
    pub fn filter(&self) -> ingestctl::live::Filter {
        ingestctl::live::Filter {
            sources: self.source.iter().cloned().collect(),
            types: self.kind.iter().cloned().collect(),
            events: self.event.iter().cloned().collect(),
            user: self.user.clone(),
            invalid_only: self.invalid_only,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub filter: FeedFilter,
    /// Each item as one JSON object per line: the whole event, and for a refused one its
    /// reason and errors with their JSON pointers.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many items shown.
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// Where to serve the page.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
    /// Required (as `?token=` or a cookie the page sets) when --listen is not a loopback
    /// address.
    #[arg(long, env = "INGEST_CONSOLE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A collector's base URL (repeatable): its spool is shown, read from its /metrics.
    #[arg(long = "collector", value_name = "COLLECTOR_URL")]
    pub collectors: Vec<String>,
}
