//! Chaining through an upstream proxy (a DLP scanner, a corporate proxy): its URL, the
//! `NO_PROXY` list that bypasses it, and the CONNECT handshake through it.
//!
//! The CONNECT names the origin by hostname (the upstream proxy does its own checks) and
//! the origin's TLS runs end to end inside the tunnel, verified as usual. The proxy's
//! credentials (`http://user:password@host:port`) go only to the proxy, as
//! `Proxy-Authorization: Basic`, marked sensitive and never logged; a refusal is reported
//! with the status the proxy answered and never retried with other credentials.

use std::fmt;
use std::net::IpAddr;

use base64::Engine;
use http::HeaderValue;

use crate::routes::Host;

/// `--upstream-proxy` / `HTTPS_PROXY`, parsed.
#[derive(Clone)]
pub struct ProxyUrl {
    /// TLS to the proxy itself (`https://`).
    pub tls: bool,
    pub host: Host,
    pub port: u16,
    /// `Proxy-Authorization` value, when the URL carries user-info.
    pub authorization: Option<HeaderValue>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ProxyUrl {
    /// The URL without its credentials, for logs and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        let auth = if self.authorization.is_some() {
            "***@"
        } else {
            ""
        };
        write!(
            f,
            "{scheme}://{auth}{}:{}",
            self.host.authority_form(),
            self.port
        )
    }
}

impl ProxyUrl {
    /// Parses `http://[user:password@]host[:port][/]` or `https://…`. A missing scheme
    /// means `http://`, as curl and Go read `HTTPS_PROXY=proxy:3128`; a missing port is the
    /// scheme's default. Anything else (another scheme, a path, a bad host) is refused.
    pub fn parse(input: &str) -> Result<ProxyUrl, String> {
        let input = input.trim();
        // Only a well-formed scheme is one: in `user:pa://ss@host` the `://` is inside the
        // password, which must not be named in the error.
        let (tls, rest) = match input.split_once("://").filter(|(s, _)| is_scheme(s)) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "unsupported scheme {scheme:?} (use http:// or https://)"
                ));
            }
            None => (false, input),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err("a proxy URL has no path or query".into());
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = crate::policy::parse_authority(hostport)
            .ok_or_else(|| "not a valid host[:port]".to_string())?;
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        let authorization = match userinfo {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                let credential = format!("{}:{}", percent_decode(user)?, percent_decode(password)?);
                let encoded = base64::engine::general_purpose::STANDARD.encode(credential);
                let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|_| "credentials cannot go in a header".to_string())?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(ProxyUrl {
            tls,
            host,
            port,
            authorization,
        })
    }
}

/// A URL scheme as RFC 3986 spells one: a letter, then letters, digits, `+`, `-`, `.`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A proxy URL as the operator wrote it, for a message about it: `http://user:pass@host`
/// → `http://***@host`, whatever the URL's shape. Everything before the last `@` may be
/// credentials (a password may hold `@`, `/` or `://`; the scheme may be missing or
/// wrong), so all of it goes but a well-formed scheme.
pub(crate) fn redact_userinfo(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let kept = url[..at]
        .find("://")
        .filter(|&end| is_scheme(url[..end].trim_start()))
        .map_or(0, |end| end + 3);
    format!("{}***{}", &url[..kept], &url[at..])
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or("invalid percent-escape in the credentials")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".to_string())
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    /// `*`: everything.
    All,
    /// A domain and its subdomains (label boundary), optionally on one port.
    Domain(String, Option<u16>),
    /// An IP address, optionally on one port.
    Ip(IpAddr, Option<u16>),
    /// A CIDR range of IP hosts.
    Cidr(IpAddr, u8),
}

/// The hosts that bypass the upstream proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<Bypass>,
}

impl NoProxy {
    /// Parses a comma-separated list. Entries that cannot be understood are refused, so a
    /// typo is a start-up error rather than traffic silently sent the wrong way.
    pub fn parse(list: &str) -> Result<NoProxy, String> {
        let mut entries = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            entries.push(parse_entry(raw).ok_or_else(|| {
                format!("NO_PROXY entry {raw:?} is not a host, host:port, IP or CIDR range")
            })?);
        }
        Ok(NoProxy { entries })
    }

    /// Does `host:port` bypass the upstream proxy?
    pub fn matches(&self, host: &Host, port: u16) -> bool {
        self.entries.iter().any(|e| match (e, host) {
            (Bypass::All, _) => true,
            (Bypass::Domain(d, p), Host::Name(name)) => {
                p.is_none_or(|p| p == port)
                    && (name == d
                        || (name.len() > d.len()
                            && name.ends_with(d.as_str())
                            && name.as_bytes()[name.len() - d.len() - 1] == b'.'))
            }
            (Bypass::Ip(ip, p), Host::Ip(h)) => ip == h && p.is_none_or(|p| p == port),
            (Bypass::Cidr(net, bits), Host::Ip(h)) => in_cidr(*h, *net, *bits),
            _ => false,
        })
    }
}

