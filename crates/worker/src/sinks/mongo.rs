//! The MongoDB sink: unordered `insert_many` of batches gathered across deliveries. A document's
//! `_id` is `{source, messageId}` (and `source` + `messageId` have a unique index too), so a
//! redelivered event is stored once, the same `messageId` from another source is an event of its
//! own, and a duplicate-key error can only mean "already stored": success.
//!
//! An event is converted to BSON bytes once, by `to_document`, both when the worker decides
//! whether it can be stored and here, and the sink sends those bytes as they are: an event that
//! passed the check cannot fail the driver at insert time. A document the server refuses costs
//! only itself: an unordered insert stores every other document and names the refused ones.
//! A write error that passes (a primary stepping down, by code or label) is no refusal: the
//! batch is retried (`verdict`).
//!
//! Every operation is bounded by `mongo.timeout_ms`: the driver notices a server whose monitor
//! connection stops answering, but not one that still answers its heartbeats while an insert
//! waits for ever (a stuck disk, a lock), and there the bound turns a hang into a retry.
//!
//! SecantusDB, which the tests run against, has no `configureFailPoint`, so a stepdown cannot
//! be staged end to end; the classification is unit-tested from the driver's own error types.

use std::time::Duration;

use bson::{doc, RawDocumentBuf};
use ingest_pipeline::settings::MongoSettings;
use ingest_schema::{Doc, Node};
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};

use super::{Batch, Sink, SinkError};

const DUPLICATE_KEY: i32 = 11000;
/// Codes of errors that pass: a primary stepping down or a node shutting down, recovering or
/// unreachable (the retryable-writes list MongoDB drivers retry on). PrimarySteppedDown,
/// ShutdownInProgress, NotWritablePrimary, InterruptedAtShutdown,
/// InterruptedDueToReplStateChange, NotPrimaryNoSecondaryOk, NotPrimaryOrSecondary,
/// HostNotFound, HostUnreachable, NetworkTimeout, SocketException, ExceededTimeLimit.
const TRANSIENT_CODES: [i32; 12] = [
    189, 91, 10107, 11600, 11602, 13435, 13436, 7, 6, 89, 9001, 262,
];
/// Labels the server or the driver puts on an error worth trying again.
const RETRY_LABELS: [&str; 3] = [
    "RetryableWriteError",
    "RetryableError",
    "SystemOverloadedError",
];
const INDEX_NOT_FOUND: i32 = 27;
const NAMESPACE_NOT_FOUND: i32 = 26;
/// The unique index on what identifies an event.
pub const UNIQUE_INDEX: &str = "source_messageId_unique";
/// The unique index on `messageId` alone, from releases that stored `_id` = `messageId`: it
/// would refuse a second source's event as a duplicate, so it is dropped.
const OLD_UNIQUE_INDEX: &str = "messageId_unique";
/// Fields stored as BSON dates, so they can be queried and indexed as times.
pub(crate) const DATE_FIELDS: [&str; 4] =
    ["timestamp", "receivedAt", "sentAt", "originalTimestamp"];

/// The sink's indexes on `collection`: a unique `source` + `messageId`. An earlier release's
/// unique `messageId` is dropped once the new index exists, so uniqueness is never missing.
pub async fn ensure_indexes<T: Send + Sync>(
    collection: &Collection<T>,
) -> Result<(), mongodb::error::Error> {
    let unique = IndexModel::builder()
        .keys(doc! {"source": 1, "messageId": 1})
        .options(
            IndexOptions::builder()
                .unique(true)
                .name(UNIQUE_INDEX.to_owned())
                .build(),
        )
        .build();
    collection.create_index(unique).await?;
    match collection.drop_index(OLD_UNIQUE_INDEX).await {
        Ok(()) => {
            tracing::info!(
                index = OLD_UNIQUE_INDEX,
                "dropped the unique index of an earlier release"
            );
            Ok(())
        }
        Err(error) => match error.kind.as_ref() {
            ErrorKind::Command(e) if [INDEX_NOT_FOUND, NAMESPACE_NOT_FOUND].contains(&e.code) => {
                Ok(())
            }
            _ => {
                // While it exists, an event whose messageId another source used is dropped as
                // a duplicate: better not to start.
                tracing::error!(%error, index = OLD_UNIQUE_INDEX, "cannot drop an old index");
                Err(error)
            }
        },
    }
}

/// What a MongoDB write error means for the document it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Duplicate key: the event is already stored, a success.
    Stored,
    /// Transient: the document can be written later, so the batch is tried again.
    Retry,
    /// The server will never take this document: it alone is dead-lettered.
    Refuse,
}

