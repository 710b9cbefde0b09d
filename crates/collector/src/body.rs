//! Reading and cheaply checking a request body: bounded read, bounded gunzip, JSON well-formed,
//! the right top-level shape, per-event size. No schema validation here: that is the worker's.

use axum::body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use ingest_pipeline::gzip::{inflate_capped, InflateError};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::CaptureError;

/// The tracking API's endpoints: `batch`, or one event of the named type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Batch,
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl Endpoint {
    pub fn parse(path: &str) -> Option<Self> {
        Some(match path {
            "batch" | "import" => Self::Batch,
            "track" | "t" => Self::Track,
            "identify" | "i" => Self::Identify,
            "page" | "p" => Self::Page,
            "screen" | "s" => Self::Screen,
            "group" | "g" => Self::Group,
            "alias" | "a" => Self::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Track => "track",
            Self::Identify => "identify",
            Self::Page => "page",
            Self::Screen => "screen",
            Self::Group => "group",
            Self::Alias => "alias",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_events: usize,
}

impl Limits {
    pub fn for_endpoint(&self, endpoint: Endpoint) -> usize {
        match endpoint {
            Endpoint::Batch => self.max_batch_bytes,
            _ => self.max_event_bytes,
        }
    }
}

/// Reads at most `limit` bytes; a larger body is a 413, a client that vanishes is a 400.
pub async fn read_limited(body: Body, limit: usize) -> Result<bytes::Bytes, CaptureError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(CaptureError::BatchTooLarge { limit })
        }
        Err(error) => Err(CaptureError::BodyRead(error.to_string())),
    }
}

/// Inflates a gzip body, refusing to produce more than `limit` bytes (gzip bombs).
pub fn gunzip_limited(compressed: &[u8], limit: usize) -> Result<Vec<u8>, CaptureError> {
    inflate_capped(compressed, limit).map_err(|error| match error {
        InflateError::Invalid(reason) => CaptureError::BadGzip(reason),
        InflateError::TooLarge(limit) => CaptureError::BatchTooLarge { limit },
    })
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct EventBody {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// What the collector needs from a well-formed body.
#[derive(Debug, PartialEq, Eq)]
pub struct Inspected {
    pub write_key: Option<String>,
    pub events: usize,
}

/// Checks the decoded body's shape and sizes; returns the body's `writeKey`, if any.
pub fn inspect(
    endpoint: Endpoint,
    json: &[u8],
    limits: &Limits,
) -> Result<Inspected, CaptureError> {
    if json.len() > limits.for_endpoint(endpoint) {
        return Err(CaptureError::BatchTooLarge {
            limit: limits.for_endpoint(endpoint),
        });
    }
    // serde skips the fields it ignores without checking them, so these two are checked here.
    if let Err(error) = std::str::from_utf8(json) {
        return Err(CaptureError::MalformedJson(format!(
            "invalid UTF-8: {error}"
        )));
    }
    if nesting_depth_exceeds(json, MAX_DEPTH) {
        return Err(CaptureError::BadRequest(format!(
            "JSON nested deeper than {MAX_DEPTH} levels"
        )));
    }
    if !starts_with_object(json) {
        return Err(CaptureError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    // The structs below skim what they ignore (serde's IgnoredAny, RawValue): a number out of
    // f64 range or a lone surrogate escape passes them, while the worker's parse refuses it.
    serde_json::from_slice::<ParsedLikeTheWorker>(json)
        .map_err(|e| CaptureError::MalformedJson(e.to_string()))?;
    match endpoint {
        Endpoint::Batch => {
            let body: BatchBody<'_> = serde_json::from_slice(json)
                .map_err(|e| CaptureError::MalformedJson(e.to_string()))?;
            let batch = body
                .batch
                .ok_or_else(|| CaptureError::BadRequest("missing `batch` array".into()))?;
            if batch.len() > limits.max_batch_events {
                return Err(CaptureError::TooManyEvents {
                    limit: limits.max_batch_events,
                });
            }
            for (index, event) in batch.iter().enumerate() {
                let raw = event.get();
                if !starts_with_object(raw.as_bytes()) {
                    return Err(CaptureError::BadRequest(format!(
                        "batch[{index}] is not a JSON object"
                    )));
                }
                if raw.len() > limits.max_event_bytes {
                    return Err(CaptureError::EventTooLarge {
                        index,
                        limit: limits.max_event_bytes,
                    });
                }
            }
            Ok(Inspected {
                write_key: body.write_key,
                events: batch.len(),
            })
        }
        _ => {
            let body: EventBody = serde_json::from_slice(json)
                .map_err(|e| CaptureError::MalformedJson(e.to_string()))?;
            Ok(Inspected {
                write_key: body.write_key,
                events: 1,
            })
        }
    }
}

/// Any JSON value, parsed the way the worker parses it into a `serde_json::Value` (every number
/// and string decoded), and kept nowhere: the collector's check costs no allocation per value.
struct ParsedLikeTheWorker;

impl<'de> Deserialize<'de> for ParsedLikeTheWorker {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParsedLikeTheWorker)
    }
}

impl<'de> serde::de::Visitor<'de> for ParsedLikeTheWorker {
    type Value = ParsedLikeTheWorker;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<ParsedLikeTheWorker>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        while map.next_key::<ObjectKey>()?.is_some() {
            map.next_value::<ParsedLikeTheWorker>()?;
        }
        Ok(self)
    }
}

/// serde_json's marker for a `RawValue`: a `Value` reads an object whose first key is this as
/// raw JSON text, not as an object. No beacon has such a key; it is refused wherever it is.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// An object key, decoded (escapes included) and checked against [`RAW_VALUE_TOKEN`].
struct ObjectKey;

impl<'de> Deserialize<'de> for ObjectKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ObjectKey)
    }
}

