//! Test harness: a test CA, a local TLS upstream that records what it receives and
//! misbehaves on command, the real `egress-proxy` binary started against them, and a
//! client that opens CONNECT tunnels through it.
//!
//! Everything listens on 127.0.0.1; fake host names reach the upstream through the
//! proxy's `--resolve`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type ClientBody = BoxBody<Bytes, BoxError>;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA for test upstreams (what `--upstream-ca` trusts).
pub(crate) struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server config with a leaf for `names`, offering `alpn`.
    pub(crate) fn server_config(
        &self,
        names: &[&str],
        alpn: &[&[u8]],
    ) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    /// `:authority` for HTTP/2, `Host` for HTTP/1.1.
    pub authority: String,
}

/// A local TLS upstream. Paths:
/// - `/sse?n=N&ms=M`: N server-sent events, M ms apart (the first at once);
/// - `/download/N`: N bytes (a fixed pattern), streamed in 64 KiB chunks;
/// - `/upload`: reads the body, answers `{"len":…,"sum":…}`;
/// - `/echo-trailers`: reads the body, answers `{"len":…,"trailers":{name:value}}`;
/// - `/ws`: WebSocket echo;
/// - `/redirect`: 302 to another host;
/// - `/cut`: declares 1000 bytes, sends 10, closes;
/// - `/slow-head`: waits 3 s before answering;
/// - anything else: a JSON echo of method, path and headers.
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    /// `/download` bodies being sent: one ends (and leaves this count) when it is sent
    /// whole, or when the proxy resets its stream or closes its connection.
    pub downloading: Arc<AtomicUsize>,
    /// `/hold` requests being held: such a request is not read for 3 s nor ever answered,
    /// and leaves this count once the proxy has reset its stream or closed its connection.
    pub holding: Arc<AtomicUsize>,
}

impl Upstream {
    pub(crate) async fn start(ca: &TestCa, names: &[&str], alpn: &[&[u8]]) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(ca.server_config(names, alpn));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let downloading = Arc::new(AtomicUsize::new(0));
        let holding = Arc::new(AtomicUsize::new(0));
        let (seen2, conns2, downloading2, holding2) = (
            seen.clone(),
            connections.clone(),
            downloading.clone(),
            holding.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                conns2.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let seen = seen2.clone();
                let downloading = downloading2.clone();
                let holding = holding2.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = service_fn(move |req| {
                        let seen = seen.clone();
                        let downloading = downloading.clone();
                        let holding = holding.clone();
                        async move {
                            if req.uri().path() == "/hold" {
                                holding.fetch_add(1, Ordering::SeqCst);
                                let _held = Counted(holding);
                                hold(req).await;
                                return Ok(Response::new(full("")));
                            }
                            Ok::<_, Infallible>(upstream_handle(req, seen, downloading).await)
                        }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            connections,
            downloading,
            holding,
        }
    }

    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The path and query of every request received, in order.
    pub(crate) fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.path_and_query).collect()
    }

    pub(crate) fn saw_path(&self, needle: &str) -> bool {
        self.seen()
            .iter()
            .any(|s| s.path_and_query.contains(needle))
    }
}

pub(crate) const PATTERN_MOD: u64 = 251;

pub(crate) fn pattern_byte(i: u64) -> u8 {
    (i % PATTERN_MOD) as u8
}