/// Classifies a write error by its code and the labels of the error that carried it.
pub fn verdict(code: i32, labels: &[&str]) -> Verdict {
    if code == DUPLICATE_KEY {
        Verdict::Stored
    } else if TRANSIENT_CODES.contains(&code) || labels.iter().any(|l| RETRY_LABELS.contains(l)) {
        Verdict::Retry
    } else {
        Verdict::Refuse
    }
}

/// What one `insert_many` did with the documents it was given.
#[derive(Debug, Default, PartialEq, Eq)]
struct Written {
    inserted: usize,
    duplicates: usize,
    /// Position in the documents given, and why the server refused the document.
    refused: Vec<(usize, String)>,
}

#[derive(Clone)]
pub struct MongoSink {
    collection: Collection<RawDocumentBuf>,
    timeout: Duration,
}

impl MongoSink {
    pub async fn connect(settings: &MongoSettings) -> Result<Self, mongodb::error::Error> {
        let mut options = ClientOptions::parse(settings.uri.expose()).await?;
        options
            .app_name
            .get_or_insert_with(|| "ingest-worker".to_owned());
        options
            .server_selection_timeout
            .get_or_insert(Duration::from_secs(5));
        options
            .connect_timeout
            .get_or_insert(Duration::from_secs(5));
        // The worker acks a message once its insert is acknowledged. With MongoDB's default
        // (`j: false`) an acknowledged write can still be lost if the server process dies
        // before its journal is flushed (the chaos suite lost 91 events in 8 kills that way),
        // so writes wait for the journal unless the URI says otherwise (`journal=false`).
        let concern = options.write_concern.get_or_insert_with(Default::default);
        concern.journal.get_or_insert(true);
        let client = Client::with_options(options)?;
        Ok(Self {
            collection: client
                .database(&settings.database)
                .collection(&settings.collection),
            timeout: settings.timeout(),
        })
    }

    /// `ensure_indexes`, within `mongo.timeout_ms`.
    pub async fn ensure_indexes(&self) -> Result<(), mongodb::error::Error> {
        match tokio::time::timeout(self.timeout, ensure_indexes(&self.collection)).await {
            Ok(result) => result,
            Err(_) => Err(ErrorKind::Io(std::sync::Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                self.no_answer(),
            )))
            .into()),
        }
    }

    /// Whether MongoDB answers a ping within `mongo.timeout_ms`.
    pub async fn ping(&self) -> bool {
        let admin = self.collection.client().database("admin");
        let ping = admin.run_command(doc! {"ping": 1});
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }

    /// One unordered `insert_many` of the very bytes `to_document` made, within
    /// `mongo.timeout_ms`. An insert cut short may still be applied: retried, it is a duplicate.
    async fn write(
        &self,
        documents: &[std::borrow::Cow<'_, RawDocumentBuf>],
    ) -> Result<Written, SinkError> {
        if documents.is_empty() {
            return Ok(Written::default());
        }
        let insert = self
            .collection
            .insert_many(documents.iter().map(|d| &**d))
            .ordered(false);
        match tokio::time::timeout(self.timeout, insert).await {
            Ok(Ok(_)) => Ok(Written {
                inserted: documents.len(),
                ..Written::default()
            }),
            Ok(Err(error)) => written_despite(&error, documents.len()),
            Err(_) => Err(SinkError::Retryable(self.no_answer())),
        }
    }

    fn no_answer(&self) -> String {
        format!(
            "MongoDB did not answer within {} ms (mongo.timeout_ms)",
            self.timeout.as_millis()
        )
    }
}

