//! The byte scanner against the first version of the check (`oracle.rs`, over serde_json's
//! deserializer): on generated bodies, well-formed and broken, the same findings or the same
//! refusal. Where both refuse a body for two different faults, which one is named may differ
//! (the oracle skimmed each batch element before reading it, the scanner reads it once): then
//! both must give the same status. One refusal comes earlier on purpose: the element past
//! `max_batch_events` is refused unread (the oracle read it first, and found any fault in it).

use proptest::prelude::*;

use super::*;

fn limits(max_event_bytes: usize, max_batch_events: usize, partial_batches: bool) -> Limits {
    Limits {
        max_event_bytes,
        max_batch_bytes: 1 << 20,
        max_batch_events,
        partial_batches,
    }
}

fn agree(body: &str, batch: bool, limits: &Limits) -> Result<(), TestCaseError> {
    let new = scan(body, batch, limits);
    let old = oracle::scan(body, batch, limits);
    match (new, old) {
        (Ok(new), Ok(old)) => prop_assert_eq!(new, old, "{}", body),
        (Err(new), Err(old)) if new.code() == "too_many_events" && old.status() == 400 => {}
        (Err(new), Err(old)) => {
            prop_assert_eq!(new.status(), old.status(), "{} / {} on {}", new, old, body);
            if new.code() == old.code() && new.code() != "malformed_json" {
                prop_assert_eq!(new.to_string(), old.to_string(), "{}", body);
            }
        }
        (new, old) => prop_assert!(false, "scanner {:?}, oracle {:?} on {}", new, old, body),
    }
    Ok(())
}

