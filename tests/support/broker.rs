//! RabbitMQ for tests: nodes and clusters a test owns, reading, publishing to and draining
//! queues, and a TCP proxy that stalls a broker's answers.

use ingest_pipeline::broker::{until_taken, Policy, Publisher};
use ingest_pipeline::Settings;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

use crate::*;

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
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let connection = std::sync::Arc::new(connection);
    let publisher = Publisher::open(connection.clone()).await.unwrap();
    let mut properties = lapin::BasicProperties::default().with_delivery_mode(2);
    if let Some(encoding) = encoding {
        properties = properties.with_content_encoding(encoding.into());
    }
    let policy = Policy {
        nacks: 50,
        pause_max: Duration::from_millis(200),
        ..Policy::patient(Duration::from_secs(10))
    };
    let taken = until_taken(&publisher, "", queue, body, properties, &policy).await;
    let _ = connection.close(200, "".into()).await;
    if let Err(error) = taken {
        panic!("the broker did not take the publish into {queue}: {error}");
    }
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

/// Deletes a queue by hand, as an operator would (`rabbitmqctl delete_queue`); `false` if the
/// broker refused (it may be gone already).
pub async fn delete_queue(url: &str, queue: &str) -> bool {
    let (conn, ch) = channel(url).await;
    let deleted = ch
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .is_ok();
    let _ = conn.close(200, "".into()).await;
    deleted
}

/// Empties a queue by hand (`rabbitmqctl purge_queue`).
pub async fn purge_queue(url: &str, queue: &str) {
    let (conn, ch) = channel(url).await;
    ch.queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;
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

/// A message's string headers.
fn string_headers(
    properties: &lapin::BasicProperties,
) -> std::collections::BTreeMap<String, String> {
    let mut headers = std::collections::BTreeMap::new();
    if let Some(table) = properties.headers() {
        for (k, v) in table.inner() {
            if let lapin::types::AMQPValue::LongString(s) = v {
                headers.insert(
                    k.to_string(),
                    String::from_utf8_lossy(s.as_bytes()).into_owned(),
                );
            }
        }
    }
    headers
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
        out.push((
            string_headers(&m.delivery.properties),
            m.delivery.data.clone(),
        ));
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
        let connection = std::sync::Arc::new(connection);
        let taken = match Publisher::open(connection.clone()).await {
            Ok(publisher) => {
                let policy = Policy::answer_within(within);
                until_taken(&publisher, "", queue, body, properties, &policy)
                    .await
                    .map_err(|e| format!("not taken: {e}"))
            }
            Err(e) => Err(format!("channel: {e}")),
        };
        let _ = connection.close(200, "".into()).await;
        taken
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no confirm within {within:?}")))
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

/// Reads a stream from its first message: up to `count` messages as raw bytes with their
/// string headers, or fewer if no more come within `quiet`. Reading a stream takes nothing
/// from it.
pub async fn read_stream(
    url: &str,
    stream: &str,
    count: usize,
    quiet: Duration,
) -> Vec<(std::collections::BTreeMap<String, String>, Vec<u8>)> {
    use futures_util::StreamExt;
    let (conn, ch) = channel(url).await;
    ch.basic_qos(100, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        lapin::types::AMQPValue::LongString("first".into()),
    );
    let mut consumer = ch
        .basic_consume(
            stream.into(),
            "test-reader".into(),
            lapin::options::BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < count {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, consumer.next()).await else {
            break;
        };
        out.push((string_headers(&delivery.properties), delivery.data.clone()));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "".into()).await;
    out
}

/// Publishes `body` to the replay lane as `ingestctl replay` does: `properties` (a request's,
/// as the collector wrote them) with the replay's marks added, naming `sinks`; confirmed.
pub async fn publish_replayed(
    url: &str,
    topology: &ingest_pipeline::Topology,
    body: &[u8],
    properties: lapin::BasicProperties,
    sinks: &[String],
) {
    let (connection, channel) = channel(url).await;
    topology.declare(&connection).await.unwrap();
    topology.declare_replay(&connection).await.unwrap();
    let mut table = properties.headers().clone().unwrap_or_default();
    ingest_pipeline::message::mark_from_archive(&mut table, chrono::Utc::now(), Some(sinks));
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            topology.replay().as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties.with_headers(table),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "".into()).await;
}
