//! Host names as the policy sees them: one canonical spelling per host, and the
//! patterns routes use to name hosts.
//!
//! Every host that reaches a decision (a CONNECT target, a `Host` header, a route's
//! `host`) goes through [`Host::parse`] first, so two spellings of one host (`API.Example.com.`
//! and `api.example.com`) can never be told apart by the matcher, and anything that is not
//! plainly a DNS name or an IP literal (user-info, percent signs, an all-numeric name that
//! some resolvers read as an IPv4 address) is refused instead of guessed at.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// A host in canonical form: a lower-case DNS name without a trailing dot, or an IP address.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

/// Why a host string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("host is longer than 253 characters")]
    TooLong,
    #[error("host has an empty label")]
    EmptyLabel,
    #[error("host label is longer than 63 characters")]
    LabelTooLong,
    #[error("host has a character that is not allowed in a DNS name")]
    BadCharacter,
    #[error("all-numeric host name (read as an IP address by some resolvers)")]
    Numeric,
    #[error("bracketed host is not an IPv6 address")]
    BadIpv6,
}

impl Host {
    /// Parses a host as it appears in a URI authority, a `Host` header or a routes file:
    /// a DNS name (case-insensitive, one trailing dot ignored), an IPv4 address, or an IPv6
    /// address with or without brackets.
    pub fn parse(input: &str) -> Result<Host, HostError> {
        if input.is_empty() {
            return Err(HostError::Empty);
        }
        if let Some(inner) = input.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(HostError::BadIpv6)?;
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| HostError::BadIpv6);
        }
        if let Ok(ip) = input.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        let name = input.strip_suffix('.').unwrap_or(input);
        validate_dns_name(name)?;
        Ok(Host::Name(name.to_ascii_lowercase()))
    }

    /// Whether `input` (as [`Host::parse`] takes it) names this host, without building
    /// a [`Host`]: the per-request check of `Host` and `:authority` allocates nothing.
    /// A spelling `Host::parse` refuses is an error here too.
    pub fn is_named_by(&self, input: &str) -> Result<bool, HostError> {
        if input.is_empty() {
            return Err(HostError::Empty);
        }
        // The spelling the agent almost always sends: exactly our own (already validated)
        // name. Anything else takes the full parse below.
        if let Host::Name(own) = self
            && own == input
        {
            return Ok(true);
        }
        if let Some(inner) = input.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(HostError::BadIpv6)?;
            let ip = inner.parse::<Ipv6Addr>().map_err(|_| HostError::BadIpv6)?;
            return Ok(*self == Host::Ip(IpAddr::V6(ip)));
        }
        if let Ok(ip) = input.parse::<IpAddr>() {
            return Ok(*self == Host::Ip(ip));
        }
        let name = input.strip_suffix('.').unwrap_or(input);
        validate_dns_name(name)?;
        Ok(matches!(self, Host::Name(own) if own.eq_ignore_ascii_case(name)))
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(_) => None,
        }
    }

    /// The host as it goes in a URI authority or a `Host` header: IPv6 in brackets.
    pub fn authority_form(&self) -> String {
        match self {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            // A clone, not `to_string()` through the formatter: this runs per request.
            Host::Name(name) => name.clone(),
            ip => ip.to_string(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks a DNS name (without trailing dot): LDH labels (underscore tolerated, as real
/// service names use it), 1–63 characters each, 253 in all, and not all digits and dots.
fn validate_dns_name(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(HostError::LabelTooLong);
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(HostError::BadCharacter);
        }
    }
    // `2130706433`, `0x7f.1`, `127.1`: not valid IP literals by Rust's strict parser, but
    // inet_aton() and many resolvers read them as addresses. A name whose last label is
    // numeric (or hex) is never a real DNS name, so refuse it outright.
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric_label = |l: &str| {
        l.bytes().all(|b| b.is_ascii_digit())
            || (l.len() > 2
                && (l.starts_with("0x") || l.starts_with("0X"))
                && l[2..].bytes().all(|b| b.is_ascii_hexdigit()))
    };
    if numeric_label(last) {
        return Err(HostError::Numeric);
    }
    Ok(())
}

/// The host a route covers.
#[derive(Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this host.
    Exact(Host),
    /// Every proper subdomain of the stored name, which is kept with a leading dot
    /// (`.example.com`) so a match is one `ends_with` on a label boundary.
    Subdomains(String),
}

/// Why a route's `host` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternError {
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("a bare `*` would allow every host")]
    BareWildcard,
    #[error("`*` is only allowed as a whole leading label (`*.example.com`)")]
    MisplacedWildcard,
    #[error("`*.{0}` covers a public suffix; name a domain below it")]
    PublicSuffix(String),
    #[error("a wildcard cannot cover an IP address")]
    WildcardIp,
}

