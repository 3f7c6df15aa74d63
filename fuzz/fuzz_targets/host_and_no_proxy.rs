//! Host parsing, route host patterns and NO_PROXY lists: never panic; parsing is
//! canonical (a parsed host re-parses to itself).
#![no_main]
use egress_proxy::{Host, HostPattern, NoProxy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (a, b) = s.split_once('\n').unwrap_or((s, "example.com"));
    if let Ok(h) = Host::parse(a) {
        assert_eq!(Host::parse(&h.authority_form()).ok(), Some(h.clone()));
        if let Ok(p) = HostPattern::parse(b) {
            let _ = p.matches(&h);
        }
        if let Ok(np) = NoProxy::parse(b) {
            let _ = np.matches(&h, 443);
        }
    }
});
