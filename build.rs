//! Lays out the binary's start-up code in one place.
//!
//! An idle sidecar's memory is mostly pages of its own code: each function run at start-up
//! faults in the 64 KiB around it (the kernel's fault-around), and with start-up functions
//! spread over the whole `.text`, that was 4.3 of its 7 MiB. `link/startup.order` lists
//! the ~1,400 functions a start runs (written by `scripts/startup-order`, from a run
//! under callgrind); the linker puts them first, so they share ~1.2 MiB of pages
//! (docs/benchmarks.md). Names the build does not have (a different toolchain or
//! `Cargo.lock`) are skipped silently: a stale file costs memory, never correctness.
//!
//! Only for release builds of `x86_64-unknown-linux-gnu` (the image's target), whose
//! default linker since Rust 1.90 is LLD; `EGRESS_PROXY_NO_STARTUP_ORDER=1` turns it off
//! for a toolchain that links with GNU ld, which has no such option.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=link/startup.order");
    println!("cargo:rerun-if-env-changed=EGRESS_PROXY_NO_STARTUP_ORDER");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let off = std::env::var_os("EGRESS_PROXY_NO_STARTUP_ORDER").is_some_and(|v| v != "0");
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = Path::new(&dir).join("link/startup.order");
    if target == "x86_64-unknown-linux-gnu" && profile == "release" && !off && order.is_file() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
