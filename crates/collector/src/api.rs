//! The HTTP surface: the Segment / RudderStack tracking endpoints, CORS, health.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ingest_pipeline::broker::long_string;
use ingest_pipeline::headers;
use ingest_pipeline::metrics::SchedulingDelay;
use ingest_pipeline::settings::CollectorSettings;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{basic_username, WriteKeys};
use crate::body::{gunzip_limited, inspect, read_limited, Endpoint, Limits};
use crate::error::CaptureError;
use crate::publisher::Publisher;

pub struct AppState {
    pub publisher: Publisher,
    /// Requests being read or published; when none is free the answer is 503 at once.
    pub in_flight: tokio::sync::Semaphore,
    pub limiter: crate::ratelimit::RateLimiter,
    pub keys: WriteKeys,
    pub limits: Limits,
    pub body_timeout: Duration,
    pub retry_after_secs: u64,
    pub trusted_proxies: Vec<IpAddr>,
    pub scheduling_delay: SchedulingDelay,
    /// Shed load while the runtime is later than this; `None`: never.
    pub max_scheduling_delay: Option<Duration>,
}

pub fn router(state: Arc<AppState>, settings: &CollectorSettings) -> Router {
    let tracking = Router::new()
        .route("/v1/{endpoint}", post(capture))
        .layer(cors(&settings.cors_allowed_origins));
    Router::new()
        .merge(tracking)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(|| async { ingest_pipeline::metrics::render() }),
        )
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

/// `http_requests_total` and `http_request_duration_seconds` by route and status. Routes are
/// the fixed set this service serves (anything else is "other"), so labels stay bounded.
async fn count_requests(request: Request, next: Next) -> Response {
    let route = route_label(request.uri().path());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "route" => route, "status" => status.clone())
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        _ => match path.strip_prefix("/v1/").and_then(Endpoint::parse) {
            Some(Endpoint::Batch) => "/v1/batch",
            Some(Endpoint::Track) => "/v1/track",
            Some(Endpoint::Identify) => "/v1/identify",
            Some(Endpoint::Page) => "/v1/page",
            Some(Endpoint::Screen) => "/v1/screen",
            Some(Endpoint::Group) => "/v1/group",
            Some(Endpoint::Alias) => "/v1/alias",
            None => "other",
        },
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::CONTENT_ENCODING,
        ])
        .max_age(Duration::from_secs(600))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.publisher.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker not connected").into_response()
    }
}

