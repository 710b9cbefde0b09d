use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{Doc, Val};

fn parse(text: &str) -> Doc {
    Doc::parse(Arc::from(text)).expect("parses")
}

/// Texts whose parse must equal `serde_json`'s: escapes, unicode, numbers of every kind,
/// repeated keys, nesting, empty containers.
const TEXTS: &[&str] = &[
    r#"{"a":1,"b":"two","c":[true,false,null],"d":{"e":-3,"f":2.5}}"#,
    r#"{"esc":"line\nbreak \"quoted\" \\ back \/ slash \u00e9 \ud83e\udd80","plain":"héllo 🦀"}"#,
    r#"{"k\u0065y":"escaped key","key":"plain key"}"#,
    r#"{"n":[0,-0,1E3,1e-7,-1.5e300,18446744073709551615,-9223372036854775808,1.0,123456789012345678901234567890]}"#,
    r#"{"dup":1,"other":2,"dup":3}"#,
    r#"{"dup":{"a":1},"dup":[1,2]}"#,
    r#"  {"space" : [ 1 , { } , [ ] , "" ] }  "#,
    r#"[1,"a",{"b":null}]"#,
    r#""just a string""#,
    "42",
    "null",
];

#[test]
fn a_parse_stands_for_the_value_serde_json_parses_and_writes_the_same_bytes() {
    for text in TEXTS {
        let value: Value = serde_json::from_str(text).expect("serde_json parses the fixture");
        let doc = parse(text);
        assert_eq!(doc.to_value(), value, "{text}");
        assert_eq!(
            serde_json::to_vec(&doc).expect("writes"),
            serde_json::to_vec(&value).expect("writes"),
            "{text}"
        );
        let mut written = Vec::new();
        doc.node().write_json(&mut written);
        assert_eq!(
            String::from_utf8_lossy(&written),
            serde_json::to_string(&value).expect("writes"),
            "{text}"
        );
        // BSON sees the same serializer calls.
        if value.is_object() {
            assert_eq!(bson::to_vec(&doc).ok(), bson::to_vec(&value).ok(), "{text}");
        }
    }
}

#[test]
fn what_serde_json_refuses_a_doc_refuses() {
    let deep_ok = format!("{}{}", "[".repeat(127), "]".repeat(127));
    let too_deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
    for text in [
        "{",
        r#"{"a":}"#,
        r#"{"a":1,}"#,
        "[1,]",
        "NaN",
        "1e400",
        r#"{"a":"\ud800"}"#,
        "{} {}",
        r#"{"a":"tab	inside"}"#,
        deep_ok.as_str(),
        too_deep.as_str(),
    ] {
        let theirs = serde_json::from_str::<Value>(text);
        let ours = Doc::parse(Arc::from(text));
        assert_eq!(ours.is_ok(), theirs.is_ok(), "{text:.40}");
        if let (Err(ours), Err(theirs)) = (ours, theirs) {
            assert_eq!(ours.to_string(), theirs.to_string());
        }
    }
}

#[test]
fn a_large_object_with_repeated_keys_keeps_each_key_first_place_and_last_value() {
    let mut text = String::from("{");
    for i in 0..200 {
        text.push_str(&format!("\"k{}\":{i},", i % 70));
    }
    text.push_str("\"end\":true}");
    let value: Value = serde_json::from_str(&text).expect("parses");
    let doc = parse(&text);
    assert_eq!(
        serde_json::to_string(&doc).expect("writes"),
        serde_json::to_string(&value).expect("writes")
    );
    assert_eq!(
        doc.get("k3").and_then(|n| n.as_number().cloned()),
        Some(143.into())
    );
}

