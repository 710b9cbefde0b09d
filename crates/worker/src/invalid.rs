//! The invalid queue: events that failed decoding, validation or conversion, each kept with
//! every error and the original event (or, if it never parsed, the raw payload in base64).

use base64::Engine;
use ingest_pipeline::message::{invalid_headers, RequestMeta};
use ingest_schema::Issue;
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::Value;

use crate::enrich::format_time;

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
        let raw = scrub_write_key(raw);
        record.raw_base64 = Some(base64::engine::general_purpose::STANDARD.encode(raw));
        record
    }
}

const WRITE_KEY: &str = "writeKey";
const REDACTED: &[u8] = b"[redacted]";

/// The payload with the value of every `writeKey` string field replaced by `[redacted]`: a
/// sendBeacon body carries its write key, which is a secret. Keys are compared as JSON reads
/// them, escapes decoded (`"write\u004bey"` is the same key, and the collector takes it).
/// Works on text that does not parse (that is why it is here): it follows string tokens only,
/// and a value cut off by the end of the text is redacted to the end.
pub fn scrub_write_key(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    // Bytes of `raw` before this are in `out` already (once there is an `out`).
    let mut copied = 0;
    let mut at = 0;
    while let Some(offset) = raw[at..].iter().position(|b| *b == b'"') {
        let start = at + offset;
        let end = string_end(raw, start);
        at = end;
        if !is_write_key(&raw[start..end]) {
            continue;
        }
        let mut value = end;
        value += whitespace(&raw[value..]);
        if raw.get(value) != Some(&b':') {
            continue;
        }
        value += 1;
        value += whitespace(&raw[value..]);
        if raw.get(value) != Some(&b'"') {
            continue;
        }
        let value_end = string_end(raw, value);
        let kept = out.get_or_insert_with(|| Vec::with_capacity(raw.len()));
        kept.extend_from_slice(&raw[copied..=value]);
        kept.extend_from_slice(REDACTED);
        // The closing quote, if the text has it, comes with what follows.
        copied = if raw.get(value_end - 1) == Some(&b'"') && value_end - 1 > value {
            value_end - 1
        } else {
            value_end
        };
        at = value_end;
    }
    match out {
        None => std::borrow::Cow::Borrowed(raw),
        Some(mut kept) => {
            kept.extend_from_slice(&raw[copied..]);
            std::borrow::Cow::Owned(kept)
        }
    }
}

/// Where the string token opening at `start` (a quote) ends: just past its closing quote, or
/// the end of the text.
pub(crate) fn string_end(raw: &[u8], start: usize) -> usize {
    let mut escaped = false;
    for (i, b) in raw.iter().enumerate().skip(start + 1) {
        match (escaped, *b) {
            (true, _) => escaped = false,
            (false, b'\\') => escaped = true,
            (false, b'"') => return i + 1,
            _ => {}
        }
    }
    raw.len()
}

/// Whether a whole string token (quotes included) reads as `writeKey`.
fn is_write_key(token: &[u8]) -> bool {
    if !token.contains(&b'\\') {
        return token.len() == WRITE_KEY.len() + 2
            && &token[1..token.len() - 1] == WRITE_KEY.as_bytes();
    }
    // Escaped: at most six bytes per character.
    token.len() <= WRITE_KEY.len() * 6 + 2
        && serde_json::from_slice::<String>(token).is_ok_and(|key| key == WRITE_KEY)
}

fn whitespace(raw: &[u8]) -> usize {
    raw.iter().take_while(|b| b.is_ascii_whitespace()).count()
}

/// The message that carries one record into the invalid queue: JSON, persistent, with its
/// reason, source and request id as headers.
pub fn message(record: &InvalidRecord) -> Result<(Vec<u8>, BasicProperties), serde_json::Error> {
    let body = serde_json::to_vec(record)?;
    let headers = invalid_headers(record.reason, &record.source, &record.request_id);
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    Ok((body, properties))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_keys_are_redacted_even_in_text_that_does_not_parse() {
        let cases: [(&[u8], &[u8]); 9] = [
            // The collector reads these as the same key; issue #21 found the escaped one
            // stored in the invalid queue.
            (
                br#"{"write\u004bey":"k1","a":1}"#,
                br#"{"write\u004bey":"[redacted]","a":1}"#,
            ),
            (
                br#"{"\u0077riteKey" : "k\"2"}"#,
                br#"{"\u0077riteKey" : "[redacted]"}"#,
            ),
            // A value or a longer key that reads `writeKey` is not a key to redact.
            (
                br#"{"a":"writeKey","writeKeys":"x"}"#,
                br#"{"a":"writeKey","writeKeys":"x"}"#,
            ),
            // Inside a string, a quoted `writeKey` is text, not a key.
            (
                br#"{"note":"say \"writeKey\": \"x\"","writeKey":"k"}"#,
                br#"{"note":"say \"writeKey\": \"x\"","writeKey":"[redacted]"}"#,
            ),
            (
                br#"{"writeKey":"k1","a":1}"#,
                br#"{"writeKey":"[redacted]","a":1}"#,
            ),
            (
                br#"{"writeKey" : "k\"2","batch":"#,
                br#"{"writeKey" : "[redacted]","batch":"#,
            ),
            (
                br#"{"batch":[],"writeKey":"k3"#,
                br#"{"batch":[],"writeKey":"[redacted]"#,
            ),
            (br#"{"writeKey":7}"#, br#"{"writeKey":7}"#),
            (
                br#"[{"writeKey":"a"},{"writeKey":"b"}]"#,
                br#"[{"writeKey":"[redacted]"},{"writeKey":"[redacted]"}]"#,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(
                scrub_write_key(raw).as_ref(),
                want,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(matches!(
            scrub_write_key(b"{}"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
