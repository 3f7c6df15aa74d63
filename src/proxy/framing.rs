//! Strict HTTP/1.1 framing: the ambiguities hyper resolves quietly, refused instead.
//!
//! hyper parses request heads safely but leniently: given both `Content-Length` and
//! `Transfer-Encoding` it drops the length and closes after the message (RFC 9112
//! §6.3), and it reads a bare LF as a line end. Safe for hyper, but the contract (SPEC
//! §4a, and the hostile-agent rule "refuse ambiguity instead of normalising it") wants
//! such a request refused with 400 and the connection closed, since the next hop or a
//! log reader might have framed it differently. hyper no longer shows what it dropped,
//! so [`Sniffed`] keeps a short window of the raw bytes an HTTP/1.1 connection read and
//! [`HeadLog::check`] re-reads the head of each request from it with httparse.
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
        let head = &buf[start..];
        let Some(end) = find(head, b"\n\r\n")
            .map(|i| i + 3)
            .or_else(|| find(head, b"\n\n").map(|i| i + 2))
        else {
            return Ok(());
        };
        let head = &head[..end];
        let result = check_head(head);
        // Consumed: a later request's search starts after this head.
        let consumed = start + end;
        let len = w.len();
        w.drain(..consumed.min(len));
        result
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The start of the last line in `buf` that begins with `method` and a space.
fn last_line_starting_with(buf: &[u8], method: &[u8]) -> Option<usize> {
    let matches_at = |i: usize| {
        buf.len() > i + method.len()
            && &buf[i..i + method.len()] == method
            && buf[i + method.len()] == b' '
    };
    (0..buf.len())
        .rev()
        .find(|&i| (i == 0 || buf[i - 1] == b'\n') && matches_at(i))
}

fn check_head(head: &[u8]) -> Result<(), &'static str> {
    if memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r') {
        return Err("bare LF in the request head");
    }
    // Left uninitialised: initialising 256 headers is 8 KiB of stores per request.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 256];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        // hyper accepted it; whatever httparse objects to here is hyper's call.
        _ => return Ok(()),
    }
    let mut lengths = 0;
    let mut encodings = 0;
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
    if lengths > 0 && encodings > 0 {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if lengths > 1 {
        return Err("more than one Content-Length");
    }
    if encodings > 1 {
        return Err("more than one Transfer-Encoding");
    }
    Ok(())
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
}
