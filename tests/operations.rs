//! Live operations (SPEC §5, §6): hot reload by SIGHUP and by file change, reload under
//! load, graceful shutdown, the admin endpoints, and logs and metrics free of secrets.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use http_body_util::BodyExt;

const TOKEN: &str = "ops-secret-token-77";

/// Routes allowing `paths` on api.test (with a token) and, when `with_b`, b.test too.
fn routes(port: u16, paths: &[&str], with_b: bool) -> String {
    let paths = paths
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut r = format!(
        "routes:\n  - host: api.test\n    ports: [{port}]\n    path_allowlist: [{paths}]\n    auth_scheme: Bearer\n    token_env: OPS_TOKEN\n"
    );
    if with_b {
        r.push_str(&format!("  - host: b.test\n    ports: [{port}]\n"));
    }
    r
}

/// Replaces a file the way an editor or `docker cp` does: write beside it, rename over it.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The value of one sample line in a metrics exposition (0 when absent).
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

async fn reloads_ok(proxy: &Proxy) -> f64 {
    metric(
        &proxy.admin_get("/metrics").await.1,
        "egress_proxy_reloads_total{result=\"ok\"}",
    )
}

/// Polls `f` every 25 ms until it is true or `limit` passes; how long it took.
async fn within<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

async fn complete_200(r: Result<http::Response<hyper::body::Incoming>, hyper::Error>) -> bool {
    match r {
        Ok(r) if r.status() == 200 => r.into_body().collect().await.is_ok(),
        _ => false,
    }
}

async fn connect_status(proxy: &Proxy, target: &str) -> u16 {
    proxy.connect(target).await.0
}

#[tokio::test]
async fn sighup_reload_adds_routes_and_rereads_token_files() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test", "b.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let text = |with_b: bool| {
        let mut r = format!(
            "routes:\n  - host: api.test\n    ports: [{port}]\n    auth_scheme: Bearer\n    token_file: {}\n",
            token_file.display()
        );
        if with_b {
            r.push_str(&format!("  - host: b.test\n    ports: [{port}]\n"));
        }
        r
    };
    let proxy = ProxyBuilder::new(&text(false))
        .upstream(&ca, &[("api.test", port), ("b.test", port)])
        .start();
    let b = format!("b.test:{port}");
    assert_eq!(connect_status(&proxy, &b).await, 403);

    // A rotated secret outside the routes directory: only SIGHUP re-reads it.
    std::fs::write(&token_file, "rotated-token\n").unwrap();
    proxy.signal("HUP");
    let auth = || async {
        let mut c = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
        let (_, _, body) = collect(
            c.send_request(
                get(&format!("api.test:{port}"), "/x")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap(),
        )
        .await;
        json(&body)["headers"]["authorization"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        within(Duration::from_secs(3), || async {
            auth().await == "Bearer rotated-token"
        })
        .await
        .is_some()
    );

    // A new route, applied by SIGHUP (the file watch may see it first: either way it lands).
    replace_file(&proxy.dir.path().join("routes.yaml"), &text(true));
    proxy.signal("HUP");
    assert!(
        within(Duration::from_secs(3), || async {
            connect_status(&proxy, &b).await == 200
        })
        .await
        .is_some()
    );
    assert!(
        proxy
            .logs_with("\"event\":\"reload\"")
            .contains("\"event\":\"reload\"")
    );
    assert!(!proxy.logs().contains("rotated-token") && !proxy.logs().contains("first-token"));
}

#[tokio::test]
async fn invalid_files_keep_the_old_routes_and_the_process() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let proxy = ProxyBuilder::new(&routes(port, &["/v1"], false))
        .upstream(&ca, &[("api.test", port)])
        .env("OPS_TOKEN", TOKEN)
        .start();
    let file = proxy.dir.path().join("routes.yaml");
    let mut c = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
    for (i, bad) in [
        "routes: [\n".to_string(),
        routes(port, &["/v1"], false).replace("ports:", "portz:"),
        routes(port, &["/v1"], false).replace("OPS_TOKEN", "UNSET_TOKEN_VAR"),
    ]
    .iter()
    .enumerate()
    {
        replace_file(&file, bad);
        proxy.signal("HUP");
        let errors = || async {
            metric(
                &proxy.admin_get("/metrics").await.1,
                "egress_proxy_reloads_total{result=\"error\"}",
            ) >= (i + 1) as f64
        };
        assert!(
            within(Duration::from_secs(3), errors).await.is_some(),
            "reload {i} not counted as an error"
        );
        let req = get(&format!("api.test:{port}"), "/v1/still")
            .body(empty())
            .unwrap();
        assert_eq!(
            collect(c.send_request(req).await.unwrap()).await.0,
            200,
            "old routes stay in force after bad file {i}"
        );
    }
    let logs = proxy.logs_with("UNSET_TOKEN_VAR");
    assert!(
        logs.contains("UNSET_TOKEN_VAR"),
        "the reason names the variable: {logs}"
    );
    assert!(logs.contains("\"result\":\"error\""), "{logs}");
    assert!(!logs.contains(TOKEN));
}