fn full(b: impl Into<Bytes>) -> ClientBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// `/hold`: reads nothing for 3 s, then reads the body: a request the proxy abandoned
/// meanwhile (its stream reset, its connection closed) ends there; one whose body
/// arrives whole is held for ever (an HTTP/1.1 server notices a closed connection only
/// when it reads).
async fn hold(mut req: Request<Incoming>) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    while let Some(frame) = req.body_mut().frame().await {
        if frame.is_err() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// Counts something (a `/download` body being sent, a `/hold` request) until dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn upstream_handle(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    downloading: Arc<AtomicUsize>,
) -> Response<ClientBody> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path_and_query: pq.clone(),
        version: req.version(),
        headers: req.headers().clone(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
    });
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if path == "/sse" {
        let n: usize = query.get("n").and_then(|v| v.parse().ok()).unwrap_or(3);
        let ms: u64 = query.get("ms").and_then(|v| v.parse().ok()).unwrap_or(100);
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            if i == n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let ev = Bytes::from(format!("data: event {i}\n\n"));
            Some((Ok::<_, BoxError>(Frame::data(ev)), i + 1))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap();
    }
    if let Some(n) = path.strip_prefix("/download/") {
        let total: u64 = n.parse().unwrap_or(0);
        downloading.fetch_add(1, Ordering::SeqCst);
        let guard = Arc::new(Counted(downloading));
        let stream = futures_util::stream::unfold(0u64, move |sent| {
            let guard = guard.clone();
            async move {
                let _ = &guard;
                if sent >= total {
                    return None;
                }
                let len = (total - sent).min(64 * 1024);
                let chunk: Vec<u8> = (sent..sent + len).map(pattern_byte).collect();
                Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))),
                    sent + len,
                ))
            }
        });
        return Response::builder()
            .header("content-length", total.to_string())
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap();
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let (mut len, mut sum, mut mismatches) = (0u64, 0u64, 0u64);
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                for &b in data.iter() {
                    if b != pattern_byte(len) {
                        mismatches += 1;
                    }
                    sum = sum.wrapping_add(b as u64);
                    len += 1;
                }
            }
        }
        return Response::new(full(format!(
            "{{\"len\":{len},\"sum\":{sum},\"mismatches\":{mismatches}}}"
        )));
    }
    if path == "/ws" {
        let key = req.headers().get("sec-websocket-key").cloned();
        let Some(key) = key else {
            return Response::builder()
                .status(400)
                .body(full("no key"))
                .unwrap();
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap();
    }
    if path == "/trailers" {
        // gRPC's shape: the request body is read whole, the answer's status comes in
        // trailers after the data.
        let got = req
            .body_mut()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers.insert("x-got", http::HeaderValue::from(got as u64));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"reply"))),
            Ok(Frame::trailers(trailers)),
        ];
        return Response::builder()
            .header("content-type", "application/grpc")
            .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
            .unwrap();
    }
    if path == "/echo-trailers" {
        // The request's trailer fields as received: `{"len":…,"trailers":{name:value}}`.
        let mut body = req.into_body();
        let (mut len, mut trailers) = (0usize, serde_json::Map::new());
        while let Some(Ok(frame)) = body.frame().await {
            match frame.into_trailers() {
                Ok(t) => trailers.extend(t.iter().map(|(k, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.to_string(), serde_json::Value::String(v))
                })),
                Err(frame) => len += frame.data_ref().map_or(0, |d| d.len()),
            }
        }
        return Response::new(full(
            serde_json::json!({"len": len, "trailers": trailers}).to_string(),
        ));
    }
    if path == "/redirect" {
        return Response::builder()
            .status(302)
            .header("location", "https://elsewhere.test/")
            .body(full(""))
            .unwrap();
    }
    if path == "/slow-head" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if path == "/cut" {
        let stream = futures_util::stream::unfold(0, |step| async move {
            match step {
                0 => Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"0123456789"))),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Err::<Frame<Bytes>, BoxError>("cut".into()), 2))
                }
                _ => None,
            }
        });
        return Response::builder()
            .header("content-length", "1000")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap();
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()),
            )
        })
        .collect();
    let body = serde_json::json!({"method": req.method().as_str(), "path": pq, "headers": headers});
    Response::builder()
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary, running against a routes file in a temporary directory.
pub(crate) struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    log: Arc<Mutex<String>>,
}

pub(crate) struct ProxyBuilder {
    routes: String,
    routes_path: Option<PathBuf>,
    self_proxy: bool,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ca_dir: Option<PathBuf>,
    open_files: Option<(u64, u64)>,
    /// Upstream CA certificates (PEM) to trust, written into the proxy's own directory.
    upstream_cas: Vec<String>,
}

