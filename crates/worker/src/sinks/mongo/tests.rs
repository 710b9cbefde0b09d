//! The bytes the MongoDB sink writes for an event (its `_id` of source and `messageId`, dates,
//! what BSON cannot hold) and how it reads the server's answers.

use super::*;
use serde_json::{Map, Value};

/// `to_document` on the event parsed from its JSON text, as the worker parses it (strings as
/// spans of the text).
fn stored(event: &Map<String, Value>) -> Result<RawDocumentBuf, String> {
    let text = serde_json::to_string(event).expect("writes");
    let doc = Doc::parse(std::sync::Arc::from(text)).expect("parses");
    to_document(&doc)
}

/// The document the sink stored before it wrote bytes directly: built as a `Document`.
fn through_a_document(event: &Map<String, Value>) -> RawDocumentBuf {
    let source = event["source"].as_str().expect("source");
    let message_id = event["messageId"].as_str().expect("messageId");
    let mut document = doc! {"_id": {"source": source, "messageId": message_id}};
    document.extend(bson::to_document(event).expect("to_document"));
    for field in DATE_FIELDS {
        if let Some(time) = crate::enrich::parse_time(event.get(field)) {
            document.insert(field, bson::DateTime::from_chrono(time));
        }
    }
    RawDocumentBuf::from_document(&document).expect("encodes")
}

#[test]
fn the_bytes_written_directly_are_those_a_document_would_encode_to() {
    let event = serde_json::json!({
        "type": "track", "event": "Order Completed", "source": "shop-ios",
        "messageId": "m-1", "timestamp": "2026-11-21T12:00:00.000Z",
        "receivedAt": "2026-11-21T12:00:01.000Z", "sentAt": "not a time",
        "properties": {"total": 19.9, "qty": 3, "big": -9_007_199_254_740_993_i64,
                       "items": [{"sku": "a", "ok": true}, null], "a.b": 1, "$x": {"c": "d"}},
        "context": {"ip": "203.0.113.9", "library": {"name": "analytics-python"}}
    });
    let event = event.as_object().expect("object");
    assert_eq!(
        stored(event).expect("storable").as_bytes(),
        through_a_document(event).as_bytes()
    );
}
use serde_json::json;