impl HostPattern {
    pub fn parse(input: &str) -> Result<HostPattern, HostPatternError> {
        let input = input.trim();
        if input == "*" || input == "*." {
            return Err(HostPatternError::BareWildcard);
        }
        if let Some(base) = input.strip_prefix("*.") {
            if base.contains('*') {
                return Err(HostPatternError::MisplacedWildcard);
            }
            let base = match Host::parse(base)? {
                Host::Name(n) => n,
                Host::Ip(_) => return Err(HostPatternError::WildcardIp),
            };
            if is_icann_public_suffix(&base) {
                return Err(HostPatternError::PublicSuffix(base));
            }
            return Ok(HostPattern::Subdomains(format!(".{base}")));
        }
        if input.contains('*') {
            return Err(HostPatternError::MisplacedWildcard);
        }
        Ok(HostPattern::Exact(Host::parse(input)?))
    }

    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (HostPattern::Exact(h), host) => h == host,
            (HostPattern::Subdomains(suffix), Host::Name(name)) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
            (HostPattern::Subdomains(_), Host::Ip(_)) => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => write!(f, "{h}"),
            HostPattern::Subdomains(s) => write!(f, "*{s}"),
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// True when `name` is itself a public suffix in the ICANN section of the Public Suffix
/// List (`com`, `co.uk`, and names under a wildcard rule such as `*.ck`). Suffixes of the
/// private section (`githubusercontent.com`) are domains a company owns, so a wildcard
/// below them names that company's hosts and is allowed.
fn is_icann_public_suffix(name: &str) -> bool {
    match psl::suffix(name.as_bytes()) {
        Some(suffix) => {
            suffix.as_bytes() == name.as_bytes() && suffix.typ() == Some(psl::Type::Icann)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_host_spellings() {
        let h = Host::parse("API.Example.COM.").unwrap();
        assert_eq!(h, Host::Name("api.example.com".into()));
        assert_eq!(
            Host::parse("[::1]").unwrap(),
            Host::parse("0:0::1").unwrap()
        );
        assert_eq!(
            Host::parse("127.0.0.1").unwrap().ip(),
            Some([127, 0, 0, 1].into())
        );
    }

    #[test]
    fn refused_hosts() {
        for bad in [
            "",
            "a..b",
            ".a",
            "a b",
            "user@host",
            "host%2ecom",
            "2130706433",
            "127.1",
            "0x7f000001",
            "a.0x7f",
            "[::1",
            "[nothost]",
            "ex*ample.com",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert!(Host::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn wildcard_patterns() {
        let p = HostPattern::parse("*.example.com").unwrap();
        assert!(p.matches(&Host::parse("a.example.com").unwrap()));
        assert!(p.matches(&Host::parse("a.b.EXAMPLE.com.").unwrap()));
        assert!(!p.matches(&Host::parse("example.com").unwrap()));
        assert!(!p.matches(&Host::parse("evilexample.com").unwrap()));
        assert!(!p.matches(&Host::parse("1.2.3.4").unwrap()));
    }

    #[test]
    fn public_suffix_wildcards() {
        assert_eq!(HostPattern::parse("*"), Err(HostPatternError::BareWildcard));
        assert!(matches!(
            HostPattern::parse("*.com"),
            Err(HostPatternError::PublicSuffix(_))
        ));
        assert!(matches!(
            HostPattern::parse("*.co.uk"),
            Err(HostPatternError::PublicSuffix(_))
        ));
        assert!(HostPattern::parse("*.githubusercontent.com").is_ok());
        assert!(HostPattern::parse("*.pythonhosted.org").is_ok());
        assert!(HostPattern::parse("*.*.example.com").is_err());
        assert!(HostPattern::parse("a.*.example.com").is_err());
        assert!(HostPattern::parse("*.10.0.0.1").is_err());
    }

    #[test]
    fn ip_pattern_matches_only_itself() {
        let p = HostPattern::parse("::1").unwrap();
        assert!(p.matches(&Host::parse("[0::1]").unwrap()));
        assert!(!p.matches(&Host::parse("127.0.0.1").unwrap()));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = Host::parse(&s);
            let _ = HostPattern::parse(&s);
        }

        /// `is_named_by` (the allocation-free per-request check) agrees with comparing
        /// `Host::parse` results, for any input, including refusals.
        #[test]
        fn is_named_by_agrees_with_parse(
            s in "(\\PC{0,12}|[A-Za-z0-9.-]{1,12}|\\[[0-9a-fA-F:.]{0,12}\\]?|[0-9.]{1,15})",
            own in prop::sample::select(vec!["api.example.com", "127.0.0.1", "[::1]", "a1"]),
        ) {
            let own = Host::parse(own).unwrap();
            let expected = Host::parse(&s).map(|h| h == own);
            prop_assert_eq!(own.is_named_by(&s), expected);
            for spelling in [own.authority_form(), own.to_string().to_uppercase(), format!("{own}.")] {
                prop_assert_eq!(own.is_named_by(&spelling), Host::parse(&spelling).map(|h| h == own));
            }
        }

        #[test]
        fn case_and_trailing_dot_do_not_matter(name in "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){1,3}") {
            let a = Host::parse(&name).unwrap();
            prop_assert_eq!(&a, &Host::parse(&name.to_uppercase()).unwrap());
            prop_assert_eq!(&a, &Host::parse(&format!("{name}.")).unwrap());
        }

        #[test]
        fn wildcard_matches_subdomains_on_a_label_boundary(
            label in "[a-z][a-z0-9]{0,8}",
            base in "[a-z][a-z0-9]{2,8}\\.example",
        ) {
            let p = HostPattern::parse(&format!("*.{base}")).unwrap();
            let sub = format!("{label}.{base}");
            let glued = format!("{label}{base}");
            prop_assert!(p.matches(&Host::parse(&sub).unwrap()));
            prop_assert!(!p.matches(&Host::parse(&base).unwrap()));
            prop_assert!(!p.matches(&Host::parse(&glued).unwrap()));
        }
    }
}
