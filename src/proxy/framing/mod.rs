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

use self::head::{Framing, check_head, head_end};
use super::observe::{IoObserver, Observed};

mod head;

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
/// one, up to its `max_buf_size`) and never gives it back: after one large
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

/// An HTTP/1.1 stream whose reads are recorded in a [`HeadLog`].
pub(crate) type Sniffed<IO> = Observed<IO, Arc<HeadLog>>;

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
mod tests;