#[test]
fn times_become_dates_and_other_fields_stay() {
    let event = json!({"messageId":"m","source":"s","timestamp":"2026-11-21T12:00:00.000Z","properties":{"n":1}});
    let document = stored(event.as_object().expect("object"))
        .expect("doc")
        .to_document()
        .expect("readable");
    assert_eq!(document.get_str("messageId"), Ok("m"));
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

/// Two apps may use the same `messageId`; each event is its own document.
#[test]
fn the_id_is_the_source_and_the_message_id() {
    let event = json!({"messageId":"m","source":"shop-web"});
    let document = stored(event.as_object().expect("object"))
        .expect("doc")
        .to_document()
        .expect("readable");
    assert_eq!(
        document.get_document("_id"),
        Ok(&doc! {"source": "shop-web", "messageId": "m"})
    );
    let no_source = json!({"messageId":"m"});
    assert!(stored(no_source.as_object().expect("object")).is_err());
}

#[test]
fn numbers_bson_cannot_hold_are_an_error_not_a_panic() {
    let event = json!({"messageId":"m","source":"s","properties":{"big": u64::MAX}});
    assert!(stored(event.as_object().expect("object")).is_err());
}

/// `bson::to_document` accepts a NUL byte in a key; writing it as BSON (a C string) fails.
/// Such an event must be refused by the check, not by the driver at insert time.
#[test]
fn a_key_bson_cannot_encode_is_not_storable() {
    let event = json!({"messageId":"m","source":"s","properties":{"k\u{0}x":1}});
    assert!(stored(event.as_object().expect("object")).is_err());
}

#[test]
fn reserved_keys_are_refused() {
    for event in [
        json!({"messageId":"m","source":"s","_id":"x"}),
        json!({"messageId":"m","source":"s","$where":"1"}),
    ] {
        let error = stored(event.as_object().expect("object")).expect_err("reserved");
        assert!(error.contains("reserved"), "{error}");
    }
}

/// Nested `$…` and dotted keys are legal in MongoDB 5.0+; they are stored as sent.
#[test]
fn nested_dollar_and_dotted_keys_are_kept() {
    let event = json!({"messageId":"m","source":"s","properties":{"$x":1,"a.b":2}});
    let document = stored(event.as_object().expect("object"))
        .expect("doc")
        .to_document()
        .expect("readable");
    let properties = document.get_document("properties").expect("properties");
    assert!(properties.contains_key("$x") && properties.contains_key("a.b"));
}

/// An `insert_many` error as the driver reports it, from the server's reply fields.
fn insert_many_error(reply: bson::Document) -> mongodb::error::Error {
    let error: InsertManyError = bson::from_document(reply).expect("InsertManyError");
    ErrorKind::InsertMany(error).into()
}

fn write_error(index: i32, code: i32) -> bson::Document {
    doc! {"index": index, "code": code, "errmsg": format!("error {code}")}
}

#[test]
fn documents_the_server_refuses_are_named_and_every_other_one_counts_as_written() {
    let error = insert_many_error(doc! {"writeErrors": [
        write_error(1, DUPLICATE_KEY),
        write_error(3, 10334),
        write_error(4, 121),
    ]});
    let written = written_despite(&error, 6).expect("partly written");
    assert_eq!(written.inserted, 3);
    assert_eq!(written.duplicates, 1);
    let refused: Vec<usize> = written.refused.iter().map(|(i, _)| *i).collect();
    assert_eq!(refused, [3, 4]);
    assert!(
        written.refused[0].1.contains("10334"),
        "{:?}",
        written.refused
    );
}

#[test]
fn only_duplicates_mean_everything_is_stored() {
    let error = insert_many_error(doc! {"writeErrors": [write_error(0, DUPLICATE_KEY)]});
    let written = written_despite(&error, 2).expect("written");
    assert_eq!((written.inserted, written.duplicates), (1, 1));
    assert!(written.refused.is_empty());
}

/// A primary stepping down (or a node shutting down or recovering) mid-insert fails the
/// documents it had not written yet; written again once a primary is elected, they are
/// stored. They must never be dead-lettered as refused.
#[test]
fn a_primary_stepping_down_mid_insert_is_retried_not_refused() {
    for code in [189, 91, 10107, 11600, 11602, 13435, 13436] {
        let error = insert_many_error(doc! {"writeErrors": [
            write_error(0, DUPLICATE_KEY),
            write_error(2, code),
        ]});
        assert!(
            matches!(written_despite(&error, 3), Err(SinkError::Retryable(_))),
            "code {code}: {:?}",
            written_despite(&error, 3)
        );
    }
}

/// The documents may be written but not yet durable: written again, they are duplicates.
#[test]
fn a_write_concern_error_is_retried() {
    let error = insert_many_error(doc! {
        "writeErrors": [write_error(1, 121)],
        "writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"},
    });
    assert!(matches!(
        written_despite(&error, 2),
        Err(SinkError::Retryable(_))
    ));
}

#[test]
fn write_errors_are_stored_retried_or_refused_by_code_and_label() {
    assert_eq!(verdict(DUPLICATE_KEY, &[]), Verdict::Stored);
    assert_eq!(
        verdict(DUPLICATE_KEY, &["RetryableWriteError"]),
        Verdict::Stored
    );
    for code in [
        189, 91, 10107, 11600, 11602, 13435, 13436, 6, 7, 89, 9001, 262,
    ] {
        assert_eq!(verdict(code, &[]), Verdict::Retry, "code {code}");
    }
    for label in [
        "RetryableWriteError",
        "RetryableError",
        "SystemOverloadedError",
    ] {
        assert_eq!(verdict(12345, &[label]), Verdict::Retry, "{label}");
    }
    // too large, failed validation, a bad value: the document itself is the problem
    for code in [10334, 121, 2, 52] {
        assert_eq!(verdict(code, &[]), Verdict::Refuse, "code {code}");
        assert_eq!(
            verdict(code, &["TransientTransactionError"]),
            Verdict::Refuse,
            "code {code}"
        );
    }
}

#[test]
fn a_write_error_outside_the_batch_is_retried_not_trusted() {
    let error = insert_many_error(doc! {"writeErrors": [write_error(7, 121)]});
    assert!(matches!(
        written_despite(&error, 2),
        Err(SinkError::Retryable(_))
    ));
}

#[test]
fn an_error_that_names_no_document_retries_the_whole_batch() {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
    let error: mongodb::error::Error = ErrorKind::Io(std::sync::Arc::new(io)).into();
    assert!(matches!(
        written_despite(&error, 2),
        Err(SinkError::Retryable(_))
    ));
}
