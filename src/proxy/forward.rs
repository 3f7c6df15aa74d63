//! One request, from the agent to the upstream and back: ask the policy, rewrite the
//! headers (agent credentials and hop-by-hop headers out, the route's token in; the same
//! fields out of the request's trailers), send it through the pooled upstream client, and
//! stream the answer back. WebSocket upgrades
//! are relayed byte for byte once both sides have switched protocols.
//!
//! Each request is logged once, when its response body has been fully sent (or the
//! relay ends), with its bytes each way: the log record rides along with the body.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;

use super::ClientConn;
use super::body::{Moved, RecordSized, Tracked, Way};
use super::framing::HeadLog;
use super::headers::{
    AgentTrailersStripped, Credentials, rewrite_request_headers, rewrite_response_headers,
};
use super::stall::Cuttable;
use crate::audit::RequestEvent;
use crate::error::{ErrorKind, ProxyBody, ProxyError, empty_body};
use crate::policy::{self, Authority, Channel, Decision, RequestView, TargetError, parse_target};
use crate::upstream::{ConnectionSlot, Target};

/// An intercepted tunnel as every request on it sees it (`intercept` serves it).
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub conn: ClientConn,
    pub authority: Authority,
    /// Raw request heads, for the strict framing check (HTTP/1.1 only).
    pub head_log: Option<Arc<HeadLog>>,
}

/// A request inside an intercepted tunnel.
pub(crate) async fn intercepted(
    req: Request<Incoming>,
    tunnel: Arc<Tunnel>,
) -> Response<ProxyBody> {
    process(
        req,
        &tunnel.conn,
        &tunnel.authority,
        Channel::Tunnel,
        tunnel.head_log.as_deref(),
    )
    .await
}

/// A request on the proxy listener itself: only absolute-form `http://` is forwarded.
pub(crate) async fn plain_http(req: Request<Incoming>, conn: ClientConn) -> Response<ProxyBody> {
    let refuse = |kind, reason: &str, host: &str| {
        let e = ProxyError::new(kind, reason);
        RequestRecord::new(&conn, host.to_owned(), 0, &req, Instant::now())
            .refused(&e, req.version() < Version::HTTP_2)
    };
    match req.uri().scheme_str() {
        Some("http") => {}
        Some("https") => {
            return refuse(
                ErrorKind::BadRequest,
                "an https:// request must go through CONNECT (set HTTPS_PROXY)",
                "",
            );
        }
        _ => {
            return refuse(
                ErrorKind::BadRequest,
                "not a proxy request: use CONNECT for HTTPS or an absolute http:// URI",
                "",
            );
        }
    }
    let raw = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let (host, port) = match parse_target(raw) {
        Ok(target) => target,
        Err(TargetError::NumericHost) => {
            return refuse(
                ErrorKind::DestinationNotAllowed,
                "an all-numeric host name is refused",
                "",
            );
        }
        Err(TargetError::Malformed) => {
            return refuse(
                ErrorKind::BadRequest,
                "request target has no valid host",
                "",
            );
        }
    };
    let authority = Authority {
        host,
        port: port.unwrap_or(80),
    };
    let head_log = conn.plain_head_log.clone();
    process(req, &conn, &authority, Channel::Plain, Some(&head_log)).await
}

/// What the policy allowed, copied out so the request can be taken apart.
struct Grant {
    credentials: Credentials,
    allow_private: bool,
    websocket: bool,
    /// The route's `max_body_bytes`, held to as the body streams.
    body_cap: Option<u64>,
}

