//! Issue #21: one built-size rule (`ingest_pipeline::built`) that the collector checks before
//! its 200 and the worker before it builds, held to this property: whatever batch body the
//! collector accepts, the worker builds within its bound, so a 200 never ends as a whole-request
//! invalid record for a rule the collector could have checked.
//!
//! No broker or server: the collector's `inspect` and the worker's `split`, on bodies made the
//! way odd SDKs and hostile clients write them (escapes, whitespace, `null`s, number forms that
//! grow when written back, batch-level fields copied into every event, screens named by
//! `event`).

use collector::body::{inspect, Limits};
use ingest_pipeline::message::Endpoint;
use proptest::prelude::*;
use worker::decode::split;

/// The collector's limit in the test; small, so that a few dozen events reach it.
const BATCH_BYTES: usize = 20_000;

const LIMITS: Limits = Limits {
    max_event_bytes: BATCH_BYTES,
    max_batch_bytes: BATCH_BYTES,
    max_batch_events: 100,
    partial_batches: true,
};

/// The worker's bound for what the collector accepted, without its own per-event fields: the
/// body (at most the limit) and the copies (at most the limit as sent): twice the limit, when
/// no number grows as it is written back.
const TIGHT_BOUND: usize = 2 * BATCH_BYTES;

/// With numbers that grow when written back (`1E15` is written `1000000000000000.0`, 4.5 times
/// as long): `worker.max_built_bytes` (16 MiB by default) is checked at start to be at least
/// this for `collector.max_batch_bytes`, plus the worker's fields for each event.
const WORKER_BOUND: usize = BATCH_BYTES * ingest_pipeline::built::WORKER_BOUND_FACTOR;

/// A JSON string as a client may write it: plain, with escapes, or with every ASCII letter
/// as a `\u` escape (six bytes as sent, one once written back).
fn string(max: usize) -> impl Strategy<Value = String> {
    let text = proptest::collection::vec(
        prop_oneof![
            Just('a'),
            Just('Z'),
            Just('é'),
            Just('"'),
            Just('\\'),
            Just('\u{1}'),
            Just('😀'),
        ],
        0..max,
    )
    .prop_map(|chars| chars.into_iter().collect::<String>());
    (text, any::<bool>()).prop_map(|(text, spelled_out)| {
        if !spelled_out {
            return serde_json::to_string(&text).unwrap();
        }
        let escaped: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_alphabetic() {
                    format!("\\u{:04x}", c as u32)
                } else {
                    let quoted = serde_json::to_string(&c.to_string()).unwrap();
                    quoted[1..quoted.len() - 1].to_owned()
                }
            })
            .collect();
        format!("\"{escaped}\"")
    })
}

/// A value; `growing`: with numbers that are longer written back than as sent.
fn leaf(growing: bool) -> BoxedStrategy<String> {
    let plain = prop_oneof![
        string(40),
        Just("-0".to_owned()),
        Just("12".to_owned()),
        Just("0.5".to_owned()),
        Just("null".to_owned()),
        Just("true".to_owned()),
        string(10).prop_map(|s| format!("{{ \"k\" : {s} }}")),
    ];
    if !growing {
        return plain.boxed();
    }
    prop_oneof![
        plain,
        Just("1E15".to_owned()),
        Just("0.5E1".to_owned()),
        Just("[ 1E15 , 1E15 ]".to_owned()),
    ]
    .boxed()
}

const CONTEXT_KEYS: [&str; 4] = ["\"app\"", "\"os\"", "\"\\u0069p\"", "\"library\""];

/// An object of some of `CONTEXT_KEYS` (one spelled with an escape).
fn context(growing: bool) -> impl Strategy<Value = String> {
    proptest::collection::vec((0..CONTEXT_KEYS.len(), leaf(growing)), 0..4).prop_map(|entries| {
        let fields: Vec<String> = entries
            .into_iter()
            .map(|(k, v)| format!("{}: {v}", CONTEXT_KEYS[k]))
            .collect();
        format!("{{{}}}", fields.join(", "))
    })
}

fn maybe(field: &'static str, value: BoxedStrategy<String>) -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(format!("\"{field}\":null,")),
        value.prop_map(move |v| format!("\"{field}\" : {v},")),
    ]
    .boxed()
}

fn event(growing: bool) -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("track"), Just("screen"), Just("page"), Just("identify")],
        maybe("event", string(220).boxed()),
        maybe("name", string(20).boxed()),
        maybe(
            "context",
            prop_oneof![context(growing), Just("[]".to_owned())].boxed(),
        ),
        maybe("integrations", leaf(growing)),
        maybe("sentAt", string(30).boxed()),
    )
        .prop_map(|(kind, event, name, context, integrations, sent_at)| {
            format!(
                "{{{event}{name}{context}{integrations}{sent_at}\"type\":\"{kind}\",\"messageId\":\"m\"}}"
            )
        })
}