impl ProxyBuilder {
    pub(crate) fn new(routes: &str) -> Self {
        ProxyBuilder {
            routes: routes.to_owned(),
            routes_path: None,
            self_proxy: false,
            args: Vec::new(),
            env: Vec::new(),
            ca_dir: None,
            open_files: None,
            upstream_cas: Vec::new(),
        }
    }

    /// Uses this CA directory (made by the test) instead of a fresh one.
    pub(crate) fn ca_dir(mut self, dir: PathBuf) -> Self {
        self.ca_dir = Some(dir);
        self
    }

    /// Starts the proxy with this soft and hard open-files limit (RLIMIT_NOFILE), the way
    /// a container runtime would hand them to it.
    pub(crate) fn open_files_limit(mut self, soft: u64, hard: u64) -> Self {
        self.open_files = Some((soft, hard));
        self
    }

    /// Sets HTTPS_PROXY to the proxy's own listener (the loop a sidecar inheriting the
    /// bottle's environment would make).
    pub(crate) fn self_as_upstream_proxy(mut self) -> Self {
        self.self_proxy = true;
        self
    }

    /// Uses this routes file as it is instead of writing one.
    pub(crate) fn routes_path(mut self, path: PathBuf) -> Self {
        self.routes_path = Some(path);
        self
    }

    pub(crate) fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub(crate) fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Trusts `ca` upstream and pins each `host` to 127.0.0.1 at `port`.
    pub(crate) fn upstream(mut self, ca: &TestCa, hosts: &[(&str, u16)]) -> Self {
        self.upstream_cas.push(ca.pem.clone());
        for (h, p) in hosts {
            self.args.push("--resolve".into());
            self.args.push(format!("{h}:{p}:127.0.0.1"));
        }
        self
    }

    pub(crate) fn start(self) -> Proxy {
        self.try_start()
            .unwrap_or_else(|e| panic!("proxy did not start: {e}"))
    }

    /// Starts the proxy; `Err` carries its stderr when it exits instead of listening.
    pub(crate) fn try_start(self) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().unwrap();
        let routes = match &self.routes_path {
            Some(p) => p.clone(),
            None => {
                let p = dir.path().join("routes.yaml");
                std::fs::write(&p, &self.routes).unwrap();
                p
            }
        };
        // Port 0, the proxy's start line tells which ports it got: a port picked here and
        // bound by the proxy later can be taken in between (CI saw it, as the source port
        // of another test's connection). Only the self-loop case needs its port up front,
        // and that proxy refuses to start before it binds anything.
        let port = if self.self_proxy { free_port() } else { 0 };
        let ca_dir = self.ca_dir.clone().unwrap_or_else(|| dir.path().join("ca"));
        let mut cmd = Command::new(BIN);
        // In the proxy's own directory, gone with it.
        for (i, pem) in self.upstream_cas.iter().enumerate() {
            let path = dir.path().join(format!("upstream-ca-{i}.pem"));
            std::fs::write(&path, pem).unwrap();
            cmd.arg("--upstream-ca").arg(path);
        }
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin")
            .arg("127.0.0.1:0")
            .arg("--routes")
            .arg(&routes)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(&self.args)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if self.self_proxy {
            cmd.env("HTTPS_PROXY", format!("http://localhost:{port}"));
        }
        if let Some((soft, hard)) = self.open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: between fork and exec only setrlimit runs, which is
            // async-signal-safe and reads a struct copied into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let (addr, admin) = loop {
            if let Ok(Some(_)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(log.lock().unwrap().clone());
            }
            let bound = {
                let log = log.lock().unwrap();
                bound_addr(&log, "listen").zip(bound_addr(&log, "admin"))
            };
            if let Some((addr, admin)) = bound
                && std::net::TcpStream::connect(addr).is_ok()
            {
                break (addr, admin);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("not listening after 15s: {}", log.lock().unwrap()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let ca_pem = std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap();
        Ok(Proxy {
            child,
            addr,
            admin,
            dir,
            ca_pem,
            log,
        })
    }
}

/// The address the proxy's `start` line says a listener is bound to, in either log format
/// (`"listen":"127.0.0.1:41234"` or `listen=127.0.0.1:41234`).
fn bound_addr(log: &str, key: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("egress-proxy serving"))?;
    let after = [format!("\"{key}\":\""), format!(" {key}=")]
        .iter()
        .find_map(|k| line.find(k.as_str()).map(|i| &line[i + k.len()..]))?;
    let end = after
        .find(|c: char| c == '"' || c.is_whitespace())
        .unwrap_or(after.len());
    after[..end].parse().ok()
}

