//! The few operating-system calls the standard library does not offer: the machine's own
//! interface addresses (so "the proxy itself" covers every address an unspecified
//! listener answers on), keeping the tokens in memory out of core dumps and out of
//! reach of same-user debuggers, and the open-files limit (every agent connection costs
//! descriptors; the connection cap must fit in it, SPEC §4a).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Every address configured on a local interface (empty if the OS will not say).
pub(crate) fn local_addresses() -> Vec<IpAddr> {
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

/// Makes the process non-dumpable (no core file, no ptrace or /proc/PID/mem access by
/// other processes of the same user) and sets the core-file limit to zero, so the tokens
/// it holds never land on disk or in another process. Errors name the call that failed.
pub fn harden_process() -> Result<(), String> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) and setrlimit(RLIMIT_CORE) take plain integers
    // and a pointer to a struct that lives for the duration of the call.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(format!(
                "prctl(PR_SET_DUMPABLE): {}",
                std::io::Error::last_os_error()
            ));
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(format!(
                "setrlimit(RLIMIT_CORE): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Raises the soft open-files limit (`RLIMIT_NOFILE`) to the hard limit, which an
/// unprivileged process may do: a container's soft limit is often 1024 while its hard
/// limit is far higher. Returns the soft limit in force afterwards and, when it could not
/// be raised, why (naming the call); `Err` when the limit cannot even be read.
pub(crate) fn raise_open_files_limit() -> Result<(u64, Option<String>), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or fill a struct that lives for the call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(format!(
                "getrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            ));
        }
        if limit.rlim_cur >= limit.rlim_max {
            return Ok((limit.rlim_cur, None));
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let why = format!(
                "setrlimit(RLIMIT_NOFILE, {}): {}",
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
            return Ok((limit.rlim_cur, Some(why)));
        }
    }
    Ok((limit.rlim_max, None))
}

/// How many descriptors the process has open now (`None` if /proc will not say).
pub(crate) fn open_descriptors() -> Option<usize> {
    // The directory's own descriptor, open while it is listed, is not counted.
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_local() {
        assert!(super::local_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }
}
