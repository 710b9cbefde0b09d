//! Test harness for the end-to-end tests in `tests/`: per-test queue prefix and database,
//! collector and worker run in-process (port 0) or as processes, broker nodes owned by a test.
//! Everything a test starts is stopped when its handle is dropped.
//!
//! The servers come from `scripts/test` through TEST_AMQP_URL and TEST_MONGO_URI. Set
//! TEST_LOG=debug to see the services' logs.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use ingest_pipeline::settings::{HttpSinkSettings, MongoSinkSettings};
use ingest_pipeline::{Secret, Settings};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use mongodb::bson::{doc, Document};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const IOS_KEY: &str = "test-ios-write-key";
pub const WEB_KEY: &str = "test-web-write-key";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test, which starts the servers")
    })
}

pub fn amqp_url() -> String {
    required_env("TEST_AMQP_URL")
}

pub fn mongo_uri() -> String {
    required_env("TEST_MONGO_URI")
}

pub fn init_logs() {
    if let Ok(level) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_test_writer()
            .try_init();
    }
}

/// Where a test's own files go: `TEST_WORK_DIR` (set by scripts/test), else the temp directory.
pub fn work_dir() -> PathBuf {
    std::env::var("TEST_WORK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
}

/// Turns the collector's spool on, in a directory of the test's own ([`spool_dir`]), with
/// segments of 1 MiB.
pub fn spool_on(s: &mut Settings) {
    s.collector.spool.enabled = true;
    s.collector.spool.dir = spool_dir(s);
    s.collector.spool.segment_bytes = 1 << 20;
}

/// The spool directory [`spool_on`] gives the test's collector.
pub fn spool_dir(s: &Settings) -> PathBuf {
    work_dir().join(format!("spool-{}", s.broker.prefix))
}

/// The load generator's open loop at `rate` requests/s against the collector at `url` (the iOS
/// key, 10 s per request), until aborted; stop it with [`stop_open_loop`].
pub fn start_open_loop(
    url: &str,
    rate: f64,
    recorder: &ingest_loadgen::Recorder,
) -> JoinHandle<()> {
    use ingest_loadgen::{open_loop, Generator, HttpTarget, Schedule, Shape};
    let target =
        std::sync::Arc::new(HttpTarget::new(url, IOS_KEY, Duration::from_secs(10)).unwrap());
    let generator = Generator::new(&Shape {
        templates: 32,
        seed: fastrand::u64(..),
        ..Shape::default()
    });
    let schedule = Schedule::constant(rate, Duration::from_secs(3600));
    let recorder = recorder.clone();
    tokio::spawn(async move {
        open_loop(
            target,
            generator,
            &schedule,
            &recorder,
            2_000,
            Duration::from_secs(30),
        )
        .await;
    })
}

/// Stops [`start_open_loop`]'s load and lets the requests already sent end (within their 10 s
/// timeout) before the recorder is closed.
pub async fn stop_open_loop(load: JoinHandle<()>, recorder: &ingest_loadgen::Recorder) {
    load.abort();
    let _ = load.await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    recorder.finish();
}

/// A name no other test uses: queue prefix and database name.
pub fn unique(name: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}_{}", &id[..10], name)
}

/// Settings for one test: its own prefix and database, short timeouts.
pub fn settings(name: &str) -> Settings {
    init_logs();
    let mut s = Settings::defaults().unwrap();
    let id = unique(name);
    s.broker.url = Secret::new(amqp_url());
    s.broker.prefix = id.clone();
    s.broker.publish_channels = 2;
    s.broker.confirm_timeout_ms = 3000;
    s.broker.reconnect_min_ms = 100;
    s.broker.reconnect_max_ms = 1000;
    s.mongo.uri = Secret::new(mongo_uri());
    s.mongo.database = id;
    s.collector.listen = "127.0.0.1:0".parse().unwrap();
    s.collector.retry_after_secs = 2;
    s.collector.shutdown_timeout_ms = 5000;
    s.collector.write_keys = [
        ("shop-ios".to_owned(), Secret::new(IOS_KEY)),
        ("shop-web".to_owned(), Secret::new(WEB_KEY)),
    ]
    .into_iter()
    .collect();
    s.worker.schemas_dir = root().join("schemas");
    s.sinks.mongo = mongo_sink(serde_json::json!({"batch_max_events": 1000, "linger_ms": 20}));
    s.worker.shutdown_timeout_ms = 10_000;
    s.worker.listen = "127.0.0.1:0".parse().unwrap();
    // Off in tests: on a loaded 2-core CI machine the runtime can run late for reasons that
    // have nothing to do with the test. The test of this shedding turns it on.
    s.collector.max_scheduling_delay_ms = 0;
    // Every test's clients are one address, 127.0.0.1: the per-address share is the tests' of
    // it to lower (tests/e2e/per_client.rs).
    s.collector.max_connections_per_ip = s.collector.max_connections;
    s.validate_collector().unwrap();
    s.validate_worker().unwrap();
    s
}

