//! The routes file and the policy it expresses: which hosts, ports, methods and paths an
//! agent may reach, and which credential goes on each request.
//!
//! Everything here is pure: the file's text and a [`SecretSource`] go in, a [`RouteTable`]
//! comes out, and the table answers questions ([`RouteTable::covers`],
//! [`RouteTable::decide`]) without sockets or I/O, so every policy decision can be
//! table-tested. The proxy asks; it never decides.

mod host;
mod limits;
mod path;

use std::collections::BTreeSet;
use std::fmt;

use base64::Engine;
use http::{HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

pub(crate) use host::HostError;
pub use host::{Host, HostPattern};
pub(crate) use limits::{RateLimit, Scalar, retry_after_secs};
pub use path::{PathPattern, check_request_path};
pub(crate) use path::{has_encoded_separator, uppercase_escapes};

/// The routes file as an orchestrator renders it (YAML, or JSON, which is YAML too).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    pub routes: Vec<RouteSpec>,
}

/// One entry of `routes:` exactly as written; [`RouteTable::build`] validates it.
/// `Serialize` gives `routes suggest` every key of a route it copies, whatever keys exist.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub host: String,
    pub ports: Option<Vec<u16>>,
    pub path_allowlist: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub auth_scheme: Option<String>,
    pub header: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub allow_private: Option<bool>,
    pub rate_limit: Option<Scalar>,
    pub burst: Option<Scalar>,
    pub max_body_bytes: Option<Scalar>,
}

/// Where tokens come from. The proxy reads the environment and the filesystem; tests
/// hand in a map.
pub trait SecretSource {
    /// The value of environment variable `name`, if set.
    fn env(&self, name: &str) -> Option<String>;
    /// The content of the file at `path`, or a one-line reason it could not be read.
    fn file(&self, path: &str) -> Result<String, String>;
}

/// A [`SecretSource`] that answers every variable and every file with one value: for
/// tests, fuzz targets and benchmarks that need a route table, not real secrets.
pub struct OneSecret(pub &'static str);

impl SecretSource for OneSecret {
    fn env(&self, _: &str) -> Option<String> {
        Some(self.0.to_owned())
    }
    fn file(&self, _: &str) -> Result<String, String> {
        Ok(self.0.to_owned())
    }
}

/// A loading or validation failure, naming where in the file it is.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("{0}")]
    Syntax(String),
    #[error("routes[{index}].{field}: {reason}")]
    Invalid {
        index: usize,
        field: &'static str,
        reason: String,
    },
}

fn invalid(index: usize, field: &'static str, reason: impl fmt::Display) -> RoutesError {
    RoutesError::Invalid {
        index,
        field,
        reason: reason.to_string(),
    }
}

/// Parses a routes file's text. JSON is parsed as JSON (better error positions for what
/// an orchestrator renders); anything else as YAML, refusing duplicate keys (also through
/// merge keys) and with serde-saphyr's default parse budget.
pub(crate) fn parse_routes_text(text: &str) -> Result<RoutesFile, RoutesError> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| RoutesError::Syntax(e.to_string()));
    }
    let yaml_options = |merge_keys| {
        let mut options = serde_saphyr::Options::default();
        options.strict_booleans = true;
        options.with_snippet = false;
        options.merge_keys = merge_keys;
        options
    };
    let syntax = |e: serde_saphyr::Error| RoutesError::Syntax(first_line(&e.to_string()));
    // YAML lets an explicit key silently override one brought in by `<<`; the contract
    // calls that a key given twice. Read the keys as written first to catch it.
    let as_written: yaml_keys::Node = serde_saphyr::from_str_with_options(
        text,
        yaml_options(serde_saphyr::MergeKeyPolicy::AsOrdinary),
    )
    .map_err(syntax)?;
    yaml_keys::refuse_merge_duplicates(&as_written).map_err(RoutesError::Syntax)?;
    serde_saphyr::from_str_with_options(text, yaml_options(serde_saphyr::MergeKeyPolicy::Merge))
        .map_err(syntax)
}

/// Just enough of a YAML document's shape to see which keys a merge key brings in.
mod yaml_keys {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    pub(super) enum Node {
        Map(Vec<(String, Node)>),
        Seq(Vec<Node>),
        Scalar,
    }

