//! The decision table-tested: each case in both modes, and the matched route's limits.

use super::*;
use crate::routes::SecretSource;

struct Env;
impl SecretSource for Env {
    fn env(&self, _: &str) -> Option<String> {
        Some("tok".into())
    }
    fn file(&self, _: &str) -> Result<String, String> {
        Err("no".into())
    }
}

fn routes() -> RouteTable {
    RouteTable::from_text(
        r#"
routes:
  - host: api.example.com
    path_allowlist: ["/v1", "/ws"]
    auth_scheme: Bearer
    token_env: T
  - host: plain.example.com
    ports: [80, 8080]
    methods: [GET]
  - host: secret.example.com
    ports: [80]
    auth_scheme: Bearer
    token_env: T
  - host: api.example.com
    path_allowlist: ["/keyed"]
    header: x-api-key
    token_env: T
  - host: api.example.com
    path_allowlist: ["/read"]
    methods: [GET]
"#,
        &Env,
    )
    .unwrap()
}

fn tunnel() -> Authority {
    Authority {
        host: Host::parse("api.example.com").unwrap(),
        port: 443,
    }
}

/// A decision as the tables write it.
#[derive(Debug, PartialEq)]
enum Out {
    /// Route index, WebSocket.
    Allow(usize, bool),
    /// What enforce mode refuses it with, WebSocket, the headers taken off.
    Report(ErrorKind, bool, Vec<&'static str>),
}

fn run(
    authority: &Authority,
    channel: Channel,
    method: &str,
    uri: &str,
    version: Version,
    headers: &[(&str, &str)],
) -> Result<(usize, bool), ErrorKind> {
    run_in(
        Mode::Enforce,
        authority,
        channel,
        method,
        uri,
        version,
        headers,
    )
    .map(|out| match out {
        Out::Allow(index, websocket) => (index, websocket),
        reported => panic!("enforce mode reported {reported:?}"),
    })
}

fn run_in(
    mode: Mode,
    authority: &Authority,
    channel: Channel,
    method: &str,
    uri: &str,
    version: Version,
    headers: &[(&str, &str)],
) -> Result<Out, ErrorKind> {
    let t = routes();
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let uri: Uri = uri.parse().unwrap();
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let view = RequestView {
        method: &method,
        uri: &uri,
        version,
        headers: &map,
    };
    match decide(&t, authority, channel, mode, view) {
        Ok(Decision::Allow(a)) => Ok(Out::Allow(a.route.index, a.websocket)),
        Ok(Decision::Report(r)) => {
            let names = r
                .credential_headers
                .iter()
                .map(|n| match n.as_str() {
                    "authorization" => "authorization",
                    "x-api-key" => "x-api-key",
                    other => panic!("unexpected header {other}"),
                })
                .collect();
            Ok(Out::Report(r.would_refuse, r.websocket, names))
        }
        Err(e) => Err(e.kind),
    }
}

fn tun(method: &str, uri: &str, headers: &[(&str, &str)]) -> Result<(usize, bool), ErrorKind> {
    run(
        &tunnel(),
        Channel::Tunnel,
        method,
        uri,
        Version::HTTP_11,
        headers,
    )
}

#[test]
fn tunnel_table() {
    use ErrorKind::*;
    let h = ("host", "api.example.com");
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Result<(usize, bool), ErrorKind>,
    );
    let cases: &[Case] = &[
        ("GET", "/v1/models", &[h], Ok((0, false))),
        ("GET", "/v1/models?x=1", &[h], Ok((0, false))),
        (
            "GET",
            "/v1",
            &[("host", "API.example.com.:443")],
            Ok((0, false)),
        ),
        (
            "GET",
            "/v1",
            &[("host", "api.example.com:8443")],
            Err(Misdirected),
        ),
        ("GET", "/v1", &[("host", "evil.com")], Err(Misdirected)),
        ("GET", "/v1", &[h, h], Err(BadRequest)),
        ("GET", "/v1", &[], Err(BadRequest)),
        (
            "GET",
            "/v1",
            &[("host", "a@api.example.com")],
            Err(BadRequest),
        ),
        (
            "GET",
            "/v1",
            &[("host", "api.example.com:")],
            Err(BadRequest),
        ),
        ("GET", "https://api.example.com/v1", &[h], Ok((0, false))),
        ("GET", "https://evil.com/v1", &[h], Err(Misdirected)),
        ("GET", "http://api.example.com/v1", &[h], Err(BadRequest)),
        ("GET", "/admin", &[h], Err(PathNotAllowed)),
        ("GET", "/v1/../admin", &[h], Err(BadRequest)),
        ("GET", "/v1/%2e%2e/admin", &[h], Err(BadRequest)),
        ("GET", "/v1//x", &[h], Err(BadRequest)),
        ("TRACE", "/v1", &[h], Err(MethodNotAllowed)),
        ("TRACK", "/v1", &[h], Err(MethodNotAllowed)),
        (
            "GET",
            "/ws",
            &[h, ("upgrade", "websocket"), ("connection", "Upgrade")],
            Ok((0, true)),
        ),
        (
            "GET",
            "/ws",
            &[
                h,
                ("upgrade", "h2c"),
                ("connection", "Upgrade, HTTP2-Settings"),
            ],
            Err(BadRequest),
        ),
        (
            "POST",
            "/ws",
            &[h, ("upgrade", "websocket"), ("connection", "upgrade")],
            Err(BadRequest),
        ),
        (
            "GET",
            "/ws",
            &[
                h,
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
                ("content-length", "5"),
            ],
            Err(BadRequest),
        ),
        (
            "GET",
            "/ws",
            &[h, ("upgrade", "websocket")],
            Err(BadRequest),
        ),
    ];
    for (m, u, hs, want) in cases {
        assert_eq!(tun(m, u, hs), *want, "{m} {u} {hs:?}");
    }
}

