//! `routes suggest` end to end on logs shaped like real sessions: what it writes loads,
//! allows every request it counted, never allows `/**`, and is the same bytes every time.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::policy::{Authority, Channel, Decision, Mode, RequestView, decide};

const FIXTURES: [(&str, &str); 7] = [
    (
        "github",
        include_str!("../../tests/fixtures/suggest/github.jsonl"),
    ),
    (
        "git",
        include_str!("../../tests/fixtures/suggest/git.jsonl"),
    ),
    (
        "npm",
        include_str!("../../tests/fixtures/suggest/npm.jsonl"),
    ),
    (
        "pypi",
        include_str!("../../tests/fixtures/suggest/pypi.jsonl"),
    ),
    (
        "anthropic",
        include_str!("../../tests/fixtures/suggest/anthropic.jsonl"),
    ),
    (
        "openai",
        include_str!("../../tests/fixtures/suggest/openai.jsonl"),
    ),
    (
        "docs",
        include_str!("../../tests/fixtures/suggest/docs.jsonl"),
    ),
];

fn observed(text: &str) -> Vec<Observed> {
    text.lines()
        .filter_map(|l| match input::parse_line(l.as_bytes()) {
            Line::Request(o) => Some(o),
            _ => None,
        })
        .collect()
}

/// A fixture's requests, per host and port.
pub(super) type ByHost = Vec<((String, u16), Vec<Seen>)>;

/// Each fixture's requests, per host and port, as the generalisation takes them.
pub(super) fn fixtures() -> BTreeMap<&'static str, ByHost> {
    FIXTURES
        .iter()
        .map(|(name, text)| {
            let mut s = Suggester::new(8);
            for o in observed(text) {
                s.add(o);
            }
            let by_host = s
                .seen
                .into_iter()
                .map(|(k, paths)| {
                    let seen = paths
                        .into_iter()
                        .map(|((method, path), count)| Seen {
                            method,
                            path,
                            count,
                        })
                        .collect();
                    (k, seen)
                })
                .collect();
            (*name, by_host)
        })
        .collect()
}

fn suggest(requests: &[Observed], routes: Option<&str>, max_literal: usize) -> String {
    let mut s = Suggester::new(max_literal);
    if let Some(text) = routes {
        s = s.with_routes("routes.yaml", text).unwrap();
    }
    for o in requests {
        s.add(o.clone());
    }
    s.finish().0
}

/// The proxy's own decision, on a request inside a tunnel to the request's host.
fn allowed(table: &RouteTable, o: &Observed) -> bool {
    let uri: http::Uri = o.path.parse().unwrap();
    let method = http::Method::from_bytes(o.method.as_bytes()).unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, o.host.authority_form().parse().unwrap());
    let authority = Authority {
        host: o.host.clone(),
        port: o.port,
    };
    let view = RequestView {
        method: &method,
        uri: &uri,
        version: http::Version::HTTP_11,
        headers: &headers,
    };
    matches!(
        decide(table, &authority, Channel::Tunnel, Mode::Enforce, view),
        Ok(Decision::Allow(_))
    )
}

/// The invariant: the output loads, allows every request it counted, and no pattern in
/// it is `/**` (nor the bare `/` that means the same).
fn assert_holds(requests: &[Observed], out: &str, left_out: &[&str]) {
    let table =
        RouteTable::from_text(out, &OneSecret("t")).unwrap_or_else(|e| panic!("{e}\n{out}"));
    for o in requests {
        if left_out.contains(&o.path.as_str()) {
            continue;
        }
        assert!(
            allowed(&table, o),
            "{} {} on {} not allowed by\n{out}",
            o.method,
            o.path,
            o.host
        );
    }
    for r in table.routes() {
        for p in &r.paths {
            assert!(p.as_str() != "/**" && p.as_str() != "/", "{out}");
        }
    }
}

/// By meaning, not only text: a path of words no log holds, deeper than any logged path,
/// is allowed by no drafted route (`/*/**` would allow it).
fn assert_narrow(requests: &[Observed], out: &str) {
    let table =
        RouteTable::from_text(out, &OneSecret("t")).unwrap_or_else(|e| panic!("{e}\n{out}"));
    for o in requests {
        let unseen = Observed {
            path: "/zzunseen/zzunseen/zzunseen/zzunseen/zzunseen/zzunseen/zzunseen".into(),
            ..o.clone()
        };
        assert!(
            !allowed(&table, &unseen),
            "{} allows {}:\n{out}",
            o.host,
            unseen.path
        );
    }
}

