//! The HTTP surface: the Segment / RudderStack tracking endpoints (`/v1/…`, and RudderStack's
//! `/beacon/v1/…`), CORS, health.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ingest_pipeline::message::{Endpoint, RefusedEvent, RequestMeta};
use ingest_pipeline::metrics::SchedulingDelay;
use ingest_pipeline::settings::CollectorSettings;
use serde_json::{json, Value};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::auth::{basic_username, query_write_key, WriteKeys};
use crate::body::{gunzip_limited, inspect_counting, read_limited, Inspected, Refused};
use crate::error::CaptureError;
use crate::head::{client_ip, content_length, content_type, is_gzip};
use crate::in_flight::{InFlight, Slot};
use crate::limits::Limits;
use crate::publisher::{raw_properties, Lane, Publisher};
use crate::quota::Verdict;
use crate::spool::record::Entry;
use crate::spool::Spool;

/// On a 200 for a request the broker could not confirm, kept in this collector's spool.
pub const SPOOLED_HEADER: &str = "x-spooled";

pub struct AppState {
    pub publisher: Publisher,
    /// Where requests the broker cannot confirm wait, when `collector.spool` is on.
    pub spool: Option<Spool>,
    /// Requests being read or published; when none is free the answer is 503 at once.
    pub in_flight: InFlight,
    pub limiter: crate::ratelimit::RateLimiter,
    /// Events per second per source and user: past a quota, the overflow lane; past the
    /// ceiling, 429.
    pub quotas: crate::quota::Quotas,
    pub keys: WriteKeys,
    pub limits: Limits,
    pub body_timeout: Duration,
    pub retry_after_secs: u64,
    pub trusted_proxies: Vec<IpAddr>,
    /// Requests in flight per forwarded client address, for requests through a trusted proxy
    /// (the accept loop caps the other clients by their connections).
    pub per_forwarded_client: Arc<crate::per_client::PerClient>,
    /// Inflating and scanning spent per client address on bodies that proved no key.
    pub unauthenticated: crate::unauth::UnauthenticatedWork,
    pub scheduling_delay: SchedulingDelay,
    /// Shed load while the runtime is later than this; `None`: never.
    pub max_scheduling_delay: Option<Duration>,
}

pub fn router(state: Arc<AppState>, settings: &CollectorSettings) -> Router {
    let tracking = Router::new()
        .route("/v1/{endpoint}", post(capture))
        .route("/beacon/v1/{endpoint}", post(capture))
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
        _ if path.starts_with("/beacon/v1/") => {
            match path.strip_prefix("/beacon/v1/").and_then(Endpoint::parse) {
                Some(Endpoint::Batch) => "/beacon/v1/batch",
                Some(_) => "/beacon/v1/event",
                None => "other",
            }
        }
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

/// CORS that browser SDKs pass: any request header they add (RudderStack's `AnonymousId`, …) is
/// allowed by mirroring the preflight's list, and credentials are allowed, which `sendBeacon`
/// (always `credentials: include`) needs once its body's type makes the browser ask first.
/// Credentials give nothing here: the collector reads no cookie, only the write key. With
/// `["*"]` the request's own origin is mirrored, since a credentialed answer cannot say `*`.
/// Browsers keep a preflight's answer for at most `max-age` (Chromium caps it at 2 hours).
fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::mirror_request()
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
        .allow_headers(AllowHeaders::mirror_request())
        .allow_credentials(true)
        .max_age(Duration::from_secs(86_400))
}

