//! Connections to upstreams: the pool of client connections ([`pool`]), dialling and
//! verified TLS ([`dial`]), one multiplexed HTTP/2 connection per target where the
//! upstream offers h2 ([`h2`], driven by `h2` directly), kept-alive hyper HTTP/1.1 ones
//! otherwise, and the bodies that cross ([`body`]).
//!
//! The pool is our own, over hyper's and h2's connection APIs, rather than hyper-util's
//! legacy client, because the contract needs what that client hides: whether a request
//! went out on a reused connection (a bodiless idempotent request that fails there is
//! retried once on a new one, and nothing else that went out ever is), connections keyed
//! by whether the route may reach private addresses, a response timeout that runs from
//! the end of the upload, and errors we can name precisely (DNS, refused, TLS
//! certificate, timeout) for `Proxy-Status`.

mod body;
mod dial;
mod h2;
mod pool;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};

use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use tokio_rustls::TlsConnector;

pub(crate) use self::body::LastMoved;
pub(crate) use self::body::UpstreamBody;
use self::body::{Upload, UploadState, await_head};
use self::h2::H2Conn;
use self::pool::{Checkout, H1Conn, Pool, Sender, Setup};
use crate::chain::{NoProxy, ProxyUrl};
use crate::error::{ErrorKind, ProxyBody, ProxyError};
use crate::routes::Host;

/// How many times one request may check out a connection: each wait for another
/// request's dial and each connection that refused the request before it went out takes
/// one (the one replay of SPEC §4.3 comes on top). The last attempt dials rather than
/// waits.
const MAX_ATTEMPTS: usize = 4;

/// Operator-pinned addresses (`--resolve HOST:PORT:ADDR`), trusted as given.
pub(crate) type ResolveMap = HashMap<(Host, u16), Vec<IpAddr>>;

/// What the upstream side needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_header_bytes: usize,
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub resolve: ResolveMap,
    /// The proxy's own listeners, never dialled.
    pub own_listeners: Vec<SocketAddr>,
    /// Chain through this proxy, except for `no_proxy` hosts.
    pub proxy: Option<ProxyUrl>,
    pub no_proxy: NoProxy,
    /// Upstream connections open at once, all targets together: the descriptor budget
    /// the agent-side connection cap leaves them (SPEC §4a).
    pub max_connections: usize,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Target {
    pub host: Host,
    pub port: u16,
    pub tls: bool,
    pub allow_private: bool,
}

impl Target {
    /// `host[:port]` as it goes in a `Host` header or an absolute URI (port omitted when
    /// it is the scheme's default).
    pub(crate) fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        // Built by hand, not with `format!`: this runs for every request.
        let mut out = self.host.authority_form();
        if self.port != default {
            out.push(':');
            out.push_str(itoa::Buffer::new().format(self.port));
        }
        out
    }
}

/// The upstream side of the proxy: shared by every tunnel.
pub(crate) struct Upstream {
    settings: UpstreamSettings,
    /// ALPN `h2`, `http/1.1`: ordinary requests.
    tls: TlsConnector,
    /// ALPN `http/1.1` only: WebSocket upgrades, which need HTTP/1.1.
    tls_h1: TlsConnector,
    pool: Arc<Pool>,
    /// One permit per open upstream connection, held by the task that drives it (or the
    /// WebSocket relay that took it over).
    slots: Arc<Semaphore>,
    /// One permit per open upstream HTTP/2 stream (see `h2`'s module doc).
    streams: Arc<h2::StreamBudget>,
}

