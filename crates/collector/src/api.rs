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
use tokio::sync::{Semaphore, SemaphorePermit};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::auth::{basic_username, query_write_key, WriteKeys};
use crate::body::{gunzip_limited, inspect, read_limited, Inspected, Limits, Refused};
use crate::error::CaptureError;
use crate::publisher::{raw_properties, Publisher};
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

/// Slots for requests being read or published: a count and a budget of body bytes, and for
/// requests without an Authorization header (their write key is known only once the body is
/// read) a smaller pool of each, so that such requests, slow or anonymous, can never hold every
/// slot or every byte and lock out clients whose key was checked from the header.
pub struct InFlight {
    all: Semaphore,
    body_keyed: Semaphore,
    bytes: Semaphore,
    body_keyed_bytes: Semaphore,
    /// `collector_in_flight_requests` and `collector_in_flight_bytes`, looked up once here
    /// rather than in the metrics registry on every request.
    requests_gauge: metrics::Gauge,
    bytes_gauge: metrics::Gauge,
}

/// Which budget a refused request found full, for `collector_load_shed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Requests,
    Bytes,
}

/// A request's slot: its permits and its count in `collector_in_flight_requests` and
/// `collector_in_flight_bytes`, given back when dropped (also when the client goes away
/// mid-request).
pub struct Slot<'a> {
    in_flight: &'a InFlight,
    _all: SemaphorePermit<'a>,
    _body_keyed: Option<SemaphorePermit<'a>>,
    bytes: SemaphorePermit<'a>,
    body_keyed_bytes: Option<SemaphorePermit<'a>>,
    requests_gauge: &'a metrics::Gauge,
    bytes_gauge: &'a metrics::Gauge,
}

impl InFlight {
    pub fn new(max: usize, max_body_keyed: usize, bytes: usize, body_keyed_bytes: usize) -> Self {
        let cap = |n: usize| n.min(Semaphore::MAX_PERMITS);
        Self {
            all: Semaphore::new(cap(max)),
            body_keyed: Semaphore::new(cap(max_body_keyed)),
            bytes: Semaphore::new(cap(bytes)),
            body_keyed_bytes: Semaphore::new(cap(body_keyed_bytes)),
            requests_gauge: metrics::gauge!("collector_in_flight_requests"),
            bytes_gauge: metrics::gauge!("collector_in_flight_bytes"),
        }
    }

    /// A slot holding `bytes` of the byte budget, or which budget is full.
    pub fn try_enter(&self, body_keyed: bool, bytes: usize) -> Result<Slot<'_>, Full> {
        let n = u32::try_from(bytes).map_err(|_| Full::Bytes)?;
        let (body_keyed, body_keyed_bytes) = if body_keyed {
            let slot = self.body_keyed.try_acquire().map_err(|_| Full::Requests)?;
            let held = self
                .body_keyed_bytes
                .try_acquire_many(n)
                .map_err(|_| Full::Bytes)?;
            (Some(slot), Some(held))
        } else {
            (None, None)
        };
        let all = self.all.try_acquire().map_err(|_| Full::Requests)?;
        let held = self.bytes.try_acquire_many(n).map_err(|_| Full::Bytes)?;
        self.requests_gauge.increment(1.0);
        self.bytes_gauge.increment(bytes as f64);
        Ok(Slot {
            in_flight: self,
            _all: all,
            _body_keyed: body_keyed,
            bytes: held,
            body_keyed_bytes,
            requests_gauge: &self.requests_gauge,
            bytes_gauge: &self.bytes_gauge,
        })
    }
}

