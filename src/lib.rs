//! egress-proxy: a TLS-intercepting egress sidecar for AI agents.
//!
//! The agent's only way out. It allows the hosts, methods and paths of a routes file,
//! injects credentials the agent never sees, and re-originates every request over verified
//! TLS. `docs/reference.md` is the contract; this crate is its implementation. See
//! README.md for how the modules fit together.

// Linux only: the process hardening in `sys.rs` (`prctl`) is Linux's, and the image, the
// examples and the tests are Linux's. Said here, once, rather than as an unresolved name
// deep inside `sys.rs` on another OS.
#[cfg(not(target_os = "linux"))]
compile_error!(
    "egress-proxy runs on Linux only (it calls prctl(2) to keep tokens out of core dumps); \
     build it for a *-linux-* target, or in the Dockerfile's image"
);

pub mod admin;
pub mod app;
pub mod ca;
pub mod chain;
pub mod config;
pub mod destination;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod readahead;
pub mod reload;
pub mod routes;
pub mod sys;
pub mod upstream;