impl serde::de::Visitor<'_> for ObjectKey {
    type Value = ObjectKey;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self, E> {
        if key == RAW_VALUE_TOKEN {
            return Err(E::custom(format!(
                "the key `{RAW_VALUE_TOKEN}` is reserved"
            )));
        }
        Ok(self)
    }
}

/// Deeper than this is refused: the worker's parser (serde_json) stops at 128 levels.
pub const MAX_DEPTH: usize = 100;

/// One pass over the bytes, counting brackets outside strings.
fn nesting_depth_exceeds(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn starts_with_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LIMITS: Limits = Limits {
        max_event_bytes: 100,
        max_batch_bytes: 300,
        max_batch_events: 3,
    };

    #[test]
    fn batch_yields_write_key_and_event_count() {
        let got = inspect(
            Endpoint::Batch,
            br#"{"writeKey":"k","batch":[{"type":"track"},{"type":"page"}]}"#,
            &LIMITS,
        )
        .expect("valid");
        assert_eq!(
            got,
            Inspected {
                write_key: Some("k".into()),
                events: 2
            }
        );
    }

    #[test]
    fn shape_errors_are_400_and_size_errors_413() {
        let status = |endpoint, body: &[u8]| {
            inspect(endpoint, body, &LIMITS).map_err(|e| e.status().as_u16())
        };
        assert_eq!(status(Endpoint::Batch, b"[1,2]"), Err(400));
        assert_eq!(status(Endpoint::Batch, br#"{"batch":[1]}"#), Err(400));
        assert_eq!(status(Endpoint::Batch, br#"{"nobatch":[]}"#), Err(400));
        assert_eq!(
            status(Endpoint::Batch, br#"{"batch":[{},{},{},{}]}"#),
            Err(413)
        );
        assert_eq!(status(Endpoint::Track, br#"{"event":"x""#), Err(400));
        assert_eq!(status(Endpoint::Track, b"{\"event\":\"\xff\"}"), Err(400));
        assert_eq!(
            status(Endpoint::Track, br#"{"writeKey":"a","writeKey":"b"}"#),
            Err(400)
        );
        let big_event = format!(r#"{{"batch":[{{"p":"{}"}}]}}"#, "x".repeat(120));
        assert_eq!(status(Endpoint::Batch, big_event.as_bytes()), Err(413));
        let big_single = format!(r#"{{"p":"{}"}}"#, "x".repeat(120));
        assert_eq!(status(Endpoint::Track, big_single.as_bytes()), Err(413));
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        let limits = Limits {
            max_event_bytes: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_batch_events: 10,
        };
        let err = inspect(Endpoint::Track, deep.as_bytes(), &limits).expect_err("too deep");
        assert_eq!(err.status().as_u16(), 400);
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_nesting() {
        let limits = Limits {
            max_event_bytes: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_batch_events: 10,
        };
        let body = format!(r#"{{"a":"{}\"{}"}}"#, "[".repeat(500), "{".repeat(500));
        assert!(inspect(Endpoint::Track, body.as_bytes(), &limits).is_ok());
        let at_limit = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert!(inspect(
            Endpoint::Track,
            format!(r#"{{"a":{at_limit}}}"#).as_bytes(),
            &limits
        )
        .is_ok());
        let over = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(inspect(
            Endpoint::Track,
            format!(r#"{{"a":{over}}}"#).as_bytes(),
            &limits
        )
        .is_err());
    }

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 10 << 20]).expect("write");
        let bomb = enc.finish().expect("finish");
        assert!(bomb.len() < 64 << 10);
        let err = gunzip_limited(&bomb, 1000).expect_err("bomb");
        assert_eq!(err.status().as_u16(), 413);
        assert!(matches!(
            gunzip_limited(b"not gzip", 1000),
            Err(CaptureError::BadGzip(_))
        ));
    }

    #[test]
    fn numbers_and_escapes_the_worker_cannot_parse_are_refused() {
        let limits = Limits {
            max_event_bytes: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_batch_events: 10,
        };
        let long_integer = format!(r#"{{"n":{}}}"#, "9".repeat(400));
        for body in [
            r#"{"n":1e400}"#,
            r#"{"n":-1e400}"#,
            long_integer.as_str(),
            r#"{"s":"\ud800"}"#,
            r#"{"\udc00":1}"#,
        ] {
            assert!(
                serde_json::from_slice::<serde_json::Value>(body.as_bytes()).is_err(),
                "the worker parses {body}"
            );
            let batch = format!(r#"{{"batch":[{body}]}}"#);
            for (endpoint, json) in [(Endpoint::Track, body), (Endpoint::Batch, &batch)] {
                let status = inspect(endpoint, json.as_bytes(), &limits).map_err(|e| e.status());
                assert_eq!(status, Err(axum::http::StatusCode::BAD_REQUEST), "{json}");
            }
        }
        assert!(inspect(Endpoint::Track, br#"{"n":1e300,"m":-0.0}"#, &limits).is_ok());
    }

    /// Found by the collector_body fuzz target: with serde_json's `raw_value` feature, a
    /// `Value` reads an object whose first key is this token as raw JSON, so the worker refused
    /// bodies the collector had accepted (or read them as something else).
    #[test]
    fn serde_json_raw_value_token_as_a_key_is_refused() {
        let limits = Limits {
            max_event_bytes: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_batch_events: 10,
        };
        for body in [
            r#"{"$serde_json::private::RawValue":[]}"#,
            r#"{"$serde_json::private::RawValue":"{\"a\":1}"}"#,
            r#"{"\u0024serde_json::private::RawValue":[]}"#,
            r#"{"a":{"$serde_json::private::RawValue":1}}"#,
        ] {
            let batch = format!(r#"{{"batch":[{body}]}}"#);
            for (endpoint, json) in [(Endpoint::Page, body), (Endpoint::Batch, &batch)] {
                let status = inspect(endpoint, json.as_bytes(), &limits).map_err(|e| e.status());
                assert_eq!(status, Err(axum::http::StatusCode::BAD_REQUEST), "{json}");
            }
        }
    }

    const ROOMY: Limits = Limits {
        max_event_bytes: 1000,
        max_batch_bytes: 1000,
        max_batch_events: 100,
    };

    /// `{"<shared>":…,"batch":[<event>, … n times]}`.
    fn batch_sharing(shared: &str, event: &str, n: usize) -> String {
        let events = vec![event; n].join(",");
        format!(r#"{{{shared},"batch":[{events}]}}"#)
    }

    /// The worker copies the batch-level `context` keys an event lacks, and the batch-level
    /// `integrations`, into every event: 2000 copies of a large shared value from a small body.
    #[test]
    fn a_batch_whose_shared_context_or_integrations_expand_past_the_batch_limit_is_refused() {
        let blob = "x".repeat(200);
        for shared in [
            format!(r#""context":{{"blob":"{blob}"}}"#),
            format!(r#""integrations":{{"All":"{blob}"}}"#),
            format!(r#""context":{{"app":{{"name":"Shop"}},"blob":"{blob}"}}"#),
        ] {
            for event in ["{}", r#"{"context":{"app":{}}}"#] {
                let body = batch_sharing(&shared, event, 10);
                assert!(body.len() < ROOMY.max_batch_bytes, "{body}");
                let err = inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).expect_err(&body);
                assert_eq!(err.status().as_u16(), 413, "{body}");
                assert!(err.to_string().contains("context"), "{err}");
            }
        }
    }

    #[test]
    fn a_shared_context_that_events_override_or_cannot_take_does_not_count_against_the_limit() {
        let shared = format!(r#""context":{{"blob":"{}"}}"#, "x".repeat(200));
        // Every event has its own `blob` (an escaped key is the same key), or a `context` that
        // is not an object: the worker copies nothing into them.
        for event in [
            r#"{"context":{"blob":1}}"#,
            r#"{"context":{"blob":1}}"#,
            r#"{"context":null}"#,
        ] {
            let body = batch_sharing(&shared, event, 10);
            assert!(
                inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok(),
                "{body}"
            );
        }
        // Shared integrations go only to events without their own.
        let shared = format!(r#""integrations":{{"All":"{}"}}"#, "x".repeat(200));
        let body = batch_sharing(&shared, r#"{"integrations":{}}"#, 10);
        assert!(inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok());
    }

    #[test]
    fn a_full_batch_with_per_event_contexts_and_no_batch_context_is_never_refused_as_expanding() {
        let event =
            r#"{"type":"track","event":"E","context":{"app":{"name":"Shop"},"os":{"name":"iOS"}}}"#;
        let n = (ROOMY.max_batch_bytes - 20) / (event.len() + 1);
        let body = format!(r#"{{"batch":[{}]}}"#, vec![event; n].join(","));
        assert!(body.len() <= ROOMY.max_batch_bytes);
        assert!(inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok());
        // A small shared context that the events lack, well inside the limit once copied.
        let body = batch_sharing(r#""context":{"library":{"name":"x"}}"#, "{}", 10);
        assert!(inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok());
    }

    #[test]
    fn endpoints_parse_including_short_aliases() {
        assert_eq!(Endpoint::parse("batch"), Some(Endpoint::Batch));
        assert_eq!(Endpoint::parse("t"), Some(Endpoint::Track));
        assert_eq!(Endpoint::parse("nope"), None);
    }
}
