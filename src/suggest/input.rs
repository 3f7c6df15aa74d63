//! Reading audit logs for `routes suggest`: JSON lines as the proxy writes them (src/audit.rs),
//! mixed with whatever else shares the stream (`docker logs` interleaves the start event,
//! warnings, text lines).
//!
//! The input is untrusted (a log can be edited, or written by something else): a line is
//! read up to a bound and no further, and a request's host, port, method and path pass the
//! same checks the proxy's own would before they can shape a route.

use std::io::{self, BufRead};

use crate::routes::{Host, HostPattern, check_request_path};

/// The longest line read: a request line holds a path no longer than the proxy's request
/// head limit, JSON-escaped, with room to spare. A longer line is skipped, not held.
pub(crate) const MAX_LINE_BYTES: usize = 1 << 20;

/// The most segments a counted path may have: more than any API's paths, and a bound on
/// the depth of the generalisation's prefix trees, which an agent in report mode could
/// otherwise make as deep as its request head is long.
pub(crate) const MAX_SEGMENTS: usize = 64;

/// One request the routes should allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    pub(crate) host: Host,
    pub(crate) port: u16,
    pub(crate) method: String,
    /// Checked, without a query.
    pub(crate) path: String,
}

/// What one line is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    Request(Observed),
    /// Not a request event, or a decision other than `allow`/`report`, or blank.
    Skip,
    /// Reported on stderr, then skipped.
    Bad(String),
}

/// Reads one line of at most [`MAX_LINE_BYTES`] into `buf` (without its newline).
/// `None` at the end of input; `Some(false)` for a line that was too long (its bytes are
/// consumed, not kept).
pub(crate) fn read_line(reader: &mut dyn BufRead, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(read_any.then_some(!too_long));
        }
        read_any = true;
        let newline = memchr::memchr(b'\n', available);
        let take = newline.unwrap_or(available.len());
        if !too_long {
            if buf.len() + take > MAX_LINE_BYTES {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&available[..take]);
            }
        }
        reader.consume(newline.map_or(take, |i| i + 1));
        if newline.is_some() {
            return Ok(Some(!too_long));
        }
    }
}