    struct Key(String);

    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Key;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a scalar key")
                }
                fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                    Ok(Key(v.to_owned()))
                }
                fn visit_i64<E>(self, v: i64) -> Result<Key, E> {
                    Ok(Key(v.to_string()))
                }
                fn visit_u64<E>(self, v: u64) -> Result<Key, E> {
                    Ok(Key(v.to_string()))
                }
                fn visit_bool<E>(self, v: bool) -> Result<Key, E> {
                    Ok(Key(v.to_string()))
                }
                fn visit_f64<E>(self, v: f64) -> Result<Key, E> {
                    Ok(Key(v.to_string()))
                }
                fn visit_unit<E>(self) -> Result<Key, E> {
                    Ok(Key("null".to_owned()))
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for Node {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Node;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any YAML node")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                    let mut entries = Vec::new();
                    while let Some(Key(k)) = map.next_key()? {
                        entries.push((k, map.next_value()?));
                    }
                    Ok(Node::Map(entries))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                    let mut items = Vec::new();
                    while let Some(n) = seq.next_element()? {
                        items.push(n);
                    }
                    Ok(Node::Seq(items))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
                fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
                fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
                fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
                fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
                fn visit_unit<E>(self) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
                fn visit_none<E>(self) -> Result<Node, E> {
                    Ok(Node::Scalar)
                }
                fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                    Node::deserialize(d)
                }
            }
            d.deserialize_any(V)
        }
    }

    /// Refuses a mapping where a key brought in by `<<` is also written explicitly, or is
    /// brought in twice.
    pub(super) fn refuse_merge_duplicates(node: &Node) -> Result<(), String> {
        match node {
            Node::Scalar => Ok(()),
            Node::Seq(items) => items.iter().try_for_each(refuse_merge_duplicates),
            Node::Map(entries) => {
                let mut seen: Vec<&str> = entries
                    .iter()
                    .filter(|(k, _)| k != "<<")
                    .map(|(k, _)| k.as_str())
                    .collect();
                for (k, v) in entries {
                    if k != "<<" {
                        continue;
                    }
                    let sources: Vec<&Node> = match v {
                        Node::Seq(items) => items.iter().collect(),
                        other => vec![other],
                    };
                    for source in sources {
                        if let Node::Map(merged) = source {
                            for (mk, _) in merged {
                                if seen.contains(&mk.as_str()) {
                                    return Err(format!(
                                        "duplicate key `{mk}` (given again through a merge key)"
                                    ));
                                }
                                seen.push(mk);
                            }
                        }
                    }
                }
                entries
                    .iter()
                    .try_for_each(|(_, v)| refuse_merge_duplicates(v))
            }
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The credential a route adds to each request. Its value never leaves this type except
/// into the outgoing request: `Debug` is redacted and the header value is marked
/// sensitive, so HPACK never indexes it.
#[derive(Clone)]
pub struct Injection {
    pub header: HeaderName,
    pub value: HeaderValue,
}

impl fmt::Debug for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Injection({}: <redacted>)", self.header)
    }
}

/// One validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the file, as logged.
    pub index: usize,
    pub host: HostPattern,
    pub ports: Vec<u16>,
    /// Empty: every path.
    pub paths: Vec<PathPattern>,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub injection: Option<Injection>,
    pub allow_private: bool,
    /// `None`: no rate limit, and nothing to pay for one.
    pub rate_limit: Option<RateLimit>,
    pub max_body_bytes: Option<u64>,
}

impl Route {
    pub(crate) fn covers(&self, host: &Host, port: u16) -> bool {
        self.ports.contains(&port) && self.host.matches(host)
    }

    fn path_allowed(&self, path: &str) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path))
    }

    fn method_allowed(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m == method))
    }

    /// Does `self` match exactly the requests `other` matches, under the same rate
    /// limit? Then a reload keeps `other`'s bucket for it (SPEC §3, `rate_limit`).
    fn same_bucket_as(&self, other: &Route) -> bool {
        fn same_set<T: PartialEq>(a: &[T], b: &[T]) -> bool {
            a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x))
        }
        let same_methods = match (&self.methods, &other.methods) {
            (None, None) => true,
            (Some(a), Some(b)) => same_set(a, b),
            _ => false,
        };
        let same_rate = match (&self.rate_limit, &other.rate_limit) {
            (Some(a), Some(b)) => a.same_as(b),
            _ => false,
        };
        same_rate
            && self.host == other.host
            && self.ports == other.ports
            && same_methods
            && same_set(&self.paths, &other.paths)
    }
}

