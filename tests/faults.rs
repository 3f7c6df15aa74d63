//! Upstream faults (SPEC §4.3, §4a), from a raw TLS upstream that misbehaves on command:
//! a stale pooled connection (retried once for a bodiless idempotent request, never for
//! anything else), oversized and malformed response heads, an upstream that never
//! completes its TLS handshake.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Answer the first request on each connection; close on the second without a word.
    OneAnswerPerConnection,
    /// Answer with a 100 KiB response head.
    HugeHead,
    /// Answer with bytes that are not HTTP.
    Garbage,
}

struct RawUpstream {
    port: u16,
    /// Request lines received, in order.
    requests: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

async fn raw_upstream(ca: &TestCa, fault: Fault) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(ca.server_config(&["api.test"], &[b"http/1.1"]));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (reqs, conns) = (requests.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            let (acceptor, reqs) = (acceptor.clone(), reqs.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut answered = 0;
                loop {
                    // Read one head (and a Content-Length body, if any).
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    let _ = tls.read_exact(&mut body).await;
                    reqs.lock()
                        .unwrap()
                        .push(text.lines().next().unwrap_or("").to_owned());
                    match fault {
                        Fault::OneAnswerPerConnection if answered == 0 => {
                            let answer: &[u8] = if text.starts_with("HEAD ") {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            let _ = tls.write_all(answer).await;
                            answered += 1;
                        }
                        Fault::OneAnswerPerConnection => {
                            // A keep-alive connection the server gave up on: it read the
                            // request and closes without answering.
                            let _ = tls.shutdown().await;
                            return;
                        }
                        Fault::HugeHead => {
                            let big = "a".repeat(100 * 1024);
                            let _ = tls.write_all(format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 0\r\n\r\n").as_bytes()).await;
                        }
                        Fault::Garbage => {
                            let _ = tls.write_all(b"HELLO THERE\r\n\r\n").await;
                            let _ = tls.shutdown().await;
                            return;
                        }
                    }
                }
            });
        }
    });
    RawUpstream {
        port,
        requests,
        connections,
    }
}

fn routes(port: u16) -> String {
    format!("routes:\n  - host: api.test\n    ports: [{port}]\n")
}

async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<ClientBody>,
    method: &str,
    path: &str,
    port: u16,
    data: &str,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("api.test:{port}"))
        .body(if data.is_empty() {
            empty()
        } else {
            body(data.to_owned())
        })
        .unwrap();
    let (st, h, b) = collect(c.send_request(req).await.unwrap()).await;
    (st.as_u16(), h, b)
}

#[tokio::test]
async fn stale_pooled_connection_retries_bodiless_idempotent_requests_once_only() {
    let ca = TestCa::new("ca");
    let up = raw_upstream(&ca, Fault::OneAnswerPerConnection).await;
    let proxy = ProxyBuilder::new(&routes(up.port))
        .upstream(&ca, &[("api.test", up.port)])
        .start();
    let mut c = h1(proxy.tunnel("api.test", up.port, &[b"http/1.1"]).await).await;
    for (method, path) in [
        ("GET", "/one"),
        ("GET", "/two"),
        ("HEAD", "/three"),
        ("OPTIONS", "/four"),
    ] {
        let (st, _, _) = send(&mut c, method, path, up.port, "").await;
        assert_eq!(st, 200, "{method} {path}");
        // Let the connection go back to the pool before the next request.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let seen = up.requests.lock().unwrap().clone();
    // The first GET on a new connection; each later one on the reused (stale) connection,
    // then once more on a new one.
    assert_eq!(
        seen.iter()
            .map(|l| l.split(' ').nth(1).unwrap_or("").to_owned())
            .collect::<Vec<_>>(),
        ["/one", "/two", "/two", "/three", "/three", "/four", "/four"],
        "{seen:?}"
    );
    // A request with a body on a stale connection is never replayed: 502.
    let (st, headers, b) = send(&mut c, "POST", "/five", up.port, "payload").await;
    assert_eq!(st, 502, "{}", String::from_utf8_lossy(&b));
    assert!(headers.contains_key("proxy-status"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Nor is a non-idempotent bodiless one.
    let (_, _, _) = send(&mut c, "GET", "/six", up.port, "").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (st, _, _) = send(&mut c, "DELETE", "/seven", up.port, "").await;
    assert_eq!(st, 502);
    let seen = up.requests.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|l| l.contains("/five")).count(),
        1,
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.contains("/seven")).count(),
        1,
        "{seen:?}"
    );
}

#[tokio::test]
async fn oversized_and_malformed_response_heads_are_502_upstream_bad_response() {
    let ca = TestCa::new("ca");
    for (fault, detail) in [
        (Fault::HugeHead, "http_response_header_section_size"),
        (Fault::Garbage, "http_protocol_error"),
    ] {
        let up = raw_upstream(&ca, fault).await;
        let proxy = ProxyBuilder::new(&routes(up.port))
            .upstream(&ca, &[("api.test", up.port)])
            .start();
        let mut c = h1(proxy.tunnel("api.test", up.port, &[b"http/1.1"]).await).await;
        let (st, headers, b) = send(&mut c, "GET", "/x", up.port, "").await;
        assert_refusal(
            http::StatusCode::from_u16(st).unwrap(),
            &headers,
            &b,
            502,
            "upstream_bad_response",
        );
        let ps = headers["proxy-status"].to_str().unwrap();
        assert!(ps.contains(detail), "{fault:?}: {ps}");
        assert!(up.connections.load(Ordering::SeqCst) >= 1);
    }
}

#[tokio::test]
async fn upstream_that_never_completes_tls_meets_the_connect_timeout() {
    let ca = TestCa::new("ca");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let proxy = ProxyBuilder::new(&routes(port))
        .upstream(&ca, &[("api.test", port)])
        .arg("--connect-timeout")
        .arg("1")
        .start();
    let mut c = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
    let start = Instant::now();
    let (st, headers, b) = send(&mut c, "GET", "/x", port, "").await;
    assert_refusal(
        http::StatusCode::from_u16(st).unwrap(),
        &headers,
        &b,
        504,
        "upstream_timeout",
    );
    assert!(
        headers["proxy-status"]
            .to_str()
            .unwrap()
            .contains("error=connection_timeout")
    );
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    drop(silent);
}
