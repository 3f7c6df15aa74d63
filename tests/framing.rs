//! What an agent can hide in a request's framing, end to end through the real binary:
//! credentials in trailer fields (SPEC §4.3: a chunked request's trailers are treated
//! like its headers), and heads the strict framing check must read exactly as hyper
//! does (pipelined requests of one method, head-like lines inside bodies).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

const KEY: &str = "route-key-5e6f7a";
const AGENT_SECRET: &str = "agent-secret-in-trailers";

fn routes(h1_port: u16, h2_port: u16) -> String {
    format!(
        r#"
routes:
  - host: h1.test
    ports: [{h1_port}]
    path_allowlist: ["/echo-trailers", "/v1"]
    header: x-api-key
    token_env: FRAMING_KEY
  - host: h2.test
    ports: [{h2_port}]
    path_allowlist: ["/echo-trailers", "/v1"]
    header: x-api-key
    token_env: FRAMING_KEY
"#
    )
}

/// An HTTP/1.1-only upstream (h1.test) and an HTTP/2-only one (h2.test).
struct World {
    up1: Upstream,
    up2: Upstream,
    proxy: Proxy,
}

async fn world() -> World {
    let ca = TestCa::new("framing test CA");
    let up1 = Upstream::start(&ca, &["h1.test"], &[b"http/1.1"]).await;
    let up2 = Upstream::start(&ca, &["h2.test"], &[b"h2"]).await;
    let proxy = ProxyBuilder::new(&routes(up1.port(), up2.port()))
        .upstream(&ca, &[("h1.test", up1.port()), ("h2.test", up2.port())])
        .env("FRAMING_KEY", KEY)
        .start();
    World { up1, up2, proxy }
}

/// The JSON body at the end of a raw HTTP/1.1 response (sent with a Content-Length).
fn raw_json(response: &str) -> serde_json::Value {
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("no response head: {response:?}"));
    json(body.as_bytes())
}

/// What the upstream must have seen: the data, the harmless trailer, none of the agent's
/// credentials (nor the route's own key, which is for the header only).
fn assert_trailers_stripped(what: &str, echo: &serde_json::Value) {
    assert_eq!(echo["len"], 4, "{what}: {echo}");
    let trailers = echo["trailers"].as_object().expect("trailers object");
    assert_eq!(
        trailers.get("x-checksum"),
        Some(&"kept".into()),
        "{what}: {echo}"
    );
    for name in ["authorization", "proxy-authorization", "x-api-key"] {
        assert!(
            !trailers.contains_key(name),
            "{what}: {name} went up: {echo}"
        );
    }
    let text = echo.to_string();
    assert!(!text.contains(AGENT_SECRET), "{what}: {echo}");
    assert!(!text.contains(KEY), "{what}: {echo}");
}

#[tokio::test]
async fn a_chunked_request_s_trailers_lose_the_agent_s_credentials_http1_agent() {
    let w = world().await;
    for (name, port) in [("h1.test", w.up1.port()), ("h2.test", w.up2.port())] {
        // `Trailer` names the fields, as an HTTP/1.1 upstream connection only sends the
        // trailer fields its request announced.
        let raw = format!(
            "POST /echo-trailers HTTP/1.1\r\nHost: {name}:{port}\r\nTransfer-Encoding: chunked\r\n\
             Trailer: authorization, proxy-authorization, x-api-key, x-checksum\r\n\r\n\
             4\r\ndata\r\n0\r\n\
             authorization: Bearer {AGENT_SECRET}\r\nproxy-authorization: Basic {AGENT_SECRET}\r\n\
             x-api-key: {AGENT_SECRET}\r\nx-checksum: kept\r\n\r\n"
        );
        let response = w
            .proxy
            .raw_in_tunnel(name, port, raw.as_bytes(), Duration::from_millis(1500))
            .await;
        assert_eq!(parse_status(&response), 200, "{name}: {response}");
        assert_trailers_stripped(name, &raw_json(&response));
    }
    // The route's key still went up, in its header.
    for up in [&w.up1, &w.up2] {
        let seen = up.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].headers["x-api-key"], KEY);
    }
}

#[tokio::test]
async fn an_http2_request_s_trailers_lose_the_agent_s_credentials() {
    let w = world().await;
    for (name, port) in [("h1.test", w.up1.port()), ("h2.test", w.up2.port())] {
        let mut c = h2(w.proxy.tunnel(name, port, &[b"h2"]).await).await;
        let mut trailers = HeaderMap::new();
        let secret = HeaderValue::from_static(AGENT_SECRET);
        trailers.insert("authorization", secret.clone());
        trailers.insert("proxy-authorization", secret.clone());
        trailers.insert("x-api-key", secret);
        trailers.insert("x-checksum", HeaderValue::from_static("kept"));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"data"))),
            Ok(Frame::trailers(trailers)),
        ];
        let req = Request::post(format!("https://{name}:{port}/echo-trailers"))
            .header(
                "trailer",
                "authorization, proxy-authorization, x-api-key, x-checksum",
            )
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .unwrap();
        let (status, _, body) = collect(c.send_request(req).await.unwrap()).await;
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
        assert_trailers_stripped(name, &json(&body));
    }
}

/// A clean POST with a two-byte body.
fn clean(h: &str, path: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 2\r\n\r\nok")
}

