use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{Registry, UnknownEventPolicy};
use crate::{Invalid, Issue};

fn plan_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn plan(policy: UnknownEventPolicy) -> Registry {
    Registry::load(&plan_dir(), policy).expect("the shipped tracking plan loads")
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("test event must be an object, got {other}"),
    }
}

fn track(event: &str, properties: Value) -> Map<String, Value> {
    object(json!({
        "type": "track",
        "messageId": "msg-1",
        "anonymousId": "device-42",
        "event": event,
        "timestamp": "2024-05-01T12:00:00Z",
        "properties": properties,
    }))
}

fn invalid(registry: &Registry, event: Map<String, Value>) -> Invalid {
    match registry.validate(event) {
        Ok(valid) => panic!("expected the event to be rejected: {valid:?}"),
        Err(invalid) => invalid,
    }
}

fn pointers(invalid: &Invalid) -> Vec<(&str, &str)> {
    invalid
        .errors
        .iter()
        .map(|issue| (issue.schema.as_str(), issue.pointer.as_str()))
        .collect()
}

fn order_completed() -> Value {
    json!({
        "order_id": "o-1001",
        "total": 59.9,
        "revenue": 49.9,
        "shipping": 10,
        "currency": "EUR",
        "products": [
            { "product_id": "p-1", "price": 19.95, "quantity": 2 },
            { "product_id": "p-2", "price": 10, "quantity": 1 }
        ]
    })
}

#[test]
fn shipped_plan_compiles_every_schema() {
    let registry = plan(UnknownEventPolicy::Accept);
    assert_eq!(
        registry.len(),
        9,
        "envelope + identify + screen + 5 track events + the ops canary"
    );
    assert!(!registry.is_empty());
}

#[test]
fn registry_can_be_shared_across_worker_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registry>();
}

#[test]
fn every_shipped_track_event_accepts_a_realistic_payload() {
    let registry = plan(UnknownEventPolicy::Reject);
    let cases = [
        (
            "Application Opened",
            json!({ "from_background": false, "version": "3.2.0", "build": 3200 }),
        ),
        (
            "Product Viewed",
            json!({ "product_id": "p-1", "price": 19.95, "currency": "EUR", "position": 3 }),
        ),
        (
            "Product Added",
            json!({ "cart_id": "c-9", "product_id": "p-1", "price": 19.95, "quantity": 2 }),
        ),
        (
            "Checkout Started",
            json!({
                "cart_id": "c-9",
                "value": 39.9,
                "currency": "EUR",
                "products": [{ "product_id": "p-1", "price": 19.95, "quantity": 2 }]
            }),
        ),
        ("Order Completed", order_completed()),
    ];
    for (name, properties) in cases {
        let result = registry.validate(track(name, properties));
        assert!(result.is_ok(), "{name} should be valid: {result:?}");
    }
}

#[test]
fn every_other_type_passes_with_its_required_fields() {
    let registry = plan(UnknownEventPolicy::Reject);
    let events = [
        json!({
            "type": "identify", "messageId": "m-1", "userId": "u-1",
            "traits": { "email": "ada@example.com", "name": "Ada", "createdAt": "2024-01-02T03:04:05Z", "plan": "plus" }
        }),
        json!({ "type": "screen", "messageId": "m-2", "anonymousId": "d-1", "name": "Cart" }),
        json!({ "type": "page", "messageId": "m-3", "userId": "u-1", "name": "Home" }),
        json!({ "type": "group", "messageId": "m-4", "userId": "u-1", "groupId": "g-1" }),
        json!({ "type": "alias", "messageId": "m-5", "userId": "u-1", "previousId": "d-1" }),
    ];
    for event in events {
        let result = registry.validate(object(event.clone()));
        assert!(result.is_ok(), "{event} should be valid: {result:?}");
    }
}

#[test]
fn validated_event_keeps_the_event_and_exposes_its_message_id() {
    let registry = plan(UnknownEventPolicy::Accept);
    let event = track("Order Completed", order_completed());
    let valid = registry.validate(event.clone()).expect("valid order");
    assert_eq!(valid.message_id(), "msg-1");
    assert_eq!(valid.as_map(), &event);
    assert_eq!(valid.into_map(), event);
}

#[test]
fn missing_type_is_reported_at_the_root() {
    let registry = plan(UnknownEventPolicy::Accept);
    let invalid = invalid(
        &registry,
        object(json!({ "messageId": "m-1", "userId": "u-1" })),
    );
    assert_eq!(pointers(&invalid), [("envelope", "")]);
    assert!(
        invalid.errors[0].message.contains("\"type\""),
        "{:?}",
        invalid.errors
    );
}

#[test]
fn unknown_type_is_reported_at_type() {
    let registry = plan(UnknownEventPolicy::Accept);
    let invalid = invalid(
        &registry,
        object(json!({ "type": "click", "messageId": "m-1", "userId": "u-1" })),
    );
    assert_eq!(pointers(&invalid), [("envelope", "/type")]);
    assert!(invalid.errors[0].message.contains("click"));
}

