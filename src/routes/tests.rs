//! The routes file table-tested: what loads, what is refused and why, which route a
//! request uses, and the buckets a reload keeps.

use super::*;
use std::collections::HashMap;

pub(crate) struct MapSecrets(pub HashMap<String, String>);

impl SecretSource for MapSecrets {
    fn env(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
    fn file(&self, path: &str) -> Result<String, String> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| format!("cannot read {path}: not found"))
    }
}

pub(crate) fn secrets() -> MapSecrets {
    MapSecrets(HashMap::from([
        ("EGRESS_PROXY_TOKEN_0".into(), "tok0".into()),
        ("EGRESS_PROXY_TOKEN_1".into(), "user:pass".into()),
        ("EGRESS_PROXY_TOKEN_2".into(), "sk-ant-xyz".into()),
        ("EMPTY".into(), "".into()),
        ("/run/secrets/t".into(), "filetoken\n".into()),
    ]))
}

const EXAMPLE: &str = r#"
routes:
  - host: api.github.com
    path_allowlist: ["/repos/acme/widgets", "/user"]
    auth_scheme: Bearer
    token_env: EGRESS_PROXY_TOKEN_0
  - host: github.com
    path_allowlist: ["/acme/widgets.git"]
    auth_scheme: Basic
    token_env: EGRESS_PROXY_TOKEN_1
  - host: api.anthropic.com
    path_allowlist: ["/v1/messages"]
    header: x-api-key
    token_env: EGRESS_PROXY_TOKEN_2
  - host: "*.pythonhosted.org"
  - host: pypi.org
    methods: [GET, HEAD]
"#;

fn table(text: &str) -> RouteTable {
    RouteTable::from_text(text, &secrets()).unwrap()
}

fn err(text: &str) -> String {
    RouteTable::from_text(text, &secrets())
        .unwrap_err()
        .to_string()
}

fn h(s: &str) -> Host {
    Host::parse(s).unwrap()
}

#[test]
fn example_file_decisions() {
    let t = table(EXAMPLE);
    let get = Method::GET;
    let r = t
        .decide(
            &h("api.github.com"),
            443,
            &get,
            "/repos/acme/widgets/issues",
        )
        .unwrap();
    assert_eq!(r.index, 0);
    let inj = r.injection.as_ref().unwrap();
    assert_eq!(inj.header, http::header::AUTHORIZATION);
    assert_eq!(inj.value, "Bearer tok0");
    assert!(inj.value.is_sensitive());
    assert_eq!(
        t.decide(&h("api.github.com"), 443, &get, "/admin")
            .unwrap_err(),
        Denial::PathNotAllowed
    );
    let git = t
        .decide(&h("github.com"), 443, &get, "/acme/widgets.git/info/refs")
        .unwrap();
    assert_eq!(git.injection.as_ref().unwrap().value, "Basic dXNlcjpwYXNz");
    let ant = t
        .decide(&h("api.anthropic.com"), 443, &Method::POST, "/v1/messages")
        .unwrap();
    let inj = ant.injection.as_ref().unwrap();
    assert_eq!(inj.header.as_str(), "x-api-key");
    assert_eq!(inj.value, "sk-ant-xyz");
    assert!(
        t.decide(&h("files.pythonhosted.org"), 443, &Method::DELETE, "/x")
            .is_ok()
    );
    assert_eq!(
        t.decide(&h("pythonhosted.org"), 443, &get, "/")
            .unwrap_err(),
        Denial::HostNotAllowed
    );
    assert_eq!(
        t.decide(&h("pypi.org"), 443, &Method::POST, "/simple/")
            .unwrap_err(),
        Denial::MethodNotAllowed
    );
    assert!(
        t.decide(&h("pypi.org"), 443, &Method::HEAD, "/simple/")
            .is_ok()
    );
    assert_eq!(
        t.decide(&h("pypi.org"), 80, &get, "/").unwrap_err(),
        Denial::HostNotAllowed
    );
    assert!(t.covers(&h("API.GITHUB.COM."), 443));
    assert!(!t.covers(&h("api.github.com"), 8443));
    assert!(!t.covers(&h("evil.com"), 443));
}