#[test]
fn changes_keep_the_order_serde_json_maps_keep() {
    let text = r#"{"a":1,"writeKey":"k","b":2,"c":3,"nul":null,"context":{"x":1}}"#;
    let mut map: Map<String, Value> = serde_json::from_str(text).expect("parses");
    let mut doc = parse(text);
    let mut object = doc.object_mut().expect("an object");

    map.remove("writeKey");
    assert!(object.remove("writeKey").is_some());
    map.retain(|_, v| !v.is_null());
    object.retain(|_, v| !v.is_null());
    map.insert("a".into(), json!("again"));
    object.insert("a", Val::string("again"));
    map.insert("z".into(), json!("new"));
    object.insert("z", Val::string("new"));
    if let Some(Value::Object(context)) = map.get_mut("context") {
        context.entry("ip").or_insert(json!("1.2.3.4"));
        context.entry("x").or_insert(json!("no"));
    }
    let mut context = object.object_entry("context").expect("an object");
    assert!(context.insert_if_absent("ip", || Val::string("1.2.3.4")));
    assert!(!context.insert_if_absent("x", || Val::string("no")));

    assert_eq!(
        serde_json::to_string(&doc).expect("writes"),
        serde_json::to_string(&map).expect("writes")
    );
}

#[test]
fn a_shared_object_reads_as_copied_members_without_being_copied() {
    let text = r#"{"context":{"app":{"name":"Shop"},"ip":"1.1.1.1","locale":"fr"},"batch":[{"context":{"ip":"2.2.2.2"}},{}]}"#;
    let mut whole = parse(text);
    let mut top = whole.object_mut().expect("an object");
    let shared = Arc::new(top.remove("context").expect("context"));
    let Some(Val::Arr(batch)) = top.remove("batch") else {
        panic!("no batch")
    };
    let mut events: Vec<Doc> = batch.into_iter().map(|e| whole.with_root(e)).collect();
    for event in &mut events {
        let mut object = event.object_mut().expect("an object");
        object
            .object_entry("context")
            .expect("an object")
            .merge_shared(&shared);
    }
    assert_eq!(
        events[0].to_value(),
        json!({"context": {"ip": "2.2.2.2", "app": {"name": "Shop"}, "locale": "fr"}})
    );
    assert_eq!(
        serde_json::to_string(&events[1]).expect("writes"),
        r#"{"context":{"app":{"name":"Shop"},"ip":"1.1.1.1","locale":"fr"}}"#
    );
    // Detached, an event keeps no span of the delivery's text.
    let detached = events[1].detached();
    assert_eq!(detached.text(), "");
    assert_eq!(detached.to_value(), events[1].to_value());
}