/// Strings as SDKs and hostile clients write them: plain, unicode, every escape, surrogate
/// pairs, lone surrogates, the reserved `RawValue` key.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z_ .]{0,12}".prop_map(|s| format!("\"{s}\"")),
        1 => Just("\"é ü 漢字 🚀\"".to_owned()),
        1 => Just(r#""tab\tquote\"slash\/back\\nl\nbs\bff\fcr\r""#.to_owned()),
        1 => Just(r#""\u00e9\u6F22\uD83D\uDE80""#.to_owned()),
        1 => Just(r#""lone \uD83D here""#.to_owned()),
        1 => Just(r#""lone \uDE80 trail""#.to_owned()),
        1 => Just(r#""\uD83D\u0041""#.to_owned()),
        1 => Just(r#""bad \x escape""#.to_owned()),
        1 => Just(r#""$serde_json::private::RawValue""#.to_owned()),
        1 => Just(r#""$serde_json::private::Raw\u0056alue""#.to_owned()),
        1 => Just("\"raw\u{1}control\"".to_owned()),
    ]
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<i64>().prop_map(|n| n.to_string()),
        2 => any::<f64>().prop_map(|n| if n.is_finite() { n.to_string() } else { "0".into() }),
        3 => prop::sample::select(vec![
            "-0", "0.5", "1e308", "1.7976931348623157e308", "1.7976931348623159e308",
            "1e309", "-1e400", "1e-400", "0e999999999999999999999", "1E+2", "18446744073709551616",
            "01", "1.", "-", ".5", "1e", "1.5e+", "2.", "-01.0",
        ])
        .prop_map(str::to_owned),
        1 => (300usize..312).prop_map(|digits| format!("1{}", "0".repeat(digits))),
    ]
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => string(),
        3 => number(),
        1 => prop::sample::select(vec!["true", "false", "null", "nul", "tru"]).prop_map(str::to_owned),
    ]
}

fn value() -> impl Strategy<Value = String> {
    scalar().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec((string(), inner), 0..4).prop_map(|members| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// Nesting around the depth limit.
fn deep() -> impl Strategy<Value = String> {
    (95usize..104, any::<bool>()).prop_map(|(levels, arrays)| {
        if arrays {
            format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
        } else {
            format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels))
        }
    })
}

fn member_value(name: &'static str) -> BoxedStrategy<String> {
    match name {
        "type" => prop_oneof![
            4 => prop::sample::select(vec!["track", "page", "screen", "identify", "group", "alias"])
                .prop_map(|t| format!("\"{t}\"")),
            1 => prop::sample::select(vec!["\"Track\"", "null", "7", "\"x\"", "\"scr\\u0065en\""])
                .prop_map(str::to_owned),
        ]
        .boxed(),
        "event" => prop_oneof![
            3 => prop::sample::select(vec!["\"Home\"", "\"Cart\"", "\"Loaded a Screen\"", "\"x\""])
                .prop_map(str::to_owned),
            1 => value(),
        ]
        .boxed(),
        "userId" | "anonymousId" => prop_oneof![
            3 => prop::sample::select(vec!["\"u1\"", "\"\"", "\"u\\u0031\"", "\"anon-7\""])
                .prop_map(str::to_owned),
            1 => Just("null".to_owned()),
            1 => value(),
        ]
        .boxed(),
        "context" | "integrations" => prop_oneof![
            3 => prop::collection::vec(
                (prop::sample::select(vec!["ip", "library", "os", "locale", "app", "ip"]), value()),
                0..4,
            )
            .prop_map(|members| {
                let members: Vec<String> = members.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
            1 => Just("null".to_owned()),
            1 => value(),
        ]
        .boxed(),
        _ => prop_oneof![4 => value(), 1 => Just("null".to_owned()), 1 => deep()].boxed(),
    }
}

fn object_of(names: Vec<&'static str>) -> impl Strategy<Value = String> {
    let members: Vec<BoxedStrategy<String>> = names
        .into_iter()
        .map(|name| {
            member_value(name)
                .prop_map(move |v| format!("\"{name}\":{v}"))
                .boxed()
        })
        .collect();
    (members, prop::sample::select(vec!["", " ", "\n  "])).prop_map(|(members, space)| {
        format!("{{{space}{}{space}}}", members.join(&format!(",{space}")))
    })
}

fn event() -> impl Strategy<Value = String> {
    let names = vec![
        "type",
        "messageId",
        "event",
        "name",
        "context",
        "integrations",
        "sentAt",
        "properties",
        "userId",
        "anonymousId",
        "type",
        "userId",
    ];
    prop_oneof![
        8 => prop::sample::subsequence(names, 0..=12).prop_shuffle().prop_flat_map(object_of),
        1 => value(),
    ]
}

fn body() -> impl Strategy<Value = String> {
    let names = vec![
        "writeKey",
        "context",
        "integrations",
        "sentAt",
        "other",
        "writeKey",
        "context",
        "userId",
        "anonymousId",
    ];
    (
        prop::sample::subsequence(names, 0..=9)
            .prop_shuffle()
            .prop_flat_map(object_of),
        prop::option::of(prop::collection::vec(event(), 0..6)),
    )
        .prop_map(|(top, events)| match events {
            None => top,
            Some(events) => {
                let batch = format!("\"batch\":[{}]", events.join(","));
                match top.strip_suffix('}') {
                    Some(open) if open.trim_end().ends_with('{') => format!("{open}{batch}}}"),
                    Some(open) => format!("{open},{batch}}}"),
                    None => top,
                }
            }
        })
}

/// A body with some of its characters deleted, replaced or repeated.
fn broken() -> impl Strategy<Value = String> {
    let edits = prop::collection::vec(
        (
            any::<prop::sample::Index>(),
            0u8..3,
            prop::sample::select(vec![
                '{', '}', '[', ']', '"', ',', ':', '\\', ' ', '0', 'e', '-', '.', 'n', 'u', 'a',
            ]),
        ),
        1..4,
    );
    (body(), edits).prop_map(|(body, edits)| {
        let mut chars: Vec<char> = body.chars().collect();
        for (at, edit, c) in edits {
            if chars.is_empty() {
                break;
            }
            let at = at.index(chars.len());
            match edit {
                0 => {
                    chars.remove(at);
                }
                1 => chars[at] = c,
                _ => chars.insert(at, c),
            }
        }
        chars.into_iter().collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn the_scanner_finds_what_the_serde_version_found(
        body in body(),
        batch in prop::bool::weighted(0.8),
        max_event_bytes in prop::sample::select(vec![40usize, 1 << 20]),
        max_batch_events in prop::sample::select(vec![2usize, 100]),
        partial in any::<bool>(),
    ) {
        agree(&body, batch, &limits(max_event_bytes, max_batch_events, partial))?;
    }

    #[test]
    fn the_scanner_refuses_what_the_serde_version_refused(
        body in broken(),
        partial in any::<bool>(),
    ) {
        agree(&body, true, &limits(1 << 20, 100, partial))?;
    }
}

#[test]
fn escaped_keys_and_texts_are_decoded_as_serde_json_decodes_them() {
    let body = r#"{"wr\u0069teKey":"k\u00e9y\ud83d\ude80","batch":[{"typ\u0065":"scr\u0065en","event":"Ho\u006de","messageId":"a\"b","context":{"\u0069p":1,"os":2,"ip":3}}],"context":{"l\u006fcale":"fr","ip":"x"}}"#;
    let scanned = scan(body, true, &limits(1 << 20, 10, false)).expect("valid");
    assert_eq!(scanned.write_key.as_deref(), Some("kéy🚀"));
    let batch = scanned.batch.as_ref().expect("a batch");
    assert_eq!(batch.events[0].unusable, None);
    let OwnContext::Object(keys) = &batch.events[0].context else {
        panic!("an object context");
    };
    assert_eq!(keys, &[Key("ip".into()), Key("os".into())]);
    let shared = scanned.shared_context.as_ref().expect("a shared context");
    assert!(shared.contains_key(&Key("locale".into())));
    assert_eq!(
        Ok(scanned),
        oracle::scan(body, true, &limits(1 << 20, 10, false)).map_err(|e| e.to_string())
    );
}

#[test]
fn malformed_json_says_where() {
    let error = scan(
        "{\"batch\":\n  [{\"type\":\"track\"},]}",
        true,
        &limits(100, 10, false),
    )
    .expect_err("refused");
    assert_eq!(
        error.to_string(),
        "malformed JSON: trailing comma at line 2 column 21"
    );
}

#[test]
fn the_user_is_the_user_id_else_the_anonymous_id() {
    let limits = limits(1 << 20, 10, true);
    let body = r#"{"batch":[{"type":"track","userId":"u\u0031","anonymousId":"a"},{"type":"track","userId":"","anonymousId":"a2"},{"type":"track","userId":7}]}"#;
    let scanned = scan(body, true, &limits).expect("scans");
    let users: Vec<Option<&str>> = scanned
        .batch
        .as_ref()
        .expect("a batch")
        .events
        .iter()
        .map(|e| e.user.as_deref())
        .collect();
    assert_eq!(users, [Some("u1"), Some("a2"), None]);
    let single = scan(
        r#"{"type":"track","anonymousId":"a","userId":null}"#,
        false,
        &limits,
    )
    .expect("scans");
    assert_eq!(single.user.as_deref(), Some("a"));
}
