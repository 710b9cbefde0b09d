//! Publishes request bodies to the raw queue with publisher confirms, over a connection that a
//! supervisor task keeps alive (reconnect with backoff). `publish` returns only when the broker
//! has confirmed the message; anything else is an error the caller turns into a 503.
//!
//! A raw queue deleted under a running collector (by hand, a policy, a reset broker) makes every
//! publish come back unroutable. The supervisor then declares the topology again, at once after
//! a returned publish and from a periodic check without traffic; the publisher is not ready
//! until the queue is back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use ingest_pipeline::broker::long_string;
use ingest_pipeline::broker::{until_taken, Policy, PublishError as Refused};
use ingest_pipeline::message::{headers, RequestMeta};
use ingest_pipeline::settings::BrokerSettings;
use ingest_pipeline::{broker, Backoff, Topology};
use lapin::{BasicProperties, Connection, Event};
use tokio::sync::Notify;

/// A broker that stopped answering must not hold up shutdown or reconnection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for a declare of the topology, or a check that the raw queue is there.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor checks that the raw queue exists (a passive declare).
const RAW_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Why a request's payload is not in the raw queue: nothing to publish on, or the broker's
/// own answer to the publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no connection to the broker")]
    Unavailable,
    #[error("the broker blocked publishing (resource alarm)")]
    Blocked,
    #[error(transparent)]
    Broker(#[from] broker::PublishError),
}

/// The properties a request's raw message is published with (from the spool too): its
/// metadata, and the `x-refused-events` header when some events of its batch were refused.
pub fn raw_properties(
    meta: &RequestMeta,
    content_type: &str,
    gzip: bool,
    refused_events: Option<&str>,
) -> BasicProperties {
    let properties = meta.properties(content_type, gzip);
    match refused_events {
        None => properties,
        Some(refused) => {
            let mut table = properties.headers().clone().unwrap_or_default();
            table.insert(headers::REFUSED_EVENTS.into(), long_string(refused));
            properties.with_headers(table)
        }
    }
}

impl PublishError {
    /// For `collector_load_shed_total{reason}` and `collector_requests_spooled_total{reason}`.
    pub fn shed_reason(&self) -> &'static str {
        match self {
            Self::Unavailable => "broker_unavailable",
            Self::Blocked => "broker_blocked",
            Self::Broker(broker::PublishError::Nacked) => "broker_nack",
            Self::Broker(broker::PublishError::Returned) => "unroutable",
            Self::Broker(broker::PublishError::TimedOut(_)) => "confirm_timeout",
            Self::Broker(broker::PublishError::Lost(_)) => "broker_error",
        }
    }
}

struct Live {
    connection: Arc<Connection>,
    channels: Vec<broker::Publisher>,
    next: AtomicUsize,
    /// Raised by a publish that failed on this connection; a later connection has its own.
    broken: Notify,
    /// Being left (no confirm in time, or a channel error): publishes go elsewhere.
    leaving: AtomicBool,
    /// When it was opened, and milliseconds from then to the last confirm it brought.
    opened: std::time::Instant,
    last_confirm_ms: AtomicU64,
    /// Raised by a publish that came back unroutable: the raw queue is gone.
    raw_missing: Notify,
}

struct Shared {
    live: RwLock<Option<Arc<Live>>>,
    blocked: AtomicBool,
    /// The raw queue is known to be missing, until it is declared again.
    raw_missing: AtomicBool,
    closing: AtomicBool,
    closed: Notify,
}

/// The queue a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Raw,
    /// Past its source's quota or a user's (`quota`).
    Overflow,
}