/// Why the routes refuse a request.
// The variants are named after the contract's codes (`host_not_allowed`, ...).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    HostNotAllowed,
    PathNotAllowed,
    MethodNotAllowed,
}

/// The validated routes, in file order.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Parses and validates a routes file's text, reading every token it names.
    pub fn from_text(text: &str, secrets: &dyn SecretSource) -> Result<RouteTable, RoutesError> {
        RouteTable::build(parse_routes_text(text)?, secrets)
    }

    /// Validates a parsed file and reads its tokens.
    pub fn build(file: RoutesFile, secrets: &dyn SecretSource) -> Result<RouteTable, RoutesError> {
        let routes = file
            .routes
            .into_iter()
            .enumerate()
            .map(|(index, spec)| build_route(index, spec, secrets))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RouteTable { routes })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Gives each rate-limited route the bucket of the first route of `old` that matches
    /// the same requests under the same limit, wherever it was in the file: a reload
    /// does not refill it. Any other route keeps the full bucket it was built with.
    pub fn keep_buckets_from(&mut self, old: &RouteTable) {
        for route in &mut self.routes {
            let kept = old.routes.iter().find(|o| route.same_bucket_as(o));
            if let (Some(new), Some(old)) = (
                route.rate_limit.as_mut(),
                kept.and_then(|o| o.rate_limit.as_ref()),
            ) {
                new.bucket = old.bucket.clone();
            }
        }
    }

    /// Does any route cover this host and port? Decides a CONNECT.
    pub fn covers(&self, host: &Host, port: u16) -> bool {
        self.routes.iter().any(|r| r.covers(host, port))
    }

    /// The headers the routes for this host and port put their tokens in, each once: what
    /// an agent's request to it must not carry of its own when no route matched it.
    pub fn credential_headers(&self, host: &Host, port: u16) -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = Vec::new();
        for route in self.routes.iter().filter(|r| r.covers(host, port)) {
            if let Some(inj) = &route.injection
                && !names.contains(&inj.header)
            {
                names.push(inj.header.clone());
            }
        }
        names
    }

    /// The first route whose host, port, method and path all match. `path` must have
    /// passed [`check_request_path`] and carry no query.
    pub fn decide(
        &self,
        host: &Host,
        port: u16,
        method: &Method,
        path: &str,
    ) -> Result<&Route, Denial> {
        let mut denial = Denial::HostNotAllowed;
        for route in self.routes.iter().filter(|r| r.covers(host, port)) {
            if !route.path_allowed(path) {
                if denial == Denial::HostNotAllowed {
                    denial = Denial::PathNotAllowed;
                }
                continue;
            }
            if !route.method_allowed(method) {
                denial = Denial::MethodNotAllowed;
                continue;
            }
            return Ok(route);
        }
        Err(denial)
    }
}

