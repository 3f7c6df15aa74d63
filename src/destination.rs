//! Which addresses an upstream connection may dial (the SSRF rules of SPEC §4.3).
//!
//! Pure classification: an address goes in, a verdict comes out. The upstream connector
//! resolves a host, asks [`check`] about every address, and dials only addresses it
//! checked, so a DNS answer cannot steer the proxy at the bottle's own network, the
//! host's loopback or a cloud metadata service unless a route says `allow_private`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Loopback, private, link-local (cloud metadata), CGNAT, unspecified, or a mapped
    /// form of one: reachable only with `allow_private: true`.
    Private,
    /// Multicast, broadcast or reserved: never a TCP peer.
    NotUnicast,
    /// One of the proxy's own listeners.
    OwnListener,
}

impl Refused {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Refused::Private => "a private, loopback, link-local or metadata address",
            Refused::NotUnicast => "not a unicast address",
            Refused::OwnListener => "the proxy's own listener",
        }
    }
}

/// Checks one address an upstream connection would dial.
pub(crate) fn check(
    addr: SocketAddr,
    allow_private: bool,
    own: &[SocketAddr],
) -> Result<(), Refused> {
    if is_own_listener(addr, own) {
        return Err(Refused::OwnListener);
    }
    match classify(addr.ip()) {
        Class::Public => Ok(()),
        Class::Private if allow_private => Ok(()),
        Class::Private => Err(Refused::Private),
        Class::NotUnicast => Err(Refused::NotUnicast),
    }
}

/// True when `addr` reaches one of `own` (a listener on an unspecified address listens
/// on every local address, so any loopback or unspecified address with its port does).
pub(crate) fn is_own_listener(addr: SocketAddr, own: &[SocketAddr]) -> bool {
    let ip = canonical(addr.ip());
    own.iter().any(|l| {
        l.port() == addr.port()
            && (canonical(l.ip()) == ip
                || (l.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified())))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Public,
    Private,
    NotUnicast,
}

/// The IPv4 address an IPv6 address stands for, when it embeds one (IPv4-mapped,
/// IPv4-compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`), else the address itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4).unwrap_or(ip),
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    // IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks); not :: or ::1.
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    // NAT64 well-known prefix and the local-use prefix 64:ff9b:1::/48.
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1) {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn classify(ip: IpAddr) -> Class {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let o = ip.octets();
    if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        return Class::NotUnicast;
    }
    let private = ip.is_unspecified()
        || o[0] == 0 // 0.0.0.0/8 "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, including 169.254.169.254 metadata
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 CGNAT (and 100.100.100.200)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24, incl. 192.0.0.192 metadata
        || (o[0] == 198 && (o[1] & 0xfe) == 18); // 198.18/15 benchmarking
    if private {
        Class::Private
    } else {
        Class::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    let s = ip.segments();
    if ip.is_multicast() {
        return Class::NotUnicast;
    }
    let private = ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local (incl. fd00:ec2::254 metadata)
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        || (s[0] == 0x100 && s[1..4] == [0; 3]) // 100::/64 discard
        || (s[0] == 0x2001 && s[1] == 0xdb8); // documentation
    if private {
        Class::Private
    } else {
        Class::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(ip: &str, allow_private: bool) -> Result<(), Refused> {
        let addr = SocketAddr::new(ip.parse().unwrap(), 443);
        check(addr, allow_private, &[])
    }

    #[test]
    fn table() {
        use Refused::*;
        let cases: &[(&str, Result<(), Refused>)] = &[
            ("93.184.216.34", Ok(())),
            ("8.8.8.8", Ok(())),
            ("2606:4700::1111", Ok(())),
            ("127.0.0.1", Err(Private)),
            ("127.255.0.9", Err(Private)),
            ("10.1.2.3", Err(Private)),
            ("172.16.0.1", Err(Private)),
            ("172.31.255.255", Err(Private)),
            ("172.32.0.1", Ok(())),
            ("192.168.1.1", Err(Private)),
            ("169.254.169.254", Err(Private)),
            ("100.64.0.1", Err(Private)),
            ("100.100.100.200", Err(Private)),
            ("100.128.0.1", Ok(())),
            ("192.0.0.192", Err(Private)),
            ("0.0.0.0", Err(Private)),
            ("0.1.2.3", Err(Private)),
            ("::", Err(Private)),
            ("::1", Err(Private)),
            ("fe80::1", Err(Private)),
            ("fd00:ec2::254", Err(Private)),
            ("fc00::1", Err(Private)),
            ("::ffff:127.0.0.1", Err(Private)),
            ("::ffff:169.254.169.254", Err(Private)),
            ("::ffff:10.0.0.1", Err(Private)),
            ("::ffff:8.8.8.8", Ok(())),
            ("::127.0.0.1", Err(Private)),
            ("64:ff9b::a9fe:a9fe", Err(Private)),
            ("64:ff9b::808:808", Ok(())),
            ("2002:7f00:1::", Err(Private)),
            ("224.0.0.1", Err(NotUnicast)),
            ("255.255.255.255", Err(NotUnicast)),
            ("240.0.0.1", Err(NotUnicast)),
            ("ff02::1", Err(NotUnicast)),
        ];
        for (ip, want) in cases {
            assert_eq!(verdict(ip, false), *want, "{ip}");
        }
    }

    #[test]
    fn allow_private_opens_private_ranges_only() {
        assert_eq!(verdict("10.0.0.1", true), Ok(()));
        assert_eq!(verdict("127.0.0.1", true), Ok(()));
        assert_eq!(verdict("::ffff:192.168.0.1", true), Ok(()));
        assert_eq!(verdict("224.0.0.1", true), Err(Refused::NotUnicast));
    }

    #[test]
    fn own_listeners() {
        let own: Vec<SocketAddr> = vec![
            "0.0.0.0:8080".parse().unwrap(),
            "127.0.0.1:9090".parse().unwrap(),
        ];
        let chk = |a: &str| check(a.parse().unwrap(), true, &own);
        assert_eq!(chk("127.0.0.1:8080"), Err(Refused::OwnListener));
        assert_eq!(chk("127.0.0.2:8080"), Err(Refused::OwnListener));
        assert_eq!(chk("[::ffff:127.0.0.1]:9090"), Err(Refused::OwnListener));
        assert_eq!(chk("127.0.0.1:8081"), Ok(()));
        assert_eq!(chk("127.0.0.2:9090"), Ok(()));
    }
}
