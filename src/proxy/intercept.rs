//! Inside an allowed CONNECT: TLS with the agent under a leaf for exactly the CONNECT
//! host, then an HTTP/1.1 or HTTP/2 server (as the agent's ALPN chose) whose every
//! request goes to [`super::forward::intercepted`].
//!
//! The leaf is for the CONNECT host only, chosen (minted, the first time) as soon as the
//! tunnel opens, while the agent builds its ClientHello. An SNI naming another host is
//! refused with a TLS `unrecognized_name` alert, and no leaf is ever minted for it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

use super::forward::{self, Tunnel};
use super::framing::{HeadLog, Sniffed};
use super::observe::{IoObserver, Observed};
use super::{ClientConn, drive_connection};
use crate::audit::ConnectEvent;
use crate::ca::CaError;
use crate::error::{ErrorKind, ProxyBody};
use crate::metrics::TLS_HANDSHAKE_FAILED;
use crate::policy::Authority;
use crate::routes::Host;

/// A fatal `unrecognized_name` alert (RFC 6066 §3), as a plaintext TLS record: what a
/// server sends when the SNI names a host it does not serve.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Why a tunnel ended before serving HTTP.
enum TlsFailure {
    /// SNI named another host.
    Misdirected(String),
    Handshake(String),
}

/// Serves an upgraded CONNECT stream until the agent or the idle timeout closes it, then
/// logs the one `connect` event with what the tunnel carried. `reported`: opened only
/// because of report mode, with what enforce mode would have refused it with.
pub(crate) async fn run(
    upgraded: Upgraded,
    authority: Authority,
    reported: Option<ErrorKind>,
    conn: ClientConn,
    started: Instant,
) {
    let counters = Arc::new(Counters::default());
    let io = Observed::new(TokioIo::new(upgraded), counters.clone());
    let state = conn.state.clone();
    // The leaf is chosen (minted, for a host seen for the first time) now, while the
    // agent, which has just read the 200, builds its ClientHello: the mint overlaps the
    // agent's own work instead of adding to its handshake. Only the CONNECT host, which
    // the routes allowed (or report mode let through), can get a leaf; the SNI is
    // checked against it below.
    let leaf = state.leaves.server_config(&authority.host);
    // Boxed, like the TLS stream it returns and the HTTP server below: a task's future is
    // allocated whole for the life of the tunnel, so neither the handshake's state nor a
    // copy of a moved value may sit inline in it (every idle tunnel would keep them;
    // docs/decisions.md).
    let handshake = tokio::time::timeout(
        state.limits.client_timeout,
        Box::pin(accept_tls(io, &authority.host, leaf)),
    );
    // A tunnel with no request yet is idle: a shutdown closes it at once (SPEC §5)
    // instead of waiting out the client timeout for a ClientHello.
    let handshake = tokio::select! {
        done = handshake => done
            .unwrap_or_else(|_| Err(TlsFailure::Handshake("TLS handshake timed out".into()))),
        _ = state.shutdown_begun() => Err(TlsFailure::Handshake("the proxy is shutting down".into())),
    };
    let metrics = state.metrics.clone();
    let outcome = match handshake {
        Err(f) => Some(f),
        Ok(tls) => {
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let tunnel = Arc::new(Tunnel {
                conn: conn.clone(),
                authority: authority.clone(),
                head_log: (!h2).then(|| HeadLog::new(state.limits.max_header_bytes + 8192)),
            });
            metrics.open_tunnels.inc();
            if h2 {
                serve_http2(tls, tunnel).await;
            } else {
                serve_http1(tls, tunnel).await;
            }
            metrics.open_tunnels.dec();
            None
        }
    };
    let (decision, reason, status, detail, sni) = match (&outcome, reported) {
        (Some(TlsFailure::Misdirected(sni)), _) => {
            ("deny", Some("misdirected"), 421, None, Some(sni.as_str()))
        }
        // A reported tunnel is counted as reported whatever it carried; a failed
        // handshake is its detail.
        (outcome, Some(would_refuse)) => {
            let detail = match outcome {
                Some(TlsFailure::Handshake(why)) => Some(why.as_str()),
                _ => None,
            };
            ("report", Some(would_refuse.code()), 200, detail, None)
        }
        (None, None) => ("allow", None, 200, None, None),
        (Some(TlsFailure::Handshake(why)), None) => (
            "allow",
            Some(TLS_HANDSHAKE_FAILED),
            200,
            Some(why.as_str()),
            None,
        ),
    };
    metrics.count_connect(decision, reason.unwrap_or("ok"));
    let host = authority.host.to_string();
    ConnectEvent {
        conn: conn.id,
        client: &conn.client_text,
        host: &host,
        port: authority.port,
        decision,
        reason,
        detail,
        sni,
        status,
        bytes_up: counters.read.load(Ordering::Relaxed),
        bytes_down: counters.written.load(Ordering::Relaxed),
        duration_ms: started.elapsed().as_millis() as u64,
    }
    .log();
}