fn body(growing: bool) -> impl Strategy<Value = String> {
    (
        maybe("context", context(growing).boxed()),
        maybe("integrations", leaf(growing)),
        maybe("sentAt", string(300).boxed()),
        proptest::collection::vec(event(growing), 1..60),
    )
        .prop_map(|(context, integrations, sent_at, events)| {
            format!(
                "{{{context}{integrations}{sent_at}\"batch\":[{}]}}",
                events.join(",")
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn whatever_batch_the_collector_accepts_the_worker_builds_within_twice_the_limit(
        body in body(false)
    ) {
        if inspect(Endpoint::Batch, body.as_bytes(), &LIMITS).is_ok() {
            let built = split(Endpoint::Batch, body.as_bytes(), TIGHT_BOUND, 0);
            prop_assert!(built.is_ok(), "accepted, then {:?}: {}", built.err(), body);
        }
    }

    #[test]
    fn whatever_batch_the_collector_accepts_the_worker_builds_within_its_bound(
        body in body(true)
    ) {
        if inspect(Endpoint::Batch, body.as_bytes(), &LIMITS).is_ok() {
            let built = split(Endpoint::Batch, body.as_bytes(), WORKER_BOUND, 0);
            prop_assert!(built.is_ok(), "accepted, then {:?}: {}", built.err(), body);
        }
    }
}

const KEYS: [&str; 12] = [
    "\"batch\"",
    "\"context\"",
    "\"integrations\"",
    "\"sentAt\"",
    "\"type\"",
    "\"event\"",
    "\"name\"",
    "\"messageId\"",
    "\"writeKey\"",
    "\"properties\"",
    "\"\\u0062atch\"",
    "\"k\"",
];

/// Any JSON value, of any shape, its object keys drawn mostly from the ones either side reads
/// (an escaped `batch` too), with whitespace where JSON allows it.
fn any_value() -> impl Strategy<Value = String> {
    let leaves = prop_oneof![
        leaf(true),
        Just("\"track\"".to_owned()),
        Just("\"screen\"".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
    ];
    leaves.prop_recursive(4, 80, 12, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..12)
                .prop_map(|items| format!("[ {} ]", items.join(" ,"))),
            proptest::collection::vec((0..KEYS.len(), inner), 0..8).prop_map(|fields| {
                let fields: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("{} :{v}", KEYS[k]))
                    .collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

/// Any body: any JSON value; or a batch body whose elements are any values; or bytes that are
/// barely JSON at all.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any_value().prop_map(String::into_bytes),
        (body(true), any_value())
            .prop_map(|(body, extra)| { format!("{{\"k\":{extra},{}", &body[1..]).into_bytes() }),
        proptest::collection::vec(any_value(), 0..40).prop_map(|items| format!(
            "{{\"batch\":[{}]}}",
            items.join(",")
        )
        .into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

fn any_endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        Just(Endpoint::Batch),
        Just(Endpoint::Track),
        Just(Endpoint::Identify),
        Just(Endpoint::Page),
        Just(Endpoint::Screen),
        Just(Endpoint::Group),
        Just(Endpoint::Alias),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// For any body on any endpoint, not only batches made to look like an SDK's: what the
    /// collector accepts, the worker never refuses for its size.
    #[test]
    fn whatever_body_the_collector_accepts_the_worker_never_refuses_for_size(
        endpoint in any_endpoint(),
        body in any_body(),
    ) {
        if inspect(endpoint, &body, &LIMITS).is_ok() {
            let built = split(endpoint, &body, WORKER_BOUND, 0);
            prop_assert!(
                !matches!(built, Err(worker::decode::DecodeError::Expands(_))),
                "accepted on {:?}, then refused for its size: {}",
                endpoint,
                String::from_utf8_lossy(&body)
            );
        }
    }
}

/// The property's generator reaches both sides of the rule: bodies accepted, and bodies
/// refused for what the copies would add (else the property above could hold vacuously).
#[test]
fn the_generated_bodies_are_both_accepted_and_refused_as_expanding() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut accepted, mut expanding) = (0, 0);
    for _ in 0..200 {
        let body = body(true).new_tree(&mut runner).unwrap().current();
        match inspect(Endpoint::Batch, body.as_bytes(), &LIMITS) {
            Ok(_) => accepted += 1,
            Err(e) if e.code() == "batch_expands_too_large" => expanding += 1,
            Err(_) => {}
        }
    }
    assert!(
        accepted > 20 && expanding > 5,
        "{accepted} accepted, {expanding} refused as expanding, of 200"
    );
    // Any body: some are accepted (else its property would hold vacuously).
    let mut accepted_any = 0;
    for _ in 0..500 {
        let endpoint = any_endpoint().new_tree(&mut runner).unwrap().current();
        let body = any_body().new_tree(&mut runner).unwrap().current();
        if inspect(endpoint, &body, &LIMITS).is_ok() {
            accepted_any += 1;
        }
    }
    assert!(
        accepted_any > 25,
        "{accepted_any} of 500 any bodies accepted"
    );
}
