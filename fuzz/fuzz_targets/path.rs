//! The path check and pattern matcher: never panic; an accepted path has no dot piece
//! and no empty segment but a trailing one; its escapes, decoded once, are UTF-8; `/**`
//! matches every accepted path.
#![no_main]
use egress_proxy::{PathPattern, check_request_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (pattern, path) = s.split_once('\n').unwrap_or(("/**", s));
    if check_request_path(path).is_ok() {
        assert!(path.starts_with('/'));
        assert!(!path[1..].split('/').rev().skip(1).any(|seg| seg.is_empty()));
        assert!(!path.split('/').any(|seg| seg == "." || seg == ".."));
        assert!(std::str::from_utf8(&decode_once(path.as_bytes())).is_ok());
        assert!(PathPattern::parse("/**").unwrap().matches(path));
        if let Ok(p) = PathPattern::parse(pattern) {
            let _ = p.matches(path);
        }
    }
});

/// Every `%XY` decoded once (an accepted path has only well-formed escapes).
fn decode_once(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = match bytes[i..] {
            [b'%', hi, lo, ..] => hex(hi).zip(hex(lo)),
            _ => None,
        };
        match escape {
            Some((hi, lo)) => {
                out.push(hi << 4 | lo);
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
