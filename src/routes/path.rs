//! Request paths: the check that refuses any path an upstream could read differently from
//! us, and the `path_allowlist` patterns matched against what passes it.
//!
//! The rule is "canonical or refused": we never rewrite a path, so the bytes we matched
//! are the bytes the upstream gets. A path that some server would normalise (`..`, `//`,
//! `%2e%2e`, `..;`) is refused with 400 instead. Percent-escapes are decoded at most once
//! and only to look for dots, control bytes and bytes that are not UTF-8; an encoded slash (`%2F`) stays an ordinary
//! character inside its segment, as npm (`/@scope%2fname`) and GitLab
//! (`/projects/group%2Frepo`) need.
//!
//! Matching walks the path in place: no allocation on the request path.

use std::fmt;

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("path has an empty segment ('//')")]
    EmptySegment,
    #[error("path has a dot segment ('.' or '..', raw or encoded)")]
    DotSegment,
    #[error("path has a raw backslash")]
    Backslash,
    #[error("path has a NUL or control character")]
    ControlCharacter,
    #[error("path has an invalid percent-escape")]
    BadEscape,
    #[error("path has a raw non-ASCII byte (percent-encode it)")]
    NonAscii,
    #[error("path has percent-escapes that do not decode to UTF-8")]
    NotUtf8,
}

/// Checks that `path` (without its query) is unambiguous: see the module docs.
pub fn check_request_path(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Raw bytes and escapes first, so the segment walk below may assume well-formed escapes.
    let mut utf8 = Utf8Check::default();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
            // Raw bytes above ASCII are read as UTF-8 by some servers and Latin-1 (where
            // 0x80-0x9f are controls) by others: ambiguous, so refused.
            b if b >= 0x80 => return Err(PathError::NonAscii),
            b'%' => {
                let decoded = decode_escape(bytes, i).ok_or(PathError::BadEscape)?;
                if decoded < 0x20 || decoded == 0x7f {
                    return Err(PathError::ControlCharacter);
                }
                utf8.push(decoded)?;
                i += 3;
                continue;
            }
            b => utf8.push(b)?,
        }
        i += 1;
    }
    utf8.finish()?;
    let body = &path[1..];
    let segment_count = body.split('/').count();
    for (n, segment) in body.split('/').enumerate() {
        // A trailing slash (`/repos/acme/`) is the one empty segment allowed.
        if segment.is_empty() && n + 1 != segment_count {
            return Err(PathError::EmptySegment);
        }
        for piece in pieces(segment) {
            if is_dot_piece(piece) {
                return Err(PathError::DotSegment);
            }
        }
    }
    Ok(())
}

/// Checks that the path, escapes decoded once, is UTF-8, without decoding it anywhere:
/// an escape that is not (an overlong `%c0%ae`, a lone `%e9`, a surrogate) means
/// different bytes to different servers (some read `%c0%ae` as `.`), so it is refused.
///
/// Decoding each segment, and each piece between encoded slashes, on its own gives the
/// same answer as decoding the whole path: raw bytes are ASCII by now, and every
/// separator (`/`, `%2F`, `%5C`) is ASCII too, so it ends any multi-byte sequence that
/// it splits (`/%c3/%a9` is refused, as neither `%c3` nor `%a9` is UTF-8 alone).
#[derive(Default)]
struct Utf8Check {
    /// The bytes of the sequence being read, and how many it needs in all.
    pending: [u8; 4],
    have: usize,
    need: usize,
}

impl Utf8Check {
    fn push(&mut self, byte: u8) -> Result<(), PathError> {
        if self.have == 0 {
            self.need = match byte {
                0x00..=0x7f => return Ok(()),
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf7 => 4,
                // A continuation byte with no lead, or a lead no UTF-8 has.
                _ => return Err(PathError::NotUtf8),
            };
        }
        self.pending[self.have] = byte;
        self.have += 1;
        if self.have == self.need {
            // std rejects overlong forms, surrogates and code points past U+10FFFF.
            std::str::from_utf8(&self.pending[..self.need]).map_err(|_| PathError::NotUtf8)?;
            self.have = 0;
        }
        Ok(())
    }

