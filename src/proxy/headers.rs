//! What an agent's request loses and gains on its way up, and a response on its way
//! back: hop-by-hop fields out both ways; the agent's credentials (`Authorization`,
//! `Proxy-Authorization`, the route's header, or in report mode every route's header for
//! the host) out of its head and its trailers; the matched route's token in, and only
//! that route's.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::routes::Injection;

/// What happens to credentials on a request's way up, beyond the hop-by-hop fields and
/// the agent's `Authorization` and `Proxy-Authorization`, which always come off.
pub(crate) enum Credentials {
    /// A route matched: the agent's own value of the route's header comes off, the
    /// route's token goes on.
    Route(Option<Injection>),
    /// Report mode, no route matched: no token; the agent's own values of every header
    /// a route for this host and port injects come off.
    Reported(Vec<HeaderName>),
}

impl Credentials {
    /// The fields the agent's head and trailers lose.
    pub(crate) fn agent_fields(&self) -> &[HeaderName] {
        match self {
            Credentials::Route(injection) => injection
                .as_ref()
                .map_or(&[], |i| std::slice::from_ref(&i.header)),
            Credentials::Reported(names) => names,
        }
    }

    /// The token that goes on: only ever a matched route's.
    pub(crate) fn token(&self) -> Option<&Injection> {
        match self {
            Credentials::Route(injection) => injection.as_ref(),
            Credentials::Reported(_) => None,
        }
    }
}

/// Headers that describe one hop, never forwarded either way (RFC 9110 §7.6.1), plus
/// the proxy's own credentials.
/// `HeaderName`s, not strings: a string is parsed into a name on every removal.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and those the `Connection` header names; returns the
/// latter (hop-by-hop in the message's trailers too).
fn remove_hop_by_hop(headers: &mut HeaderMap) -> Vec<HeaderName> {
    // One pass over the names first: most messages carry none of these, and each
    // `remove` hashes its name and probes the map (most of this function's cost on a
    // small request before this check).
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return Vec::new();
    }
    let named = connection_named(headers);
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    named
}

/// The fields a message's `Connection` header names: hop-by-hop for that message, its
/// trailers included.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// Removes from an agent's header or trailer fields what never goes upstream from the
/// agent: hop-by-hop fields, every credential it sent (`Authorization`,
/// `Proxy-Authorization`, the `credential_fields` of [`Credentials::agent_fields`]) and
/// `Host`. Returns the fields its `Connection` header named.
fn strip_agent_fields(fields: &mut HeaderMap, credential_fields: &[HeaderName]) -> Vec<HeaderName> {
    let named = remove_hop_by_hop(fields);
    fields.remove(header::AUTHORIZATION);
    fields.remove(header::HOST);
    for name in credential_fields {
        fields.remove(name);
    }
    named
}

/// The agent's request headers as they go upstream: stripped of the agent's fields
/// ([`strip_agent_fields`]), the route's token added. Returns the fields the agent's
/// `Connection` header named.
pub(crate) fn rewrite_request_headers(
    headers: &mut HeaderMap,
    credentials: &Credentials,
    websocket: bool,
) -> Vec<HeaderName> {
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let connection_named = strip_agent_fields(headers, credentials.agent_fields());
    if te_trailers {
        // `TE: trailers` is the one TE value HTTP/2 allows; gRPC needs it.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(inj) = credentials.token() {
        headers.insert(inj.header.clone(), inj.value.clone());
    }
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    connection_named
}

pin_project! {
    /// An agent's request body on its way up, its trailer fields (a chunked HTTP/1.1
    /// body's, an HTTP/2 stream's trailing HEADERS) stripped as its header fields are
    /// (SPEC §4.3): trailers are fields too, and a credential the agent puts there would
    /// otherwise reach the upstream.
    pub(crate) struct AgentTrailersStripped<B> {
        #[pin]
        pub(crate) inner: B,
        pub(crate) credentials: Credentials,
        // The fields the head's `Connection` header named.
        pub(crate) hop_by_hop: Vec<HeaderName>,
    }
}

impl<B: Body> Body for AgentTrailersStripped<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        Poll::Ready(frame.map(|f| {
            f.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    strip_agent_fields(&mut trailers, this.credentials.agent_fields());
                    for name in this.hop_by_hop.iter() {
                        trailers.remove(name);
                    }
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(crate) fn rewrite_response_headers(headers: &mut HeaderMap, switching: bool) {
    remove_hop_by_hop(headers);
    if switching {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn agent_fields() -> HeaderMap {
        let mut fields = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer agent"),
            ("proxy-authorization", "Basic agent"),
            ("x-api-key", "agent"),
            ("x-other-key", "agent"),
            ("connection", "x-named"),
            ("x-named", "hop"),
            ("te", "trailers"),
            ("host", "elsewhere"),
            ("x-named-in-connection", "hop"),
            ("x-checksum", "kept"),
        ] {
            fields.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        fields
    }

    fn route_with_key() -> Credentials {
        Credentials::Route(Some(Injection {
            header: HeaderName::from_static("x-api-key"),
            value: HeaderValue::from_static("route-token"),
        }))
    }

    fn reported_for_two_routes() -> Credentials {
        Credentials::Reported(vec![
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("x-other-key"),
        ])
    }

    #[tokio::test]
    async fn request_trailers_lose_the_agents_credentials_and_hop_by_hop_fields() {
        for (credentials, kept) in [
            (route_with_key(), &["x-other-key", "x-checksum"][..]),
            (reported_for_two_routes(), &["x-checksum"][..]),
        ] {
            let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
                Ok(Frame::data(bytes::Bytes::from_static(b"data"))),
                Ok(Frame::trailers(agent_fields())),
            ];
            let body = AgentTrailersStripped {
                inner: StreamBody::new(futures_util::stream::iter(frames)),
                credentials,
                hop_by_hop: vec![HeaderName::from_static("x-named-in-connection")],
            };
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned().unwrap();
            let mut names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
            names.sort_unstable();
            let mut kept = kept.to_vec();
            kept.sort_unstable();
            assert_eq!(names, kept);
            assert_eq!(collected.to_bytes(), "data");
        }
    }

    /// A reported request loses every route's header for its host and gets no token; a
    /// routed one gets its route's token in place of the agent's value.
    #[test]
    fn only_a_matched_route_puts_a_token_on() {
        let mut headers = agent_fields();
        rewrite_request_headers(&mut headers, &reported_for_two_routes(), false);
        for name in [
            "authorization",
            "proxy-authorization",
            "x-api-key",
            "x-other-key",
        ] {
            assert!(headers.get(name).is_none(), "{name} kept");
        }
        assert!(reported_for_two_routes().token().is_none());
        let mut headers = agent_fields();
        rewrite_request_headers(&mut headers, &route_with_key(), false);
        let keys: Vec<_> = headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys, ["route-token"]);
        assert!(headers.get("authorization").is_none());
    }
}