/// The request handler of a tunnel's HTTP server. Each request's future is boxed: hyper
/// keeps room for one in-flight service future per connection for as long as the
/// connection lives, and the forwarding future (upstream dial and TLS included) is
/// several KiB, which an idle tunnel would otherwise hold.
fn tunnel_service(
    tunnel: Arc<Tunnel>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = BoxedResponse,
> + Clone {
    service_fn(move |req| {
        let tunnel = tunnel.clone();
        Box::pin(async move { Ok(forward::intercepted(req, tunnel).await) }) as BoxedResponse
    })
}

type BoxedResponse = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

async fn serve_http2<IO>(tls: Box<TlsStream<IO>>, tunnel: Arc<Tunnel>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &tunnel.conn.state.limits;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(None);
    let conn =
        Box::pin(builder.serve_connection(TokioIo::new(tls), tunnel_service(tunnel.clone())));
    drive(conn, |c| c.graceful_shutdown(), &tunnel).await;
}

async fn serve_http1<IO>(tls: Box<TlsStream<IO>>, tunnel: Arc<Tunnel>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &tunnel.conn.state.limits;
    let builder = limits.http1_server(limits.idle_timeout);
    let log = tunnel.head_log.clone().unwrap_or_else(|| HeadLog::new(0));
    let io = TokioIo::new(Sniffed::new(tls, log));
    let conn = Box::pin(
        builder
            .serve_connection(io, tunnel_service(tunnel.clone()))
            .with_upgrades(),
    );
    drive(conn, |c| c.graceful_shutdown(), &tunnel).await;
}

/// Serves a tunnel's HTTP connection until the agent closes it, it stays idle too long or
/// the proxy shuts down.
async fn drive<C, G>(conn: Pin<Box<C>>, graceful: G, tunnel: &Tunnel)
where
    C: Future,
    G: Fn(Pin<&mut C>),
{
    let state = &tunnel.conn.state;
    let idle = state.limits.idle_timeout;
    drive_connection(
        conn,
        graceful,
        &tunnel.conn.activity,
        idle,
        state.shutdown_signal(),
    )
    .await;
}

/// Reads the ClientHello, checks its SNI against the CONNECT host, and completes the
/// handshake with that host's leaf.
async fn accept_tls<IO>(
    mut io: IO,
    host: &Host,
    leaf: Result<Arc<ServerConfig>, CaError>,
) -> Result<Box<TlsStream<IO>>, TlsFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = vec![0u8; 8192];
    let accepted = loop {
        let n = io
            .read(&mut buf)
            .await
            .map_err(|e| TlsFailure::Handshake(format!("reading ClientHello: {e}")))?;
        if n == 0 {
            return Err(TlsFailure::Handshake("closed before TLS".into()));
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(TlsFailure::Handshake(format!("not TLS: {e}"))),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => continue,
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = io.write_all(&out).await;
                return Err(TlsFailure::Handshake(format!("bad ClientHello: {e}")));
            }
        }
    };
    if let Some(sni) = accepted.client_hello().server_name()
        && Host::parse(sni).ok().as_ref() != Some(host)
    {
        let sni: String = sni
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
        let _ = io.shutdown().await;
        return Err(TlsFailure::Misdirected(sni));
    }
    let config = leaf.map_err(|e| TlsFailure::Handshake(e.to_string()))?;
    StartHandshake::from_parts(accepted, io)
        .into_stream(config)
        .await
        .map(Box::new)
        .map_err(|e| TlsFailure::Handshake(e.to_string()))
}

/// Bytes each way through a tunnel, as the agent's TCP connection saw them.
#[derive(Debug, Default)]
struct Counters {
    read: AtomicU64,
    written: AtomicU64,
}

impl IoObserver for Arc<Counters> {
    fn on_read(&self, bytes: &[u8]) {
        self.read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }

    fn on_write(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}