    /// A sequence cut short by the end of the path is not UTF-8 either.
    fn finish(&self) -> Result<(), PathError> {
        match self.have {
            0 => Ok(()),
            _ => Err(PathError::NotUtf8),
        }
    }
}

/// The byte a well-formed `%XY` at `at` stands for.
fn decode_escape(bytes: &[u8], at: usize) -> Option<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let hi = hex(*bytes.get(at + 1)?)?;
    let lo = hex(*bytes.get(at + 2)?)?;
    Some(hi << 4 | lo)
}

/// True when `bytes[at..]` starts with an escaped slash or backslash (`%2F`, `%5c`, …).
fn is_encoded_separator(bytes: &[u8], at: usize) -> bool {
    bytes[at] == b'%' && matches!(decode_escape(bytes, at), Some(b'/' | b'\\'))
}

/// Does the segment hold an encoded slash or backslash, which `*` never matches?
pub(crate) fn has_encoded_separator(segment: &str) -> bool {
    (0..segment.len()).any(|i| is_encoded_separator(segment.as_bytes(), i))
}

/// Splits a segment at its encoded slashes and backslashes: the pieces a server that
/// decodes them would see as segments.
fn pieces(segment: &str) -> impl Iterator<Item = &str> {
    let bytes = segment.as_bytes();
    let mut start = 0;
    let mut i = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while i < bytes.len() {
            if is_encoded_separator(bytes, i) {
                let piece = &segment[start..i];
                i += 3;
                start = i;
                return Some(piece);
            }
            i += 1;
        }
        done = true;
        Some(&segment[start..])
    })
}

/// True when a piece, decoded once and cut at its first `;` (raw or encoded), is `.` or `..`.
fn is_dot_piece(piece: &str) -> bool {
    let bytes = piece.as_bytes();
    let mut dots = 0;
    let mut i = 0;
    while i < bytes.len() {
        let (b, width) = if bytes[i] == b'%' {
            (decode_escape(bytes, i).unwrap_or(0), 3)
        } else {
            (bytes[i], 1)
        };
        match b {
            b'.' => dots += 1,
            b';' => break,
            _ => return false,
        }
        i += width;
    }
    dots == 1 || dots == 2
}

/// One segment of a path pattern.
#[derive(Clone, PartialEq, Eq)]
enum PatternSegment {
    /// Compared as sent; the hex digits of escapes are stored upper-case.
    Literal(String),
    /// `*`: exactly one non-empty segment without an encoded slash.
    One,
    /// `**`: zero or more segments.
    Any,
}

/// A `path_allowlist` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<PatternSegment>,
    /// A pattern with a wildcard matches the whole path; one without is a segment prefix.
    whole: bool,
}

/// Why a path pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern does not start with '/'")]
    NotAbsolute,
    #[error("pattern has an empty segment ('//')")]
    EmptySegment,
    #[error("pattern has a dot segment, which no accepted request path can have")]
    DotSegment,
    #[error("`*` and `**` must be whole segments")]
    PartialWildcard,
    #[error("pattern has a character no accepted request path can have: {0}")]
    Unmatchable(PathError),
}

