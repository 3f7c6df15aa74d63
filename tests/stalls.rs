//! What real agents and upstreams do that is slow but not wrong (SPEC §4a, §4.3): agents
//! that stop reading, uploads that take longer than the response timeout, parallel first
//! calls to one host, and an agent body that breaks its own framing.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn routes(port: u16) -> String {
    format!("routes:\n  - host: api.test\n    ports: [{port}]\n")
}

async fn upstream(alpn: &[&[u8]]) -> (TestCa, Upstream) {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], alpn).await;
    (ca, up)
}

/// The proxy in front of `up`, with `--response-timeout` (and `--idle-timeout`) when given.
fn proxy_for(ca: &TestCa, up: &Upstream, timeout: Option<&str>) -> Proxy {
    let mut b = ProxyBuilder::new(&routes(up.port())).upstream(ca, &[("api.test", up.port())]);
    if let Some(t) = timeout {
        b = b
            .arg("--response-timeout")
            .arg(t)
            .arg("--idle-timeout")
            .arg(t);
    }
    b.start()
}

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];

/// Polls `cond` every 50 ms for up to `limit`; how long it took, or `None`.
async fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// An HTTP/1.1 agent that asks for a large download and then reads nothing.
async fn stalled_download(
    proxy: &Proxy,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = proxy.tunnel("api.test", port, H1).await;
    let head = format!(
        "GET /download/{} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n",
        64 << 20
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls
}

#[tokio::test]
async fn agents_that_stop_reading_do_not_starve_others_on_a_shared_http2_upstream() {
    let (ca, up) = upstream(H2).await;
    let proxy = proxy_for(&ca, &up, None);
    // Six agents stop reading 64 MiB downloads, all on the one upstream connection.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        stalled.push(stalled_download(&proxy, up.port()).await);
    }
    assert!(
        within(Duration::from_secs(10), || up
            .downloading
            .load(Ordering::SeqCst)
            == 6)
        .await
        .is_some(),
        "the six downloads did not start"
    );
    // Let them fill whatever windows and buffers they can.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut c = h1(proxy.tunnel("api.test", up.port(), H1).await).await;
    let fresh = c.send_request(
        get(&format!("api.test:{}", up.port()), "/small")
            .body(empty())
            .unwrap(),
    );
    let response = tokio::time::timeout(Duration::from_secs(5), fresh)
        .await
        .expect("a fresh request was starved by the stalled ones")
        .unwrap();
    let (st, _, _) = collect(response).await;
    assert_eq!(st, 200);
    let big = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = h1(proxy.tunnel("api.test", up.port(), H1).await).await;
        let r = c
            .send_request(
                get(
                    &format!("api.test:{}", up.port()),
                    &format!("/download/{}", 4 << 20),
                )
                .body(empty())
                .unwrap(),
            )
            .await
            .unwrap();
        collect(r).await.2.len()
    })
    .await
    .expect("a fresh download was starved by the stalled ones");
    assert_eq!(big, 4 << 20);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "all on one upstream connection"
    );
    drop(stalled);
}

/// A reader that stops is cut after `--response-timeout`, and what it held upstream is
/// released: for an HTTP/1.1 agent whose socket is full, over either upstream protocol.
#[tokio::test]
async fn an_http1_agent_that_stops_reading_is_cut_and_its_upstream_released() {
    for alpn in [H1, H2] {
        let (ca, up) = upstream(alpn).await;
        let proxy = proxy_for(&ca, &up, Some("2"));
        // The reader stalls after the request goes out, so no cut can come sooner than
        // the timeout after this.
        let sent = Instant::now();
        let mut tls = stalled_download(&proxy, up.port()).await;
        let started = within(Duration::from_secs(10), || {
            up.downloading.load(Ordering::SeqCst) == 1
        });
        assert!(
            started.await.is_some(),
            "{alpn:?}: the download did not start"
        );
        let released = within(Duration::from_secs(20), || {
            up.downloading.load(Ordering::SeqCst) == 0
        });
        assert!(
            released.await.is_some(),
            "{alpn:?}: the upstream download was never released"
        );
        let after = sent.elapsed();
        assert!(
            after >= Duration::from_millis(1900),
            "{alpn:?}: released too early: {after:?}"
        );
        let logged = within(Duration::from_secs(5), || {
            proxy
                .logs()
                .contains("\"detail\":\"cut: the agent read nothing for 2s\"")
        });
        assert!(
            logged.await.is_some(),
            "{alpn:?}: the cut is not in the log: {}",
            proxy.logs()
        );
        // The agent's connection is closed: reading what was buffered ends, without the
        // whole 64 MiB.
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "{alpn:?}: the agent's connection stayed open"
        );
        assert!(total < 64 << 20, "{alpn:?}: the whole body arrived");
    }
}