impl Proxy {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The logs once they contain `needle` (the audit line of a request is written when
    /// its response has been sent, a moment after the client has read it), or after 3 s.
    /// The log's lines that `keep` selects, once there are `n` of them (or after 10 s): a
    /// request's line is written when its answer has been sent, after the client has it.
    pub(crate) async fn await_lines(&self, n: usize, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<String> = self
                .logs()
                .lines()
                .filter(|l| keep(l))
                .map(str::to_owned)
                .collect();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub(crate) fn logs_with(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let logs = self.logs();
            if logs.contains(needle) || std::time::Instant::now() > deadline {
                return logs;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    pub(crate) fn ca_cert_path(&self) -> PathBuf {
        self.ca_dir().join("ca-cert.pem")
    }

    /// Resident memory of the proxy process, in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// Waits up to `timeout` for the process to exit; its exit code.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }

    /// Opens a tunnel through the proxy and completes TLS, trusting only the bottle CA.
    pub(crate) async fn tunnel(
        &self,
        host: &str,
        port: u16,
        alpn: &[&[u8]],
    ) -> TlsStream<TcpStream> {
        self.tunnel_sni(host, port, alpn, host).await.unwrap()
    }

    pub(crate) async fn tunnel_sni(
        &self,
        host: &str,
        port: u16,
        alpn: &[&[u8]],
        sni: &str,
    ) -> Result<TlsStream<TcpStream>, String> {
        let (status, _, tcp) = self.connect(&format!("{host}:{port}")).await;
        if status != 200 {
            return Err(format!("CONNECT answered {status}"));
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())
    }

    /// Sends `CONNECT target`; the status, the whole head (and body if refused), and
    /// the stream.
    pub(crate) async fn connect(&self, target: &str) -> (u16, String, TcpStream) {
        let mut tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut tcp).await;
        let status = parse_status(&head);
        let mut text = head;
        if status != 200 {
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                read_body_by_length(&mut tcp, &text, &mut rest),
            )
            .await;
            text.push_str(&String::from_utf8_lossy(&rest));
        }
        (status, text, tcp)
    }

    /// Writes `raw` on a new plain connection to the proxy and returns what came back
    /// (until close or 2 s).
    pub(crate) async fn raw(&self, raw: &[u8]) -> String {
        let mut tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Private (anonymous) resident memory of a process, in KiB: the heap and stacks, without
/// the binary's pages that every process of it shares.
pub(crate) fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

async fn read_body_by_length(tcp: &mut TcpStream, head: &str, out: &mut Vec<u8>) {
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut buf = vec![0u8; len];
    if tcp.read_exact(&mut buf).await.is_ok() {
        out.extend_from_slice(&buf);
    }
}

pub(crate) fn parse_status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An HTTP/1.1 client connection over a tunnel.
pub(crate) async fn h1(
    tls: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<ClientBody> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// An HTTP/2 client connection over a tunnel.
pub(crate) async fn h2(
    tls: TlsStream<TcpStream>,
) -> hyper::client::conn::http2::SendRequest<ClientBody> {
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "proxy did not choose h2"
    );
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

pub(crate) fn empty() -> ClientBody {
    full(Bytes::new())
}

pub(crate) fn body(b: impl Into<Bytes>) -> ClientBody {
    full(b)
}

/// A request builder with a `Host` header for HTTP/1.1.
pub(crate) fn get(host: &str, path: &str) -> http::request::Builder {
    Request::builder().uri(path).header("host", host)
}

/// Collects a response: status, headers, body.
pub(crate) async fn collect(r: Response<Incoming>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, body) = r.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (parts.status, parts.headers, bytes)
}

pub(crate) fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

/// Asserts a proxy-made refusal: status, JSON `error`, and a Proxy-Status header.
pub(crate) fn assert_refusal(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    want_status: u16,
    code: &str,
) {
    assert_eq!(
        status.as_u16(),
        want_status,
        "body: {}",
        String::from_utf8_lossy(body)
    );
    let v = json(body);
    assert_eq!(v["error"], code, "{v}");
    let ps = headers
        .get("proxy-status")
        .expect("proxy-status header")
        .to_str()
        .unwrap();
    assert!(ps.starts_with("egress-proxy; error="), "{ps}");
    assert!(ps.contains(code), "{ps}");
}

pub(crate) fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// How the test upstream proxy answers a CONNECT.
#[derive(Debug, Clone)]
pub(crate) enum ProxyMode {
    /// Tunnel to 127.0.0.1 at the requested port; with `Some(auth)`, demand exactly that
    /// `Proxy-Authorization` value (407 otherwise).
    Tunnel(Option<String>),
    /// Answer this status and close.
    Status(u16),
    /// Read the CONNECT, then close without a word.
    Close,
}

/// What the test upstream proxy saw: the CONNECT target and its Proxy-Authorization.
#[derive(Debug, Clone)]
pub(crate) struct ProxySeen {
    pub target: String,
    pub authorization: Option<String>,
}

/// A small CONNECT proxy on loopback that records what it is asked (plain, or TLS
/// with a leaf from `tls` for "proxy.test").
pub(crate) struct TestUpstreamProxy {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<ProxySeen>>>,
}

impl TestUpstreamProxy {
    pub(crate) async fn start(mode: ProxyMode, tls: Option<&TestCa>) -> TestUpstreamProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acceptor =
            tls.map(|ca| TlsAcceptor::from(ca.server_config(&["proxy.test"], &[b"http/1.1"])));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (mode, seen, acceptor) = (mode.clone(), seen2.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                serve_proxy_conn(tls, mode, seen).await
                            }
                        }
                        None => serve_proxy_conn(tcp, mode, seen).await,
                    }
                });
            }
        });
        TestUpstreamProxy { addr, seen }
    }

    pub(crate) fn seen(&self) -> Vec<ProxySeen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_proxy_conn<S>(mut s: S, mode: ProxyMode, seen: Arc<Mutex<Vec<ProxySeen>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or("").to_owned();
    let authorization = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("proxy-authorization")
            .then(|| v.trim().to_owned())
    });
    seen.lock().unwrap().push(ProxySeen {
        target: target.clone(),
        authorization: authorization.clone(),
    });
    match mode {
        ProxyMode::Close => {}
        ProxyMode::Status(code) => {
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 {code} Refused\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
        }
        ProxyMode::Tunnel(required) => {
            if required.is_some() && required != authorization {
                let _ = s
                    .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            }
            let port = target
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .unwrap_or(0);
            let Ok(mut origin) = TcpStream::connect(("127.0.0.1", port)).await else {
                let _ = s
                    .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            };
            if s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_ok()
            {
                let _ = tokio::io::copy_bidirectional(&mut s, &mut origin).await;
            }
        }
    }
}

impl Proxy {
    /// GET `path` on the admin listener: status and body.
    pub(crate) async fn admin_get(&self, path: &str) -> (u16, String) {
        let tcp = TcpStream::connect(self.admin).await.unwrap();
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let r = s
            .send_request(
                Request::builder()
                    .uri(path)
                    .header("host", "admin")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends raw bytes inside a TLS tunnel (HTTP/1.1 ALPN) and returns everything that
    /// comes back until the proxy closes or stays quiet for `quiet`.
    pub(crate) async fn raw_in_tunnel(
        &self,
        host: &str,
        port: u16,
        raw: &[u8],
        quiet: Duration,
    ) -> String {
        let mut tls = self.tunnel(host, port, &[b"http/1.1"]).await;
        let _ = tls.write_all(raw).await;
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            match tokio::time::timeout(quiet, tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
