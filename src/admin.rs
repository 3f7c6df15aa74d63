//! The admin listener (SPEC §6): health and readiness for the orchestrator, Prometheus
//! metrics, and the bottle CA for agents that fetch it over HTTP.
//!
//! Kept apart from the proxy listener so the agent's port never serves anything but
//! proxying, and so probes keep answering while the proxy port is saturated.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::error::{ProxyBody, full_body};
use crate::proxy::ProxyState;
use crate::proxy::listener::Acceptor;

/// Admin connections served at once, so the admin listener's descriptors are bounded;
/// they are kept out of the agent connections' share (`app::connection_cap`), so probes
/// keep answering while the proxy listener is at its cap.
pub(crate) const ADMIN_CONNECTIONS: usize = 16;

/// How long an admin connection may take to send its request: a probe sends it at once.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a whole admin exchange may take (the CA bundle to a slow reader included).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints until the process exits.
///
/// The agent can reach this port (the image listens on every interface), so a few
/// connections that never finish their request must not take every slot: a connection
/// that finds them all taken closes the oldest one still open rather than wait behind it.
/// A probe's whole exchange is over long before the head timeout, so only connections that
/// linger are ever closed this way.
pub(crate) async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    let ca_pem = Bytes::from(state.leaves.ca().cert_pem().to_owned());
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let mut open: VecDeque<AbortHandle> = VecDeque::with_capacity(ADMIN_CONNECTIONS);
    let mut acceptor = Acceptor::new(listener, "admin");
    loop {
        // A connection accepted on the spare descriptor is served too: a probe answered
        // while the proxy is out of descriptors is the point of the spare.
        let stream = acceptor.accept().await.stream;
        open.retain(|task| !task.is_finished());
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if let Some(oldest) = open.pop_front() {
                    oldest.abort();
                }
                match slots.clone().acquire_owned().await {
                    Ok(slot) => slot,
                    Err(_) => return,
                }
            }
        };
        let (state, ca_pem) = (state.clone(), ca_pem.clone());
        let task = tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&req, &state, &ca_pem);
                async move { Ok::<_, Infallible>(response) }
            });
            // One request per connection: a slot is free again as soon as its answer is
            // sent, so idle keep-alive connections cannot hold the slots a probe needs.
            let exchange = http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await;
            drop(slot);
        });
        open.push_back(task.abort_handle());
    }
}

fn route(req: &Request<Incoming>, state: &ProxyState, ca_pem: &Bytes) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"GET only\n"),
        );
    }
    match req.uri().path() {
        // The proxy serves from the moment this listener is up (routes and CA are loaded
        // before either listener binds) until it starts draining for shutdown.
        "/healthz" | "/readyz" if state.is_shutting_down() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"shutting down\n"),
        ),
        "/healthz" | "/readyz" => text(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(state.metrics.render()),
        ),
        "/ca.pem" => text(StatusCode::OK, "application/x-pem-file", ca_pem.clone()),
        // Built per request (asked for once per bottle) rather than held: the public
        // roots' PEM would be most of an idle proxy's heap (docs/decisions.md).
        "/ca-bundle.pem" => text(
            StatusCode::OK,
            "application/x-pem-file",
            Bytes::from(state.leaves.ca().bundle_pem()),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// `egress-proxy health`: true when `/healthz` at `admin` answers 200 within 3 seconds.
pub async fn probe(admin: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| format!("{admin}: {e}"))?;
        s.write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| format!("{admin}: {e}"))?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)
            .await
            .map_err(|e| format!("{admin}: {e}"))?;
        if &head[9..12] == b"200" {
            Ok(())
        } else {
            Err(format!(
                "{admin}/healthz answered {}",
                String::from_utf8_lossy(&head[9..12])
            ))
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), work)
        .await
        .unwrap_or_else(|_| Err(format!("{admin}: no answer within 3s")))
}
