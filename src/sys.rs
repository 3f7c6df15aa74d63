//! The few operating-system facts the proxy needs that the standard library does not
//! give: the machine's own interface addresses (so "the proxy itself" covers every
//! address an unspecified listener answers on).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Every address configured on a local interface (empty if the OS will not say).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we only read, following
    // `ifa_next` until null, reading each `ifa_addr` as the family it declares, and free
    // exactly once with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = addr as *const libc::sockaddr_in;
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            (*sin).sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = addr as *const libc::sockaddr_in6;
                        out.push(IpAddr::V6(Ipv6Addr::from((*sin6).sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_local() {
        assert!(super::local_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }
}
