//! Strict HTTP/1.1 framing: the ambiguities hyper resolves quietly, refused instead.
//!
//! hyper parses request heads safely but leniently: given both `Content-Length` and
//! `Transfer-Encoding` it drops the length and closes after the message (RFC 9112
//! §6.3), and it reads a bare LF as a line end. Safe for hyper, but the contract (SPEC
//! §4a, and the hostile-agent rule "refuse ambiguity instead of normalising it") wants
//! such a request refused with 400 and the connection closed, since the next hop or a
//! log reader might have framed it differently. hyper no longer shows what it dropped,
//! so [`Sniffed`] shows every byte an HTTP/1.1 connection reads to a [`HeadLog`], which
//! follows the messages in them as hyper does: it reads each head (its line ends, and
//! the `Content-Length` and `Transfer-Encoding` lines among its headers), keeps a
//! verdict on it, and then skips that message's body by the framing the head declared,
//! so a head-like line inside a body is never taken for a head. [`HeadLog::check`] hands
//! out the verdicts in order, one per request hyper dispatches: exactly the head hyper
//! is acting on, also when requests are pipelined.
//!
//! Following costs little and holds nothing between messages: a head that arrives in one
//! read is judged where it lies, a body is skipped by count (a chunked one reads only its
//! size lines), and only a head split across reads is copied, until it ends. If the log
//! cannot follow the stream (a head longer than hyper accepts, chunk framing hyper would
//! refuse too), the requests after that point are refused: the check never passes a head
//! it has not read.
//!
//! The same wrapper keeps hyper's reads small ([`READ_LIMIT`]), so that a connection
//! idle after a large upload does not keep a read buffer sized for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::Method;

use super::observe::{IoObserver, Observed};

/// Follows the request heads of one HTTP/1.1 connection; see the module doc.
#[derive(Debug)]
pub struct HeadLog {
    reader: Mutex<Reader>,
    /// The longest head hyper accepts (its `max_header_size`).
    max_head: usize,
    /// Cleared by [`HeadLog::stop`]: the tunnel's bytes that then pass by are not
    /// looked at (nor locked for).
    following: AtomicBool,
}

/// The most bytes hyper's HTTP/1.1 server reads in one go from a connection whose heads
/// are followed. hyper sizes its read buffer by its last reads (doubling after a full
/// one, up to `max_buf_size`, 72 KiB here) and never gives it back: after one large
/// upload, an idle keep-alive connection kept a buffer of that size, its pages touched,
/// for as long as it stayed open (SPEC §4a allows an idle tunnel 64 KiB in all). Reads of
/// at most 8 KiB keep the buffer at 16 KiB; a body still streams, in more, smaller reads
/// (a TLS record's plaintext is up to 16 KiB, so two reads per record).
const READ_LIMIT: usize = 8 * 1024;