/// An HTTP sink's settings from JSON, as a config file holds them.
pub fn http_sink(value: serde_json::Value) -> HttpSinkSettings {
    serde_json::from_value(value).unwrap()
}

/// The MongoDB sink, enabled, with this `delivery` table.
pub fn mongo_sink(delivery: serde_json::Value) -> MongoSinkSettings {
    MongoSinkSettings {
        enabled: true,
        delivery: serde_json::from_value(delivery).unwrap(),
    }
}

/// The settings as the binaries read them from the environment.
pub fn settings_env(s: &Settings) -> Vec<(String, String)> {
    let management = s.broker.management_url.as_ref().map(|url| {
        (
            "INGEST__BROKER__MANAGEMENT_URL".to_owned(),
            url.expose().to_owned(),
        )
    });
    let statsd = s.metrics.statsd_address.as_ref().map(|address| {
        [
            (
                "INGEST__METRICS__STATSD_ADDRESS".to_owned(),
                address.clone(),
            ),
            (
                "INGEST__METRICS__STATSD_INTERVAL_MS".to_owned(),
                s.metrics.statsd_interval_ms.to_string(),
            ),
            (
                "INGEST__METRICS__STATSD_PREFIX".to_owned(),
                s.metrics.statsd_prefix.clone(),
            ),
        ]
    });
    let urls = (!s.broker.urls.is_empty()).then(|| {
        let urls: Vec<&str> = s.broker.urls.iter().map(|u| u.expose()).collect();
        ("INGEST__BROKER__URLS".to_owned(), urls.join(","))
    });
    let mut env = vec![
        ("APP_ENV".into(), "test".into()),
        (
            "INGEST_CONFIG_DIR".into(),
            root().join("config").display().to_string(),
        ),
        (
            "INGEST__BROKER__URL".into(),
            s.broker.url.expose().to_owned(),
        ),
        ("INGEST__BROKER__PREFIX".into(), s.broker.prefix.clone()),
        (
            "INGEST__BROKER__RECONNECT_MIN_MS".into(),
            s.broker.reconnect_min_ms.to_string(),
        ),
        (
            "INGEST__BROKER__RECONNECT_MAX_MS".into(),
            s.broker.reconnect_max_ms.to_string(),
        ),
        ("INGEST__WORKER__LISTEN".into(), s.worker.listen.to_string()),
        (
            "INGEST__COLLECTOR__MAX_SCHEDULING_DELAY_MS".into(),
            s.collector.max_scheduling_delay_ms.to_string(),
        ),
        (
            "INGEST__COLLECTOR__MAX_IN_FLIGHT".into(),
            s.collector.max_in_flight.to_string(),
        ),
        (
            "INGEST__COLLECTOR__MAX_IN_FLIGHT_BYTES".into(),
            s.collector.max_in_flight_bytes.to_string(),
        ),
        (
            "INGEST__BROKER__CONFIRM_TIMEOUT_MS".into(),
            s.broker.confirm_timeout_ms.to_string(),
        ),
        ("INGEST__MONGO__URI".into(), s.mongo.uri.expose().to_owned()),
        ("INGEST__MONGO__DATABASE".into(), s.mongo.database.clone()),
        (
            "INGEST__WORKER__SCHEMAS_DIR".into(),
            s.worker.schemas_dir.display().to_string(),
        ),
        (
            "INGEST__WORKER__PREFETCH".into(),
            s.worker.prefetch.to_string(),
        ),
        (
            "INGEST__WORKER__INVALID__WINDOW_MS".into(),
            s.worker.invalid.window_ms.to_string(),
        ),
        (
            "RUST_LOG".into(),
            std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    env.extend(management);
    env.extend(urls);
    env.extend(statsd.into_iter().flatten());
    env
}

/// A service task started in this process; told to stop when dropped.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Spawns `serve(stopped)`, where `stopped` completes when the handle stops or drops.
    fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(Box::pin(async move {
            let _ = stopped.await;
        })));
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful shutdown; returns when the service has finished, failing the test on an error.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A collector running in this process on an ephemeral port.
pub struct Collector {
    pub url: String,
    running: Running,
}

impl Collector {
    pub async fn start(settings: &Settings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let settings = settings.clone();
        let running = Running::spawn(|stopped| collector::serve(settings, listener, stopped));
        let c = Self { url, running };
        c.wait_ready().await;
        c
    }

    pub async fn wait_ready(&self) {
        let client = http();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "collector not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// A worker running in this process.
pub struct Worker {
    /// Base URL of its `/healthz`, `/readyz` and `/metrics`.
    pub url: String,
    running: Running,
}

impl Worker {
    pub fn start(settings: &Settings) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let settings = settings.clone();
        let running = Running::spawn(|stopped| worker::serve(settings, listener, stopped));
        Self { url, running }
    }

    /// Graceful shutdown; returns when the worker has finished.
    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// A built binary of the workspace (scripts/test builds them first).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"));
    let path = dir.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// A service running as its own OS process, killed (SIGKILL) on drop.
pub struct Process {
    child: Child,
}

impl Process {
    /// Starts a binary with the test's settings: the environment, plus the sink settings in a
    /// config file (lists of tables do not fit in environment variables).
    pub fn spawn(name: &str, settings: &Settings) -> Self {
        Self::spawn_to(name, settings, (Stdio::inherit(), Stdio::inherit()), None)
    }

    /// Like `spawn`, with the process's output (its log, filtered by `filter` as `RUST_LOG`)
    /// written to `log`.
    pub fn spawn_logging_to(
        name: &str,
        settings: &Settings,
        log: &std::path::Path,
        filter: &str,
    ) -> Self {
        let file = std::fs::File::create(log).unwrap();
        let copy = file.try_clone().unwrap();
        let output = (Stdio::from(file), Stdio::from(copy));
        Self::spawn_to(name, settings, output, Some(filter))
    }

    fn spawn_to(
        name: &str,
        settings: &Settings,
        (stdout, stderr): (Stdio, Stdio),
        filter: Option<&str>,
    ) -> Self {
        let dir = work_dir().join(format!("config-{}", settings.broker.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let sinks = serde_json::json!({
            "sinks": {
                "retry_delays_ms": settings.sinks.retry_delays_ms,
                "max_attempts": settings.sinks.max_attempts,
                "mongo": settings.sinks.mongo,
                "statsd": settings.sinks.statsd,
                "http": settings.sinks.http.iter().map(http_sink_json).collect::<Vec<_>>(),
            },
            "collector": collector_json(settings),
        });
        std::fs::write(dir.join("test.json"), sinks.to_string()).unwrap();
        let mut env = settings_env(settings);
        if let Some(filter) = filter {
            env.push(("RUST_LOG".into(), filter.to_owned()));
        }
        let child = Command::new(binary(name))
            .envs(env)
            .env("INGEST_CONFIG_DIR", &dir)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now and at its peak, in KiB, from /proc.
    pub fn memory_kib(&self) -> (u64, u64) {
        proc_memory_kib(self.pid()).expect("VmRSS and VmHWM in /proc/<pid>/status")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The collector settings a spawned collector needs that the environment does not carry.
/// An HTTP sink's settings as its config file holds them, header values included.
fn http_sink_json(sink: &HttpSinkSettings) -> serde_json::Value {
    let HttpSinkSettings {
        name,
        url,
        headers,
        format,
        connect_timeout_ms,
        request_timeout_ms,
        delivery,
    } = sink;
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(name, value)| (name.clone(), value.expose().into()))
        .collect();
    serde_json::json!({
        "name": name,
        "url": url,
        "headers": headers,
        "format": format,
        "connect_timeout_ms": connect_timeout_ms,
        "request_timeout_ms": request_timeout_ms,
        "delivery": delivery,
    })
}

fn collector_json(settings: &Settings) -> serde_json::Value {
    let c = &settings.collector;
    let keys: serde_json::Map<String, serde_json::Value> = c
        .write_keys
        .iter()
        .map(|(source, key)| (source.clone(), key.expose().into()))
        .collect();
    serde_json::json!({
        "listen": c.listen.to_string(),
        "write_keys": keys,
        "retry_after_secs": c.retry_after_secs,
        "max_event_bytes": c.max_event_bytes,
        "max_batch_bytes": c.max_batch_bytes,
        "max_in_flight": c.max_in_flight,
        "body_timeout_ms": c.body_timeout_ms,
        "header_timeout_ms": c.header_timeout_ms,
        "idle_timeout_ms": c.idle_timeout_ms,
        "max_connections": c.max_connections,
        "max_connections_per_ip": c.max_connections_per_ip,
        "max_header_bytes": c.max_header_bytes,
        "trusted_proxies": c.trusted_proxies,
        "max_scheduling_delay_ms": c.max_scheduling_delay_ms,
        "spool": c.spool,
    })
}

/// A collector running as its own process on a free port (for memory and fd measurements).
pub struct CollectorProcess {
    pub url: String,
    pub process: Process,
}

impl CollectorProcess {
    pub async fn spawn(settings: &Settings) -> Self {
        let mut settings = settings.clone();
        settings.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let url = format!("http://{}", settings.collector.listen);
        let process = Process::spawn("collector", &settings);
        let client = http();
        let ready = eventually(Duration::from_secs(60), || async {
            client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(ready, "the collector process did not get ready");
        Self { url, process }
    }

    /// Resident memory of the process, in MB (from /proc).
    pub fn rss_mb(&self) -> u64 {
        self.process.memory_kib().0 / 1024
    }

    /// Open file descriptors of the process (sockets included).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Whether the process is still running (a panic that killed it would show here).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

/// A RabbitMQ node owned by one test (for stopping and restarting a broker).
pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    /// The management API's port, when the node runs it.
    pub management_port: Option<u16>,
    running: bool,
}

impl RabbitNode {
    pub fn start() -> Self {
        Self::start_node(None)
    }

    /// With the management plugin on its own port (statistics every second).
    pub fn start_with_management() -> Self {
        Self::start_node(Some(free_port()))
    }

    /// `http://guest:guest@127.0.0.1:PORT`, when the node runs the management API.
    pub fn management_url(&self) -> Option<String> {
        self.management_port
            .map(|port| format!("http://guest:guest@127.0.0.1:{port}"))
    }

    fn start_node(management_port: Option<u16>) -> Self {
        let port = free_port();
        let name = format!(
            "ingest-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let dir = work_dir().join(&name);
        let mut node = Self {
            name,
            port,
            dir,
            management_port,
            running: false,
        };
        node.resume();
        node
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn script(&self, args: &[&str]) {
        let mut command = Command::new(root().join("scripts/rabbit-node"));
        if let Some(port) = self.management_port {
            command.env("MANAGEMENT_PORT", port.to_string());
        }
        let status = command.args(args).status().unwrap();
        assert!(status.success(), "scripts/rabbit-node {args:?} failed");
    }

    /// Starts (again) on the same port and data directory.
    pub fn resume(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.display().to_string();
        self.script(&["start", &self.name, &port, &dir]);
        self.running = true;
    }

    pub fn stop(&mut self) {
        let dir = self.dir.display().to_string();
        self.script(&["stop", &self.name, &dir]);
        self.running = false;
    }

    /// SIGKILL, no clean shutdown (`resume` starts it again on the same data).
    pub fn kill9(&mut self) {
        let dir = self.dir.display().to_string();
        self.script(&["kill", &self.name, &dir]);
        self.running = false;
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// SIGSTOP: the node keeps its connections open and answers nothing (a confirm stall, as
    /// a disk that stops answering makes one) until [`RabbitNode::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RabbitNode::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).unwrap();
        let status = Command::new("kill")
            .args([signal, pid.trim()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Runs `rabbitmqctl` against this node (e.g. to set its memory watermark).
    pub fn ctl(&self, args: &[&str]) {
        let mut all = vec!["ctl", self.name.as_str()];
        all.extend_from_slice(args);
        self.script(&all);
    }
}

/// Three RabbitMQ nodes owned by one test, joined in a cluster (`scripts/rabbit-cluster`). Each
/// node is a [`RabbitNode`]: killed, frozen or restarted alone, it rejoins from its data.
pub struct RabbitCluster {
    pub nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    pub fn start() -> Self {
        Self::start_cluster(None)
    }

    /// With the management API on node 1 (it sees the whole cluster).
    pub fn start_with_management() -> Self {
        Self::start_cluster(Some(free_port()))
    }

    /// `http://guest:guest@127.0.0.1:PORT` of node 1, when it runs the management API.
    pub fn management_url(&self) -> Option<String> {
        self.nodes[0].management_url()
    }

    fn start_cluster(management_port: Option<u16>) -> Self {
        let name = format!(
            "ingest-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let base = work_dir().join(&name);
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new(root().join("scripts/rabbit-cluster"));
        if let Some(port) = management_port {
            command.env("MANAGEMENT_PORT", port.to_string());
        }
        let status = command
            .args(["start", &name, &list, &base.display().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "scripts/rabbit-cluster start failed");
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, port)| RabbitNode {
                name: format!("{name}-{}", i + 1),
                port: *port,
                dir: base.join((i + 1).to_string()),
                management_port: management_port.filter(|_| i == 0),
                running: true,
            })
            .collect();
        Self { nodes }
    }

    /// Every node's AMQP URL, with a heartbeat of `heartbeat_secs` so that a frozen node is
    /// given up within about twice that.
    pub fn urls(&self, heartbeat_secs: u16) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("{}?heartbeat={heartbeat_secs}", n.url()))
            .collect()
    }

    /// Which node holds the client connection named `connection_name` (lapin's
    /// `connection_name`: `collector`, `worker`), asked of a running node.
    pub fn node_serving(&self, connection_name: &str) -> Option<usize> {
        let rows = self.ctl_json(&["list_connections", "port", "client_properties"])?;
        let named = |row: &&serde_json::Value| {
            row["client_properties"].as_array().is_some_and(|props| {
                props.iter().any(|p| {
                    p.get(0).and_then(|k| k.as_str()) == Some("connection_name")
                        && p.get(2).and_then(|v| v.as_str()) == Some(connection_name)
                })
            })
        };
        let port = rows.iter().find(named)?["port"].as_u64()?;
        self.nodes.iter().position(|n| u64::from(n.port) == port)
    }

    /// Which node leads `queue`, and the names of its members, asked of a running node.
    pub fn leader_and_members(&self, queue: &str) -> Option<(usize, Vec<String>)> {
        let rows = self.ctl_json(&["list_queues", "name", "leader", "members"])?;
        let row = rows.iter().find(|r| r["name"] == queue)?;
        let leader = row["leader"].as_str()?;
        let index = self
            .nodes
            .iter()
            .position(|n| leader == format!("{}@localhost", n.name))?;
        let members = row["members"]
            .as_array()?
            .iter()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect();
        Some((index, members))
    }

    /// `rabbitmqctl ARGS --formatter json` on a running node, its rows.
    fn ctl_json(&self, args: &[&str]) -> Option<Vec<serde_json::Value>> {
        let asked = self.nodes.iter().find(|n| n.running)?;
        let output = Command::new(root().join("scripts/rabbit-node"))
            .args(["ctl", &asked.name])
            .args(args)
            .args(["--formatter", "json"])
            .output()
            .ok()?;
        serde_json::from_slice(&output.stdout).ok()
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if self.running {
            self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A SecantusDB owned by one test (for taking MongoDB away), killed on drop: in memory, or on
/// disk so that it can be killed and restarted with its data.
pub struct Secantus {
    port: u16,
    storage: String,
    child: Option<Child>,
}

impl Secantus {
    /// Throwaway, in memory.
    pub fn start() -> Self {
        Self::start_at(":memory:".into())
    }

    /// Stored under `dir` (WiredTiger), so `kill9` + `resume` keeps what it acknowledged.
    pub fn on_disk(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self::start_at(dir.display().to_string())
    }

    fn start_at(storage: String) -> Self {
        let mut db = Self {
            port: free_port(),
            storage,
            child: None,
        };
        db.resume();
        db
    }

    /// Starts (again) on the same port and storage; returns once it accepts connections.
    pub fn resume(&mut self) {
        let child = Command::new(root().join(".venv/bin/python"))
            .args(["-m", "secantus", "--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--storage-path", &self.storage])
            .args([
                "--oplog-max-entries",
                "20000",
                "--oplog-retention-seconds",
                "120",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "SecantusDB did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }
}

impl Drop for Secantus {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP port nobody listens on now, outside 35672-35682: RabbitMQ's CLI tools take their own
/// distribution ports there, so a node listening on one of them makes `rabbitmqctl` fail.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !(35672..=35682).contains(&port) {
            return port;
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub async fn events(settings: &Settings) -> mongodb::Collection<Document> {
    let client = mongodb::Client::with_uri_str(settings.mongo.uri.expose())
        .await
        .unwrap();
    client
        .database(&settings.mongo.database)
        .collection(&settings.mongo.collection)
}

pub async fn count(settings: &Settings, filter: Document) -> u64 {
    events(settings)
        .await
        .count_documents(filter)
        .await
        .unwrap()
}

pub async fn find(settings: &Settings, filter: Document) -> Vec<Document> {
    events(settings)
        .await
        .find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Waits until `filter` matches at least `n` documents; returns the final count.
pub async fn wait_for_count(
    settings: &Settings,
    filter: Document,
    n: u64,
    within: Duration,
) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let c = count(settings, filter.clone()).await;
        if c >= n || Instant::now() >= deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn all(settings: &Settings) -> Vec<Document> {
    find(settings, doc! {}).await
}

/// A fresh connection and a channel on it.
pub async fn channel(url: &str) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// The queue as a passive declare sees it; `None` if it does not exist.
async fn inspect_queue(url: &str, queue: &str) -> Option<lapin::Queue> {
    let (conn, ch) = channel(url).await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let found = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok();
    let _ = conn.close(200, "".into()).await;
    found
}

/// Messages ready in a queue (0 if it does not exist yet).
pub async fn depth(url: &str, queue: &str) -> u32 {
    inspect_queue(url, queue)
        .await
        .map_or(0, |q| q.message_count())
}

/// Publishes bytes straight to a queue (persistent, confirmed), bypassing the collector.
pub async fn publish_raw(url: &str, queue: &str, body: &[u8]) {
    publish_raw_encoded(url, queue, body, None).await;
}

/// Publishes to a queue as a collector would, with a content encoding if given. A nack (a
/// quorum queue still electing its leader under a loaded broker) is retried, as a collector's
/// client would.
pub async fn publish_raw_encoded(url: &str, queue: &str, body: &[u8], encoding: Option<&str>) {
    let (conn, ch) = channel(url).await;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut properties = lapin::BasicProperties::default().with_delivery_mode(2);
    if let Some(encoding) = encoding {
        properties = properties.with_content_encoding(encoding.into());
    }
    let mut last = None;
    for _ in 0..50 {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                properties.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if confirm.is_ack() {
            let _ = conn.close(200, "".into()).await;
            return;
        }
        last = Some(confirm);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the broker never confirmed the publish: {last:?}");
}

/// Polls `url` until it answers `expected`, for up to 30 s.
pub async fn status_becomes(client: &reqwest::Client, url: String, expected: u16) -> bool {
    eventually(Duration::from_secs(30), || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == expected)
        }
    })
    .await
}

/// Takes (and acks) every message in a queue, as parsed JSON.
pub async fn drain_json(url: &str, queue: &str) -> Vec<serde_json::Value> {
    let (conn, ch) = channel(url).await;
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        out.push(serde_json::from_slice(&m.delivery.data).unwrap());
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "".into()).await;
    out
}

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the test HTTP receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Status(u16),
    /// Accept the request and never answer.
    Hang,
    /// Never answer the first request; answer every later one as `Ok`.
    HangFirst,
}

/// A batch the receiver accepted (answered 200).
#[derive(Debug, Clone)]
pub struct Received {
    pub key: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub events: Vec<serde_json::Value>,
}

#[derive(Default)]
pub struct ReceiverState {
    pub mode: std::sync::Mutex<Option<Mode>>,
    pub received: std::sync::Mutex<Vec<Received>>,
    pub hits: std::sync::atomic::AtomicUsize,
}

/// A real HTTP server on 127.0.0.1 standing in for a vendor's webhook.
pub struct Receiver {
    pub url: String,
    pub state: std::sync::Arc<ReceiverState>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Self {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        let state = std::sync::Arc::new(ReceiverState::default());
        *state.mode.lock().unwrap() = Some(mode);
        async fn receive(
            State(state): State<std::sync::Arc<ReceiverState>>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> StatusCode {
            let earlier = state.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mode = match state.mode.lock().unwrap().unwrap_or(Mode::Ok) {
                Mode::HangFirst if earlier == 0 => Mode::Hang,
                Mode::HangFirst => Mode::Ok,
                mode => mode,
            };
            match mode {
                Mode::Hang | Mode::HangFirst => {
                    std::future::pending::<()>().await;
                    StatusCode::OK
                }
                Mode::Status(code) => StatusCode::from_u16(code).unwrap(),
                Mode::Ok => {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let events: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                    state.received.lock().unwrap().push(Received {
                        key: header("idempotency-key").unwrap_or_default(),
                        authorization: header("authorization"),
                        content_type: header("content-type"),
                        events,
                    });
                    StatusCode::OK
                }
            }
        }
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = Some(mode);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// messageId → the idempotency keys it arrived under (one entry per receipt).
    pub fn receipts(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for batch in self.received() {
            for event in &batch.events {
                let id = event["messageId"].as_str().unwrap_or_default().to_owned();
                out.entry(id).or_default().push(batch.key.clone());
            }
        }
        out
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Messages in every retry queue of a sink.
pub async fn retry_depth(s: &Settings, sink: &str) -> u32 {
    let topology = ingest_pipeline::Topology::new(s.broker.prefix.clone());
    let mut total = 0;
    for delay in s.sinks.retry_delays() {
        total += depth(s.broker.url.expose(), &topology.sink_retry(sink, delay)).await;
    }
    total
}

/// Takes every message of a queue as JSON with its string headers.
pub async fn drain_with_headers(
    url: &str,
    queue: &str,
) -> Vec<(
    std::collections::BTreeMap<String, String>,
    serde_json::Value,
)> {
    drain_raw_with_headers(url, queue)
        .await
        .into_iter()
        .map(|(headers, body)| (headers, serde_json::from_slice(&body).unwrap()))
        .collect()
}

/// Whether a queue exists.
pub async fn lapin_queue_exists(url: &str, queue: &str) -> bool {
    inspect_queue(url, queue).await.is_some()
}

/// Takes every message of a queue as raw bytes with its string headers. A quorum queue can
/// answer `basic.get` with a timeout for a while after its node restarted; that is waited out.
pub async fn drain_raw_with_headers(
    url: &str,
    queue: &str,
) -> Vec<(std::collections::BTreeMap<String, String>, Vec<u8>)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (conn, ch) = channel(url).await;
        let drained = drain_into(&ch, queue, &mut out).await;
        let _ = conn.close(200, "".into()).await;
        match drained {
            Ok(()) => return out,
            Err(error) => {
                assert!(Instant::now() < deadline, "cannot read {queue}: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn drain_into(
    ch: &lapin::Channel,
    queue: &str,
    out: &mut Vec<(std::collections::BTreeMap<String, String>, Vec<u8>)>,
) -> lapin::Result<()> {
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
    {
        let mut headers = std::collections::BTreeMap::new();
        if let Some(table) = m.delivery.properties.headers() {
            for (k, v) in table.inner() {
                if let lapin::types::AMQPValue::LongString(s) = v {
                    headers.insert(
                        k.to_string(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    );
                }
            }
        }
        out.push((headers, m.delivery.data.clone()));
        m.delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// Publishes `body` once to `queue` (persistent, mandatory, confirmed) on a connection of its
/// own, for a client that must go on while the broker is down. `Ok` only if the broker
/// confirmed it and routed it to the queue; otherwise what happened (a refused connection, a
/// nack, a return, no confirm within `within`). An `Err` may still have been stored.
pub async fn publish_once(
    url: &str,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
    within: Duration,
) -> Result<(), String> {
    let attempt = async {
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let confirmed = async {
            let ch = connection.create_channel().await?;
            ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
                .await?;
            let mandatory = lapin::options::BasicPublishOptions {
                mandatory: true,
                ..lapin::options::BasicPublishOptions::default()
            };
            ch.basic_publish("".into(), queue.into(), mandatory, body, properties)
                .await?
                .await
        }
        .await;
        let _ = connection.close(200, "".into()).await;
        match confirmed.map_err(|e| format!("publish: {e}"))? {
            lapin::Confirmation::Ack(None) => Ok(()),
            other => Err(format!("not confirmed: {other:?}")),
        }
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no confirm within {within:?}")))
}

impl Process {
    /// Like `memory_kib`, `None` once the process is gone (no panic on a process that died).
    pub fn try_memory_kib(&mut self) -> Option<(u64, u64)> {
        if !self.is_running() {
            return None;
        }
        proc_memory_kib(self.pid())
    }
}

/// Resident memory of a process now and at its peak, in KiB (`VmRSS`, `VmHWM` from /proc).
fn proc_memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// How many documents hold each (source, messageId): what MongoDB holds an event under.
pub async fn stored_keys(
    collection: &mongodb::Collection<Document>,
) -> std::collections::HashMap<(String, String), usize> {
    let mut stored = std::collections::HashMap::new();
    let mut cursor = collection
        .find(doc! {})
        .projection(doc! {"source": 1, "messageId": 1, "_id": 0})
        .batch_size(10_000)
        .await
        .unwrap();
    while let Some(document) = cursor.try_next().await.unwrap() {
        let source = document.get_str("source").unwrap_or_default().to_owned();
        if let Ok(id) = document.get_str("messageId") {
            *stored.entry((source, id.to_owned())).or_insert(0) += 1;
        }
    }
    stored
}

/// What became of the events a load generator got a 2xx for: how many are not in MongoDB, and
/// how many are there more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub accepted: usize,
    pub missing: usize,
    pub duplicated: usize,
}

impl Settled {
    /// The failures to report: none when every event is stored exactly once.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.accepted == 0 {
            failures.push("no event was 2xx'd".to_owned());
        }
        if self.missing > 0 {
            failures.push(format!(
                "{} 2xx'd events missing from MongoDB",
                self.missing
            ));
        }
        if self.duplicated > 0 {
            failures.push(format!("{} events stored more than once", self.duplicated));
        }
        failures
    }
}

/// Waits (up to 300 s) until the raw queue on `broker` is empty and every `(source, messageId)`
/// of `accepted` is in MongoDB, then counts what is missing and what is doubled. The wait ends
/// as soon as all is there; its bound is only for a run that will fail (a loaded 2-core machine
/// once took over 120 s to store a spool test's ~20,000 events).
pub async fn settle_accepted(s: &Settings, broker: &str, accepted: &[(String, String)]) -> Settled {
    let raw = ingest_pipeline::Topology::new(s.broker.prefix.clone()).raw();
    let collection = events(s).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let stored = loop {
        let stored = stored_keys(&collection).await;
        let raw_empty = depth(broker, &raw).await == 0;
        if (raw_empty && accepted.iter().all(|k| stored.contains_key(k)))
            || Instant::now() >= deadline
        {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    Settled {
        accepted: accepted.len(),
        missing: accepted.iter().filter(|k| !stored.contains_key(*k)).count(),
        duplicated: accepted
            .iter()
            .filter(|k| stored.get(*k).is_some_and(|n| *n > 1))
            .count(),
    }
}

/// `POST {collector}/v1/batch` with the iOS test key.
pub async fn post_batch(
    client: &reqwest::Client,
    collector: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client
        .post(format!("{collector}/v1/batch"))
        .basic_auth(IOS_KEY, Some(""))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// `GET {base}/metrics`, as text.
pub async fn metrics_of(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line `name{labels} value` in Prometheus text format (0 if absent).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `ingestctl` with the test's settings, without blocking the runtime that serves in-process
/// services it talks to; its exit code and stdout.
pub async fn ingestctl_async(s: &Settings, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(binary("ingestctl"))
        .envs(settings_env(s))
        .current_dir(root())
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The bytes gunzipped if they are gzip (by their magic number), else as they are.
pub fn gunzip_if_gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes), &mut out)?;
    Ok(out)
}

/// A TCP proxy in front of a server (e.g. SecantusDB) that forwards both ways until told to
/// stall. Stalled, it holds every byte a client sends, on open and new connections alike,
/// without forwarding it: the server never sees the request, as with a store that stopped
/// taking work but still answers on its own (a MongoDB server goes on streaming heartbeats to
/// the driver's monitor, so only a timeout of the client's own ends the request). `resume`
/// forwards again, held bytes first. Stops when dropped.
pub struct StallProxy {
    pub addr: std::net::SocketAddr,
    stalled: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl StallProxy {
    /// Forwards every connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let (upstream, watch) = (upstream.to_owned(), stalled.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                connections.spawn(Self::pump(
                    client_read,
                    server_write,
                    Some(watch.subscribe()),
                ));
                connections.spawn(Self::pump(server_read, client_write, None));
            }
        });
        Self {
            addr,
            stalled,
            task,
        }
    }

    /// Copies `from` to `to`, holding each read while `stalled` says so.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut stalled: Option<tokio::sync::watch::Receiver<bool>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(stalled) = stalled.as_mut() {
                if stalled.wait_for(|stalled| !*stalled).await.is_err() {
                    break;
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 exchange on a new connection, as a device's client would write it: the request
/// line, `Host`, the given headers and `Connection: close`, then the body, with a
/// `Content-Length` or, when `chunked`, as `Transfer-Encoding: chunked` in chunks of at most
/// `chunk` bytes. Returns the status, the response head (lowercased) and its body, read until the
/// collector closes the connection; `None` if it did not answer within 30 s.
pub async fn http1_exchange(
    base_url: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: &[u8],
    chunked: Option<usize>,
) -> Option<(u16, String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.strip_prefix("http://").unwrap_or(base_url);
    let mut request =
        format!("POST {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut bytes = match chunked {
        Some(_) => format!("{request}Transfer-Encoding: chunked\r\n\r\n").into_bytes(),
        None => format!("{request}Content-Length: {}\r\n\r\n", body.len()).into_bytes(),
    };
    match chunked {
        Some(size) => {
            for piece in body.chunks(size.max(1)) {
                bytes.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                bytes.extend_from_slice(piece);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
        None => bytes.extend_from_slice(body),
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(&bytes).await.ok()?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.ok()?;
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let status = head.get(9..12)?.parse().ok()?;
        Some((status, head, got[end + 4..].to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .ok()
        .flatten()
}
