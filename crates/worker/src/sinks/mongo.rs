//! The MongoDB sink: unordered `insert_many` of batches gathered across deliveries. A document's
//! `_id` is its event's `messageId` (and `messageId` has a unique index too), so a redelivered
//! event is stored once and a duplicate-key error can only mean "already stored": success.

use std::time::Duration;

use bson::{doc, Document};
use ingest_pipeline::settings::MongoSettings;
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};
use serde_json::{Map, Value};

use super::{Batch, Sink, SinkError};

const DUPLICATE_KEY: i32 = 11000;
/// Fields stored as BSON dates, so they can be queried and indexed as times.
const DATE_FIELDS: [&str; 4] = ["timestamp", "receivedAt", "sentAt", "originalTimestamp"];

/// The sink's indexes on `collection`: a unique `messageId`.
pub async fn ensure_indexes(
    collection: &Collection<Document>,
) -> Result<(), mongodb::error::Error> {
    let unique = IndexModel::builder()
        .keys(doc! {"messageId": 1})
        .options(
            IndexOptions::builder()
                .unique(true)
                .name("messageId_unique".to_owned())
                .build(),
        )
        .build();
    collection.create_index(unique).await?;
    Ok(())
}

#[derive(Clone)]
pub struct MongoSink {
    collection: Collection<Document>,
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
        })
    }

    pub async fn ensure_indexes(&self) -> Result<(), mongodb::error::Error> {
        ensure_indexes(&self.collection).await
    }

    pub async fn ping(&self) -> bool {
        self.collection
            .client()
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .is_ok()
    }

    /// One `insert_many`; duplicates of stored events count as written.
    pub async fn write(&self, docs: &[Document]) -> Result<(), SinkError> {
        if docs.is_empty() {
            return Ok(());
        }
        match self.collection.insert_many(docs).ordered(false).await {
            Ok(_) => Ok(()),
            Err(error) => match error.kind.as_ref() {
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(write_errors),
                    write_concern_error: None,
                    ..
                }) if write_errors.iter().all(|e| e.code == DUPLICATE_KEY) => Ok(()),
                // The server refused documents: retrying the same documents cannot help.
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(_),
                    write_concern_error: None,
                    ..
                }) => Err(SinkError::Permanent(error.to_string())),
                _ => Err(SinkError::Retryable(error.to_string())),
            },
        }
    }
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
            match to_document(event) {
                Ok(document) => {
                    documents.push(document);
                    positions.push(index);
                }
                Err(reason) => refused.push((index, reason)),
            }
        }
        match self.write(&documents).await {
            Ok(()) => {}
            Err(SinkError::Permanent(_)) => {
                // Find the documents the server refuses; write the others.
                for (document, index) in documents.iter().zip(&positions) {
                    match self.write(std::slice::from_ref(document)).await {
                        Ok(()) => {}
                        Err(SinkError::Permanent(reason)) => refused.push((*index, reason)),
                        Err(other) => return Err(other),
                    }
                }
            }
            Err(other) => return Err(other),
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(SinkError::Refused(refused))
        }
    }
}

/// The document stored for an event: `_id` = `messageId`, then the event itself, with its times
/// as BSON dates. Keys MongoDB reserves (`_id`, a leading `$`) are refused, not rewritten.
pub fn to_document(event: &Map<String, Value>) -> Result<Document, String> {
    if let Some(key) = event.keys().find(|k| *k == "_id" || k.starts_with('$')) {
        return Err(format!(
            "the top-level key `{key}` is reserved by the database"
        ));
    }
    let message_id = match event.get("messageId") {
        Some(Value::String(id)) => id.clone(),
        _ => return Err("no string messageId".into()),
    };
    let mut document = doc! {"_id": message_id};
    document.extend(bson::to_document(event).map_err(|e| e.to_string())?);
    for field in DATE_FIELDS {
        let parsed = crate::enrich::parse_time(event.get(field));
        if let Some(time) = parsed {
            document.insert(field, bson::DateTime::from_chrono(time));
        }
    }
    Ok(document)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_become_dates_and_other_fields_stay() {
        let event =
            json!({"messageId":"m","timestamp":"2026-11-21T12:00:00.000Z","properties":{"n":1}});
        let document = to_document(event.as_object().expect("object")).expect("doc");
        assert_eq!(document.get_str("messageId"), Ok("m"));
        assert_eq!(document.get_str("_id"), Ok("m"));
        assert!(matches!(
            document.get("timestamp"),
            Some(bson::Bson::DateTime(_))
        ));
        assert_eq!(
            document
                .get_document("properties")
                .map(|p| p.get_i64("n").is_ok() || p.get_i32("n").is_ok()),
            Ok(true)
        );
    }

    #[test]
    fn numbers_bson_cannot_hold_are_an_error_not_a_panic() {
        let event = json!({"messageId":"m","properties":{"big": u64::MAX}});
        assert!(to_document(event.as_object().expect("object")).is_err());
    }

    /// `bson::to_document` accepts a NUL byte in a key; writing it as BSON (a C string) fails.
    /// Such an event must be refused by the check, not by the driver at insert time.
    #[test]
    fn a_key_bson_cannot_encode_is_not_storable() {
        let event = json!({"messageId":"m","properties":{"k\u{0}x":1}});
        assert!(to_document(event.as_object().expect("object")).is_err());
    }

    #[test]
    fn reserved_keys_are_refused() {
        for event in [
            json!({"messageId":"m","_id":"x"}),
            json!({"messageId":"m","$where":"1"}),
        ] {
            let error = to_document(event.as_object().expect("object")).expect_err("reserved");
            assert!(error.contains("reserved"), "{error}");
        }
    }
}
