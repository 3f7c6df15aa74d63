//! Connections to upstreams: resolution and address checks, verified TLS, and a pool of
//! client connections: one multiplexed HTTP/2 connection where the upstream offers h2
//! (driven by `h2` directly, see [`H2Conn`]), kept-alive hyper HTTP/1.1 ones otherwise.
//!
//! The pool is our own, over hyper's connection API, rather than hyper-util's legacy
//! client, because the contract needs what that client hides: whether a request went out
//! on a reused connection (a bodiless idempotent request that fails there is retried once
//! on a new one, and nothing else ever is), connections keyed by whether the route may
//! reach private addresses, and errors we can name precisely (DNS, refused, TLS
//! certificate, timeout) for `Proxy-Status`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::chain::{NoProxy, ProxyUrl};
use crate::destination;
use crate::error::{ErrorKind, ProxyBody, ProxyError};
use crate::readahead::ReadAhead;
use crate::routes::Host;

/// How long an idle pooled connection is kept, and how many HTTP/1.1 connections (in use
/// or idle) are kept per upstream.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const POOL_MAX_H1_PER_KEY: usize = 64;
/// Keep-alive pings on an HTTP/2 upstream connection with requests open: how often, and
/// how long an answer may take.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest HTTP/2 DATA frame an upstream may send us (SETTINGS_MAX_FRAME_SIZE).
const UPSTREAM_MAX_FRAME_SIZE: u32 = 64 * 1024;

/// Operator-pinned addresses (`--resolve HOST:PORT:ADDR`), trusted as given.
pub type ResolveMap = HashMap<(Host, u16), Vec<IpAddr>>;

/// What the upstream side needs from the configuration.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
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
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
    pub tls: bool,
    pub allow_private: bool,
}

impl Target {
    /// `host[:port]` as it goes in a `Host` header or an absolute URI (port omitted when
    /// it is the scheme's default).
    pub fn authority(&self) -> String {
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

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(H2Conn),
}

/// An HTTP/2 connection to an upstream, driven by `h2` directly rather than through
/// hyper's client: hyper's spawns a task per request (a future the size of its largest
/// variant, the whole connection) and passes each request and response through a channel
/// and two one-shot channels; here the request's own task sends it and is woken by the
/// response (docs/benchmarks.md: 64,500 -> 57,700 instructions a keep-alive request).
#[derive(Clone)]
struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    shared: Arc<H2Shared>,
}

#[derive(Default)]
struct H2Shared {
    /// Set when the connection's driver has ended.
    closed: AtomicBool,
    /// Requests sent and not yet finished (response body read or dropped): the
    /// keep-alive pings run only while there are some, as hyper's did.
    open_streams: AtomicUsize,
}

impl H2Conn {
    fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Counts a request as open until the returned guard is dropped.
    fn open_stream(&self) -> OpenStream {
        self.shared.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.shared.clone())
    }
}

/// One open request on an [`H2Conn`], until dropped.
pub struct OpenStream(Arc<H2Shared>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Drives an HTTP/2 connection until it ends. While requests are open on it, the
/// upstream is pinged after every [`H2_KEEPALIVE_INTERVAL`]; no answer within
/// [`H2_KEEPALIVE_TIMEOUT`] closes the connection, so that its streams fail and the pool
/// stops handing it out (a silent upstream is otherwise only noticed by the body silence
/// timeout, minutes later).
async fn drive_h2(mut conn: h2::client::Connection<BoxedIo, Bytes>, shared: Arc<H2Shared>) {
    // The pings run in a task of their own, so that the connection's own wake-ups (one
    // per frame in a transfer) do not poll their timer too.
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(mut pings) = conn.ping_pong() {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(H2_KEEPALIVE_INTERVAL).await;
                if shared.closed.load(Ordering::Relaxed) {
                    return;
                }
                if shared.open_streams.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let pong =
                    tokio::time::timeout(H2_KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque()));
                if !matches!(pong.await, Ok(Ok(_))) {
                    tracing::debug!(
                        "HTTP/2 upstream did not answer a ping; closing the connection"
                    );
                    let _ = gone_tx.send(());
                    return;
                }
            }
        });
    }
    tokio::select! {
        biased;
        _ = conn => {}
        // Only a sent signal: a dropped sender (no pings to run) is not a reason to close.
        Ok(()) = gone_rx => {}
    }
    shared.closed.store(true, Ordering::Relaxed);
}