fn build_route(
    index: usize,
    spec: RouteSpec,
    secrets: &dyn SecretSource,
) -> Result<Route, RoutesError> {
    let host = HostPattern::parse(&spec.host).map_err(|e| invalid(index, "host", e))?;
    let ports = match spec.ports {
        None => vec![443],
        Some(p) if p.is_empty() => return Err(invalid(index, "ports", "empty list")),
        Some(p) => {
            if p.contains(&0) {
                return Err(invalid(index, "ports", "port 0"));
            }
            p
        }
    };
    let paths = spec
        .path_allowlist
        .unwrap_or_default()
        .iter()
        .map(|p| {
            PathPattern::parse(p)
                .map_err(|e| invalid(index, "path_allowlist", format!("{p:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let methods = match spec.methods {
        None => None,
        Some(ms) if ms.is_empty() => return Err(invalid(index, "methods", "empty list")),
        Some(ms) => Some(
            ms.iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                        invalid(index, "methods", format!("{m:?} is not an HTTP method"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let rate_limit = match (&spec.rate_limit, &spec.burst) {
        (None, None) => None,
        (None, Some(_)) => return Err(invalid(index, "burst", "burst needs rate_limit")),
        (Some(rate), burst) => {
            Some(RateLimit::parse(rate, burst.as_ref()).map_err(|e| match e {
                limits::RateError::Rate(why) => invalid(index, "rate_limit", why),
                limits::RateError::Burst(why) => invalid(index, "burst", why),
            })?)
        }
    };
    let max_body_bytes = spec
        .max_body_bytes
        .as_ref()
        .map(|n| limits::positive::<u64>(n).map_err(|why| invalid(index, "max_body_bytes", why)))
        .transpose()?;
    let injection = build_injection(
        index,
        &spec.auth_scheme,
        &spec.header,
        &spec.token_env,
        &spec.token_file,
        secrets,
    )?;
    Ok(Route {
        index,
        host,
        ports: ports
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        paths,
        methods,
        injection,
        allow_private: spec.allow_private.unwrap_or(false),
        rate_limit,
        max_body_bytes,
    })
}

fn build_injection(
    index: usize,
    auth_scheme: &Option<String>,
    header: &Option<String>,
    token_env: &Option<String>,
    token_file: &Option<String>,
    secrets: &dyn SecretSource,
) -> Result<Option<Injection>, RoutesError> {
    let token = match (token_env, token_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                index,
                "token_env",
                "give token_env or token_file, not both",
            ));
        }
        (Some(var), None) => {
            if var.is_empty() {
                return Err(invalid(index, "token_env", "empty variable name"));
            }
            match secrets.env(var) {
                None => {
                    return Err(invalid(
                        index,
                        "token_env",
                        format!("environment variable {var} is not set"),
                    ));
                }
                Some(v) if v.is_empty() => {
                    return Err(invalid(
                        index,
                        "token_env",
                        format!("environment variable {var} is empty"),
                    ));
                }
                Some(v) => Some((v, format!("environment variable {var}"))),
            }
        }
        (None, Some(path)) => {
            let raw = secrets
                .file(path)
                .map_err(|e| invalid(index, "token_file", e))?;
            let v = raw
                .strip_suffix('\n')
                .map(|v| v.strip_suffix('\r').unwrap_or(v))
                .unwrap_or(&raw)
                .to_owned();
            if v.is_empty() {
                return Err(invalid(index, "token_file", format!("{path} is empty")));
            }
            Some((v, format!("token file {path}")))
        }
        (None, None) => None,
    };
    let Some((token, origin)) = token else {
        if auth_scheme.is_some() {
            return Err(invalid(
                index,
                "auth_scheme",
                "auth_scheme needs token_env or token_file",
            ));
        }
        if header.is_some() {
            return Err(invalid(
                index,
                "header",
                "header needs token_env or token_file",
            ));
        }
        return Ok(None);
    };
    let field = if token_env.is_some() {
        "token_env"
    } else {
        "token_file"
    };
    if auth_scheme.is_none() && header.is_none() {
        return Err(invalid(index, field, "a token needs auth_scheme or header"));
    }
    let scheme = match auth_scheme.as_deref() {
        Some(s) if s.is_empty() || !s.bytes().all(is_token_char) => {
            return Err(invalid(
                index,
                "auth_scheme",
                format!("{s:?} is not a valid scheme name"),
            ));
        }
        other => other,
    };
    let header_name = match header {
        None => http::header::AUTHORIZATION,
        Some(h) => {
            let name = HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| invalid(index, "header", format!("{h:?} is not a header name")))?;
            if is_reserved_header(&name) {
                return Err(invalid(
                    index,
                    "header",
                    format!("{h:?} cannot carry a token"),
                ));
            }
            name
        }
    };
    let credential = match scheme {
        Some(s) if s.eq_ignore_ascii_case("basic") => format!(
            "{s} {}",
            base64::engine::general_purpose::STANDARD.encode(token.as_bytes())
        ),
        Some(s) => format!("{s} {token}"),
        None => token,
    };
    let mut value = HeaderValue::from_str(&credential).map_err(|_| {
        invalid(
            index,
            field,
            format!("{origin} holds a character that cannot go in a header"),
        )
    })?;
    value.set_sensitive(true);
    Ok(Some(Injection {
        header: header_name,
        value,
    }))
}

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Headers that frame or route the message: a token there would break the request or
/// be dropped as hop-by-hop.
fn is_reserved_header(name: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        CONNECTION,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        TE,
        UPGRADE,
        PROXY_AUTHORIZATION,
        PROXY_AUTHENTICATE,
        TRAILER,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[cfg(test)]
pub(crate) mod tests;