async fn process(
    mut req: Request<Incoming>,
    conn: &ClientConn,
    authority: &Authority,
    channel: Channel,
    head_log: Option<&HeadLog>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let in_flight = conn.activity.begin();
    let mut record = RequestRecord::new(
        conn,
        authority.host.to_string(),
        authority.port,
        &req,
        started,
    );
    let h1 = req.version() < Version::HTTP_2;
    let state = &conn.state;

    if let Some(Err(why)) = head_log.map(|log| log.check(req.method())) {
        let e = ProxyError::new(ErrorKind::BadRequest, format!("ambiguous framing: {why}"));
        return record.refused(&e, true);
    }
    if head_size(&req) > state.limits.max_header_bytes {
        let e = ProxyError::new(
            ErrorKind::HeadersTooLarge,
            format!(
                "request head is over {} bytes",
                state.limits.max_header_bytes
            ),
        );
        return record.refused(&e, h1);
    }
    // The routes current now decide this request, even if a reload lands mid-flight.
    let routes = state.routes.load_full();
    let view = RequestView {
        method: req.method(),
        uri: req.uri(),
        version: req.version(),
        headers: req.headers(),
    };
    let decision = match policy::decide(&routes, authority, channel, state.mode, view) {
        Ok(decision) => decision,
        Err(e) => {
            return record.refused(&e, h1 && e.kind == ErrorKind::BadRequest);
        }
    };
    (record.decision, record.reason) = decision.logged_as();
    record.route = decision.route().map(|r| r.index);
    // The matched route's own limits, a step of their own on every request a route
    // matched, in both modes; a request no route matched has none. A refusal with a body
    // still unread closes an HTTP/1.1 connection: the rest of that body is not a next
    // request.
    if let Some(route) = decision.route() {
        let declared = req.body().size_hint().lower();
        if let Err(e) = policy::admit(route, view, declared, started) {
            return record.refused(&e, h1 && !req.body().is_end_stream());
        }
    }
    let grant = Grant {
        allow_private: decision.allow_private(),
        websocket: decision.websocket(),
        body_cap: decision.body_cap(),
        credentials: match decision {
            Decision::Allow(allowed) => Credentials::Route(allowed.route.injection.clone()),
            Decision::Report(reported) => Credentials::Reported(reported.credential_headers),
        },
    };
    drop(routes);

    let target = Target {
        host: authority.host.clone(),
        port: authority.port,
        tls: channel == Channel::Tunnel,
        allow_private: grant.allow_private,
    };
    let agent_upgrade = grant.websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let bodiless = body.is_end_stream();
    let replayable =
        bodiless && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let body_idle = state.limits.body_idle_timeout;
    // Named in the head's `Connection`: hop-by-hop in the trailers too.
    let hop_by_hop =
        rewrite_request_headers(&mut parts.headers, &grant.credentials, grant.websocket);
    if let Ok(v) = HeaderValue::from_str(&target.authority()) {
        parts.headers.insert(header::HOST, v);
    }
    parts.uri = match parts.uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    };
    parts.version = Version::HTTP_11;
    let body = AgentTrailersStripped {
        inner: body,
        credentials: grant.credentials,
        hop_by_hop,
    };
    let upstream_body = Tracked::new(body, body_idle, record.moved.clone(), Way::Up, ())
        .capped(grant.body_cap)
        .boxed_unsync();
    let upstream_req = Request::from_parts(parts, upstream_body);

    let sent = match agent_upgrade {
        Some(_) => state
            .upstream
            .send_upgrade(&target, upstream_req)
            .await
            .map(|r| r.map(crate::upstream::UpstreamBody::Hyper)),
        None => state.upstream.send(&target, upstream_req, replayable).await,
    };
    let mut response = match sent {
        Ok(r) => r,
        // The agent's own body broke its framing or passed its route's cap: its error,
        // and its connection cannot carry another request.
        Err(e) if matches!(e.kind, ErrorKind::BadRequest | ErrorKind::BodyTooLarge) => {
            return record.refused(&e, h1);
        }
        // The upstream connection budget is spent: the proxy's own limit, like the cap
        // on agent connections, not an upstream failure.
        Err(e) if e.kind == ErrorKind::TooManyConnections => return record.refused(&e, false),
        Err(e) => return record.failed(&e, false),
    };
    record.status = response.status().as_u16();

    if let Some(agent_upgrade) = agent_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let slot = response.extensions_mut().remove::<ConnectionSlot>();
        // From here the agent's connection carries WebSocket frames, not HTTP/1.1 heads.
        if let Some(log) = head_log {
            log.stop();
        }
        let (mut parts, _) = response.into_parts();
        rewrite_response_headers(&mut parts.headers, true);
        // A WebSocket has no silence timeout either way (SPEC §2).
        conn.write_stall.turn_off();
        tokio::spawn(relay_websocket(
            agent_upgrade,
            upstream_upgrade,
            record,
            (in_flight, slot),
        ));
        return Response::from_parts(parts, empty_body());
    }
    let (mut parts, body) = response.into_parts();
    rewrite_response_headers(&mut parts.headers, false);
    let moved = record.moved.clone();
    let keep = (record, in_flight);
    let body = if h1 {
        Tracked::new(body, body_idle, moved, Way::Down, keep).boxed_unsync()
    } else {
        // One stream's window can be full while the connection moves: its own watcher
        // cuts it (`stall`); an HTTP/1.1 agent's full socket is `WriteStall`'s.
        let body = RecordSized::new(body);
        let body = Tracked::new(body, body_idle, moved.clone(), Way::Down, keep);
        Cuttable::new(body, body_idle, moved).boxed_unsync()
    };
    Response::from_parts(parts, body)
}