impl Slot<'_> {
    /// Holds `bytes` of the byte budgets (a chunked body grows as it arrives), or which budget
    /// is full; on error the slot holds what it held before.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), Full> {
        let held = self.bytes.num_permits();
        let Some(more) = bytes.checked_sub(held).filter(|more| *more > 0) else {
            return Ok(());
        };
        let more_permits = u32::try_from(more).map_err(|_| Full::Bytes)?;
        let keyed = match self.body_keyed_bytes {
            Some(_) => Some(
                self.in_flight
                    .body_keyed_bytes
                    .try_acquire_many(more_permits)
                    .map_err(|_| Full::Bytes)?,
            ),
            None => None,
        };
        let all = self
            .in_flight
            .bytes
            .try_acquire_many(more_permits)
            .map_err(|_| Full::Bytes)?;
        self.bytes.merge(all);
        if let (Some(held), Some(keyed)) = (self.body_keyed_bytes.as_mut(), keyed) {
            held.merge(keyed);
        }
        self.bytes_gauge.increment(more as f64);
        Ok(())
    }

    /// Gives back what the slot holds beyond `bytes` (the body turned out smaller than the
    /// reservation).
    pub fn shrink_to(&mut self, bytes: usize) {
        let excess = self.bytes.num_permits().saturating_sub(bytes);
        if excess == 0 {
            return;
        }
        drop(self.bytes.split(excess));
        if let Some(held) = self.body_keyed_bytes.as_mut() {
            drop(held.split(excess.min(held.num_permits())));
        }
        self.bytes_gauge.decrement(excess as f64);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.requests_gauge.decrement(1.0);
        self.bytes_gauge.decrement(self.bytes.num_permits() as f64);
    }
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
    let started = std::time::Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let result = admit(
        &state,
        peer.ip(),
        endpoint,
        &request_headers,
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
                Json(json!({"success": true})).into_response()
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
    let inspected = inspect_body(endpoint, &raw, gzip, limit, &state.limits);
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
    let spooled = match state.publisher.publish(&raw, properties).await {
        Ok(()) => None,
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
) -> Result<(Inspected, usize), (CaptureError, usize)> {
    if !gzip {
        let work = raw.len();
        return inspect(endpoint, raw, limits)
            .map(|inspected| (inspected, work))
            .map_err(|error| (error, work));
    }
    // A body that fails to inflate is counted at the limit: at most that was inflated.
    let inflated = gunzip_limited(raw, limit).map_err(|error| (error, raw.len() + limit))?;
    let work = raw.len() + inflated.len();
    inspect(endpoint, &inflated, limits)
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

/// What the raw message says the body was sent as. The body is read as JSON whatever the client
/// declared: SDKs put `text/plain` (beacons, Segment's mobile SDKs), `application/json` with or
/// without a charset, or a type of their own on the same JSON, and Segment's API takes them all.
fn content_type(request_headers: &HeaderMap) -> &'static str {
    let essence = request_headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.as_bytes().split(|b| *b == b';').next())
        .map(<[u8]>::trim_ascii);
    match essence {
        Some(essence) if essence.eq_ignore_ascii_case(b"text/plain") => "text/plain",
        _ => "application/json",
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

    #[test]
    fn requests_without_a_header_key_never_take_the_slots_kept_for_header_keys() {
        let slots = InFlight::new(4, 1, 1000, 1000);
        let anonymous = slots.try_enter(true, 1).expect("the body-keyed slot");
        assert_eq!(
            slots.try_enter(true, 1).err(),
            Some(Full::Requests),
            "a second body-keyed slot"
        );
        let keyed: Vec<_> = (0..3).map(|_| slots.try_enter(false, 1)).collect();
        assert!(keyed.iter().all(Result::is_ok), "header-keyed slots");
        assert!(slots.try_enter(false, 1).is_err(), "past max_in_flight");
        drop(keyed);
        drop(anonymous);
        assert!(slots.try_enter(true, 1).is_ok(), "given back on drop");
        // Header-keyed requests can fill every slot, and then a body-keyed one waits too.
        let all: Vec<_> = (0..4)
            .filter_map(|_| slots.try_enter(false, 1).ok())
            .collect();
        assert_eq!(all.len(), 4);
        assert!(slots.try_enter(true, 1).is_err());
    }

    #[test]
    fn a_chunked_body_holds_only_the_bytes_that_arrived_and_stops_at_a_full_budget() {
        let slots = InFlight::new(100, 25, 1000, 400);
        // A body-keyed chunked request starts with nothing reserved.
        let mut chunked = slots.try_enter(true, 0).expect("a slot");
        chunked.grow_to(300).expect("300 bytes arrived");
        chunked.grow_to(200).expect("never shrinks by growing");
        assert_eq!(slots.try_enter(true, 101).err(), Some(Full::Bytes));
        let other = slots
            .try_enter(true, 100)
            .expect("the body-keyed bytes left");
        // The body-keyed share is full: this body cannot grow, and holds what it held.
        assert_eq!(chunked.grow_to(301), Err(Full::Bytes));
        drop(other);
        chunked.grow_to(400).expect("room again");
        // Header-keyed bodies grow against the whole budget only.
        let mut keyed = slots.try_enter(false, 0).expect("a slot");
        keyed.grow_to(600).expect("the rest of the 1000");
        assert_eq!(keyed.grow_to(601), Err(Full::Bytes));
        drop((chunked, keyed));
        assert!(slots.try_enter(false, 1000).is_ok(), "all given back");
    }

    #[test]
    fn the_byte_budget_binds_before_the_count_and_a_read_body_gives_back_its_excess() {
        let slots = InFlight::new(100, 25, 1000, 400);
        let mut big = slots.try_enter(false, 700).expect("700 of 1000 bytes");
        assert_eq!(slots.try_enter(false, 301).err(), Some(Full::Bytes));
        let small = slots.try_enter(false, 300).expect("the last 300 bytes");
        assert_eq!(slots.try_enter(false, 1).err(), Some(Full::Bytes));
        // The body was 200 bytes, not the 700 reserved: 500 come back.
        big.shrink_to(200);
        let after = slots.try_enter(false, 500).expect("the 500 given back");
        drop((big, small, after));
        // Body-keyed requests have their own share of the bytes too.
        let anonymous = slots.try_enter(true, 400).expect("the body-keyed bytes");
        assert_eq!(slots.try_enter(true, 1).err(), Some(Full::Bytes));
        let keyed = slots.try_enter(false, 600).expect("the header-keyed bytes");
        drop((anonymous, keyed));
        assert!(
            slots.try_enter(false, 1000).is_ok(),
            "all given back on drop"
        );
    }
}
