//! Strict HTTP/1.1 framing: the ambiguities hyper resolves quietly, refused instead.
//!
//! hyper parses request heads safely but leniently: given both `Content-Length` and
//! `Transfer-Encoding` it drops the length and closes after the message (RFC 9112
//! §6.3), and it reads a bare LF as a line end. Safe for hyper, but the contract (SPEC
//! §4a, and the hostile-agent rule "refuse ambiguity instead of normalising it") wants
//! such a request refused with 400 and the connection closed, since the next hop or a
//! log reader might have framed it differently. hyper no longer shows what it dropped,
//! so [`Sniffed`] keeps a short window of the raw bytes an HTTP/1.1 connection read and
//! [`HeadLog::check`] re-reads the head of each request from it: its line ends, and the
//! `Content-Length` and `Transfer-Encoding` lines among its headers.
//!
//! The window is bounded (twice the head limit) and only ever adds strictness: if the
//! head cannot be found in it (an unusual pipelining pattern), hyper's own safe handling
//! applies.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::Method;

use super::observe::{IoObserver, Observed};

/// The last bytes an HTTP/1.1 connection read.
#[derive(Debug)]
pub struct HeadLog {
    window: Mutex<VecDeque<u8>>,
    capacity: usize,
    /// Cleared once the connection stops carrying HTTP/1.1 heads (see [`HeadLog::stop`]).
    recording: AtomicBool,
}

impl HeadLog {
    pub fn new(max_head_bytes: usize) -> Arc<HeadLog> {
        Arc::new(HeadLog {
            window: Mutex::new(VecDeque::new()),
            capacity: max_head_bytes.saturating_mul(2).max(16 * 1024),
            recording: AtomicBool::new(true),
        })
    }

    /// Records bytes the connection read (public for the fuzz target).
    pub fn record(&self, bytes: &[u8]) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let excess = (w.len() + bytes.len()).saturating_sub(self.capacity);
        w.drain(..excess);
        w.extend(bytes);
    }

    /// Stops recording and frees the window: the connection became a CONNECT tunnel,
    /// whose bytes are TLS that no head check reads. Without this, every tunnel would copy
    /// each byte the agent sends into a window that only grows, up to its capacity.
    pub fn stop(&self) {
        self.recording.store(false, Ordering::Relaxed);
        *self.window.lock().unwrap_or_else(|p| p.into_inner()) = VecDeque::new();
    }

    /// Checks the raw head of the request hyper just parsed (found by its method at the
    /// start of a line); `Err` is why it is ambiguous.
    pub fn check(&self, method: &Method) -> Result<(), &'static str> {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let buf = w.make_contiguous();
        let Some(start) = last_line_starting_with(buf, method.as_str().as_bytes()) else {
            return Ok(());
        };
        let Some((result, len)) = check_head(&buf[start..]) else {
            return Ok(());
        };
        // Consumed: a later request's search starts after this head.
        let consumed = start + len;
        let len = w.len();
        w.drain(..consumed.min(len));
        result
    }
}

/// The start of the last line in `buf` that begins with `method` and a space.
fn last_line_starting_with(buf: &[u8], method: &[u8]) -> Option<usize> {
    let matches_at = |i: usize| {
        buf.get(i..i + method.len()) == Some(method) && buf.get(i + method.len()) == Some(&b' ')
    };
    memchr::memrchr_iter(b'\n', buf)
        .map(|i| i + 1)
        .chain(std::iter::once(0))
        .find(|&i| matches_at(i))
}

/// Reads the head at the start of `buf`, up to its first empty line: whether its framing
/// is unambiguous, and its length; `None` if no empty line ends it within `buf`.
///
/// The head is one that hyper accepted, so its header lines are all `name: value`
/// (hyper's parser refused anything else before this runs): each line is split at its
/// first colon in one pass over the line ends rather than parsed again in full, since
/// what decides is only which lines name `Content-Length` or `Transfer-Encoding` and what
/// they say (`tests::agrees_with_a_full_parse` holds this to httparse's reading).
fn check_head(buf: &[u8]) -> Option<(Result<(), &'static str>, usize)> {
    let mut bare_lf = false;
    let mut malformed = None;
    let (mut lengths, mut encodings) = (0, 0);
    let mut line_start = 0;
    for i in memchr::memchr_iter(b'\n', buf) {
        let crlf = i > 0 && buf[i - 1] == b'\r';
        bare_lf |= !crlf;
        let line = &buf[line_start..if crlf { i - 1 } else { i }];
        if line.is_empty() {
            let result = if bare_lf {
                Err("bare LF in the request head")
            } else if let Some(why) = malformed {
                Err(why)
            } else if lengths > 0 && encodings > 0 {
                Err("both Content-Length and Transfer-Encoding")
            } else if lengths > 1 {
                Err("more than one Content-Length")
            } else if encodings > 1 {
                Err("more than one Transfer-Encoding")
            } else {
                Ok(())
            };
            return Some((result, i + 1));
        }
        // The first line is the request line.
        if line_start > 0
            && let Some(colon) = memchr::memchr(b':', line)
        {
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"content-length") {
                lengths += 1;
                if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                    malformed = malformed.or(Some("malformed Content-Length"));
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                encodings += 1;
                if !value.eq_ignore_ascii_case(b"chunked") {
                    malformed =
                        malformed.or(Some("Transfer-Encoding other than a single `chunked`"));
                }
            }
        }
        line_start = i + 1;
    }
    None
}

