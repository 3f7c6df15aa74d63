//! Report mode (`--mode report`) against the real binary: what no route allows is forwarded
//! without a token, with the agent's credentials removed, and logged and counted as
//! `report`; everything else (destinations, authority and SNI binding, ambiguous paths,
//! framing, TRACE, h2c, cleartext credentials) is refused exactly as in enforce mode.
//! Both HTTP/1.1 and HTTP/2 agents.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};

use common::*;

const TOKEN: &str = "report-route-token-3c1d";
const KEY: &str = "report-route-key-77ab";
const AGENT_SECRET: &str = "agent-own-secret-5150";

/// api.test: `/v1` with a Bearer token, `/keyed` with an `x-api-key` token, `/read` GET
/// only; localhost: `/v1` (no `allow_private`, so refused after DNS) and `/private`
/// (`allow_private`).
fn routes(port: u16) -> String {
    format!(
        r#"
routes:
  - host: api.test
    ports: [{port}]
    path_allowlist: ["/v1"]
    auth_scheme: Bearer
    token_env: R_TOKEN
  - host: api.test
    ports: [{port}]
    path_allowlist: ["/keyed"]
    header: x-api-key
    token_env: R_KEY
  - host: api.test
    ports: [{port}]
    path_allowlist: ["/read"]
    methods: [GET]
  - host: localhost
    ports: [{port}]
    path_allowlist: ["/v1"]
  - host: localhost
    ports: [{port}]
    path_allowlist: ["/private"]
    allow_private: true
"#
    )
}

struct World {
    up: Upstream,
    proxy: Proxy,
}

impl World {
    /// An upstream speaking HTTP/2 and HTTP/1.1, and a proxy in `mode` (`None`: the
    /// default), with api.test and other.test pinned to it; localhost is left to DNS.
    async fn start(mode: Option<&str>) -> World {
        let ca = TestCa::new("ca");
        let up = Upstream::start(
            &ca,
            &["api.test", "other.test", "localhost", "127.0.0.1"],
            &[b"h2", b"http/1.1"],
        )
        .await;
        let port = up.port();
        let mut builder = ProxyBuilder::new(&routes(port))
            .upstream(&ca, &[("api.test", port), ("other.test", port)])
            .env("R_TOKEN", TOKEN)
            .env("R_KEY", KEY);
        if let Some(mode) = mode {
            builder = builder.arg("--mode").arg(mode);
        }
        World {
            proxy: builder.start(),
            up,
        }
    }

    fn authority(&self, host: &str) -> String {
        format!("{host}:{}", self.up.port())
    }

    async fn agent(&self, host: &str, h2: bool) -> Agent {
        let port = self.up.port();
        if h2 {
            let tls = self.proxy.tunnel(host, port, &[b"h2"]).await;
            Agent::H2(common::h2(tls).await, self.authority(host))
        } else {
            let tls = self.proxy.tunnel(host, port, &[b"http/1.1"]).await;
            Agent::H1(common::h1(tls).await, self.authority(host))
        }
    }

    /// The request's raw HTTP/1.1 `raw` (`{h}` is the authority) in a tunnel to `host`;
    /// what comes back until the proxy closes (every request here ends its connection)
    /// or stays quiet for 10 s.
    async fn raw(&self, host: &str, raw: &str) -> String {
        let raw = raw.replace("{h}", &self.authority(host));
        self.proxy
            .raw_in_tunnel(
                host,
                self.up.port(),
                raw.as_bytes(),
                Duration::from_secs(10),
            )
            .await
    }

    async fn metrics(&self) -> String {
        self.proxy.admin_get("/metrics").await.1
    }
}

/// An agent's connection inside a tunnel, HTTP/1.1 or HTTP/2.
enum Agent {
    H1(hyper::client::conn::http1::SendRequest<ClientBody>, String),
    H2(hyper::client::conn::http2::SendRequest<ClientBody>, String),
}

impl Agent {
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut builder = Request::builder().method(method);
        builder = match self {
            Agent::H1(_, authority) => builder.uri(path).header("host", authority.as_str()),
            Agent::H2(_, authority) => builder.uri(format!("https://{authority}{path}")),
        };
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder.body(empty()).unwrap();
        let response = match self {
            Agent::H1(c, _) => c.send_request(req).await,
            Agent::H2(c, _) => c.send_request(req).await,
        };
        collect(response.unwrap()).await
    }
}

/// The value of one sample line in a metrics exposition (`None` when absent).
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

