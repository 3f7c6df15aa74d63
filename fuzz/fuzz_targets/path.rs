//! The path check and pattern matcher: never panic; an accepted path has no dot piece
//! and no empty segment but a trailing one; `/**` matches every accepted path.
#![no_main]
use egress_proxy::routes::{PathPattern, check_request_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (pattern, path) = s.split_once('\n').unwrap_or(("/**", s));
    if check_request_path(path).is_ok() {
        assert!(path.starts_with('/'));
        assert!(!path[1..].split('/').rev().skip(1).any(|seg| seg.is_empty()));
        assert!(!path.split('/').any(|seg| seg == "." || seg == ".."));
        assert!(PathPattern::parse("/**").unwrap().matches(path));
        if let Ok(p) = PathPattern::parse(pattern) {
            let _ = p.matches(path);
        }
    }
});