/// Ready while a request can be kept: the broker can take it, or else the spool has room for
/// it. A collector with a spool stays in its load balancer through a broker outage, which is
/// what the spool is for; it leaves when the spool is full too.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match (state.publisher.unready_reason(), &state.spool) {
        (None, _) => (StatusCode::OK, "ready").into_response(),
        (Some(reason), Some(spool)) if spool.has_room() => {
            (StatusCode::OK, format!("ready (spooling: {reason})")).into_response()
        }
        (Some(reason), Some(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{reason}, and the spool is full"),
        )
            .into_response(),
        (Some(reason), None) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

async fn capture(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(endpoint): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    // The head by reference: axum's `HeaderMap` extractor would copy every header.
    let (head, body) = request.into_parts();
    let request_headers = &head.headers;
    let Some(endpoint) = Endpoint::parse(&endpoint) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"success": false, "code": "not_found"})),
        )
            .into_response();
    };
    let started = std::time::Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let result = admit(
        &state,
        peer.ip(),
        endpoint,
        request_headers,
        query.as_deref(),
        body,
        &request_id,
    )
    .await;
    let mut response = match result {
        Ok(Accepted {
            events,
            refused,
            confirm_wait,
            spooled,
        }) => {
            metrics::counter!("collector_events_accepted_total").increment(events as u64);
            metrics::histogram!("collector_request_own_seconds")
                .record(started.elapsed().saturating_sub(confirm_wait).as_secs_f64());
            let mut response = if refused.is_empty() {
                success()
            } else {
                for r in &refused {
                    metrics::counter!("collector_events_refused_total", "code" => r.code())
                        .increment(1);
                }
                let refused: Vec<Value> = refused
                    .iter()
                    .map(|r| json!({"index": r.index, "code": r.code(), "message": r.error.to_string()}))
                    .collect();
                Json(json!({"success": true, "refused": refused})).into_response()
            };
            if let Some(reason) = spooled {
                metrics::counter!("collector_requests_spooled_total", "reason" => reason)
                    .increment(1);
                response
                    .headers_mut()
                    .insert(SPOOLED_HEADER, HeaderValue::from_static("true"));
            }
            response
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

/// `{"success":true}`, written once.
fn success() -> Response {
    let json = HeaderValue::from_static("application/json");
    ([(header::CONTENT_TYPE, json)], r#"{"success":true}"#).into_response()
}

/// A request the broker confirmed.
struct Accepted {
    events: usize,
    /// Events of its batch refused alone; the others were published.
    refused: Vec<Refused>,
    /// From handing the body to the broker to its confirm: the broker's share of the latency.
    confirm_wait: Duration,
    /// Spooled instead of confirmed, and why the broker could not take it.
    spooled: Option<&'static str>,
}

/// Sheds load, checks the head, takes a slot, then reads and publishes the body.
async fn admit(
    state: &AppState,
    peer: IpAddr,
    endpoint: Endpoint,
    request_headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
    request_id: &str,
) -> Result<Accepted, CaptureError> {
    let late = state.scheduling_delay.current();
    if state.max_scheduling_delay.is_some_and(|max| late > max) {
        return Err(CaptureError::Lagging {
            delay_ms: late.as_millis(),
            retry_after_secs: state.retry_after_secs,
        });
    }
    let client = client_ip(peer, request_headers, &state.trusted_proxies);
    // Through a trusted proxy every connection is the proxy's: the client's share is counted
    // here, by its forwarded address, for as long as its request is in flight.
    let _share =
        if state.trusted_proxies.contains(&peer) {
            Some(state.per_forwarded_client.try_hold(client).ok_or(
                CaptureError::ClientOverShare {
                    retry_after_secs: state.retry_after_secs,
                },
            )?)
        } else {
            None
        };
    let head = check_head(state, endpoint, request_headers, query)?;
    if head.source.is_none() {
        state
            .unauthenticated
            .check(client, std::time::Instant::now())
            .map_err(|wait| CaptureError::UnauthenticatedOverBudget {
                retry_after_secs: wait.as_secs().saturating_add(1),
            })?;
    }
    // Without a Content-Length (chunked), the body's bytes are reserved as they arrive.
    let reserve = head.declared_length.unwrap_or(0);
    let mut slot = state
        .in_flight
        .try_enter(head.source.is_none(), reserve)
        .map_err(|full| CaptureError::Overloaded {
            full,
            retry_after_secs: state.retry_after_secs,
        })?;
    accept(
        state,
        client,
        endpoint,
        head,
        request_headers,
        body,
        request_id,
        &mut slot,
    )
    .await
}

/// What the request head decides, before a slot is taken or a byte of the body is read.
struct Head {
    /// The source, when the write key came in the Authorization header or the query string
    /// (known to be valid before the body is read).
    source: Option<String>,
    content_type: &'static str,
    gzip: bool,
    /// Bytes the body may have, before and after gunzip.
    limit: usize,
    /// The Content-Length, when the client sent one (at most `limit`).
    declared_length: Option<usize>,
}

/// A malformed Authorization header, an unknown key in it or in the query, an encoding other
/// than gzip, a declared length over the limit: refused from the head alone, so they cost no slot.
///
/// The write key, first found wins: the Authorization header's Basic username, the query's
/// `writeKey` (RudderStack's beacon), then the body's `writeKey` (read later, in [`accept`]).
fn check_head(
    state: &AppState,
    endpoint: Endpoint,
    request_headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Head, CaptureError> {
    let key = match request_headers.get(header::AUTHORIZATION) {
        Some(value) => Some(basic_username(
            value.to_str().map_err(|_| CaptureError::BadAuthorization)?,
        )?),
        None => query.and_then(query_write_key),
    };
    let source = match key {
        Some(key) => Some(state.keys.source_for(&key)?.to_owned()),
        None => None,
    };
    let content_type = content_type(request_headers);
    let gzip = is_gzip(request_headers)?;
    let limit = state.limits.for_endpoint(endpoint);
    let declared_length = content_length(request_headers);
    if declared_length.is_some_and(|length| length > limit) {
        return Err(CaptureError::BatchTooLarge { limit });
    }
    Ok(Head {
        source,
        content_type,
        gzip,
        limit,
        declared_length,
    })
}

#[allow(clippy::too_many_arguments)]
async fn accept(
    state: &AppState,
    client: IpAddr,
    endpoint: Endpoint,
    head: Head,
    request_headers: &HeaderMap,
    body: Body,
    request_id: &str,
    slot: &mut Slot<'_>,
) -> Result<Accepted, CaptureError> {
    let Head {
        source: header_source,
        content_type,
        gzip,
        limit,
        declared_length: _,
    } = head;
    // A header key's source is rate-limited before its body is read.
    if let Some(source) = &header_source {
        rate_limit(state, source)?;
    }
    let retry_after_secs = state.retry_after_secs;
    let grow = |bytes| {
        slot.grow_to(bytes)
            .map_err(|full| CaptureError::Overloaded {
                full,
                retry_after_secs,
            })
    };
    let raw = tokio::time::timeout(state.body_timeout, read_limited(body, limit, grow))
        .await
        .map_err(|_| CaptureError::BodyTimeout { retry_after_secs })??;
    slot.shrink_to(raw.len());
    // Users are read only for a source with per-user quotas (any, while the source is not
    // known yet).
    let users = match &header_source {
        Some(source) => state.quotas.counts_users(source),
        None => state.quotas.counts_any_users(),
    };
    let inspected = inspect_body(endpoint, &raw, gzip, limit, &state.limits, users);
    let (inspected, source) = match header_source {
        Some(source) => (inspected.map_err(|(error, _)| error)?.0, source),
        None => {
            // The key was in the body, if anywhere: work that proves none is this client's debt.
            let owe = |(error, work): (CaptureError, usize)| {
                state
                    .unauthenticated
                    .charge(client, work, std::time::Instant::now());
                error
            };
            let (inspected, work) = inspected.map_err(owe)?;
            let source = inspected
                .write_key
                .as_deref()
                .ok_or(CaptureError::MissingWriteKey)
                .and_then(|key| state.keys.source_for(key))
                .map_err(|error| owe((error, work)))?
                .to_owned();
            rate_limit(state, &source)?;
            (inspected, source)
        }
    };

    let lane = match state.quotas.check(
        &source,
        inspected.events,
        &inspected.users,
        std::time::Instant::now(),
    ) {
        Verdict::Live => Lane::Raw,
        Verdict::Overflow(reason) => {
            metrics::counter!("collector_overflowed_events_total", "source" => source.clone(), "reason" => reason.as_str())
                .increment(inspected.events as u64);
            Lane::Overflow
        }
        Verdict::Refuse(wait) => {
            metrics::counter!("collector_ceiling_refused_events_total", "source" => source.clone())
                .increment(inspected.events as u64);
            return Err(CaptureError::OverCeiling {
                retry_after_secs: wait.as_secs().saturating_add(1),
            });
        }
    };
    let meta = RequestMeta {
        request_id: request_id.to_owned(),
        received_at: chrono::Utc::now(),
        source,
        endpoint,
        client_ip: Some(client.to_string()),
        user_agent: request_headers
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    };
    // Only the too-large events need naming: the worker finds a non-object by itself. That
    // bounds the header by max_batch_bytes / max_event_bytes entries, whatever the batch.
    let too_large: Vec<RefusedEvent> = inspected
        .refused
        .iter()
        .filter(|r| r.code() == RefusedEvent::TOO_LARGE)
        .map(|r| RefusedEvent {
            index: r.index,
            code: r.code().to_owned(),
            bytes: r.bytes,
        })
        .collect();
    let refused_header = (!too_large.is_empty()).then(|| RefusedEvent::header(&too_large));
    let properties = raw_properties(&meta, content_type, gzip, refused_header.as_deref());
    let handed = std::time::Instant::now();
    let spooled = match state.publisher.publish_to(lane, &raw, properties).await {
        Ok(()) => None,
        // Never spooled: the spool is every source's, and a flood must not fill it (nor reach
        // the raw queue through its forwarder). The source is past its quota: it may wait.
        Err(_) if lane == Lane::Overflow => {
            return Err(CaptureError::OverQuota {
                retry_after_secs: state.retry_after_secs,
            })
        }
        Err(source) => {
            let retry_after_secs = state.retry_after_secs;
            let Some(spool) = &state.spool else {
                return Err(CaptureError::Unavailable {
                    source,
                    retry_after_secs,
                });
            };
            // The broker cannot confirm it: on this collector's disk instead, or a 503.
            let entry = Entry::new(&meta, content_type, gzip, refused_header.as_deref());
            match spool.append(&entry, &raw).await {
                Ok(()) => Some(source.shed_reason()),
                Err(spool) => {
                    return Err(CaptureError::NotSpooled {
                        source,
                        spool: Box::new(spool),
                        retry_after_secs,
                    })
                }
            }
        }
    };
    Ok(Accepted {
        events: inspected.events,
        refused: inspected.refused,
        confirm_wait: handed.elapsed(),
        spooled,
    })
}

/// Inflates (with `gzip`) and checks a body: what it holds and the bytes of work that took
/// (read, inflated, scanned), or the error and that work. The gunzipped copy lives only while
/// it is checked, not while the confirm is awaited.
fn inspect_body(
    endpoint: Endpoint,
    raw: &[u8],
    gzip: bool,
    limit: usize,
    limits: &Limits,
    users: bool,
) -> Result<(Inspected, usize), (CaptureError, usize)> {
    if !gzip {
        let work = raw.len();
        return inspect_counting(endpoint, raw, limits, users)
            .map(|inspected| (inspected, work))
            .map_err(|error| (error, work));
    }
    // A body that fails to inflate is counted at the limit: at most that was inflated.
    let inflated = gunzip_limited(raw, limit).map_err(|error| (error, raw.len() + limit))?;
    let work = raw.len() + inflated.len();
    inspect_counting(endpoint, &inflated, limits, users)
        .map(|inspected| (inspected, work))
        .map_err(|error| (error, work))
}

fn rate_limit(state: &AppState, source: &str) -> Result<(), CaptureError> {
    state
        .limiter
        .check(source, std::time::Instant::now())
        .map_err(|wait| CaptureError::RateLimited {
            retry_after_secs: wait.as_secs().saturating_add(1),
        })
}
