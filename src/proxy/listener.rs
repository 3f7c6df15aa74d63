//! The proxy listener: accepts agent connections, caps how many are open, and serves the
//! first HTTP/1.1 exchange on each: a `CONNECT host:port` that opens an intercepted
//! tunnel, or an absolute-form plain-HTTP request.
//!
//! The CONNECT is decided before anything is resolved or dialled: a host and port no
//! route covers gets 403 and the tunnel never opens (in report mode it opens, and says
//! so in its `connect` event).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::framing::{HeadLog, Sniffed};
use super::linger::LingeringTcp;
use super::stall::{StallSwitch, WriteStall};
use super::{ClientConn, OpenConnection, ProxyState, drive_connection, forward, intercept};
use crate::audit::ConnectEvent;
use crate::destination;
use crate::error::{ErrorKind, ProxyBody, ProxyError, empty_body};
use crate::policy::{self, Authority, ConnectDecision, TargetError, parse_target};

/// Refusals (503 `too_many_connections`) that may wait for the agent's request before
/// answering, at once. Each holds a descriptor, so their number is part of the
/// descriptor budget (`app::connection_cap`); beyond it a refusal is answered at once.
pub(crate) const REFUSALS_AT_ONCE: usize = 32;

/// The first accept failure after the last success pauses this long; each further one
/// twice as long, up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// How often a listener without its spare descriptor tries to take it back.
const SPARE_RETRY: Duration = Duration::from_millis(100);

/// A listener's accept loop, for what happens when accepting fails.
///
/// Out of descriptors, the kernel leaves the connection in the backlog and fails every
/// accept until one is freed: the agent would hang unanswered and `/healthz` stop
/// answering. The connection cap keeps that from happening in the normal run of things
/// (`app::connection_cap`), but an agent can still cost more than its share (an HTTP/2
/// connection whose streams each need their own upstream connection). So each listener
/// holds one spare descriptor: out of descriptors, it gives the spare up to accept one
/// connection anyway (the proxy listener answers it 503, the admin listener serves it),
/// and takes it back once descriptors are free again.
///
/// Failures come in bursts: the first of a burst is logged and the rest only counted,
/// and each pauses a little longer than the one before, so a failing accept neither
/// spins nor floods the log. The next ordinary accept ends the burst and says how many
/// failed.
pub(crate) struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    failed: u64,
    pause: Duration,
    spare: Option<std::fs::File>,
    /// False when the spare cannot be opened for another reason than a lack of
    /// descriptors (no `/dev/null`): then there is none to wait for either.
    spare_possible: bool,
}

/// An accepted connection.
pub(crate) struct Accepted {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    /// Accepted on the spare descriptor: none other was left.
    pub(crate) on_spare: bool,
}

impl Acceptor {
    pub(crate) fn new(listener: TcpListener, name: &'static str) -> Acceptor {
        let mut acceptor = Acceptor {
            listener,
            name,
            failed: 0,
            pause: ACCEPT_PAUSE_MIN,
            spare: None,
            spare_possible: true,
        };
        acceptor.take_spare();
        acceptor
    }

    /// Opens the spare descriptor if it is missing and can be had.
    fn take_spare(&mut self) {
        if self.spare.is_some() || !self.spare_possible {
            return;
        }
        match std::fs::File::open("/dev/null") {
            Ok(f) => self.spare = Some(f),
            Err(e) => self.spare_possible = out_of_descriptors(&e),
        }
    }