async fn relay_websocket(
    agent: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    record: RequestRecord,
    held: (super::InFlight, Option<ConnectionSlot>),
) {
    let (agent, upstream) = match tokio::try_join!(agent, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket upgrade did not complete");
            return;
        }
    };
    let mut agent = TokioIo::new(agent);
    let mut upstream = TokioIo::new(upstream);
    // An upgraded WebSocket has no silence timeout (SPEC §2): it ends when a side closes.
    if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
        record.moved.up.fetch_add(up, Ordering::Relaxed);
        record.moved.down.fetch_add(down, Ordering::Relaxed);
    }
    drop(held);
}

/// An approximation of the request head's size on the wire (HTTP/1.1 framing), used for
/// the same limit over both HTTP versions.
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    // The target as written, measured without formatting it.
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    line + headers + 2
}

/// The audit record of one request, logged once when dropped (after the response body
/// has been sent, or at once for a refusal).
struct RequestRecord {
    metrics: Arc<crate::metrics::Metrics>,
    conn: u64,
    client: Arc<str>,
    host: String,
    port: u16,
    method: Method,
    /// Path without the query: a query is never logged.
    path: String,
    route: Option<usize>,
    decision: &'static str,
    reason: Option<&'static str>,
    detail: Option<String>,
    write_stall: super::stall::StallSwitch,
    status: u16,
    /// Bytes moved each way, and why a body was cut short after its status line went
    /// out, if it was (the connection's write-stall watch notes its own cut).
    moved: Arc<Moved>,
    started: Instant,
}

impl RequestRecord {
    fn new<B>(
        conn: &ClientConn,
        host: String,
        port: u16,
        req: &Request<B>,
        started: Instant,
    ) -> Self {
        RequestRecord {
            metrics: conn.state.metrics.clone(),
            conn: conn.id,
            client: conn.client_text.clone(),
            host,
            port,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            route: None,
            decision: "allow",
            reason: None,
            detail: None,

            write_stall: conn.write_stall.clone(),
            status: 0,
            moved: Arc::default(),
            started,
        }
    }

    /// Records a refusal (logged as the record drops) and returns the agent's answer.
    fn refused(self, e: &ProxyError, close: bool) -> Response<ProxyBody> {
        self.answer("deny", e, close)
    }

    /// Records an upstream failure (logged as the record drops) and returns the answer.
    fn failed(self, e: &ProxyError, close: bool) -> Response<ProxyBody> {
        self.metrics
            .count_upstream_error(e.kind.proxy_status_error());
        self.answer("error", e, close)
    }

    fn answer(
        mut self,
        decision: &'static str,
        e: &ProxyError,
        close: bool,
    ) -> Response<ProxyBody> {
        self.decision = decision;
        self.reason = Some(e.kind.code());
        self.status = e.kind.status().as_u16();
        self.detail = Some(e.reason.clone());
        e.response(&self.host, close)
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // A body that passed its cap after the answer had begun was cut, not answered
        // 413, but it is refused all the same, and counted so.
        if self.moved.over_cap.load(Ordering::Relaxed) && self.reason.is_none() {
            self.decision = "deny";
            self.reason = Some(ErrorKind::BodyTooLarge.code());
        }
        let (up, down) = (
            self.moved.up.load(Ordering::Relaxed),
            self.moved.down.load(Ordering::Relaxed),
        );
        self.metrics
            .count_request(self.decision, self.reason.unwrap_or("ok"));
        self.metrics.count_bytes(up, down);
        RequestEvent {
            conn: self.conn,
            client: &self.client,
            host: &self.host,
            port: self.port,
            method: self.method.as_str(),
            path: &self.path,
            route: self.route,
            decision: self.decision,
            reason: self.reason,
            detail: self
                .detail
                .as_deref()
                .or(self.moved.cut.get().map(String::as_str))
                .or(self.write_stall.cut()),
            status: self.status,
            bytes_up: up,
            bytes_down: down,
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
        .log();
    }
}
