//! MongoDB side of the benchmark: the bare `insert_many` ceiling with the very documents the
//! worker would store, and the check that every accepted messageId is stored exactly once.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Document, RawDocumentBuf};
use futures_util::TryStreamExt;
use ingest_schema::{Registry, UnknownEventPolicy};
use mongodb::{Client, Collection};
use worker::enrich::Enrichment;
use worker::process::{process, Documents, PayloadLimits};
use worker::sinks::mongo::to_document;

use crate::amqp::collector_properties;
use crate::payload::Generator;

pub async fn collection(
    uri: &str,
    database: &str,
    name: &str,
) -> anyhow::Result<Collection<Document>> {
    let client = Client::with_uri_str(uri).await?;
    Ok(client.database(database).collection(name))
}

/// The documents the worker stores for `requests` generated payloads: decoded, enriched,
/// validated and converted to BSON by the worker's own code. Fails if any event is invalid (the
/// generator must only make events the tracking plan accepts).
pub fn worker_documents(
    schemas: &Path,
    mut generator: Generator,
    requests: usize,
) -> anyhow::Result<Vec<RawDocumentBuf>> {
    let registry = Registry::load(schemas, UnknownEventPolicy::Reject)?;
    let limits = PayloadLimits {
        max_bytes: 1 << 20,
        max_events: 2000,
        max_built_bytes: 16 << 20,
    };
    let mut documents = Vec::new();
    for _ in 0..requests {
        let payload = generator.next_payload();
        let outcome = process(
            &registry,
            &collector_properties("shop-ios", payload.gzip),
            &payload.body,
            limits,
            Documents::Made,
            &Enrichment::off(),
        );
        if let Some(invalid) = outcome.invalid.first() {
            anyhow::bail!(
                "a generated event is invalid: {}",
                serde_json::to_string(invalid).unwrap_or_default()
            );
        }
        for event in &outcome.valid {
            documents.push(to_document(event.doc()).map_err(anyhow::Error::msg)?);
        }
    }
    Ok(documents)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InsertReport {
    pub documents: usize,
    pub batch: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub documents_per_s: f64,
}

/// Bare unordered `insert_many` of `documents` in batches, `concurrency` at once.
pub async fn insert_many(
    collection: &Collection<Document>,
    documents: Vec<RawDocumentBuf>,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<InsertReport> {
    let total = documents.len();
    let collection = collection.clone_with_type::<RawDocumentBuf>();
    let batches: Vec<Vec<RawDocumentBuf>> = documents
        .chunks(batch.max(1))
        .map(<[RawDocumentBuf]>::to_vec)
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(batches.into_iter()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (queue, collection) = (queue.clone(), collection.clone());
        tasks.spawn(async move {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some(chunk) = next else {
                    return Ok::<(), mongodb::error::Error>(());
                };
                collection.insert_many(chunk).ordered(false).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-3);
    Ok(InsertReport {
        documents: total,
        batch,
        concurrency,
        seconds,
        documents_per_s: total as f64 / seconds,
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Verify {
    pub expected: usize,
    pub found: usize,
    pub missing: usize,
    /// Documents with an expected messageId beyond the first (must be 0).
    pub duplicates: usize,
    pub missing_examples: Vec<String>,
}

/// Checks that every id is stored exactly once (by `messageId`). Reads every document's
/// `messageId` in one pass (a MongoDB-wire server in Python answers a long `$in` slowly), so
/// `collection` should hold only the run's events.
pub async fn verify(collection: &Collection<Document>, ids: &[String]) -> anyhow::Result<Verify> {
    let mut stored: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut cursor = collection
        .find(doc! {})
        .projection(doc! {"messageId": 1, "_id": 0})
        .batch_size(10_000)
        .await?;
    while let Some(document) = cursor.try_next().await? {
        if let Ok(id) = document.get_str("messageId") {
            *stored.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    let missing: Vec<&String> = ids.iter().filter(|id| !stored.contains_key(*id)).collect();
    let duplicates = ids
        .iter()
        .filter_map(|id| stored.get(id))
        .map(|n| n.saturating_sub(1))
        .sum();
    Ok(Verify {
        expected: ids.len(),
        found: ids.len() - missing.len(),
        missing: missing.len(),
        duplicates,
        missing_examples: missing.iter().take(5).map(|s| (*s).clone()).collect(),
    })
}

/// Waits until the collection holds at least `n` documents; returns the last count.
pub async fn wait_count(collection: &Collection<Document>, n: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let count = collection
            .estimated_document_count()
            .await
            .unwrap_or_default();
        if count >= n || Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