#[test]
fn credential_headers_are_every_header_of_the_routes_for_the_host_and_port() {
    let t = table(
        r#"
routes:
  - host: api.example.com
    path_allowlist: ["/v1"]
    header: x-api-key
    token_env: EGRESS_PROXY_TOKEN_0
  - host: "*.example.com"
    path_allowlist: ["/v2"]
    header: X-Api-Key
    token_env: EGRESS_PROXY_TOKEN_0
  - host: api.example.com
    path_allowlist: ["/v3"]
    auth_scheme: Bearer
    token_env: EGRESS_PROXY_TOKEN_0
  - host: api.example.com
    path_allowlist: ["/open"]
  - host: api.example.com
    ports: [8443]
    header: x-other-key
    token_env: EGRESS_PROXY_TOKEN_0
"#,
    );
    let names = |host: &str, port| -> Vec<String> {
        t.credential_headers(&h(host), port)
            .iter()
            .map(|n| n.to_string())
            .collect()
    };
    assert_eq!(
        names("api.example.com", 443),
        ["x-api-key", "authorization"]
    );
    assert_eq!(names("www.example.com", 443), ["x-api-key"]);
    assert_eq!(names("api.example.com", 8443), ["x-other-key"]);
    assert!(names("elsewhere.test", 443).is_empty());
}

#[test]
fn orchestrator_json_loads_unchanged() {
    let t = table(
        r#"{"routes": [{"host": "api.github.com", "path_allowlist": ["/user"], "auth_scheme": "Bearer", "token_env": "EGRESS_PROXY_TOKEN_0"}, {"host": "example.org"}]}"#,
    );
    assert_eq!(t.routes().len(), 2);
    assert!(t.routes()[1].injection.is_none());
}

#[test]
fn first_match_in_file_order_with_several_routes_per_host() {
    let t = table(
        r#"
routes:
  - host: api.example.com
    path_allowlist: ["/a"]
    methods: [GET]
    auth_scheme: token
    token_env: EGRESS_PROXY_TOKEN_0
  - host: api.example.com
    path_allowlist: ["/a", "/b"]
    header: x-key
    token_env: EGRESS_PROXY_TOKEN_2
"#,
    );
    let host = h("api.example.com");
    assert_eq!(t.decide(&host, 443, &Method::GET, "/a").unwrap().index, 0);
    assert_eq!(t.decide(&host, 443, &Method::POST, "/a").unwrap().index, 1);
    assert_eq!(t.decide(&host, 443, &Method::GET, "/b").unwrap().index, 1);
    assert_eq!(
        t.routes()[0].injection.as_ref().unwrap().value,
        "token tok0"
    );
}

#[test]
fn method_denial_wins_over_path_denial() {
    let t = table(
        "routes:\n  - host: a.example\n    path_allowlist: [/x]\n  - host: a.example\n    path_allowlist: [/y]\n    methods: [GET]\n",
    );
    let host = h("a.example");
    assert_eq!(
        t.decide(&host, 443, &Method::PUT, "/y").unwrap_err(),
        Denial::MethodNotAllowed
    );
    assert_eq!(
        t.decide(&host, 443, &Method::PUT, "/z").unwrap_err(),
        Denial::PathNotAllowed
    );
}

#[test]
fn token_file_drops_one_newline() {
    let t = table(
        "routes:\n  - host: a.example\n    auth_scheme: Bearer\n    token_file: /run/secrets/t\n",
    );
    assert_eq!(
        t.routes()[0].injection.as_ref().unwrap().value,
        "Bearer filetoken"
    );
}

