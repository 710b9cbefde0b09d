//! `ingestctl console` (issue #26): one web page, served from this binary (no build step, no
//! CDN), showing the live feed per source and the pipeline's queues. The page gets both over
//! server-sent events (`/events`): `item` for each item of the feed, `state` every
//! [`STATE_EVERY`] with every pipeline queue's depth, consumers and (with the management API)
//! rates, as `ingestctl queues` computes them.
//!
//! The console attaches to the feed (and reads the queues) only while a page is open, so an
//! idle console costs the workers nothing. Bound to a loopback address it needs nothing more;
//! bound elsewhere it refuses to start without a token, which each request must carry (as
//! `?token=` or the cookie the page sets from it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use ingest_pipeline::{Settings, Topology};
use tokio::sync::{broadcast, RwLock};

use crate::live::Viewer;
use crate::{management, pipeline_queues, queue_states, QueueState};

/// How often the page gets the queues' state.
pub const STATE_EVERY: Duration = Duration::from_secs(2);
/// Items held for pages that are behind; past it a page misses items (the feed is lossy).
const ITEMS_BACKLOG: usize = 1024;
/// The page, with its script and styles: everything it needs.
const PAGE: &str = include_str!("console/page.html");

struct Console {
    settings: Settings,
    token: Option<String>,
    /// Collectors whose spools are shown.
    collectors: Vec<String>,
    items: broadcast::Sender<String>,
    state: RwLock<String>,
}

#[derive(serde::Deserialize)]
struct Auth {
    token: Option<String>,
}

pub async fn serve(
    settings: &Settings,
    listen: SocketAddr,
    token: Option<String>,
    collectors: Vec<String>,
) -> anyhow::Result<()> {
    let token = token.filter(|t| !t.is_empty());
    if !listen.ip().is_loopback() && token.is_none() {
        anyhow::bail!(
            "--listen {listen} is not a loopback address: give a --token (or INGEST_CONSOLE_TOKEN), which the page's address must carry"
        );
    }
    let (items, _) = broadcast::channel(ITEMS_BACKLOG);
    let console = Arc::new(Console {
        settings: settings.clone(),
        token,
        collectors,
        items,
        state: RwLock::new("[]".to_owned()),
    });
    tokio::spawn(feed(console.clone()));
    tokio::spawn(queues(console.clone()));
    let app = Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/state", get(state))
        .route_layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "ingestctl: console on http://{}/ (Ctrl-C stops)",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Whether the request carries the token, when one is needed.
fn allowed(console: &Console, query: &Auth, headers: &HeaderMap) -> bool {
    let Some(token) = &console.token else {
        return true;
    };
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("console_token="))
        .any(|t| t == token);
    from_cookie || query.token.as_deref() == Some(token.as_str())
}

/// Every route: 401 without the token, when one is needed.
async fn guard(
    State(console): State<Arc<Console>>,
    Query(auth): Query<Auth>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !allowed(&console, &auth, request.headers()) {
        let why = "a token is needed: open the page as /?token=…\n";
        return (StatusCode::UNAUTHORIZED, why).into_response();
    }
    next.run(request).await
}

async fn page(State(console): State<Arc<Console>>, Query(auth): Query<Auth>) -> Response {
    let mut response =
        Html(PAGE.replace("__PREFIX__", &html_escape(&console.settings.broker.prefix)))
            .into_response();
    if let (Some(token), Some(_)) = (&console.token, &auth.token) {
        if let Ok(cookie) =
            format!("console_token={token}; HttpOnly; SameSite=Strict; Path=/").parse()
        {
            response.headers_mut().insert(header::SET_COOKIE, cookie);
        }
    }
    response
}

async fn state(State(console): State<Arc<Console>>) -> Response {
    let state = console.state.read().await.clone();
    ([(header::CONTENT_TYPE, "application/json")], state).into_response()
}