#[test]
fn every_fixture_request_is_allowed_by_the_suggestion() {
    let mut all = Vec::new();
    for (name, text) in FIXTURES {
        let requests = observed(text);
        assert!(!requests.is_empty(), "{name}");
        let out = suggest(&requests, None, 8);
        assert_holds(&requests, &out, &[]);
        assert_narrow(&requests, &out);
        all.extend(requests);
    }
    for max in [0, 1, 2, 8, 100] {
        let out = suggest(&all, None, max);
        assert_holds(&all, &out, &[]);
        assert_narrow(&all, &out);
    }
}

#[test]
fn same_requests_in_any_order_same_bytes() {
    let mut all: Vec<Observed> = FIXTURES.iter().flat_map(|(_, t)| observed(t)).collect();
    let first = suggest(&all, None, 8);
    all.reverse();
    assert_eq!(suggest(&all, None, 8), first);
    all.rotate_left(17);
    assert_eq!(suggest(&all, None, 8), first);
}

#[test]
fn the_output_reads_as_the_reviewer_expects() {
    let requests = observed(FIXTURES[5].1);
    let out = suggest(&requests, None, 8);
    let expect = r#"# Drafted by `egress-proxy routes suggest` from 9 requests: review every route before use.
routes:
  # 2 requests, e.g. GET /v1/models
  - host: "api.openai.com"
    methods: ["GET"]
    path_allowlist: ["/v1/models", "/v1/responses/*"]
  # 2 requests, e.g. DELETE /v1/files/<id>
  - host: "api.openai.com"
    methods: ["GET", "DELETE"]
    path_allowlist: ["/v1/files/*"]
  # 5 requests, e.g. POST /v1/chat/completions
  - host: "api.openai.com"
    methods: ["POST"]
    path_allowlist: ["/v1/chat/completions", "/v1/files", "/v1/responses"]
"#;
    assert_eq!(out, expect);
    assert!(
        !out.contains("XjGxS3KTG0uNmNOK362iJua3"),
        "a token-like segment leaked"
    );
    let odd_port = Observed {
        host: Host::parse("registry.internal.example").unwrap(),
        port: 8443,
        method: "GET".into(),
        path: "/v2/".into(),
    };
    let out = suggest(&[odd_port], None, 8);
    assert!(out.contains("    ports: [8443]\n"), "{out}");
    assert_eq!(suggest(&[], None, 8).lines().last(), Some("routes: []"));
}

const EXISTING: &str = r#"
routes:
  - host: api.github.com
    path_allowlist: ["/repos/acme/widgets/issues"]
    auth_scheme: Bearer
    token_env: GITHUB_TOKEN_NOT_SET
    rate_limit: 60/m
    burst: 10
  - host: github.com
    path_allowlist: ["/acme/widgets.git"]
    methods: [GET, POST]
    auth_scheme: Basic
    token_file: /run/secrets/does-not-exist
    max_body_bytes: 52428800
  - host: "*.pythonhosted.org"
    allow_private: false
"#;

#[test]
fn a_routes_file_comes_first_unchanged_and_only_what_it_misses_is_added() {
    let requests: Vec<Observed> = FIXTURES.iter().flat_map(|(_, t)| observed(t)).collect();
    let out = suggest(&requests, Some(EXISTING), 8);
    assert_holds(&requests, &out, &[]);
    let head = r#"routes:
  # From routes.yaml, unchanged.
  - host: "api.github.com"
    path_allowlist: ["/repos/acme/widgets/issues"]
    auth_scheme: "Bearer"
    token_env: "GITHUB_TOKEN_NOT_SET"
    rate_limit: "60/m"
    burst: 10
  - host: "github.com"
    path_allowlist: ["/acme/widgets.git"]
    methods: ["GET", "POST"]
    auth_scheme: "Basic"
    token_file: "/run/secrets/does-not-exist"
    max_body_bytes: 52428800
  - host: "*.pythonhosted.org"
    allow_private: false
"#;
    assert!(out.contains(head), "{out}");
    // Nothing is added for what those routes allow: git, the packages.
    assert!(!out.contains("host: \"github.com\"\n    methods"), "{out}");
    assert!(!out.contains("files.pythonhosted.org"), "{out}");
    // New GitHub paths get routes without a token, saying so.
    let new_github = out.split("  # ").find(|c| c.contains("/user")).unwrap();
    assert!(!new_github.contains("token_env"), "{new_github}");
    assert!(
        out.contains("# No token: routes[0] above injects one for api.github.com"),
        "{out}"
    );
    assert!(
        !out.contains("\"/repos/acme/widgets/issues/*\""),
        "already allowed: {out}"
    );
    let table = RouteTable::from_text(&out, &OneSecret("t")).unwrap();
    assert!(table.routes()[0].injection.is_some() && table.routes()[1].injection.is_some());
    assert!(table.routes()[3..].iter().all(|r| r.injection.is_none()));
}