/// Report mode forwards what the routes refuse, without a route (so without a token),
/// taking off every header a route for the host and port injects; everything refused
/// before the routes, and a token route over cleartext, is refused as in enforce mode.
#[test]
fn report_mode_relaxes_only_the_routes() {
    use ErrorKind::*;
    let h = ("host", "api.example.com");
    let ws = [h, ("upgrade", "websocket"), ("connection", "upgrade")];
    let h2c = [
        h,
        ("upgrade", "h2c"),
        ("connection", "Upgrade, HTTP2-Settings"),
    ];
    let (once, twice, none) = ([h], [h, h], []);
    let evil = [("host", "evil.com")];
    let other_host = [("host", "other.example.com")];
    let api_headers = vec!["authorization", "x-api-key"];
    let other = Authority {
        host: Host::parse("other.example.com").unwrap(),
        port: 443,
    };
    let port_80 = |host: &str| Authority {
        host: Host::parse(host).unwrap(),
        port: 80,
    };
    let (tun, plain) = (Channel::Tunnel, Channel::Plain);
    type Case<'a> = (
        Authority,
        Channel,
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Result<Out, ErrorKind>,
        Result<Out, ErrorKind>,
    );
    let cases: Vec<Case> = vec![
        // What a route allows goes under it in both modes.
        (
            tunnel(),
            tun,
            "GET",
            "/v1/models",
            &once,
            Ok(Out::Allow(0, false)),
            Ok(Out::Allow(0, false)),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "/keyed/x",
            &once,
            Ok(Out::Allow(3, false)),
            Ok(Out::Allow(3, false)),
        ),
        // What the routes refuse is reported.
        (
            tunnel(),
            tun,
            "GET",
            "/admin",
            &once,
            Err(PathNotAllowed),
            Ok(Out::Report(PathNotAllowed, false, api_headers.clone())),
        ),
        (
            tunnel(),
            tun,
            "POST",
            "/read",
            &once,
            Err(MethodNotAllowed),
            Ok(Out::Report(MethodNotAllowed, false, api_headers.clone())),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "/admin",
            &ws,
            Err(PathNotAllowed),
            Ok(Out::Report(PathNotAllowed, true, api_headers.clone())),
        ),
        (
            other.clone(),
            tun,
            "GET",
            "/x",
            &other_host,
            Err(HostNotAllowed),
            Ok(Out::Report(HostNotAllowed, false, vec![])),
        ),
        (
            port_80("api.example.com"),
            plain,
            "GET",
            "http://api.example.com/v1",
            &none,
            Err(HostNotAllowed),
            Ok(Out::Report(HostNotAllowed, false, vec![])),
        ),
        (
            port_80("plain.example.com"),
            plain,
            "POST",
            "http://plain.example.com/x",
            &none,
            Err(MethodNotAllowed),
            Ok(Out::Report(MethodNotAllowed, false, vec![])),
        ),
        // Everything before the routes, and a token over cleartext, holds.
        (
            tunnel(),
            tun,
            "GET",
            "/admin",
            &evil,
            Err(Misdirected),
            Err(Misdirected),
        ),
        (
            other.clone(),
            tun,
            "GET",
            "/x",
            &once,
            Err(Misdirected),
            Err(Misdirected),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "https://evil.com/admin",
            &once,
            Err(Misdirected),
            Err(Misdirected),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "/admin",
            &twice,
            Err(BadRequest),
            Err(BadRequest),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "/admin",
            &none,
            Err(BadRequest),
            Err(BadRequest),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "/v1/../admin",
            &once,
            Err(BadRequest),
            Err(BadRequest),
        ),
        (
            other.clone(),
            tun,
            "GET",
            "/a/%2e%2e/b",
            &other_host,
            Err(BadRequest),
            Err(BadRequest),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "/x//y",
            &once,
            Err(BadRequest),
            Err(BadRequest),
        ),
        (
            tunnel(),
            tun,
            "TRACE",
            "/admin",
            &once,
            Err(MethodNotAllowed),
            Err(MethodNotAllowed),
        ),
        (
            other.clone(),
            tun,
            "TRACK",
            "/x",
            &other_host,
            Err(MethodNotAllowed),
            Err(MethodNotAllowed),
        ),
        (
            tunnel(),
            tun,
            "GET",
            "/admin",
            &h2c,
            Err(BadRequest),
            Err(BadRequest),
        ),
        (
            tunnel(),
            tun,
            "CONNECT",
            "/admin",
            &once,
            Err(BadRequest),
            Err(BadRequest),
        ),
        (
            port_80("secret.example.com"),
            plain,
            "GET",
            "http://secret.example.com/x",
            &none,
            Err(CleartextCredentials),
            Err(CleartextCredentials),
        ),
    ];
    for (authority, channel, method, uri, headers, enforce, report) in cases {
        let version = Version::HTTP_11;
        let got = run_in(
            Mode::Enforce,
            &authority,
            channel,
            method,
            uri,
            version,
            headers,
        );
        assert_eq!(got, enforce, "enforce: {method} {uri} {headers:?}");
        let got = run_in(
            Mode::Report,
            &authority,
            channel,
            method,
            uri,
            version,
            headers,
        );
        assert_eq!(got, report, "report: {method} {uri} {headers:?}");
    }
    // HTTP/2: the :authority is held to the tunnel in report mode too.
    let h2 = |uri| {
        run_in(
            Mode::Report,
            &tunnel(),
            Channel::Tunnel,
            "GET",
            uri,
            Version::HTTP_2,
            &none,
        )
    };
    assert_eq!(h2("https://other.example.com/admin"), Err(Misdirected));
    assert_eq!(
        h2("https://api.example.com/admin"),
        Ok(Out::Report(PathNotAllowed, false, api_headers))
    );
}

