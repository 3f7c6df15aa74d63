//! The proxy's network plumbing: accepting agent connections ([`listener`]), terminating
//! their TLS ([`intercept`]) and forwarding each request ([`forward`], which rewrites its
//! fields with [`headers`]).
//!
//! None of it decides policy: it asks [`crate::policy`] and the route table, and answers
//! refusals through [`crate::error::ProxyError`]. What all connections share lives in
//! [`ProxyState`].

pub(crate) mod body;
pub(crate) mod forward;
pub(crate) mod framing;
mod headers;
pub(crate) mod intercept;
mod linger;
pub(crate) mod listener;
pub(crate) mod observe;
pub(crate) mod stall;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::ca::LeafCache;
use crate::metrics::Metrics;
use crate::policy::Mode;
use crate::routes::RouteTable;
use crate::upstream::Upstream;

/// Limits of SPEC §2 and §4a that the agent side enforces.
#[derive(Debug, Clone)]
pub(crate) struct ClientLimits {
    /// CONNECT head, then the TLS handshake.
    pub client_timeout: Duration,
    /// No request in flight on a connection; also bounds a request head.
    pub idle_timeout: Duration,
    /// Longest silence inside a body (either way).
    pub body_idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// HTTP/2 concurrent streams per agent connection.
    pub max_concurrent_streams: u32,
}

impl ClientLimits {
    /// The HTTP/1.1 server every agent connection gets (the listener's and a tunnel's);
    /// `head_timeout` bounds the wait for a request head.
    fn http1_server(&self, head_timeout: Duration) -> hyper::server::conn::http1::Builder {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(self.max_header_bytes.max(8192) + 8192)
            .max_header_size(self.max_header_bytes + 8192)
            .keep_alive(true);
        builder
    }
}

/// What every connection shares.
pub(crate) struct ProxyState {
    /// The routes in force; swapped whole on reload, read once per request.
    pub routes: ArcSwap<RouteTable>,
    pub leaves: LeafCache,
    pub upstream: Arc<Upstream>,
    pub limits: ClientLimits,
    /// The proxy's own listeners: a CONNECT to one of them is refused.
    pub own_listeners: Vec<SocketAddr>,
    /// `--mode`, fixed at start (a reload does not change it): copied into each decision.
    pub mode: Mode,
    pub metrics: Arc<Metrics>,
    connection_slots: Arc<Semaphore>,
    /// Refusals that may wait for the agent's request (`listener::REFUSALS_AT_ONCE`).
    refusal_slots: Arc<Semaphore>,
    /// Flips to `true` when the proxy starts shutting down.
    shutdown: watch::Sender<bool>,
    next_connection_id: AtomicU64,
}

impl std::fmt::Debug for ProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyState").finish_non_exhaustive()
    }
}

impl ProxyState {
    pub(crate) fn new(
        routes: RouteTable,
        leaves: LeafCache,
        upstream: Arc<Upstream>,
        limits: ClientLimits,
        own_listeners: Vec<SocketAddr>,
        mode: Mode,
    ) -> Arc<ProxyState> {
        let (hits, misses) = leaves.counters();
        Arc::new(ProxyState {
            metrics: Arc::new(Metrics::new(hits, misses, mode)),
            mode,
            routes: ArcSwap::from_pointee(routes),
            leaves,
            upstream,
            connection_slots: Arc::new(Semaphore::new(limits.max_connections)),
            refusal_slots: Arc::new(Semaphore::new(listener::REFUSALS_AT_ONCE)),
            shutdown: watch::Sender::new(false),
            limits,
            own_listeners,
            next_connection_id: AtomicU64::new(1),
        })
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.metrics.open_connections.get().max(0) as usize
    }

    /// Asks every connection to finish its in-flight requests and close.
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Resolves once the proxy has begun shutting down (at once if it has).
    pub(crate) async fn shutdown_begun(&self) {
        let mut rx = self.shutdown.subscribe();
        // The sender lives in `self`, which is borrowed here: this cannot fail.
        let _ = rx.wait_for(|down| *down).await;
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn next_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Tracks requests in flight on one agent connection, so an idle one can be closed.
#[derive(Debug)]
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    /// When the connection last became idle, in ms since `epoch`.
    idle_since_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection will have been idle for `idle`, or `None` while busy.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.epoch + since + idle)
    }
}