async fn events(State(console): State<Arc<Console>>) -> Response {
    let items = console.items.subscribe();
    let stream = sse_stream(console, items);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The page's stream: the state at once and every [`STATE_EVERY`], and each item of the feed.
fn sse_stream(
    console: Arc<Console>,
    items: broadcast::Receiver<String>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut tick = tokio::time::interval(STATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stream::unfold(
        (console, items, tick),
        |(console, mut items, mut tick)| async move {
            let event = tokio::select! {
                _ = tick.tick() => {
                    let state = console.state.read().await.clone();
                    Event::default().event("state").data(state)
                }
                item = items.recv() => match item {
                    Ok(item) => Event::default().event("item").data(item),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Event::default().event("missed").data(missed.to_string())
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            Some((Ok(event), (console, items, tick)))
        },
    )
}

/// Attaches to the live feed while at least one page is open, and passes its items on.
async fn feed(console: Arc<Console>) {
    loop {
        while console.items.receiver_count() == 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut viewer = match Viewer::attach(&console.settings).await {
            Ok(viewer) => viewer,
            Err(error) => {
                eprintln!("ingestctl: cannot watch the live feed: {error:#}");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        loop {
            let next = tokio::time::timeout(Duration::from_secs(1), viewer.next()).await;
            match next {
                Ok(Some(item)) => {
                    let _ = console.items.send(item.to_string());
                }
                Ok(None) => break,
                // Quiet: detach once no page is open.
                Err(_) if console.items.receiver_count() == 0 => break,
                Err(_) => {}
            }
        }
        viewer.close().await;
    }
}

/// The pipeline's queues, read every [`STATE_EVERY`] while a page is open.
async fn queues(console: Arc<Console>) {
    let settings = &console.settings;
    let topology = Topology::from_settings(&settings.broker);
    let names = pipeline_queues(
        &topology,
        &settings.sinks.names(),
        &settings.sinks.retry_delays(),
    );
    loop {
        if console.items.receiver_count() > 0 {
            let mut state = match states(settings, &names).await {
                Ok(states) => {
                    serde_json::json!({"queues": states, "prefix": settings.broker.prefix})
                }
                Err(error) => serde_json::json!({"error": format!("{error:#}")}),
            };
            state["spools"] = spools(&console.collectors).await.into();
            *console.state.write().await = state.to_string();
        }
        tokio::time::sleep(STATE_EVERY).await;
    }
}

/// Each queue's depth and consumers, and its rates with the management API.
async fn states(settings: &Settings, names: &[String]) -> anyhow::Result<Vec<QueueState>> {
    let mut states = queue_states(&settings.broker, names).await?;
    if let Some(base) = &settings.broker.management_url {
        let url = settings
            .broker
            .nodes()
            .first()
            .map_or(settings.broker.url.expose(), |url| url.expose())
            .to_owned();
        for state in &mut states {
            if let Ok(queue) = management::queue(base.expose(), &url, &state.name).await {
                state.rates = crate::parse_rates(&queue);
            }
        }
    }
    Ok(states)
}

/// Each collector's spool, from its /metrics: requests and bytes held, its bound, the oldest
/// one's age; or why it could not be read.
async fn spools(collectors: &[String]) -> Vec<serde_json::Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let mut out = Vec::new();
    for base in collectors {
        let url = format!("{}/metrics", base.trim_end_matches('/'));
        let text = match client.get(&url).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(error) => {
                out.push(serde_json::json!({"collector": base, "error": error.to_string()}));
                continue;
            }
        };
        let value = |name: &str| crate::exposed_value(&text, name);
        out.push(serde_json::json!({
            "collector": base,
            "records": value("collector_spool_records"),
            "bytes": value("collector_spool_bytes"),
            "max_bytes": value("collector_spool_max_bytes"),
            "oldest_age_s": value("collector_spool_oldest_age_seconds"),
        }));
    }
    out
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