#[tokio::test]
async fn file_change_without_signal_applies_within_two_seconds() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test", "b.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let proxy = ProxyBuilder::new(&routes(port, &["/v1"], false))
        .upstream(&ca, &[("api.test", port), ("b.test", port)])
        .env("OPS_TOKEN", TOKEN)
        .start();
    let b = format!("b.test:{port}");
    assert_eq!(connect_status(&proxy, &b).await, 403);
    // Rename-and-replace (an editor, docker cp).
    replace_file(
        &proxy.dir.path().join("routes.yaml"),
        &routes(port, &["/v1"], true),
    );
    let took = within(Duration::from_secs(2), || async {
        connect_status(&proxy, &b).await == 200
    })
    .await;
    assert!(took.is_some(), "file change not applied within 2 s");
    // In-place write.
    std::fs::write(
        proxy.dir.path().join("routes.yaml"),
        routes(port, &["/v1"], false),
    )
    .unwrap();
    let took = within(Duration::from_secs(2), || async {
        connect_status(&proxy, &b).await == 403
    })
    .await;
    assert!(took.is_some(), "in-place write not applied within 2 s");
}

#[tokio::test]
async fn an_idle_proxy_does_not_keep_reading_its_routes_file() {
    use notify::Watcher;
    let proxy = ProxyBuilder::new(&routes(9, &["/v1"], false))
        .env("OPS_TOKEN", TOKEN)
        .start();
    let routes_file = proxy.dir.path().join("routes.yaml");
    // The start's own read (right after the line `start` waits for), and a few debounce
    // windows after it, pass first.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let opens = Arc::new(AtomicU64::new(0));
    let counted = opens.clone();
    let watched = routes_file.clone();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if let Ok(e) = e
            && matches!(e.kind, notify::EventKind::Access(_))
            && e.paths.contains(&watched)
        {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    watcher
        .watch(proxy.dir.path(), notify::RecursiveMode::NonRecursive)
        .unwrap();
    // Ten debounce windows: a proxy that took its own reads for changes would read the
    // file in each of them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(watcher);
    assert_eq!(
        opens.load(Ordering::Relaxed),
        0,
        "the routes file was read while nothing changed"
    );
    // A change is still seen.
    let (status, _) = proxy.admin_get("/readyz").await;
    assert_eq!(status, 200);
    std::fs::write(&routes_file, routes(9, &["/v2"], false)).unwrap();
    let took = within(Duration::from_secs(2), || async {
        reloads_ok(&proxy).await >= 1.0
    })
    .await;
    assert!(took.is_some(), "in-place write not applied within 2 s");
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_seen() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test", "b.test"], &[b"http/1.1"]).await;
    let port = up.port();
    // The layout kubelet makes: routes.yaml -> ..data/routes.yaml, ..data -> ..<timestamp>.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/routes.yaml"), routes(port, &["/v1"], false)).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/routes.yaml", d.join("routes.yaml")).unwrap();
    let proxy = ProxyBuilder::new("")
        .routes_path(d.join("routes.yaml"))
        .upstream(&ca, &[("api.test", port), ("b.test", port)])
        .env("OPS_TOKEN", TOKEN)
        .start();
    let b = format!("b.test:{port}");
    assert_eq!(connect_status(&proxy, &b).await, 403);
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/routes.yaml"), routes(port, &["/v1"], true)).unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..v1")).unwrap();
    let took = within(Duration::from_secs(2), || async {
        connect_status(&proxy, &b).await == 200
    })
    .await;
    assert!(took.is_some(), "ConfigMap swap not applied within 2 s");
}