#[test]
fn invalid_files_name_the_route_and_field() {
    for (text, expect) in [
        (
            "routes:\n  - host: a.example\n    hots: x\n",
            "unknown field",
        ),
        (
            "routes:\n  - host: a.example\n    host: b.example\n",
            "duplicate",
        ),
        ("routes:\n  - host: \"\"\n", "routes[0].host"),
        ("routes:\n  - host: \"*\"\n", "routes[0].host"),
        ("routes:\n  - host: \"*.com\"\n", "public suffix"),
        ("routes:\n  - host: \"*.co.uk\"\n", "public suffix"),
        (
            "routes:\n  - host: a.example\n  - host: b.example\n    path_allowlist: [x]\n",
            "routes[1].path_allowlist",
        ),
        (
            "routes:\n  - host: a.example\n    auth_scheme: Bearer\n",
            "routes[0].auth_scheme",
        ),
        (
            "routes:\n  - host: a.example\n    header: x-key\n",
            "routes[0].header",
        ),
        (
            "routes:\n  - host: a.example\n    token_env: EGRESS_PROXY_TOKEN_0\n",
            "routes[0].token_env",
        ),
        (
            "routes:\n  - host: a.example\n    auth_scheme: Bearer\n    token_env: NOPE\n",
            "NOPE is not set",
        ),
        (
            "routes:\n  - host: a.example\n    auth_scheme: Bearer\n    token_env: EMPTY\n",
            "EMPTY is empty",
        ),
        (
            "routes:\n  - host: a.example\n    auth_scheme: Bearer\n    token_env: EGRESS_PROXY_TOKEN_0\n    token_file: /run/secrets/t\n",
            "not both",
        ),
        (
            "routes:\n  - host: a.example\n    auth_scheme: Bearer\n    token_file: /nope\n",
            "routes[0].token_file",
        ),
        (
            "routes:\n  - host: a.example\n    ports: []\n",
            "routes[0].ports",
        ),
        ("routes:\n  - host: a.example\n    ports: [70000]\n", ""),
        (
            "routes:\n  - host: a.example\n    methods: [\"GE T\"]\n",
            "routes[0].methods",
        ),
        (
            "routes:\n  - host: a.example\n    header: host\n    token_env: EGRESS_PROXY_TOKEN_0\n",
            "routes[0].header",
        ),
        ("routes:\n  - host: a.example\n    allow_private: yes\n", ""),
        ("routes: [\n", ""),
        (
            "{\"routes\": [{\"host\": \"a.example\", \"host\": \"b.example\"}]}",
            "duplicate",
        ),
        (
            "{\"routes\": [{\"host\": \"a.example\", \"extra\": 1}]}",
            "unknown field",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(expect), "{text:?} gave {e:?}, wanted {expect:?}");
    }
}

#[test]
fn limits_parse_and_invalid_ones_name_their_key() {
    let t = table(
        "routes:\n  - host: a.example\n    rate_limit: 60/m\n  - host: b.example\n    rate_limit: \"5/s\"\n    burst: 2\n    max_body_bytes: 1048576\n  - host: c.example\n",
    );
    let [a, b, c] = t.routes() else {
        panic!("three routes")
    };
    let rate = a.rate_limit.as_ref().unwrap();
    assert_eq!((rate.to_string(), rate.burst), ("60/m".to_owned(), 60));
    assert_eq!(a.max_body_bytes, None);
    let rate = b.rate_limit.as_ref().unwrap();
    assert_eq!((rate.to_string(), rate.burst), ("5/s".to_owned(), 2));
    assert_eq!(b.max_body_bytes, Some(1_048_576));
    assert!(c.rate_limit.is_none() && c.max_body_bytes.is_none());
    let json = table(
        r#"{"routes": [{"host": "a.example", "rate_limit": "1/h", "burst": 3, "max_body_bytes": 10}]}"#,
    );
    assert_eq!(json.routes()[0].max_body_bytes, Some(10));

    let route = |keys: &str| format!("routes:\n  - host: a.example\n  - host: b.example\n{keys}");
    for (keys, field) in [
        ("    rate_limit: 0/m\n", "rate_limit"),
        ("    rate_limit: 10/d\n", "rate_limit"),
        ("    rate_limit: 1.5/s\n", "rate_limit"),
        ("    rate_limit: -1/s\n", "rate_limit"),
        ("    rate_limit: 10\n", "rate_limit"),
        ("    rate_limit: \"\"\n", "rate_limit"),
        ("    burst: 5\n", "burst"),
        ("    rate_limit: 5/s\n    burst: 0\n", "burst"),
        ("    rate_limit: 5/s\n    burst: -2\n", "burst"),
        ("    rate_limit: 5/s\n    burst: 2.5\n", "burst"),
        ("    rate_limit: 5/s\n    burst: many\n", "burst"),
        ("    max_body_bytes: 0\n", "max_body_bytes"),
        ("    max_body_bytes: -1\n", "max_body_bytes"),
        ("    max_body_bytes: 1.5\n", "max_body_bytes"),
        ("    max_body_bytes: 1e6\n", "max_body_bytes"),
        ("    max_body_bytes: 10MB\n", "max_body_bytes"),
        ("    max_body_bytes: true\n", "max_body_bytes"),
        (
            "    max_body_bytes: 99999999999999999999999\n",
            "max_body_bytes",
        ),
    ] {
        let e = err(&route(keys));
        assert!(
            e.starts_with(&format!("routes[1].{field}: ")),
            "{keys:?} gave {e:?}, wanted routes[1].{field}"
        );
    }
}