/// A response body from either client.
pub enum UpstreamBody {
    Hyper(Incoming),
    /// The stream, whether its data has ended (trailers may follow), and its count in
    /// the connection's open requests.
    H2(h2::RecvStream, bool, OpenStream),
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = crate::error::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        match self.get_mut() {
            UpstreamBody::Hyper(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as crate::error::BoxError),
            UpstreamBody::H2(recv, data_done, _) => {
                if !*data_done {
                    match recv.poll_data(cx) {
                        Poll::Ready(Some(Ok(data))) => {
                            let _ = recv.flow_control().release_capacity(data.len());
                            return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                        Poll::Ready(None) => *data_done = true,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                match recv.poll_trailers(cx) {
                    Poll::Ready(Ok(Some(t))) => {
                        Poll::Ready(Some(Ok(hyper::body::Frame::trailers(t))))
                    }
                    Poll::Ready(Ok(None)) => Poll::Ready(None),
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::H2(r, _, _) => r.is_end_stream(),
        }
    }
}

#[derive(Default)]
struct PoolSlot {
    h2: Option<H2Conn>,
    /// HTTP/1.1 connections, in use or idle, each with when it last took a request. One
    /// in use is not ready until its response has been read to the end, so it stays here
    /// rather than coming back from a task that waits for that.
    h1: Vec<(http1::SendRequest<ProxyBody>, Instant)>,
}

#[derive(Default)]
struct Pool {
    slots: Mutex<HashMap<Target, PoolSlot>>,
}

impl Pool {
    fn checkout(&self, target: &Target) -> Option<Sender> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.get_mut(target)?;
        if let Some(h2) = &slot.h2 {
            if !h2.is_closed() {
                return Some(Sender::H2(h2.clone()));
            }
            slot.h2 = None;
        }
        // An idle connection: ready for its next request, and not idle for too long.
        // Closed ones and idle ones past their time are dropped on the way.
        let mut now = None;
        let mut i = 0;
        while i < slot.h1.len() {
            let (sender, since) = &slot.h1[i];
            if !sender.is_closed() && !sender.is_ready() {
                i += 1;
                continue;
            }
            let fresh = sender.is_ready()
                && now.get_or_insert_with(Instant::now).duration_since(*since) < POOL_IDLE_TIMEOUT;
            let (sender, _) = slot.h1.swap_remove(i);
            if fresh {
                return Some(Sender::H1(sender));
            }
        }
        None
    }

    /// Keeps an HTTP/1.1 connection that has just taken a request.
    fn put_h1(&self, target: &Target, sender: http1::SendRequest<ProxyBody>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(target.clone()).or_default();
        if slot.h1.len() < POOL_MAX_H1_PER_KEY {
            slot.h1.push((sender, Instant::now()));
        }
    }

    fn put_h2(&self, target: &Target, sender: &H2Conn) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(target.clone()).or_default();
        if slot.h2.as_ref().is_none_or(|s| s.is_closed()) {
            slot.h2 = Some(sender.clone());
        }
    }

    /// Drops closed connections, idle ones past their time, and slots left empty.
    fn reap(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| {
            slot.h1.retain(|(s, since)| {
                let idle_too_long = s.is_ready() && since.elapsed() >= POOL_IDLE_TIMEOUT;
                !(s.is_closed() || idle_too_long)
            });
            if slot.h2.as_ref().is_some_and(|s| s.is_closed()) {
                slot.h2 = None;
            }
            slot.h2.is_some() || !slot.h1.is_empty()
        });
    }
}

/// The upstream side of the proxy: shared by every tunnel.
pub struct Upstream {
    settings: UpstreamSettings,
    /// ALPN `h2`, `http/1.1`: ordinary requests.
    tls: TlsConnector,
    /// ALPN `http/1.1` only: WebSocket upgrades, which need HTTP/1.1.
    tls_h1: TlsConnector,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the TLS client configurations: public roots plus `extra_roots`, nothing else.
    pub fn new(settings: UpstreamSettings) -> Result<Upstream, String> {
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
            settings,
            pool: Arc::new(Pool::default()),
        })
    }

    /// Starts the task that drops idle pooled connections; it ends with the `Upstream`.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak: Weak<Upstream> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(up) => up.pool.reap(),
                    None => return,
                }
            }
        });
    }

    /// Sends `req` (origin-form URI, `Host` header set) to `target`. When `replayable`
    /// (bodiless and idempotent) and it fails on a reused connection before any response
    /// byte arrived, it is sent once more on a new connection.
    pub async fn send(
        &self,
        target: &Target,
        req: Request<ProxyBody>,
        replayable: bool,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        if let Some(sender) = self.pool.checkout(target) {
            let copy = replayable.then(|| copy_bodiless(&req));
            match (self.send_on(target, sender, req).await, copy) {
                (Ok(r), _) => return Ok(r),
                (Err(SendError::Unsent(e) | SendError::NoResponse(e)), Some(copy)) => {
                    tracing::debug!(host = %target.host, error = %e, "reused upstream connection failed; retrying once on a new one");
                    let sender = self.connect(target).await?;
                    return self
                        .send_on(target, sender, copy)
                        .await
                        .map_err(SendError::into_proxy);
                }
                (Err(e), _) => return Err(e.into_proxy()),
            }
        }
        let sender = self.connect(target).await?;
        self.send_on(target, sender, req)
            .await
            .map_err(SendError::into_proxy)
    }

    /// Sends a WebSocket upgrade request over a new HTTP/1.1 connection that supports
    /// upgrades; the caller joins the two upgraded streams.
    pub async fn send_upgrade(
        &self,
        target: &Target,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
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
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let sent =
            tokio::time::timeout(self.settings.response_timeout, sender.send_request(req)).await;
        match sent {
            Err(_) => Err(response_timeout(target)),
            Ok(Err(e)) => Err(classify_hyper_error(target, &e)),
            Ok(Ok(r)) => Ok(r),
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
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let timeout = self.settings.response_timeout;
        match sender {
            Sender::H1(mut s) => {
                // A pooled connection was checked out ready, and a new one takes its
                // first request unasked; the response future does not hold the sender,
                // which goes back to the pool at once (not ready until this response
                // has been read to its end).
                let response = s.send_request(req);
                self.pool.put_h1(target, s);
                finish(target, tokio::time::timeout(timeout, response).await)
                    .map(|r| r.map(UpstreamBody::Hyper))
            }
            Sender::H2(s) => {
                // HTTP/2 carries the authority in the URI (`:authority`), not in `Host`.
                let host = req.headers_mut().remove(http::header::HOST);
                let authority = match host.as_ref().and_then(|h| h.to_str().ok()) {
                    Some(h) => Authority::try_from(h),
                    None => Authority::try_from(target.authority()),
                };
                // From parts rather than a formatted string parsed again: every request
                // to an HTTP/2 upstream goes through here.
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(if target.tls {
                    Scheme::HTTPS
                } else {
                    Scheme::HTTP
                });
                uri.path_and_query = Some(
                    req.uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/")),
                );
                let bad_target = |e: &dyn std::fmt::Display| {
                    SendError::Unsent(ProxyError::new(
                        ErrorKind::BadRequest,
                        format!("request target: {e}"),
                    ))
                };
                uri.authority = Some(authority.map_err(|e| bad_target(&e))?);
                *req.uri_mut() = Uri::from_parts(uri).map_err(|e| bad_target(&e))?;
                let unavailable = |e: h2::Error| {
                    ProxyError::new(
                        ErrorKind::UpstreamUnavailable,
                        format!("HTTP/2 connection to {}: {e}", target.host),
                    )
                };
                let open = s.open_stream();
                let mut send = match s.send.ready().await {
                    Ok(send) => send,
                    Err(e) => return Err(SendError::Unsent(unavailable(e))),
                };
                let (parts, body) = req.into_parts();
                let eos = hyper::body::Body::is_end_stream(&body);
                let (response, stream) = send
                    .send_request(Request::from_parts(parts, ()), eos)
                    .map_err(|e| SendError::Unsent(unavailable(e)))?;
                if !eos {
                    tokio::spawn(pipe_body(body, stream));
                }
                match tokio::time::timeout(timeout, response).await {
                    Err(_) => Err(SendError::Final(response_timeout(target))),
                    Ok(Err(e)) => Err(SendError::NoResponse(unavailable(e))),
                    Ok(Ok(r)) => {
                        let (parts, recv) = r.into_parts();
                        Ok(Response::from_parts(
                            parts,
                            UpstreamBody::H2(recv, false, open),
                        ))
                    }
                }
            }
        }
    }

    /// Opens a new pooled connection to `target`.
    async fn connect(&self, target: &Target) -> Result<Sender, ProxyError> {
        let (io, h2) = self.dial(target, &self.tls).await?;
        let handshake_err = |e: &dyn std::fmt::Display| {
            ProxyError::new(
                ErrorKind::UpstreamTlsProtocol,
                format!("HTTP handshake with {}: {e}", target.host),
            )
        };
        if h2 {
            // hyper's client settings, which this replaces: 2 MiB stream and 5 MiB
            // connection windows, 1 MiB of send buffer, 100 streams before the upstream's
            // SETTINGS arrive, no server push.
            let mut b = h2::client::Builder::new();
            b.initial_window_size(2 * 1024 * 1024)
                .initial_connection_window_size(5 * 1024 * 1024)
                // Lets the upstream send DATA frames of up to 64 KiB instead of 16 KiB:
                // each frame is one body chunk relayed to the agent, so a download costs a
                // quarter of the per-chunk work (docs/benchmarks.md).
                .max_frame_size(UPSTREAM_MAX_FRAME_SIZE)
                .max_header_list_size(self.settings.max_header_bytes as u32)
                .max_send_buffer_size(1024 * 1024)
                .initial_max_send_streams(100)
                .enable_push(false);
            let (send, conn) = b
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|e| handshake_err(&e))?;
            let shared = Arc::new(H2Shared::default());
            tokio::spawn(drive_h2(conn, shared.clone()));
            let sender = H2Conn { send, shared };
            self.pool.put_h2(target, &sender);
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = self
                .h1_builder()
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| handshake_err(&e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(sender))
        }
    }

    /// Reaches `target` (directly, or through the upstream proxy unless `NO_PROXY`
    /// matches) and, for TLS targets, completes a verified handshake, all within the
    /// connect timeout. Returns the stream and whether ALPN chose HTTP/2.
    async fn dial(
        &self,
        target: &Target,
        tls: &TlsConnector,
    ) -> Result<(BoxedIo, bool), ProxyError> {
        let work = async {
            let via = self
                .settings
                .proxy
                .as_ref()
                .filter(|_| !self.settings.no_proxy.matches(&target.host, target.port));
            let io: BoxedIo = match via {
                Some(proxy) => Box::new(self.tunnel_through(proxy, target).await?),
                None => {
                    let addrs = self.resolve(target).await?;
                    Box::new(connect_any(target, &addrs).await?)
                }
            };
            if !target.tls {
                return Ok((io, false));
            }
            let stream = tls
                .connect(server_name(&target.host)?, ReadAhead::new(io))
                .await
                .map_err(|e| classify_tls_error(target, &e))?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok((Box::new(stream) as BoxedIo, h2))
        };
        tokio::time::timeout(self.settings.connect_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::new(
                    ErrorKind::UpstreamConnectTimeout,
                    format!(
                        "connecting to {}:{} took longer than {}s",
                        target.host,
                        target.port,
                        self.settings.connect_timeout.as_secs_f64()
                    ),
                ))
            })
    }

    /// Opens a CONNECT tunnel to `target` through the upstream proxy, naming the target
    /// by hostname. Any failure to get a 2xx from the proxy is `upstream_proxy_refused`.
    async fn tunnel_through(
        &self,
        proxy: &ProxyUrl,
        target: &Target,
    ) -> Result<TokioIo<Upgraded>, ProxyError> {
        let refused = |received: Option<u16>, why: String| {
            ProxyError::new(
                ErrorKind::UpstreamProxyRefused { received },
                format!(
                    "upstream proxy {proxy} for {}:{}: {why}",
                    target.host, target.port
                ),
            )
        };
        let addrs = match self.settings.resolve.get(&(proxy.host.clone(), proxy.port)) {
            Some(pinned) => pinned
                .iter()
                .map(|ip| SocketAddr::new(*ip, proxy.port))
                .collect(),
            None => match &proxy.host {
                Host::Ip(ip) => vec![SocketAddr::new(*ip, proxy.port)],
                Host::Name(name) => tokio::net::lookup_host((name.as_str(), proxy.port))
                    .await
                    .map_err(|e| refused(None, format!("cannot resolve the proxy: {e}")))?
                    .collect(),
            },
        };
        let mut tcp = None;
        let mut last_error = String::from("no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    tcp = Some(s);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        let tcp = tcp.ok_or_else(|| refused(None, format!("cannot connect: {last_error}")))?;
        let io: BoxedIo = if proxy.tls {
            let stream = self
                .tls_h1
                .connect(server_name(&proxy.host)?, tcp)
                .await
                .map_err(|e| {
                    let mut err = classify_tls_error(target, &e);
                    err.reason = format!("TLS with upstream proxy {proxy}: {e}");
                    err
                })?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) = http1::Builder::new()
            .handshake::<_, ProxyBody>(TokioIo::new(io))
            .await
            .map_err(|e| refused(None, e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let authority = format!("{}:{}", target.host.authority_form(), target.port);
        let mut connect = Request::new(crate::error::empty_body());
        *connect.method_mut() = http::Method::CONNECT;
        *connect.uri_mut() =
            Uri::try_from(authority.as_str()).map_err(|e| refused(None, e.to_string()))?;
        if let Ok(v) = http::HeaderValue::from_str(&authority) {
            connect.headers_mut().insert(http::header::HOST, v);
        }
        if let Some(auth) = &proxy.authorization {
            connect
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
        let response = sender
            .send_request(connect)
            .await
            .map_err(|e| refused(None, format!("closed before answering the CONNECT: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(refused(
                Some(status.as_u16()),
                format!("answered the CONNECT with {status}"),
            ));
        }
        hyper::upgrade::on(response)
            .await
            .map(TokioIo::new)
            .map_err(|e| refused(Some(status.as_u16()), format!("tunnel failed: {e}")))
    }

    /// The addresses to dial: the operator's pin, the IP literal, or DNS answers, each
    /// checked against the destination rules (a pin is trusted as given).
    async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, ProxyError> {
        let own = &self.settings.own_listeners;
        let refuse = |addr: SocketAddr, why: destination::Refused| {
            ProxyError::new(
                ErrorKind::DestinationNotAllowed,
                format!(
                    "{} resolves to {}, {}",
                    target.host,
                    addr.ip(),
                    why.describe()
                ),
            )
        };
        if let Some(pinned) = self
            .settings
            .resolve
            .get(&(target.host.clone(), target.port))
        {
            let addrs: Vec<SocketAddr> = pinned
                .iter()
                .map(|ip| SocketAddr::new(*ip, target.port))
                .collect();
            for a in &addrs {
                if destination::is_own_listener(*a, own) {
                    return Err(refuse(*a, destination::Refused::OwnListener));
                }
            }
            return Ok(addrs);
        }
        let addrs: Vec<SocketAddr> = match &target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(|e| {
                    ProxyError::new(
                        ErrorKind::UpstreamDns,
                        format!("cannot resolve {name}: {e}"),
                    )
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(ProxyError::new(
                ErrorKind::UpstreamDns,
                format!("{} has no address", target.host),
            ));
        }
        // Every answer is checked: one private address among public ones is refused
        // rather than skipped, since a rebinding answer has no business in a public name.
        for a in &addrs {
            destination::check(*a, target.allow_private, own).map_err(|why| refuse(*a, why))?;
        }
        Ok(addrs)
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

async fn connect_any(target: &Target, addrs: &[SocketAddr]) -> Result<TcpStream, ProxyError> {
    let mut last: Option<io::Error> = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"));
    let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
        ErrorKind::UpstreamRefused
    } else {
        ErrorKind::UpstreamUnavailable
    };
    Err(ProxyError::new(
        kind,
        format!("cannot connect to {}:{}: {e}", target.host, target.port),
    ))
}

fn classify_tls_error(target: &Target, e: &io::Error) -> ProxyError {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let kind = match tls {
        Some(rustls::Error::InvalidCertificate(_))
        | Some(rustls::Error::NoCertificatesPresented) => ErrorKind::UpstreamTlsCertificate,
        _ => ErrorKind::UpstreamTlsProtocol,
    };
    ProxyError::new(kind, format!("TLS with {}: {e}", target.host))
}

fn response_timeout(target: &Target) -> ProxyError {
    ProxyError::new(
        ErrorKind::UpstreamResponseTimeout,
        format!("{} sent no response head in time", target.host),
    )
}

/// How a send failed: before the request went out, after it went out but before any
/// response byte, or otherwise (a bad response head, a timeout): only the first two may
/// be replayed.
enum SendError {
    Unsent(ProxyError),
    NoResponse(ProxyError),
    Final(ProxyError),
}

impl SendError {
    fn into_proxy(self) -> ProxyError {
        match self {
            SendError::Unsent(e) | SendError::NoResponse(e) | SendError::Final(e) => e,
        }
    }
}

fn finish(
    target: &Target,
    result: Result<Result<Response<Incoming>, hyper::Error>, tokio::time::error::Elapsed>,
) -> Result<Response<Incoming>, SendError> {
    match result {
        Err(_) => Err(SendError::Final(response_timeout(target))),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => {
            let err = classify_hyper_error(target, &e);
            Err(match err.kind {
                ErrorKind::UpstreamBadResponse | ErrorKind::UpstreamResponseHeadTooLarge => {
                    SendError::Final(err)
                }
                _ if e.is_canceled() => SendError::Unsent(err),
                _ => SendError::NoResponse(err),
            })
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

/// Any upstream stream: TCP, TLS over TCP, or either inside an upstream proxy's tunnel.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxedIo = Box<dyn Io>;

fn server_name(host: &Host) -> Result<ServerName<'static>, ProxyError> {
    match host {
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        Host::Name(n) => ServerName::try_from(n.clone()).map_err(|e| {
            ProxyError::new(
                ErrorKind::UpstreamTlsProtocol,
                format!("{n} is not a TLS server name: {e}"),
            )
        }),
    }
}

/// Copies a request body into its HTTP/2 stream, its trailers too, as hyper's client
/// does: each chunk is handed to h2 whole once the stream has any send window, and h2
/// frames it as the window opens (so at most about one chunk waits in memory). Stops if
/// the upstream resets the stream, and resets it if the agent's body fails, so that a
/// cut upload never arrives as a complete one.
async fn pipe_body(mut body: ProxyBody, mut stream: h2::SendStream<Bytes>) {
    use std::task::Poll;
    loop {
        // Some window first, unless the upstream resets the stream meanwhile.
        stream.reserve_capacity(1);
        while stream.capacity() == 0 {
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                _ => return,
            }
        }
        // The next frame, unless the upstream resets the stream first (it may answer
        // before the upload ends and want no more of it).
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) =
                hyper::body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
            {
                return Poll::Ready(Some(frame));
            }
            match stream.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let frame = match next {
            None => return,
            Some(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(_))) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let last = hyper::body::Body::is_end_stream(&body);
                if stream.send_data(data, last).is_err() || last {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}