#[tokio::test]
async fn a_removed_route_denies_the_next_request_on_an_open_tunnel() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let proxy = ProxyBuilder::new(&routes(port, &["/v1", "/v2"], false))
        .upstream(&ca, &[("api.test", port)])
        .env("OPS_TOKEN", TOKEN)
        .start();
    let h = format!("api.test:{port}");
    let mut c1 = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
    let mut c2 = h2(proxy.tunnel("api.test", port, &[b"h2"]).await).await;
    assert_eq!(
        collect(
            c1.send_request(get(&h, "/v2/a").body(empty()).unwrap())
                .await
                .unwrap()
        )
        .await
        .0,
        200
    );
    let before = reloads_ok(&proxy).await;
    replace_file(
        &proxy.dir.path().join("routes.yaml"),
        &routes(port, &["/v1"], false),
    );
    proxy.signal("HUP");
    assert!(
        within(Duration::from_secs(3), || async {
            reloads_ok(&proxy).await > before
        })
        .await
        .is_some()
    );
    let (st, headers, body) = collect(
        c1.send_request(get(&h, "/v2/a").body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_refusal(st, &headers, &body, 403, "path_not_allowed");
    let uri = format!("https://{h}/v2/b");
    let (st, headers, body) = collect(
        c2.send_request(Request::builder().uri(uri).body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_refusal(st, &headers, &body, 403, "path_not_allowed");
    assert_eq!(
        collect(
            c1.send_request(get(&h, "/v1/a").body(empty()).unwrap())
                .await
                .unwrap()
        )
        .await
        .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"h2", b"http/1.1"]).await;
    let port = up.port();
    let file_a = routes(port, &["/v1"], false);
    let file_b = routes(port, &["/v1", "/v2"], true);
    let proxy = Arc::new(
        ProxyBuilder::new(&file_a)
            .upstream(&ca, &[("api.test", port), ("b.test", port)])
            .env("OPS_TOKEN", TOKEN)
            .start(),
    );
    let h = format!("api.test:{port}");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for (i, alpn) in [&b"http/1.1"[..], &b"h2"[..], &b"http/1.1"[..], &b"h2"[..]]
        .into_iter()
        .enumerate()
    {
        let (proxy, stop, ok, failed, h) = (
            proxy.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            h.clone(),
        );
        clients.push(tokio::spawn(async move {
            let tls = proxy.tunnel("api.test", port, &[alpn]).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            if alpn == b"h2" {
                let mut c = h2(tls).await;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let req = Request::builder()
                        .uri(format!("https://{h}/v1/{i}"))
                        .body(empty())
                        .unwrap();
                    let good = complete_200(c.send_request(req).await).await;
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            } else {
                let mut c = h1(tls).await;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let req = get(&h, &format!("/v1/{i}")).body(empty()).unwrap();
                    let good = complete_200(c.send_request(req).await).await;
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            }
        }));
    }
    let file = proxy.dir.path().join("routes.yaml");
    let before = reloads_ok(&proxy).await;
    for n in 0..60 {
        replace_file(&file, if n % 2 == 0 { &file_b } else { &file_a });
        proxy.signal("HUP");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // Keep the load going until at least 1,000 requests have been made.
    let _ = within(Duration::from_secs(30), || async {
        ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) >= 1000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let reloads = reloads_ok(&proxy).await - before;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(reloads >= 50.0, "only {reloads} reloads");
    assert!(ok >= 1000, "only {ok} requests");
    assert_eq!(
        failed, 0,
        "{failed} requests failed during {reloads} reloads ({ok} succeeded)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_streams_in_flight_finish_then_exits_zero() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let mut proxy = ProxyBuilder::new(&routes(port, &["/sse", "/download"], false))
        .upstream(&ca, &[("api.test", port)])
        .env("OPS_TOKEN", TOKEN)
        // Far above what the streams need: on a loaded CI machine the debug build moved
        // the 32 MiB slower than an 8 s grace allowed, and the exit cut the download.
        // The process still has to exit as soon as the streams are done (below).
        .arg("--shutdown-grace")
        .arg("60")
        .start();
    let h = format!("api.test:{port}");
    let mut sse = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
    let mut dl = h2(proxy.tunnel("api.test", port, &[b"h2"]).await).await;
    let sse_resp = sse
        .send_request(get(&h, "/sse?n=10&ms=200").body(empty()).unwrap())
        .await
        .unwrap();
    let size = 32 * 1024 * 1024u64;
    let dl_resp = dl
        .send_request(
            Request::builder()
                .uri(format!("https://{h}/download/{size}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let sse_task =
        tokio::spawn(async move { sse_resp.into_body().collect().await.map(|c| c.to_bytes()) });
    let dl_task = tokio::spawn(async move {
        // Read slowly, so the download is still in flight when SIGTERM lands.
        let mut body = dl_resp.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            let f = f?;
            n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0);
            if n % (4 * 1024 * 1024) < 65536 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }
        Ok::<u64, hyper::Error>(n)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "new connections are refused while draining"
    );
    let sse_body = sse_task.await.unwrap().expect("SSE completes");
    assert_eq!(
        String::from_utf8_lossy(&sse_body)
            .matches("data: event")
            .count(),
        10
    );
    assert_eq!(dl_task.await.unwrap().expect("download completes"), size);
    let code = proxy.wait_exit(Duration::from_secs(8));
    assert_eq!(code, Some(0), "logs: {}", proxy.logs());
}

/// Alerts on a counter need its series before the first event: a fresh proxy exports
/// every series of the fixed vocabulary (SPEC §6) at 0.
#[tokio::test]
async fn a_fresh_proxy_exports_every_series_of_the_vocabulary_at_zero() {
    let proxy = ProxyBuilder::new(&routes(443, &["/v1"], false))
        .env("OPS_TOKEN", TOKEN)
        .start();
    let (status, text) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let requests = |decision: &str, reason: &str| {
        format!("egress_proxy_requests_total{{decision=\"{decision}\",reason=\"{reason}\"}} 0")
    };
    let connects = |decision: &str, reason: &str| {
        format!("egress_proxy_connects_total{{decision=\"{decision}\",reason=\"{reason}\"}} 0")
    };
    let mut want = vec![
        r#"egress_proxy_reloads_total{result="ok"} 0"#.to_string(),
        r#"egress_proxy_reloads_total{result="error"} 0"#.to_string(),
        requests("allow", "ok"),
        connects("allow", "ok"),
        connects("allow", "tls_handshake_failed"),
        // Report mode's, exported in enforce mode too: one vocabulary whatever the mode.
        requests("report", "host_not_allowed"),
        requests("report", "path_not_allowed"),
        requests("report", "method_not_allowed"),
        connects("report", "host_not_allowed"),
        r#"egress_proxy_mode{mode="enforce"} 1"#.to_string(),
    ];
    for reason in [
        "host_not_allowed",
        "path_not_allowed",
        "method_not_allowed",
        "destination_not_allowed",
        "cleartext_credentials",
        "misdirected",
        "bad_request",
        "headers_too_large",
        "rate_limited",
        "body_too_large",
    ] {
        want.push(requests("deny", reason));
    }
    for reason in [
        "destination_not_allowed",
        "upstream_unreachable",
        "upstream_tls",
        "upstream_proxy_refused",
        "upstream_timeout",
        "upstream_bad_response",
    ] {
        want.push(requests("error", reason));
    }
    for reason in [
        "host_not_allowed",
        "destination_not_allowed",
        "bad_request",
        "misdirected",
        "too_many_connections",
    ] {
        want.push(connects("deny", reason));
    }
    for kind in [
        "dns_error",
        "connection_refused",
        "destination_unavailable",
        "tls_certificate_error",
        "tls_protocol_error",
        "connection_timeout",
        "http_response_timeout",
        "http_protocol_error",
        "http_response_header_section_size",
        "destination_ip_prohibited",
    ] {
        want.push(format!(
            "egress_proxy_upstream_errors_total{{kind=\"{kind}\"}} 0"
        ));
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|line| !text.lines().any(|l| l == line.as_str()))
        .collect();
    assert!(missing.is_empty(), "missing {missing:#?} in:\n{text}");
}

#[tokio::test]
async fn admin_endpoints_metrics_move_and_nothing_leaks() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let proxy = ProxyBuilder::new(&routes(port, &["/v1"], false))
        .upstream(&ca, &[("api.test", port)])
        .env("OPS_TOKEN", TOKEN)
        .start();
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    assert_eq!(proxy.admin_get("/ca.pem").await.1, proxy.ca_pem);
    let bundle = proxy.admin_get("/ca-bundle.pem").await.1;
    assert!(bundle.starts_with(&proxy.ca_pem) && bundle.matches("BEGIN CERTIFICATE").count() > 100);

    let before = proxy.admin_get("/metrics").await.1;
    let h = format!("api.test:{port}");
    let agent_secret = "agent-cookie-value-xyz";
    let mut c = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
    for path in [
        "/v1/a?api_key=query-secret-1",
        "/v1/b",
        "/admin?token=query-secret-2",
    ] {
        let req = get(&h, path)
            .header("authorization", format!("Bearer {agent_secret}"))
            .header("cookie", format!("session={agent_secret}"))
            .body(empty())
            .unwrap();
        let (_, _, body) = collect(c.send_request(req).await.unwrap()).await;
        let text = String::from_utf8_lossy(&body);
        if path.starts_with("/admin") {
            assert!(
                !text.contains("query-secret") && !text.contains(agent_secret),
                "error body leaked: {text}"
            );
        }
    }
    assert_eq!(proxy.connect("evil.test:443").await.0, 403);
    drop(c);
    let tunnel_logged = || async {
        metric(
            &proxy.admin_get("/metrics").await.1,
            "egress_proxy_connects_total{decision=\"allow\",reason=\"ok\"}",
        ) >= 1.0
    };
    assert!(
        within(Duration::from_secs(3), tunnel_logged)
            .await
            .is_some(),
        "closed tunnel not counted"
    );
    let after = proxy.admin_get("/metrics").await.1;
    // The exposition parses: every sample is `name{labels} number`.
    for line in after
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        assert!(name.starts_with("egress_proxy_"), "{line}");
    }
    assert!(after.ends_with("# EOF\n"));
    let allowed = "egress_proxy_requests_total{decision=\"allow\",reason=\"ok\"}";
    assert_eq!(
        metric(&after, allowed) - metric(&before, allowed),
        2.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "egress_proxy_requests_total{decision=\"deny\",reason=\"path_not_allowed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "egress_proxy_connects_total{decision=\"deny\",reason=\"host_not_allowed\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &after,
            "egress_proxy_connects_total{decision=\"allow\",reason=\"ok\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&after, "egress_proxy_leaf_cache_misses_total"), 1.0);
    assert!(metric(&after, "egress_proxy_bytes_total{direction=\"down\"}") > 0.0);
    let everything = format!("{}\n{after}", proxy.logs());
    for secret in [
        TOKEN,
        agent_secret,
        "query-secret-1",
        "query-secret-2",
        "api_key=",
        "session=",
    ] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }

    // `egress-proxy health` against the admin listener, and against nothing.
    let ok = std::process::Command::new(BIN)
        .args(["health", "--admin", &proxy.admin.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let dead = std::process::Command::new(BIN)
        .args(["health", "--admin", "127.0.0.1:1"])
        .status()
        .unwrap();
    assert!(!dead.success());
}

#[tokio::test]
async fn text_log_format_for_people() {
    let proxy = ProxyBuilder::new("routes:\n  - host: a.test\n")
        .arg("--log-format")
        .arg("text")
        .start();
    assert_eq!(proxy.connect("evil.test:443").await.0, 403);
    let logs = proxy.logs_with("host_not_allowed");
    assert!(
        logs.contains("event=\"connect\"") && logs.contains("host_not_allowed"),
        "{logs}"
    );
    assert!(!logs.contains("{\"timestamp\""), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "no colour codes into a pipe: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let mut proxy = ProxyBuilder::new(&routes(port, &["/sse"], false))
        .upstream(&ca, &[("api.test", port)])
        .env("OPS_TOKEN", TOKEN)
        .arg("--shutdown-grace")
        .arg("30")
        .start();
    let mut c = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
    let resp = c
        .send_request(
            get(&format!("api.test:{port}"), "/sse?n=100&ms=500")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    proxy.signal("TERM");
    let draining = || async { proxy.admin_get("/healthz").await.0 == 503 };
    assert!(
        within(Duration::from_secs(2), draining).await.is_some(),
        "healthz says 503 while draining"
    );
    assert_eq!(
        proxy.wait_exit(Duration::from_millis(300)),
        None,
        "still draining the stream"
    );
    let start = Instant::now();
    proxy.signal("INT");
    assert_eq!(proxy.wait_exit(Duration::from_secs(2)), Some(0));
    assert!(start.elapsed() < Duration::from_secs(2));
    drop(resp);
}

#[tokio::test]
async fn a_new_hosts_leaf_is_minted_when_its_tunnel_opens_not_after_the_client_hello() {
    let proxy = ProxyBuilder::new("routes:\n  - host: a.test\n").start();
    let (status, _, _tunnel) = proxy.connect("a.test:443").await;
    assert_eq!(status, 200);
    // No ClientHello has been sent: the leaf is minted while an agent would be building
    // it, so the mint does not add to the agent's handshake.
    let mut misses = 0.0;
    for _ in 0..100 {
        misses = metric(
            &proxy.admin_get("/metrics").await.1,
            "egress_proxy_leaf_cache_misses_total",
        );
        if misses == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(misses, 1.0);
}

/// SPEC §5: the watch is in place before the routes are first read. The proxy is held in
/// start-up, after its routes are read, by a CA key that is a named pipe: its read
/// blocks until the test writes the key. In between, the routes file changes; the
/// proxy must serve the new routes without a SIGHUP.
#[tokio::test]
async fn a_routes_change_during_start_up_is_applied() {
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test", "b.test"], &[b"http/1.1"]).await;
    let port = up.port();
    // A CA minted by the binary itself, its key then put behind a pipe.
    let work = tempfile::tempdir().unwrap();
    let ca_dir = work.path().join("ca");
    let minted = std::process::Command::new(BIN)
        .args(["ca", "init", "--ca-dir"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    let key_path = ca_dir.join("ca-key.pem");
    let key = std::fs::read(&key_path).unwrap();
    std::fs::remove_file(&key_path).unwrap();
    let fifo = std::ffi::CString::new(key_path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let routes_dir = work.path().join("routes");
    std::fs::create_dir(&routes_dir).unwrap();
    let routes_path = routes_dir.join("routes.yaml");
    std::fs::write(&routes_path, routes(port, &["/v1"], false)).unwrap();
    let new_routes = routes(port, &["/v1"], true);
    let writer_routes = routes_path.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // The write end opens (without blocking) once the proxy has opened the read end:
        // by then it has read its routes, and it is held in start-up until the key comes.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut pipe = loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&key_path)
            {
                Ok(p) => break p,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("the proxy never read its CA key: {e}"),
            }
        };
        replace_file(&writer_routes, &new_routes);
        // Long enough for the change to be seen by a watch that is in place.
        std::thread::sleep(Duration::from_millis(500));
        // Less than a pipe's buffer: written at once even on a non-blocking pipe.
        pipe.write_all(&key).unwrap();
    });
    let start = tokio::task::spawn_blocking(move || {
        ProxyBuilder::new("")
            .routes_path(routes_path)
            .ca_dir(ca_dir)
            .upstream(&ca, &[("api.test", port), ("b.test", port)])
            .env("OPS_TOKEN", TOKEN)
            .start()
    });
    let proxy = start.await.unwrap();
    writer.join().unwrap();
    let b = format!("b.test:{port}");
    let took = within(Duration::from_secs(3), || async {
        connect_status(&proxy, &b).await == 200
    })
    .await;
    assert!(
        took.is_some(),
        "the change made during start-up was lost: {}",
        proxy.logs()
    );
    assert_eq!(reloads_ok(&proxy).await, 1.0, "{}", proxy.logs());
}

/// Writes a byte every 100 ms until the connection fails or 10 s pass: input the proxy
/// has not read when it closes the connection, so its close lingers.
fn trickle<W>(mut w: W) -> tokio::task::JoinHandle<()>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    tokio::spawn(async move {
        for _ in 0..100 {
            if w.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// SPEC §5: with nothing in flight the process exits within 3 s of SIGTERM whatever is
/// open, under a 30 s grace: bare TCP connections, CONNECTs not followed by TLS, TLS
/// without a request, HTTP/1.1 keep-alive after a request, HTTP/2 clients whose
/// connection is driven (they answer PING) with no open stream, and some of each kind
/// with input the proxy never read (its close lingers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_only_idle_connections_exits_within_three_seconds() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"h2", b"http/1.1"]).await;
    let port = up.port();
    let proxy = ProxyBuilder::new(&routes(port, &["/v1"], false))
        .upstream(&ca, &[("api.test", port)])
        .env("OPS_TOKEN", TOKEN)
        .arg("--shutdown-grace")
        .arg("30")
        .start();
    let h = format!("api.test:{port}");
    let mut held_tcp = Vec::new();
    let mut held_tls = Vec::new();
    let mut h1_clients = Vec::new();
    let mut h2_clients = Vec::new();
    let mut trickles = Vec::new();
    for i in 0..10 {
        // A bare TCP connection, silent or sending bytes that never make a head.
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        if i < 3 {
            tcp.write_all(b"GET http://api.test/ HTTP/1.1\r\nx-slow: ")
                .await
                .unwrap();
            trickles.push(trickle(tcp));
        } else {
            held_tcp.push(tcp);
        }
        // A CONNECT not followed by TLS.
        let (status, _, tcp) = proxy.connect(&h).await;
        assert_eq!(status, 200);
        if i < 3 {
            trickles.push(trickle(tcp));
        } else {
            held_tcp.push(tcp);
        }
        // TLS with no request yet.
        let tls = proxy.tunnel("api.test", port, &[b"http/1.1"]).await;
        if i < 3 {
            trickles.push(trickle(tls));
        } else {
            held_tls.push(tls);
        }
        // HTTP/1.1 keep-alive after one request.
        let mut c = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
        let r = c
            .send_request(get(&h, "/v1/x").body(empty()).unwrap())
            .await;
        assert!(complete_200(r).await);
        h1_clients.push(c);
        // HTTP/2, its connection driven by a task, with no stream open.
        let mut c = h2(proxy.tunnel("api.test", port, &[b"h2"]).await).await;
        let r = c
            .send_request(
                Request::builder()
                    .uri(format!("https://{h}/v1/x"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert!(complete_200(r).await);
        h2_clients.push(c);
    }
    // An HTTP/1.1 tunnel after a request whose agent keeps sending (a next head it
    // never finishes).
    for _ in 0..3 {
        let mut tls = proxy.tunnel("api.test", port, &[b"http/1.1"]).await;
        tls.write_all(format!("GET /v1/x HTTP/1.1\r\nhost: {h}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut tls, &mut buf)
            .await
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tls.write_all(format!("GET /v1/x HTTP/1.1\r\nhost: {h}\r\nx-slow: ").as_bytes())
            .await
            .unwrap();
        trickles.push(trickle(tls));
    }
    let started = Instant::now();
    proxy.signal("TERM");
    let mut proxy = proxy;
    let (code, logs) = tokio::task::spawn_blocking(move || {
        let code = proxy.wait_exit(Duration::from_secs(10));
        (code, proxy.logs())
    })
    .await
    .unwrap();
    let took = started.elapsed();
    eprintln!("exit {took:?} after SIGTERM");
    assert_eq!(code, Some(0), "took {took:?}; logs: {logs}");
    assert!(
        took < Duration::from_secs(3),
        "idle connections held the exit for {took:?}"
    );
    drop((held_tcp, held_tls, h1_clients, h2_clients));
    for t in trickles {
        t.abort();
    }
}