/// Statuses of the responses in a raw HTTP/1.1 exchange, in order.
fn statuses(response: &str) -> Vec<u16> {
    response
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|s| s.get(..3)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn pipelined_requests_of_one_method_are_each_checked_on_their_own_head() {
    let w = world().await;
    let (name, port) = ("h1.test", w.up1.port());
    let h = format!("{name}:{port}");
    let ambiguous = [
        format!(
            "POST /v1/cl-te HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        format!(
            "POST /v1/two-cl HTTP/1.1\r\nHost: {h}\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"
        ),
    ];
    for bad in &ambiguous {
        // Clean first, ambiguous second: 200, then 400 and the connection closes.
        let raw = format!("{}{bad}", clean(&h, "/v1/first"));
        let response = w
            .proxy
            .raw_in_tunnel(name, port, raw.as_bytes(), Duration::from_millis(1500))
            .await;
        assert_eq!(statuses(&response), [200, 400], "{bad:?}: {response}");
        assert!(response.contains("ambiguous framing"), "{response}");

        // Ambiguous first, clean second: 400, and nothing after it is served.
        let raw = format!("{bad}{}", clean(&h, "/v1/second"));
        let response = w
            .proxy
            .raw_in_tunnel(name, port, raw.as_bytes(), Duration::from_millis(1500))
            .await;
        assert_eq!(statuses(&response), [400], "{bad:?}: {response}");
    }
    let paths = w.up1.paths();
    assert_eq!(
        paths,
        ["/v1/first", "/v1/first"],
        "only the clean heads went up"
    );
}

#[tokio::test]
async fn a_head_like_line_inside_a_body_is_never_taken_for_the_head() {
    let w = world().await;
    let (name, port) = ("h1.test", w.up1.port());
    let h = format!("{name}:{port}");
    let inner_ambiguous = format!(
        "POST /v1/inner HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let inner_clean = format!("POST /v1/inner HTTP/1.1\r\nHost: {h}\r\n\r\n");

    // A clean head whose body carries an ambiguous head: the request is clean (200), and
    // so is the pipelined one after it.
    let raw = format!(
        "POST /v1/outer HTTP/1.1\r\nHost: {h}\r\nContent-Length: {}\r\n\r\n{inner_ambiguous}{}",
        inner_ambiguous.len(),
        clean(&h, "/v1/after")
    );
    let response = w
        .proxy
        .raw_in_tunnel(name, port, raw.as_bytes(), Duration::from_millis(1500))
        .await;
    assert_eq!(statuses(&response), [200, 200], "{response}");

    // The same in a chunked body.
    let raw = format!(
        "POST /v1/chunked HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inner_ambiguous}\r\n0\r\n\r\n{}",
        inner_ambiguous.len(),
        clean(&h, "/v1/after")
    );
    let response = w
        .proxy
        .raw_in_tunnel(name, port, raw.as_bytes(), Duration::from_millis(1500))
        .await;
    assert_eq!(statuses(&response), [200, 200], "{response}");

    // An ambiguous head whose body carries a clean head of the same method: 400.
    for bad_head in [
        format!(
            "POST /v1/bad HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ),
        format!(
            "POST /v1/bad HTTP/1.1\r\nHost: {h}\r\nContent-Length: {n}\r\nContent-Length: {n}\r\n\r\n",
            n = inner_clean.len()
        ),
    ] {
        let body = if bad_head.contains("chunked") {
            format!("{:x}\r\n{inner_clean}\r\n0\r\n\r\n", inner_clean.len())
        } else {
            inner_clean.clone()
        };
        let raw = format!("{bad_head}{body}");
        let response = w
            .proxy
            .raw_in_tunnel(name, port, raw.as_bytes(), Duration::from_millis(1500))
            .await;
        assert_eq!(statuses(&response), [400], "{bad_head:?}: {response}");
    }
    let paths = w.up1.paths();
    assert_eq!(
        paths,
        ["/v1/outer", "/v1/after", "/v1/chunked", "/v1/after"],
        "only the real heads went up"
    );
}

#[tokio::test]
async fn plain_http_requests_are_checked_on_their_own_heads_too() {
    let w = world().await;
    // No plain route exists, so a clean request is refused by the policy (403, the
    // connection kept); the ambiguous one after it must still get its own 400.
    let h = "plain.test";
    let raw = format!(
        "GET http://{h}/a HTTP/1.1\r\nHost: {h}\r\n\r\nGET http://{h}/b HTTP/1.1\r\nHost: {h}\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
    );
    let response = w.proxy.raw(raw.as_bytes()).await;
    assert_eq!(statuses(&response), [403, 400], "{response}");
}

/// A field the head's `Connection` header names is hop-by-hop for the whole message: it
/// does not go up as a trailer either.
#[tokio::test]
async fn a_trailer_the_head_s_connection_header_names_does_not_go_up() {
    let w = world().await;
    for (name, port) in [("h1.test", w.up1.port()), ("h2.test", w.up2.port())] {
        let raw = format!(
            "POST /echo-trailers HTTP/1.1\r\nHost: {name}:{port}\r\nTransfer-Encoding: chunked\r\n\
             Connection: x-named\r\nTrailer: x-named, x-checksum\r\n\r\n\
             4\r\ndata\r\n0\r\nx-named: hop\r\nx-checksum: kept\r\n\r\n"
        );
        let response = w
            .proxy
            .raw_in_tunnel(name, port, raw.as_bytes(), Duration::from_millis(1500))
            .await;
        assert_eq!(parse_status(&response), 200, "{name}: {response}");
        let echo = raw_json(&response);
        let trailers = echo["trailers"].as_object().expect("trailers object");
        assert_eq!(
            trailers.get("x-checksum"),
            Some(&"kept".into()),
            "{name}: {echo}"
        );
        assert!(
            !trailers.contains_key("x-named"),
            "{name}: x-named went up: {echo}"
        );
    }
}
