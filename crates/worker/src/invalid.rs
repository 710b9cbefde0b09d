//! The invalid queue: events that failed decoding, validation or conversion, each kept with
//! every error and the original event (or, if it never parsed, the raw payload in base64).

use base64::Engine;
use ingest_pipeline::broker::long_string;
use ingest_pipeline::broker::Publisher;
use ingest_schema::Issue;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use serde::Serialize;
use serde_json::Value;

use crate::enrich::{format_time, RequestMeta};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InvalidRecord {
    /// `decode` (the payload could not be read), `schema` (the event failed validation) or
    /// `storage` (the event cannot be represented in the sink).
    pub reason: &'static str,
    pub errors: Vec<Issue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_base64: Option<String>,
    pub source: String,
    pub request_id: String,
    pub received_at: String,
}

impl InvalidRecord {
    pub fn new(
        reason: &'static str,
        errors: Vec<Issue>,
        event: Option<Value>,
        meta: &RequestMeta,
    ) -> Self {
        Self {
            reason,
            errors,
            event,
            raw_base64: None,
            source: meta.source.clone(),
            request_id: meta.request_id.clone(),
            received_at: format_time(meta.received_at),
        }
    }

    pub fn undecodable(message: String, raw: &[u8], meta: &RequestMeta) -> Self {
        let mut record = Self::new(
            "decode",
            vec![Issue {
                pointer: String::new(),
                message,
                schema: "payload".into(),
            }],
            None,
            meta,
        );
        record.raw_base64 = Some(base64::engine::general_purpose::STANDARD.encode(raw));
        record
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidPublishError {
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker did not confirm the invalid record")]
    NotConfirmed,
    #[error("cannot encode the invalid record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Publishes one record persistently and waits for the broker's confirm.
pub async fn publish(
    channel: &Publisher,
    queue: &str,
    record: &InvalidRecord,
) -> Result<(), InvalidPublishError> {
    let body = serde_json::to_vec(record)?;
    let mut headers = FieldTable::default();
    headers.insert("reason".into(), long_string(record.reason));
    headers.insert("source".into(), long_string(&record.source));
    headers.insert("request_id".into(), long_string(&record.request_id));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    let confirmation = channel
        .publish(
            "",
            queue,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            properties,
        )
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        _ => Err(InvalidPublishError::NotConfirmed),
    }
}