/// A WebSocket's upstream connection's place in the connection budget, carried in the
/// `101` response's extensions for the relay to hold.
#[derive(Clone)]
pub(crate) struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the TLS client configurations: public roots plus `extra_roots`, nothing else.
    pub(crate) fn new(settings: UpstreamSettings) -> Result<Upstream, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for (i, der) in settings.extra_roots.iter().enumerate() {
            roots
                .add(der.clone())
                .map_err(|e| format!("certificate #{} is not a usable root: {e}", i + 1))?;
        }
        let roots = Arc::new(roots);
        let config = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, String> {
            let mut c = ClientConfig::builder_with_provider(crate::ca::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Upstream {
            tls: TlsConnector::from(config(&[b"h2", b"http/1.1"])?),
            tls_h1: TlsConnector::from(config(&[b"http/1.1"])?),
            slots: Arc::new(Semaphore::new(settings.max_connections.max(1))),
            streams: h2::StreamBudget::new(h2::STREAMS_AT_ONCE),
            settings,
            pool: Arc::new(Pool::default()),
        })
    }

    /// Starts the task that drops idle pooled connections; it ends with the `Upstream`.
    pub(crate) fn spawn_reaper(self: &Arc<Self>) {
        let weak: Weak<Upstream> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(pool::SWEEP_EVERY);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(up) => up.pool.reap(),
                    None => return,
                }
            }
        });
    }

    /// Sends `req` (origin-form URI, `Host` header set) to `target`, on a pooled
    /// connection or a new one (one being set up by another request included). A request
    /// refused before anything of it went out is sent on another connection; when
    /// `replayable` (bodiless and idempotent) and it fails on a reused connection before
    /// any response byte arrived, it is sent once more on a new one (SPEC §4.3). A failure
    /// of the agent's own body is the agent's: `400 bad_request` (`413 body_too_large`
    /// when it passed its route's cap), whatever the send said.
    pub(crate) async fn send(
        &self,
        target: &Target,
        req: Request<ProxyBody>,
        replayable: bool,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (req, upload) = if hyper::body::Body::is_end_stream(req.body()) {
            (req, None)
        } else {
            let state = Arc::new(UploadState::new());
            let (parts, body) = req.into_parts();
            let body = Upload::new(body, state.clone()).boxed_unsync();
            (Request::from_parts(parts, body), Some(state))
        };
        self.send_attempts(target, req, replayable, upload.as_ref())
            .await
            .map_err(|e| match upload.as_ref().and_then(|u| u.agent_error()) {
                Some(agent) => agent.clone(),
                None => e,
            })
    }

    async fn send_attempts(
        &self,
        target: &Target,
        mut req: Request<ProxyBody>,
        replayable: bool,
        upload: Option<&Arc<UploadState>>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let mut replay = None;
        let mut last_error = None;
        for attempt in 1..=MAX_ATTEMPTS {
            let (sender, reused) = match self.pool.checkout(target) {
                Checkout::Reuse(sender) => (sender, true),
                Checkout::Wait(setup) if attempt < MAX_ATTEMPTS => {
                    // What it became is in the pool (or not) when the wait ends: the next
                    // checkout finds it.
                    if let Some(Setup::Failed(e)) = self.wait_for_dial(setup).await {
                        return Err(e);
                    }
                    continue;
                }
                Checkout::Wait(_) => (self.dial_new(self.pool.dial(target)).await?, false),
                Checkout::Dial(dialing) => (self.dial_new(dialing).await?, false),
            };
            if reused && replayable && replay.is_none() {
                replay = Some(copy_bodiless(&req));
            }
            let failed = match self.send_on(target, sender, req, upload).await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            match after_failure(failed, reused, replayable) {
                AfterFailure::Resend(e, back) => {
                    tracing::debug!(host = %target.host, error = %e, "upstream connection refused the request before it went out; trying another");
                    req = *back;
                    last_error = Some(e);
                }
                AfterFailure::Replay(e) => {
                    // The copy was taken when the reused connection was checked out.
                    let Some(copy) = replay.take() else {
                        return Err(e);
                    };
                    tracing::debug!(host = %target.host, error = %e, "reused upstream connection failed; retrying once on a new one");
                    let sender = self.dial_new(self.pool.dial(target)).await?;
                    return self
                        .send_on(target, sender, copy, upload)
                        .await
                        .map_err(SendError::into_proxy);
                }
                AfterFailure::GiveUp(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            ProxyError::new(
                ErrorKind::UpstreamUnavailable,
                format!("no connection to {} took the request", target.host),
            )
        }))
    }

    /// Dials a new connection and records it in the pool (an HTTP/2 one is shared from
    /// then on), telling anyone waiting for this dial what it became.
    async fn dial_new(&self, dialing: pool::Dialing) -> Result<Sender, ProxyError> {
        let sender = self.connect(dialing.target()).await;
        dialing.finish(sender.as_ref());
        sender
    }

    /// Waits for another request's dial to the same target to finish (bounded by its
    /// connect timeout); `None` when it was abandoned.
    async fn wait_for_dial(&self, mut setup: tokio::sync::watch::Receiver<Setup>) -> Option<Setup> {
        let bound = self.settings.connect_timeout + Duration::from_secs(1);
        let done = tokio::time::timeout(bound, setup.wait_for(|s| !matches!(s, Setup::Pending)));
        match done.await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Sends a WebSocket upgrade request over a new HTTP/1.1 connection that supports
    /// upgrades; the caller joins the two upgraded streams.
    pub(crate) async fn send_upgrade(
        &self,
        target: &Target,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let slot = self.connection_slot(target).await?;
        let (io, _) = self.dial(target, &self.tls_h1).await?;
        let (mut sender, conn) = self
            .h1_builder()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                ProxyError::new(
                    ErrorKind::UpstreamUnavailable,
                    format!("HTTP/1.1 handshake with {}: {e}", target.host),
                )
            })?;
        let slot = Arc::new(slot);
        let held = slot.clone();
        tokio::spawn(async move {
            let _slot = held;
            let _ = conn.with_upgrades().await;
        });
        let sent =
            tokio::time::timeout(self.settings.response_timeout, sender.send_request(req)).await;
        match sent {
            Err(_) => Err(response_timeout(target)),
            Ok(Err(e)) => Err(classify_hyper_error(target, &e)),
            Ok(Ok(mut r)) => {
                // Once upgraded, the connection lives on in the relay, not in its task.
                r.extensions_mut().insert(ConnectionSlot(slot));
                Ok(r)
            }
        }
    }

    /// A place in the upstream connection budget for a new connection to `target`: at
    /// once if one is free; else an idle pooled connection is closed to make one, and
    /// the wait for it is bounded by the connect timeout (then `503
    /// too_many_connections`, as for agent connections over their cap).
    async fn connection_slot(&self, target: &Target) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        self.pool.close_an_idle_connection();
        let wait = self.slots.clone().acquire_owned();
        match tokio::time::timeout(self.settings.connect_timeout, wait).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(ProxyError::new(
                ErrorKind::TooManyConnections,
                format!(
                    "{} upstream connections are open already; none came free for {}",
                    self.settings.max_connections, target.host
                ),
            )),
        }
    }

    fn h1_builder(&self) -> http1::Builder {
        let mut b = http1::Builder::new();
        b.max_buf_size(self.settings.max_header_bytes.max(8192) + 8192)
            .max_header_size(self.settings.max_header_bytes)
            .max_headers(256);
        b
    }

    async fn send_on(
        &self,
        target: &Target,
        sender: Sender,
        req: Request<ProxyBody>,
        upload: Option<&Arc<UploadState>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let timeout = self.settings.response_timeout;
        match sender {
            Sender::H1(mut conn) => {
                // A pooled connection was checked out ready, and a new one takes its
                // first request unasked. The sender goes back to the pool once the
                // response head is in: from then on it is not ready until this response
                // has been read to its end. Before that, it can still look ready (the
                // connection has not taken the request off its queue yet), and a request
                // checked out then would queue behind this one.
                //
                // A connection whose request failed is closed at once: it may still be
                // busy with it (an upload nobody reads), and is never reused.
                let response = conn.send.try_send_request(req);
                match await_head(response, upload.map(|u| &**u), timeout).await {
                    Err(()) => {
                        conn.close();
                        Err(SendError::Final(response_timeout(target)))
                    }
                    Ok(Ok(r)) => {
                        self.pool.put_h1(target, conn);
                        Ok(r.map(UpstreamBody::Hyper))
                    }
                    Ok(Err(mut e)) => {
                        conn.close();
                        let back = e.take_message();
                        let err = classify_hyper_error(target, e.error());
                        Err(match err.kind {
                            ErrorKind::UpstreamBadResponse
                            | ErrorKind::UpstreamResponseHeadTooLarge => SendError::Final(err),
                            _ if back.is_some() => SendError::Unsent(err, back.map(Box::new)),
                            _ if e.error().is_canceled() => SendError::Unsent(err, None),
                            _ => SendError::NoResponse(err),
                        })
                    }
                }
            }
            Sender::H2(conn, open) => conn.send_counted(open, target, req, upload, timeout).await,
        }
    }

    /// Opens a new connection to `target` (not pooled yet: an HTTP/1.1 one is pooled when
    /// it takes its request, an HTTP/2 one by [`pool::Dialing::finish`]).
    async fn connect(&self, target: &Target) -> Result<Sender, ProxyError> {
        let slot = self.connection_slot(target).await?;
        let (io, h2) = self.dial(target, &self.tls).await?;
        let handshake_err = |e: &dyn std::fmt::Display| {
            ProxyError::new(
                ErrorKind::UpstreamTlsProtocol,
                format!("HTTP handshake with {}: {e}", target.host),
            )
        };
        if h2 {
            let conn = H2Conn::handshake(
                io,
                self.settings.max_header_bytes,
                slot,
                self.streams.clone(),
            )
            .await
            .map_err(|e| handshake_err(&e))?;
            let open = conn.open_stream();
            Ok(Sender::H2(conn, open))
        } else {
            let (sender, conn) = self
                .h1_builder()
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| handshake_err(&e))?;
            let task = tokio::spawn(async move {
                let _slot = slot;
                let _ = conn.await;
            });
            Ok(Sender::H1(H1Conn {
                send: sender,
                task: task.abort_handle(),
            }))
        }
    }
}

