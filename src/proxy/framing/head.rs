//! Reading one request head: where it ends, and how it frames its body (or why that is
//! ambiguous). The head is one hyper has accepted; only what decides the framing is read.

/// How a head said its body is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// The end of the head in `buf` (just past its empty line), searching on from `from`,
/// where the line being searched starts at `line_start`; `Err` with the start of the
/// unfinished last line when it has not ended yet.
pub(super) fn head_end(buf: &[u8], from: usize, mut line_start: usize) -> Result<usize, usize> {
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
pub(super) fn check_head(buf: &[u8]) -> Option<(Result<Framing, &'static str>, usize)> {
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
        // The first line is the request line. A request target has no fragment (RFC
        // 9112 §3.2); hyper's parser lets `#` through and the URI drops what follows, so
        // the request would go on as a shorter path: refused rather than normalised.
        if line_start == 0 && memchr::memchr(b'#', line).is_some() {
            malformed = malformed.or(Some("a fragment in the request target"));
        }
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
