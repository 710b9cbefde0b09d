//! MongoDB for tests: a SecantusDB a test owns, reading what the worker stored, and checking
//! that every 2xx'd event is there exactly once.

use futures_util::TryStreamExt;
use ingest_pipeline::Settings;
use mongodb::bson::{doc, Document};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::*;

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
