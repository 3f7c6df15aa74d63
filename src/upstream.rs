//! Connections to upstreams: resolution and address checks, verified TLS, and a pool of
//! hyper client connections (HTTP/2 where the upstream offers it, kept-alive HTTP/1.1
//! otherwise).
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
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
    H2(http2::SendRequest<ProxyBody>),
}

#[derive(Default)]
struct PoolSlot {
    h2: Option<http2::SendRequest<ProxyBody>>,
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

    fn put_h2(&self, target: &Target, sender: &http2::SendRequest<ProxyBody>) {
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
    ) -> Result<Response<Incoming>, ProxyError> {
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
    ) -> Result<Response<Incoming>, SendError> {
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
            }
            Sender::H2(mut s) => {
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
                if s.ready().await.is_err() {
                    return Err(SendError::Unsent(ProxyError::new(
                        ErrorKind::UpstreamUnavailable,
                        format!("HTTP/2 connection to {} closed", target.host),
                    )));
                }
                finish(
                    target,
                    tokio::time::timeout(timeout, s.send_request(req)).await,
                )
            }
        }
    }

    /// Opens a new pooled connection to `target`.
    async fn connect(&self, target: &Target) -> Result<Sender, ProxyError> {
        let (io, h2) = self.dial(target, &self.tls).await?;
        let io = TokioIo::new(io);
        let handshake_err = |e: hyper::Error| {
            ProxyError::new(
                ErrorKind::UpstreamTlsProtocol,
                format!("HTTP handshake with {}: {e}", target.host),
            )
        };
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(self.settings.max_header_bytes as u32)
                // Lets the upstream send DATA frames of up to 64 KiB instead of 16 KiB:
                // each frame is one body chunk relayed to the agent, so a download costs a
                // quarter of the per-chunk work (docs/benchmarks.md).
                .max_frame_size(UPSTREAM_MAX_FRAME_SIZE)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20))
                .handshake(io)
                .await
                .map_err(handshake_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.pool.put_h2(target, &sender);
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = self
                .h1_builder()
                .handshake(io)
                .await
                .map_err(handshake_err)?;
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