/// An HTTP/2 agent that opens streams with a zero window (it never reads them) holds
/// upstream connections (an HTTP/1.1 upstream) or streams (HTTP/2) only until the response
/// timeout.
#[tokio::test]
async fn an_http2_agent_with_closed_windows_holds_nothing_upstream_past_the_timeout() {
    const STREAMS: usize = 12;
    for alpn in [H1, H2] {
        let (ca, up) = upstream(alpn).await;
        // 5 s: time enough for a loaded machine to start every download (an HTTP/1.1
        // upstream needs a connection for each) before the first is cut.
        let proxy = proxy_for(&ca, &up, Some("5"));
        let tls = proxy.tunnel("api.test", up.port(), &[b"h2"]).await;
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(0)
                .handshake::<_, ClientBody>(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let sent = Instant::now();
        let mut responses = Vec::new();
        for _ in 0..STREAMS {
            let mut s = sender.clone();
            let uri = format!("https://api.test:{}/download/{}", up.port(), 8 << 20);
            let req = Request::get(uri).body(empty()).unwrap();
            // The responses are kept, unread: dropping one would reset its stream.
            responses.push(tokio::spawn(async move { s.send_request(req).await }));
        }
        let started = within(Duration::from_secs(15), || up.seen().len() == STREAMS).await;
        assert!(
            started.is_some(),
            "{alpn:?}: the downloads did not all start: {}",
            proxy.logs()
        );
        assert!(
            up.downloading.load(Ordering::SeqCst) > 0,
            "{alpn:?}: the downloads were cut before the timeout"
        );
        let released = within(Duration::from_secs(20), || {
            up.downloading.load(Ordering::SeqCst) == 0
        });
        assert!(
            released.await.is_some(),
            "{alpn:?}: {} upstream downloads still held",
            up.downloading.load(Ordering::SeqCst)
        );
        let after = sent.elapsed();
        assert!(
            after >= Duration::from_millis(4900),
            "{alpn:?}: released too early: {after:?}"
        );
        let cuts = proxy
            .logs()
            .matches("\"detail\":\"cut: the agent read nothing for 5s\"")
            .count();
        assert_eq!(cuts, STREAMS, "{alpn:?}: {}", proxy.logs());
        drop(responses);
    }
}

fn body_of(b: Bytes) -> ClientBody {
    http_body_util::Full::new(b).map_err(|e| match e {}).boxed()
}

/// A chunked upload, 1 KiB every 300 ms for about 4 s, with `--response-timeout 2`.
fn slow_upload() -> ClientBody {
    let chunks = futures_util::stream::unfold(0u64, |i| async move {
        if i == 14 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let chunk: Vec<u8> = (i * 1024..(i + 1) * 1024).map(pattern_byte).collect();
        Some((Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))), i + 1))
    });
    StreamBody::new(chunks).boxed()
}

#[tokio::test]
async fn an_upload_that_keeps_moving_is_never_cut_by_the_response_timeout() {
    for upstream_alpn in [H1, H2] {
        for agent_alpn in [H1, H2] {
            let (ca, up) = upstream(upstream_alpn).await;
            let proxy = proxy_for(&ca, &up, Some("2"));
            let tls = proxy.tunnel("api.test", up.port(), agent_alpn).await;
            let req = Request::post("/upload")
                .header("host", format!("api.test:{}", up.port()))
                .body(slow_upload())
                .unwrap();
            let response = if agent_alpn == H1 {
                h1(tls).await.send_request(req).await.unwrap()
            } else {
                let req = Request::post(format!("https://api.test:{}/upload", up.port()))
                    .body(slow_upload())
                    .unwrap();
                h2(tls).await.send_request(req).await.unwrap()
            };
            let (st, _, body) = collect(response).await;
            let what = format!("upstream {upstream_alpn:?}, agent {agent_alpn:?}");
            assert_eq!(st, 200, "{what}: {}", String::from_utf8_lossy(&body));
            let v = json(&body);
            assert_eq!(v["len"], 14 * 1024, "{what}");
            assert_eq!(v["mismatches"], 0, "{what}");
        }
    }
}