    /// The next connection; failures are retried after their pause.
    pub(crate) async fn accept(&mut self) -> Accepted {
        loop {
            self.take_spare();
            let accepted = match self.spare {
                _ if !self.spare_possible => self.listener.accept().await,
                Some(_) => self.listener.accept().await,
                // Without its spare the listener takes it back as soon as a descriptor is
                // free, not only at its next connection.
                None => match tokio::time::timeout(SPARE_RETRY, self.listener.accept()).await {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let e = match accepted {
                Ok((stream, peer)) => {
                    self.succeeded();
                    return Accepted {
                        stream,
                        peer,
                        on_spare: false,
                    };
                }
                Err(e) => e,
            };
            // Out of descriptors: close the spare (dropped here, before the accept) so
            // that the connection waiting can be taken and answered.
            let spare = if out_of_descriptors(&e) {
                self.spare.take()
            } else {
                None
            };
            let gave_up_spare = spare.is_some();
            drop(spare);
            if gave_up_spare && let Ok((stream, peer)) = self.listener.accept().await {
                // Progress: the next failure need not wait long.
                self.pause = ACCEPT_PAUSE_MIN;
                self.log_burst_start(&e);
                return Accepted {
                    stream,
                    peer,
                    on_spare: true,
                };
            }
            self.failed(&e).await;
        }
    }

    fn log_burst_start(&mut self, e: &std::io::Error) {
        if self.failed == 0 {
            tracing::warn!(listener = self.name, error = %e, "accept failed; backing off until it succeeds again");
        }
        self.failed += 1;
    }

    async fn failed(&mut self, e: &std::io::Error) {
        self.log_burst_start(e);
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(ACCEPT_PAUSE_MAX);
    }

    fn succeeded(&mut self) {
        if self.failed > 0 {
            tracing::info!(
                listener = self.name,
                failed = self.failed,
                "accepting again"
            );
            self.failed = 0;
            self.pause = ACCEPT_PAUSE_MIN;
        }
    }
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Accepts connections until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut acceptor = Acceptor::new(listener, "proxy");
    loop {
        let Accepted {
            stream,
            peer: client,
            on_spare,
        } = tokio::select! {
            _ = shutdown.as_mut() => return,
            a = acceptor.accept() => a,
        };
        let _ = stream.set_nodelay(true);
        if on_spare {
            // Its descriptor is the spare: answered at once, so it is free again soon.
            let why = "the proxy has no file descriptor left".to_owned();
            tokio::spawn(refuse_over_limit(stream, client, state.clone(), None, why));
            continue;
        }
        let Ok(slot) = state.connection_slots.clone().try_acquire_owned() else {
            let may_wait = state.refusal_slots.clone().try_acquire_owned().ok();
            let why = format!(
                "{} agent connections are open already",
                state.limits.max_connections
            );
            tokio::spawn(refuse_over_limit(
                stream,
                client,
                state.clone(),
                may_wait,
                why,
            ));
            continue;
        };
        state.metrics.open_connections.inc();
        let conn = ClientConn {
            id: state.next_id(),
            client_text: client.to_string().into(),
            state: state.clone(),
            activity: super::Activity::new(),
            plain_head_log: HeadLog::new(state.limits.max_header_bytes + 8192),
            write_stall: StallSwitch::default(),
            _open: Arc::new(OpenConnection {
                state: state.clone(),
                _slot: slot,
            }),
        };
        tokio::spawn(serve_client(stream, conn));
    }
}

/// Answers 503 `too_many_connections` once the cap is reached: read what the client
/// sent (briefly, when `may_wait` holds one of the [`REFUSALS_AT_ONCE`] slots, so the
/// close does not reset the answer away), answer, close.
async fn refuse_over_limit(
    mut stream: TcpStream,
    client: SocketAddr,
    state: Arc<ProxyState>,
    may_wait: Option<tokio::sync::OwnedSemaphorePermit>,
    why: String,
) {
    let mut buf = [0u8; 4096];
    if may_wait.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
    } else {
        // Whatever has arrived already, without waiting: less unread input to turn the
        // close into a reset.
        let _ = stream.try_read(&mut buf);
    }
    let e = ProxyError::new(ErrorKind::TooManyConnections, why);
    state.metrics.count_connect("deny", e.kind.code());
    // Its CONNECT was never read: no host or port to log.
    let client = client.to_string();
    refused_connect(state.next_id(), &client, "", 0, &e).log();
    // No HTTP server runs on this connection, so the one response is written by hand.
    let (parts, body) = e.response("", true).into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut head = format!("HTTP/1.1 {}\r\n", parts.status);
    for (name, value) in &parts.headers {
        if let Ok(v) = value.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
    drop(may_wait);
}

async fn serve_client(stream: TcpStream, conn: ClientConn) {
    // Under TLS and HTTP, so that an agent that stops reading is noticed whatever it
    // carries (plain HTTP, or a tunnel: the upgrade keeps this stream).
    let stream = WriteStall::new(
        LingeringTcp::new(stream, conn._open.clone()),
        conn.state.limits.body_idle_timeout,
        conn.write_stall.clone(),
    );
    let head_log = conn.plain_head_log.clone();
    let limits = &conn.state.limits;
    let builder = limits.http1_server(limits.client_timeout);
    let idle = limits.idle_timeout;
    let activity = conn.activity.clone();
    let shutdown = conn.state.shutdown_signal();
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let conn = conn.clone();
            // Boxed for the reason `intercept::tunnel_service` gives.
            Box::pin(async move { Ok::<_, Infallible>(handle(req, conn).await) })
        })
    };
    let connection = Box::pin(
        builder
            .serve_connection(TokioIo::new(Sniffed::new(stream, head_log)), service)
            .with_upgrades(),
    );
    drive_connection(
        connection,
        |c| c.graceful_shutdown(),
        &activity,
        idle,
        shutdown,
    )
    .await;
}

