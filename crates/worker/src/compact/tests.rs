//! The compaction window, on records the worker really makes from a request.

use super::*;
use crate::enrich::Enrichment;
use crate::process::{process, Documents, PayloadLimits};
use ingest_pipeline::message::{Endpoint, RequestMeta};
use ingest_schema::{Registry, UnknownEventPolicy};
use lapin::BasicProperties;
use serde_json::json;

fn registry() -> Registry {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    Registry::load(&dir, UnknownEventPolicy::Accept).expect("schemas")
}

const LIMITS: PayloadLimits = PayloadLimits {
    max_bytes: 1 << 20,
    max_events: 2000,
    max_built_bytes: 16 << 20,
};

/// The invalid records the worker makes of one request's batch.
fn invalid(registry: &Registry, batch: Vec<Value>) -> Vec<InvalidRecord> {
    let body = json!({ "batch": batch }).to_string();
    let outcome = process(
        registry,
        &BasicProperties::default(),
        body.as_bytes(),
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    assert!(outcome.valid.is_empty());
    outcome.invalid
}

fn settings(window_ms: u64) -> InvalidSettings {
    InvalidSettings {
        window_ms,
        keep_whole: 10,
        max_signatures: 10_000,
        max_signatures_per_source: 100,
    }
}

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("time")
}

fn record(source: &str, message: &str) -> InvalidRecord {
    let meta = RequestMeta {
        request_id: "req-1".into(),
        received_at: at(0),
        source: source.into(),
        endpoint: Endpoint::Batch,
        client_ip: None,
        user_agent: None,
    };
    let issue = Issue {
        pointer: "/event".into(),
        message: message.into(),
        schema: "envelope".into(),
    };
    InvalidRecord::new(
        "schema",
        vec![issue],
        Some(json!({"messageId": "m"})),
        &meta,
    )
}

/// The issue's request: 2,000 copies of `{"type":"track"}` made 2,000 records.
#[test]
fn within_a_window_the_first_k_of_a_signature_are_kept_whole_and_the_rest_are_one_summary() {
    let registry = registry();
    let mut compactor = Compactor::new(&settings(60_000));
    let records = invalid(&registry, vec![json!({"type": "track"}); 2000]);
    assert_eq!(records.len(), 2000);
    let (whole, _) = compactor.admit(records, at(0));
    assert_eq!(whole.len(), 10);
    // The next request in the window: nothing whole.
    let records = invalid(&registry, vec![json!({"type": "track"}); 2000]);
    let (whole, _) = compactor.admit(records, at(30));
    assert!(whole.is_empty());
    assert_eq!(compactor.tracked(), 1);
    assert_eq!(compactor.due(at(59)), vec![], "the window is still open");
    let summaries = compactor.due(at(60));
    assert_eq!(summaries.len(), 1);
    let summary = &summaries[0];
    assert_eq!(summary.reason, "folded");
    assert_eq!(summary.folded_reason, Some("schema"));
    assert_eq!(summary.source, "unknown");
    assert_eq!((summary.count, summary.kept), (3990, Some(10)));
    assert_eq!((summary.first_seen, summary.last_seen), (at(0), at(30)));
    assert_eq!(summary.example_message_ids.len(), EXAMPLES);
    assert_eq!(
        summary.example_request_ids.len(),
        1,
        "one request id per request"
    );
    assert!(!summary.errors.is_empty());
    assert_eq!(summary.signature.as_deref().map(str::len), Some(16));
    assert_eq!(compactor.tracked(), 0, "its memory is freed");
    // Serialised for the queue: about a kilobyte, against 2,000 records of 560 bytes.
    let text = serde_json::to_string(summary).expect("json");
    assert!(text.len() < 2048, "{text}");
    assert!(
        text.contains(r#""firstSeen":"2027-01-15T08:00:00.000Z""#),
        "{text}"
    );
}

#[test]
fn the_next_window_keeps_k_whole_again_and_the_ended_one_is_summarised_once() {
    let mut compactor = Compactor::new(&settings(60_000));
    let twelve = || (0..12).map(|_| record("app", "x")).collect::<Vec<_>>();
    assert_eq!(compactor.admit(twelve(), at(0)).0.len(), 10);
    // A record of the next window closes the first.
    assert_eq!(compactor.admit(twelve(), at(61)).0.len(), 10);
    let summaries = compactor.due(at(62));
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].count, 2);
    assert_eq!(summaries[0].last_seen, at(0));
    // A window that folded nothing ends without a summary.
    let mut quiet = Compactor::new(&settings(60_000));
    quiet.admit(vec![record("app", "x")], at(0));
    assert_eq!(quiet.due(at(60)), vec![]);
    assert_eq!(quiet.tracked(), 0);
    // Stopping: every open window's summary.
    let drained = compactor.drain();
    assert_eq!(drained.len(), 1);
    assert_eq!(drained[0].first_seen, at(61));
}

