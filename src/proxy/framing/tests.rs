//! The framing follower's tables and property tests: heads, bodies and pipelines cut
//! into reads anywhere, held to hyper's and httparse's reading.

use super::head::check_head;
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
        "GET /a#/../admin HTTP/1.1\r\nHost: a\r\n\r\n",
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
    log.record(
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    );
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
