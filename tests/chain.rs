//! Chaining through an upstream proxy (SPEC §2, §4.3): CONNECT by hostname, credentials
//! for the proxy only, NO_PROXY bypass, refusals reported with the proxy's status.

mod common;

use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "chain-origin-token";

fn routes(port: u16) -> String {
    format!(
        "routes:\n  - host: api.test\n    ports: [{port}]\n    auth_scheme: Bearer\n    token_env: CHAIN_TOKEN\n  - host: direct.test\n    ports: [{port}]\n"
    )
}

async fn request(
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> (http::StatusCode, http::HeaderMap, bytes::Bytes) {
    let mut c = h1(proxy.tunnel(host, port, &[b"http/1.1"]).await).await;
    let req = get(&format!("{host}:{port}"), "/v1/x")
        .body(empty())
        .unwrap();
    collect(c.send_request(req).await.unwrap()).await
}

#[tokio::test]
async fn requests_go_through_the_upstream_proxy_by_hostname_with_its_credentials() {
    let ca = TestCa::new("origin");
    let up = Upstream::start(&ca, &["api.test", "direct.test"], &[b"h2", b"http/1.1"]).await;
    let port = up.port();
    let dlp =
        TestUpstreamProxy::start(ProxyMode::Tunnel(Some("Basic dXNlcjpwQHNz".into())), None).await;
    let proxy = ProxyBuilder::new(&routes(port))
        .upstream(&ca, &[("direct.test", port)])
        .env("CHAIN_TOKEN", TOKEN)
        .env(
            "HTTPS_PROXY",
            &format!("http://user:p%40ss@127.0.0.1:{}", dlp.addr.port()),
        )
        .env("NO_PROXY", "direct.test,.example.org")
        .start();
    for _ in 0..3 {
        let (status, _, body) = request(&proxy, "api.test", port).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let seen = dlp.seen();
    assert_eq!(seen.len(), 1, "the chained connection is pooled: {seen:?}");
    assert_eq!(
        seen[0].target,
        format!("api.test:{port}"),
        "named by hostname"
    );
    assert_eq!(seen[0].authorization.as_deref(), Some("Basic dXNlcjpwQHNz"));
    let origin = &up.seen()[0];
    assert_eq!(origin.headers["authorization"], format!("Bearer {TOKEN}"));
    assert!(origin.headers.get("proxy-authorization").is_none());
    // NO_PROXY: direct, never through the upstream proxy.
    let (status, _, _) = request(&proxy, "direct.test", port).await;
    assert_eq!(status, 200);
    assert!(
        dlp.seen()
            .iter()
            .all(|s| !s.target.starts_with("direct.test"))
    );
    let logs = proxy.logs_with("http://***@127.0.0.1");
    assert!(
        !logs.contains("p%40ss") && !logs.contains("dXNlcjpwQHNz") && !logs.contains(TOKEN),
        "{logs}"
    );
    assert!(
        logs.contains("http://***@127.0.0.1"),
        "start line names the proxy without credentials: {logs}"
    );
}

#[tokio::test]
async fn refusals_from_the_upstream_proxy_are_502_with_its_status() {
    let ca = TestCa::new("origin");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    for (mode, received) in [
        (ProxyMode::Status(403), Some(403)),
        (ProxyMode::Tunnel(Some("Basic other".into())), Some(407)),
        (ProxyMode::Status(502), Some(502)),
        (ProxyMode::Close, None),
    ] {
        let dlp = TestUpstreamProxy::start(mode.clone(), None).await;
        let proxy = ProxyBuilder::new(&routes(port))
            .upstream(&ca, &[])
            .env("CHAIN_TOKEN", TOKEN)
            .arg("--upstream-proxy")
            .arg(format!("http://127.0.0.1:{}", dlp.addr.port()))
            .start();
        let start = Instant::now();
        let (status, headers, body) = request(&proxy, "api.test", port).await;
        assert_refusal(status, &headers, &body, 502, "upstream_proxy_refused");
        let ps = headers["proxy-status"].to_str().unwrap();
        assert!(ps.contains("error=connection_refused"), "{ps}");
        match received {
            Some(code) => assert!(
                ps.ends_with(&format!("received-status={code}")),
                "{mode:?}: {ps}"
            ),
            None => assert!(!ps.contains("received-status"), "{ps}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{mode:?} took {:?}",
            start.elapsed()
        );
        assert_eq!(
            dlp.seen().len(),
            1,
            "never retried with other credentials: {mode:?}"
        );
        assert!(up.seen().is_empty());
    }
}

#[tokio::test]
async fn https_upstream_proxy_is_verified_and_tunnels_end_to_end() {
    let ca = TestCa::new("origin and proxy");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let dlp = TestUpstreamProxy::start(ProxyMode::Tunnel(None), Some(&ca)).await;
    let proxy = ProxyBuilder::new(&routes(port))
        .upstream(&ca, &[("proxy.test", dlp.addr.port())])
        .env("CHAIN_TOKEN", TOKEN)
        .arg("--upstream-proxy")
        .arg(format!("https://proxy.test:{}", dlp.addr.port()))
        .start();
    let (status, _, _) = request(&proxy, "api.test", port).await;
    assert_eq!(status, 200);
    assert_eq!(dlp.seen()[0].target, format!("api.test:{port}"));
    // A proxy whose certificate we do not trust is a TLS failure, never a fallback.
    let rogue = TestCa::new("rogue");
    let bad = TestUpstreamProxy::start(ProxyMode::Tunnel(None), Some(&rogue)).await;
    let proxy = ProxyBuilder::new(&routes(port))
        .upstream(&ca, &[("proxy.test", bad.addr.port())])
        .env("CHAIN_TOKEN", TOKEN)
        .arg("--upstream-proxy")
        .arg(format!("https://proxy.test:{}", bad.addr.port()))
        .start();
    let (status, headers, body) = request(&proxy, "api.test", port).await;
    assert_refusal(status, &headers, &body, 502, "upstream_tls");
    assert!(bad.seen().is_empty());
}

#[tokio::test]
async fn a_proxy_that_never_answers_meets_the_connect_timeout() {
    let ca = TestCa::new("origin");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    // Accepts and then says nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[])
        .env("CHAIN_TOKEN", TOKEN)
        .arg("--connect-timeout")
        .arg("1")
        .arg("--upstream-proxy")
        .arg(format!(
            "http://127.0.0.1:{}",
            silent.local_addr().unwrap().port()
        ))
        .start();
    let start = Instant::now();
    let (status, headers, body) = request(&proxy, "api.test", up.port()).await;
    assert_refusal(status, &headers, &body, 504, "upstream_timeout");
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(silent);
}

#[test]
fn bad_or_looping_upstream_proxy_urls_stop_the_start() {
    let routes = "routes:\n  - host: a.test\n";
    let err = ProxyBuilder::new(routes)
        .env("HTTPS_PROXY", "socks5://p:1080")
        .try_start()
        .err()
        .unwrap();
    assert!(
        err.contains("HTTPS_PROXY") && err.contains("scheme"),
        "{err}"
    );
    let err = ProxyBuilder::new(routes)
        .arg("--upstream-proxy")
        .arg("http://user:hunter2@p:99999")
        .try_start()
        .err()
        .unwrap();
    assert!(
        err.contains("--upstream-proxy") && !err.contains("hunter2"),
        "{err}"
    );
    let err = ProxyBuilder::new(routes)
        .arg("--no-proxy")
        .arg("bad host!")
        .try_start()
        .err()
        .unwrap();
    assert!(err.contains("--no-proxy"), "{err}");
    // The sidecar inherited the bottle's HTTPS_PROXY, which names itself.
    let err = ProxyBuilder::new(routes)
        .self_as_upstream_proxy()
        .try_start()
        .err()
        .unwrap();
    assert!(err.contains("own listener"), "{err}");
}