#[test]
fn report_mode_opens_a_tunnel_no_route_covers() {
    let t = routes();
    let covered = tunnel();
    let uncovered = Authority {
        host: Host::parse("other.example.com").unwrap(),
        port: 443,
    };
    for mode in [Mode::Enforce, Mode::Report] {
        assert!(matches!(
            decide_connect(&t, &covered, mode),
            ConnectDecision::Allow
        ));
    }
    match decide_connect(&t, &uncovered, Mode::Enforce) {
        ConnectDecision::Deny(e) => assert_eq!(e.kind, ErrorKind::HostNotAllowed),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decide_connect(&t, &uncovered, Mode::Report),
        ConnectDecision::Report(ErrorKind::HostNotAllowed)
    ));
    assert_eq!(Mode::Report.as_str(), "report");
    assert_eq!(Mode::Enforce.as_str(), "enforce");
}

#[test]
fn http2_authority() {
    let r = run(
        &tunnel(),
        Channel::Tunnel,
        "GET",
        "https://api.example.com/v1",
        Version::HTTP_2,
        &[],
    );
    assert_eq!(r, Ok((0, false)));
    let r = run(
        &tunnel(),
        Channel::Tunnel,
        "GET",
        "https://other.example.com/v1",
        Version::HTTP_2,
        &[],
    );
    assert_eq!(r, Err(ErrorKind::Misdirected));
    let r = run(
        &tunnel(),
        Channel::Tunnel,
        "GET",
        "https://api.example.com/v1",
        Version::HTTP_2,
        &[("host", "other.example.com")],
    );
    assert_eq!(r, Err(ErrorKind::Misdirected));
}