#[test]
fn an_event_with_neither_user_id_nor_anonymous_id_is_rejected() {
    let registry = plan(UnknownEventPolicy::Accept);
    let invalid = invalid(
        &registry,
        object(json!({ "type": "page", "messageId": "m-1", "name": "Home" })),
    );
    assert_eq!(pointers(&invalid), [("envelope", "")]);
    assert!(invalid.errors[0].message.contains("anonymousId"));
}

#[test]
fn empty_user_id_does_not_count_as_an_identity() {
    let registry = plan(UnknownEventPolicy::Accept);
    let invalid = invalid(
        &registry,
        object(json!({ "type": "page", "messageId": "m-1", "userId": "" })),
    );
    assert_eq!(pointers(&invalid), [("envelope", "/userId")]);
}

#[test]
fn timestamp_must_be_rfc3339() {
    let registry = plan(UnknownEventPolicy::Accept);
    let mut event = track("Order Completed", order_completed());
    event.insert("timestamp".into(), json!("yesterday at noon"));
    let invalid = invalid(&registry, event);
    assert_eq!(pointers(&invalid), [("envelope", "/timestamp")]);
    assert!(invalid.errors[0].message.contains("date-time"));
}

#[test]
fn type_specific_envelope_rules_apply() {
    let registry = plan(UnknownEventPolicy::Accept);
    let cases = [
        (
            json!({ "type": "track", "messageId": "m", "userId": "u" }),
            "\"event\"",
        ),
        (
            json!({ "type": "group", "messageId": "m", "userId": "u" }),
            "\"groupId\"",
        ),
        (
            json!({ "type": "alias", "messageId": "m", "userId": "u" }),
            "\"previousId\"",
        ),
    ];
    for (event, missing) in cases {
        let invalid = invalid(&registry, object(event));
        assert_eq!(pointers(&invalid), [("envelope", "")]);
        assert!(
            invalid.errors[0].message.contains(missing),
            "{:?}",
            invalid.errors
        );
    }
}

#[test]
fn order_completed_reports_every_broken_property() {
    let registry = plan(UnknownEventPolicy::Accept);
    let mut properties = order_completed();
    properties["total"] = json!(-5);
    properties["products"][0] = json!({ "price": 19.95, "quantity": 2 });
    let invalid = invalid(&registry, track("Order Completed", properties));

    let mut found = pointers(&invalid);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            ("track/order_completed", "/properties/products/0"),
            ("track/order_completed", "/properties/total"),
        ]
    );
    let missing = issue_at(&invalid, "/properties/products/0");
    assert!(missing.message.contains("product_id"));
    let negative = issue_at(&invalid, "/properties/total");
    assert!(negative.message.contains("-5"));
}

fn issue_at<'a>(invalid: &'a Invalid, pointer: &str) -> &'a Issue {
    invalid
        .errors
        .iter()
        .find(|issue| issue.pointer == pointer)
        .unwrap_or_else(|| panic!("no issue at {pointer}: {:?}", invalid.errors))
}

#[test]
fn errors_from_envelope_and_event_schema_are_all_reported() {
    let registry = plan(UnknownEventPolicy::Accept);
    let mut event = track(
        "Order Completed",
        json!({ "order_id": "", "total": 10, "currency": "eur", "products": [] }),
    );
    event.insert("sentAt".into(), json!("not a date"));
    event.remove("anonymousId");
    let invalid = invalid(&registry, event);

    let mut found = pointers(&invalid);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            ("envelope", ""),
            ("envelope", "/sentAt"),
            ("track/order_completed", "/properties/currency"),
            ("track/order_completed", "/properties/order_id"),
            ("track/order_completed", "/properties/products"),
        ]
    );
}

