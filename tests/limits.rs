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

/// `GET /healthz` on the admin listener: its status, or 0 without an answer in 3 s.
async fn healthz(proxy: &Proxy) -> u16 {
    let ask = async {
        let mut tcp = tokio::net::TcpStream::connect(proxy.admin).await.ok()?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.ok()?;
        Some(parse_status(&String::from_utf8_lossy(&out)))
    };
    tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// SPEC §4a, open files: under a 256 open-files limit (soft and hard) and the default
/// `--max-connections` of 4096, the proxy caps connections to what fits (one warning),
/// so 150 tunnels each with a request in flight upstream (two descriptors each) meet
/// `503 too_many_connections` instead of running out of descriptors: no CONNECT hangs,
/// every admitted request is answered, `/healthz` keeps answering, and the log is not
/// flooded with accept failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_low_open_files_limit_the_cap_answers_503_before_descriptors_run_out() {
    let (ca, up) = upstream().await;
    let port = up.port();
    let proxy = ProxyBuilder::new(&routes(port))
        .upstream(&ca, &[("api.test", port)])
        .open_files_limit(256, 256)
        .start();
    let h = format!("api.test:{port}");
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for i in 0..150 {
        let attempt = tokio::time::timeout(Duration::from_secs(10), async {
            let tls = proxy
                .tunnel_sni("api.test", port, &[b"http/1.1"], "api.test")
                .await?;
            let mut c = h1(tls).await;
            // A stream that stays open upstream: its connection is held while we hold it.
            let r = c
                .send_request(get(&h, "/sse?n=1000&ms=1000").body(empty()).unwrap())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((c, r))
        })
        .await;
        match attempt {
            Ok(Ok((c, r))) => {
                assert_eq!(r.status(), 200, "request {i} on an admitted tunnel");
                admitted.push((c, r));
            }
            Ok(Err(e)) if e.contains("503") => refused += 1,
            Ok(Err(e)) => panic!("attempt {i}: {e}; logs: {}", proxy.logs()),
            Err(_) => panic!(
                "attempt {i} hung ({} admitted, {refused} refused); logs: {}",
                admitted.len(),
                proxy.logs()
            ),
        }
    }
    eprintln!("{} admitted, {refused} refused", admitted.len());
    assert!(
        admitted.len() >= 30 && refused > 0,
        "{} admitted, {refused} refused",
        admitted.len()
    );
    let (status, text, _) = proxy.connect(&h).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("too_many_connections"), "{text}");
    assert_eq!(healthz(&proxy).await, 200, "/healthz at the cap");
    let logs = proxy.logs();
    let accept_failures = logs.matches("accept failed").count();
    assert!(
        accept_failures <= 2,
        "{accept_failures} accept failures: {logs}"
    );
    assert_eq!(
        logs.matches("\"event\":\"connection_cap\"").count(),
        1,
        "one warning about the cap: {logs}"
    );
    drop(admitted);
}

/// SPEC §4a: at start the soft open-files limit is raised to the hard limit.
#[tokio::test]
async fn the_soft_open_files_limit_is_raised_to_the_hard_limit() {
    let (ca, up) = upstream().await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .open_files_limit(256, 4096)
        .start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["4096", "4096"], "{line}");
}

/// SPEC §4a, open files, when agents fan out: HTTP/2 agent connections whose streams each
/// need an HTTP/1.1 upstream connection (five hosts, 50 streams each) would take far more
/// than two descriptors apiece. Upstream connections have a budget of their own (the
/// connection cap): the streams past it wait for a place, then get `503
/// too_many_connections`, never a 502 or a hang; descriptors never run out, `/healthz`
/// answers, a new CONNECT is answered, and the accept loop logs no flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fan_out_meets_the_upstream_connection_budget_not_the_descriptor_limit() {
    let ca = TestCa::new("ca");
    let hosts = ["a.test", "b.test", "c.test", "d.test", "e.test"];
    let up = Upstream::start(&ca, &hosts, &[b"http/1.1"]).await;
    let port = up.port();
    let routes: String = hosts
        .iter()
        .map(|h| format!("  - host: {h}\n    ports: [{port}]\n"))
        .collect();
    let pins: Vec<(&str, u16)> = hosts.iter().map(|h| (*h, port)).collect();
    let proxy = ProxyBuilder::new(&format!("routes:\n{routes}"))
        .upstream(&ca, &pins)
        .open_files_limit(256, 256)
        .arg("--connect-timeout")
        .arg("2")
        .start();
    let mut streams = Vec::new();
    for host in hosts {
        let c = h2(proxy.tunnel(host, port, &[b"h2"]).await).await;
        for _ in 0..50 {
            let mut c = c.clone();
            let req = http::Request::builder()
                .uri(format!("https://{host}:{port}/sse?n=1000&ms=1000"))
                .body(empty())
                .unwrap();
            streams.push(tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(20), c.send_request(req)).await;
                // Held open: each keeps its upstream connection.
                match r {
                    Ok(Ok(r)) => Some(r),
                    _ => None,
                }
            }));
        }
    }
    let mut held = Vec::new();
    for s in streams {
        held.push(s.await.unwrap());
    }
    let status =
        |r: &Option<http::Response<hyper::body::Incoming>>| r.as_ref().map(|r| r.status().as_u16());
    let answered = held.iter().filter(|r| status(r) == Some(200)).count();
    let refused = held.iter().filter(|r| status(r) == Some(503)).count();
    let open: usize = std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
        .unwrap()
        .count();
    eprintln!(
        "{answered} streams answered 200, {refused} got 503, proxy has {open} descriptors open"
    );
    assert_eq!(
        answered + refused,
        held.len(),
        "a stream got neither 200 nor 503, or hung"
    );
    assert!(answered >= 10, "only {answered} streams were served");
    assert!(refused > 0, "the budget was never met");
    assert!(open < 256 - 16, "descriptors ran out ({open} open)");
    let logs = proxy.logs();
    assert!(
        !logs.contains("\"status\":502"),
        "a 502 when the budget was spent: {logs}"
    );
    let h = format!("a.test:{port}");
    let (status, text, _) = tokio::time::timeout(Duration::from_secs(5), proxy.connect(&h))
        .await
        .expect("a new CONNECT hung");
    assert_eq!(status, 200, "{text}");
    assert_eq!(healthz(&proxy).await, 200, "/healthz with the budget spent");
    let accept_failures = logs.matches("accept failed").count();
    assert!(
        accept_failures <= 4,
        "{accept_failures} accept failures: {logs}"
    );
    drop(held);
}

/// The agent can reach the admin port: connections that never finish their request must
/// not take the slots a health probe needs (the image's HEALTHCHECK gives it 3 s).
#[tokio::test]
async fn half_sent_admin_requests_do_not_starve_the_health_probe() {
    let (ca, up) = upstream().await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .start();
    let mut lingering = Vec::new();
    for _ in 0..40 {
        let mut tcp = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n")
            .await
            .unwrap();
        lingering.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(
            healthz(&proxy).await,
            200,
            "/healthz starved by half-sent requests"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    drop(lingering);
}
