//! What a request's head says about its body and its client: the content type recorded with
//! the raw message, the content encoding, the declared length, and the client's address
//! (behind a trusted proxy, from X-Forwarded-For).

use std::net::IpAddr;

use axum::http::{header, HeaderMap};

use crate::error::CaptureError;

/// What the raw message says the body was sent as. The body is read as JSON whatever the client
/// declared: SDKs put `text/plain` (beacons, Segment's mobile SDKs), `application/json` with or
/// without a charset, or a type of their own on the same JSON, and Segment's API takes them all.
pub fn content_type(request_headers: &HeaderMap) -> &'static str {
    let essence = request_headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.as_bytes().split(|b| *b == b';').next())
        .map(<[u8]>::trim_ascii);
    match essence {
        Some(essence) if essence.eq_ignore_ascii_case(b"text/plain") => "text/plain",
        _ => "application/json",
    }
}

pub fn is_gzip(request_headers: &HeaderMap) -> Result<bool, CaptureError> {
    match request_headers.get(header::CONTENT_ENCODING) {
        None => Ok(false),
        Some(value) => {
            let value = String::from_utf8_lossy(value.as_bytes())
                .trim()
                .to_ascii_lowercase();
            match value.as_str() {
                "gzip" | "x-gzip" => Ok(true),
                "identity" | "" => Ok(false),
                other => Err(CaptureError::UnsupportedEncoding(
                    other.chars().take(100).collect(),
                )),
            }
        }
    }
}

pub fn content_length(request_headers: &HeaderMap) -> Option<usize> {
    request_headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// X-Forwarded-For entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, request_headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let mut client = peer;
    for value in request_headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else { continue };
        for hop in value.split(',').rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if trusted.contains(&ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn forwarded_for_is_only_believed_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 10.0.0.2"),
        );
        let trusted = [ip("10.0.0.1"), ip("10.0.0.2")];
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &trusted), ip("9.9.9.9"));
        let mut spoofed = HeaderMap::new();
        spoofed.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(
            client_ip(ip("10.0.0.1"), &spoofed, &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn any_content_type_is_read_as_json_and_only_gzip_is_an_encoding() {
        let mut h = HeaderMap::new();
        assert_eq!(content_type(&h), "application/json");
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Text/Plain ;charset=UTF-8"),
        );
        assert_eq!(content_type(&h), "text/plain");
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert_eq!(content_type(&h), "application/json");
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert!(is_gzip(&h).is_err());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("GZIP"));
        assert_eq!(is_gzip(&h).ok(), Some(true));
    }
}