/// What an `insert_many` of `documents` documents that failed with `error` still did. Only
/// per-document write errors (for an unordered insert, every document not named was stored)
/// say so; anything else (network, server selection, a command error, a write concern error)
/// may have stored some, all or none, so the whole batch is retried: what was stored comes
/// back as duplicates. A transient write error retries the whole batch too.
fn written_despite(error: &mongodb::error::Error, documents: usize) -> Result<Written, SinkError> {
    let ErrorKind::InsertMany(InsertManyError {
        write_errors: Some(write_errors),
        write_concern_error: None,
        ..
    }) = error.kind.as_ref()
    else {
        return Err(SinkError::Retryable(error.to_string()));
    };
    let labels: Vec<&str> = RETRY_LABELS
        .into_iter()
        .filter(|label| error.contains_label(label))
        .collect();
    let mut written = Written {
        inserted: documents.saturating_sub(write_errors.len()),
        ..Written::default()
    };
    for write_error in write_errors {
        let (index, code) = (write_error.index, write_error.code);
        if index >= documents {
            return Err(SinkError::Retryable(format!(
                "MongoDB named document {index} of a batch of {documents}"
            )));
        }
        match verdict(code, &labels) {
            Verdict::Stored => written.duplicates += 1,
            Verdict::Retry => {
                return Err(SinkError::Retryable(format!(
                    "MongoDB could not write document {index} for now (code {code}): {}",
                    write_error.message
                )))
            }
            Verdict::Refuse => written.refused.push((
                index,
                format!(
                    "MongoDB refused the document (code {code}): {}",
                    write_error.message
                ),
            )),
        }
    }
    Ok(written)
}

#[async_trait::async_trait]
impl Sink for MongoSink {
    fn name(&self) -> &str {
        "mongo"
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), SinkError> {
        let mut refused = Vec::new();
        let mut documents = Vec::with_capacity(batch.events.len());
        let mut positions = Vec::with_capacity(batch.events.len());
        for (index, event) in batch.events.iter().enumerate() {
            // The bytes made when the worker checked the event, if it made them here; an event
            // read back from a queue is converted again, by the same function.
            let document = match event.document() {
                Some(document) => Ok(std::borrow::Cow::Borrowed(document)),
                None => to_document(event.doc()).map(std::borrow::Cow::Owned),
            };
            match document {
                Ok(document) => {
                    documents.push(document);
                    positions.push(index);
                }
                Err(reason) => refused.push((index, format!("cannot be stored: {reason}"))),
            }
        }
        let written = self.write(&documents).await?;
        for (position, reason) in written.refused {
            if let Some(index) = positions.get(position) {
                refused.push((*index, reason));
            }
        }
        for (outcome, n) in [
            ("inserted", written.inserted),
            ("duplicate", written.duplicates),
            ("refused", refused.len()),
        ] {
            metrics::counter!("mongo_documents_total", "outcome" => outcome).increment(n as u64);
        }
        if refused.is_empty() {
            Ok(())
        } else {
            refused.sort_by_key(|(index, _)| *index);
            Err(SinkError::Refused(refused))
        }
    }
}

/// An event as MongoDB stores it, for the BSON serialiser.
struct Stored<'a> {
    source: &'a str,
    message_id: &'a str,
    event: Node<'a>,
}

impl serde::Serialize for Stored<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.event.len() + 1))?;
        map.serialize_entry(
            "_id",
            &doc! {"source": self.source, "messageId": self.message_id},
        )?;
        for (key, value) in self.event.members().into_iter().flatten() {
            let time = DATE_FIELDS
                .contains(&key)
                .then(|| value.as_str().and_then(crate::enrich::parse_time_str))
                .flatten();
            match time {
                Some(time) => map.serialize_entry(key, &bson::DateTime::from_chrono(time))?,
                None => map.serialize_entry(key, &value)?,
            }
        }
        map.end()
    }
}

/// The bytes stored for an event, exactly as the sink sends them: `_id` = `{source, messageId}`,
/// then the event itself, with its times as BSON dates. Keys MongoDB reserves (`_id`, a leading
/// `$`) are refused, not rewritten, and so is anything BSON cannot encode (a NUL byte in a key,
/// an integer beyond i64).
pub fn to_document(event: &Doc) -> Result<RawDocumentBuf, String> {
    let node = event.node();
    let mut keys = node.members().into_iter().flatten().map(|(key, _)| key);
    if let Some(key) = keys.find(|k| *k == "_id" || k.starts_with('$')) {
        return Err(format!(
            "the top-level key `{key}` is reserved by the database"
        ));
    }
    let (Some(source), Some(message_id)) = (event.get_str("source"), event.get_str("messageId"))
    else {
        return Err("no string source and messageId".into());
    };
    // Straight to bytes: the same document a `Document` would encode to (`_id` first, then
    // the event's fields in order, its times as BSON dates), without building one.
    let document = Stored {
        source,
        message_id,
        event: node,
    };
    bson::to_vec(&document)
        .map_err(|e| e.to_string())
        .and_then(|bytes| RawDocumentBuf::from_bytes(bytes).map_err(|e| e.to_string()))
        .map_err(|e| format!("not encodable as BSON: {e}"))
}

#[cfg(test)]
#[path = "mongo/tests.rs"]
mod tests;