#[test]
fn plain_http_table() {
    let plain = |host: &str, port: u16, method: &str, uri: &str, hs: &[(&str, &str)]| {
        let a = Authority {
            host: Host::parse(host).unwrap(),
            port,
        };
        run(&a, Channel::Plain, method, uri, Version::HTTP_11, hs)
    };
    assert_eq!(
        plain(
            "plain.example.com",
            80,
            "GET",
            "http://plain.example.com/x",
            &[]
        ),
        Ok((1, false))
    );
    assert_eq!(
        plain(
            "plain.example.com",
            8080,
            "GET",
            "http://plain.example.com:8080/x",
            &[("host", "plain.example.com:8080")]
        ),
        Ok((1, false))
    );
    assert_eq!(
        plain(
            "plain.example.com",
            80,
            "POST",
            "http://plain.example.com/x",
            &[]
        ),
        Err(ErrorKind::MethodNotAllowed)
    );
    assert_eq!(
        plain(
            "secret.example.com",
            80,
            "GET",
            "http://secret.example.com/x",
            &[]
        ),
        Err(ErrorKind::CleartextCredentials)
    );
    assert_eq!(
        plain(
            "api.example.com",
            80,
            "GET",
            "http://api.example.com/v1",
            &[]
        ),
        Err(ErrorKind::HostNotAllowed)
    );
    assert_eq!(
        plain(
            "plain.example.com",
            80,
            "GET",
            "http://plain.example.com/x",
            &[("host", "evil.com")]
        ),
        Err(ErrorKind::Misdirected)
    );
}

#[test]
fn authority_parsing() {
    assert_eq!(
        parse_authority("a.example:80"),
        Some((Host::parse("a.example").unwrap(), Some(80)))
    );
    assert_eq!(
        parse_authority("[::1]:443"),
        Some((Host::parse("::1").unwrap(), Some(443)))
    );
    assert_eq!(
        parse_authority("[::1]"),
        Some((Host::parse("::1").unwrap(), None))
    );
    for bad in [
        "a.example:0",
        "a.example:99999",
        "a.example:+1",
        "[::1]x",
        "u@h",
        "a.example:1:2",
        "::1",
    ] {
        assert_eq!(parse_authority(bad), None, "{bad}");
    }
}

#[test]
fn the_matched_routes_limits() {
    let t = RouteTable::from_text(
            "routes:\n  - host: free.example\n  - host: rated.example\n    rate_limit: 2/h\n    max_body_bytes: 100\n  - host: capped.example\n    max_body_bytes: 100\n",
            &Env,
        )
        .unwrap();
    let uri: Uri = "/upload".parse().unwrap();
    let headers = HeaderMap::new();
    let view = RequestView {
        method: &Method::POST,
        uri: &uri,
        version: Version::HTTP_11,
        headers: &headers,
    };
    let [free, rated, capped] = t.routes() else {
        panic!("three routes")
    };
    // One moment for every call: the bucket's arithmetic is exact then.
    let now = std::time::Instant::now();
    let kind = |r: &Route, declared| admit(r, view, declared, now).map_err(|e| e.kind);
    // No limits: anything goes, as often as it likes.
    for _ in 0..100 {
        assert_eq!(kind(free, u64::MAX), Ok(()));
    }
    // A body of exactly the cap passes; one byte more does not.
    assert_eq!(kind(capped, 100), Ok(()));
    assert_eq!(kind(capped, 101), Err(ErrorKind::BodyTooLarge));
    // The rate comes first: a body over the cap still spends a token.
    assert_eq!(kind(rated, 101), Err(ErrorKind::BodyTooLarge));
    assert_eq!(kind(rated, 0), Ok(()));
    // The bucket is empty: an hour / 2 until the next token.
    let e = admit(rated, view, 0, now).unwrap_err();
    let ErrorKind::RateLimited { retry_after } = e.kind else {
        panic!("{e}")
    };
    assert_eq!(retry_after, 1800);
    assert_eq!(
        e.reason,
        format!("POST /upload is over its route's rate_limit of 2/h; retry in {retry_after}s")
    );
    // A refusal spent nothing, and the cap is not even looked at.
    assert!(matches!(
        kind(rated, 101),
        Err(ErrorKind::RateLimited { .. })
    ));
}

#[test]
fn what_a_decision_carries_comes_from_its_route_and_never_to_a_reported_request() {
    let t = RouteTable::from_text(
        "routes:\n  - host: api.example.com\n    path_allowlist: [/in]\n    allow_private: true\n    max_body_bytes: 100\n",
        &Env,
    )
    .unwrap();
    let headers = HeaderMap::new();
    let decide_path = |path: &str| {
        let uri: Uri = path.parse().unwrap();
        let view = RequestView {
            method: &Method::POST,
            uri: &uri,
            version: Version::HTTP_2,
            headers: &headers,
        };
        let d = decide(&t, &tunnel(), Channel::Tunnel, Mode::Report, view).unwrap();
        (
            d.logged_as(),
            d.allow_private(),
            d.body_cap(),
            d.websocket(),
        )
    };
    assert_eq!(
        decide_path("/in"),
        (("allow", None), true, Some(100), false)
    );
    assert_eq!(
        decide_path("/out"),
        (("report", Some("path_not_allowed")), false, None, false)
    );
}
