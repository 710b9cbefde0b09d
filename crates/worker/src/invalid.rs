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

const WRITE_KEY: &[u8] = b"\"writeKey\"";
const REDACTED: &[u8] = b"[redacted]";

/// The payload with the value of every `"writeKey": "..."` replaced by `[redacted]`: a
/// sendBeacon body carries its write key, which is a secret. Works on text that does not
/// parse (that is why it is here); a value cut off by the end of the text is redacted to the
/// end.
pub fn scrub_write_key(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let Some(first) = find(raw, WRITE_KEY) else {
        return std::borrow::Cow::Borrowed(raw);
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    let mut at = Some(first);
    while let Some(start) = at {
        let after_key = start + WRITE_KEY.len();
        out.extend_from_slice(&rest[..after_key]);
        rest = &rest[after_key..];
        let skipped = rest
            .iter()
            .take_while(|b| b.is_ascii_whitespace() || **b == b':')
            .count();
        if rest.get(skipped) == Some(&b'"') {
            out.extend_from_slice(&rest[..=skipped]);
            let value = &rest[skipped + 1..];
            let mut end = value.len();
            let mut escaped = false;
            for (i, b) in value.iter().enumerate() {
                match (escaped, *b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            out.extend_from_slice(REDACTED);
            rest = &value[end..];
        }
        at = find(rest, WRITE_KEY);
    }
    out.extend_from_slice(rest);
    std::borrow::Cow::Owned(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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
        let cases: [(&[u8], &[u8]); 5] = [
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
