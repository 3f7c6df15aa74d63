//! The routes-file parser and validator: never panic, whatever the text.
#![no_main]
use egress_proxy::{Host, RouteTable, SecretSource};
use libfuzzer_sys::fuzz_target;

struct Fixed;
impl SecretSource for Fixed {
    fn env(&self, _: &str) -> Option<String> {
        Some("token".into())
    }
    fn file(&self, _: &str) -> Result<String, String> {
        Ok("token\n".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(t) = RouteTable::from_text(s, &Fixed) {
        let host = Host::parse("a.example").unwrap();
        let _ = t.decide(&host, 443, &http::Method::GET, "/a");
    }
});
