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

mod admin;
mod app;
mod audit;
mod ca;
mod chain;
mod config;
mod destination;
mod error;
mod logging;
mod metrics;
mod policy;
mod proxy;
mod readahead;
mod reload;
mod routes;
mod suggest;
mod sys;
mod upstream;

// The crate's outside: what the binary (main.rs) runs, and what the benches, the fuzz
// targets and the tests drive directly. Everything else is the crate's own, so the
// compiler reports what nothing uses.
pub use admin::probe;
pub use app::run;
pub use ca::{BottleCa, CA_CERT_FILE, LeafCache};
pub use chain::NoProxy;
pub use config::{CaCommand, Cli, Command, Config, RoutesCommand, RunArgs};
pub use logging::{flush as flush_logs, init as init_logs, on_worker_park};
pub use policy::{
    Allowed, Authority, Channel, Decision, Mode, Reported, RequestView, admit, decide,
};
pub use proxy::framing::HeadLog;
pub use reload::load_routes;
pub use routes::{
    Host, HostPattern, OneSecret, PathPattern, RouteTable, SecretSource, check_request_path,
};
pub use suggest::{Suggester, suggest_routes};
pub use sys::harden_process;
