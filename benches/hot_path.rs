//! Micro-benchmarks of what every request or every new host pays inside the proxy:
//! the policy decision (allocation-free: `tests/allocations.rs`), the path check, and a
//! leaf certificate minted for a new host against one served from the cache; and, for
//! the reload row, what loading a routes file costs.
//!
//! `cargo bench --bench hot_path`; the figures it gave are in docs/decisions.md.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use egress_proxy::{
    Authority, BottleCa, Channel, Host, LeafCache, Mode, OneSecret, RequestView, RouteTable,
    check_request_path, decide,
};
use http::{Method, Request};

fn policy(c: &mut Criterion) {
    let Ok(routes) = RouteTable::from_text(
        include_str!("../routes.example.yaml"),
        &OneSecret("token-value"),
    ) else {
        panic!("routes.example.yaml does not load");
    };
    let mut group = c.benchmark_group("policy");
    for (name, host, method, target) in [
        (
            "allow_first_route",
            "api.github.com",
            Method::GET,
            "/repos/acme/widgets",
        ),
        (
            "allow_wildcard_late_route",
            "files.pythonhosted.org",
            Method::GET,
            "/packages/ab/cd/x-1.0.tar.gz",
        ),
        (
            "deny_path",
            "api.github.com",
            Method::GET,
            "/orgs/other/repos",
        ),
    ] {
        let Ok(req) = Request::builder()
            .method(method)
            .uri(target)
            .header("host", host)
            .header("user-agent", "claude-cli/2.0")
            .header("accept", "application/json")
            .body(())
        else {
            panic!("test request");
        };
        let Ok(host) = Host::parse(host) else {
            panic!("test host");
        };
        let authority = Authority { host, port: 443 };
        group.bench_function(name, |b| {
            b.iter(|| {
                let view = RequestView {
                    method: req.method(),
                    uri: req.uri(),
                    version: req.version(),
                    headers: req.headers(),
                };
                black_box(
                    decide(
                        &routes,
                        &authority,
                        Channel::Tunnel,
                        Mode::Enforce,
                        black_box(view),
                    )
                    .is_ok(),
                )
            })
        });
    }
    group.bench_function("check_request_path", |b| {
        b.iter(|| {
            check_request_path(black_box("/v1/projects/acme%2Fwidgets/issues/42/comments")).is_ok()
        })
    });
    group.finish();
}

fn leaves(c: &mut Criterion) {
    let Ok(dir) = tempfile::tempdir() else {
        panic!("temporary directory");
    };
    let Ok((ca, _)) = BottleCa::load_or_mint(dir.path()) else {
        panic!("bottle CA");
    };
    let Ok(cache) = LeafCache::new(ca, 1024) else {
        panic!("leaf cache");
    };
    let Ok(known) = Host::parse("api.github.com") else {
        panic!("test host");
    };
    let mut group = c.benchmark_group("leaf");
    group.bench_function("cached_host", |b| {
        b.iter(|| cache.server_config(black_box(&known)).is_ok())
    });
    // A host never seen before on every iteration: mint, sign, build its TLS config and
    // insert it (evicting the least recently used entry once the cache is full).
    let next = AtomicU64::new(0);
    group.bench_function("new_host", |b| {
        b.iter_batched(
            || {
                let n = next.fetch_add(1, Ordering::Relaxed);
                Host::parse(&format!("h{n}.example.com")).ok()
            },
            |host| host.map(|h| cache.server_config(&h).is_ok()),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// What one reload pays before the swap: parse and validate a routes file (on a blocking
/// thread, `src/reload.rs`), for the example file and for the bench's two routes.
fn reload(c: &mut Criterion) {
    let example = include_str!("../routes.example.yaml");
    let two_routes = "routes:\n  - host: localhost\n    ports: [8443]\n    auth_scheme: Bearer\n    token_env: T\n  - host: \"*.bench.test\"\n    ports: [8443]\n";
    let mut group = c.benchmark_group("routes_load");
    for (name, text) in [("example_file", example), ("two_routes", two_routes)] {
        group.bench_function(name, |b| {
            b.iter(|| RouteTable::from_text(black_box(text), &OneSecret("token-value")).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, policy, leaves, reload);
criterion_main!(benches);