/// An upload the upstream stops taking (it never reads nor answers) is cut after the
/// response timeout with 504, and the upstream request is abandoned (stream reset or
/// connection closed), for either upstream protocol.
#[tokio::test]
async fn an_upload_the_upstream_stops_taking_is_504_and_released() {
    for alpn in [H1, H2] {
        let (ca, up) = upstream(alpn).await;
        let proxy = proxy_for(&ca, &up, Some("2"));
        let mut c = h1(proxy.tunnel("api.test", up.port(), H1).await).await;
        // 4 MiB: more than the windows and buffers on the way take.
        let body = Bytes::from(vec![1u8; 4 << 20]);
        let req = Request::post("/hold")
            .header("host", format!("api.test:{}", up.port()))
            .body(body_of(body))
            .unwrap();
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(15), c.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{alpn:?}: no answer"));
        let (st, headers, body) = collect(r.unwrap()).await;
        assert_refusal(st, &headers, &body, 504, "upstream_timeout");
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "{alpn:?}: cut too early"
        );
        let released = within(Duration::from_secs(5), || {
            up.holding.load(Ordering::SeqCst) == 0
        })
        .await;
        assert!(
            released.is_some(),
            "{alpn:?}: the upstream request is still held"
        );
    }
}

#[tokio::test]
async fn simultaneous_first_requests_share_one_http2_upstream_connection() {
    let (ca, up) = upstream(H2).await;
    let proxy = proxy_for(&ca, &up, None);
    // Ten agents, tunnels ready, send their first requests together.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(h1(proxy.tunnel("api.test", up.port(), H1).await).await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let mut tasks = Vec::new();
    for mut c in clients {
        let barrier = barrier.clone();
        let port = up.port();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = c
                .send_request(
                    get(&format!("api.test:{port}"), "/first")
                        .body(empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            collect(r).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "each simultaneous first request made its own upstream connection"
    );
}

/// A chunked body with a chunk size that is not one (overflowing, negative, not hex) is
/// the agent's error: 400 `bad_request`, not a 502, over either upstream protocol.
#[tokio::test]
async fn an_agent_body_that_breaks_its_framing_is_400() {
    for alpn in [H1, H2] {
        let (ca, up) = upstream(alpn).await;
        let proxy = proxy_for(&ca, &up, None);
        for size in ["FFFFFFFFFFFFFFFFFFFF", "-1", "zz"] {
            let raw = format!(
                "POST /upload HTTP/1.1\r\nHost: api.test:{}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n{size}\r\nabc\r\n0\r\n\r\n",
                up.port()
            );
            let answer = proxy
                .raw_in_tunnel(
                    "api.test",
                    up.port(),
                    raw.as_bytes(),
                    Duration::from_secs(3),
                )
                .await;
            assert_eq!(parse_status(&answer), 400, "{alpn:?} {size}: {answer}");
            assert!(
                answer.contains("\"bad_request\""),
                "{alpn:?} {size}: {answer}"
            );
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains("error=http_request_error"),
                "{alpn:?} {size}: {answer}"
            );
        }
        // Fewer bytes than the Content-Length, then the agent stops sending.
        let mut tls = proxy.tunnel("api.test", up.port(), H1).await;
        let raw = format!(
            "POST /upload HTTP/1.1\r\nHost: api.test:{}\r\nContent-Length: 100\r\n\r\nonly ten b",
            up.port()
        );
        tls.write_all(raw.as_bytes()).await.unwrap();
        tls.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        let answer = String::from_utf8_lossy(&out);
        assert_eq!(parse_status(&answer), 400, "{alpn:?} short body: {answer}");
        assert!(
            answer.contains("\"bad_request\""),
            "{alpn:?} short body: {answer}"
        );
    }
}