#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
    /// The ingest exchange: to the raw queue and, with the archive on, the archive stream.
    exchange: String,
    queue: String,
    /// The same for the overflow lane.
    overflow_exchange: String,
    overflow_queue: String,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Starts the supervisor; the publisher is usable (not ready) at once.
    pub fn start(settings: BrokerSettings) -> Self {
        let topology = Topology::from_settings(&settings);
        let shared = Arc::new(Shared {
            live: RwLock::new(None),
            blocked: AtomicBool::new(false),
            raw_missing: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        });
        let publisher = Self {
            shared: shared.clone(),
            exchange: topology.ingest_exchange(),
            queue: topology.raw(),
            overflow_exchange: topology.overflow_exchange(),
            overflow_queue: topology.overflow(),
            confirm_timeout: settings.confirm_timeout(),
        };
        tokio::spawn(supervise(shared, settings, topology));
        publisher
    }

    /// Why a publish cannot succeed now, if it cannot: what `/readyz` answers.
    pub fn unready_reason(&self) -> Option<&'static str> {
        if self.current().is_none() {
            Some("broker not connected")
        } else if self.shared.blocked.load(Ordering::Relaxed) {
            Some("broker blocked publishing")
        } else if self.shared.raw_missing.load(Ordering::Relaxed) {
            Some("raw queue missing")
        } else {
            None
        }
    }

    /// The connection to publish on: none while the one there is being left (a publish on it
    /// would wait out the confirm timeout for nothing).
    fn current(&self) -> Option<Arc<Live>> {
        let live = self.shared.live.read().ok().and_then(|live| live.clone())?;
        (!live.leaving.load(Ordering::SeqCst)).then_some(live)
    }

    /// Publishes to the raw queue.
    pub async fn publish(
        &self,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_to(Lane::Raw, body, properties).await
    }

    pub async fn publish_to(
        &self,
        lane: Lane,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        if self.shared.blocked.load(Ordering::Relaxed) {
            return Err(PublishError::Blocked);
        }
        let live = self.current().ok_or(PublishError::Unavailable)?;
        let index = live.next.fetch_add(1, Ordering::Relaxed) % live.channels.len();
        let channel = &live.channels[index];
        let started = std::time::Instant::now();
        let policy = Policy::answer_within(self.confirm_timeout);
        let (exchange, queue) = match lane {
            Lane::Raw => (&self.exchange, &self.queue),
            Lane::Overflow => (&self.overflow_exchange, &self.overflow_queue),
        };
        let result = until_taken(channel, exchange, queue, body, properties, &policy).await;
        let outcome = match &result {
            Ok(()) => "ack",
            Err(Refused::Nacked | Refused::Returned) => "nack",
            Err(Refused::Lost(_)) => "error",
            Err(Refused::TimedOut(_)) => "timeout",
        };
        let waited = started.elapsed();
        metrics::histogram!("collector_publish_confirm_seconds", "outcome" => outcome)
            .record(waited.as_secs_f64());
        match &result {
            Err(Refused::TimedOut(_)) => {
                // A node that confirms nothing for this long is stalled (frozen, its disk
                // stuck, a queue without a majority): leave it for another node of the
                // cluster rather than wait for its heartbeat to time out. One slow publish is
                // not a stalled node: only when no confirm at all came on this connection for
                // as long is it left (which fails its other publishes). Not while the broker
                // has said it blocks publishing (a resource alarm): that holds on every node,
                // and the held publishes would be given up with their connection and sent
                // again, one round per request.
                let blocked = self.shared.blocked.load(Ordering::SeqCst);
                let since_confirm = live.opened.elapsed().saturating_sub(Duration::from_millis(
                    live.last_confirm_ms.load(Ordering::Relaxed),
                ));
                let stalled = !blocked && since_confirm >= self.confirm_timeout;
                if stalled && live.leave() {
                    tracing::warn!(timeout = ?self.confirm_timeout, "no confirm from the broker in time; reconnecting (to another node if there is one)");
                }
            }
            Err(Refused::Lost(_)) => {
                // A channel or connection error: let the supervisor rebuild this connection.
                live.leave();
            }
            Ok(()) => {
                // The confirm's time from the connection's opening, without reading the clock
                // again on this path.
                let confirmed = started.saturating_duration_since(live.opened) + waited;
                let since_open = u64::try_from(confirmed.as_millis()).unwrap_or(u64::MAX);
                live.last_confirm_ms
                    .fetch_max(since_open, Ordering::Relaxed);
            }
            Err(Refused::Returned) => {
                // Returned: the raw queue is gone. Declared again by the supervisor.
                self.shared.raw_missing.store(true, Ordering::SeqCst);
                live.raw_missing.notify_one();
            }
            Err(Refused::Nacked) => {}
        }
        result.map_err(PublishError::from)
    }

    /// Closes the connection after in-flight publishes have been answered.
    pub async fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let live = self.shared.live.write().ok().and_then(|mut l| l.take());
        if let Some(live) = live {
            live.broken.notify_one();
            let closing = live.connection.close(200, "collector shutting down".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
        }
        self.shared.closed.notify_waiters();
    }
}

async fn supervise(shared: Arc<Shared>, settings: BrokerSettings, topology: Topology) {
    let mut backoff = Backoff::new(
        Duration::from_millis(settings.reconnect_min_ms),
        Duration::from_millis(settings.reconnect_max_ms),
    );
    // The node to try first: a random one, then the one after the node last reached (left, or
    // failing after its handshake).
    let mut first = fastrand::usize(..);
    while !shared.closing.load(Ordering::SeqCst) {
        match open(&settings, &topology, &mut first).await {
            Ok(live) => {
                backoff.reset();
                let mut events = live.connection.events_listener();
                let live = Arc::new(live);
                shared
                    .blocked
                    .store(live.connection.status().blocked(), Ordering::SeqCst);
                shared.raw_missing.store(false, Ordering::SeqCst);
                let mut raw_check = tokio::time::interval_at(
                    tokio::time::Instant::now() + RAW_CHECK_EVERY,
                    RAW_CHECK_EVERY,
                );
                raw_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                if let Ok(mut slot) = shared.live.write() {
                    *slot = Some(live.clone());
                }
                tracing::info!(queue = %topology.raw(), "connected to the broker");
                loop {
                    // Leaving a node comes first: a check or a declare that waits on a stalled
                    // node must not keep the collector on it (and every request published there).
                    tokio::select! {
                        biased;
                        () = live.broken.notified() => break,
                        () = shared.closed.notified() => break,
                        event = events.next() => match event {
                            Some(Event::ConnectionBlocked(reason)) => {
                                tracing::warn!(%reason, "broker blocked publishing");
                                shared.blocked.store(true, Ordering::SeqCst);
                            }
                            Some(Event::ConnectionUnblocked) => {
                                tracing::info!("broker unblocked publishing");
                                shared.blocked.store(false, Ordering::SeqCst);
                            }
                            Some(Event::Error(error)) => {
                                tracing::warn!(%error, "broker connection failed");
                                break;
                            }
                            Some(_) => {}
                            None => break,
                        },
                        () = live.raw_missing.notified() => tokio::select! {
                            () = redeclare(&live, &topology, &shared) => {}
                            () = live.broken.notified() => break,
                        },
                        _ = raw_check.tick() => tokio::select! {
                            () = check_raw_queue(&live, &topology, &shared) => {}
                            () = live.broken.notified() => break,
                        },
                        () = tokio::time::sleep(Duration::from_secs(1)) => {
                            if !live.connection.status().connected()
                                || live.channels.iter().any(|c| !c.connected())
                            {
                                tracing::warn!("broker connection or channel lost");
                                break;
                            }
                        }
                    }
                }
                if let Ok(mut slot) = shared.live.write() {
                    *slot = None;
                }
                shared.blocked.store(false, Ordering::SeqCst);
                // Closed aside: a node that stopped answering would hold up the reconnect.
                close_aside(&live.connection);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot connect to the broker");
            }
        }
        if shared.closing.load(Ordering::SeqCst) {
            break;
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.closed.notified() => break,
        }
    }
}

