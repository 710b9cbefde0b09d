//! The one error type at the HTTP edge, and how each variant answers the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::publisher::PublishError;
use crate::spool::SpoolError;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("missing write key: send it as the HTTP Basic username or as `writeKey` in the body")]
    MissingWriteKey,
    #[error("unknown write key")]
    UnknownWriteKey,
    #[error("malformed Authorization header")]
    BadAuthorization,
    #[error("request body is larger than {limit} bytes")]
    BatchTooLarge { limit: usize },
    #[error(
        "the batch-level `context`, `integrations` and `sentAt`, copied into each event that \
         lacks them (and a screen's `event` as its `name`), would make the events larger than \
         {limit} bytes; send them with the events instead"
    )]
    BatchExpandsTooLarge { limit: usize },
    #[error("event {index} is larger than {limit} bytes")]
    EventTooLarge { index: usize, limit: usize },
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("invalid gzip body: {0}")]
    BadGzip(String),
    #[error("unsupported Content-Encoding `{0}` (use gzip or none)")]
    UnsupportedEncoding(String),
    /// A 503, not a 408: Segment's mobile SDKs and analytics.js delete a batch on any 4xx but
    /// 429, and a body too slow on a phone's bad network can arrive in time later.
    #[error("the request body was not received in time; retry later")]
    BodyTimeout { retry_after_secs: u64 },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("too many requests or bytes in flight; retry later")]
    Overloaded {
        full: crate::in_flight::Full,
        retry_after_secs: u64,
    },
    #[error("the collector is overloaded (scheduling delay {delay_ms} ms); retry later")]
    Lagging {
        delay_ms: u128,
        retry_after_secs: u64,
    },
    #[error("this source is over its request rate; retry later")]
    RateLimited { retry_after_secs: u64 },
    #[error("this source sent more events per second than its ceiling (policy.max_events_per_second); retry later")]
    OverCeiling { retry_after_secs: u64 },
    #[error("this source or user is past its quota and the overflow lane cannot take more now; retry later")]
    OverQuota { retry_after_secs: u64 },
    #[error("too many requests in flight from this client address; retry later")]
    ClientOverShare { retry_after_secs: u64 },
    #[error(
        "this client address sent too many bodies without a valid write key; send the key \
         in the Authorization header, or retry later"
    )]
    UnauthenticatedOverBudget { retry_after_secs: u64 },
    #[error("request has more than {limit} events")]
    TooManyEvents { limit: usize },
    #[error("service unavailable: {source}")]
    Unavailable {
        source: PublishError,
        retry_after_secs: u64,
    },
    #[error("service unavailable: {source}; and not spooled: {spool}")]
    NotSpooled {
        source: PublishError,
        spool: Box<SpoolError>,
        retry_after_secs: u64,
    },
}

impl CaptureError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingWriteKey | Self::UnknownWriteKey | Self::BadAuthorization => {
                StatusCode::UNAUTHORIZED
            }
            Self::BatchTooLarge { .. }
            | Self::BatchExpandsTooLarge { .. }
            | Self::EventTooLarge { .. }
            | Self::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MalformedJson(_) | Self::BadRequest(_) | Self::BadGzip(_) | Self::BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTimeout { .. }
            | Self::Unavailable { .. }
            | Self::NotSpooled { .. }
            | Self::Overloaded { .. }
            | Self::Lagging { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. }
            | Self::OverCeiling { .. }
            | Self::OverQuota { .. }
            | Self::ClientOverShare { .. }
            | Self::UnauthenticatedOverBudget { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The error's code in the JSON answer (`event_too_large`, `malformed_json`, …).
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingWriteKey => "missing_write_key",
            Self::UnknownWriteKey => "unknown_write_key",
            Self::BadAuthorization => "bad_authorization",
            Self::BatchTooLarge { .. } => "batch_too_large",
            Self::BatchExpandsTooLarge { .. } => "batch_expands_too_large",
            Self::EventTooLarge { .. } => "event_too_large",
            Self::MalformedJson(_) => "malformed_json",
            Self::BadRequest(_) => "bad_request",
            Self::BadGzip(_) => "bad_gzip",
            Self::UnsupportedEncoding(_) => "unsupported_encoding",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::BodyRead(_) => "body_read",
            Self::Unavailable { .. } | Self::NotSpooled { .. } => "unavailable",
            Self::Overloaded { .. } | Self::Lagging { .. } => "overloaded",
            Self::RateLimited { .. } => "rate_limited",
            Self::OverCeiling { .. } => "over_event_ceiling",
            Self::OverQuota { .. } => "over_quota",
            Self::ClientOverShare { .. } => "client_over_share",
            Self::UnauthenticatedOverBudget { .. } => "unauthenticated_over_budget",
            Self::TooManyEvents { .. } => "too_many_events",
        }
    }
}

impl CaptureError {
    /// Why the request was shed, for `collector_load_shed_total{reason}`; `None` when the request
    /// itself was at fault.
    pub fn shed_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::Overloaded {
                full: crate::in_flight::Full::Requests,
                ..
            } => "in_flight",
            Self::Overloaded {
                full: crate::in_flight::Full::Bytes,
                ..
            } => "max_in_flight_bytes",
            Self::Lagging { .. } => "scheduling_delay",
            Self::RateLimited { .. } => "rate_limit",
            Self::OverCeiling { .. } => "event_ceiling",
            Self::OverQuota { .. } => "overflow_lane",
            Self::ClientOverShare { .. } => "max_connections_per_ip",
            Self::UnauthenticatedOverBudget { .. } => "unauthenticated_work",
            Self::Unavailable { source, .. } => source.shed_reason(),
            Self::NotSpooled { spool, .. } => spool.shed_reason(),
            _ => return None,
        })
    }
}

impl IntoResponse for CaptureError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(json!({
            "success": false,
            "code": self.code(),
            "message": self.to_string(),
        }));
        let mut response = (status, body).into_response();
        if let Self::Unavailable {
            retry_after_secs, ..
        }
        | Self::NotSpooled {
            retry_after_secs, ..
        }
        | Self::Overloaded {
            retry_after_secs, ..
        }
        | Self::Lagging {
            retry_after_secs, ..
        }
        | Self::RateLimited { retry_after_secs }
        | Self::OverCeiling { retry_after_secs }
        | Self::OverQuota { retry_after_secs }
        | Self::ClientOverShare { retry_after_secs }
        | Self::UnauthenticatedOverBudget { retry_after_secs }
        | Self::BodyTimeout { retry_after_secs } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}