#[test]
fn spans_borrow_unescaped_strings_and_own_escaped_ones() {
    let doc = parse(r#"{"plain":"abc","esc":"a\"b"}"#);
    let Val::Obj(members) = doc.root() else {
        panic!("not an object")
    };
    assert!(matches!(members[0].1, Val::Str(super::Text::Span { .. })));
    assert!(matches!(members[1].1, Val::Str(super::Text::Own(_))));
    assert_eq!(doc.get_str("esc"), Some("a\"b"));
}

#[test]
fn a_large_shared_context_merges_as_a_map_would() {
    // Past LINEAR_KEYS members the event's own keys are looked up in a set: same result.
    let shared: Map<String, Value> = (0..3000).map(|i| (format!("k{i}"), json!(i))).collect();
    let own: Map<String, Value> = (0..3000)
        .step_by(7)
        .map(|i| (format!("k{i}"), json!("own")))
        .chain([("mine".to_owned(), json!(true))])
        .collect();
    let text = serde_json::to_string(&json!({"shared": shared, "own": own})).expect("writes");
    let mut whole = parse(&text);
    let mut top = whole.object_mut().expect("an object");
    let shared_val = Arc::new(top.remove("shared").expect("shared"));
    let own_val = top.remove("own").expect("own");
    let mut event = whole.with_root(Val::Obj(vec![(super::Text::from("context"), own_val)]));
    event
        .object_mut()
        .and_then(|mut o| {
            o.object_entry("context")
                .map(|mut c| c.merge_shared(&shared_val))
        })
        .expect("merged");

    let mut expected = own.clone();
    for (k, v) in &shared {
        expected.entry(k.clone()).or_insert_with(|| v.clone());
    }
    assert_eq!(
        serde_json::to_string(&event).expect("writes"),
        serde_json::to_string(&json!({ "context": expected })).expect("writes")
    );
}

#[test]
fn edit_path_reaches_each_match_and_copies_a_shared_value_before_changing_it() {
    use super::Edit;
    let batch = parse(
        r#"{"context":{"traits":{"email":"a@b.c","plan":"pro"}},"e":{"properties":{"card_no":"4111","card_cvc":123,"cart":1}}}"#,
    );
    let shared = Arc::new(batch.get("context").expect("context").to_val());
    let event_root = batch.get("e").expect("e").to_val();
    let mut first = batch.with_root(event_root.clone());
    let mut second = batch.with_root(event_root);
    for event in [&mut first, &mut second] {
        let mut object = event.object_mut().expect("object");
        object
            .object_entry("context")
            .expect("context")
            .merge_shared(&shared);
    }
    let reached = first.edit_path(&["context", "traits", "email"], None, &mut |node, _| {
        assert_eq!(node.as_str(), Some("a@b.c"));
        Edit::Set(Val::string("hidden"))
    });
    assert_eq!(reached, 1);
    let dropped = first.edit_path(&["properties", "card_*"], None, &mut |_, _| Edit::Remove);
    assert_eq!(dropped, 2);
    assert_eq!(
        first.to_value(),
        json!({"properties":{"cart":1},"context":{"traits":{"email":"hidden","plan":"pro"}}})
    );
    // The other event of the batch still reads the shared context as sent.
    assert_eq!(
        second.to_value()["context"]["traits"]["email"],
        json!("a@b.c")
    );
    assert_eq!(
        first.edit_path(&["context", "nothing"], None, &mut |_, _| Edit::Remove),
        0
    );
    assert_eq!(
        first.edit_path(&["properties", "cart", "deeper"], None, &mut |_, _| {
            Edit::Remove
        }),
        0
    );
}

#[test]
fn a_shared_value_is_edited_once_per_delivery_with_its_memo() {
    use super::{Edit, SharedEdits};
    let batch = parse(r#"{"context":{"device":{"id":"d-1","model":"x"}},"e":{"n":1}}"#);
    let shared = Arc::new(batch.get("context").expect("context").to_val());
    let mut events: Vec<Doc> = (0..3)
        .map(|_| {
            let mut event = batch.with_root(batch.get("e").expect("e").to_val());
            let mut object = event.object_mut().expect("object");
            object
                .object_entry("context")
                .expect("context")
                .merge_shared(&shared);
            event
        })
        .collect();
    let mut memo = SharedEdits::default();
    let mut calls = 0;
    for event in &mut events {
        let reached = event.edit_path(
            &["context", "device", "id"],
            Some((&mut memo, 7)),
            &mut |_, shared| {
                assert!(shared, "told that the edit stands for the delivery");
                calls += 1;
                Edit::Set(Val::string("hidden"))
            },
        );
        assert_eq!(reached, 1);
    }
    assert_eq!(calls, 1, "the shared device was edited once");
    for event in &events {
        assert_eq!(
            event.to_value()["context"]["device"],
            json!({"id": "hidden", "model": "x"})
        );
    }
    // Another edit of the same value (another tag) builds on the first.
    let dropped = events[0].edit_path(
        &["context", "device", "model"],
        Some((&mut memo, 8)),
        &mut |_, _| Edit::Remove,
    );
    assert_eq!(dropped, 1);
    assert_eq!(
        events[0].to_value()["context"]["device"],
        json!({"id": "hidden"})
    );
    assert_eq!(
        events[1].to_value()["context"]["device"],
        json!({"id": "hidden", "model": "x"})
    );
}

#[test]
fn a_star_reaches_each_item_of_an_array() {
    use super::Edit;
    let mut event = parse(r#"{"properties":{"emails":["a@x","b@y"],"n":[{"e":"c@z"},{"f":1}]}}"#);
    let reached = event.edit_path(&["properties", "emails", "*"], None, &mut |_, _| {
        Edit::Set(Val::string("h"))
    });
    assert_eq!(reached, 2);
    let removed = event.edit_path(&["properties", "n", "*", "e"], None, &mut |_, _| {
        Edit::Remove
    });
    assert_eq!(removed, 1);
    let nulled = event.edit_path(&["properties", "emails", "*"], None, &mut |_, _| {
        Edit::Remove
    });
    assert_eq!(nulled, 2);
    assert_eq!(
        event.to_value(),
        json!({"properties":{"emails":[null,null],"n":[{},{"f":1}]}})
    );
}
