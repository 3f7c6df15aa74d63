//! Policy evaluation allocates nothing on the path of an allowed request (issue #8): the
//! routes in `routes.example.yaml`, requests as the proxy hands them to `policy::decide`,
//! and an allocator that counts what this thread asks for while the decision runs.
//! (A refusal may allocate: its reason is a sentence for the agent.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use egress_proxy::{
    Authority, Channel, Host, Mode, OneSecret, RequestView, RouteTable, admit, decide,
};
use http::{Method, Request, Version};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is passed on to the system allocator unchanged; the counter is a
// const-initialised thread-local without a destructor, so counting never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for this call is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for this call is passed on unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for this call is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for this call is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocations this thread made while `f` ran.
fn allocations_in<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (ALLOCATIONS.with(Cell::get) - before, out)
}

#[test]
fn an_allowed_request_is_decided_without_allocating() {
    let routes = RouteTable::from_text(
        include_str!("../routes.example.yaml"),
        &OneSecret("token-value"),
    )
    .expect("routes.example.yaml loads");
    // (tunnel host, port, method, target, Host header, version)
    let cases = [
        (
            "api.github.com",
            443,
            Method::GET,
            "/repos/acme/widgets",
            Some("api.github.com"),
            Version::HTTP_11,
        ),
        (
            "api.github.com",
            443,
            Method::GET,
            "/repos/x/issues/4/comments?page=2",
            Some("API.GitHub.com:443"),
            Version::HTTP_11,
        ),
        (
            "api.anthropic.com",
            443,
            Method::POST,
            "/v1/messages",
            Some("api.anthropic.com."),
            Version::HTTP_11,
        ),
        (
            "api.anthropic.com",
            443,
            Method::POST,
            "https://api.anthropic.com/v1/messages",
            None,
            Version::HTTP_2,
        ),
        (
            "files.pythonhosted.org",
            443,
            Method::GET,
            "/packages/ab/cd/x-1.0.tar.gz",
            Some("files.pythonhosted.org"),
            Version::HTTP_11,
        ),
        (
            "gitlab.example.com",
            443,
            Method::GET,
            "/api/v4/projects/acme%2Fwidgets/issues",
            Some("gitlab.example.com"),
            Version::HTTP_11,
        ),
        (
            "mirror.example.com",
            80,
            Method::HEAD,
            "http://mirror.example.com/debian/",
            Some("mirror.example.com"),
            Version::HTTP_11,
        ),
    ];
    for (host, port, method, target, host_header, version) in cases {
        let mut builder = Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        if let Some(h) = host_header {
            builder = builder.header("host", h);
        }
        let req = builder
            .header("user-agent", "claude-cli/2.0")
            .header("accept", "application/json")
            .body(())
            .expect("test request");
        let authority = Authority {
            host: Host::parse(host).expect("test host"),
            port,
        };
        let channel = if port == 80 {
            Channel::Plain
        } else {
            Channel::Tunnel
        };
        let view = RequestView {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
        };
        let (allocations, decision) = allocations_in(|| {
            decide(&routes, &authority, channel, Mode::Enforce, view)
                .map(|d| d.route().map(|r| r.index))
        });
        assert!(
            matches!(decision, Ok(Some(_))),
            "{host} {target}: {decision:?}"
        );
        assert_eq!(allocations, 0, "{host} {target}: {allocations} allocations");
    }

    // The counter does count: a refusal builds its reason.
    let req = Request::get("/nope")
        .header("host", "api.github.com")
        .body(())
        .expect("test request");
    let authority = Authority {
        host: Host::parse("api.github.com").expect("test host"),
        port: 443,
    };
    let view = RequestView {
        method: req.method(),
        uri: req.uri(),
        version: req.version(),
        headers: req.headers(),
    };
    let (allocations, decision) = allocations_in(|| {
        decide(&routes, &authority, Channel::Tunnel, Mode::Enforce, view)
            .map(|d| d.route().map(|r| r.index))
    });
    assert!(decision.is_err());
    assert!(allocations > 0);
}

/// The matched route's limits step allocates nothing for a request it lets through, with
/// or without limits (a route without them costs two `Option` checks).
#[test]
fn the_limits_step_allocates_nothing_for_an_admitted_request() {
    let routes = RouteTable::from_text(
        "routes:\n  - host: free.example\n  - host: limited.example\n    rate_limit: 60/m\n    burst: 100\n    max_body_bytes: 1048576\n",
        &OneSecret("token-value"),
    )
    .expect("routes load");
    for host in ["free.example", "limited.example"] {
        let req = Request::post("/v1/messages")
            .header("host", host)
            .body(())
            .expect("test request");
        let authority = Authority {
            host: Host::parse(host).expect("test host"),
            port: 443,
        };
        let view = RequestView {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
        };
        let decision =
            decide(&routes, &authority, Channel::Tunnel, Mode::Enforce, view).expect("allowed");
        let route = decision.route().expect("a route matched");
        let (allocations, admitted) =
            allocations_in(|| admit(route, view, 1000, std::time::Instant::now()));
        assert!(admitted.is_ok(), "{host}: {admitted:?}");
        assert_eq!(allocations, 0, "{host}: {allocations} allocations");
    }
}