async fn handle(req: Request<Incoming>, conn: ClientConn) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return handle_connect(req, conn);
    }
    forward::plain_http(req, conn).await
}

/// Logs a refused CONNECT.
fn log_connect_refused(conn: &ClientConn, target: &str, port: u16, e: &ProxyError) {
    conn.state.metrics.count_connect("deny", e.kind.code());
    refused_connect(conn.id, &conn.client_text, target, port, e).log();
}

/// The `connect` event of a CONNECT refused before its tunnel opened.
fn refused_connect<'a>(
    conn: u64,
    client: &'a str,
    host: &'a str,
    port: u16,
    e: &'a ProxyError,
) -> ConnectEvent<'a> {
    ConnectEvent {
        conn,
        client,
        host,
        port,
        decision: "deny",
        reason: Some(e.kind.code()),
        detail: Some(&e.reason),
        sni: None,
        status: e.kind.status().as_u16(),
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
    }
}

/// Decides a CONNECT and, when allowed, hands the upgraded stream to the interceptor.
fn handle_connect(mut req: Request<Incoming>, conn: ClientConn) -> Response<ProxyBody> {
    let target = match connect_target(&req, &conn.state) {
        Ok(t) => t,
        Err((e, shown)) => {
            log_connect_refused(&conn, &shown, 0, &e);
            return e.response(&shown, false);
        }
    };
    let reported = match policy::decide_connect(&conn.state.routes.load(), &target, conn.state.mode)
    {
        ConnectDecision::Allow => None,
        ConnectDecision::Report(would_refuse) => Some(would_refuse),
        ConnectDecision::Deny(e) => {
            let shown = target.host.to_string();
            log_connect_refused(&conn, &shown, target.port, &e);
            return e.response(&shown, false);
        }
    };
    // From here the connection carries TLS, not plain-HTTP heads.
    conn.plain_head_log.stop();
    // The allowed CONNECT is logged when its tunnel closes, with what it carried.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let started = Instant::now();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => intercept::run(upgraded, target, reported, conn, started).await,
            Err(e) => tracing::debug!(conn = conn.id, error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut response = Response::new(empty_body());
    *response.status_mut() = StatusCode::OK;
    response
}

/// The CONNECT target, or the refusal (with the host as the agent wrote it, for the log).
fn connect_target(
    req: &Request<Incoming>,
    state: &ProxyState,
) -> Result<Authority, (ProxyError, String)> {
    let bad = |why: &str, shown: &str| {
        (
            ProxyError::new(ErrorKind::BadRequest, format!("CONNECT target {why}")),
            shown.to_owned(),
        )
    };
    let uri = req.uri();
    let Some(authority) = uri.authority() else {
        return Err(bad("must be host:port", ""));
    };
    let raw = authority.as_str();
    // As the log and the answer show it: printable, bounded, and without userinfo (a
    // `user:password@` the agent put there is never echoed; the target is refused).
    let printable = raw.rsplit_once('@').map_or(raw, |(_, host)| host);
    let userinfo = if printable.len() < raw.len() {
        "***@"
    } else {
        ""
    };
    let shown: String = userinfo
        .chars()
        .chain(printable.chars().filter(|c| c.is_ascii_graphic()))
        .take(255)
        .collect();
    if uri.scheme().is_some()
        || uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(bad("must be host:port", &shown));
    }
    let (host, port) = match parse_target(raw) {
        Ok((h, Some(p))) => (h, p),
        Ok((_, None)) => return Err(bad("has no port", &shown)),
        Err(TargetError::Malformed) => return Err(bad("is not a valid host:port", &shown)),
        Err(TargetError::NumericHost) => {
            return Err((
                ProxyError::new(
                    ErrorKind::DestinationNotAllowed,
                    format!("{shown}: an all-numeric host name is refused"),
                ),
                shown,
            ));
        }
    };
    if let Some(ip) = host.ip()
        && destination::is_own_listener(SocketAddr::new(ip, port), &state.own_listeners)
    {
        return Err((
            ProxyError::new(
                ErrorKind::DestinationNotAllowed,
                format!("{shown} is the proxy itself"),
            ),
            shown,
        ));
    }
    Ok(Authority { host, port })
}