/// Where the log is in the connection's byte stream, and what it found.
#[derive(Debug)]
struct Reader {
    at: At,
    /// The start of a head that a read ended inside of (empty otherwise).
    partial: Vec<u8>,
    /// How much of `partial` has been searched for the head's end, and where the line
    /// being searched starts.
    scanned: usize,
    line_start: usize,
    /// Verdicts on heads read but not yet checked, oldest first.
    verdicts: VecDeque<Verdict>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    /// Between messages: empty lines (hyper skips them too), then a head.
    Head,
    /// In a body of known length: the bytes left.
    Body(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// Not following the stream any more: why.
    Lost(&'static str),
    /// Stopped on purpose: the connection no longer carries HTTP/1.1 heads.
    Stopped,
}

/// A chunked body, in the states of hyper's own decoder (hyper 1.x `ChunkedState`), so
/// that both find the body's end at the same byte.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

#[derive(Debug)]
struct Verdict {
    /// The head's method: a verdict is only handed to a request of that method.
    method: Method,
    result: Result<(), &'static str>,
}

/// How a head said its body is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A verdict queue emptied with more room than this gives the room back.
const VERDICTS_KEPT: usize = 8;

impl HeadLog {
    /// A log for heads of at most `max_head_bytes` (hyper's `max_header_size`).
    pub fn new(max_head_bytes: usize) -> Arc<HeadLog> {
        Arc::new(HeadLog {
            reader: Mutex::new(Reader {
                at: At::Head,
                partial: Vec::new(),
                scanned: 0,
                line_start: 0,
                verdicts: VecDeque::new(),
            }),
            max_head: max_head_bytes.max(1024),
            following: AtomicBool::new(true),
        })
    }

    /// Follows bytes the connection read (public for the fuzz target).
    pub fn record(&self, bytes: &[u8]) {
        if !self.following.load(Ordering::Relaxed) {
            return;
        }
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        r.follow(bytes, self.max_head);
    }

    /// Stops following and frees what the log holds: the connection became a tunnel or
    /// a WebSocket, whose bytes are not HTTP/1.1 messages.
    pub fn stop(&self) {
        self.following.store(false, Ordering::Relaxed);
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        r.at = At::Stopped;
        r.partial = Vec::new();
        r.verdicts = VecDeque::new();
    }

    /// The verdict on the head of the request hyper just parsed (heads are handed out in
    /// the order they came): `Err` with why its framing is ambiguous, or why the log
    /// could not read it.
    pub fn check(&self, method: &Method) -> Result<(), &'static str> {
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let Some(v) = r.verdicts.pop_front() else {
                return Err(match r.at {
                    At::Lost(why) => why,
                    _ => "the request head was not seen by the framing check",
                });
            };
            // A CONNECT on the proxy listener is answered there without this check: its
            // verdict is passed over by the next request's. (Inside a tunnel, a CONNECT is
            // checked like any request and takes its own verdict.)
            if v.method == Method::CONNECT && method != Method::CONNECT {
                continue;
            }
            if r.verdicts.is_empty() && r.verdicts.capacity() > VERDICTS_KEPT {
                r.verdicts = VecDeque::new();
            }
            // Another method than hyper's: the log and hyper disagree on where messages
            // start, and this verdict is not this request's.
            if v.method != method {
                return Err("the framing check lost track of the request heads");
            }
            return v.result;
        }
    }
}

