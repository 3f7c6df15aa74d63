//! Every answer the proxy makes itself: one error type, one response builder.
//!
//! A refusal or an upstream failure is a [`ProxyError`]; [`ProxyError::response`] turns it
//! into the status, RFC 9209 `Proxy-Status` header and JSON body of SPEC §4, so every
//! refusal looks the same and names why. Nothing here ever echoes a query string, a token
//! or a credential: the message carries the method, the path (query removed by the
//! caller) and the host only.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Boxed error type for bodies that stream through the proxy.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a streamed body stopped. A concrete type rather than a bare `BoxError`, because
/// `Box<dyn Error>` as a body error trips rustc's higher-ranked lifetime inference
/// inside spawned hyper futures.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// An agent's request body that passed its route's `max_body_bytes` (the number): the
/// body stops with this error before the byte that would pass it is sent on, and the
/// request fails as `413 body_too_large` (`upstream::body::Upload` tells it apart).
#[derive(Debug)]
pub(crate) struct BodyTooLarge(pub(crate) u64);

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body is over the route's max_body_bytes ({})",
            self.0
        )
    }
}

impl std::error::Error for BodyTooLarge {}

/// The body of every request and response the proxy streams.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BodyError>;

/// What went wrong, as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    HostNotAllowed,
    PathNotAllowed,
    MethodNotAllowed,
    DestinationNotAllowed,
    CleartextCredentials,
    Misdirected,
    BadRequest,
    HeadersTooLarge,
    TooManyConnections,
    /// The route's `rate_limit` is spent; `retry_after` is the `Retry-After` header's
    /// whole seconds.
    RateLimited {
        retry_after: u64,
    },
    /// The request body is over the route's `max_body_bytes`.
    BodyTooLarge,
    /// DNS failure.
    UpstreamDns,
    /// Connection refused.
    UpstreamRefused,
    /// Reset, closed, or otherwise unreachable.
    UpstreamUnavailable,
    UpstreamTlsCertificate,
    UpstreamTlsProtocol,
    /// The upstream proxy refused the CONNECT; `received` is its status, if it answered.
    UpstreamProxyRefused {
        received: Option<u16>,
    },
    UpstreamConnectTimeout,
    UpstreamResponseTimeout,
    UpstreamBadResponse,
    UpstreamResponseHeadTooLarge,
}

impl ErrorKind {
    /// The `error` code of the JSON body.
    pub fn code(self) -> &'static str {
        use ErrorKind::*;
        match self {
            HostNotAllowed => "host_not_allowed",
            PathNotAllowed => "path_not_allowed",
            MethodNotAllowed => "method_not_allowed",
            DestinationNotAllowed => "destination_not_allowed",
            CleartextCredentials => "cleartext_credentials",
            Misdirected => "misdirected",
            BadRequest => "bad_request",
            HeadersTooLarge => "headers_too_large",
            TooManyConnections => "too_many_connections",
            RateLimited { .. } => "rate_limited",
            BodyTooLarge => "body_too_large",
            UpstreamDns | UpstreamRefused | UpstreamUnavailable => "upstream_unreachable",
            UpstreamTlsCertificate | UpstreamTlsProtocol => "upstream_tls",
            UpstreamProxyRefused { .. } => "upstream_proxy_refused",
            UpstreamConnectTimeout | UpstreamResponseTimeout => "upstream_timeout",
            UpstreamBadResponse | UpstreamResponseHeadTooLarge => "upstream_bad_response",
        }
    }

    pub fn status(self) -> StatusCode {
        use ErrorKind::*;
        match self {
            HostNotAllowed
            | PathNotAllowed
            | MethodNotAllowed
            | DestinationNotAllowed
            | CleartextCredentials => StatusCode::FORBIDDEN,
            Misdirected => StatusCode::MISDIRECTED_REQUEST,
            BadRequest => StatusCode::BAD_REQUEST,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UpstreamConnectTimeout | UpstreamResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamDns
            | UpstreamRefused
            | UpstreamUnavailable
            | UpstreamTlsCertificate
            | UpstreamTlsProtocol
            | UpstreamProxyRefused { .. }
            | UpstreamBadResponse
            | UpstreamResponseHeadTooLarge => StatusCode::BAD_GATEWAY,
        }
    }

    /// The RFC 9209 error type for `Proxy-Status`.
    pub fn proxy_status_error(self) -> &'static str {
        use ErrorKind::*;
        match self {
            HostNotAllowed
            | PathNotAllowed
            | MethodNotAllowed
            | CleartextCredentials
            | RateLimited { .. }
            | BodyTooLarge => "http_request_denied",
            DestinationNotAllowed => "destination_ip_prohibited",
            Misdirected | BadRequest | HeadersTooLarge => "http_request_error",
            TooManyConnections => "connection_limit_reached",
            UpstreamDns => "dns_error",
            UpstreamRefused => "connection_refused",
            UpstreamUnavailable => "destination_unavailable",
            UpstreamTlsCertificate => "tls_certificate_error",
            UpstreamTlsProtocol => "tls_protocol_error",
            UpstreamProxyRefused { .. } => "connection_refused",
            UpstreamConnectTimeout => "connection_timeout",
            UpstreamResponseTimeout => "http_response_timeout",
            UpstreamBadResponse => "http_protocol_error",
            UpstreamResponseHeadTooLarge => "http_response_header_section_size",
        }
    }

    /// True for failures of the upstream side (counted as upstream errors).
    pub fn is_upstream(self) -> bool {
        self.code().starts_with("upstream_")
    }
}