impl PathPattern {
    pub fn parse(source: &str) -> Result<PathPattern, PatternError> {
        if !source.starts_with('/') {
            return Err(PatternError::NotAbsolute);
        }
        let mut segments = Vec::new();
        let body = &source[1..];
        // `/` is the empty prefix; a trailing slash is ignored (`/repos/acme/` == `/repos/acme`).
        let body = body.strip_suffix('/').unwrap_or(body);
        if !body.is_empty() {
            for segment in body.split('/') {
                if segment.is_empty() {
                    return Err(PatternError::EmptySegment);
                }
                segments.push(match segment {
                    "*" => PatternSegment::One,
                    "**" => PatternSegment::Any,
                    s if s.contains('*') => return Err(PatternError::PartialWildcard),
                    s => {
                        check_request_path(&format!("/{s}")).map_err(|e| match e {
                            PathError::DotSegment => PatternError::DotSegment,
                            e => PatternError::Unmatchable(e),
                        })?;
                        PatternSegment::Literal(uppercase_escapes(s))
                    }
                });
            }
        }
        let whole = segments
            .iter()
            .any(|s| !matches!(s, PatternSegment::Literal(_)));
        Ok(PathPattern {
            source: source.to_owned(),
            segments,
            whole,
        })
    }

    /// Matches a request path that passed [`check_request_path`] (query already removed).
    pub fn matches(&self, path: &str) -> bool {
        let body = path.strip_prefix('/').unwrap_or(path);
        if self.whole {
            glob_segments(&self.segments, body)
        } else {
            let mut cursor = SegmentCursor::new(body);
            self.segments.iter().all(|seg| match (seg, cursor.next()) {
                (PatternSegment::Literal(lit), Some(s)) => literal_eq(lit, s),
                _ => false,
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Escapes' hex digits upper-cased: how patterns compare segments, so `%2f` and `%2F`
/// are one segment.
pub(crate) fn uppercase_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut hex_left = 0;
    for c in s.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_uppercase());
            hex_left -= 1;
        } else {
            if c == '%' {
                hex_left = 2;
            }
            out.push(c);
        }
    }
    out
}

/// Byte equality, except that the two hex digits after a `%` compare case-insensitively.
/// `lit` has upper-case escapes already.
fn literal_eq(lit: &str, segment: &str) -> bool {
    let (a, b) = (lit.as_bytes(), segment.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut hex_left = 0;
    for (&x, &y) in a.iter().zip(b) {
        if hex_left > 0 {
            hex_left -= 1;
            if x != y.to_ascii_uppercase() {
                return false;
            }
        } else {
            if x != y {
                return false;
            }
            if x == b'%' {
                hex_left = 2;
            }
        }
    }
    true
}

/// Iterates the segments of a path body (the path without its leading `/`): `""` is one
/// empty segment (the path `/`), `"a/"` is `a` then an empty one.
#[derive(Clone, Copy)]
struct SegmentCursor<'a> {
    rest: Option<&'a str>,
}

impl<'a> SegmentCursor<'a> {
    fn new(body: &'a str) -> Self {
        SegmentCursor { rest: Some(body) }
    }
}

impl<'a> Iterator for SegmentCursor<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        match rest.split_once('/') {
            Some((seg, tail)) => {
                self.rest = Some(tail);
                Some(seg)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

fn matches_one(segment: &PatternSegment, s: &str) -> bool {
    match segment {
        PatternSegment::Literal(lit) => literal_eq(lit, s),
        PatternSegment::One => {
            let b = s.as_bytes();
            !s.is_empty() && !(0..b.len()).any(|i| is_encoded_separator(b, i))
        }
        PatternSegment::Any => false,
    }
}

/// Whole-path glob over segments, `**` as "any run of segments": the classic linear
/// wildcard walk that backtracks only to the last `**`, so no pattern can make it slow.
fn glob_segments(pattern: &[PatternSegment], body: &str) -> bool {
    let mut p = 0;
    let mut cursor = SegmentCursor::new(body);
    let mut backtrack: Option<(usize, SegmentCursor)> = None;
    loop {
        let mut peek = cursor;
        match peek.next() {
            Some(seg) => {
                if p < pattern.len() && pattern[p] == PatternSegment::Any {
                    backtrack = Some((p + 1, cursor));
                    p += 1;
                } else if p < pattern.len() && matches_one(&pattern[p], seg) {
                    p += 1;
                    cursor = peek;
                } else if let Some((star_p, mut star_cursor)) = backtrack {
                    // Let the last `**` swallow one more segment and retry from there.
                    star_cursor.next();
                    backtrack = Some((star_p, star_cursor));
                    p = star_p;
                    cursor = star_cursor;
                } else {
                    return false;
                }
            }
            None => {
                return pattern[p..].iter().all(|s| *s == PatternSegment::Any);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_paths() {
        for ok in [
            "/",
            "/a",
            "/a/",
            "/repos/acme/widgets",
            "/@scope%2fname",
            "/projects/group%2Frepo",
            "/a;b",
            "/a/.well-known",
            "/a/...",
            "/a/%252e%252e/b",
            "/v1/messages",
            "/a%20b",
            "/a/b.c",
            "/.x",
            "/a%2F%2Fb",
            // Escapes that decode to UTF-8 pass, in any case of hex digit.
            "/caf%C3%A9",
            "/caf%c3%a9",
            "/%E2%82%AC/%F0%9F%98%80",
            "/%C3%A9%2F%C3%A9",
            "/%EF%BF%BF",
            "/%F4%8F%BF%BF",
        ] {
            assert_eq!(check_request_path(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn refused_paths() {
        use PathError::*;
        for (bad, why) in [
            ("", NotAbsolute),
            ("a/b", NotAbsolute),
            ("*", NotAbsolute),
            ("//", EmptySegment),
            ("/a//b", EmptySegment),
            ("//a", EmptySegment),
            ("/.", DotSegment),
            ("/..", DotSegment),
            ("/a/./b", DotSegment),
            ("/a/../b", DotSegment),
            ("/a/..", DotSegment),
            ("/a/../", DotSegment),
            ("/%2e%2e/x", DotSegment),
            ("/%2E./x", DotSegment),
            ("/.%2e/x", DotSegment),
            ("/%2e/x", DotSegment),
            ("/a%2F..%2Fb", DotSegment),
            ("/a%2f..%2fb", DotSegment),
            ("/a%5C..%5Cb", DotSegment),
            ("/a%2F.", DotSegment),
            ("/..;/admin", DotSegment),
            ("/.;x/a", DotSegment),
            ("/..%3b/admin", DotSegment),
            ("/%2e%2e;jsessionid=1/x", DotSegment),
            ("/a\\b", Backslash),
            ("/a\0", ControlCharacter),
            ("/a\tb", ControlCharacter),
            ("/a%00", ControlCharacter),
            ("/a%0a", ControlCharacter),
            ("/a%0D%0Ab", ControlCharacter),
            ("/a%7f", ControlCharacter),
            ("/a%", BadEscape),
            ("/a%2", BadEscape),
            ("/a%zz", BadEscape),
            ("/a%%32e", BadEscape),
            ("/caf\u{e9}", NonAscii),
            ("/a\u{85}b", NonAscii),
            // Overlong forms: `%c0%ae` is a dot to some servers.
            ("/v1/%c0%ae%c0%ae/admin", NotUtf8),
            ("/%C0%AE", NotUtf8),
            ("/%e0%80%ae", NotUtf8),
            ("/%f0%80%80%ae", NotUtf8),
            ("/%c1%bf", NotUtf8),
            // Lone, stray and impossible bytes.
            ("/caf%e9", NotUtf8),
            ("/%a9", NotUtf8),
            ("/%ff", NotUtf8),
            ("/%f8%88%80%80%80", NotUtf8),
            // Surrogates and past U+10FFFF.
            ("/%ed%a0%80", NotUtf8),
            ("/%f4%90%80%80", NotUtf8),
            // A sequence cut by the end, by a raw byte, or split across segments or
            // across pieces between encoded slashes: each part is decoded on its own.
            ("/%c3", NotUtf8),
            ("/%e2%82", NotUtf8),
            ("/%c3a%a9", NotUtf8),
            ("/%c3/%a9", NotUtf8),
            ("/%c3%2f%a9", NotUtf8),
            ("/%e2%82%5c%ac", NotUtf8),
            ("/%c3;%a9", NotUtf8),
        ] {
            assert_eq!(check_request_path(bad), Err(why), "{bad:?}");
        }
    }

    fn m(pattern: &str, path: &str) -> bool {
        PathPattern::parse(pattern).unwrap().matches(path)
    }

    #[test]
    fn segment_prefix() {
        assert!(m("/repos/acme", "/repos/acme"));
        assert!(m("/repos/acme", "/repos/acme/"));
        assert!(m("/repos/acme", "/repos/acme/x/y"));
        assert!(!m("/repos/acme", "/repos/acmex"));
        assert!(!m("/repos/acme", "/repos"));
        assert!(!m("/repos/acme", "/"));
        assert!(m("/repos/acme/", "/repos/acme"));
        assert!(m("/", "/anything/at/all"));
        assert!(m("/", "/"));
        assert!(!m("/repos/acme", "/Repos/acme"));
    }

    #[test]
    fn single_and_double_wildcards() {
        assert!(m("/repos/*/issues", "/repos/a/issues"));
        assert!(!m("/repos/*/issues", "/repos/a/issues/1"));
        assert!(!m("/repos/*/issues", "/repos/a/b/issues"));
        assert!(!m("/repos/*/issues", "/repos/issues"));
        assert!(!m("/repos/*/issues", "/repos/a/issues/"));
        assert!(m("/repos/*/issues/**", "/repos/a/issues"));
        assert!(m("/repos/*/issues/**", "/repos/a/issues/1/comments"));
        assert!(m("/**", "/"));
        assert!(m("/**", "/a/b/c"));
        assert!(m("/a/**/z", "/a/z"));
        assert!(m("/a/**/z", "/a/b/c/z"));
        assert!(!m("/a/**/z", "/a/b/c/zz"));
        assert!(m("/a/**/b/**/c", "/a/x/b/y/b/c"));
        assert!(!m("/*", "/"));
        assert!(m("/*", "/x"));
    }

    #[test]
    fn encoded_slashes_are_ordinary_characters() {
        assert!(m("/@scope%2fname", "/@scope%2Fname"));
        assert!(m("/@scope%2Fname", "/@scope%2fname"));
        assert!(!m("/@scope%2fname", "/@scope/name"));
        assert!(m("/**", "/@scope%2fname"));
        assert!(!m("/*", "/@scope%2fname"));
        assert!(!m("/*", "/a%5cb"));
        assert!(m("/projects", "/projects/group%2Frepo/issues"));
        assert!(!m("/projects/*/issues", "/projects/group%2Frepo/issues"));
        assert!(m("/projects/**/issues", "/projects/group%2Frepo/issues"));
        // Escapes are not decoded for matching: %61 is not `a`.
        assert!(!m("/a", "/%61"));
        assert!(m("/a;b", "/a;b"));
    }

    #[test]
    fn refused_patterns() {
        assert_eq!(PathPattern::parse("repos"), Err(PatternError::NotAbsolute));
        assert_eq!(PathPattern::parse("/a//b"), Err(PatternError::EmptySegment));
        assert_eq!(PathPattern::parse("/a/../b"), Err(PatternError::DotSegment));
        assert_eq!(
            PathPattern::parse("/a*"),
            Err(PatternError::PartialWildcard)
        );
        assert_eq!(
            PathPattern::parse("/***"),
            Err(PatternError::PartialWildcard)
        );
        assert!(PathPattern::parse("/a\\b").is_err());
    }

    #[test]
    fn many_double_wildcards_stay_linear() {
        let pattern = format!("{}/z", "/**".repeat(50));
        let path = format!("{}/y", "/a".repeat(2000));
        assert!(!m(&pattern, &path));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Path-ish strings: segments drawn from a small alphabet rich in the characters the
    /// check cares about (dots, slashes, percent signs, semicolons, backslashes).
    fn pathish() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("/".to_string()),
                Just(".".to_string()),
                Just("..".to_string()),
                Just("%2e".to_string()),
                Just("%2F".to_string()),
                Just("%5c".to_string()),
                Just(";".to_string()),
                Just("%".to_string()),
                Just("\\".to_string()),
                "[a-z0-9]{1,3}",
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    /// Paths of escapes of any byte, with some slashes and ASCII between them.
    fn escapes() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                any::<u8>().prop_map(|b| format!("%{b:02x}")),
                (0xc2u8..0xf5).prop_map(|b| format!("%{b:02X}")),
                (0x80u8..0xc0).prop_map(|b| format!("%{b:02x}")),
                Just("/".to_string()),
                "[a-z]{1,2}",
            ],
            0..12,
        )
        .prop_map(|parts| format!("/x{}", parts.concat()))
    }

    /// The path with every escape decoded once.
    fn decode_once(path: &str) -> Vec<u8> {
        let bytes = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match decode_escape(bytes, i).filter(|_| bytes[i] == b'%') {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        out
    }

    fn valid_segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_~-]{1,8}(%2[fF][a-z]{1,3})?"
    }

    proptest! {
        #[test]
        fn check_never_panics(s in "\\PC*") {
            let _ = check_request_path(&s);
        }

        #[test]
        fn accepted_paths_have_no_dot_pieces_or_empty_segments(s in pathish()) {
            if check_request_path(&s).is_ok() {
                let body = &s[1..];
                let segs: Vec<&str> = body.split('/').collect();
                for (i, seg) in segs.iter().enumerate() {
                    prop_assert!(!seg.is_empty() || i + 1 == segs.len());
                    for piece in pieces(seg) {
                        prop_assert!(!is_dot_piece(piece));
                    }
                }
                prop_assert!(!s.contains('\\'));
            }
        }

        #[test]
        fn accepted_iff_escapes_decode_to_utf8(s in escapes()) {
            let decoded_is_utf8 = std::str::from_utf8(&decode_once(&s)).is_ok();
            match check_request_path(&s) {
                Ok(()) => prop_assert!(decoded_is_utf8),
                Err(PathError::NotUtf8) => prop_assert!(!decoded_is_utf8),
                Err(_) => {}
            }
        }

        #[test]
        fn literal_prefix_of_a_path_matches_it(segs in proptest::collection::vec(valid_segment(), 1..6), k in 0usize..6) {
            let path = format!("/{}", segs.join("/"));
            prop_assert!(check_request_path(&path).is_ok());
            let k = k.min(segs.len());
            let pattern = format!("/{}", segs[..k].join("/"));
            prop_assert!(PathPattern::parse(&pattern).unwrap().matches(&path));
            // And `**` matches every accepted path.
            prop_assert!(PathPattern::parse("/**").unwrap().matches(&path));
        }

        #[test]
        fn a_different_literal_never_matches(segs in proptest::collection::vec(valid_segment(), 1..6)) {
            let path = format!("/{}", segs.join("/"));
            let pattern = format!("/{}x", segs.join("/"));
            prop_assert!(!PathPattern::parse(&pattern).unwrap().matches(&path));
        }

        #[test]
        fn star_matches_exactly_one_segment(segs in proptest::collection::vec("[a-z]{1,5}", 1..6)) {
            let path = format!("/{}", segs.join("/"));
            let stars = format!("/{}", vec!["*"; segs.len()].join("/"));
            prop_assert!(PathPattern::parse(&stars).unwrap().matches(&path));
            let one_more = format!("{stars}/*");
            prop_assert!(!PathPattern::parse(&one_more).unwrap().matches(&path));
        }
    }
}
