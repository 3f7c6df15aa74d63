//! A fast local TLS origin for `bench/bench`: hyper + rustls, HTTP/1.1 and HTTP/2 by
//! ALPN, with a certificate for `bench.test`, `*.bench.test`, `localhost` and 127.0.0.1
//! from a CA it writes out.
//!
//! Paths: `/small` (13 bytes), `/bytes/N` (N bytes streamed in 64 KiB chunks),
//! `/sse?n=N&ms=M` (N events, M ms apart, each stamped with the send time in µs since the
//! Unix epoch), `/upload` (reads the body, answers its length).
//!
//! Usage: `bench_origin PORT CA_OUT_PATH`. `BENCH_ORIGIN_HTTP1=1` offers only HTTP/1.1;
//! `BENCH_ORIGIN_SHARED_RUNTIME=1` serves on tokio's multi-threaded scheduler, as the
//! origin did before session 8 (see `serve_thread_per_core`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let param = |name: &str, default: u64| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(default)
    };
    Ok(match path.as_str() {
        "/small" => Response::new(full(&b"hello, bench\n"[..])),
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0);
            }
            Response::new(full(n.to_string()))
        }
        "/sse" => {
            let (count, ms) = (param("n", 10), param("ms", 100));
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i == count {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0);
                Some((
                    Ok(Frame::data(Bytes::from(format!("data: {now}\n\n")))),
                    i + 1,
                ))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap_or_default()
        }
        p if p.starts_with("/bytes/") => {
            let total: u64 = p["/bytes/".len()..].parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(0u64, move |sent| {
                let chunk = chunk.clone();
                async move {
                    if sent >= total {
                        return None;
                    }
                    let n = (total - sent).min(chunk.len() as u64);
                    Some((Ok(Frame::data(chunk.slice(..n as usize))), sent + n))
                }
            });
            Response::builder()
                .header("content-length", total.to_string())
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap_or_default()
        }
        _ => Response::builder()
            .status(404)
            .body(full(""))
            .unwrap_or_default(),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args
        .get(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: bench_origin PORT CA_OUT_PATH");
    let ca_out = args.get(2).expect("usage: bench_origin PORT CA_OUT_PATH");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    // Distinct names: OpenSSL-based clients (mitmproxy) take a leaf whose subject equals
    // its issuer's for a self-signed certificate.
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench origin CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(ca_out, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![
        "bench.test".to_string(),
        // The warm-up before the memory rows asks for several hosts under bench.test.
        "*.bench.test".to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ])
    .unwrap();
    params.use_authority_key_identifier_extension = true;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "bench origin");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    // BENCH_ORIGIN_HTTP1=1: an origin that offers only HTTP/1.1, as many APIs still do.
    config.alpn_protocols = if std::env::var_os("BENCH_ORIGIN_HTTP1").is_some() {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    if std::env::var_os("BENCH_ORIGIN_SHARED_RUNTIME").is_some() {
        serve_on_shared_runtime(listener, acceptor);
    } else {
        serve_thread_per_core(listener, acceptor);
    }
}

/// One single-threaded runtime per core, each connection handed to the next in turn by
/// the accepting thread and served on it to the end, HTTP/2 streams included: the
/// design of nginx's workers and of most fast servers. On tokio's multi-threaded
/// scheduler (below), an HTTP/2 connection's stream tasks bounced between the workers
/// (0.57 context switches a request against 0.14 over HTTP/1.1), which cost this origin
/// 9 µs a request over one multiplexed HTTP/2 connection against 4 µs here. Direct
/// HTTP/1.1 load is faster this way too: 125,000 → 143,000 req/s from `oha -c 32`
/// (medians of 4 alternated runs; docs/decisions.md).
fn serve_thread_per_core(listener: std::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut workers = Vec::new();
    for _ in 0..cores {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        workers.push(tx);
        let acceptor = acceptor.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                while let Some(tcp) = rx.recv().await {
                    let _ = tcp.set_nonblocking(true);
                    if let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) {
                        tokio::spawn(serve(acceptor.clone(), tcp));
                    }
                }
            });
        });
    }
    for (tcp, worker) in listener.incoming().zip(workers.iter().cycle()) {
        if let Ok(tcp) = tcp {
            let _ = worker.send(tcp);
        }
    }
}

/// `BENCH_ORIGIN_SHARED_RUNTIME=1`: tokio's multi-threaded scheduler, the origin the
/// benchmarks used before session 8, for comparing with their figures.
fn serve_on_shared_runtime(listener: std::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(acceptor.clone(), tcp));
        }
    });
}

async fn serve(acceptor: tokio_rustls::TlsAcceptor, tcp: tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let svc = hyper::service::service_fn(handle);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    }
}