async fn capture(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(endpoint): Path<String>,
    request_headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(endpoint) = Endpoint::parse(&endpoint) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"success": false, "code": "not_found"})),
        )
            .into_response();
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let late = state.scheduling_delay.current();
    let result = if state.max_scheduling_delay.is_some_and(|max| late > max) {
        Err(CaptureError::Lagging {
            delay_ms: late.as_millis(),
            retry_after_secs: state.retry_after_secs,
        })
    } else {
        match state.in_flight.try_acquire() {
            Ok(_permit) => {
                let in_flight = metrics::gauge!("collector_in_flight_requests");
                in_flight.increment(1.0);
                let result = accept(
                    &state,
                    peer.ip(),
                    endpoint,
                    &request_headers,
                    body,
                    &request_id,
                )
                .await;
                in_flight.decrement(1.0);
                result
            }
            Err(_) => Err(CaptureError::Overloaded {
                retry_after_secs: state.retry_after_secs,
            }),
        }
    };
    let mut response = match result {
        Ok(events) => {
            metrics::counter!("collector_events_accepted_total").increment(events as u64);
            Json(json!({"success": true})).into_response()
        }
        Err(error) => {
            if let Some(reason) = error.shed_reason() {
                metrics::counter!("collector_load_shed_total", "reason" => reason).increment(1);
            }
            if error.status().is_server_error() {
                tracing::warn!(%request_id, endpoint = endpoint.as_str(), %error, "request refused");
            } else {
                tracing::debug!(%request_id, endpoint = endpoint.as_str(), %error, "request rejected");
            }
            error.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn accept(
    state: &AppState,
    peer: IpAddr,
    endpoint: Endpoint,
    request_headers: &HeaderMap,
    body: Body,
    request_id: &str,
) -> Result<usize, CaptureError> {
    let header_key = match request_headers.get(header::AUTHORIZATION) {
        Some(value) => Some(basic_username(
            value.to_str().map_err(|_| CaptureError::BadAuthorization)?,
        )?),
        None => None,
    };
    // A header key is checked before the body is read, so unknown keys cost nothing.
    let header_source = match &header_key {
        Some(key) => {
            let source = state.keys.source_for(key)?.to_owned();
            rate_limit(state, &source)?;
            Some(source)
        }
        None => None,
    };
    let content_type = content_type(request_headers)?;
    let gzip = is_gzip(request_headers)?;

    let limit = state.limits.for_endpoint(endpoint);
    if let Some(length) = content_length(request_headers) {
        if length > limit {
            return Err(CaptureError::BatchTooLarge { limit });
        }
    }
    let raw = tokio::time::timeout(state.body_timeout, read_limited(body, limit))
        .await
        .map_err(|_| CaptureError::BodyTimeout)??;
    let decoded;
    let json: &[u8] = if gzip {
        decoded = gunzip_limited(&raw, limit)?;
        &decoded
    } else {
        &raw
    };
    let inspected = inspect(endpoint, json, &state.limits)?;
    let source = match header_source {
        Some(source) => source,
        None => {
            let key = inspected.write_key.ok_or(CaptureError::MissingWriteKey)?;
            let source = state.keys.source_for(&key)?.to_owned();
            rate_limit(state, &source)?;
            source
        }
    };

    let client_ip = client_ip(peer, request_headers, &state.trusted_proxies);
    let properties = message_properties(MessageMeta {
        request_id,
        source: &source,
        endpoint,
        client_ip,
        user_agent: request_headers
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        content_type,
        gzip,
    });
    state
        .publisher
        .publish(&raw, properties)
        .await
        .map_err(|source| CaptureError::Unavailable {
            source,
            retry_after_secs: state.retry_after_secs,
        })?;
    Ok(inspected.events)
}

fn rate_limit(state: &AppState, source: &str) -> Result<(), CaptureError> {
    state
        .limiter
        .check(source, std::time::Instant::now())
        .map_err(|wait| CaptureError::RateLimited {
            retry_after_secs: wait.as_secs().saturating_add(1),
        })
}

fn content_type(request_headers: &HeaderMap) -> Result<&'static str, CaptureError> {
    let Some(value) = request_headers.get(header::CONTENT_TYPE) else {
        return Ok("application/json");
    };
    let value = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
    let essence = value.split(';').next().unwrap_or("").trim().to_owned();
    match essence.as_str() {
        "application/json" | "" => Ok("application/json"),
        "text/plain" => Ok("text/plain"),
        _ => Err(CaptureError::UnsupportedContentType(
            essence.chars().take(100).collect(),
        )),
    }
}

fn is_gzip(request_headers: &HeaderMap) -> Result<bool, CaptureError> {
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

fn content_length(request_headers: &HeaderMap) -> Option<usize> {
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

struct MessageMeta<'a> {
    request_id: &'a str,
    source: &'a str,
    endpoint: Endpoint,
    client_ip: IpAddr,
    user_agent: Option<String>,
    content_type: &'static str,
    gzip: bool,
}

fn message_properties(meta: MessageMeta<'_>) -> BasicProperties {
    let now = chrono::Utc::now();
    let mut table = FieldTable::default();
    table.insert(
        headers::RECEIVED_AT.into(),
        long_string(&now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    table.insert(headers::SOURCE.into(), long_string(meta.source));
    table.insert(
        headers::ENDPOINT.into(),
        long_string(meta.endpoint.as_str()),
    );
    table.insert(
        headers::CLIENT_IP.into(),
        long_string(&meta.client_ip.to_string()),
    );
    if let Some(agent) = meta.user_agent {
        let agent: String = agent.chars().take(512).collect();
        table.insert(headers::USER_AGENT.into(), long_string(&agent));
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(meta.content_type.into())
        .with_message_id(meta.request_id.into())
        .with_timestamp(u64::try_from(now.timestamp()).unwrap_or(0))
        .with_app_id(truncate(meta.source, 255).into())
        .with_headers(table);
    if meta.gzip {
        properties = properties.with_content_encoding("gzip".into());
    }
    properties
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
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
    fn content_types_and_encodings() {
        let mut h = HeaderMap::new();
        assert_eq!(content_type(&h).ok(), Some("application/json"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain;charset=UTF-8"),
        );
        assert_eq!(content_type(&h).ok(), Some("text/plain"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        assert!(content_type(&h).is_err());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert!(is_gzip(&h).is_err());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("GZIP"));
        assert_eq!(is_gzip(&h).ok(), Some(true));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
