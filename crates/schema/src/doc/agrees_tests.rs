//! The tracking plan's validators on a [`Doc`] against the same schemas on `serde_json::Value`
//! (jsonschema's own representation): for every schema in `schemas/` and for generated events
//! built from the plan's own field names, values of every JSON type, and strings that need
//! escaping, the same verdict and the same errors (pointer and message), in the same order.

use std::path::Path;
use std::sync::Arc;

use jsonschema::json::SerdeJson;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

use super::{Doc, DocJson};

/// Names the plan's schemas look at, and some they do not.
const KEYS: &[&str] = &[
    "type",
    "messageId",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "event",
    "name",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "context",
    "properties",
    "traits",
    "integrations",
    "order_id",
    "total",
    "currency",
    "products",
    "product_id",
    "price",
    "quantity",
    "sku",
    "revenue",
    "email",
    "k\"ey",
    "ünï",
    "",
];

const STRINGS: &[&str] = &[
    "track",
    "identify",
    "page",
    "screen",
    "group",
    "alias",
    "Order Completed",
    "Product Viewed",
    "Product Added",
    "Checkout Started",
    "Application Opened",
    "ingest canary",
    "2026-12-05T10:00:00.000Z",
    "2026-12-05T10:00:00+01:00",
    "2026-13-05T10:00:00Z",
    "yesterday",
    "EUR",
    "eur",
    "",
    "a\"b\\c\nd",
    "héllo 🦀",
    "user-1",
    "x",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        (-3i64..5).prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        (-2.0f64..50.0).prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        (0..STRINGS.len()).prop_map(|i| Value::String(STRINGS[i].to_owned())),
        "[a-zA-Z0-9 ]{0,8}".prop_map(Value::String),
        (0usize..260).prop_map(|n| Value::String("y".repeat(n))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((0..KEYS.len(), inner), 0..6).prop_map(|members| {
                Value::Object(
                    members
                        .into_iter()
                        .map(|(key, value)| (KEYS[key].to_owned(), value))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// An event: mostly the plan's fields with plausible values, some of them wrong.
fn event() -> impl Strategy<Value = Value> {
    (
        0..STRINGS.len(),
        0..STRINGS.len(),
        proptest::collection::vec((0..KEYS.len(), value()), 0..8),
        any::<bool>(),
    )
        .prop_map(|(kind, name, members, ids)| {
            let mut event = Map::new();
            event.insert("type".into(), Value::String(STRINGS[kind % 7].to_owned()));
            event.insert("event".into(), Value::String(STRINGS[name].to_owned()));
            if ids {
                event.insert("messageId".into(), Value::String("m-1".into()));
                event.insert("anonymousId".into(), Value::String("a-1".into()));
            }
            for (key, value) in members {
                event.insert(KEYS[key].to_owned(), value);
            }
            Value::Object(event)
        })
}

struct Both {
    name: String,
    on_value: jsonschema::Validator<SerdeJson>,
    on_doc: jsonschema::Validator<DocJson>,
}

fn plan() -> Vec<Both> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("schemas/")
        .chain(std::fs::read_dir(dir.join("track")).expect("schemas/track"))
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the plan's schemas: {files:?}");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read");
            let schema: Value = serde_json::from_str(&text).expect("JSON");
            Both {
                name: path.display().to_string(),
                on_value: jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .should_validate_formats(true)
                    .offline()
                    .build(&schema)
                    .expect("compiles"),
                on_doc: jsonschema::options_for::<DocJson>()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .should_validate_formats(true)
                    .offline()
                    .build(&schema)
                    .expect("compiles"),
            }
        })
        .collect()
}

fn errors_on_value(validator: &jsonschema::Validator<SerdeJson>, event: &Value) -> Vec<String> {
    validator
        .iter_errors(event)
        .map(|e| format!("{} {}", e.instance_path().as_str(), e))
        .collect()
}

fn errors_on_doc(validator: &jsonschema::Validator<DocJson>, event: &Doc) -> Vec<String> {
    validator
        .iter_errors(event.node())
        .map(|e| format!("{} {}", e.instance_path().as_str(), e))
        .collect()
}

fn agree(plan: &[Both], event: &Value) -> Result<usize, TestCaseError> {
    let doc = Doc::parse(Arc::from(serde_json::to_string(event).expect("writes")))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut valid = 0;
    for both in plan {
        let verdict = both.on_value.is_valid(event);
        prop_assert_eq!(
            verdict,
            both.on_doc.is_valid(doc.node()),
            "{} on {}",
            both.name,
            event
        );
        prop_assert_eq!(
            errors_on_value(&both.on_value, event),
            errors_on_doc(&both.on_doc, &doc),
            "{} on {}",
            both.name,
            event
        );
        valid += usize::from(verdict);
    }
    Ok(valid)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn a_doc_gets_the_verdict_and_errors_a_value_gets(event in event()) {
        thread_local! { static PLAN: Vec<Both> = plan(); }
        PLAN.with(|plan| agree(plan, &event))?;
    }
}

#[test]
fn valid_events_of_the_plan_agree_too() {
    // Generated events are mostly invalid somewhere; these are valid under their schemas.
    let plan = plan();
    let events = [
        serde_json::json!({"type": "track", "event": "Order Completed", "messageId": "m",
            "anonymousId": "a", "timestamp": "2026-12-05T10:00:00.000Z",
            "properties": {"order_id": "o-1", "total": 10.5, "currency": "EUR",
                "products": [{"product_id": "p", "price": 1, "quantity": 2}]},
            "context": {"ip": "1.2.3.4", "library": {"name": "x"}}}),
        serde_json::json!({"type": "identify", "userId": "u", "messageId": "m",
            "traits": {"email": "a@b.c", "name": "A \"quoted\" name"}}),
        serde_json::json!({"type": "screen", "name": "Cart", "anonymousId": "a", "messageId": "m"}),
    ];
    let mut valid = 0;
    for event in &events {
        valid += agree(&plan, event).expect("agree");
    }
    // Each is valid under the envelope at least, and the order under its own schema.
    assert!(valid > events.len(), "{valid}");
}