#[test]
fn a_reload_keeps_the_bucket_of_a_route_that_matches_the_same_requests() {
    let old = table(
        "routes:\n  - host: a.example\n    path_allowlist: [/x, /y]\n    methods: [GET, POST]\n    rate_limit: 1/h\n  - host: b.example\n    rate_limit: 1/h\n  - host: c.example\n    rate_limit: 1/h\n",
    );
    for route in old.routes() {
        assert!(
            route
                .rate_limit
                .as_ref()
                .unwrap()
                .bucket
                .take(std::time::Instant::now())
                .is_ok()
        );
    }
    // Moved, lists reordered, token added, another route changed: a.example keeps its
    // bucket; b.example's limit and c.example's ports changed, and d.example is new.
    let mut new = RouteTable::from_text(
            "routes:\n  - host: d.example\n    rate_limit: 1/h\n  - host: b.example\n    rate_limit: 2/h\n  - host: c.example\n    ports: [443, 8443]\n    rate_limit: 1/h\n  - host: a.example\n    path_allowlist: [/y, /x]\n    methods: [POST, GET]\n    rate_limit: 1/h\n    auth_scheme: Bearer\n    token_env: EGRESS_PROXY_TOKEN_0\n",
            &secrets(),
        )
        .unwrap();
    new.keep_buckets_from(&old);
    let spent: Vec<bool> = new
        .routes()
        .iter()
        .map(|r| {
            r.rate_limit
                .as_ref()
                .unwrap()
                .bucket
                .take(std::time::Instant::now())
                .is_err()
        })
        .collect();
    assert_eq!(spent, [false, false, false, true]);
    // A path or a method more is another route: a full bucket.
    for changed in [
        "routes:\n  - host: a.example\n    path_allowlist: [/x, /y, /z]\n    methods: [GET, POST]\n    rate_limit: 1/h\n",
        "routes:\n  - host: a.example\n    path_allowlist: [/x, /y]\n    methods: [GET]\n    rate_limit: 1/h\n",
        "routes:\n  - host: a.example\n    path_allowlist: [/x, /y]\n    rate_limit: 1/h\n",
        "routes:\n  - host: a.example\n    path_allowlist: [/x, /y]\n    methods: [GET, POST]\n    rate_limit: 1/h\n    burst: 2\n",
    ] {
        let mut t = table(changed);
        t.keep_buckets_from(&old);
        let bucket = &t.routes()[0].rate_limit.as_ref().unwrap().bucket;
        assert!(bucket.take(std::time::Instant::now()).is_ok(), "{changed}");
    }
}

#[test]
fn merge_key_duplicate_is_refused() {
    let text = "routes:\n  - &r {host: a.example, ports: [443]}\n  - <<: *r\n    ports: [8443]\n";
    assert!(RouteTable::from_text(text, &secrets()).is_err());
}

#[test]
fn token_never_in_debug_output() {
    let t = table(EXAMPLE);
    let dump = format!("{t:?}");
    for secret in ["tok0", "dXNlcjpwYXNz", "user:pass", "sk-ant-xyz"] {
        assert!(!dump.contains(secret), "{secret} leaked into {dump}");
    }
}

mod props {
    use super::secrets;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,400}") {
            let _ = RouteTable::from_text(&s, &secrets());
        }

        #[test]
        fn parsing_route_shaped_yaml_never_panics(
            host in "[a-z*.:0-9\\[\\]-]{0,20}",
            path in "[/a-z*%0-9.;]{0,20}",
            method in "[A-Za-z ]{0,8}",
            port in any::<i64>(),
        ) {
            let text = format!("routes:\n  - host: \"{host}\"\n    ports: [{port}]\n    path_allowlist: [\"{path}\"]\n    methods: [\"{method}\"]\n");
            if let Ok(t) = RouteTable::from_text(&text, &secrets()) {
                // Whatever loads is usable: decisions never panic either.
                for r in t.routes() {
                    prop_assert!(!r.ports.is_empty());
                }
                let h = Host::parse("a.example").unwrap();
                let _ = t.decide(&h, 443, &Method::GET, "/a/b");
            }
        }
    }
}