/// An HTTP/1.1 stream whose reads are recorded in a [`HeadLog`].
pub type Sniffed<IO> = Observed<IO, Arc<HeadLog>>;

impl IoObserver for Arc<HeadLog> {
    fn on_read(&self, bytes: &[u8]) {
        self.record(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str) -> Result<(), &'static str> {
        let log = HeadLog::new(8192);
        log.record(raw.as_bytes());
        let method = raw.split(' ').next().unwrap();
        log.check(&Method::from_bytes(method.as_bytes()).unwrap())
    }

    #[test]
    fn table() {
        let ok = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
        ];
        for raw in ok {
            assert_eq!(check(raw), Ok(()), "{raw:?}");
        }
        let bad = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
            "GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        ];
        for raw in bad {
            assert!(check(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn pipelined_heads_are_checked_in_turn() {
        let log = HeadLog::new(8192);
        log.record(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        // hyper hands over the first request first; its head is the last GET line.
        assert_eq!(log.check(&Method::GET), Ok(()));
        assert!(log.check(&Method::POST).is_err());
    }

    #[test]
    fn a_stopped_log_records_nothing() {
        let log = HeadLog::new(8192);
        log.record(b"CONNECT a:443 HTTP/1.1\r\n\r\n");
        log.stop();
        log.record(&[0x16; 4096]);
        let w = log.window.lock().unwrap();
        assert!(w.is_empty() && w.capacity() == 0);
    }

    #[test]
    fn window_is_bounded() {
        let log = HeadLog::new(8192);
        for _ in 0..100 {
            log.record(&[b'x'; 4096]);
        }
        assert!(log.window.lock().unwrap().len() <= 16 * 1024);
    }

    /// The reading `check_head` had before it split lines itself: a full parse with
    /// httparse, whose failures are left to hyper.
    fn full_parse_check(head: &[u8]) -> Result<(), &'static str> {
        if memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r') {
            return Err("bare LF in the request head");
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Ok(()),
        }
        let (mut lengths, mut encodings) = (0, 0);
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                let v = h.value.trim_ascii();
                if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                    return Err("malformed Content-Length");
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                encodings += 1;
                if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err("Transfer-Encoding other than a single `chunked`");
                }
            }
        }
        match (lengths, encodings) {
            (l, e) if l > 0 && e > 0 => Err("both Content-Length and Transfer-Encoding"),
            (l, _) if l > 1 => Err("more than one Content-Length"),
            (_, e) if e > 1 => Err("more than one Transfer-Encoding"),
            _ => Ok(()),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]
        /// On every head httparse reads in full (hyper's parser is httparse, so those are
        /// the heads that reach the check), splitting lines at the colon decides alike.
        #[test]
        fn agrees_with_a_full_parse(
            target in "/[a-z:%0-9]{0,6}",
            lines in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "Content-Length", "content-length", "CONTENT-LENGTH", "Transfer-Encoding",
                        "transfer-encoding", "Host", "X-A", "Content-Lengths", "Content-Length ",
                        " Content-Length", "Transfer_Encoding", "",
                    ]),
                    proptest::sample::select(vec![":", ": ", ":\t", " :", ""]),
                    "[0-9a-zA-Z ,:\t]{0,8}",
                ),
                0..5,
            ),
        ) {
            let mut head = format!("GET {target} HTTP/1.1\r\n");
            for (name, sep, value) in &lines {
                head.push_str(&format!("{name}{sep}{value}\r\n"));
            }
            head.push_str("\r\n");
            // A head ends at its first empty line (an empty generated line ends it early).
            let end = head.find("\r\n\r\n").map_or(head.len(), |i| i + 4);
            let head = &head[..end];
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let complete = matches!(
                httparse::Request::new(&mut headers).parse(head.as_bytes()),
                Ok(httparse::Status::Complete(_))
            );
            if complete {
                let (ours, len) = check_head(head.as_bytes()).expect("a complete head");
                proptest::prop_assert_eq!(len, head.len());
                proptest::prop_assert_eq!(ours, full_parse_check(head.as_bytes()), "{:?}", head);
            }
        }
    }
}
