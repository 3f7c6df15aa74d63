//! The per-request decision of SPEC §4.2 and §4.4, as one pure function, and the CONNECT's
//! of §4.1.
//!
//! The proxy hands over what it knows (the authority the tunnel or absolute URI named,
//! the request's method, target and headers, the [`Mode`]) and gets back the route to
//! forward under, a report-mode pass without one, or the [`ProxyError`] to answer with.
//! Order matters and follows the contract: authority, then path, then method and upgrade
//! rules, then the routes. Report mode relaxes only the last step, and only what the
//! routes refuse: everything before it refuses as in enforce mode.

use std::time::Instant;

use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, Method, Uri, Version};

use crate::error::{ErrorKind, ProxyError};
use crate::routes::{Denial, Host, Route, RouteTable, check_request_path};

/// The authority every request on a connection must name: the CONNECT target inside a
/// tunnel, or the absolute URI's authority for plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: Host,
    pub port: u16,
}

/// Is this request inside an intercepted TLS tunnel, or plain HTTP through the proxy?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Tunnel,
    Plain,
}

/// What the proxy does with what no route allows (`--mode`). Fixed at start: a reload
/// does not change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse it (403).
    Enforce,
    /// Forward it without a token and log it as `report`, to learn what an agent needs.
    Report,
}

impl Mode {
    /// As logged and labelled on `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        }
    }
}

/// How a request that passed every check goes out.
#[derive(Debug)]
pub enum Decision<'r, 'q> {
    /// A route matched: forwarded under it, with its token.
    Allow(Allowed<'r, 'q>),
    /// Report mode: no route allows it; forwarded without any route, so without a token.
    Report(Reported<'q>),
}

impl Decision<'_, '_> {
    /// The route it goes out under, if a route matched.
    pub fn route(&self) -> Option<&Route> {
        match self {
            Decision::Allow(a) => Some(a.route),
            Decision::Report(_) => None,
        }
    }

    /// The request path without its query.
    pub fn path(&self) -> &str {
        match self {
            Decision::Allow(a) => a.path,
            Decision::Report(r) => r.path,
        }
    }

    /// The audit event's `decision`, and its `reason`: none for an allowed request, what
    /// enforce mode would have refused with for a reported one.
    pub fn logged_as(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Decision::Allow(_) => ("allow", None),
            Decision::Report(r) => ("report", Some(r.would_refuse.code())),
        }
    }

    /// May it be dialled at a private address? Only under a route that says so; a
    /// reported request is checked as under a route without `allow_private`.
    pub fn allow_private(&self) -> bool {
        self.route().is_some_and(|r| r.allow_private)
    }

    /// The body cap it streams under: its route's `max_body_bytes`; none without a route.
    pub fn body_cap(&self) -> Option<u64> {
        self.route().and_then(|r| r.max_body_bytes)
    }

    /// A WebSocket upgrade to relay.
    pub fn websocket(&self) -> bool {
        match self {
            Decision::Allow(a) => a.websocket,
            Decision::Report(r) => r.websocket,
        }
    }
}

/// A request no route allows, forwarded in report mode. It has no route, so nothing here
/// can put a token on it.
#[derive(Debug)]
pub struct Reported<'q> {
    /// What enforce mode would have refused it with: `HostNotAllowed`, `PathNotAllowed`
    /// or `MethodNotAllowed`.
    pub would_refuse: ErrorKind,
    /// The request path without its query.
    pub path: &'q str,
    /// A WebSocket upgrade to relay.
    pub websocket: bool,
    /// Every header a route for this host and port injects its token in (`header`): the
    /// agent's own values of them are removed, as `Authorization` and
    /// `Proxy-Authorization` always are.
    pub credential_headers: Vec<HeaderName>,
}

/// What a CONNECT whose target parsed gets (SPEC §4.1).
#[derive(Debug)]
pub(crate) enum ConnectDecision {
    /// A route covers the host and port: the tunnel opens.
    Allow,
    /// Report mode, no route covers it: the tunnel opens, and is logged with what enforce
    /// mode would have refused it with.
    Report(ErrorKind),
    Deny(ProxyError),
}

/// Decides a CONNECT to `target`, whose form and destination rules have passed.
pub(crate) fn decide_connect(
    routes: &RouteTable,
    target: &Authority,
    mode: Mode,
) -> ConnectDecision {
    if routes.covers(&target.host, target.port) {
        return ConnectDecision::Allow;
    }
    match mode {
        Mode::Report => ConnectDecision::Report(ErrorKind::HostNotAllowed),
        Mode::Enforce => ConnectDecision::Deny(err(
            ErrorKind::HostNotAllowed,
            format!("{}:{} is not in the routes", target.host, target.port),
        )),
    }
}