/// A request in flight; see [`Activity::begin`].
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.epoch.elapsed().as_millis() as u64, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a connection with nothing in flight may take to close by itself once the
/// proxy shuts down (an HTTP/2 GOAWAY and its PING answered, a keep-alive close flushed)
/// before it is dropped. With [`linger::SHUTDOWN_LINGER`] after it, an idle connection is
/// gone within 3 s of SIGTERM (SPEC §5).
const IDLE_CLOSE_ON_SHUTDOWN: Duration = Duration::from_millis(500);
// SPEC §5: with nothing in flight the process exits within 3 s of SIGTERM; an idle
// connection's close on shutdown and its linger after it must fit in that, with room for
// the exit itself.
const _: () =
    assert!(IDLE_CLOSE_ON_SHUTDOWN.as_millis() + linger::SHUTDOWN_LINGER.as_millis() <= 2000);

/// How often a draining connection checks whether its last request has finished.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Drives a server connection until it ends, closing it once it has had no request in
/// flight for `idle`.
/// `graceful` starts the connection's own graceful shutdown (hyper's `graceful_shutdown`),
/// which the proxy's shutdown also triggers: in-flight requests finish, then it closes.
///
/// The connection comes boxed: pinned in place here it would be stored twice in this
/// future (as the argument and as the pinned local), and this future lives, allocated
/// whole, for as long as the agent keeps the connection open.
pub(crate) async fn drive_connection<C, G>(
    mut conn: Pin<Box<C>>,
    graceful: G,
    activity: &Activity,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    C: Future,
    G: Fn(Pin<&mut C>),
{
    if *shutdown.borrow() {
        graceful(conn.as_mut());
        return drain_connection(conn, activity).await;
    }
    loop {
        let deadline = activity
            .idle_deadline(idle)
            .unwrap_or_else(|| Instant::now() + idle);
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    graceful(conn.as_mut());
                    return drain_connection(conn, activity).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                if activity.idle_deadline(idle).is_some_and(|d| d <= Instant::now()) {
                    graceful(conn.as_mut());
                    // An idle connection closes at once; give a half-sent head a moment.
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}

/// How long a connection whose last request finished during the drain may take to close
/// by itself: the end of that response may still be on its way to a slow reader.
const DRAINED_CLOSE_ON_SHUTDOWN: Duration = Duration::from_secs(3);

/// The end of a connection told to shut down gracefully: its requests in flight finish
/// (the proxy's grace period bounds them), and once none is, it gets a moment to close by
/// itself ([`IDLE_CLOSE_ON_SHUTDOWN`], or [`DRAINED_CLOSE_ON_SHUTDOWN`] if a request
/// was still running when the shutdown began) and is then dropped. Waiting for the
/// connection alone would let an idle one hold the exit for the whole grace: hyper's
/// HTTP/2 graceful shutdown waits on the client after its GOAWAY, and a half-sent head
/// waits out the head timeout.
async fn drain_connection<C: Future>(mut conn: Pin<Box<C>>, activity: &Activity) {
    let mut close_wait = IDLE_CLOSE_ON_SHUTDOWN;
    loop {
        if activity.in_flight.load(Ordering::Acquire) == 0 {
            let closed = tokio::time::timeout(close_wait, conn.as_mut()).await;
            // A head half-read when the shutdown began may have become a request
            // meanwhile: that one is in flight, and finishes like the others.
            if closed.is_ok() || activity.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
        }
        close_wait = DRAINED_CLOSE_ON_SHUTDOWN;
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(DRAIN_POLL) => {}
        }
    }
}

/// Counts an open agent connection for as long as it lives.
#[derive(Debug)]
struct OpenConnection {
    state: Arc<ProxyState>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.state.metrics.open_connections.dec();
    }
}

/// Who is on the other end of an agent connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientConn {
    pub id: u64,
    /// The agent's address as the audit log writes it, formatted once for every request
    /// on the connection.
    pub client_text: Arc<str>,
    pub state: Arc<ProxyState>,
    pub activity: Arc<Activity>,
    /// Raw heads of the plain-HTTP requests on this connection (framing check).
    pub plain_head_log: Arc<framing::HeadLog>,
    /// Turns off the connection's write-stall timeout once it relays a WebSocket.
    pub write_stall: stall::StallSwitch,
    _open: Arc<OpenConnection>,
}