/// A bodiless copy of a request for the one replay of SPEC §4.3.
fn copy_bodiless(req: &Request<ProxyBody>) -> Request<ProxyBody> {
    let mut copy = Request::new(crate::error::empty_body());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

fn response_timeout(target: &Target) -> ProxyError {
    ProxyError::new(
        ErrorKind::UpstreamResponseTimeout,
        format!("{} sent no response head in time", target.host),
    )
}

/// What a failed send leaves to do (SPEC §4.3).
enum AfterFailure {
    /// Nothing of the request went out and it came back whole: another connection takes it.
    Resend(ProxyError, Box<Request<ProxyBody>>),
    /// A bodiless idempotent request failed on a reused connection before any response
    /// byte: sent once more, on a new connection.
    Replay(ProxyError),
    /// Anything else is never sent again.
    GiveUp(ProxyError),
}

fn after_failure(e: SendError, reused: bool, replayable: bool) -> AfterFailure {
    match e {
        SendError::Unsent(e, Some(back)) => AfterFailure::Resend(e, back),
        SendError::Unsent(e, None) | SendError::NoResponse(e) if reused && replayable => {
            AfterFailure::Replay(e)
        }
        e => AfterFailure::GiveUp(e.into_proxy()),
    }
}

/// How a send failed: before the request went out (with the request back when nothing
/// of it was consumed), after it went out but before any response byte, or otherwise (a
/// bad response head, a timeout): only the first two may be tried again.
enum SendError {
    Unsent(ProxyError, Option<Box<Request<ProxyBody>>>),
    NoResponse(ProxyError),
    Final(ProxyError),
}

impl SendError {
    fn into_proxy(self) -> ProxyError {
        match self {
            SendError::Unsent(e, _) | SendError::NoResponse(e) | SendError::Final(e) => e,
        }
    }
}

fn classify_hyper_error(target: &Target, e: &hyper::Error) -> ProxyError {
    let kind = if e.is_parse_too_large() {
        ErrorKind::UpstreamResponseHeadTooLarge
    } else if e.is_parse() || e.is_parse_status() {
        ErrorKind::UpstreamBadResponse
    } else {
        ErrorKind::UpstreamUnavailable
    };
    let mut reason = format!("{} failed: {e}", target.host);
    if let Some(src) = std::error::Error::source(e) {
        reason.push_str(&format!(" ({src})"));
    }
    ProxyError::new(kind, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err() -> ProxyError {
        ProxyError::new(ErrorKind::UpstreamUnavailable, "reset")
    }

    #[test]
    fn only_a_request_that_never_went_out_or_a_replayable_one_on_a_reused_connection_is_sent_again()
    {
        let unsent_whole = || {
            SendError::Unsent(
                err(),
                Some(Box::new(Request::new(crate::error::empty_body()))),
            )
        };
        let kind = |a: AfterFailure| match a {
            AfterFailure::Resend(..) => "resend",
            AfterFailure::Replay(_) => "replay",
            AfterFailure::GiveUp(_) => "give up",
        };
        // (failure, reused, replayable) -> what follows
        let table: Vec<(SendError, bool, bool, &str)> = vec![
            (unsent_whole(), false, false, "resend"),
            (unsent_whole(), true, false, "resend"),
            (SendError::Unsent(err(), None), true, true, "replay"),
            (SendError::NoResponse(err()), true, true, "replay"),
            // A body, or a method that is not idempotent: never replayed.
            (SendError::Unsent(err(), None), true, false, "give up"),
            (SendError::NoResponse(err()), true, false, "give up"),
            // A new connection that failed is not a stale pooled one.
            (SendError::NoResponse(err()), false, true, "give up"),
            (SendError::Unsent(err(), None), false, true, "give up"),
            // A timeout or a bad response head came after the request went out.
            (SendError::Final(err()), true, true, "give up"),
            (SendError::Final(err()), false, false, "give up"),
        ];
        for (i, (e, reused, replayable, want)) in table.into_iter().enumerate() {
            assert_eq!(kind(after_failure(e, reused, replayable)), want, "row {i}");
        }
    }
}
