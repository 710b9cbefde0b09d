//! `ingest-loadgen`'s command line: every subcommand and option, with the help text `--help`
//! prints.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ingest_loadgen::drive::Schedule;
use ingest_loadgen::mongo;

#[derive(Parser)]
#[command(
    name = "ingest-loadgen",
    version,
    about = "Load generator and bare baselines for the ingest benchmarks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct LoadArgs {
    /// Open loop: requests per second (constant arrival rate).
    #[arg(long, conflicts_with_all = ["schedule", "concurrency"])]
    pub rate: Option<f64>,
    /// Open loop with phases, e.g. `30s@200,60s@2000,60s@200`.
    #[arg(long, conflicts_with = "concurrency")]
    pub schedule: Option<Schedule>,
    /// Closed loop: this many requests in flight.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Seconds (for --rate and --concurrency).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Open loop: requests in flight at most (past it sending waits; the wait counts as latency).
    #[arg(long, default_value_t = 20_000)]
    pub max_outstanding: usize,
    /// Sample this queue's depth every second into the series (several, comma-separated: the
    /// sum of their depths).
    #[arg(long, requires = "depth_amqp")]
    pub depth_queue: Option<String>,
    #[arg(long)]
    pub depth_amqp: Option<String>,
    /// Sample this process's memory every second into the series.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Write the messageId of every accepted event here, one per line.
    #[arg(long)]
    pub ids_out: Option<PathBuf>,
    /// Write the full report (with the per-second series) here as JSON.
    #[arg(long)]
    pub report_out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    #[arg(long, default_value = "run")]
    pub name: String,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Client addresses (one per line) the requests come from in turn, each with a user
        /// agent of its own (for the enrichment's drains); without it, 127.0.0.1.
        #[arg(long)]
        client_ips: Option<PathBuf>,
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
        /// Keep every delivered event's lag since its receivedAt (GET /lag, DELETE /lag).
        #[arg(long)]
        record_lag: bool,
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
    /// The worker's CPU per event, stage by stage (decode, enrich, validate, each sink's
    /// encoding), on generated payloads: one thread, no I/O, the fastest of `rounds` rounds.
    Stages {
        #[arg(long, default_value = "schemas")]
        schemas: PathBuf,
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
        /// The enrichment's steps instead (issue #25), with this MaxMind-format database...
        #[arg(long, requires = "addresses")]
        geo_database: Option<PathBuf>,
        /// ...and the client addresses of the requests (one per line), inside its networks.
        #[arg(long, requires = "geo_database")]
        addresses: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// PNG plots from JSON results.
    Plot {
        #[command(subcommand)]
        what: PlotCommand,
    },
}

#[derive(Subcommand)]
pub enum PlotCommand {
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

/// The MongoDB collection a subcommand works on.
#[derive(clap::Args)]
pub struct MongoTarget {
    #[arg(long)]
    pub mongo: String,
    #[arg(long)]
    pub db: String,
    #[arg(long, default_value = "events")]
    pub collection: String,
}

impl MongoTarget {
    pub async fn open(&self) -> anyhow::Result<mongodb::Collection<mongodb::bson::Document>> {
        mongo::collection(&self.mongo, &self.db, &self.collection).await
    }
}