/// What the routes allowed.
#[derive(Debug)]
pub struct Allowed<'r, 'q> {
    pub route: &'r Route,
    /// The request path without its query: what was matched, and what is logged.
    pub path: &'q str,
    /// A WebSocket upgrade to relay.
    pub websocket: bool,
}

/// The request as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'q> {
    pub method: &'q Method,
    pub uri: &'q Uri,
    pub version: Version,
    pub headers: &'q HeaderMap,
}

fn err(kind: ErrorKind, reason: impl Into<String>) -> ProxyError {
    ProxyError::new(kind, reason)
}

/// Parses `host[:port]` from a `Host` header or URI authority.
pub(crate) fn parse_authority(s: &str) -> Option<(Host, Option<u16>)> {
    let (host, port) = split_authority(s)?;
    Some((Host::parse(host).ok()?, port))
}

/// Splits `host[:port]` (IPv6 in brackets, kept) into the host text and a valid port.
fn split_authority(s: &str) -> Option<(&str, Option<u16>)> {
    if s.contains('@') {
        return None;
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (&s[..end + 2], port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)
        }
        Some(_) => return None,
    };
    Some((host, port))
}

/// Why a proxy target (a CONNECT authority, or an absolute-form URI's) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetError {
    /// An all-numeric name (`2130706433`, `127.1`), which resolvers read as an address:
    /// refused outright as a destination (SPEC §4.3).
    NumericHost,
    /// Not `host[:port]`.
    Malformed,
}

/// Parses the authority a proxy request names, refusing all-numeric host names first.
pub(crate) fn parse_target(raw: &str) -> Result<(Host, Option<u16>), TargetError> {
    let host_part = raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw);
    if let Err(crate::routes::HostError::Numeric) = Host::parse(host_part) {
        return Err(TargetError::NumericHost);
    }
    parse_authority(raw).ok_or(TargetError::Malformed)
}

/// Checks that an authority (URI or `Host`) names `expected`: same host, and the same
/// port when one is given.
fn check_named_authority(what: &str, value: &str, expected: &Authority) -> Result<(), ProxyError> {
    let malformed = || err(ErrorKind::BadRequest, format!("malformed {what}"));
    let (host, port) = split_authority(value).ok_or_else(malformed)?;
    let same_host = expected.host.is_named_by(host).map_err(|_| malformed())?;
    if !same_host || port.is_some_and(|p| p != expected.port) {
        let host = Host::parse(host).map_or_else(|_| host.to_owned(), |h| h.to_string());
        return Err(err(
            ErrorKind::Misdirected,
            format!(
                "{what} {host} does not match the tunnel to {}",
                expected.host
            ),
        ));
    }
    Ok(())
}

