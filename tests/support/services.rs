//! The collector and the worker, run in this process (port 0) or as their own OS processes,
//! and `ingestctl`; each stopped when its handle is dropped.

use ingest_pipeline::settings::HttpSinkSettings;
use ingest_pipeline::Settings;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::*;

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
