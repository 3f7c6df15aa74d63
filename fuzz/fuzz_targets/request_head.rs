//! A raw HTTP/1.1 request head through the whole decision: hyper's parser (httparse),
//! the strict framing check, then the policy. Never panics; whatever the policy allows
//! names the tunnel's host and has an unambiguous path.
#![no_main]
use egress_proxy::{
    Authority, Channel, HeadLog, Host, Mode, RequestView, RouteTable, SecretSource,
    check_request_path, decide,
};
use libfuzzer_sys::fuzz_target;

struct Fixed;
impl SecretSource for Fixed {
    fn env(&self, _: &str) -> Option<String> {
        Some("token".into())
    }
    fn file(&self, _: &str) -> Result<String, String> {
        Err("no".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let log = HeadLog::new(65536);
    log.record(data);
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else { return };
    let (Some(method), Some(path)) = (req.method, req.path) else { return };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let _ = log.check(&method);
    let Ok(uri) = path.parse::<http::Uri>() else { return };
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(h.name.as_bytes()), http::HeaderValue::from_bytes(h.value)) {
            map.append(n, v);
        }
    }
    let routes = RouteTable::from_text(
        "routes:\n  - host: api.example.com\n    path_allowlist: [\"/v1\", \"/repos/*/issues/**\"]\n    auth_scheme: Bearer\n    token_env: T\n",
        &Fixed,
    )
    .unwrap();
    let authority = Authority { host: Host::parse("api.example.com").unwrap(), port: 443 };
    let view = RequestView { method: &method, uri: &uri, version: http::Version::HTTP_11, headers: &map };
    let enforced = decide(&routes, &authority, Channel::Tunnel, Mode::Enforce, view);
    if let Ok(decision) = &enforced {
        assert!(decision.route().is_some());
        assert!(check_request_path(decision.path()).is_ok());
        assert!(decision.path().starts_with("/v1") || decision.path().starts_with("/repos/"));
    }
    // Report mode relaxes only the routes: what it forwards has an unambiguous path, what
    // enforce mode allows goes under the same route, and what enforce mode refuses before
    // the routes it refuses too.
    let enforced = enforced.map(|d| d.route().map(|r| r.index)).map_err(|e| e.kind);
    match decide(&routes, &authority, Channel::Tunnel, Mode::Report, view) {
        Ok(decision) => {
            assert!(check_request_path(decision.path()).is_ok());
            match enforced {
                Ok(route) => assert_eq!(decision.route().map(|r| r.index), route),
                Err(kind) => assert!(decision.route().is_none(), "{kind:?}"),
            }
        }
        Err(e) => assert_eq!(enforced, Err(e.kind)),
    }
});
