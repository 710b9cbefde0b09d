//! The accept loop, in place of `axum::serve`, for what it lacks against hostile clients:
//! a cap on open connections, and on those of one client address (over either, a connection is
//! closed at accept), a bound on a request head's bytes (hyper's read buffer, answered 431) and
//! a deadline for it (slowloris), an idle timeout for keep-alive connections, and a graceful
//! stop that lets requests in progress finish.
//!
//! Each connection is in one of three phases. `Head`: from accept, or from the first byte after
//! an idle spell, until the request head is parsed; it must end within `header_timeout`. `Busy`:
//! the handler runs (the body has its own timeout there, answered with 503 and `Retry-After`). `Idle`: a response
//! was sent and no byte of the next request has come; it may last `idle_timeout`. hyper's own
//! header timeout is not used: it starts as soon as a keep-alive connection goes idle, so it
//! cannot tell the two apart.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::per_client::{Held, PerClient};

/// What a connection may cost, from `collector.*` settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Of those, what one client address may hold (a trusted proxy's are not counted here:
    /// its clients are, per request, by their forwarded address).
    pub max_connections_per_ip: usize,
    /// A request head's bytes at most: each connection's read buffer is kept to this.
    pub max_header_bytes: usize,
}

impl ConnectionLimits {
    pub fn from_settings(c: &ingest_pipeline::settings::CollectorSettings) -> Self {
        Self {
            header_timeout: Duration::from_millis(c.header_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            max_connections: c.max_connections,
            max_connections_per_ip: c.max_connections_per_ip,
            max_header_bytes: c.max_header_bytes,
        }
    }
}

/// Accepts connections until `shutdown` completes; then stops accepting, tells every open
/// connection to finish its request in progress and close, and returns once all are closed.
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    trusted_proxies: Vec<IpAddr>,
    shutdown: impl Future<Output = ()>,
) {
    let per_client = PerClient::new(limits.max_connections_per_ip);
    // acquire_many takes a u32; a tokio semaphore holds at most usize::MAX >> 3 permits.
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max));
    let closing = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("collector_connections_rejected_total", "reason" => "max_connections")
                .increment(1);
            tracing::debug!(%peer, max, "connection refused: too many open connections");
            drop(stream);
            continue;
        };
        let client = if trusted_proxies.contains(&peer.ip()) {
            None
        } else {
            match per_client.try_hold(peer.ip()) {
                Some(held) => Some(held),
                None => {
                    metrics::counter!("collector_connections_rejected_total", "reason" => "max_connections_per_ip")
                        .increment(1);
                    tracing::debug!(%peer, "connection refused: too many open connections from this address");
                    drop(stream);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            limits,
            closing.clone(),
            (slot, client),
        ));
    }
    drop(listener);
    closing.cancel();
    // Every connection holds a slot until it is closed: all slots back means all closed.
    let _ = slots.acquire_many(max as u32).await;
}

/// Out of file descriptors (or a similar transient error): wait a little rather than spin.
async fn accept_failed(error: io::Error) {
    metrics::counter!("collector_accept_errors_total").increment(1);
    tracing::warn!(%error, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
    _held: (OwnedSemaphorePermit, Option<Held>),
) {
    let open = metrics::gauge!("collector_connections_open");
    open.increment(1.0);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let in_service = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let activity = in_service.clone();
        let app = app.clone();
        async move {
            activity.enter(Phase::Busy);
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = app.oneshot(request).await;
            activity.enter(Phase::Idle);
            response
        }
    });
    let connection = http1::Builder::new()
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let deadline = activity.deadline(&limits);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                break;
            }
            () = closing.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            () = activity.changed.notified() => {}
            () = sleep_until(deadline) => {
                if let Some(reason) = activity.expired(&limits) {
                    metrics::counter!("collector_connections_timed_out_total", "reason" => reason)
                        .increment(1);
                    tracing::debug!(%peer, reason, "connection timed out");
                    break;
                }
            }
        }
    }
    open.decrement(1.0);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Head = 0,
    Busy = 1,
    Idle = 2,
}

/// A connection's phase and when it began; written by the I/O wrapper and the service, read
/// by the connection's loop (all in the connection's task).
struct Activity {
    opened: Instant,
    phase: AtomicU8,
    since_ms: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            phase: AtomicU8::new(Phase::Head as u8),
            since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Head,
            1 => Phase::Busy,
            _ => Phase::Idle,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn enter(&self, phase: Phase) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Bytes came in: an idle connection starts a request head.
    fn on_read(&self) {
        if self.phase() == Phase::Idle {
            self.enter(Phase::Head);
        }
    }

    /// Bytes went out: a response still being written does not count as idle time.
    fn on_write(&self) {
        if self.phase() == Phase::Idle {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn limit(&self, limits: &ConnectionLimits) -> Option<(Duration, &'static str)> {
        match self.phase() {
            Phase::Head => Some((limits.header_timeout, "header")),
            Phase::Idle => Some((limits.idle_timeout, "idle")),
            Phase::Busy => None,
        }
    }

    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let (limit, _) = self.limit(limits)?;
        let since = Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        Some(self.opened + since + limit)
    }

    /// The phase whose time is up, if any.
    fn expired(&self, limits: &ConnectionLimits) -> Option<&'static str> {
        let (_, reason) = self.limit(limits)?;
        let deadline = self.deadline(limits)?;
        (Instant::now() >= deadline).then_some(reason)
    }
}

/// The TCP stream, telling [`Activity`] when bytes move.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.on_write();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.on_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_connections: 10,
        max_connections_per_ip: 10,
        max_header_bytes: 16384,
    };

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_has_the_header_deadline_and_a_busy_one_none() {
        let a = Activity::new();
        assert_eq!(a.deadline(&LIMITS), Some(a.opened + LIMITS.header_timeout));
        assert_eq!(a.expired(&LIMITS), None);
        tokio::time::advance(LIMITS.header_timeout).await;
        assert_eq!(a.expired(&LIMITS), Some("header"));
        a.enter(Phase::Busy);
        assert_eq!(a.deadline(&LIMITS), None);
        assert_eq!(a.expired(&LIMITS), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_gets_the_idle_timeout_until_a_byte_arrives() {
        let a = Activity::new();
        a.enter(Phase::Busy);
        tokio::time::advance(Duration::from_secs(1)).await;
        a.enter(Phase::Idle);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(a.expired(&LIMITS), None, "idle for 30 s of 60");
        a.on_read();
        assert_eq!(a.phase(), Phase::Head);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(a.expired(&LIMITS), Some("header"));
    }
}