#[test]
fn a_signature_is_the_error_not_the_values_the_client_sent() {
    let registry = registry();
    let mut compactor = Compactor::new(&settings(60_000));
    // The same errors whatever the values, indexes and sizes.
    let same: Vec<Value> = (0..30)
        .map(|i| json!({"type": "track", "event": i, "userId": "u", "properties": {"items": vec![json!({"price": format!("p{i}")}); i % 3 + 1]}}))
        .collect();
    let records = invalid(&registry, same);
    assert_eq!(compactor.admit(records, at(0)).0.len(), 10);
    assert_eq!(compactor.tracked(), 1);
    // A different property missing is another signature.
    let other = invalid(&registry, vec![json!({"type": "track", "userId": "u"}); 3]);
    assert_eq!(compactor.admit(other, at(1)).0.len(), 3);
    assert_eq!(compactor.tracked(), 2);

    assert_eq!(
        message_class(r#""abc" is not of type "number""#, Some(&json!("abc"))),
        r#"value is not of type "number""#
    );
    assert_eq!(
        message_class("-1.5 is less than the minimum of 0", Some(&json!(-1.5))),
        "value is less than the minimum of #"
    );
    assert_eq!(
        message_class(r#""userId" is a required property"#, Some(&json!({}))),
        r#""userId" is a required property"#
    );
    assert_eq!(
        message_class(
            "Additional properties are not allowed ('a', 'b' were unexpected)",
            None
        ),
        "Additional properties are not allowed ('…', '…' were unexpected)"
    );
    assert_eq!(
        message_class("EOF while parsing a list at line 1 column 27", None),
        "EOF while parsing a list at line # column #"
    );
    assert_eq!(message_class("doesn't match", None), "doesn't match");
    // A message cut short in its value (500 characters and a size) is one class.
    let long = format!(r#""{}… (9000 bytes)"#, "x".repeat(499));
    assert_eq!(message_class(&long, Some(&json!("x"))), "value");
    assert_eq!(
        pointer_class("/properties/items/12/price"),
        "/properties/items/-/price"
    );
}

#[test]
fn the_table_is_bounded_per_source_and_in_all_and_the_rest_is_counted_in_catch_alls() {
    let mut compactor = Compactor::new(&InvalidSettings {
        window_ms: 60_000,
        keep_whole: 1,
        max_signatures: 6,
        max_signatures_per_source: 3,
    });
    // One source with many signatures: three of its own, then its catch-all.
    let noisy: Vec<InvalidRecord> = (0..10)
        .map(|i| record("noisy", &format!("e{i} x")))
        .collect();
    let noisy: Vec<InvalidRecord> = noisy
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.errors[0].message = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"][i].into();
            r
        })
        .collect();
    let (whole, _) = compactor.admit(noisy, at(0));
    assert_eq!(compactor.tracked(), 4, "3 signatures and the catch-all");
    assert_eq!(whole.len(), 4, "one whole per window");
    // Another source still gets its own signature.
    let (whole, _) = compactor.admit(vec![record("quiet", "a")], at(1));
    assert_eq!(whole.len(), 1);
    assert_eq!(compactor.tracked(), 5);
    // The table full: a third source's new signatures share one catch-all.
    compactor.admit(vec![record("third", "a")], at(2));
    assert_eq!(compactor.tracked(), 6);
    compactor.admit(vec![record("fourth", "a"), record("fourth", "b")], at(3));
    assert_eq!(
        compactor.tracked(),
        7,
        "one shared catch-all beyond the bound"
    );
    let summaries = compactor.drain();
    let noisy_other = summaries
        .iter()
        .find(|s| s.source == "noisy" && s.signature.as_deref() == Some("other"))
        .expect("the noisy source's catch-all");
    assert_eq!((noisy_other.count, noisy_other.kept), (6, Some(1)));
    assert_eq!(noisy_other.folded_reason, Some("mixed"));
    let shared = summaries
        .iter()
        .find(|s| s.source == ANY_SOURCE)
        .expect("the shared catch-all");
    assert_eq!(shared.count, 1);
}

#[test]
fn an_admission_undone_gives_back_its_whole_slots_and_its_counts() {
    let mut compactor = Compactor::new(&settings(60_000));
    let records = || (0..15).map(|_| record("app", "x")).collect::<Vec<_>>();
    let (whole, ticket) = compactor.admit(records(), at(0));
    assert_eq!(whole.len(), 10);
    // The delivery went back to its queue: its redelivery is admitted as if for the first time.
    compactor.undo(ticket);
    let (whole, _) = compactor.admit(records(), at(1));
    assert_eq!(whole.len(), 10);
    let summaries = compactor.drain();
    assert_eq!(summaries[0].count, 5);
}

#[test]
fn with_no_window_every_record_is_kept_whole() {
    let mut compactor = Compactor::new(&settings(0));
    let (whole, _) = compactor.admit((0..50).map(|_| record("app", "x")).collect(), at(0));
    assert_eq!(whole.len(), 50);
    assert_eq!(compactor.tracked(), 0);
    assert_eq!(compactor.drain(), vec![]);
}