/// A refusal or failure, with a short human reason (never a secret or a query).
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub reason: String,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, reason: impl Into<String>) -> ProxyError {
        ProxyError {
            kind,
            reason: reason.into(),
        }
    }

    /// Builds the response an agent gets. `host` is the host the request was for;
    /// `close` asks an HTTP/1 client to drop the connection (after ambiguous framing).
    pub fn response(&self, host: &str, close: bool) -> Response<ProxyBody> {
        let kind = self.kind;
        let body = serde_json::json!({
            "error": kind.code(),
            "message": format!("egress-proxy: {}", self.reason),
            "host": host,
        });
        // `details` is the contract's code, exactly as SPEC §4 shows it; the human reason
        // is in the JSON body's `message`.
        let mut proxy_status = format!(
            "egress-proxy; error={}; details=\"{}\"",
            kind.proxy_status_error(),
            kind.code()
        );
        if let ErrorKind::UpstreamProxyRefused {
            received: Some(status),
        } = kind
        {
            proxy_status.push_str(&format!("; received-status={status}"));
        }
        let mut response = Response::new(full_body(format!("{body}\n")));
        *response.status_mut() = kind.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(&proxy_status) {
            headers.insert("proxy-status", v);
        }
        if let ErrorKind::RateLimited { retry_after } = kind {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
        }
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.reason)
    }
}

impl std::error::Error for ProxyError {}

/// A whole body from bytes.
pub(crate) fn full_body(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub(crate) fn empty_body() -> ProxyBody {
    full_body(Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refusal_shape_matches_the_contract() {
        let e = ProxyError::new(
            ErrorKind::PathNotAllowed,
            "GET /admin on api.github.com is not in the routes",
        );
        let r = e.response("api.github.com", false);
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.headers()["proxy-status"],
            "egress-proxy; error=http_request_denied; details=\"path_not_allowed\""
        );
        assert_eq!(r.headers()["content-type"], "application/json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "path_not_allowed");
        assert_eq!(v["host"], "api.github.com");
        assert_eq!(
            v["message"],
            "egress-proxy: GET /admin on api.github.com is not in the routes"
        );
    }

    #[test]
    fn received_status_and_no_reason_in_the_header() {
        let e = ProxyError::new(
            ErrorKind::UpstreamProxyRefused {
                received: Some(407),
            },
            "proxy said \"no\"\n",
        );
        let r = e.response("h", true);
        assert_eq!(r.status(), 502);
        let ps = r.headers()["proxy-status"].to_str().unwrap();
        assert!(
            ps.starts_with("egress-proxy; error=connection_refused;"),
            "{ps}"
        );
        assert_eq!(
            ps,
            "egress-proxy; error=connection_refused; details=\"upstream_proxy_refused\"; received-status=407"
        );
        assert!(
            !ps.contains("no"),
            "the free-text reason stays in the body: {ps}"
        );
        assert_eq!(r.headers()["connection"], "close");
    }

    #[tokio::test]
    async fn limits_answer_429_with_retry_after_and_413() {
        let e = ProxyError::new(ErrorKind::RateLimited { retry_after: 7 }, "spent");
        let r = e.response("h", false);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "7");
        assert_eq!(
            r.headers()["proxy-status"],
            "egress-proxy; error=http_request_denied; details=\"rate_limited\""
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "rate_limited");

        let r = ProxyError::new(ErrorKind::BodyTooLarge, "big").response("h", true);
        assert_eq!(r.status(), 413);
        assert!(!r.headers().contains_key("retry-after"));
        assert_eq!(r.headers()["connection"], "close");
        assert_eq!(
            r.headers()["proxy-status"],
            "egress-proxy; error=http_request_denied; details=\"body_too_large\""
        );
    }

    #[test]
    fn every_kind_has_a_consistent_status() {
        use ErrorKind::*;
        for (k, s) in [
            (HostNotAllowed, 403),
            (DestinationNotAllowed, 403),
            (CleartextCredentials, 403),
            (Misdirected, 421),
            (BadRequest, 400),
            (HeadersTooLarge, 431),
            (TooManyConnections, 503),
            (RateLimited { retry_after: 1 }, 429),
            (BodyTooLarge, 413),
            (UpstreamDns, 502),
            (UpstreamTlsCertificate, 502),
            (UpstreamConnectTimeout, 504),
            (UpstreamResponseTimeout, 504),
            (UpstreamResponseHeadTooLarge, 502),
        ] {
            assert_eq!(k.status().as_u16(), s, "{k:?}");
        }
    }
}