/// Declares the topology again after a publish came back unroutable; ready again once it is.
async fn redeclare(live: &Live, topology: &Topology, shared: &Shared) {
    match tokio::time::timeout(DECLARE_TIMEOUT, topology.declare(&live.connection)).await {
        Ok(Ok(())) => {
            if shared.raw_missing.swap(false, Ordering::SeqCst) {
                tracing::warn!(queue = %topology.raw(), "the raw queue was missing; declared it again");
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(queue = %topology.raw(), %error, "cannot declare the missing raw queue");
        }
        Err(_) => {
            tracing::warn!(queue = %topology.raw(), "declaring the missing raw queue timed out")
        }
    }
}

/// A passive check that the raw queue exists, so that a deleted one is declared again (and
/// `/readyz` says so) before a request finds out. No declare while it exists: a declare that
/// differs from the queue's arguments is logged each time.
async fn check_raw_queue(live: &Live, topology: &Topology, shared: &Shared) {
    let raw = topology.raw();
    let found = tokio::time::timeout(
        DECLARE_TIMEOUT,
        broker::inspect_queue(&live.connection, &raw),
    )
    .await;
    if let Ok(Ok(None)) = found {
        shared.raw_missing.store(true, Ordering::SeqCst);
        redeclare(live, topology, shared).await;
    }
}

/// Connects from the `first`-th node on, which is then set to the node after the one reached:
/// a node that takes the handshake but fails (or stalls) opening channels or declaring the
/// topology is not tried first again.
async fn open(
    settings: &BrokerSettings,
    topology: &Topology,
    first: &mut usize,
) -> lapin::Result<Live> {
    let (connection, node) = broker::connect_from(settings, "collector", *first).await?;
    let connection = Arc::new(connection);
    *first = node.wrapping_add(1);
    match tokio::time::timeout(DECLARE_TIMEOUT, set_up(settings, topology, &connection)).await {
        Ok(Ok(channels)) => Ok(live(connection, channels)),
        Ok(Err(error)) => {
            close_aside(&connection);
            Err(error)
        }
        Err(_) => {
            close_aside(&connection);
            Err(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("channels and topology not set up within {DECLARE_TIMEOUT:?}"),
            )))
        }
    }
}

/// Closes a connection without waiting for it.
fn close_aside(connection: &Arc<Connection>) {
    let connection = connection.clone();
    tokio::spawn(async move {
        let closing = connection.close(320, "reconnecting".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    });
}

/// The publishing channels, once the topology is declared.
async fn set_up(
    settings: &BrokerSettings,
    topology: &Topology,
    connection: &Arc<Connection>,
) -> lapin::Result<Vec<broker::Publisher>> {
    let mut channels = Vec::with_capacity(settings.publish_channels);
    for _ in 0..settings.publish_channels {
        channels.push(broker::Publisher::open(connection.clone()).await?);
    }
    topology.declare(connection).await?;
    Ok(channels)
}

impl Live {
    /// Marks this connection as being left, so that no publish goes to it any more, and tells
    /// the supervisor; whether this call did it first.
    fn leave(&self) -> bool {
        let first = !self.leaving.swap(true, Ordering::SeqCst);
        self.broken.notify_one();
        first
    }
}

fn live(connection: Arc<Connection>, channels: Vec<broker::Publisher>) -> Live {
    Live {
        connection,
        channels,
        next: AtomicUsize::new(0),
        broken: Notify::new(),
        leaving: AtomicBool::new(false),
        opened: std::time::Instant::now(),
        last_confirm_ms: AtomicU64::new(0),
        raw_missing: Notify::new(),
    }
}