impl Reader {
    fn follow(&mut self, mut bytes: &[u8], max_head: usize) {
        while !bytes.is_empty() {
            bytes = match self.at {
                At::Head => self.head(bytes, max_head),
                At::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    let left = left - n as u64;
                    self.at = if left == 0 { At::Head } else { At::Body(left) };
                    &bytes[n..]
                }
                At::Chunked(chunk) => self.chunked(chunk, bytes),
                At::Lost(_) | At::Stopped => return,
            };
        }
    }

    /// Reads (part of) a head from `bytes`; what follows it.
    fn head<'a>(&mut self, bytes: &'a [u8], max_head: usize) -> &'a [u8] {
        if self.partial.is_empty() {
            let skip = bytes
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
                .unwrap_or(bytes.len());
            let bytes = &bytes[skip..];
            if bytes.is_empty() {
                return bytes;
            }
            // The usual case: the whole head in this read, judged where it lies (one pass
            // finds its end and reads it).
            return match check_head(bytes) {
                Some((_, end)) if end > max_head => self.lose("request head longer than the limit"),
                Some((result, end)) => {
                    self.judge(bytes, result);
                    &bytes[end..]
                }
                None if bytes.len() > max_head => self.lose("request head longer than the limit"),
                None => {
                    self.partial.extend_from_slice(bytes);
                    self.scanned = bytes.len();
                    self.line_start = memchr::memrchr(b'\n', bytes).map_or(0, |i| i + 1);
                    &[]
                }
            };
        }
        // A head begun in an earlier read: search on from where that search stopped.
        let before = self.partial.len();
        let take = bytes.len().min(max_head + 1 - before.min(max_head));
        self.partial.extend_from_slice(&bytes[..take]);
        match head_end(&self.partial, self.scanned, self.line_start) {
            Ok(end) if end <= max_head => {
                let head = std::mem::take(&mut self.partial);
                let result = check_head(&head[..end])
                    .map_or(Err("request head not understood"), |(result, _)| result);
                self.judge(&head, result);
                &bytes[end - before..]
            }
            Ok(_) => self.lose("request head longer than the limit"),
            Err(_) if self.partial.len() > max_head => {
                self.lose("request head longer than the limit")
            }
            Err(line_start) => {
                self.scanned = self.partial.len();
                self.line_start = line_start;
                &[]
            }
        }
    }

    /// Keeps the verdict on a complete head (at the start of `head`) and moves on to its
    /// body.
    fn judge(&mut self, head: &[u8], result: Result<Framing, &'static str>) {
        self.at = match result {
            Ok(Framing::None | Framing::Length(0)) => At::Head,
            Ok(Framing::Length(n)) => At::Body(n),
            Ok(Framing::Chunked) => At::Chunked(Chunk::Start),
            // An ambiguous head is refused and its connection closed: nothing after it
            // is read as HTTP.
            Err(why) => At::Lost(why),
        };
        let token = memchr::memchr(b' ', head).map_or(head, |sp| &head[..sp]);
        let (method, result) = match Method::from_bytes(token) {
            Ok(method) => (method, result.map(|_| ())),
            // hyper refuses it too, so no request will take this verdict.
            Err(_) => (Method::GET, Err("request method not understood")),
        };
        self.verdicts.push_back(Verdict { method, result });
    }

    fn lose<'a>(&mut self, why: &'static str) -> &'a [u8] {
        self.at = At::Lost(why);
        self.partial = Vec::new();
        &[]
    }

    /// Reads chunk framing from `bytes` as hyper's decoder does, skipping chunk data by
    /// count; what follows the body, once it ends.
    fn chunked<'a>(&mut self, mut chunk: Chunk, bytes: &'a [u8]) -> &'a [u8] {
        let mut i = 0;
        while i < bytes.len() {
            if let Chunk::Data(left) = chunk {
                let n = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                i += n;
                let left = left - n as u64;
                chunk = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            let b = bytes[i];
            i += 1;
            let next = match (chunk, b) {
                (Chunk::Start, _) => hex(b).map(|d| Chunk::Size(u64::from(d))),
                (Chunk::Size(n), _) if hex(b).is_some() => n
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(u64::from(hex(b).unwrap_or(0))))
                    .map(Chunk::Size),
                (Chunk::Size(n) | Chunk::SizeLws(n), b'\t' | b' ') => Some(Chunk::SizeLws(n)),
                (Chunk::Size(n) | Chunk::SizeLws(n) | Chunk::Extension(n), b';') => {
                    Some(Chunk::Extension(n))
                }
                (Chunk::Size(n) | Chunk::SizeLws(n) | Chunk::Extension(n), b'\r') => {
                    Some(Chunk::SizeLf(n))
                }
                (Chunk::Extension(_), b'\n') => None,
                (Chunk::Extension(n), _) => Some(Chunk::Extension(n)),
                (Chunk::SizeLf(0), b'\n') => Some(Chunk::EndCr),
                (Chunk::SizeLf(n), b'\n') => Some(Chunk::Data(n)),
                (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
                (Chunk::DataLf, b'\n') => Some(Chunk::Start),
                (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
                (Chunk::Trailer, _) => Some(Chunk::Trailer),
                (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
                (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
                (Chunk::EndCr, _) => Some(Chunk::Trailer),
                (Chunk::EndLf, b'\n') => {
                    self.at = At::Head;
                    return &bytes[i..];
                }
                _ => None,
            };
            match next {
                Some(c) => chunk = c,
                // hyper fails the body here and closes the connection.
                None => return self.lose("chunked body framing not understood"),
            }
        }
        self.at = At::Chunked(chunk);
        &[]
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The end of the head in `buf` (just past its empty line), searching on from `from`,
/// where the line being searched starts at `line_start`; `Err` with the start of the
/// unfinished last line when it has not ended yet.
fn head_end(buf: &[u8], from: usize, mut line_start: usize) -> Result<usize, usize> {
    for i in memchr::memchr_iter(b'\n', &buf[from..]).map(|i| i + from) {
        let line = &buf[line_start..i];
        if line.is_empty() || line == b"\r" {
            return Ok(i + 1);
        }
        line_start = i + 1;
    }
    Err(line_start)
}

/// Reads the head at the start of `buf`, up to its first empty line: its framing, or why
/// it is ambiguous, and its length; `None` if no empty line ends it within `buf`.
///
/// The head is one that hyper accepted, so its header lines are all `name: value`
/// (hyper's parser refused anything else before this runs): each line is split at its
/// first colon in one pass over the line ends rather than parsed again in full, since
/// what decides is only which lines name `Content-Length` or `Transfer-Encoding` and what
/// they say (`tests::agrees_with_a_full_parse` holds this to httparse's reading).
fn check_head(buf: &[u8]) -> Option<(Result<Framing, &'static str>, usize)> {
    let mut bare_lf = false;
    let mut malformed = None;
    let (mut lengths, mut encodings) = (0, 0);
    let mut length = 0u64;
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
            } else if encodings == 1 {
                Ok(Framing::Chunked)
            } else if lengths == 1 {
                Ok(Framing::Length(length))
            } else {
                Ok(Framing::None)
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
                match parse_length(value) {
                    Some(n) => length = n,
                    None => malformed = malformed.or(Some("malformed Content-Length")),
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

/// A `Content-Length` value: decimal digits only, no larger than hyper reads.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
    })
}

/// An HTTP/1.1 stream whose reads are recorded in a [`HeadLog`].
pub type Sniffed<IO> = Observed<IO, Arc<HeadLog>>;

impl IoObserver for Arc<HeadLog> {
    fn on_read(&self, bytes: &[u8]) {
        self.record(bytes);
    }

    /// While heads are followed, hyper reads at most [`READ_LIMIT`] at a time.
    fn read_limit(&self) -> Option<usize> {
        self.following.load(Ordering::Relaxed).then_some(READ_LIMIT)
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
        assert_eq!(log.check(&Method::GET), Ok(()));
        assert!(log.check(&Method::POST).is_err());
    }

    #[test]
    fn two_pipelined_heads_of_one_method_each_get_their_own_verdict() {
        let clean = "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab";
        let ambiguous =
            "POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab";
        let log = HeadLog::new(8192);
        log.record(format!("{clean}{ambiguous}").as_bytes());
        assert_eq!(log.check(&Method::POST), Ok(()));
        assert_eq!(
            log.check(&Method::POST),
            Err("more than one Content-Length")
        );
        let log = HeadLog::new(8192);
        log.record(format!("{ambiguous}{clean}").as_bytes());
        assert!(log.check(&Method::POST).is_err());
    }

    #[test]
    fn a_head_inside_a_body_is_body() {
        let inner = "POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        // A clean head whose body holds an ambiguous one: the clean head decides.
        let log = HeadLog::new(8192);
        log.record(
            format!(
                "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{inner}",
                inner.len()
            )
            .as_bytes(),
        );
        assert_eq!(log.check(&Method::POST), Ok(()));
        // Nothing else was a head.
        assert!(log.check(&Method::POST).is_err());

        // The same inside chunks, then a pipelined request after the body.
        let log = HeadLog::new(8192);
        let clean_inner = "POST /y HTTP/1.1\r\nHost: a\r\n\r\n";
        log.record(
            format!(
                "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{inner}\r\n{:x}\r\n{clean_inner}\r\n0\r\nX-T: 1\r\n\r\nGET /b HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                inner.len(),
                clean_inner.len()
            )
            .as_bytes(),
        );
        assert_eq!(log.check(&Method::POST), Ok(()));
        assert!(log.check(&Method::GET).is_err());

        // An ambiguous head whose body holds a clean one: the ambiguous head decides.
        let log = HeadLog::new(8192);
        log.record(
            format!(
                "POST /a HTTP/1.1\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{clean_inner}\r\n0\r\n\r\n",
                clean_inner.len()
            )
            .as_bytes(),
        );
        assert_eq!(
            log.check(&Method::POST),
            Err("both Content-Length and Transfer-Encoding")
        );
    }

    #[test]
    fn verdicts_do_not_depend_on_how_reads_split_the_stream() {
        let stream = "\r\nPOST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3 ; x\r\nGET\r\n0\r\n\r\nGET /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nGETPUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        for piece in [1, 2, 3, 7, 64, stream.len()] {
            let log = HeadLog::new(8192);
            for part in stream.as_bytes().chunks(piece) {
                log.record(part);
            }
            assert_eq!(log.check(&Method::POST), Ok(()), "{piece}");
            assert_eq!(log.check(&Method::GET), Ok(()), "{piece}");
            assert!(log.check(&Method::PUT).is_err(), "{piece}");
        }
    }

    #[test]
    fn a_connect_answered_on_the_listener_is_passed_over() {
        let log = HeadLog::new(8192);
        log.record(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(log.check(&Method::GET), Ok(()));
        let log = HeadLog::new(8192);
        log.record(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
        assert_eq!(log.check(&Method::CONNECT), Ok(()));
    }

    #[test]
    fn a_verdict_is_only_handed_to_a_request_of_its_method() {
        let log = HeadLog::new(8192);
        log.record(b"GET /a HTTP/1.1\r\n\r\n");
        assert!(log.check(&Method::POST).is_err());
    }

    #[test]
    fn framing_it_cannot_follow_refuses_what_comes_after() {
        let log = HeadLog::new(8192);
        log.record(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert_eq!(log.check(&Method::POST), Ok(()));
        log.record(b"GET /b HTTP/1.1\r\n\r\n");
        assert!(log.check(&Method::GET).is_err());
    }

    #[test]
    fn a_stopped_log_records_nothing() {
        let log = HeadLog::new(8192);
        log.record(b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01");
        log.stop();
        log.record(&[0x16; 4096]);
        let r = log.reader.lock().unwrap();
        assert!(r.partial.capacity() == 0 && r.verdicts.capacity() == 0);
        assert_eq!(r.at, At::Stopped);
    }

    #[test]
    fn a_head_is_bounded_and_nothing_is_held_between_messages() {
        let log = HeadLog::new(8192);
        for _ in 0..100 {
            log.record(&[b'x'; 4096]);
        }
        {
            let r = log.reader.lock().unwrap();
            assert!(matches!(r.at, At::Lost(_)));
            assert_eq!(r.partial.capacity(), 0);
        }

        // A 150 kB upload, its head split across reads, and many pipelined requests:
        // once they are checked, the log holds no memory.
        let log = HeadLog::new(8192);
        log.record(b"POST /up HTTP/1.1\r\nHost: a\r\n");
        log.record(b"Content-Length: 150000\r\n\r\n");
        for _ in 0..150 {
            log.record(&[b'G'; 1000]);
        }
        log.record("GET / HTTP/1.1\r\n\r\n".repeat(100).as_bytes());
        for _ in 0..101 {
            let _ = log.check(&Method::GET);
        }
        let r = log.reader.lock().unwrap();
        assert_eq!(r.at, At::Head);
        assert_eq!(r.partial.capacity(), 0);
        assert_eq!(r.verdicts.capacity(), 0);
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
                proptest::prop_assert_eq!(ours.map(|_| ()), full_parse_check(head.as_bytes()), "{:?}", head);
            }
        }

        /// A connection's messages, pipelined, with bodies that hold head-like text
        /// (ambiguous heads included), cut into reads anywhere: each head gets its own
        /// verdict, in order, whatever the cuts.
        #[test]
        fn pipelined_messages_get_their_own_verdicts_however_reads_cut_them(
            messages in proptest::collection::vec(
                (
                    0..4u8,
                    proptest::sample::select(vec![
                        "",
                        "x",
                        "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                        "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                        "DELETE / HTTP/1.1\r\n\r\n",
                        "\r\n\r\n0\r\n\r\n",
                    ]),
                    1..40usize,
                    proptest::bool::ANY,
                ),
                1..6,
            ),
            cuts in proptest::collection::vec(1..64usize, 0..40),
        ) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for (kind, text, chunk, ambiguous) in &messages {
                let (method, head_extra, body) = match kind {
                    0 => ("GET", String::new(), String::new()),
                    1 => ("POST", format!("Content-Length: {}\r\n", text.len()), text.to_string()),
                    2 => {
                        // Chunked, the text cut into chunks of `chunk` bytes, with an
                        // extension on the first and a trailer.
                        let mut body = String::new();
                        for (i, piece) in text.as_bytes().chunks(*chunk).enumerate() {
                            let ext = if i == 0 { " ;a=b" } else { "" };
                            body.push_str(&format!("{:x}{ext}\r\n", piece.len()));
                            body.push_str(std::str::from_utf8(piece).unwrap());
                            body.push_str("\r\n");
                        }
                        body.push_str("0\r\nX-T: 1\r\n\r\n");
                        ("PUT", "Transfer-Encoding: chunked\r\n".to_owned(), body)
                    }
                    _ => ("DELETE", "Content-Length: 0\r\n".to_owned(), String::new()),
                };
                let ambiguity = if *ambiguous { "Content-Length: 0\r\nContent-Length: 0\r\n" } else { "" };
                stream.extend_from_slice(
                    format!("{method} /p HTTP/1.1\r\nHost: a\r\n{head_extra}{ambiguity}\r\n{body}").as_bytes(),
                );
                want.push((method, !*ambiguous));
                if *ambiguous {
                    // Nothing after an ambiguous head is read: the connection closes.
                    break;
                }
            }
            let log = HeadLog::new(8192);
            let mut rest = &stream[..];
            for cut in &cuts {
                let n = (*cut).min(rest.len());
                log.record(&rest[..n]);
                rest = &rest[n..];
            }
            log.record(rest);
            for (method, ok) in want {
                let got = log.check(&Method::from_bytes(method.as_bytes()).unwrap());
                proptest::prop_assert_eq!(got.is_ok(), ok, "{} in {:?}", method, String::from_utf8_lossy(&stream));
            }
            // No head beyond them.
            proptest::prop_assert!(log.check(&Method::GET).is_err());
        }

        /// Whatever an agent sends, cut however, following it and checking never panic
        /// (huge lengths and chunk sizes, a CONNECT, stray line ends, heads over the limit).
        #[test]
        fn any_bytes_are_followed_without_panicking(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "GET / HTTP/1.1\r\n", "POST /x HTTP/1.1\r\n", "CONNECT a:1 HTTP/1.1\r\n",
                    "Content-Length: 3\r\n", "Content-Length: 99999999999999999999\r\n",
                    "Transfer-Encoding: chunked\r\n", "\r\n", "\n", "\r", "abc", "3\r\n",
                    "ffffffffffffffffff\r\n", "0\r\n", " ;x", "X: y\r\n", "\0",
                ]),
                0..60,
            ),
            cuts in proptest::collection::vec(1..32usize, 0..30),
        ) {
            let stream = pieces.concat();
            let log = HeadLog::new(1024);
            let mut rest = stream.as_bytes();
            for cut in &cuts {
                let n = (*cut).min(rest.len());
                log.record(&rest[..n]);
                rest = &rest[n..];
            }
            log.record(rest);
            for m in [Method::GET, Method::POST, Method::CONNECT, Method::GET] {
                let _ = log.check(&m);
            }
        }
    }
}