fn parse_entry(raw: &str) -> Option<Bypass> {
    if raw == "*" {
        return Some(Bypass::All);
    }
    if let Some((net, bits)) = raw.split_once('/') {
        let net: IpAddr = net
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        let bits: u8 = bits.parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        return (bits <= max).then_some(Bypass::Cidr(net, bits));
    }
    if let Ok(ip) = raw
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Some(Bypass::Ip(ip, None));
    }
    let raw = raw
        .strip_prefix("*.")
        .or_else(|| raw.strip_prefix('.'))
        .unwrap_or(raw);
    let (host, port) = crate::policy::parse_authority(raw)?;
    Some(match host {
        Host::Ip(ip) => Bypass::Ip(ip, port),
        Host::Name(n) => Bypass::Domain(n, port),
    })
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let to_v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), true),
        IpAddr::V6(v6) => (
            v6.to_ipv4_mapped()
                .map(|v4| v4.to_ipv6_mapped())
                .unwrap_or(v6),
            v6.to_ipv4_mapped().is_some(),
        ),
    };
    let (a, a4) = to_v6(ip);
    let (n, n4) = to_v6(net);
    if a4 != n4 {
        return false;
    }
    let bits = if n4 { bits as u32 + 96 } else { bits as u32 };
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    (u128::from(a) & mask) == (u128::from(n) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    #[test]
    fn proxy_urls() {
        let p = ProxyUrl::parse("http://dlp.internal:3128").unwrap();
        assert_eq!(
            (p.tls, p.port, p.authorization.is_none()),
            (false, 3128, true)
        );
        let p = ProxyUrl::parse("https://user:p%40ss@dlp.internal").unwrap();
        assert_eq!((p.tls, p.port), (true, 443));
        // base64("user:p@ss")
        assert_eq!(p.authorization.as_ref().unwrap(), "Basic dXNlcjpwQHNz");
        assert!(p.authorization.as_ref().unwrap().is_sensitive());
        assert_eq!(p.to_string(), "https://***@dlp.internal:443");
        assert!(!format!("{p:?}").contains("dXNlcjpwQHNz"));
        let p = ProxyUrl::parse("proxy.corp:8080/").unwrap();
        assert_eq!((p.tls, p.port), (false, 8080));
        let p = ProxyUrl::parse("http://[::1]:3128").unwrap();
        assert_eq!(p.host, h("::1"));
        for bad in [
            "socks5://p:1080",
            "http://p:3128/path",
            "http://",
            "http://p:99999",
            "http://a b:1",
            "http://u:%zz@p:1",
        ] {
            assert!(ProxyUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// What start-up prints about a proxy URL it refuses.
    fn refusal(input: &str) -> String {
        let why = ProxyUrl::parse(input).err().unwrap_or_default();
        format!("{:?}: {why}", redact_userinfo(input))
    }

    #[test]
    fn no_shape_of_url_prints_its_password() {
        for url in [
            "user:Secret@proxy.corp:3128/x",
            "http://user:Secret@proxy.corp:3128/x",
            "ftp://user:Secret@proxy.corp:3128",
            "http://user:Secret@proxy.corp:99999",
            "http://user:Secret@proxy.corp:port",
            "user:Sec://ret@proxy.corp:3128",
            "user:Sec/ret@proxy.corp:3128",
            "http://user:Sec@ret@proxy.corp:3128/x",
            "user:Secret@proxy.corp:3128/x@y",
            " user:Secret@[::1:3128",
            "Secret@proxy.corp:3128/x",
            "http://user:Sec%72et@proxy.corp:3128/x",
        ] {
            let shown = refusal(url);
            assert!(ProxyUrl::parse(url).is_err(), "{url}");
            for secret in ["Secret", "Sec", "ret", "Sec%72et"] {
                assert!(!shown.contains(secret), "{url} → {shown}");
            }
        }
        assert_eq!(
            redact_userinfo("http://user:Secret@proxy.corp:3128/x"),
            "http://***@proxy.corp:3128/x"
        );
        assert_eq!(
            redact_userinfo("user:Secret@proxy.corp:3128/x"),
            "***@proxy.corp:3128/x"
        );
        assert_eq!(
            redact_userinfo("user:pa://Secret@proxy.corp"),
            "***@proxy.corp"
        );
        assert_eq!(redact_userinfo("proxy.corp:3128/x"), "proxy.corp:3128/x");
        assert!(refusal("user:pa://ss@proxy.corp").contains("no path"));
    }

    #[test]
    fn no_proxy_table() {
        let np = NoProxy::parse(" example.com, .internal.test ,10.0.0.0/8, 192.168.1.5, api.test:8443, [::1], *.wild.test").unwrap();
        let cases = [
            ("example.com", 443, true),
            ("a.example.com", 443, true),
            ("a.b.example.com", 443, true),
            ("evilexample.com", 443, false),
            ("example.com.evil.org", 443, false),
            ("internal.test", 443, true),
            ("x.internal.test", 443, true),
            ("10.2.3.4", 443, true),
            ("11.2.3.4", 443, false),
            ("192.168.1.5", 443, true),
            ("192.168.1.6", 443, false),
            ("api.test", 8443, true),
            ("api.test", 443, false),
            ("::1", 443, true),
            ("x.wild.test", 443, true),
            ("other.org", 443, false),
        ];
        for (host, port, want) in cases {
            assert_eq!(np.matches(&h(host), port), want, "{host}:{port}");
        }
        assert!(NoProxy::parse("*").unwrap().matches(&h("anything.org"), 1));
        assert!(!NoProxy::parse("").unwrap().matches(&h("anything.org"), 1));
        assert!(NoProxy::parse("10.0.0.0/33").is_err());
        assert!(NoProxy::parse("bad host!").is_err());
        let v6 = NoProxy::parse("fd00::/8").unwrap();
        assert!(v6.matches(&h("fd12::1"), 1));
        assert!(!v6.matches(&h("fe80::1"), 1));
        assert!(!v6.matches(&h("10.0.0.1"), 1));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC*") {
            let _ = NoProxy::parse(&s);
            let _ = ProxyUrl::parse(&s);
        }

        #[test]
        fn a_refused_urls_password_is_never_shown(
            scheme in prop_oneof![Just(""), Just("http://"), Just("ftp://"), Just("1x://")],
            password in "[A-Za-z0-9:/@%?#.;-]{0,10}",
            tail in prop_oneof![Just(""), Just("/x"), Just(":99999"), Just(":port"), Just("/@y")],
        ) {
            let password = format!("Pw{password}Zq");
            let url = format!("{scheme}user:{password}@proxy.corp{tail}");
            if ProxyUrl::parse(&url).is_err() {
                let why = ProxyUrl::parse(&url).err().unwrap_or_default();
                let shown = format!("{:?}: {why}", redact_userinfo(&url));
                prop_assert!(!shown.contains("Pw") && !shown.contains("Zq"), "{url} → {shown}");
            }
        }

        #[test]
        fn domain_entries_match_on_label_boundaries(
            base in "[a-z][a-z0-9]{1,8}\\.[a-z]{2,5}",
            label in "[a-z0-9]{1,8}",
            dot in proptest::bool::ANY,
        ) {
            let entry = if dot { format!(".{base}") } else { base.clone() };
            let np = NoProxy::parse(&entry).unwrap();
            let host = |s: &str| Host::parse(s).unwrap();
            let sub = format!("{label}.{base}");
            let glued = format!("{label}{base}");
            prop_assert!(np.matches(&host(&base), 443));
            prop_assert!(np.matches(&host(&sub), 443));
            prop_assert!(!np.matches(&host(&glued), 443));
        }

        #[test]
        fn cidr_matches_exactly_its_range(a in any::<u32>(), bits in 0u8..=32) {
            let ip = std::net::Ipv4Addr::from(a);
            let np = NoProxy::parse(&format!("{ip}/{bits}")).unwrap();
            prop_assert!(np.matches(&Host::Ip(ip.into()), 1));
            if bits > 0 {
                // Flip the last bit inside the prefix: outside the range.
                let outside = std::net::Ipv4Addr::from(a ^ (1u32 << (32 - bits)));
                prop_assert!(!np.matches(&Host::Ip(outside.into()), 1));
            }
        }
    }
}