/// The first audit event `event` whose `key` is `value`, waiting up to 10 s for it (the
/// test's runtime keeps running meanwhile: a tunnel the test dropped closes).
async fn audit_event(proxy: &Proxy, event: &str, key: &str, value: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = proxy
            .logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == event && v[key] == value);
        if let Some(v) = found {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {event} event with {key}={value}:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A tunnel to a covered host forwards its unmatched requests without any token and
/// without the agent's credentials; a tunnel to a host no route covers opens and its
/// requests reach the upstream; each is logged and counted as `report`.
async fn forwards_what_no_route_allows(h2: bool) {
    let w = World::start(Some("report")).await;
    let agent_creds = [
        ("authorization", "Bearer agent-own-secret-5150"),
        ("proxy-authorization", "Basic agent-own-secret-5150"),
        ("x-api-key", AGENT_SECRET),
        ("x-keep", "end-to-end"),
    ];
    let mut api = w.agent("api.test", h2).await;

    // A matched route still puts its token on.
    let (status, _, _) = api.send("GET", "/v1/models", &agent_creds).await;
    assert_eq!(status, 200);
    let seen = w.up.seen().pop().unwrap();
    assert_eq!(seen.headers["authorization"], format!("Bearer {TOKEN}"));

    // Unmatched on a host whose other routes carry tokens: forwarded bare.
    for (method, path, reason) in [
        ("GET", "/other?q=1", "path_not_allowed"),
        ("POST", "/read", "method_not_allowed"),
    ] {
        let (status, _, body) = api.send(method, path, &agent_creds).await;
        assert_eq!(status, 200, "{method} {path}: {body:?}");
        let seen = w.up.seen().pop().unwrap();
        assert_eq!(
            (seen.method.as_str(), seen.path_and_query.as_str()),
            (method, path)
        );
        for name in ["authorization", "proxy-authorization", "x-api-key"] {
            assert!(
                seen.headers.get(name).is_none(),
                "{method} {path}: {name} reached the upstream: {:?}",
                seen.headers
            );
        }
        assert_eq!(seen.headers["x-keep"], "end-to-end");
        let logged_path = path.split('?').next().unwrap();
        let event = audit_event(&w.proxy, "request", "path", logged_path).await;
        assert_eq!(event["decision"], "report", "{event}");
        assert_eq!(event["reason"], reason, "{event}");
        assert_eq!(event["status"], 200, "{event}");
        assert!(event.get("route").is_none(), "{event}");
    }

    // A host no route covers: the tunnel opens, its requests go out and are reported.
    let mut other = w.agent("other.test", h2).await;
    let (status, _, _) = other.send("GET", "/anything", &agent_creds).await;
    assert_eq!(status, 200);
    let seen = w.up.seen().pop().unwrap();
    assert_eq!(seen.path_and_query, "/anything");
    assert_eq!(seen.authority, w.authority("other.test"));
    assert!(seen.headers.get("authorization").is_none());
    assert!(seen.headers.get("proxy-authorization").is_none());
    let event = audit_event(&w.proxy, "request", "path", "/anything").await;
    assert_eq!(event["decision"], "report", "{event}");
    assert_eq!(event["reason"], "host_not_allowed", "{event}");
    // Its `connect` event, written when the tunnel closes, says why it was opened.
    drop(other);
    let event = audit_event(&w.proxy, "connect", "host", "other.test").await;
    assert_eq!(event["decision"], "report", "{event}");
    assert_eq!(event["reason"], "host_not_allowed", "{event}");
    assert_eq!(event["status"], 200, "{event}");
    drop(api);
    let event = audit_event(&w.proxy, "connect", "host", "api.test").await;
    assert_eq!(event["decision"], "allow", "{event}");

    let text = w.metrics().await;
    for (sample, want) in [
        (r#"egress_proxy_mode{mode="report"}"#, 1.0),
        (
            r#"egress_proxy_requests_total{decision="allow",reason="ok"}"#,
            1.0,
        ),
        (
            r#"egress_proxy_requests_total{decision="report",reason="path_not_allowed"}"#,
            1.0,
        ),
        (
            r#"egress_proxy_requests_total{decision="report",reason="method_not_allowed"}"#,
            1.0,
        ),
        (
            r#"egress_proxy_requests_total{decision="report",reason="host_not_allowed"}"#,
            1.0,
        ),
        (
            r#"egress_proxy_connects_total{decision="report",reason="host_not_allowed"}"#,
            1.0,
        ),
        (
            r#"egress_proxy_connects_total{decision="allow",reason="ok"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric(&text, sample), Some(want), "{sample} in:\n{text}");
    }
    let everything = format!("{}\n{text}", w.proxy.logs());
    for secret in [TOKEN, KEY, AGENT_SECRET, "q=1"] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
}

#[tokio::test]
async fn report_mode_forwards_what_no_route_allows_without_credentials_http1_agent() {
    forwards_what_no_route_allows(false).await;
}

#[tokio::test]
async fn report_mode_forwards_what_no_route_allows_without_credentials_http2_agent() {
    forwards_what_no_route_allows(true).await;
}

/// The status and JSON `error` of a raw answer.
fn status_and_code(response: &str) -> (u16, String) {
    let code = response
        .split("\"error\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
        .to_owned();
    (parse_status(response), code)
}

/// Checks a raw answer's status and, unless `code` is empty (where the HTTP parser may
/// answer with its bare 400), its JSON `error`.
fn assert_answer(name: &str, response: &str, status: u16, code: &str) {
    let (got_status, got_code) = status_and_code(response);
    assert!(
        got_status == status && (code.is_empty() || got_code == code),
        "{name}: wanted {status} {code}, got:\n{response}"
    );
}

/// Requests inside a tunnel to api.test (a covered host) whose paths no route allows:
/// each is refused before the routes are asked, so identically in both modes, and the
/// upstream never sees it. An empty code: the HTTP parser's bare 400 is allowed.
const REFUSED_IN_BOTH: &[(&str, &str, u16, &str)] = &[
    (
        "misdirected Host",
        "GET /other HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
        421,
        "misdirected",
    ),
    (
        "misdirected absolute target",
        "GET https://evil.test/other HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n",
        421,
        "misdirected",
    ),
    (
        "dot segment",
        "GET /v1/../other HTTP/1.1\r\nHost: {h}\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "encoded dot segment",
        "GET /x/%2e%2E/other HTTP/1.1\r\nHost: {h}\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "empty segment",
        "GET /other//x HTTP/1.1\r\nHost: {h}\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "content-length and chunked",
        "POST /other HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n",
        400,
        "",
    ),
    (
        "two content-lengths",
        "POST /other HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1\r\nContent-Length: 30\r\n\r\nx",
        400,
        "",
    ),
    (
        "TRACE",
        "TRACE /other HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n",
        403,
        "method_not_allowed",
    ),
    (
        "h2c upgrade",
        "GET /other HTTP/1.1\r\nHost: {h}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        400,
        "bad_request",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_refuses_what_enforce_mode_refuses_before_the_routes() {
    let enforce = World::start(None).await;
    let report = World::start(Some("report")).await;
    for w in [&enforce, &report] {
        for (name, raw, status, code) in REFUSED_IN_BOTH {
            let before = w.up.seen().len();
            let response = w.raw("api.test", raw).await;
            assert_answer(name, &response, *status, code);
            let leaked: Vec<String> = w.up.paths()[before..].to_vec();
            assert!(leaked.is_empty(), "{name}: the upstream saw {leaked:?}");
        }
        // A token route over cleartext HTTP.
        let port = w.up.port();
        let response = w
            .proxy
            .raw(format!("GET http://api.test:{port}/v1 HTTP/1.1\r\nHost: api.test:{port}\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
        assert_answer("cleartext", &response, 403, "cleartext_credentials");
        // All-numeric hosts and the proxy itself, before the routes.
        for target in ["2130706433:443".to_owned(), w.proxy.addr.to_string()] {
            let (status, text, _) = w.proxy.connect(&target).await;
            assert_eq!(status, 403, "CONNECT {target}: {text}");
            assert!(
                text.contains("\"error\":\"destination_not_allowed\""),
                "CONNECT {target}: {text}"
            );
        }
    }

    // In a tunnel report mode opened to a host no route covers, the same refusals hold,
    // and an SNI naming another host is refused with its alert.
    for (name, raw, status, code) in REFUSED_IN_BOTH {
        let before = report.up.seen().len();
        let response = report.raw("other.test", raw).await;
        assert_answer(&format!("other.test, {name}"), &response, *status, code);
        assert_eq!(report.up.seen().len(), before, "other.test, {name}");
    }
    let sni = report
        .proxy
        .tunnel_sni("other.test", report.up.port(), &[b"http/1.1"], "evil.test")
        .await;
    assert!(sni.is_err(), "a misdirected SNI was served");
    let event = audit_event(&report.proxy, "connect", "sni", "evil.test").await;
    assert_eq!(event["reason"], "misdirected", "{event}");
}

/// A name that resolves to loopback is refused after DNS in report mode as in enforce
/// mode, and a request no route matched never inherits a route's `allow_private`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_keeps_the_destination_checks() {
    let enforce = World::start(None).await;
    let report = World::start(Some("report")).await;
    for h2 in [false, true] {
        for (w, path) in [
            (&enforce, "/v1/x"),
            (&report, "/v1/x"),
            // Unmatched, on a host whose `/private` route allows private addresses.
            (&report, "/other"),
        ] {
            let dialled = w.up.connections.load(Ordering::SeqCst);
            let mut agent = w.agent("localhost", h2).await;
            let (status, headers, body) = agent.send("GET", path, &[]).await;
            assert_refusal(status, &headers, &body, 403, "destination_not_allowed");
            assert_eq!(
                w.up.connections.load(Ordering::SeqCst),
                dialled,
                "{path} was dialled"
            );
        }
        // The route with `allow_private` reaches it, in both modes.
        for w in [&enforce, &report] {
            let mut agent = w.agent("localhost", h2).await;
            let (status, _, body) = agent.send("GET", "/private", &[]).await;
            assert_eq!(status, 200, "{body:?}");
        }
        // An IP literal no route covers: the tunnel opens in report mode, the address is
        // still refused.
        let dialled = report.up.connections.load(Ordering::SeqCst);
        let mut agent = report.agent("127.0.0.1", h2).await;
        let (status, headers, body) = agent.send("GET", "/x", &[]).await;
        assert_refusal(status, &headers, &body, 403, "destination_not_allowed");
        assert_eq!(report.up.connections.load(Ordering::SeqCst), dialled);
    }
    // Enforce mode refuses the uncovered host at the CONNECT, as always.
    let (status, text, _) = enforce.proxy.connect(&enforce.authority("127.0.0.1")).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("host_not_allowed"), "{text}");
}

/// The mode is on the start event and on /metrics, from the flag or the variable; enforce
/// is the default and refuses as ever; a reload does not change the mode; a bad value
/// stops the start naming the option.
#[tokio::test]
async fn the_mode_is_shown_kept_across_a_reload_and_checked_at_start() {
    let enforce = World::start(None).await;
    let start = audit_event(&enforce.proxy, "start", "mode", "enforce").await;
    assert_eq!(start["message"], "egress-proxy serving", "{start}");
    let text = enforce.metrics().await;
    assert_eq!(
        metric(&text, r#"egress_proxy_mode{mode="enforce"}"#),
        Some(1.0)
    );
    assert!(!text.contains(r#"mode="report""#), "{text}");
    let mut agent = enforce.agent("api.test", false).await;
    let (status, headers, body) = agent.send("GET", "/other", &[]).await;
    assert_refusal(status, &headers, &body, 403, "path_not_allowed");
    let (status, _, _) = enforce
        .proxy
        .connect(&enforce.authority("other.test"))
        .await;
    assert_eq!(status, 403);

    let ca = TestCa::new("ca");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let proxy = ProxyBuilder::new(&routes(up.port()))
        .upstream(&ca, &[("api.test", up.port())])
        .env("R_TOKEN", TOKEN)
        .env("R_KEY", KEY)
        .env("EGRESS_PROXY_MODE", "report")
        .start();
    audit_event(&proxy, "start", "mode", "report").await;
    let routes_file = proxy.dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes(up.port()).replace("/read", "/read2")).unwrap();
    proxy.signal("HUP");
    audit_event(&proxy, "reload", "result", "ok").await;
    let text = proxy.admin_get("/metrics").await.1;
    assert_eq!(
        metric(&text, r#"egress_proxy_mode{mode="report"}"#),
        Some(1.0)
    );
    assert!(!text.contains(r#"mode="enforce""#), "{text}");
    let mut agent = Agent::H1(
        h1(proxy.tunnel("api.test", up.port(), &[b"http/1.1"]).await).await,
        format!("api.test:{}", up.port()),
    );
    let (status, _, _) = agent.send("GET", "/after-reload", &[]).await;
    assert_eq!(status, 200, "report mode after a reload");

    for (flag, env) in [(Some("audit"), None), (None, Some("audit"))] {
        let mut builder = ProxyBuilder::new("routes: []\n");
        if let Some(v) = flag {
            builder = builder.arg("--mode").arg(v);
        }
        if let Some(v) = env {
            builder = builder.env("EGRESS_PROXY_MODE", v);
        }
        let Err(err) = builder.try_start() else {
            panic!("started with a bad mode");
        };
        assert!(err.contains("--mode") && err.contains("audit"), "{err}");
    }
}