/// Decides a request. See the module docs for the order of checks.
pub fn decide<'r, 'q>(
    routes: &'r RouteTable,
    authority: &Authority,
    channel: Channel,
    mode: Mode,
    req: RequestView<'q>,
) -> Result<Decision<'r, 'q>, ProxyError> {
    let method = req.method;
    if method == Method::CONNECT {
        return Err(err(
            ErrorKind::BadRequest,
            "CONNECT inside a tunnel is not supported",
        ));
    }
    // Authority: the URI's (absolute-form, or HTTP/2 :authority) and every Host header
    // must name the tunnel's host.
    let mut hosts = req.headers.get_all(HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(err(ErrorKind::BadRequest, "more than one Host header"));
    }
    if let Some(uri_authority) = req.uri.authority() {
        if channel == Channel::Tunnel && req.uri.scheme_str().is_some_and(|s| s != "https") {
            return Err(err(
                ErrorKind::BadRequest,
                "request target scheme is not https",
            ));
        }
        let label = if req.version == Version::HTTP_2 {
            ":authority"
        } else {
            "request target"
        };
        check_named_authority(label, uri_authority.as_str(), authority)?;
    }
    match host_header {
        Some(h) => {
            let h = h
                .to_str()
                .map_err(|_| err(ErrorKind::BadRequest, "malformed Host"))?;
            check_named_authority("Host", h, authority)?;
        }
        None if req.version == Version::HTTP_11 && req.uri.authority().is_none() => {
            return Err(err(ErrorKind::BadRequest, "HTTP/1.1 request without Host"));
        }
        None => {}
    }
    // Path: unambiguous, or refused.
    let path = req.uri.path();
    check_request_path(path)
        .map_err(|e| err(ErrorKind::BadRequest, format!("ambiguous path: {e}")))?;
    if method.as_str().eq_ignore_ascii_case("TRACE")
        || method.as_str().eq_ignore_ascii_case("TRACK")
    {
        return Err(err(
            ErrorKind::MethodNotAllowed,
            format!("{method} is never forwarded"),
        ));
    }
    let websocket = upgrade_requested(req)?;
    match routes.decide(&authority.host, authority.port, method, path) {
        Ok(route) => {
            if channel == Channel::Plain && route.injection.is_some() {
                return Err(err(
                    ErrorKind::CleartextCredentials,
                    format!(
                        "{method} {path} on {} would carry a credential over cleartext HTTP; use HTTPS",
                        authority.host
                    ),
                ));
            }
            Ok(Decision::Allow(Allowed {
                route,
                path,
                websocket,
            }))
        }
        Err(denial) if mode == Mode::Report => Ok(Decision::Report(Reported {
            would_refuse: denial_kind(denial),
            path,
            websocket,
            credential_headers: routes.credential_headers(&authority.host, authority.port),
        })),
        Err(denial) => {
            let what = match denial {
                Denial::MethodNotAllowed => "is not an allowed method for this path",
                Denial::HostNotAllowed | Denial::PathNotAllowed => "is not in the routes",
            };
            let reason = match denial {
                Denial::HostNotAllowed => format!("{}:{} {what}", authority.host, authority.port),
                _ => format!("{method} {path} on {} {what}", authority.host),
            };
            Err(err(denial_kind(denial), reason))
        }
    }
}

/// The error code of a refusal by the routes.
fn denial_kind(denial: Denial) -> ErrorKind {
    match denial {
        Denial::HostNotAllowed => ErrorKind::HostNotAllowed,
        Denial::PathNotAllowed => ErrorKind::PathNotAllowed,
        Denial::MethodNotAllowed => ErrorKind::MethodNotAllowed,
    }
}

/// True for a WebSocket upgrade (HTTP/1.1 GET, `Upgrade: websocket`, `Connection:
/// upgrade`); any other upgrade (`h2c`, or one with a body) is refused.
fn upgrade_requested(req: RequestView<'_>) -> Result<bool, ProxyError> {
    let mut upgrades = req.headers.get_all(UPGRADE).iter();
    let Some(upgrade) = upgrades.next() else {
        return Ok(false);
    };
    let connection_upgrade = req
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let websocket = upgrades.next().is_none()
        && upgrade
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return Err(err(
            ErrorKind::BadRequest,
            "only WebSocket upgrades are relayed (h2c is refused)",
        ));
    }
    if req.version != Version::HTTP_11 || req.method != Method::GET || !connection_upgrade {
        return Err(err(ErrorKind::BadRequest, "malformed WebSocket upgrade"));
    }
    let has_body = req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(err(
            ErrorKind::BadRequest,
            "a WebSocket upgrade cannot carry a body",
        ));
    }
    Ok(true)
}

/// The matched route's own limits (SPEC §4.2, last step): its `rate_limit`, then its
/// `max_body_bytes` against the least the body can be (`declared`: its `Content-Length`
/// when it has one, else 0; a body of unknown length is capped as it streams). A step of
/// its own after [`decide`], for every request a route matched whatever else is relaxed; a
/// request no route matched has no limits. A token is spent here, after every check that
/// could refuse the request (a refused request spends nothing) and before anything
/// upstream is touched, even if the body then turns out too large. `now` is when the
/// request arrived (the caller's clock, so this stays a function of its arguments and the
/// bucket); a route without limits costs no more than a look at its two limits.
pub fn admit(
    route: &Route,
    req: RequestView<'_>,
    declared: u64,
    now: Instant,
) -> Result<(), ProxyError> {
    if let Some(limit) = &route.rate_limit
        && let Err(wait) = limit.bucket.take(now)
    {
        let retry_after = crate::routes::retry_after_secs(wait);
        return Err(err(
            ErrorKind::RateLimited { retry_after },
            format!(
                "{} {} is over its route's rate_limit of {limit}; retry in {retry_after}s",
                req.method,
                req.uri.path()
            ),
        ));
    }
    if let Some(max) = route.max_body_bytes
        && declared > max
    {
        return Err(err(
            ErrorKind::BodyTooLarge,
            format!(
                "{} {}: a body of {declared} bytes is over its route's max_body_bytes of {max}",
                req.method,
                req.uri.path()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