/// Reads one line's bytes. A value from the line is never echoed in a message: it may be
/// a secret, or bytes meant for a terminal.
pub(crate) fn parse_line(bytes: &[u8]) -> Line {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Line::Skip;
    }
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Line::Bad(format!("not JSON (column {})", e.column())),
    };
    let field = |name: &str| value.get(name);
    if field("event").and_then(|v| v.as_str()) != Some("request")
        || !matches!(
            field("decision").and_then(|v| v.as_str()),
            Some("allow" | "report")
        )
    {
        return Line::Skip;
    }
    let bad = |what: &str| Line::Bad(format!("request event with {what}, skipped"));
    let Some(host) = field("host")
        .and_then(|v| v.as_str())
        .and_then(|h| Host::parse(h).ok())
        .filter(|h| HostPattern::parse(&h.to_string()).is_ok())
    else {
        return bad("no valid host");
    };
    let Some(port) = field("port")
        .and_then(|v| v.as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
    else {
        return bad("no valid port");
    };
    let Some(method) = field("method")
        .and_then(|v| v.as_str())
        .filter(|m| is_routable_method(m))
    else {
        return bad("no method a route can allow");
    };
    let Some(path) = field("path").and_then(|v| v.as_str()) else {
        return bad("no path");
    };
    // The proxy logs paths without their query; a line that has one anyway loses it here.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if let Err(e) = check_request_path(path) {
        return bad(&format!("a path the proxy would refuse ({e})"));
    }
    if path.split('/').count() > MAX_SEGMENTS + 1 {
        return bad(&format!("a path of more than {MAX_SEGMENTS} segments"));
    }
    Line::Request(Observed {
        host,
        port,
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// An upper-case method token that a route's `methods` can name and the proxy forwards:
/// routes upper-case what they list, so a lower-case method could never match one; the
/// proxy never forwards CONNECT inside a tunnel, TRACE or TRACK.
fn is_routable_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 32
        && m.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
        && !matches!(m, "CONNECT" | "TRACE" | "TRACK")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &str) -> String {
        format!(
            r#"{{"timestamp":"2026-12-06T07:18:32.483771Z","level":"INFO","event":"request","conn":1,"client":"127.0.0.1:46442",{fields},"status":200,"bytes_up":0,"bytes_down":0,"duration_ms":0,"target":"egress_proxy::audit"}}"#
        )
    }

    #[test]
    fn lines_as_the_proxy_writes_them() {
        let ok = request(
            r#""host":"API.example.com","port":443,"method":"GET","path":"/a/b","route":0,"decision":"allow""#,
        );
        assert_eq!(
            parse_line(ok.as_bytes()),
            Line::Request(Observed {
                host: Host::parse("api.example.com").unwrap(),
                port: 443,
                method: "GET".into(),
                path: "/a/b".into(),
            })
        );
        let report = request(
            r#""host":"a.example","port":8443,"method":"POST","path":"/x?token=s3cret","decision":"report","reason":"path_not_allowed""#,
        );
        let Line::Request(o) = parse_line(report.as_bytes()) else {
            panic!("report lines count")
        };
        assert_eq!((o.port, o.path.as_str()), (8443, "/x"));
        for skipped in [
            request(
                r#""host":"a.example","port":443,"method":"GET","path":"/a","decision":"deny","reason":"path_not_allowed""#,
            ),
            request(
                r#""host":"a.example","port":443,"method":"GET","path":"/a","decision":"error""#,
            ),
            r#"{"level":"INFO","message":"egress-proxy serving","event":"start","routes":1}"#
                .into(),
            r#"{"level":"WARN","message":"routes not reloaded"}"#.into(),
            "[1, 2]".into(),
            "".into(),
            "  \r".into(),
        ] {
            assert_eq!(parse_line(skipped.as_bytes()), Line::Skip, "{skipped}");
        }
    }

    #[test]
    fn invalid_requests_are_reported_without_their_values() {
        for (fields, why) in [
            (
                r#""host":"a b","port":443,"method":"GET","path":"/a""#,
                "host",
            ),
            (
                r#""host":"2130706433","port":443,"method":"GET","path":"/a""#,
                "host",
            ),
            (
                r#""host":"a.example","port":0,"method":"GET","path":"/a""#,
                "port",
            ),
            (
                r#""host":"a.example","port":70000,"method":"GET","path":"/a""#,
                "port",
            ),
            (
                r#""host":"a.example","port":"443","method":"GET","path":"/a""#,
                "port",
            ),
            (
                r#""host":"a.example","port":443,"method":"get","path":"/a""#,
                "method",
            ),
            (
                r#""host":"a.example","port":443,"method":"TRACE","path":"/a""#,
                "method",
            ),
            (
                r#""host":"a.example","port":443,"method":"G\u001bET","path":"/a""#,
                "method",
            ),
            (
                r#""host":"a.example","port":443,"method":"GET","path":"/a/../etc""#,
                "path",
            ),
            (
                r#""host":"a.example","port":443,"method":"GET","path":"a""#,
                "path",
            ),
            (
                r#""host":"a.example","port":443,"method":"GET","path":"/a//b""#,
                "path",
            ),
            (
                r#""host":"a.example","port":443,"method":"GET","path":"/\u001b[2J""#,
                "path",
            ),
            (r#""host":"a.example","port":443,"method":"GET""#, "path"),
        ] {
            check_refused(fields, why);
        }
        // Deeper than any API: refused (the generalisation's trees recurse per segment).
        let deep = "/a".repeat(MAX_SEGMENTS + 1);
        check_refused(
            &format!(r#""host":"a.example","port":443,"method":"GET","path":"{deep}""#),
            "segments",
        );
        let deepest_counted = "/a".repeat(MAX_SEGMENTS);
        let line = request(&format!(
            r#""host":"a.example","port":443,"method":"GET","path":"{deepest_counted}","decision":"allow""#
        ));
        assert!(matches!(parse_line(line.as_bytes()), Line::Request(_)));
        fn check_refused(fields: &str, why: &str) {
            let line = request(&format!(r#"{fields},"decision":"allow""#));
            match parse_line(line.as_bytes()) {
                Line::Bad(m) => {
                    assert!(m.contains(why), "{fields}: {m}");
                    assert!(!m.contains("a.example") && !m.contains("\u{1b}"), "{m}");
                }
                other => panic!("{fields}: {other:?}"),
            }
        }
        assert!(
            matches!(parse_line(b"egress-proxy: text line"), Line::Bad(m) if m.starts_with("not JSON"))
        );
        assert!(matches!(parse_line(b"{\"event\":\"req"), Line::Bad(_)));
        assert!(matches!(parse_line(b"\xff\xfe"), Line::Bad(_)));
    }

    #[test]
    fn a_line_longer_than_the_bound_is_consumed_not_kept() {
        let mut input = Vec::new();
        input.extend_from_slice(b"first\n");
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
        input.extend_from_slice(b"\nlast");
        let mut reader = io::BufReader::with_capacity(4096, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"first");
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), Some(false));
        assert!(buf.capacity() <= 2 * MAX_LINE_BYTES, "{}", buf.capacity());
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"last");
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), None);
    }
}
