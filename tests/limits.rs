//! Limits of SPEC §4a that issue #3's proxy already enforces: head size, connection cap,
//! idle and handshake timeouts, and the upstream response-head timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn routes(port: u16) -> String {
    format!("routes:\n  - host: api.test\n    ports: [{port}]\n")
}

async fn upstream() -> (TestCa, Upstream) {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    (ca, up)
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let (ca, up) = upstream().await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .arg("--max-header-bytes")
        .arg("4096")
        .start();
    let mut c = h1(proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await).await;
    let req = get(&format!("api.test:{}", up.port()), "/x")
        .header("x-big", "a".repeat(6000))
        .body(empty())
        .unwrap();
    let (st, headers, body) = collect(c.send_request(req).await.unwrap()).await;
    assert_refusal(st, &headers, &body, 431, "headers_too_large");
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn connections_over_the_cap_get_503() {
    let (ca, up) = upstream().await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .arg("--max-connections")
        .arg("2")
        .start();
    let _a = proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await;
    let _b = proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await;
    let (status, text, _) = proxy.connect(&format!("api.test:{}", up.port())).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("too_many_connections"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("proxy-status: egress-proxy; error=connection_limit_reached"),
        "{text}"
    );
    drop(_a);
    // A slot frees up once a connection closes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await;
}

#[tokio::test]
async fn idle_connections_and_silent_handshakes_are_closed() {
    let (ca, up) = upstream().await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .arg("--idle-timeout")
        .arg("1")
        .arg("--client-timeout")
        .arg("1")
        .start();
    // A CONNECT never followed by TLS is closed after the client timeout.
    let (status, _, mut tcp) = proxy.connect(&format!("api.test:{}", up.port())).await;
    assert_eq!(status, 200);
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // A tunnel with no request in flight is closed after the idle timeout.
    let tls = proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await;
    let mut c = h1(tls).await;
    let ok = c
        .send_request(
            get(&format!("api.test:{}", up.port()), "/x")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(collect(ok).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        c.send_request(
            get(&format!("api.test:{}", up.port()), "/x")
                .body(empty())
                .unwrap()
        )
        .await
        .is_err(),
        "idle tunnel should be closed"
    );
    // A client that never finishes its CONNECT head is dropped too.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"CONNECT api.test:443 HTTP/1.1\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

/// Trickles a request head into `tls` a byte every 100 ms and never finishes it; how long
/// the proxy took to close the connection (`None`: still open after 6 s).
async fn trickled_head_lasts(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    port: u16,
) -> Option<Duration> {
    let (mut rd, mut wr) = tokio::io::split(tls);
    let start = Instant::now();
    let head = format!("GET /x HTTP/1.1\r\nhost: api.test:{port}\r\nx-slow: ");
    let trickle = async move {
        wr.write_all(head.as_bytes()).await?;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            wr.write_all(b"a").await?;
        }
        std::io::Result::Ok(())
    };
    let closed = async move {
        let mut buf = [0u8; 256];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        _ = closed => Some(start.elapsed()),
        // A write failing means the proxy closed the connection too.
        r = trickle => r.is_err().then(|| start.elapsed()),
    }
}

#[tokio::test]
async fn a_tunnel_request_head_must_complete_within_the_idle_timeout() {
    let (ca, up) = upstream().await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .arg("--idle-timeout")
        .arg("1")
        .start();
    // The first head of a tunnel.
    let tls = proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await;
    let took = trickled_head_lasts(tls, up.port()).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_millis(1800)),
        "{took:?}"
    );
    // A head after a request completed on the same connection.
    let mut tls = proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await;
    let req = format!("GET /x HTTP/1.1\r\nhost: api.test:{}\r\n\r\n", up.port());
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let took = trickled_head_lasts(tls, up.port()).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_millis(1800)),
        "{took:?}"
    );
}

#[tokio::test]
async fn silent_upstream_response_head_is_504() {
    let (ca, up) = upstream().await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .arg("--response-timeout")
        .arg("1")
        .start();
    let mut c = h1(proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await).await;
    let start = Instant::now();
    let req = get(&format!("api.test:{}", up.port()), "/slow-head")
        .body(empty())
        .unwrap();
    let (st, headers, body) = collect(c.send_request(req).await.unwrap()).await;
    assert_refusal(st, &headers, &body, 504, "upstream_timeout");
    assert!(
        headers["proxy-status"]
            .to_str()
            .unwrap()
            .contains("error=http_response_timeout")
    );
    assert!(start.elapsed() < Duration::from_millis(2500));
}
