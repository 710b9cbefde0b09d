//! Write keys: which source (app) a request comes from. Keys are compared in constant time
//! against every configured key (no early exit), and are never logged.

use std::collections::BTreeMap;

use base64::Engine;
use ingest_pipeline::Secret;
use subtle::ConstantTimeEq;

use crate::error::CaptureError;

#[derive(Clone)]
pub struct WriteKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl WriteKeys {
    pub fn new(by_source: &BTreeMap<String, Secret>) -> Self {
        Self {
            keys: by_source
                .iter()
                .map(|(source, key)| (source.clone(), key.expose().as_bytes().to_vec()))
                .collect(),
        }
    }

    /// The source whose key this is.
    pub fn source_for(&self, presented: &str) -> Result<&str, CaptureError> {
        if presented.is_empty() {
            return Err(CaptureError::MissingWriteKey);
        }
        let mut found = None;
        for (source, key) in &self.keys {
            if bool::from(key.as_slice().ct_eq(presented.as_bytes())) {
                found = Some(source.as_str());
            }
        }
        found.ok_or(CaptureError::UnknownWriteKey)
    }
}

/// The write key from an `Authorization: Basic base64(key:)` header, if there is one.
pub fn basic_username(header: &str) -> Result<String, CaptureError> {
    let (scheme, encoded) = header
        .trim()
        .split_once(' ')
        .ok_or(CaptureError::BadAuthorization)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(CaptureError::BadAuthorization);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| CaptureError::BadAuthorization)?;
    let decoded = String::from_utf8(decoded).map_err(|_| CaptureError::BadAuthorization)?;
    let username = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    Ok(username.to_owned())
}

/// The `writeKey` of a query string (RudderStack's beacon: `/beacon/v1/batch?writeKey=…`), the
/// first one if there are several; an empty one counts as none.
pub fn query_write_key(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "writeKey")
        .map(|(_, key)| key.into_owned())
        .filter(|key| !key.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> WriteKeys {
        let mut map = BTreeMap::new();
        map.insert("ios".to_owned(), Secret::new("key-ios-123"));
        map.insert("web".to_owned(), Secret::new("key-web-456"));
        WriteKeys::new(&map)
    }

    #[test]
    fn known_keys_map_to_their_source() {
        let k = keys();
        assert_eq!(k.source_for("key-ios-123").ok(), Some("ios"));
        assert_eq!(k.source_for("key-web-456").ok(), Some("web"));
    }

    #[test]
    fn unknown_prefix_and_empty_keys_are_rejected() {
        let k = keys();
        assert!(matches!(
            k.source_for("key-ios-12"),
            Err(CaptureError::UnknownWriteKey)
        ));
        assert!(matches!(
            k.source_for("key-ios-1234"),
            Err(CaptureError::UnknownWriteKey)
        ));
        assert!(matches!(
            k.source_for(""),
            Err(CaptureError::MissingWriteKey)
        ));
    }

    #[test]
    fn the_query_yields_the_first_non_empty_write_key_decoded() {
        assert_eq!(
            query_write_key("writeKey=key%2Dios%2D123").as_deref(),
            Some("key-ios-123")
        );
        assert_eq!(
            query_write_key("a=1&writeKey=k1&writeKey=k2").as_deref(),
            Some("k1")
        );
        assert_eq!(query_write_key("writeKey="), None);
        assert_eq!(query_write_key("writekey=k"), None);
        assert_eq!(query_write_key(""), None);
    }

    #[test]
    fn basic_header_yields_the_username() {
        // base64("key-ios-123:")
        assert_eq!(
            basic_username("Basic a2V5LWlvcy0xMjM6").ok().as_deref(),
            Some("key-ios-123")
        );
        // no colon at all is tolerated: the whole thing is the key
        assert_eq!(
            basic_username("basic a2V5LWlvcy0xMjM=").ok().as_deref(),
            Some("key-ios-123")
        );
        assert!(basic_username("Bearer abc").is_err());
        assert!(basic_username("Basic !!!").is_err());
        assert!(basic_username("Basic").is_err());
    }
}