#[test]
fn unknown_track_event_is_accepted_under_accept_policy() {
    let registry = plan(UnknownEventPolicy::Accept);
    let result = registry.validate(track("Wishlist Shared", json!({ "anything": true })));
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn unknown_track_event_is_rejected_under_reject_policy() {
    let registry = plan(UnknownEventPolicy::Reject);
    let invalid = invalid(&registry, track("Wishlist Shared", json!({})));
    assert_eq!(pointers(&invalid), [("track", "/event")]);
    assert!(invalid.errors[0].message.contains("\"Wishlist Shared\""));
}

#[test]
fn event_names_match_exactly_not_by_slug() {
    let registry = plan(UnknownEventPolicy::Reject);
    let invalid = invalid(&registry, track("order completed", order_completed()));
    assert_eq!(pointers(&invalid), [("track", "/event")]);
}

#[test]
fn identify_rejects_a_malformed_email() {
    let registry = plan(UnknownEventPolicy::Accept);
    let event = object(json!({
        "type": "identify", "messageId": "m-1", "userId": "u-1",
        "traits": { "email": "not-an-email", "plan": "gold" }
    }));
    let invalid = invalid(&registry, event);
    let mut found = pointers(&invalid);
    found.sort_unstable();
    assert_eq!(
        found,
        [("identify", "/traits/email"), ("identify", "/traits/plan")]
    );
    assert!(issue_at(&invalid, "/traits/email")
        .message
        .contains("email"));
}

#[test]
fn screen_views_need_a_name() {
    let registry = plan(UnknownEventPolicy::Accept);
    let event = object(json!({ "type": "screen", "messageId": "m-1", "anonymousId": "d-1" }));
    let invalid = invalid(&registry, event);
    assert_eq!(pointers(&invalid), [("screen", "")]);
    assert!(invalid.errors[0].message.contains("\"name\""));
}

#[test]
fn missing_message_id_is_an_issue_at_message_id() {
    let registry = plan(UnknownEventPolicy::Accept);
    let mut event = track("Order Completed", order_completed());
    event.remove("messageId");
    let invalid = invalid(&registry, event);
    assert_eq!(pointers(&invalid), [("envelope", "/messageId")]);
}

#[test]
fn non_string_message_id_is_reported_once() {
    let registry = plan(UnknownEventPolicy::Accept);
    let mut event = track("Order Completed", order_completed());
    event.insert("messageId".into(), json!(42));
    let invalid = invalid(&registry, event);
    assert_eq!(pointers(&invalid), [("envelope", "/messageId")]);
    assert!(invalid.errors[0].message.contains("string"));
}

#[test]
fn invalid_keeps_the_original_event() {
    let registry = plan(UnknownEventPolicy::Accept);
    let event = object(json!({ "type": "nope", "messageId": "m-1", "userId": "u-1" }));
    let invalid = invalid(&registry, event.clone());
    assert_eq!(invalid.event, Value::Object(event));
}

#[test]
fn whole_object_values_are_masked_in_messages() {
    let registry = plan(UnknownEventPolicy::Accept);
    let mut event = track("Order Completed", order_completed());
    event.insert("context".into(), json!(["secret-token"]));
    let invalid = invalid(&registry, event);
    assert_eq!(pointers(&invalid), [("envelope", "/context")]);
    assert!(!invalid.errors[0].message.contains("secret-token"));
}

#[test]
fn policy_deserializes_from_lowercase_config_values() {
    let reject: UnknownEventPolicy =
        serde_json::from_value(json!("reject")).expect("reject is a policy");
    let accept: UnknownEventPolicy =
        serde_json::from_value(json!("accept")).expect("accept is a policy");
    assert_eq!(reject, UnknownEventPolicy::Reject);
    assert_eq!(accept, UnknownEventPolicy::Accept);
    assert_eq!(UnknownEventPolicy::default(), UnknownEventPolicy::Accept);
    assert!(serde_json::from_value::<UnknownEventPolicy>(json!("Reject")).is_err());
}

/// An invalid record carries every error; an error that echoed a 30 KB value would copy it
/// into the record once per error.
#[test]
fn an_error_message_never_echoes_a_long_value_whole() {
    let registry = plan(UnknownEventPolicy::Accept);
    let mut event = track("Order Completed", order_completed());
    event.insert("userId".into(), json!("u".repeat(30_000)));
    let rejected = invalid(&registry, event);
    let issue = rejected
        .errors
        .iter()
        .find(|issue| issue.pointer == "/userId")
        .expect("an error at /userId");
    assert!(issue.message.len() < 1000, "{} bytes", issue.message.len());
    assert!(issue.message.contains("30"), "{}", issue.message);
}

/// The collector refuses a batch event without a known type alone; the worker must never store
/// one, even under a tracking plan whose envelope does not require or list types.
#[test]
fn an_event_without_a_known_type_is_invalid_whatever_the_envelope_says() {
    let registry = plan(UnknownEventPolicy::Accept);
    for kind in [None, Some(json!("Track")), Some(json!(7))] {
        let mut event = track("Order Completed", order_completed());
        match &kind {
            Some(kind) => event.insert("type".into(), kind.clone()),
            None => event.remove("type"),
        };
        let invalid = invalid(&registry, event);
        let about_type = invalid
            .errors
            .iter()
            .filter(|e| e.pointer == "/type" || e.message.contains("\"type\""))
            .count();
        assert_eq!(about_type, 1, "{kind:?}: {:?}", pointers(&invalid));
    }
    // A plan whose envelope says nothing about `type`.
    let dir = std::env::temp_dir().join(format!("plan-{}", uuid_like()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("envelope.json"),
        r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object"}"#,
    )
    .expect("envelope");
    let open = Registry::load(&dir, UnknownEventPolicy::Accept).expect("plan");
    let event = object(json!({"messageId": "m-1", "userId": "u-1"}));
    let result = open.validate(event);
    let _ = std::fs::remove_dir_all(&dir);
    let invalid = result.expect_err("stored without a type");
    assert_eq!(pointers(&invalid), [("envelope", "/type")]);
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}
