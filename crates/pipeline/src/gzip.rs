//! Capped gunzip, shared by the collector (to check a body) and the worker (to read it): a
//! small body that inflates without end (a gzip bomb) costs at most `limit` bytes.

use std::io::Read;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflateError {
    #[error("invalid gzip data: {0}")]
    Invalid(String),
    #[error("inflates to more than {0} bytes")]
    TooLarge(usize),
}

/// Inflates `compressed` (one or more gzip members), refusing to produce more than `limit` bytes.
pub fn inflate_capped(compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).min(limit));
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::MultiGzDecoder::new(compressed)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| InflateError::Invalid(e.to_string()))?;
    if out.len() > limit {
        return Err(InflateError::TooLarge(limit));
    }
    Ok(out)
}