#[test]
fn a_routes_file_that_is_invalid_is_an_error_naming_it() {
    for bad in [
        "routes: [\n",
        "routes:\n  - host: \"*.com\"\n",
        "routes:\n  - host: a.example\n    token_env: X\n",
    ] {
        let e = Suggester::new(8).with_routes("r.yaml", bad).err().unwrap();
        assert!(e.starts_with("r.yaml: "), "{e}");
    }
}

#[test]
fn a_log_read_line_by_line_reports_bad_lines_and_counts_the_rest() {
    let mut log = String::new();
    log.push_str("{\"level\":\"INFO\",\"message\":\"egress-proxy serving\",\"event\":\"start\"}\n");
    log.push_str(FIXTURES[1].1);
    log.push_str("2026-12-06T07:00:00Z  WARN egress-proxy: a text line\n");
    log.push_str("{\"event\":\"request\",\"host\":\"a.example\",\"port\":443,\"method\":\"GET\",\"path\":\"/a/../b\",\"decision\":\"allow\"}\n");
    let mut s = Suggester::new(8);
    let mut warnings = Vec::new();
    s.read(Some("log"), &mut log.as_bytes(), &mut |w| {
        warnings.push(w.to_owned())
    })
    .unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("log: line 7: not JSON"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("log: line 8: request event with a path"),
        "{warnings:?}"
    );
    let (out, notes) = s.finish();
    assert!(out.contains("from 5 requests"), "{out}");
    assert!(notes.is_empty());
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "a",
            "b",
            "repos",
            "v1",
            "index.html",
            "@s%2fn",
            "x*y",
            "8e",
            "-"
        ])
        .prop_map(str::to_owned),
        (0u32..20).prop_map(|n| n.to_string()),
        "[0-9a-f]{7,12}",
        "[A-Za-z0-9]{24}",
        "[A-Za-z0-9]{20}%2F[a-z]{1,3}",
        "[a-z]{1,3}",
    ]
}

fn request() -> impl Strategy<Value = Observed> {
    (
        prop::sample::select(vec!["a.example", "b.example"]),
        prop::sample::select(vec![443u16, 8443]),
        prop::sample::select(vec!["GET", "POST", "DELETE"]),
        prop::collection::vec(segment(), 1..5),
        any::<bool>(),
    )
        .prop_map(|(host, port, method, segs, slash)| Observed {
            host: Host::parse(host).unwrap(),
            port,
            method: method.into(),
            path: format!("/{}{}", segs.join("/"), if slash { "/" } else { "" }),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn whatever_was_counted_is_allowed(
        requests in prop::collection::vec(request(), 1..40),
        max_literal in 0usize..4,
    ) {
        let requests: Vec<Observed> = requests
            .into_iter()
            .filter(|o| check_request_path_ok(&o.path))
            .collect();
        let mut s = Suggester::new(max_literal);
        for o in &requests {
            s.add(o.clone());
        }
        let (out, notes) = s.finish();
        // What may be left out (and said on stderr): `/`, which only `/**` would allow, and
        // a path with a `*`, which a pattern cannot hold literally when wildcards alone
        // would be too wide.
        let left_out: Vec<&str> = requests
            .iter()
            .map(|o| o.path.as_str())
            .filter(|p| *p == "/" || p.contains('*'))
            .collect();
        prop_assert!(notes.is_empty() || !left_out.is_empty(), "{:?}", notes);
        assert_holds(&requests, &out, &left_out);
        assert_narrow(&requests, &out);
    }
}

fn check_request_path_ok(p: &str) -> bool {
    crate::routes::check_request_path(p).is_ok()
}

#[test]
fn distinct_requests_are_held_up_to_a_bound() {
    let mut s = Suggester::new(8);
    let request = |i: usize| Observed {
        host: Host::parse(&format!("h{i}.example")).unwrap(),
        port: 443,
        method: "GET".into(),
        path: "/a".into(),
    };
    for i in 0..MAX_DISTINCT + 5 {
        s.add(request(i));
    }
    // One already held still counts; new hosts past the bound are not held at all.
    s.add(request(0));
    assert_eq!(s.seen.len(), MAX_DISTINCT);
    assert_eq!(
        s.seen[&("h0.example".to_owned(), 443)][&("GET".to_owned(), "/a".to_owned())],
        2
    );
    assert_eq!(s.over_budget, 5);
    let (_, notes) = s.finish();
    assert!(notes[0].starts_with("5 requests not counted"), "{notes:?}");
}
